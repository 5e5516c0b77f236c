"""Elementwise ATen ops. Operands are cast to the result dtype torch computed (node.meta['val']), so the
IR's same-dtype elementwise ops see torch's type promotion."""
from __future__ import annotations

from llmasos.ir import DType

from .registry import converter


def _binary(op):
    def convert(ctx, a, b, alpha=1):
        dt = ctx.out_dtype
        x, y = ctx.as_value(a, dt), ctx.as_value(b, dt)
        if alpha != 1:  # add/sub(a, b, alpha) = a +/- alpha * b
            y = ctx.emit("mul", [y, ctx.as_value(alpha, dt)])
        return ctx.emit(op, [x, y])
    return convert


converter("aten.add.Tensor", "aten.add.Scalar")(_binary("add"))
converter("aten.sub.Tensor", "aten.sub.Scalar")(_binary("sub"))
converter("aten.mul.Tensor", "aten.mul.Scalar")(_binary("mul"))
converter("aten.maximum.default")(_binary("maximum"))
converter("aten.minimum.default")(_binary("minimum"))
converter("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar")(_binary("pow"))


@converter("aten.rsub.Tensor", "aten.rsub.Scalar")
def rsub(ctx, a, b, alpha=1):
    return _binary("sub")(ctx, b, a, alpha)  # rsub(a, b, alpha) = b - alpha * a


@converter("aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.div.Scalar_mode")
def div(ctx, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise ctx.error(f"division with rounding_mode={rounding_mode!r} has no IR op (only true division)")
    dt = ctx.out_dtype
    return ctx.emit("div", [ctx.as_value(a, dt), ctx.as_value(b, dt)])


def _compare(op):
    def convert(ctx, a, b):
        dt = ctx.promote(a, b)
        return ctx.emit(op, [ctx.as_value(a, dt), ctx.as_value(b, dt)])
    return convert


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    converter(f"aten.{_op}.Tensor", f"aten.{_op}.Scalar")(_compare(_op))


def _logical(op):
    def convert(ctx, a, b):
        if ctx.out_dtype is not DType.bool:
            raise ctx.error(f"{op} of {ctx.out_dtype} tensors: the IR has logical ops on bool only")
        return ctx.emit(op, [ctx.as_value(a, DType.bool), ctx.as_value(b, DType.bool)])
    return convert


# __and__/__or__ are what `mask_a & mask_b` records before decomposition (the training-IR fast path)
converter("aten.bitwise_and.Tensor", "aten.bitwise_and.Scalar", "aten.logical_and.default", "aten.__and__.Tensor",
          "aten.__and__.Scalar")(_logical("logical_and"))
converter("aten.bitwise_or.Tensor", "aten.bitwise_or.Scalar", "aten.logical_or.default", "aten.__or__.Tensor",
          "aten.__or__.Scalar")(_logical("logical_or"))


@converter("aten.bitwise_not.default", "aten.logical_not.default")
def logical_not(ctx, x):
    if ctx.out_dtype is not DType.bool:
        raise ctx.error(f"bitwise_not of {ctx.out_dtype}: the IR has logical_not on bool only")
    return ctx.emit("logical_not", [ctx.cast(x, DType.bool)])


def _unary(op):
    def convert(ctx, x):
        return ctx.emit(op, [ctx.cast(x, ctx.out_dtype)])
    return convert


for _op in ("neg", "abs", "relu", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sin", "cos", "erf",
            "sigmoid", "silu"):
    converter(f"aten.{_op}.default")(_unary(_op))


@converter("aten.gelu.default")
def gelu(ctx, x, approximate="none"):
    return ctx.emit("gelu", [x], approximate=approximate)


@converter("aten.clamp.default")
def clamp(ctx, x, min=None, max=None):
    x = ctx.cast(x, ctx.out_dtype)
    return ctx.emit("clip", [x], min=None if min is None else float(min), max=None if max is None else float(max))


@converter("aten.clamp.Tensor")
def clamp_tensor(ctx, x, min=None, max=None):
    dt = ctx.out_dtype
    y = ctx.cast(x, dt)
    if min is not None:
        y = ctx.emit("maximum", [y, ctx.as_value(min, dt)])
    if max is not None:
        y = ctx.emit("minimum", [y, ctx.as_value(max, dt)])
    return y


@converter("aten.clamp_min.default", "aten.clamp_min.Tensor")
def clamp_min(ctx, x, min):
    return clamp_tensor(ctx, x, min=min)


@converter("aten.clamp_max.default", "aten.clamp_max.Tensor")
def clamp_max(ctx, x, max):
    return clamp_tensor(ctx, x, max=max)


@converter("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where(ctx, cond, a, b):
    dt = ctx.out_dtype
    return ctx.emit("where", [ctx.as_value(cond, DType.bool), ctx.as_value(a, dt), ctx.as_value(b, dt)])


@converter("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(ctx, x, mask, value):
    dt = ctx.out_dtype
    return ctx.emit("where", [ctx.as_value(mask, DType.bool), ctx.as_value(value, dt), ctx.cast(x, dt)])


@converter("aten._to_copy.default")
def to_copy(ctx, x, **_):
    # device, layout and memory format do not exist in the IR; only a dtype change is real work
    return ctx.cast(x, ctx.out_dtype)


@converter("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other", "aten.type_as.default")
def to(ctx, x, *_, **__):
    # the undecomposed spellings of _to_copy: only the dtype torch computed matters
    return ctx.cast(x, ctx.out_dtype)
