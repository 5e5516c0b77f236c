"""Measurement windows: ``with llmasos.energy.measure() as m:`` around any work.

    with measure("generate", tokens=256) as m:
        lm.generate(ids, 256)
    m.joules, m.watts, m.seconds, m.devices["gpu0"].joules, m.joules_per_token
    m.idle_joules, m.active_joules, m.active_joules_per_token   # idle power x duration, and the rest
    print(m)          # every estimated figure says "estimated"

Every meter (llmasos/energy/meters.py) is a cumulative counter read when a window opens and when it closes,
so windows nest (an inner window becomes a child of the innermost open window of its thread) and add up:
a parent's joules are the sum of its children's plus ``unaccounted_joules`` (the work between them).

Idle: ``idle="auto"`` (default) measures each meter's idle power once per process (``calibrate_idle``:
the counters over a short sleep) and subtracts idle W x duration per device; ``"cached"`` uses that figure
only if it was measured already (no sleep; reported as "not measured" otherwise); a dict {meter: W} gives
it explicitly; None turns it off. Gross joules are always reported next to the idle and active parts.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from .errors import EnergyError
from .meters import ESTIMATED, Meter, discover

IDLE_CALIBRATION_S = 0.5

_idle_lock = threading.Lock()
_idle_cache: dict = {}            # meter name -> (watts, how)
_stack = threading.local()


def _open_windows() -> list:
    if not hasattr(_stack, "windows"):
        _stack.windows = []
    return _stack.windows


def calibrate_idle(meters: Optional[list] = None, seconds: float = IDLE_CALIBRATION_S) -> dict:
    """Measure each meter's idle power (W) over ``seconds`` of sleep and cache it for this process."""
    if not seconds > 0:
        raise EnergyError(f"idle calibration needs seconds > 0, got {seconds}")
    meters = discover().meters if meters is None else meters
    if meters and all(getattr(m, "idle_by_construction", None) is not None for m in meters):
        seconds = 0.0    # nothing to measure: no sleep
    t0 = time.perf_counter()
    e0 = [m.read() for m in meters]
    if seconds:
        time.sleep(seconds)
    e1 = [m.read() for m in meters]
    dt = time.perf_counter() - t0
    out = {}
    with _idle_lock:
        for m, a, b in zip(meters, e0, e1):
            w = max(0.0, (b - a) / dt) if dt > 0 else 0.0
            how = f"measured over {dt:.2f} s idle" + (f" ({ESTIMATED})" if m.estimated else "")
            fixed = getattr(m, "idle_by_construction", None)
            if fixed is not None:
                w, how = fixed
            _idle_cache[m.name] = (w, how)
            out[m.name] = w
    return out


def clear_idle_cache() -> None:
    with _idle_lock:
        _idle_cache.clear()


@dataclass
class DeviceEnergy:
    name: str
    method: str
    estimated: bool
    joules: float = 0.0
    seconds: float = 0.0
    idle_watts: float = 0.0
    idle_source: str = "not measured"

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")

    @property
    def idle_joules(self) -> float:
        return self.idle_watts * self.seconds

    @property
    def active_joules(self) -> float:
        return self.joules - self.idle_joules

    def as_dict(self) -> dict:
        return {"joules": self.joules, "watts": self.watts, "idle_watts": self.idle_watts,
                "idle_joules": self.idle_joules, "active_joules": self.active_joules, "idle_source": self.idle_source,
                "method": self.method, "estimated": self.estimated}


