"""Reductions and scans."""
from __future__ import annotations

from .registry import converter


def _axes(ctx, x, dim):
    r = x.type.rank
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(r))  # torch: no dims (or []) means all of them
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % r if r else 0 for d in dims})


def _reduce(op):
    def convert(ctx, x, dim=None, keepdim=False, dtype=None):
        x = ctx.cast(x, ctx.out_dtype)  # sum of bools/ints accumulates in torch's result dtype
        return ctx.emit(op, [x], axes=_axes(ctx, x, dim), keepdims=bool(keepdim))
    return convert


converter("aten.sum.dim_IntList", "aten.sum.default")(_reduce("sum"))
converter("aten.mean.dim", "aten.mean.default")(_reduce("mean"))
converter("aten.amax.default")(_reduce("max"))
converter("aten.amin.default")(_reduce("min"))


@converter("aten.prod.dim_int")
def prod(ctx, x, dim, keepdim=False, dtype=None):
    return _reduce("prod")(ctx, x, [dim], keepdim)


@converter("aten.prod.default")
def prod_all(ctx, x, dtype=None):
    return _reduce("prod")(ctx, x, None, False)


@converter("aten.argmax.default")
def argmax(ctx, x, dim=None, keepdim=False):
    if dim is None:  # over the flattened tensor
        n = 1
        for d in x.type.shape:
            n = n * d
        x = ctx.emit("reshape", [x], shape=[n])
        y = ctx.emit("argmax", [x], axis=0, keepdims=False)
        return ctx.emit("reshape", [y], shape=list(ctx.out_shape)) if keepdim else y
    return ctx.emit("argmax", [x], axis=dim % x.type.rank, keepdims=bool(keepdim))


@converter("aten.max.dim")
def max_dim(ctx, x, dim, keepdim=False):
    axis = dim % x.type.rank
    return (ctx.emit("max", [x], axes=[axis], keepdims=bool(keepdim)),
            ctx.emit("argmax", [x], axis=axis, keepdims=bool(keepdim)))


@converter("aten.cumsum.default")
def cumsum(ctx, x, dim, dtype=None):
    return ctx.emit("cumsum", [x], axis=dim % x.type.rank, dtype=ctx.out_dtype)
