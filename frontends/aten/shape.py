"""Data-movement ATen ops: views, slices, concatenation, indexing. Result shapes come from torch's own
shape propagation (node.meta['val']), so reshapes and expands never carry -1."""
from __future__ import annotations

import sympy

from llmasos.ir import DType
from llmasos.ir.types import dims_equal

from .registry import converter


def _axis(ctx, dim, rank):
    if not -max(rank, 1) <= dim < max(rank, 1):
        raise ctx.error(f"dim {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


@converter("aten.alias.default", "aten.clone.default", "aten.detach.default", "aten.lift_fresh_copy.default",
           "aten.contiguous.default")
def identity(ctx, x, *args, **kwargs):
    # no-ops for a value-semantics IR: aliasing, copies and memory formats do not exist there
    return x


@converter("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.flatten.using_ints",
           "aten.unflatten.int")
def reshape(ctx, x, *args, **kwargs):
    shape = ctx.out_shape
    if x.type.rank == len(shape) and all(dims_equal(a, b) for a, b in zip(x.type.shape, shape)):
        return x
    return ctx.emit("reshape", [x], shape=list(shape))


@converter("aten.unsqueeze.default")
def unsqueeze(ctx, x, dim):
    return ctx.emit("expand_dims", [x], axis=_axis(ctx, dim, x.type.rank + 1))


@converter("aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims")
def squeeze(ctx, x, dim=None):
    r = x.type.rank
    candidates = range(r) if dim is None else [dim] if isinstance(dim, int) else dim
    axes = sorted({_axis(ctx, d, r) for d in candidates if x.type.shape[_axis(ctx, d, r)] == 1})
    return ctx.emit("squeeze", [x], axes=axes) if axes else x


@converter("aten.permute.default")
def permute(ctx, x, dims):
    perm = [_axis(ctx, d, x.type.rank) for d in dims]
    return x if perm == list(range(x.type.rank)) else ctx.emit("permute", [x], perm=perm)


@converter("aten.transpose.int")
def transpose(ctx, x, dim0, dim1):
    r = x.type.rank
    perm = list(range(r))
    a, b = _axis(ctx, dim0, r), _axis(ctx, dim1, r)
    perm[a], perm[b] = perm[b], perm[a]
    return x if a == b else ctx.emit("permute", [x], perm=perm)


@converter("aten.t.default")
def t(ctx, x):
    return transpose(ctx, x, 0, 1) if x.type.rank == 2 else x


@converter("aten.expand.default", "aten.broadcast_to.default")
def expand(ctx, x, size, implicit=False):
    shape = ctx.out_shape
    if x.type.rank == len(shape) and all(dims_equal(a, b) for a, b in zip(x.type.shape, shape)):
        return x
    return ctx.emit("broadcast_to", [x], shape=list(shape))


def _norm_index(ctx, i, size):
    """A start index normalised to >= 0 (negative ints count from the end; concrete ones are clamped)."""
    if i is None:
        return 0
    if isinstance(i, int) and i < 0:
        i = size + i if isinstance(size, int) else sympy.simplify(size + i)
    if isinstance(i, int) and isinstance(size, int):
        i = min(max(i, 0), size)
    return i


@converter("aten.slice.Tensor")
def slice_(ctx, x, dim=0, start=None, end=None, step=1):
    axis = _axis(ctx, dim, x.type.rank)
    size = x.type.shape[axis]
    if step < 1:
        raise ctx.error(f"slice step must be >= 1, got {step}")
    begin = _norm_index(ctx, start, size)
    if isinstance(begin, int) and begin == 0 and step == 1 and dims_equal(ctx.out_shape[axis], size):
        return x
    # the end from torch's result length: exact for symbolic sizes and for "to the end" sentinels alike
    n = ctx.out_shape[axis]
    stop = begin + n if step == 1 else begin + (n - 1) * step + 1
    if isinstance(n, int) and n == 0:
        stop = begin
    return ctx.emit("slice", [x], axis=axis, start=begin, end=_dim(stop), step=step)


def _dim(e):
    if isinstance(e, int):
        return e
    e = sympy.simplify(e)
    return int(e) if e.is_Integer else e


@converter("aten.select.int")
def select(ctx, x, dim, index):
    axis = _axis(ctx, dim, x.type.rank)
    i = _norm_index(ctx, index, x.type.shape[axis])
    y = ctx.emit("slice", [x], axis=axis, start=i, end=_dim(i + 1), step=1)
    return ctx.emit("squeeze", [y], axes=[axis])


@converter("aten.cat.default")
def cat(ctx, tensors, dim=0):
    out = ctx.out_type()
    # torch.cat skips legacy empty 1-d tensors whatever the other operands' rank
    parts = [ctx.cast(t, out.dtype) for t in tensors
             if not (t.type.rank == 1 and t.type.shape[0] == 0 and out.rank != 1)]
    if len(parts) == 1:
        return parts[0]
    return ctx.emit("concat", parts, axis=_axis(ctx, dim, out.rank))


@converter("aten.split.Tensor", "aten.split_with_sizes.default", "aten.unsafe_split.Tensor",
           "aten.split_with_sizes_copy.default")
def split(ctx, x, split_size_or_sizes, dim=0):
    axis = _axis(ctx, dim, x.type.rank)
    sizes = [ctx.dim(t.shape[axis]) for t in ctx.meta]
    if len(sizes) == 1:
        return (x,)
    out = ctx.emit("split", [x], axis=axis, sizes=sizes)
    return out if isinstance(out, tuple) else (out,)


@converter("aten.gather.default")
def gather(ctx, x, dim, index, sparse_grad=False):
    return ctx.emit("gather", [x, index], axis=_axis(ctx, dim, x.type.rank))


@converter("aten.index_select.default")
def index_select(ctx, x, dim, index):
    return ctx.emit("take", [x, index], axis=_axis(ctx, dim, x.type.rank))


@converter("aten.embedding.default")
def embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ctx.emit("embedding", [weight, indices])


@converter("aten.index.Tensor")
def index(ctx, x, indices):
    positions = [i for i, t in enumerate(indices) if t is not None]
    idx = [indices[i] for i in positions]
    for t in idx:
        if t.type.dtype is DType.bool:
            raise ctx.error("boolean mask indexing has a data-dependent result shape; the IR indexes with "
                            "integer tensors only")
    r = x.type.rank
    if positions == list(range(len(positions))):
        return ctx.emit("index", [x, *idx])
    # The IR indexes leading dims: move the indexed dims to the front, then put the broadcast index dims
    # where torch does (in place of the indexed dims when they are adjacent, else in front).
    rest = [d for d in range(r) if d not in positions]
    y = ctx.emit("permute", [x], perm=positions + rest)
    y = ctx.emit("index", [y, *idx])
    adjacent = positions == list(range(positions[0], positions[-1] + 1))
    if not adjacent:
        return y
    nb = y.type.rank - len(rest)
    p0 = positions[0]
    perm = list(range(nb, nb + p0)) + list(range(nb)) + list(range(nb + p0, nb + len(rest)))
    return ctx.emit("permute", [y], perm=perm)



@converter("aten.diff.default")
def diff(ctx, x, n=1, dim=-1, prepend=None, append=None):
    """torch.diff: n-th forward difference along dim (xor for bool, as torch), with optional prepend/append."""
    axis = _axis(ctx, dim, x.type.rank)
    dt = ctx.out_type().dtype
    parts = [ctx.cast(p, dt) for p in (prepend, x, append) if p is not None]
    y = ctx.emit("concat", parts, axis=axis) if len(parts) > 1 else parts[0]
    for _ in range(n):
        size = y.type.shape[axis]
        hi = ctx.emit("slice", [y], axis=axis, start=1, end=size, step=1)
        lo = ctx.emit("slice", [y], axis=axis, start=0, end=_dim(size - 1), step=1)
        y = ctx.emit("ne" if dt is DType.bool else "sub", [hi, lo])
    return y
