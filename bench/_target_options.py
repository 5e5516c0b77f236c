"""``--target-option KEY=VALUE`` handling shared by the bench scripts (decode, prefill, serve, energy_gpu)."""
from __future__ import annotations

import dataclasses


def bad_options(options) -> list:
    """The items of ``options`` that are not KEY=VALUE with a non-empty key."""
    return [o for o in options if "=" not in o or o.startswith("=")]


def with_options(spec, options):
    """``spec`` (a Target) with ``options`` (KEY=VALUE strings, checked by ``bad_options`` first) added to its
    extra; the Target refuses keys it does not read."""
    if not options:
        return spec
    return dataclasses.replace(spec, extra={**spec.extra, **dict(o.split("=", 1) for o in options)})


def ab_key(option: str) -> str:
    """The result key of an ``--ab-option`` variant: ``llmasos_`` + the option with every non-alphanumeric
    character as ``_`` (``prefill_gemm=on+flash_prefill=mma`` -> ``llmasos_prefill_gemm_on_flash_prefill_mma``)."""
    return "llmasos_" + "".join(ch if ch.isalnum() else "_" for ch in option)
