"""The load-driven controller in a running server: ``llmasos.energy.LoadController`` chooses, every interval,
the least-power serving configuration that covers the load within the latency SLO; ``ServeController`` feeds
it the engine's generated tokens/s and applies its choice -- the configuration's max batch becomes the
engine's admission limit (requests already running finish; no new one is admitted above it).

A configuration file (``llmasos serve --controller FILE``; figures measured per configuration, e.g. by
``bench/serve.py --energy`` or ``plan_energy``):

    {"slo_tpot_ms": 50, "interval_s": 10, "headroom": 0.8, "down_after": 3,
     "configs": [{"name": "b8", "max_batch": 8, "tokens_per_s": 900, "tpot_ms": 9, "busy_w": 300, "idle_w": 80},
                 {"name": "b32", "max_batch": 32, "tokens_per_s": 3000, "tpot_ms": 11, "busy_w": 420, "idle_w": 80}]}

One server is one engine: a configuration with more than one replica is refused here (replicas are
``llmasos.parallel.DataParallelLM``'s), and so is a max batch above the one the model was compiled for. Power
limits are not a knob: GPUs are read-only here (llmasos/energy/power.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ..energy.controller import LoadController, ServeConfig
from ..energy.errors import EnergyError

CONFIG_KEYS = ("name", "max_batch", "tokens_per_s", "tpot_ms", "busy_w", "idle_w")


class ServeController:
    """Applies ``controller``'s choices to ``engine`` (an llmasos.serve.Engine) every ``interval_s`` seconds of
    ``tick`` calls (EngineLoop calls it from the engine thread between steps)."""

    def __init__(self, engine, controller: LoadController, interval_s: float = 10.0):
        if not interval_s > 0:
            raise ValueError(f"controller interval_s must be > 0, got {interval_s!r}")
        for c in controller.configs:
            if c.replicas != 1:
                raise ValueError(f"controller config {c.name!r} has {c.replicas} replicas; one server is one engine "
                                 f"(serve replicas with llmasos.parallel.DataParallelLM)")
            if c.max_batch > engine.max_batch:
                raise ValueError(f"controller config {c.name!r} has max_batch {c.max_batch}, above the engine's "
                                 f"{engine.max_batch} (the batch the model was compiled for)")
        self.engine, self.controller, self.interval_s = engine, controller, float(interval_s)
        self._t = time.perf_counter()
        self._tokens = engine.generated_tokens_total
        self.apply(controller.current)

    @property
    def current(self) -> ServeConfig:
        return self.controller.current

    def apply(self, cfg: ServeConfig) -> None:
        self.engine.scheduler.max_batch = cfg.max_batch

    def tick(self, now: Optional[float] = None) -> Optional[ServeConfig]:
        """If an interval has passed: the tokens/s generated since the last one to the controller, its choice
        applied and returned; else None."""
        now = time.perf_counter() if now is None else now
        dt = now - self._t
        if dt < self.interval_s:
            return None
        tokens = self.engine.generated_tokens_total
        cfg = self.controller.step((tokens - self._tokens) / dt)
        self._t, self._tokens = now, tokens
        self.apply(cfg)
        return cfg


def load_controller(path, engine) -> ServeController:
    """A ServeController for ``engine`` from a configuration file (module docstring); errors name the file and
    the entry."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"controller file {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"controller file {p}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list) or not doc["configs"]:
        raise ValueError(f"controller file {p}: needs an object with a non-empty list 'configs'")
    configs = []
    for i, c in enumerate(doc["configs"]):
        missing = [k for k in CONFIG_KEYS if not isinstance(c, dict) or k not in c]
        if missing:
            raise ValueError(f"controller file {p}: configs[{i}] lacks {', '.join(missing)} (each needs "
                             f"{', '.join(CONFIG_KEYS)}; replicas optional, 1)")
        try:
            configs.append(ServeConfig(str(c["name"]), int(c["max_batch"]), int(c.get("replicas", 1)),
                                       float(c["tokens_per_s"]), float(c["tpot_ms"]), float(c["busy_w"]),
                                       float(c["idle_w"])))
        except (TypeError, ValueError, EnergyError) as e:
            raise ValueError(f"controller file {p}: configs[{i}]: {e}") from None
    try:
        ctl = LoadController(configs, float(doc.get("slo_tpot_ms", 50.0)), headroom=float(doc.get("headroom", 0.8)),
                             down_after=int(doc.get("down_after", 3)))
        return ServeController(engine, ctl, float(doc.get("interval_s", 10.0)))
    except (TypeError, EnergyError) as e:
        raise ValueError(f"controller file {p}: {e}") from None
