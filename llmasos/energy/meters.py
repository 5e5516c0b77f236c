"""Energy meters: monotonic joule counters behind one small interface.

A meter is read at the start and at the end of a measurement window; the difference is the window's energy.
Counters (not samplers) are what make windows nest and add up: any window's energy is counter(end) -
counter(start), whatever other windows are open.

Which meters exist, in order of preference (``discover()``):
  * GPUs: zeus's NVML device layer (``zeus.device.get_gpus``: ``nvmlDeviceGetTotalEnergyConsumption``, Volta
    and newer); without zeus, nvidia-ml-py's ``pynvml`` directly.  method "measured: ...".
  * CPUs: zeus's RAPL layer (``zeus.device.get_cpus``: package and DRAM counters under /sys/class/powercap).
  * Where no CPU counter is readable (this VM: no /sys/class/powercap), an **estimate**: TDP x utilisation,
    integrated exactly as TDP / logical CPUs x CPU-busy seconds (psutil), with the TDP from codecarbon's CPU
    table (its ``TDP`` lookup; its default of 4 W per thread when the model is unknown) or
    ``LLMASOS_CPU_TDP_W``. Its method says "estimated" and ``estimated`` is True; every figure built from it
    carries the label.

Nothing here changes a device setting: meters only read counters.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import EnergyError

ESTIMATED = "estimated"


class Meter:
    """A cumulative energy counter for one device. ``read()`` returns joules since an arbitrary origin."""
    name: str = "meter"           # unique within a measurement: "gpu0", "cpu0", "dram0", "cpu"
    method: str = ""              # how the joules are obtained, e.g. "measured: NVML total-energy counter (zeus)"
    estimated: bool = False

    def read(self) -> float:      # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.method!r})"


class CounterMeter(Meter):
    """A meter over any callable returning cumulative joules (tests, simulated devices, other counters)."""

    def __init__(self, name: str, read: Callable[[], float], method: str = "measured: counter",
                 estimated: bool = False):
        self.name, self._read, self.method, self.estimated = name, read, method, estimated

    def read(self) -> float:
        return float(self._read())


class ZeusGPUMeter(Meter):
    def __init__(self, gpus, index: int):
        self._gpus, self._i = gpus, index
        self.name = f"gpu{index}"
        self.method = "measured: NVML total-energy counter (zeus)"

    def read(self) -> float:
        return self._gpus.get_total_energy_consumption(self._i) / 1000.0   # mJ -> J


class ZeusCPUMeter(Meter):
    def __init__(self, cpus, index: int, dram: bool = False):
        self._cpus, self._i, self._dram = cpus, index, dram
        self.name = f"{'dram' if dram else 'cpu'}{index}"
        self.method = f"measured: RAPL {'DRAM' if dram else 'package'} counter (zeus)"

    def read(self) -> float:
        m = self._cpus.get_total_energy_consumption(self._i)
        return (m.dram_mj if self._dram else m.cpu_mj) / 1000.0


class NvmlMeter(Meter):
    """nvidia-ml-py directly (when zeus is not installed)."""

    def __init__(self, handle, index: int):
        self._h, self.name = handle, f"gpu{index}"
        self.method = "measured: NVML total-energy counter (nvidia-ml-py)"

    def read(self) -> float:
        import pynvml  # deferred: nvidia-ml-py (optional extra)
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._h) / 1000.0


@dataclass(frozen=True)
class CpuTdp:
    watts: float
    source: str


def cpu_tdp() -> CpuTdp:
    """The CPU's TDP in watts and where it came from (LLMASOS_CPU_TDP_W, or codecarbon's CPU table)."""
    env = os.environ.get("LLMASOS_CPU_TDP_W")
    if env:
        try:
            w = float(env)
        except ValueError:
            raise EnergyError(f"LLMASOS_CPU_TDP_W must be a number of watts, got {env!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise EnergyError(f"LLMASOS_CPU_TDP_W must be a finite number of watts > 0, got {env!r}")
        return CpuTdp(w, "LLMASOS_CPU_TDP_W")
    try:
        # deferred: codecarbon (optional extra); it warns through its logger when the CPU is unknown
        from codecarbon.core.cpu import DEFAULT_POWER_PER_CORE, TDP
        from codecarbon.core.util import count_cpus
    except ImportError:
        raise EnergyError("the CPU estimate needs a TDP: install the energy extra (codecarbon's CPU table) or set "
                          "LLMASOS_CPU_TDP_W") from None
    log = logging.getLogger("codecarbon")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        tdp = TDP()
        model, watts = tdp.model, tdp.tdp
        known = None
        try:
            known = tdp._get_cpu_power_from_registry(model)
        except Exception:  # noqa: BLE001 -- a private helper; only used to name the source
            known = None
    finally:
        log.setLevel(level)
    if not watts:
        raise EnergyError(f"codecarbon found no TDP for CPU {model!r}; set LLMASOS_CPU_TDP_W")
    if known:
        return CpuTdp(float(watts), f"codecarbon cpu_power.csv ({model})")
    return CpuTdp(float(watts), f"codecarbon default {DEFAULT_POWER_PER_CORE} W/thread x {count_cpus()} threads "
                                f"({model} not in its table)")


class CpuEstimateMeter(Meter):
    """Estimated CPU energy: TDP x utilisation. ``scope="process"`` counts this process's CPU time (user +
    system, its threads and waited-for children), ``"system"`` every process's busy time."""

    estimated = True

    def __init__(self, scope: str = "process", tdp: Optional[CpuTdp] = None):
        import psutil  # deferred: psutil (optional extra)
        if scope not in ("process", "system"):
            raise EnergyError(f"CPU estimate scope must be 'process' or 'system', got {scope!r}")
        self.scope = scope
        self.tdp = tdp or cpu_tdp()
        self._n = psutil.cpu_count(logical=True) or 1
        self._proc = psutil.Process() if scope == "process" else None
        self._psutil = psutil
        self.name = "cpu"
        # a process that runs nothing uses no CPU time: its idle power is 0 W by construction (the machine's
        # idle draw is not this process's to report); the system scope has a real idle share
        self.idle_by_construction = (0.0, "0 W by construction: the process-scope estimate counts only this "
                                          "process's CPU time") if scope == "process" else None
        self.method = (f"{ESTIMATED}: TDP {self.tdp.watts:g} W [{self.tdp.source}] x {scope} CPU utilisation "
                       f"(psutil, {self._n} logical CPUs)")

    def busy_seconds(self) -> float:
        if self._proc is not None:
            # time.process_time: this process's CPU time (all threads) at clock_gettime resolution (psutil's
            # cpu_times tick at 10 ms, too coarse for short windows); children from psutil
            t = self._proc.cpu_times()
            return time.process_time() + t.children_user + t.children_system
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def read(self) -> float:
        return self.tdp.watts / self._n * self.busy_seconds()


