"""Power management: a Zeus-style power-limit (DVFS) optimizer, and a simulated GPU to run it against.

Zeus (ML.ENERGY, NSDI'23) chooses a GPU power limit by profiling a workload at each candidate limit and
minimising the energy-time cost

    cost(limit) = eta * energy_per_unit + (1 - eta) * max_power * time_per_unit

(eta in [0, 1]: 1 = energy only, 0 = time only; max_power = the highest settable limit, which makes the two
terms the same unit, joules). ``optimize_power_limit`` does the same for one device and a workload callable
(a decode loop returning the tokens it made), reading the device's cumulative energy counter around each run.

The device is anything with zeus's single-GPU interface (``zeus.device.gpu.common.GPU`` method names:
``get_power_management_limit_constraints``, ``get_power_management_limit``, ``set_power_management_limit``,
``get_total_energy_consumption``). Two kinds:
  * ``SimulatedGPU``: a model of an H100-class part (power caps 200-700 W, cubic dynamic power in the SM
    clock, a memory-bound and a compute-bound part of each step). Settings change only the simulation.
  * a real GPU (``real_gpu(i)``: zeus's NVML object): **read-only**. On shared machines nothing here ever
    changes a power limit, clock or any other setting: the optimizer measures the workload at the current
    limit and returns the plan of limits it would profile (``dry_run``); ``apply=True`` on a real device is
    refused. Only a SimulatedGPU accepts settings.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import EnergyError


class SimulatedGPU:
    """A GPU simulated in time and energy, with zeus's GPU method names (milliwatts, millijoules).

    Work is submitted as ``run(steps)``: each step has a memory-bound part (``mem_s``, unaffected by the SM
    clock) and a compute part (``compute_s`` at the maximum clock, scaling as 1/f). Board power at SM clock
    fraction f (0 < f <= 1) while working is ``static_w + mem_w + dyn_w * f**3`` (dynamic power ~ f V^2,
    V ~ f). Under a power limit the clock runs at the highest f whose power fits (at least ``f_min``: below
    it the limit is not honoured, as real parts throttle no lower than their minimum clock). The simulated
    clock and energy counter advance with the work; ``noise`` adds a relative gaussian error to each run's
    energy (seeded).
    """

    def __init__(self, *, name: str = "SimulatedGPU (H100-class model)", min_limit_w: float = 200.0,
                 max_limit_w: float = 700.0, static_w: float = 90.0, mem_w: float = 110.0, dyn_w: float = 480.0,
                 mem_s: float = 4.0e-3, compute_s: float = 3.0e-3, f_min: float = 0.3, noise: float = 0.0,
                 seed: int = 0):
        if not 0 < min_limit_w <= max_limit_w:
            raise EnergyError(f"need 0 < min_limit_w <= max_limit_w, got {min_limit_w}, {max_limit_w}")
        self.name = name
        self.min_limit_w, self.max_limit_w = float(min_limit_w), float(max_limit_w)
        self.static_w, self.mem_w, self.dyn_w = static_w, mem_w, dyn_w
        self.mem_s, self.compute_s, self.f_min = mem_s, compute_s, f_min
        self.noise, self._rng = noise, random.Random(seed)
        self.limit_w = self.max_limit_w
        self.now_s = 0.0
        self.energy_j = 0.0
        self.set_calls: list = []

    # -- zeus GPU interface (mW, mJ) --------------------------------------------------------------------
    def get_name(self) -> str:
        return self.name

    def get_power_management_limit_constraints(self) -> tuple:
        return int(self.min_limit_w * 1000), int(self.max_limit_w * 1000)

    def get_power_management_limit(self) -> int:
        return int(round(self.limit_w * 1000))

    def set_power_management_limit(self, power_limit_mw: int, block: bool = True) -> None:
        w = power_limit_mw / 1000
        if not self.min_limit_w - 1e-9 <= w <= self.max_limit_w + 1e-9:
            raise EnergyError(f"power limit {w:g} W outside [{self.min_limit_w:g}, {self.max_limit_w:g}] W")
        self.limit_w = w
        self.set_calls.append(w)

    def reset_power_management_limit(self, block: bool = True) -> None:
        self.set_power_management_limit(int(self.max_limit_w * 1000))

    def supports_get_total_energy_consumption(self) -> bool:
        return True

    def get_total_energy_consumption(self) -> int:
        return int(round(self.energy_j * 1000))

    # -- the model ---------------------------------------------------------------------------------------
    def clock_at(self, limit_w: float) -> float:
        """The SM clock fraction the device runs at under ``limit_w``."""
        headroom = limit_w - self.static_w - self.mem_w
        f = (headroom / self.dyn_w) ** (1 / 3) if headroom > 0 else 0.0
        return min(1.0, max(self.f_min, f))

    def expected(self, limit_w: float) -> tuple:
        """(seconds, joules) of one step under ``limit_w``, exactly (no noise): the ground truth tests
        compare the optimizer's choice against."""
        f = self.clock_at(limit_w)
        t = self.mem_s + self.compute_s / f
        p = self.static_w + self.mem_w + self.dyn_w * f ** 3
        return t, p * t

    def run(self, steps: int) -> int:
        t, e = self.expected(self.limit_w)
        if self.noise:
            e *= 1 + self._rng.gauss(0.0, self.noise)
        self.now_s += t * steps
        self.energy_j += e * steps
        return steps

    def clock(self) -> float:
        return self.now_s


