"""The energy package's error type: what went wrong, where, and what is allowed."""
from __future__ import annotations


class EnergyError(ValueError):
    """A bad request to llmasos.energy (unknown region, a window used wrongly, a refused ledger entry, ...)."""


class LedgerError(EnergyError):
    """The offsets ledger refused an entry (double retirement, retiring more than held, an unknown credit)."""
