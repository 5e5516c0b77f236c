"""Ops that create tensors: small inline constants, ranges and fills. Large data are parameters instead."""
from __future__ import annotations

import numpy as np
import sympy

from ..ops import Attr, defop
from ..types import DType, TensorType, as_dim
from .rules import to_dtype

# Constants with more elements than this print as parameters, not inline data.
MAX_INLINE_ELEMENTS = 64


def _const_infer(value, dtype):
    if value.size > MAX_INLINE_ELEMENTS:
        raise ValueError(f"inline constants hold at most {MAX_INLINE_ELEMENTS} elements "
                         f"(got {value.size}); make it a parameter")
    return TensorType(value.shape, dtype)


defop("const", (), _const_infer, lambda value, dtype: to_dtype(value, dtype),
      {"value": Attr("tensor"), "dtype": Attr("dtype")}, doc="a small constant written inline")


def _arange_infer(start, end, step, dtype):
    if step == 0:
        raise ValueError("step must be non-zero")
    if isinstance(start, int) and isinstance(end, int):
        n = max(0, -(-(end - start) // step))
    else:  # symbolic: assumed non-empty (the length of a symbolic range cannot be clamped at 0 here)
        n = as_dim(sympy.ceiling((sympy.sympify(end) - start) / step))
    return TensorType((n,), dtype)


defop("arange", (), _arange_infer, lambda start, end, step, dtype: to_dtype(np.arange(start, end, step), dtype),
      {"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1), "dtype": Attr("dtype", DType.i64)},
      doc="[start, start+step, ...) below end; start/end may be symbolic")


def _full_infer(shape, value, dtype):
    return TensorType(tuple(shape), dtype)


defop("full", (), _full_infer, lambda shape, value, dtype: to_dtype(np.full(shape, value), dtype),
      {"shape": Attr("dims"), "value": Attr("scalar"), "dtype": Attr("dtype")},
      doc="a tensor of one value (shape may be symbolic)")
