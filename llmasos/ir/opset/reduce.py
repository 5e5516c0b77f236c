"""Reductions and scans."""
from __future__ import annotations

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType, normalize_axis
from .rules import axes_of


def _reduce_infer(x, axes, keepdims):
    ax = axes_of(axes, x.rank)
    if keepdims:
        shape = tuple(1 if i in ax else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in ax)
    return TensorType(shape, x.dtype)


def _reducer(fn, acc_float=False):
    def run(x, axes, keepdims):
        if acc_float and x.dtype.kind == "f":
            x = x.astype(np.float32)
        return fn(x, axis=tuple(axes), keepdims=keepdims)
    return run


_RED = {"axes": Attr("ints"), "keepdims": Attr("bool", False)}
defop("sum", ("x",), _reduce_infer, _reducer(np.sum, True), _RED)
defop("mean", ("x",), lambda x, **a: _float_only(x) or _reduce_infer(x, **a), _reducer(np.mean, True), _RED)
defop("max", ("x",), _reduce_infer, _reducer(np.max), _RED)
defop("min", ("x",), _reduce_infer, _reducer(np.min), _RED)
defop("prod", ("x",), _reduce_infer, _reducer(np.prod, True), _RED)


def _float_only(x):
    if not x.dtype.is_float:
        raise ValueError(f"mean needs a float tensor, got {x.dtype}")


def _argmax_infer(x, axis, keepdims):
    t = _reduce_infer(x, [axis], keepdims)
    return TensorType(t.shape, DType.i64)


defop("argmax", ("x",), _argmax_infer,
      lambda x, axis, keepdims: np.argmax(x, axis=axis, keepdims=keepdims), {"axis": Attr("int"),
                                                                              "keepdims": Attr("bool", False)})


def _cumsum_infer(x, axis, dtype):
    normalize_axis(axis, x.rank)
    return TensorType(x.shape, dtype)


def _cumsum_ref(x, axis, dtype):
    acc = np.float32 if dtype.is_float else np.int64
    return np.cumsum(x.astype(acc), axis=axis)


defop("cumsum", ("x",), _cumsum_infer, _cumsum_ref, {"axis": Attr("int"), "dtype": Attr("dtype")},
      doc="inclusive prefix sum along axis, accumulated and returned in `dtype`")
