"""Measurement windows: they nest and add up, idle is subtracted and reported, the estimate is labelled."""
import threading

import pytest

import llmasos
from llmasos.energy import CounterMeter, EnergyError, measure
from llmasos.energy.meters import CpuEstimateMeter, CpuTdp


class Clock:
    """A device whose energy counter the test advances by hand."""

    def __init__(self):
        self.j = 0.0

    def burn(self, joules):
        self.j += joules


def _meters(gpu, cpu):
    return [CounterMeter("gpu0", lambda: gpu.j, "measured: test counter"),
            CounterMeter("cpu", lambda: cpu.j, "estimated: test", estimated=True)]


def test_windows_nest_and_add_up():
    gpu, cpu = Clock(), Clock()
    ms = _meters(gpu, cpu)
    with measure("outer", meters=ms, idle=None) as outer:
        gpu.burn(1.0)
        with measure("a", meters=ms, idle=None, tokens=10) as a:
            gpu.burn(5.0)
            cpu.burn(2.0)
            with measure("a.1", meters=ms, idle=None) as a1:
                gpu.burn(0.5)
        with measure("b", meters=ms, idle=None) as b:
            cpu.burn(3.0)
    assert a.joules == pytest.approx(7.5)
    assert a1.joules == pytest.approx(0.5)
    assert b.joules == pytest.approx(3.0)
    assert outer.joules == pytest.approx(11.5)
    assert outer.children == [a, b] and a.children == [a1]
    # a parent = its children + the work between them
    assert outer.joules == pytest.approx(sum(c.joules for c in outer.children) + outer.unaccounted_joules)
    assert outer.unaccounted_joules == pytest.approx(1.0)
    assert a.devices["gpu0"].joules == pytest.approx(5.5) and a.devices["cpu"].joules == pytest.approx(2.0)
    assert a.joules_per_token == pytest.approx(0.75)


def test_windows_in_threads_nest_per_thread():
    gpu, cpu = Clock(), Clock()
    ms = _meters(gpu, cpu)
    seen = {}

    def worker():
        with measure("thread", meters=ms, idle=None) as w:
            pass
        seen["w"] = w

    with measure("main", meters=ms, idle=None) as main:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert main.children == [] and seen["w"].closed


def test_idle_subtracted_and_reported():
    gpu, cpu = Clock(), Clock()
    ms = _meters(gpu, cpu)
    with measure("w", meters=ms, idle={"gpu0": 50.0}) as w:
        gpu.burn(100.0)
    d = w.devices["gpu0"]
    assert d.idle_watts == 50.0 and d.idle_source == "given"
    assert d.idle_joules == pytest.approx(50.0 * w.seconds)
    assert w.active_joules == pytest.approx(100.0 - 50.0 * w.seconds)
    assert w.joules == pytest.approx(100.0)                   # gross stays reported
    assert w.as_dict()["idle_joules"] == pytest.approx(50.0 * w.seconds)


def test_the_estimate_is_labelled_everywhere():
    m = CpuEstimateMeter(tdp=CpuTdp(64.0, "test"))
    assert m.estimated and m.method.startswith("estimated:")
    with measure("est", meters=[m], idle="auto", tokens=4) as w:
        sum(i * i for i in range(200_000))
    assert w.estimated and w.as_dict()["estimated"]
    assert "[estimated]" in str(w) and "estimated" in w.as_dict()["devices"]["cpu"]["method"]
    # TDP / logical CPUs x CPU-busy seconds: positive for real work, and bounded by TDP x wall time
    assert 0 < w.joules <= 64.0 * w.seconds * 1.05 + 0.01
    # a process that does nothing uses no CPU time: its idle is 0 W by construction, and said so
    assert w.devices["cpu"].idle_watts == 0.0 and "by construction" in w.devices["cpu"].idle_source


def test_measure_rejects_bad_input():
    gpu, cpu = Clock(), Clock()
    with pytest.raises(EnergyError, match="tokens"):
        measure(tokens=-1, meters=_meters(gpu, cpu))
    with pytest.raises(EnergyError, match="idle"):
        measure(idle="sometimes", meters=_meters(gpu, cpu))
    with pytest.raises(EnergyError, match="not meters"):
        measure(idle={"gpu7": 1.0}, meters=_meters(gpu, cpu))
    with pytest.raises(EnergyError, match="unique"):
        measure(meters=[CounterMeter("x", lambda: 0.0), CounterMeter("x", lambda: 0.0)])
    w = measure(meters=_meters(gpu, cpu), idle=None)
    with pytest.raises(EnergyError, match="once the `with measure"):
        w.window.joules
    outer = measure("outer", meters=_meters(gpu, cpu), idle=None)
    inner = measure("inner", meters=_meters(gpu, cpu), idle=None)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(EnergyError, match="inner window was still open"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)


def test_llmasos_energy_is_the_public_entry():
    assert llmasos.energy.measure is measure
    with llmasos.energy.measure("default meters", idle=None) as w:
        sum(range(10_000))
    assert w.closed and w.joules >= 0 and w.devices          # this machine: at least the CPU estimate


def test_zeus_meters_convert_millijoules():
    # zeus's device objects report cumulative millijoules; the meters give joules (fakes with zeus's method names)
    from types import SimpleNamespace

    from llmasos.energy.meters import ZeusCPUMeter, ZeusGPUMeter

    class GPUs:
        mj = 1_000_000

        def get_total_energy_consumption(self, i):
            return self.mj

    class CPUs:
        def get_total_energy_consumption(self, i):
            return SimpleNamespace(cpu_mj=2500.0, dram_mj=500.0)

    g = GPUs()
    gpu = ZeusGPUMeter(g, 0)
    with measure("g", meters=[gpu, ZeusCPUMeter(CPUs(), 0), ZeusCPUMeter(CPUs(), 0, dram=True)], idle=None) as w:
        g.mj += 123_456
    assert w.devices["gpu0"].joules == pytest.approx(123.456) and not w.estimated
    assert ZeusCPUMeter(CPUs(), 0).read() == 2.5 and ZeusCPUMeter(CPUs(), 0, dram=True).read() == 0.5
    assert gpu.method.startswith("measured: NVML") and "[estimated]" not in str(w)
