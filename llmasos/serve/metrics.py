"""Prometheus metrics of a serving engine (prometheus-client), in a registry of their own (so two servers in
one process, as in the tests, never share counters). ``/metrics`` serves ``Metrics.render()``.

Counters: requests by how they ended, requests rejected by HTTP status, prompt and generated tokens,
preemptions, prefix-cache block hits (read from the block manager's running total when scraped). Gauges (read from the engine when scraped): running and waiting
requests, KV blocks used / total, the admission limit (max batch). Histograms: time to first token and
inter-token latency.

Energy (with ``meters``: llmasos.energy meters, cumulative joule counters read when scraped): per device
``llmasos_energy_joules_total`` since the server started (label ``estimated`` "true" for the TDP x utilisation
estimate, "false" for a measured counter) and, where its idle power is known (``idle_watts``, measured before
the model was loaded), ``llmasos_energy_idle_watts`` and ``llmasos_energy_active_joules_total`` (the joules
above idle); ``llmasos_energy_joules_per_generated_token`` over all devices since the start.
"""
from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Observer

# seconds: CPU runs of a 135M model sit in the 10-500 ms range, a GPU in 5-50 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class Metrics(Observer):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "model", meters=None, idle_watts: Optional[dict] = None):
        # energy: meters (objects with name, estimated, read() -> cumulative J) read at scrape time, from here on
        self._meters = list(meters or ())
        names = [m.name for m in self._meters]
        if len(set(names)) != len(names):
            raise ValueError(f"energy meter names must be unique, got {names}")
        unknown = set(idle_watts or {}) - set(names)
        if unknown:
            raise ValueError(f"idle watts given for {sorted(unknown)}, which are not among the meters {names}")
        self._idle = dict(idle_watts or {})
        self._t0 = time.perf_counter()
        self._e0 = [m.read() for m in self._meters]
        self._tokens = 0          # generated tokens (the counter's value, kept here for the J/token gauge)
        self.energy_read_errors = 0   # meters that failed to read at the last scrape
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmasos_requests", "Requests finished, by finish reason "
                                "(stop, length, abort, error)", ["reason"], registry=r)
        self.rejected = Counter("llmasos_requests_rejected", "Requests refused before running, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("llmasos_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llmasos_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("llmasos_preemptions", "Requests preempted (blocks freed, recomputed later)",
                                   registry=r)
        self.running = Gauge("llmasos_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("llmasos_requests_waiting", "Requests waiting for admission", registry=r)
        self.blocks_used = Gauge("llmasos_kv_blocks_used", "KV cache blocks held by requests", registry=r)
        self.blocks_total = Gauge("llmasos_kv_blocks_total", "KV cache blocks", registry=r)
        self.max_batch = Gauge("llmasos_max_batch", "Requests the engine admits to run together now (the load "
                               "controller's choice where one runs)", registry=r)
        self._hits = None                # () -> the block manager's monotonic hit total (bind)
        r.register(self)                 # collect(): llmasos_prefix_cache_hit_blocks_total, a counter
        self.ttft = Histogram("llmasos_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmasos_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)

    def bind(self, loop) -> "Metrics":
        """Read the gauges from an EngineLoop when scraped."""
        eng = loop.engine
        self.running.set_function(lambda: eng.num_running)
        self.waiting.set_function(lambda: loop.num_waiting)
        self.blocks_used.set_function(lambda: eng.blocks.num_used)
        self.blocks_total.set_function(lambda: eng.blocks.capacity)
        self.max_batch.set_function(lambda: eng.scheduler.max_batch)
        self._hits = lambda: eng.blocks.hits
        return self

    def collect(self):
        """Read at scrape time: the prefix-cache hits (a monotonic total kept by the block manager) and the energy
        meters' joules since the server started."""
        c = CounterMetricFamily("llmasos_prefix_cache_hit_blocks", "Blocks shared through the prefix cache")
        c.add_metric([], float(self._hits() if self._hits is not None else 0))
        yield c
        if not self._meters:
            return
        seconds = time.perf_counter() - self._t0
        joules = []
        for m, e0 in zip(self._meters, self._e0):
            try:
                joules.append(max(0.0, m.read() - e0))
            except Exception:  # noqa: BLE001  a meter failing (NVML gone) must not fail the whole scrape
                joules.append(None)
        self.energy_read_errors = sum(j is None for j in joules)
        total = CounterMetricFamily("llmasos_energy_joules", "Energy since the server started, per device "
                                    "(estimated=\"true\": TDP x utilisation, not a measured counter)",
                                    labels=["device", "estimated"])
        active = CounterMetricFamily("llmasos_energy_active_joules", "Energy above the device's idle power since "
                                     "the server started", labels=["device", "estimated"])
        idle = GaugeMetricFamily("llmasos_energy_idle_watts", "Idle power measured before the model was loaded",
                                 labels=["device", "estimated"])
        for m, j in zip(self._meters, joules):
            if j is None:           # not readable now: its lines are left out of this scrape
                continue
            labels = [m.name, "true" if m.estimated else "false"]
            total.add_metric(labels, j)
            if m.name in self._idle:
                idle.add_metric(labels, float(self._idle[m.name]))
                active.add_metric(labels, max(0.0, j - float(self._idle[m.name]) * seconds))
        yield total
        yield active
        yield idle
        tokens = self._tokens
        per = GaugeMetricFamily("llmasos_energy_joules_per_generated_token", "All devices' energy since the "
                                "server started over the tokens generated (NaN before the first token or while "
                                "a meter cannot be read)")
        readable = [j for j in joules if j is not None]
        per.add_metric([], sum(readable) / tokens if tokens and len(readable) == len(joules) else float("nan"))
        yield per

    def describe(self):
        return [CounterMetricFamily("llmasos_prefix_cache_hit_blocks", "Blocks shared through the prefix cache")]

    # -- Observer (called from the engine thread; prometheus-client is thread-safe) ----------------------
    def admitted(self, req) -> None:
        self.prompt_tokens.inc(len(req.prompt_ids))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()
        self._tokens += 1

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()
        self._tokens += 1

    def finished(self, req) -> None:
        self.requests.labels(req.finish_reason or "unknown").inc()

    def preempted(self, req) -> None:
        self.preemptions.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
