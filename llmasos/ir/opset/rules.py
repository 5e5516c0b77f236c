"""Shared type rules: broadcasting, dtype agreement, axis handling."""
from __future__ import annotations

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