def real_gpu(index: int = 0):
    """zeus's NVML GPU object for device ``index`` (read-only use here)."""
    try:
        from zeus.device import get_gpus  # deferred: zeus (optional extra)
    except ImportError:
        raise EnergyError("reading a real GPU needs zeus: pip install 'llmasos[energy]'") from None
    gpus = get_gpus()
    if not 0 <= index < len(gpus):
        raise EnergyError(f"GPU index {index} out of range: this machine has {len(gpus)} GPU(s)")
    return gpus.gpus[index]


def zeus_cost(energy_j: float, time_s: float, eta: float, max_power_w: float) -> float:
    """Zeus's energy-time cost (joules): eta * E + (1 - eta) * max_power * T."""
    return eta * energy_j + (1 - eta) * max_power_w * time_s


@dataclass
class LimitProfile:
    limit_w: float
    units: int
    seconds: float
    joules: float
    cost: float

    @property
    def joules_per_unit(self) -> float:
        return self.joules / self.units

    @property
    def units_per_s(self) -> float:
        return self.units / self.seconds

    @property
    def avg_watts(self) -> float:
        return self.joules / self.seconds

    def as_dict(self) -> dict:
        return {"limit_w": self.limit_w, "units": self.units, "seconds": self.seconds, "joules": self.joules,
                "joules_per_unit": self.joules_per_unit, "units_per_s": self.units_per_s,
                "avg_watts": self.avg_watts, "cost": self.cost}


@dataclass
class PowerPlan:
    device: str
    eta: float
    candidates_w: list
    profiles: list = field(default_factory=list)      # LimitProfile per limit measured
    best_w: Optional[float] = None
    current_w: float = 0.0
    applied: bool = False
    dry_run: bool = True
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"device": self.device, "eta": self.eta, "candidates_w": self.candidates_w,
                "current_w": self.current_w, "best_w": self.best_w, "applied": self.applied,
                "dry_run": self.dry_run, "profiles": [p.as_dict() for p in self.profiles], "notes": self.notes}


def candidate_limits(gpu, step_w: float = 25.0) -> list:
    """The power limits to profile: from the device's maximum down to its minimum in ``step_w`` steps."""
    if not step_w > 0:
        raise EnergyError(f"step_w must be > 0 W, got {step_w!r}")
    lo, hi = (x / 1000 for x in gpu.get_power_management_limit_constraints())
    out, w = [], hi
    while w >= lo - 1e-9:
        out.append(round(w, 6))
        w -= step_w
    return out


