"""Tensor factories: arange and fills (shape and dtype taken from torch's result)."""
from __future__ import annotations

import sympy

from .context import is_dim
from .registry import converter


def _int_bound(ctx, v, what):
    if isinstance(v, float):
        if not v.is_integer():
            raise ctx.error(f"arange {what} {v} is not an integer; the IR's arange takes integer bounds")
        v = int(v)
    if not is_dim(v):
        raise ctx.error(f"arange {what} must be an int or a size, got {v!r}")
    return v


@converter("aten.arange.start_step", "aten.arange.start", "aten.arange.default")
def arange(ctx, *args, **_):
    if len(args) == 1:
        start, end, step = 0, args[0], 1
    else:
        start, end, step = (*args, 1)[:3]
    start, end, step = (_int_bound(ctx, v, w) for v, w in ((start, "start"), (end, "end"), (step, "step")))
    if not isinstance(step, int):
        raise ctx.error(f"arange step must be a concrete int, got {step}")
    return ctx.emit("arange", [], start=start, end=end, step=step, dtype=ctx.out_dtype)


def _fill(ctx, value):
    t = ctx.out_type()
    if isinstance(value, sympy.Expr) and not value.is_Number:  # a symbolic fill: broadcast a 0-d value
        v = ctx.as_value(value, t.dtype)
        return ctx.emit("broadcast_to", [v], shape=list(t.shape)) if t.rank else v
    if isinstance(value, sympy.Expr):
        value = int(value) if value.is_Integer else float(value)
    value = bool(value) if t.dtype.value == "bool" else float(value) if t.dtype.is_float else int(value)
    return ctx.emit("full", [], shape=list(t.shape), value=value, dtype=t.dtype)


@converter("aten.full.default")
def full(ctx, size, fill_value, **_):
    return _fill(ctx, fill_value)


@converter("aten.full_like.default")
def full_like(ctx, x, fill_value, **_):
    return _fill(ctx, fill_value)


@converter("aten.new_full.default")
def new_full(ctx, x, size, fill_value, **_):
    return _fill(ctx, fill_value)


@converter("aten.zeros_like.default", "aten.zeros.default")
def zeros_like(ctx, x, *_, **__):
    return _fill(ctx, 0)


@converter("aten.ones_like.default", "aten.ones.default")
def ones_like(ctx, x, *_, **__):
    return _fill(ctx, 1)


@converter("aten.new_zeros.default")
def new_zeros(ctx, x, size, **_):
    return _fill(ctx, 0)


@converter("aten.new_ones.default")
def new_ones(ctx, x, size, **_):
    return _fill(ctx, 1)


@converter("aten.scalar_tensor.default")
def scalar_tensor(ctx, s, **_):
    return _fill(ctx, s)
