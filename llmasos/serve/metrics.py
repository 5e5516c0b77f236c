"""Prometheus metrics of a serving engine (prometheus-client), in a registry of their own (so two servers in
one process, as in the tests, never share counters). ``/metrics`` serves ``Metrics.render()``.

Counters: requests by how they ended, requests rejected by HTTP status, prompt and generated tokens,
preemptions, prefix-cache block hits (read from the block manager's running total when scraped). Gauges (read from the engine when scraped): running and waiting
requests, KV blocks used / total. Histograms: time to first token and inter-token latency.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily

from .engine import Observer

# seconds: CPU runs of a 135M model sit in the 10-500 ms range, a GPU in 5-50 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class Metrics(Observer):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str = "model"):
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
        self._hits = lambda: eng.blocks.hits
        return self

    def collect(self):
        """The prefix-cache hits: a monotonic total kept by the block manager, so a counter read at scrape time."""
        c = CounterMetricFamily("llmasos_prefix_cache_hit_blocks", "Blocks shared through the prefix cache")
        c.add_metric([], float(self._hits() if self._hits is not None else 0))
        yield c

    def describe(self):
        return [CounterMetricFamily("llmasos_prefix_cache_hit_blocks", "Blocks shared through the prefix cache")]

    # -- Observer (called from the engine thread; prometheus-client is thread-safe) ----------------------
    def admitted(self, req) -> None:
        self.prompt_tokens.inc(len(req.prompt_ids))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def finished(self, req) -> None:
        self.requests.labels(req.finish_reason or "unknown").inc()

    def preempted(self, req) -> None:
        self.preemptions.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