@dataclass
class Window:
    """One measurement: filled when the ``with`` block ends (reading it earlier raises)."""
    label: str = ""
    tokens: Optional[int] = None
    devices: dict = field(default_factory=dict)          # name -> DeviceEnergy
    children: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    started_at: float = 0.0                               # time.time() at the start
    closed: bool = False

    def add_tokens(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise EnergyError(f"tokens must be an int >= 0, got {n!r}")
        self.tokens = (self.tokens or 0) + n

    def _need_closed(self, what: str):
        if not self.closed:
            raise EnergyError(f"window {self.label!r}: {what} is known once the `with measure()` block has ended")

    @property
    def estimated(self) -> bool:
        """True when any device's figure is an estimate (then every total is labelled estimated)."""
        return any(d.estimated for d in self.devices.values())

    @property
    def joules(self) -> float:
        self._need_closed("joules")
        return sum(d.joules for d in self.devices.values())

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")

    @property
    def idle_joules(self) -> float:
        self._need_closed("idle_joules")
        return sum(d.idle_joules for d in self.devices.values())

    @property
    def active_joules(self) -> float:
        return self.joules - self.idle_joules

    @property
    def joules_per_token(self) -> float:
        return self.joules / self.tokens if self.tokens else float("nan")

    @property
    def active_joules_per_token(self) -> float:
        return self.active_joules / self.tokens if self.tokens else float("nan")

    @property
    def unaccounted_joules(self) -> float:
        """Joules of this window outside its child windows."""
        return self.joules - sum(c.joules for c in self.children)

    def as_dict(self) -> dict:
        self._need_closed("as_dict()")
        return {"label": self.label, "seconds": self.seconds, "joules": self.joules, "watts": self.watts,
                "idle_joules": self.idle_joules, "active_joules": self.active_joules, "tokens": self.tokens,
                "joules_per_token": self.joules_per_token if self.tokens else None,
                "active_joules_per_token": self.active_joules_per_token if self.tokens else None,
                "estimated": self.estimated, "devices": {n: d.as_dict() for n, d in self.devices.items()},
                "notes": list(self.notes), "children": [c.as_dict() for c in self.children]}

    def __str__(self) -> str:
        if not self.closed:
            return f"<energy window {self.label!r}: open>"
        tag = f" [{ESTIMATED}]" if self.estimated else ""
        s = (f"{self.label or 'window'}: {self.joules:.3f} J in {self.seconds:.3f} s ({self.watts:.2f} W){tag}; "
             f"idle {self.idle_joules:.3f} J, active {self.active_joules:.3f} J")
        if self.tokens:
            s += f"; {self.joules_per_token:.4g} J/token ({self.active_joules_per_token:.4g} active)"
        for d in self.devices.values():
            s += f"\n  {d.name}: {d.joules:.3f} J, {d.watts:.2f} W, idle {d.idle_watts:.2f} W -- {d.method}"
        return s


IdleSpec = Union[str, None, dict]


class measure:
    """Context manager measuring the energy of its block; see the module docstring.

    measure(label="", tokens=None, idle="auto", meters=None, sync=None, nest=True)
      meters: a list of llmasos.energy.meters.Meter (default: this machine's, ``discover()``)
      sync: called before each counter read (e.g. torch.cuda.synchronize) so queued device work is counted
      nest: False keeps the window off the thread's stack of open windows (neither a child nor a parent):
        for windows opened and closed by library code across generator yields (CompiledLM.generate)
    """

    def __init__(self, label: str = "", tokens: Optional[int] = None, idle: IdleSpec = "auto",
                 meters: Optional[list] = None, sync: Optional[Callable[[], None]] = None, nest: bool = True):
        self.nest = nest
        if tokens is not None and (not isinstance(tokens, int) or tokens < 0):
            raise EnergyError(f"tokens must be an int >= 0 or None, got {tokens!r}")
        if not (idle is None or idle in ("auto", "cached") or isinstance(idle, dict)):
            raise EnergyError(f"idle must be 'auto', 'cached', None or a dict of watts per meter, got {idle!r}")
        found = discover() if meters is None else None
        self.meters: list = found.meters if found is not None else list(meters)
        names = [m.name for m in self.meters]
        if len(set(names)) != len(names):
            raise EnergyError(f"meter names must be unique within a window, got {names}")
        if isinstance(idle, dict):
            unknown = set(idle) - set(names)
            if unknown:
                raise EnergyError(f"idle watts given for {sorted(unknown)}, which are not meters here ({names})")
        self.idle, self.sync = idle, sync
        self.window = Window(label=label, tokens=tokens, notes=list(found.notes) if found is not None else [])
        if not self.meters:
            self.window.notes.append("no energy meter on this machine: every figure is 0 J")
        self._start: list = []
        self._t0 = 0.0

    def _idle_for(self, m: Meter) -> tuple:
        if self.idle is None:
            return 0.0, "off"
        if isinstance(self.idle, dict):
            if m.name in self.idle:
                return float(self.idle[m.name]), "given"
            return 0.0, "not given"
        with _idle_lock:
            got = _idle_cache.get(m.name)
        if got is None and self.idle == "auto":
            calibrate_idle([x for x in self.meters if x.name not in _idle_cache])
            with _idle_lock:
                got = _idle_cache.get(m.name)
        return got if got is not None else (0.0, "not measured")

    def __enter__(self) -> Window:
        w = self.window
        idle = {m.name: self._idle_for(m) for m in self.meters}    # may sleep (calibration): before the start
        for m in self.meters:
            watts, how = idle[m.name]
            w.devices[m.name] = DeviceEnergy(m.name, m.method, m.estimated, idle_watts=watts, idle_source=how)
        if self.nest:
            stack = _open_windows()
            if stack:
                stack[-1].children.append(w)
            stack.append(w)
        if self.sync is not None:
            self.sync()
        w.started_at = time.time()
        self._t0 = time.perf_counter()
        self._start = [m.read() for m in self.meters]
        return w

    def __exit__(self, *exc) -> None:
        if self.sync is not None:
            self.sync()
        end = [m.read() for m in self.meters]
        t1 = time.perf_counter()
        w = self.window
        w.seconds = t1 - self._t0
        for m, a, b in zip(self.meters, self._start, end):
            d = w.devices[m.name]
            d.joules, d.seconds = b - a, w.seconds
        if self.nest:
            stack = _open_windows()
            if stack and stack[-1] is w:
                stack.pop()
            elif w in stack:
                stack.remove(w)
                w.closed = True
                raise EnergyError(f"energy window {w.label!r} closed while an inner window was still open "
                                  f"(close windows innermost first)")
        w.closed = True
        return None


class GenerationProbe:
    """The energy of one CompiledLM generation (installed into llmasos.llm.runtime by ``instrument()``):
    a non-nesting window opened at the prefill and closed after the last token; idle from the cache only
    (``calibrate_idle()`` first to have it subtracted, else it is reported as not measured)."""

    def __init__(self, label: str):
        self._m = measure(label, idle="cached", nest=False)
        self._m.__enter__()

    def stop(self, tokens: int) -> dict:
        self._m.window.tokens = int(tokens)
        self._m.__exit__(None, None, None)
        return self._m.window.as_dict()
