"""llmasos.energy: measure every joule, account every gram, plan the greenest configuration.

    with llmasos.energy.measure("generate", tokens=256) as m:
        lm.generate(ids, 256)
    print(m)                                   # J, W, s, per device, J/token; idle subtracted; "estimated" labels
    llmasos.energy.emissions(m.joules, "FRA", pue=1.1)      # location/market-based gCO2e, each figure sourced
    llmasos.energy.Ledger("offsets.db")        # carbon-offset purchases and retirements (SQLite)

Nothing imported here loads zeus, codecarbon, nvidia-ml-py, psutil or matplotlib: each module defers them to
the function that needs them, so ``import llmasos`` works without the ``energy`` extra. docs/energy.md says how
each number is measured or estimated.
"""
import os

from ..llm import runtime as _runtime
from .carbon import CarbonReport, Contract, Embodied, Intensity, cloud_regions, countries, emissions, grid_intensity
from .errors import EnergyError, LedgerError
from .ledger import Ledger
from .meters import ESTIMATED, CounterMeter, Meter, discover
from .window import GenerationProbe, Window, calibrate_idle, measure


def instrument(on: bool = True) -> None:
    """Measure every CompiledLM generation (``lm.last_stats.energy``): on by default when llmasos.energy is
    imported (``import llmasos`` does), unless the environment sets LLMASOS_ENERGY=0."""
    _runtime.ENERGY_PROBE = GenerationProbe if on else None


instrument(os.environ.get("LLMASOS_ENERGY", "1") != "0")

__all__ = ["measure", "instrument", "Window", "calibrate_idle", "discover", "Meter", "CounterMeter", "ESTIMATED",
           "emissions", "grid_intensity", "countries", "cloud_regions", "Intensity", "Contract", "Embodied",
           "CarbonReport", "Ledger", "EnergyError", "LedgerError"]
