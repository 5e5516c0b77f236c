"""Reductions and scans.

``axes`` lists the reduced axes explicitly: ``[]`` reduces nothing (torch's ``dim=None``/``dim=[]`` means
every axis; the frontend writes them out). Float reductions accumulate in f32, like torch on CPU.
"""
from __future__ import annotations

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType, normalize_axis
from .rules import distinct_axes, is_float_array, reject_bool


def _reduce_infer(x, axes, keepdims):
    ax = distinct_axes(axes, x.rank)
    if keepdims:
        shape = tuple(1 if i in ax else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in ax)
    return TensorType(shape, x.dtype)


def _numeric_reduce_infer(op):
    def infer(x, axes, keepdims):
        reject_bool(x, op)  # torch.sum/prod of bool give int64, not bool
        return _reduce_infer(x, axes, keepdims)
    return infer


def _np_axes(x, axes) -> tuple:
    # a 0-d tensor has one nameable axis (0 or -1) in torch, none in numpy
    return () if x.ndim == 0 else tuple(axes)


def _reducer(fn, acc_float=False):
    def run(x, axes, keepdims):
        if acc_float and is_float_array(x):
            x = x.astype(np.float32)
        return fn(x, axis=_np_axes(x, axes), keepdims=keepdims)
    return run


def _mean_infer(x, axes, keepdims):
    if not x.dtype.is_float:
        raise ValueError(f"mean needs a float tensor, got {x.dtype}")
    return _reduce_infer(x, axes, keepdims)


_RED = {"axes": Attr("ints"), "keepdims": Attr("bool", False)}
defop("sum", ("x",), _numeric_reduce_infer("sum"), _reducer(np.sum, True), _RED)
defop("mean", ("x",), _mean_infer, _reducer(np.mean, True), _RED)
defop("max", ("x",), _reduce_infer, _reducer(np.max), _RED, doc="torch.amax: nan propagates")
defop("min", ("x",), _reduce_infer, _reducer(np.min), _RED, doc="torch.amin: nan propagates")
defop("prod", ("x",), _numeric_reduce_infer("prod"), _reducer(np.prod, True), _RED)


def _argmax_infer(x, axis, keepdims):
    reject_bool(x, "argmax")
    t = _reduce_infer(x, [axis], keepdims)
    return TensorType(t.shape, DType.i64)


def _argmax_ref(x, axis, keepdims):
    if x.ndim == 0:
        return np.zeros((), np.int64)
    return np.argmax(x, axis=axis, keepdims=keepdims)


defop("argmax", ("x",), _argmax_infer, _argmax_ref, {"axis": Attr("int"), "keepdims": Attr("bool", False)},
      doc="index of the first maximum along axis (a nan counts as the maximum), as i64")


def _cumsum_infer(x, axis, dtype):
    normalize_axis(axis, x.rank)
    return TensorType(x.shape, dtype)


def _cumsum_ref(x, axis, dtype):
    if x.ndim == 0:
        return x
    acc = np.float32 if dtype.is_float else np.int64
    if dtype.is_int and is_float_array(x):
        x = np.trunc(x.astype(np.float32))  # torch converts to `dtype` before summing
    return np.cumsum(x.astype(acc), axis=axis)


defop("cumsum", ("x",), _cumsum_infer, _cumsum_ref, {"axis": Attr("int"), "dtype": Attr("dtype")},
      doc="inclusive prefix sum along axis, accumulated and returned in `dtype` (x is converted to `dtype` "
          "first, so float x with an int dtype truncates)")
