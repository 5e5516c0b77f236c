"""A load-driven controller: choose the serving configuration (max batch x replicas) for the request rate,
saving energy at low load while holding the latency SLO.

    ctl = LoadController(configs, slo_tpot_ms=50)
    for t, rate in trace:                 # offered load in tokens/s, e.g. every 10 s from the server's metrics
        cfg = ctl.step(rate)              # the configuration to serve the next interval with

A configuration (``ServeConfig``) is what was measured for it (by ``plan_energy`` or a benchmark): its decode
throughput at full load, its TPOT at full load, and its board power busy and idle. Under an offered load
lambda <= capacity x headroom a configuration's power is ``replicas x (idle_w + (busy_w - idle_w) x u)`` with
utilisation u = lambda / capacity (linear in utilisation: the usual server power model), and its TPOT is
bounded by the full-load TPOT. The controller picks the feasible configuration (capacity x headroom >= the
smoothed load, TPOT <= SLO) with the least power at that load; it scales up at once and down only after the
load has stayed low for ``down_after`` consecutive steps (hysteresis), so a burst is served and a dip is not
chased. Nothing here touches a device: applying the choice (the server's max batch, its replica count) is the
server's job; power limits are left out (real GPUs are read-only here; see power.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import EnergyError


@dataclass(frozen=True)
class ServeConfig:
    name: str
    max_batch: int
    replicas: int
    tokens_per_s: float        # decode throughput of ONE replica at full load
    tpot_ms: float             # time per output token at full load
    busy_w: float              # power of one replica at full load
    idle_w: float              # power of one replica with nothing to do

    def __post_init__(self):
        if self.max_batch < 1 or self.replicas < 1:
            raise EnergyError(f"config {self.name!r}: max_batch and replicas must be >= 1")
        if not (self.tokens_per_s > 0 and self.tpot_ms > 0 and self.busy_w >= self.idle_w >= 0):
            raise EnergyError(f"config {self.name!r}: need tokens_per_s > 0, tpot_ms > 0, busy_w >= idle_w >= 0")

    @property
    def capacity(self) -> float:
        return self.replicas * self.tokens_per_s

    def power(self, load: float) -> float:
        """Watts serving ``load`` tokens/s (load <= capacity)."""
        u = min(1.0, max(0.0, load / self.capacity))
        return self.replicas * (self.idle_w + (self.busy_w - self.idle_w) * u)


class LoadController:
    def __init__(self, configs: Sequence[ServeConfig], slo_tpot_ms: float, headroom: float = 0.8,
                 smoothing: float = 0.5, down_after: int = 3):
        if not configs:
            raise EnergyError("the controller needs at least one configuration")
        if not slo_tpot_ms > 0 or not 0 < headroom <= 1 or not 0 < smoothing <= 1 or down_after < 1:
            raise EnergyError(f"need slo_tpot_ms > 0, 0 < headroom <= 1, 0 < smoothing <= 1, down_after >= 1; got "
                              f"{slo_tpot_ms}, {headroom}, {smoothing}, {down_after}")
        self.configs = [c for c in configs if c.tpot_ms <= slo_tpot_ms]
        if not self.configs:
            raise EnergyError(f"no configuration meets the TPOT SLO of {slo_tpot_ms} ms: "
                              f"{', '.join(f'{c.name} {c.tpot_ms:g} ms' for c in configs)}")
        self.slo_tpot_ms, self.headroom, self.smoothing, self.down_after = slo_tpot_ms, headroom, smoothing, down_after
        self.load: Optional[float] = None
        self.current = max(self.configs, key=lambda c: c.capacity)     # start safe: the largest
        self._low = 0
        self.history: list = []

    def best_for(self, load: float) -> ServeConfig:
        """The least-power configuration able to serve ``load`` within its headroom (the largest if none can)."""
        ok = [c for c in self.configs if c.capacity * self.headroom >= load]
        if not ok:
            return max(self.configs, key=lambda c: c.capacity)
        return min(ok, key=lambda c: (c.power(load), -c.capacity))

    def step(self, offered_tokens_per_s: float) -> ServeConfig:
        """Observe the last interval's offered load; return the configuration for the next one."""
        x = float(offered_tokens_per_s)
        if not x >= 0:
            raise EnergyError(f"offered load must be tokens/s >= 0, got {offered_tokens_per_s!r}")
        # scale-up decisions use the raw peak (bursts must be served), scale-down the smoothed load
        self.load = x if self.load is None else self.smoothing * x + (1 - self.smoothing) * self.load
        want = self.best_for(max(x, self.load))
        if want.capacity > self.current.capacity:
            self.current, self._low = want, 0
        elif want is not self.current:
            self._low += 1
            if self._low >= self.down_after:
                self.current, self._low = want, 0
        else:
            self._low = 0
        self.history.append((x, self.current.name))
        return self.current


def replay(controller: LoadController, trace: Sequence[float], interval_s: float = 10.0) -> dict:
    """Serve ``trace`` (offered tokens/s per interval) with the controller's choices, the configuration chosen
    after interval i serving interval i+1 (the first with the starting one): energy (J), SLO violations (an
    interval whose load exceeds the serving configuration's capacity, or whose TPOT exceeds the SLO)."""
    cfg = controller.current
    energy, violations, served = 0.0, [], []
    for i, load in enumerate(trace):
        if load > cfg.capacity or cfg.tpot_ms > controller.slo_tpot_ms:
            violations.append(i)
        energy += cfg.power(min(load, cfg.capacity)) * interval_s
        served.append(cfg.name)
        cfg = controller.step(load)
    return {"joules": energy, "violations": violations, "served_by": served}


def static(config: ServeConfig, trace: Sequence[float], interval_s: float = 10.0) -> dict:
    """The same trace served by one fixed configuration."""
    return {"joules": sum(config.power(min(x, config.capacity)) * interval_s for x in trace),
            "violations": [i for i, x in enumerate(trace) if x > config.capacity]}


__all__ = ["ServeConfig", "LoadController", "replay", "static"]
