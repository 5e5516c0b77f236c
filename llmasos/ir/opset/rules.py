"""Shared type rules: broadcasting, dtype agreement, axis handling."""
from __future__ import annotations

import numpy as np

from ..types import DType, TensorType, dims_equal, normalize_axis


def broadcast_shapes(*shapes) -> tuple:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d = 1
        for x in dims:
            if isinstance(x, int) and x == 1:
                continue
            if isinstance(d, int) and d == 1:
                d = x
            elif not dims_equal(d, x):
                raise ValueError(f"shapes {[list(map(str, s)) for s in shapes]} do not broadcast at dim {i}: "
                                 f"{d} vs {x}")
        out.append(d)
    return tuple(out)


def same_dtype(*types: TensorType) -> DType:
    dts = {t.dtype for t in types}
    if len(dts) != 1:
        raise ValueError(f"operand dtypes must agree, got {', '.join(str(t.dtype) for t in types)}")
    return types[0].dtype


def require_float(t: TensorType, what: str = "operand") -> None:
    if not t.dtype.is_float:
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")


def axes_of(axes, rank: int) -> list[int]:
    out = sorted({normalize_axis(a, rank) for a in axes})
    return out


def distinct_axes(axes, rank: int, what: str = "axes") -> list[int]:
    """Normalised axes, rejecting repeats the way torch does ('dim 1 appears multiple times')."""
    norm = [normalize_axis(a, rank) for a in axes]
    if len(set(norm)) != len(norm):
        raise ValueError(f"{what} {list(axes)} name an axis more than once for rank {rank}")
    return sorted(norm)


def reject_bool(t: TensorType, op: str) -> None:
    if t.dtype is DType.bool:
        raise ValueError(f"{op} does not take bool tensors (as in torch); cast first")


# ml_dtypes floats report numpy kind 'V', so `dtype.kind == "f"` misses bf16 and f8.
_ML_FLOATS = (DType.bf16.numpy, DType.f8e4m3.numpy)
_F8_MAX = 448.0


def is_float_array(a) -> bool:
    return a.dtype.kind == "f" or a.dtype in _ML_FLOATS


def to_dtype(a, dt: DType):
    """Convert an array to the numpy type of ``dt`` the way torch's ``.to(dtype)`` does.

    float -> int truncates toward zero, anything -> bool is ``!= 0``, and f8e4m3 saturates to +-448
    (torch maps out-of-range values and infinities to the largest finite value; ml_dtypes would give NaN).
    """
    a = np.asarray(a)
    if a.dtype == dt.numpy:
        return a
    if dt is DType.bool:
        return a != 0
    if is_float_array(a) and dt.is_int:
        with np.errstate(invalid="ignore"):
            return np.trunc(a.astype(np.float32)).astype(dt.numpy)
    if dt is DType.f8e4m3:
        f = a.astype(np.float32)
        return np.where(np.isnan(f), f, np.clip(f, -_F8_MAX, _F8_MAX)).astype(dt.numpy)
    return a.astype(dt.numpy)
