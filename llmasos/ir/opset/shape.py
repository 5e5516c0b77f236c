"""Data movement: reshape, permute, slice, concat, split, squeeze/unsqueeze, broadcast, gathers."""
from __future__ import annotations

import numpy as np
import sympy

from ..ops import Attr, defop
from ..types import DType, TensorType, as_dim, dims_equal, normalize_axis
from .rules import broadcast_shapes, distinct_axes, same_dtype


def _numel(shape):
    n = sympy.Integer(1)
    for d in shape:
        n = n * d
    return sympy.simplify(n)


def _reshape_infer(x, shape):
    if any(isinstance(d, int) and d < 0 for d in shape):
        raise ValueError(f"reshape shape [{', '.join(map(str, shape))}] has a negative dim (write -1 out)")
    if sympy.simplify(_numel(x.shape) - _numel(shape)) != 0:
        raise ValueError(f"cannot reshape [{', '.join(map(str, x.shape))}] to [{', '.join(map(str, shape))}]: "
                         f"element counts differ")
    return TensorType(tuple(shape), x.dtype)


defop("reshape", ("x",), _reshape_infer, lambda x, shape: np.reshape(x, shape), {"shape": Attr("dims")},
      doc="same elements in a new shape (fully specified, no -1)")


def _permute_infer(x, perm):
    if sorted(perm) != list(range(x.rank)):
        raise ValueError(f"perm {perm} is not a permutation of {x.rank} axes")
    return TensorType(tuple(x.shape[p] for p in perm), x.dtype)


defop("permute", ("x",), _permute_infer, lambda x, perm: np.transpose(x, perm), {"perm": Attr("ints")})


