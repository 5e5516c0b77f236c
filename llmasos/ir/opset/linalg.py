"""Matrix products."""
from __future__ import annotations

import numpy as np

from ..ops import defop
from ..types import TensorType, dims_equal
from .rules import broadcast_shapes, same_dtype


def _matmul_infer(a: TensorType, b: TensorType) -> TensorType:
    dt = same_dtype(a, b)
    if a.rank < 2 or b.rank < 2:
        raise ValueError(f"matmul needs rank >= 2 operands, got ranks {a.rank} and {b.rank}")
    if not dims_equal(a.shape[-1], b.shape[-2]):
        raise ValueError(f"contraction dims differ: {a.shape[-1]} vs {b.shape[-2]}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType((*batch, a.shape[-2], b.shape[-1]), dt)


def _acc(x):
    return x.astype(np.float32) if x.dtype.kind not in "iub" else x


def _matmul_ref(a, b):
    return np.matmul(_acc(a), _acc(b))


def _linear_infer(x: TensorType, w: TensorType, bias: TensorType = None) -> TensorType:
    dt = same_dtype(x, w) if bias is None else same_dtype(x, w, bias)
    if w.rank != 2:
        raise ValueError(f"weight must be rank 2 [out, in], got {w}")
    if x.rank < 1 or not dims_equal(x.shape[-1], w.shape[1]):
        raise ValueError(f"input features {x.shape[-1] if x.rank else '?'} != weight in-features {w.shape[1]}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], w.shape[0])):
        raise ValueError(f"bias must be [{w.shape[0]}], got {bias}")
    return TensorType((*x.shape[:-1], w.shape[0]), dt)


def _linear_ref(x, w, bias=None):
    y = np.matmul(_acc(x), _acc(w).T)
    return y if bias is None else y + _acc(bias)


defop("matmul", ("lhs", "rhs"), _matmul_infer, _matmul_ref,
      doc="batched matrix product [..., M, K] x [..., K, N] -> [..., M, N] with broadcast batch dims")
defop("linear", ("x", "weight", "bias?"), _linear_infer, _linear_ref,
      doc="x @ weight.T + bias, weight [out, in] as in torch.nn.Linear")