@dataclass
class Discovery:
    meters: list = field(default_factory=list)
    notes: list = field(default_factory=list)     # why a device has no meter, or how it is estimated


_lock = threading.Lock()
_cached: Optional[Discovery] = None


def _gpu_meters(notes: list) -> list:
    try:
        from zeus.device import get_gpus  # deferred: zeus (optional extra)
        from zeus.device.gpu.common import ZeusGPUInitError
    except ImportError:
        get_gpus = None
    if get_gpus is not None:
        try:
            gpus = get_gpus()
        except ZeusGPUInitError as e:
            notes.append(f"no GPU meter: {e}")
            return []
        out = []
        for i in range(len(gpus)):
            if gpus.supports_get_total_energy_consumption(i):
                out.append(ZeusGPUMeter(gpus, i))
            else:
                notes.append(f"gpu{i}: no NVML total-energy counter (pre-Volta); not measured")
        return out
    try:
        import pynvml  # deferred: nvidia-ml-py (optional extra)
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 -- ImportError or NVMLError: no GPU meter, said in the notes
        notes.append(f"no GPU meter: zeus not installed and NVML unavailable ({type(e).__name__}: {e})")
        return []
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            out.append(NvmlMeter(h, i))
        except pynvml.NVMLError as e:
            notes.append(f"gpu{i}: no NVML total-energy counter ({e}); not measured")
    return out


def _cpu_meters(notes: list) -> list:
    try:
        from zeus.device import get_cpus  # deferred: zeus (optional extra)
        from zeus.device.cpu.common import ZeusCPUInitError, ZeusCPUNoPermissionError
        try:
            cpus = get_cpus()
            out = []
            for i in range(len(cpus)):
                out.append(ZeusCPUMeter(cpus, i))
                if cpus.supports_get_dram_energy_consumption(i):
                    out.append(ZeusCPUMeter(cpus, i, dram=True))
            if out:
                return out
        except (ZeusCPUInitError, ZeusCPUNoPermissionError) as e:
            notes.append(f"no CPU counter: {e}".strip())
    except ImportError:
        notes.append("no CPU counter: zeus not installed")
    try:
        m = CpuEstimateMeter()
    except ImportError:
        notes.append("no CPU estimate: psutil not installed")
        return []
    except EnergyError as e:
        notes.append(f"no CPU estimate: {e}")
        return []
    notes.append(f"cpu: {m.method}")
    return [m]


def discover(refresh: bool = False) -> Discovery:
    """The meters of this machine (cached per process): GPUs measured where NVML can, CPUs by RAPL where
    readable, else the labelled estimate."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            notes: list = []
            meters = _gpu_meters(notes) + _cpu_meters(notes)
            _cached = Discovery(meters, notes)
        return _cached


def gpu_energy_counters() -> dict:
    """{gpu name: joules} of every GPU's total-energy counter now ({} without a GPU meter)."""
    return {m.name: m.read() for m in discover().meters if m.name.startswith("gpu")}