def _slice_infer(x, axis, start, end, step):
    ax = normalize_axis(axis, x.rank)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"{name} must be normalised to >= 0, got {v}")
    if isinstance(start, int) and isinstance(end, int):
        n = max(0, -(-(end - start) // step))
    else:
        n = as_dim(sympy.ceiling((end - start) / step) if step > 1 else end - start)  # arange's form too
    if isinstance(n, int) and n < 0:
        raise ValueError(f"empty or negative slice [{start}:{end}]")
    d = x.shape[ax]
    if isinstance(d, int) and isinstance(end, int) and end > d:
        raise ValueError(f"slice end {end} beyond dim size {d}")
    shape = list(x.shape)
    shape[ax] = n
    return TensorType(tuple(shape), x.dtype)


def _slice_ref(x, axis, start, end, step):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


defop("slice", ("x",), _slice_infer, _slice_ref,
      {"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1)},
      doc="x[start:end:step] along axis; start/end are normalised (>= 0, end <= size) and may be symbolic")


def _concat_infer(*xs, axis):
    if not xs:
        raise ValueError("concat needs at least one operand")
    dt = same_dtype(*xs)
    r = xs[0].rank
    ax = normalize_axis(axis, r)
    total = sympy.Integer(0)
    for t in xs:
        if t.rank != r:
            raise ValueError(f"ranks differ: {[str(t) for t in xs]}")
        for i in range(r):
            if i != ax and not dims_equal(t.shape[i], xs[0].shape[i]):
                raise ValueError(f"dim {i} differs: {[str(t) for t in xs]}")
        total = total + t.shape[ax]
    shape = list(xs[0].shape)
    shape[ax] = as_dim(total)
    return TensorType(tuple(shape), dt)


defop("concat", ("*xs",), _concat_infer, lambda *xs, axis: np.concatenate(xs, axis=axis), {"axis": Attr("int")})


def _split_infer(x, axis, sizes):
    ax = normalize_axis(axis, x.rank)
    if not dims_equal(as_dim(sum(sizes, sympy.Integer(0))), x.shape[ax]):
        raise ValueError(f"split sizes {[str(s) for s in sizes]} do not add up to dim {x.shape[ax]}")
    outs = []
    for s in sizes:
        shape = list(x.shape)
        shape[ax] = s
        outs.append(TensorType(tuple(shape), x.dtype))
    return tuple(outs)


def _split_ref(x, axis, sizes):
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


defop("split", ("x",), _split_infer, _split_ref, {"axis": Attr("int"), "sizes": Attr("dims")},
      doc="split along axis into pieces of the given sizes (one result per piece)")


def _expand_dims_infer(x, axis):
    ax = normalize_axis(axis, x.rank + 1)
    shape = list(x.shape)
    shape.insert(ax, 1)
    return TensorType(tuple(shape), x.dtype)


defop("expand_dims", ("x",), _expand_dims_infer, lambda x, axis: np.expand_dims(x, axis), {"axis": Attr("int")})


def _squeeze_infer(x, axes):
    ax = distinct_axes(axes, x.rank)
    for a in ax:
        if x.shape[a] != 1:
            raise ValueError(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return TensorType(tuple(d for i, d in enumerate(x.shape) if i not in ax), x.dtype)


defop("squeeze", ("x",), _squeeze_infer, lambda x, axes: np.squeeze(x, tuple(axes)) if axes else x,
      {"axes": Attr("ints")})


def _broadcast_to_infer(x, shape):
    out = broadcast_shapes(x.shape, tuple(shape))
    if len(out) != len(shape) or not all(dims_equal(a, b) for a, b in zip(out, shape)):
        raise ValueError(f"cannot broadcast [{', '.join(map(str, x.shape))}] to [{', '.join(map(str, shape))}]")
    return TensorType(tuple(shape), x.dtype)


defop("broadcast_to", ("x",), _broadcast_to_infer, lambda x, shape: np.broadcast_to(x, shape).copy(),
      {"shape": Attr("dims")})


def _take_infer(x, indices, axis):
    ax = normalize_axis(axis, x.rank)
    if not indices.dtype.is_int:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    return TensorType((*x.shape[:ax], *indices.shape, *x.shape[ax + 1:]), x.dtype)


def _check_range(idx, n):
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for dim of size {n}")


def _take_ref(x, indices, axis):
    _check_range(indices, x.shape[axis])
    return np.take(x, indices, axis=axis)


defop("take", ("x", "indices"), _take_infer, _take_ref, {"axis": Attr("int")},
      doc="numpy.take: the indices' shape replaces `axis` (index_select, select with a 0-d index); "
          "negative indices count from the end")


def _gather_infer(x, index, axis):
    ax = normalize_axis(axis, x.rank)
    if index.rank != x.rank or not index.dtype.is_int:
        raise ValueError(f"index must be an integer tensor of rank {x.rank}, got {index}")
    for i, (di, dx) in enumerate(zip(index.shape, x.shape)):
        if i != ax and isinstance(di, int) and isinstance(dx, int) and di > dx:
            raise ValueError(f"index dim {i} is {di} but x has only {dx} there ({index} vs {x})")
    return TensorType(index.shape, x.dtype)


def _gather_ref(x, index, axis):
    n = x.shape[axis]
    if index.size and (index.min() < 0 or index.max() >= n):
        raise IndexError(f"gather index out of range [0, {n}) (torch.gather takes no negative indices)")
    # torch reads x only over index's extent in the other dims (no broadcasting)
    ax = axis % x.ndim
    x = x[tuple(slice(None) if i == ax else slice(0, d) for i, d in enumerate(index.shape))]
    return np.take_along_axis(x, index, axis=ax)


defop("gather", ("x", "index"), _gather_infer, _gather_ref, {"axis": Attr("int")},
      doc="torch.gather: out[i][j] = x[i][index[i][j]] along axis; index may be smaller than x in the other "
          "dims (never broadcast); indices in [0, size)")


def _index_infer(x, *indices):
    if not indices or len(indices) > x.rank:
        raise ValueError(f"index takes 1 to {x.rank} index tensors, got {len(indices)}")
    for t in indices:
        if not t.dtype.is_int:
            raise ValueError(f"index tensors must be integers, got {t.dtype}")
    b = broadcast_shapes(*(t.shape for t in indices))
    return TensorType((*b, *x.shape[len(indices):]), x.dtype)


def _index_ref(x, *indices):
    for i, t in enumerate(indices):
        _check_range(t, x.shape[i])
    return x[tuple(indices)]


defop("index", ("x", "*indices"), _index_infer, _index_ref,
      doc="advanced indexing x[i0, i1, ...] on the leading dims with broadcast integer index tensors; "
          "negative indices count from the end")