def optimize_power_limit(gpu, workload: Callable[[], int], *, eta: float = 0.5, step_w: float = 25.0,
                         limits: Optional[list] = None, apply: bool = False, dry_run: Optional[bool] = None,
                         warmup: int = 1, clock: Optional[Callable[[], float]] = None) -> PowerPlan:
    """Profile ``workload`` (a callable doing a fixed amount of work on ``gpu``, returning its units, e.g.
    tokens) at each candidate power limit; choose the one with the least Zeus cost (see the module docstring).

    A SimulatedGPU is profiled at every limit (settings change only the simulation), restored to its
    starting limit, and set to the best one when ``apply``. Any other device is read-only: ``dry_run``
    (the default for it) measures the workload at the current limit only and returns the candidates it
    would profile; ``apply=True`` or ``dry_run=False`` on a real device raises."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise EnergyError(f"eta (the energy weight) must be a number in [0, 1], got {eta!r}")
    simulated = isinstance(gpu, SimulatedGPU)
    if dry_run is None:
        dry_run = not simulated
    if not simulated and (apply or not dry_run):
        raise EnergyError("refusing to change a real GPU's power limit: llmasos treats real devices as "
                          "read-only (shared machines); use --dry-run, or a SimulatedGPU")
    if apply and dry_run:
        raise EnergyError("apply and dry_run contradict each other: a dry run changes nothing")
    lo, hi = (x / 1000 for x in gpu.get_power_management_limit_constraints())
    cands = list(limits) if limits is not None else candidate_limits(gpu, step_w)
    bad = [w for w in cands if not lo - 1e-9 <= w <= hi + 1e-9]
    if bad or not cands:
        raise EnergyError(f"power limits must lie in the device's range [{lo:g}, {hi:g}] W; got {bad or cands}")
    clock = clock or (gpu.clock if simulated else time.perf_counter)
    start_w = gpu.get_power_management_limit() / 1000
    plan = PowerPlan(device=gpu.get_name(), eta=float(eta), candidates_w=cands, current_w=start_w,
                     dry_run=dry_run)

    def profile(limit_w: float) -> LimitProfile:
        for _ in range(warmup):
            workload()
        e0, t0 = gpu.get_total_energy_consumption(), clock()
        units = workload()
        e1, t1 = gpu.get_total_energy_consumption(), clock()
        if not isinstance(units, int) or units <= 0:
            raise EnergyError(f"the workload must return the units of work it did (an int > 0), got {units!r}")
        j, s = (e1 - e0) / 1000, t1 - t0
        if s <= 0:
            raise EnergyError("the workload took no measurable time; give it more work per call")
        return LimitProfile(limit_w, units, s, j, zeus_cost(j / units, s / units, eta, hi))

    if dry_run:
        plan.profiles.append(profile(start_w))
        plan.notes.append(f"dry run: measured at the current limit {start_w:g} W only; a run with settings "
                          f"allowed would profile {len(cands)} limits {cands[0]:g}..{cands[-1]:g} W")
        plan.best_w = None
        return plan
    try:
        for w in cands:
            gpu.set_power_management_limit(int(round(w * 1000)))
            plan.profiles.append(profile(w))
    finally:
        gpu.set_power_management_limit(int(round(start_w * 1000)))
    best = min(plan.profiles, key=lambda p: (p.cost, -p.limit_w))
    plan.best_w = best.limit_w
    if apply:
        gpu.set_power_management_limit(int(round(best.limit_w * 1000)))
        plan.applied = True
    return plan


def simulated_optimum(gpu: SimulatedGPU, limits: list, eta: float) -> float:
    """The exact best limit of a SimulatedGPU's model (no measurement): for checking the optimizer."""
    hi = gpu.max_limit_w
    return min(limits, key=lambda w: (zeus_cost(gpu.expected(w)[1], gpu.expected(w)[0], eta, hi), -w))
