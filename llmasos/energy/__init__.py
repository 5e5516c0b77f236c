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
from .carbon import CarbonReport, Contract, Embodied, Intensity, cloud_regions, countries, emissions, grid_intensity
from .errors import EnergyError, LedgerError
from .ledger import Ledger
from .meters import ESTIMATED, CounterMeter, Meter, discover
from .window import Window, calibrate_idle, measure

__all__ = ["measure", "Window", "calibrate_idle", "discover", "Meter", "CounterMeter", "ESTIMATED",
           "emissions", "grid_intensity", "countries", "cloud_regions", "Intensity", "Contract", "Embodied",
           "CarbonReport", "Ledger", "EnergyError", "LedgerError"]
