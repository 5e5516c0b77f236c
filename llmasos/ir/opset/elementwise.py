"""Elementwise ops: numpy broadcasting, operands of one dtype (frontends insert casts)."""
from __future__ import annotations

import math

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType
from .rules import broadcast_shapes, reject_bool, require_float, same_dtype, to_dtype


def _binary(*ts: TensorType) -> TensorType:
    return TensorType(broadcast_shapes(*(t.shape for t in ts)), same_dtype(*ts))


def _compare(a: TensorType, b: TensorType) -> TensorType:
    same_dtype(a, b)
    return TensorType(broadcast_shapes(a.shape, b.shape), DType.bool)


def _logical(a: TensorType, b: TensorType) -> TensorType:
    if a.dtype is not DType.bool or b.dtype is not DType.bool:
        raise ValueError(f"logical ops take bool operands, got {a.dtype} and {b.dtype}")
    return TensorType(broadcast_shapes(a.shape, b.shape), DType.bool)


def _float_binary(a: TensorType, b: TensorType) -> TensorType:
    require_float(a)
    return _binary(a, b)


def _float_unary(x: TensorType, **_) -> TensorType:
    require_float(x)
    return x


def _erf(x):
    import torch  # deferred: the IR imports without torch; numpy has no erf, so only gelu's reference needs it
    # np.ascontiguousarray would turn a 0-d array into shape (1,)
    return torch.special.erf(torch.from_numpy(np.array(x, dtype=np.float32))).numpy().reshape(np.shape(x))


def _gelu(x, approximate):
    x = x.astype(np.float32)
    if approximate == "tanh":
        with np.errstate(over="ignore", invalid="ignore"):  # x**3 overflows to inf; tanh(inf) is 1
            return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))


def _pow(a, b):
    if a.dtype.kind in "iu":  # integer power stays integral (wrapping), as torch.pow on int tensors
        return np.power(a, b)
    with np.errstate(all="ignore"):
        return np.power(a.astype(np.float32), b.astype(np.float32))


def _div(a, b):
    with np.errstate(all="ignore"):  # x/0 is +-inf or nan, as in torch
        return np.divide(a.astype(np.float32), b.astype(np.float32))


def _sub_infer(a: TensorType, b: TensorType) -> TensorType:
    reject_bool(a, "sub")  # torch: "Subtraction, the `-` operator, with a bool tensor is not supported"
    return _binary(a, b)


for _name, _ref in {"add": np.add, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum}.items():
    defop(_name, ("lhs", "rhs"), _binary, _ref, doc=f"elementwise {_name} with broadcasting")
defop("sub", ("lhs", "rhs"), _sub_infer, np.subtract, doc="elementwise sub with broadcasting")

defop("div", ("lhs", "rhs"), _float_binary, _div,
      doc="true division of float tensors")
defop("pow", ("lhs", "rhs"), _binary, _pow, doc="elementwise power")

for _name, _ref in {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
                    "gt": np.greater, "ge": np.greater_equal}.items():
    defop(_name, ("lhs", "rhs"), _compare, _ref, doc=f"elementwise comparison {_name} -> bool")

defop("logical_and", ("lhs", "rhs"), _logical, np.logical_and)
defop("logical_or", ("lhs", "rhs"), _logical, np.logical_or)
defop("logical_not", ("x",), lambda x: _logical(x, x), np.logical_not)


def _silu(x):
    x = x.astype(np.float32)
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    x = x.astype(np.float32)
    return 1.0 / (1.0 + np.exp(-x))


def _f(fn):
    def run(x):
        with np.errstate(all="ignore"):
            return fn(x.astype(np.float32))
    return run


def _numeric_unary(op):
    def infer(x: TensorType) -> TensorType:
        reject_bool(x, op)
        return x
    return infer


defop("neg", ("x",), _numeric_unary("neg"), np.negative)
defop("abs", ("x",), _numeric_unary("abs"), np.abs)
defop("relu", ("x",), _numeric_unary("relu"), lambda x: np.maximum(x, np.zeros((), x.dtype)))
for _name, _ref in {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
                    "reciprocal": lambda x: 1.0 / x, "tanh": np.tanh, "sin": np.sin, "cos": np.cos,
                    "erf": _erf, "sigmoid": _sigmoid, "silu": _silu}.items():
    defop(_name, ("x",), _float_unary, _f(_ref), doc=f"elementwise {_name} of a float tensor")

defop("gelu", ("x",), _float_unary, _gelu, {"approximate": Attr("str", "none", choices=("none", "tanh"))},
      doc="GELU; approximate='tanh' is the tanh form used by GPT-2")


def _clip_infer(x, min, max):
    reject_bool(x, "clip")
    if x.dtype.is_int:
        # torch.clamp of an int tensor by a fractional bound promotes to float; here the dtype stays
        bad = [b for b in (min, max) if b is not None and not float(b).is_integer()]
        if bad:
            raise ValueError(f"bounds of an integer clip must be integral, got {bad} (cast x to float first)")
    return x


def _clip_ref(x, min, max):
    # min > max gives max everywhere, as in torch.clamp
    if min is not None:
        x = np.maximum(x, np.asarray(min).astype(x.dtype))
    if max is not None:
        x = np.minimum(x, np.asarray(max).astype(x.dtype))
    return x


defop("clip", ("x",), _clip_infer, _clip_ref,
      {"min": Attr("float", None, optional=True), "max": Attr("float", None, optional=True)})


defop("cast", ("x",), lambda x, dtype: TensorType(x.shape, dtype), lambda x, dtype: to_dtype(x, dtype),
      {"dtype": Attr("dtype")},
      doc="convert to another dtype like torch's .to(dtype): float->int truncates toward zero, ->bool is != 0, "
          "->f8e4m3 saturates to +-448")


def _where_infer(c, a, b):
    if c.dtype is not DType.bool:
        raise ValueError(f"condition must be bool, got {c.dtype}")
    return TensorType(broadcast_shapes(c.shape, a.shape, b.shape), same_dtype(a, b))


defop("where", ("cond", "x", "y"), _where_infer, np.where, doc="select x where cond else y")
