"""The Zeus-style power-limit optimizer against a simulated GPU with a known optimum; real devices read-only."""
import pytest

from llmasos.energy import EnergyError
from llmasos.energy.power import (SimulatedGPU, candidate_limits, optimize_power_limit, simulated_optimum,
                                  zeus_cost)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_picks_the_known_optimum(eta):
    gpu = SimulatedGPU()
    limits = candidate_limits(gpu, 25)
    plan = optimize_power_limit(gpu, lambda: gpu.run(500), eta=eta)
    truth = simulated_optimum(gpu, limits, eta)
    assert plan.best_w == truth
    assert gpu.limit_w == gpu.max_limit_w          # restored: nothing applied without apply=True
    assert [p.limit_w for p in plan.profiles] == limits
    # with 0.5% measurement noise the pick may move to a near-tie, but its true cost stays within 2% of the best
    noisy = SimulatedGPU(noise=0.005, seed=3)
    pick = optimize_power_limit(noisy, lambda: noisy.run(500), eta=eta).best_w

    def cost(w):
        t, e = gpu.expected(w)
        return zeus_cost(e, t, eta, gpu.max_limit_w)
    assert cost(pick) <= 1.02 * cost(truth)


def test_the_optimum_is_interior_and_saves_energy():
    gpu = SimulatedGPU()
    plan = optimize_power_limit(gpu, lambda: gpu.run(100), eta=0.5)
    by = {p.limit_w: p for p in plan.profiles}
    assert gpu.min_limit_w < plan.best_w < gpu.max_limit_w            # a real trade-off, not an end point
    best, top = by[plan.best_w], by[gpu.max_limit_w]
    assert best.joules_per_unit < 0.85 * top.joules_per_unit            # >15% less energy per unit ...
    assert best.units_per_s > 0.8 * top.units_per_s                     # ... for <20% less throughput
    # energy only picks the least J/unit, time only the highest limit
    assert optimize_power_limit(gpu, lambda: gpu.run(100), eta=0.0).best_w == gpu.max_limit_w
    e_only = optimize_power_limit(gpu, lambda: gpu.run(100), eta=1.0)
    assert e_only.best_w == min(e_only.profiles, key=lambda p: p.joules_per_unit).limit_w


def test_apply_sets_the_simulated_device_only():
    gpu = SimulatedGPU()
    plan = optimize_power_limit(gpu, lambda: gpu.run(100), eta=0.5, apply=True)
    assert plan.applied and gpu.limit_w == plan.best_w


class ReadOnlyGPU:
    """Stands for a real NVML device: any setter call fails the test."""

    def __init__(self):
        self.sim = SimulatedGPU()

    def get_name(self):
        return "real"

    def get_power_management_limit_constraints(self):
        return self.sim.get_power_management_limit_constraints()

    def get_power_management_limit(self):
        return self.sim.get_power_management_limit()

    def get_total_energy_consumption(self):
        return self.sim.get_total_energy_consumption()

    def set_power_management_limit(self, *a, **k):
        raise AssertionError("a real device's power limit was changed")


def test_real_devices_are_read_only():
    gpu = ReadOnlyGPU()
    plan = optimize_power_limit(gpu, lambda: gpu.sim.run(100), clock=gpu.sim.clock)
    assert plan.dry_run and plan.best_w is None and len(plan.profiles) == 1
    assert plan.profiles[0].limit_w == 700.0 and "dry run" in plan.notes[0]
    for kw in (dict(apply=True), dict(dry_run=False)):
        with pytest.raises(EnergyError, match="read-only"):
            optimize_power_limit(gpu, lambda: gpu.sim.run(100), clock=gpu.sim.clock, **kw)


def test_bad_input():
    gpu = SimulatedGPU()
    with pytest.raises(EnergyError, match="eta"):
        optimize_power_limit(gpu, lambda: gpu.run(1), eta=1.5)
    with pytest.raises(EnergyError, match="range"):
        optimize_power_limit(gpu, lambda: gpu.run(1), limits=[900])
    with pytest.raises(EnergyError, match="units of work"):
        optimize_power_limit(gpu, lambda: None)
    assert zeus_cost(10.0, 2.0, 0.5, 700) == pytest.approx(0.5 * 10 + 0.5 * 700 * 2)
