"""Elementwise ops: numpy broadcasting, operands of one dtype (frontends insert casts)."""
from __future__ import annotations

import math

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType
from .rules import broadcast_shapes, require_float, same_dtype


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


def _unary(x: TensorType, **_) -> TensorType:
    return x


def _float_unary(x: TensorType, **_) -> TensorType:
    require_float(x)
    return x


def _erf(x):
    import torch
    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _gelu(x, approximate):
    x = x.astype(np.float32)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _pow(a, b):
    with np.errstate(all="ignore"):
        return np.power(a.astype(np.float32) if a.dtype.kind != "i" else a, b)


for _name, _ref in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
                    "minimum": np.minimum}.items():
    defop(_name, ("lhs", "rhs"), _binary, _ref, doc=f"elementwise {_name} with broadcasting")

defop("div", ("lhs", "rhs"), _float_binary, lambda a, b: np.divide(a.astype(np.float32), b),
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


defop("neg", ("x",), _unary, np.negative)
defop("abs", ("x",), _unary, np.abs)
defop("relu", ("x",), _unary, lambda x: np.maximum(x, np.zeros((), x.dtype)))
for _name, _ref in {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
                    "reciprocal": lambda x: 1.0 / x, "tanh": np.tanh, "sin": np.sin, "cos": np.cos,
                    "erf": _erf, "sigmoid": _sigmoid, "silu": _silu}.items():
    defop(_name, ("x",), _float_unary, _f(_ref), doc=f"elementwise {_name} of a float tensor")

defop("gelu", ("x",), _float_unary, _gelu, {"approximate": Attr("str", "none", choices=("none", "tanh"))},
      doc="GELU; approximate='tanh' is the tanh form used by GPT-2")


def _clip_infer(x, min, max):
    return x


def _clip_ref(x, min, max):
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    return np.clip(x, lo, hi)


defop("clip", ("x",), _clip_infer, _clip_ref,
      {"min": Attr("float", None, optional=True), "max": Attr("float", None, optional=True)})


def _cast_ref(x, dtype):
    if dtype is DType.bool:
        return x != 0
    if x.dtype.kind == "f" and dtype.is_int:
        return np.trunc(x).astype(dtype.numpy)
    return x.astype(dtype.numpy)


defop("cast", ("x",), lambda x, dtype: TensorType(x.shape, dtype), _cast_ref, {"dtype": Attr("dtype")},
      doc="convert to another dtype (float->int truncates toward zero, like torch)")


def _where_infer(c, a, b):
    if c.dtype is not DType.bool:
        raise ValueError(f"condition must be bool, got {c.dtype}")
    return TensorType(broadcast_shapes(c.shape, a.shape, b.shape), same_dtype(a, b))


defop("where", ("cond", "x", "y"), _where_infer, np.where, doc="select x where cond else y")
