"""The torch-mlir op table: one converter per torch-dialect op name, building LLMasOS IR.

A converter is ``fn(cx, *operands)``: ``cx`` is a ConvertContext (the IR graph, the MLIR op, its location and
helpers), operands arrive already resolved -- IR Values for tensors, python scalars / sympy dims for
``!torch.int`` and friends, python lists for ``!torch.list``, None for ``!torch.none``. It returns the op's
result: a Value, a scalar, a list, or a tuple with one entry per MLIR result.

Result dtypes come from the MLIR result types (torch-mlir has already applied torch's promotion rules), so
converters cast operands to ``cx.result_dtype()`` rather than re-deriving promotion, except for comparisons,
whose result is bool.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
import sympy

from llmasos.ir import DType, Graph, Value
from llmasos.ir.types import as_dim, dims_equal, normalize_axis

from .errors import FrontendError


class MlirImportError(FrontendError):
    """A torch-mlir module that cannot be imported; the message names the op and its source location."""


class UnsupportedMlirOpError(MlirImportError):
    def __init__(self, op: str, loc: Optional[str], text: str = "", reason: str = ""):
        self.op, self.loc = op, loc
        where = f" at {loc}" if loc else ""
        why = f" ({reason})" if reason else ""
        snippet = f"\n  {text}" if text else ""
        super().__init__(
            f"torch-mlir op '{op}'{where} has no LLMasOS converter{why}; add one with "
            f"frontends.torch_mlir.register_mlir_converter('{op}', fn), where fn(cx, *operands) builds IR "
            f"with cx.emit(...) and returns the result{snippet}")


MLIR_CONVERTERS: dict[str, Callable] = {}


def _canonical(op_name: str) -> str:
    return op_name if op_name.startswith(("torch.", "func.")) else "torch." + op_name


def register_mlir_converter(op_name: str, fn: Callable = None, *, replace: bool = True):
    """Register ``fn(cx, *operands)`` for a torch-dialect op ('aten.add.Tensor' or 'torch.aten.add.Tensor').

    Usable directly or as a decorator (``@register_mlir_converter('aten.foo')``).
    """
    name = _canonical(op_name)

    def add(f):
        if name in MLIR_CONVERTERS and not replace:
            raise ValueError(f"a converter for {name} is already registered")
        MLIR_CONVERTERS[name] = f
        return f

    return add(fn) if fn is not None else add


def _converts(*names):
    def deco(f):
        for n in names:
            MLIR_CONVERTERS[_canonical(n)] = f
        return f
    return deco


# -- torch-mlir types ------------------------------------------------------------------------------------------
_VTENSOR_RE = re.compile(r"!torch\.vtensor<\[([^\]]*)\],([A-Za-z0-9]+)>")
_MLIR_DTYPES = {"f32": DType.f32, "f16": DType.f16, "bf16": DType.bf16, "si64": DType.i64, "si32": DType.i32,
                "si8": DType.i8, "ui8": DType.u8, "i1": DType.bool, "f8E4M3FN": DType.f8e4m3}
# torch ScalarType codes as torch-mlir writes dtype arguments (torch/csrc ScalarType order)
_SCALAR_TYPES = {0: DType.u8, 1: DType.i8, 3: DType.i32, 4: DType.i64, 5: DType.f16, 6: DType.f32,
                 11: DType.bool, 15: DType.bf16, 24: DType.f8e4m3}
_SCALAR_TYPE_NAMES = {2: "int16", 7: "float64", 8: "complex32", 9: "complex64", 10: "complex128"}


def parse_vtensor(type_str: str):
    """(shape with None for '?', dtype text) of a ``!torch.vtensor`` type string, or None for other types."""
    m = _VTENSOR_RE.fullmatch(type_str)
    if not m:
        return None
    dims = tuple(None if d == "?" else int(d) for d in m.group(1).split(",")) if m.group(1) else ()
    return dims, m.group(2)


def mlir_dtype(text: str) -> DType:
    try:
        return _MLIR_DTYPES[text]
    except KeyError:
        raise MlirImportError(f"element type {text} has no LLMasOS dtype (known: "
                              f"{', '.join(_MLIR_DTYPES)})") from None


def scalar_type(code) -> DType:
    if code not in _SCALAR_TYPES:
        name = _SCALAR_TYPE_NAMES.get(code, f"ScalarType {code}")
        raise MlirImportError(f"torch dtype {name} has no LLMasOS dtype")
    return _SCALAR_TYPES[code]


# -- the context ---------------------------------------------------------------------------------------------
class ConvertContext:
    """What a converter sees: the graph, the MLIR op (``op``, its ``name`` and ``loc``) and IR helpers."""

    def __init__(self, graph: Graph, op, name: str, loc: Optional[str]):
        self.graph, self.op, self.name, self.loc = graph, op, name, loc
        self.hint = name.split(".")[2] if name.count(".") >= 2 else None

    @property
    def where(self) -> str:
        return self.loc or str(self.op.location)

    def error(self, msg: str) -> MlirImportError:
        return MlirImportError(f"{self.name} at {self.where}: {msg}")

    def unsupported(self, reason: str) -> UnsupportedMlirOpError:
        return UnsupportedMlirOpError(self.name, self.where, reason=reason)

    # the MLIR result types
    def result_type(self, i: int = 0):
        t = parse_vtensor(str(self.op.results[i].type))
        if t is None:
            raise self.error(f"result {i} is {self.op.results[i].type}, not a value tensor")
        return t

    def result_dtype(self, i: int = 0) -> DType:
        return mlir_dtype(self.result_type(i)[1])

    def result_rank(self, i: int = 0) -> int:
        return len(self.result_type(i)[0])

    # building IR
    def emit(self, op: str, inputs: Sequence[Value], **attrs):
        return self.graph.add_node(op, inputs, attrs, loc=self.loc, name=self.hint)

    def const(self, value, dtype: DType) -> Value:
        arr = np.asarray(value)
        arr = (arr != 0) if dtype is DType.bool else arr.astype(dtype.numpy)
        return self.emit("const", [], value=arr, dtype=dtype)

    def cast(self, v: Value, dtype: DType) -> Value:
        return v if v.type.dtype is dtype else self.emit("cast", [v], dtype=dtype)

    def tensor(self, x, dtype: DType) -> Value:
        """``x`` (a Value, python scalar or symbolic dim) as a tensor of ``dtype``."""
        if isinstance(x, Value):
            return self.cast(x, dtype)
        if isinstance(x, sympy.Expr) and not x.is_Number:
            # a size known only at run time: arange(s, s+1) holds it
            r = self.emit("arange", [], start=x, end=x + 1, step=1, dtype=DType.i64)
            return self.cast(self.emit("reshape", [r], shape=[]), dtype)
        if isinstance(x, sympy.Expr):
            x = int(x) if x.is_Integer else float(x)
        if isinstance(x, (bool, int, float, np.number, np.bool_)):
            return self.const(x, dtype)
        raise self.error(f"expected a tensor or a scalar, got {type(x).__name__} {x!r}")

    def axis(self, d, rank: int) -> int:
        try:
            return normalize_axis(int(d), rank, "dim")
        except ValueError as e:
            raise self.error(str(e)) from None


def _static_int(cx, v, what: str) -> int:
    if isinstance(v, sympy.Expr):
        if v.is_Integer:
            return int(v)
        raise cx.unsupported(f"{what} must be a static int, got {v}")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise cx.error(f"{what} must be an int, got {v!r}")
    return int(v)


def _scalar_category(dt: DType) -> int:
    return 2 if dt.is_float else (0 if dt is DType.bool else 1)


def _join(dts: list) -> DType:
    best = max(dts, key=_scalar_category)
    same = [d for d in dts if _scalar_category(d) == _scalar_category(best)]
    if len(set(same)) == 1:
        return same[0]
    if set(same) == {DType.f16, DType.bf16}:
        return DType.f32
    return max(same, key=lambda d: d.bits)


def promote(*xs) -> DType:
    """torch's result_type for tensors and python scalars (dimensioned tensors > 0-d tensors > scalars)."""
    dim = [x.type.dtype for x in xs if isinstance(x, Value) and x.type.rank > 0]
    zero = [x.type.dtype for x in xs if isinstance(x, Value) and x.type.rank == 0]
    scal = [DType.bool if isinstance(x, (bool, np.bool_)) else DType.f32 if isinstance(x, (float, np.floating))
            else DType.i64 for x in xs if not isinstance(x, Value) and x is not None]
    out = None
    for group in (dim, zero, scal):
        if group:
            g = _join(group)
            if out is None or _scalar_category(g) > _scalar_category(out):
                out = g
    if out is None:
        raise ValueError("no operands to promote")
    return out


def numel(shape) -> Any:
    n = sympy.Integer(1)
    for d in shape:
        n = n * d
    return n


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


# -- scalars (!torch.int / !torch.float / !torch.bool) ---------------------------------------------------------
def _num(cx, v):
    if isinstance(v, Value):
        raise cx.unsupported("tensor -> scalar conversions depend on data")
    return v


def _scalar_binary(fn):
    def conv(cx, a, b):
        out = fn(_num(cx, a), _num(cx, b))
        return as_dim(out) if isinstance(out, sympy.Expr) else out
    return conv


for _n, _f in {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}.items():
    MLIR_CONVERTERS[f"torch.aten.{_n}.int"] = _scalar_binary(_f)
    MLIR_CONVERTERS[f"torch.aten.{_n}.float"] = _scalar_binary(_f)
    MLIR_CONVERTERS[f"torch.aten.{_n}"] = _scalar_binary(_f)
MLIR_CONVERTERS["torch.aten.floordiv.int"] = _scalar_binary(
    lambda a, b: sympy.floor(sympy.sympify(a) / b) if isinstance(a, sympy.Expr) or isinstance(b, sympy.Expr) else a // b)
MLIR_CONVERTERS["torch.aten.div.float"] = _scalar_binary(lambda a, b: a / b)
MLIR_CONVERTERS["torch.aten.neg.int"] = lambda cx, a: -_num(cx, a)
MLIR_CONVERTERS["torch.prim.max.int"] = _scalar_binary(lambda a, b: sympy.Max(a, b) if isinstance(a, sympy.Expr) or isinstance(b, sympy.Expr) else max(a, b))
MLIR_CONVERTERS["torch.prim.min.int"] = _scalar_binary(lambda a, b: sympy.Min(a, b) if isinstance(a, sympy.Expr) or isinstance(b, sympy.Expr) else min(a, b))


def _scalar_compare(fn):
    def conv(cx, a, b):
        r = fn(sympy.sympify(_num(cx, a)), sympy.sympify(_num(cx, b)))
        if r not in (sympy.true, sympy.false):
            raise cx.unsupported(f"the comparison {r} of symbolic sizes is not decidable at import time")
        return bool(r)
    return conv


for _n, _f in {"eq": lambda a, b: sympy.Eq(a, b), "ne": lambda a, b: sympy.Ne(a, b), "lt": lambda a, b: a < b,
               "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}.items():
    MLIR_CONVERTERS[f"torch.aten.{_n}.int"] = _scalar_compare(_f)


@_converts("aten.size.int")
def _size_int(cx, x, dim):
    return x.type.shape[cx.axis(dim, x.type.rank)]


@_converts("aten.dim")
def _dim(cx, x):
    return x.type.rank


@_converts("aten.numel")
def _numel(cx, x):
    return as_dim(numel(x.type.shape))


@_converts("prim.ListConstruct", "prim.TupleConstruct")
def _list(cx, *items):
    return list(items)


@_converts("prim.ListUnpack", "prim.TupleUnpack")
def _unpack(cx, items):
    return tuple(items)


@_converts("aten.__getitem__.t")
def _getitem(cx, items, i):
    return items[_static_int(cx, i, "index")]


@_converts("torch.derefine")
def _identity_scalar(cx, x):
    return x


@_converts("prim.NumToTensor.Scalar", "aten.scalar_tensor")
def _num_to_tensor(cx, s, *_):
    return cx.tensor(s, cx.result_dtype())


# -- elementwise ------------------------------------------------------------------------------------------------
def _arith(ir_op: str, alpha_arg: bool = False, reverse: bool = False):
    identity = {"add": 0, "sub": 0, "mul": 1, "div": 1}.get(ir_op)

    def conv(cx, a, b, alpha=1):
        dt = cx.result_dtype()
        if reverse:
            a, b = b, a
        if (identity is not None and isinstance(a, Value) and a.type.dtype is dt and not isinstance(b, Value)
                and not isinstance(b, bool) and isinstance(b, (int, float)) and b == identity):
            return a  # x + 0, x * 1: torch's position-id and addmm code is full of these
        if alpha_arg and alpha != 1:
            b = cx.emit("mul", [cx.tensor(b, dt), cx.tensor(alpha, dt)]) if isinstance(b, Value) else b * alpha
        return cx.emit(ir_op, [cx.tensor(a, dt), cx.tensor(b, dt)])
    return conv


for _n in ("add", "sub"):
    _converts(f"aten.{_n}.Tensor", f"aten.{_n}.Scalar")(_arith(_n, alpha_arg=True))
_converts("aten.rsub.Scalar", "aten.rsub.Tensor")(_arith("sub", alpha_arg=True, reverse=True))
for _n in ("mul", "div"):
    _converts(f"aten.{_n}.Tensor", f"aten.{_n}.Scalar")(_arith(_n))
_converts("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar")(_arith("pow"))
_converts("aten.maximum")(_arith("maximum"))
_converts("aten.minimum")(_arith("minimum"))


def _floor_f32(cx, q):
    """floor of a float tensor: the int cast truncates toward zero, so step down where that rounded up."""
    t = cx.cast(cx.cast(q, DType.i64), q.type.dtype)
    return cx.emit("where", [cx.emit("lt", [q, t]), cx.emit("sub", [t, cx.const(1, q.type.dtype)]), t])


def _int_div(cx, a, b, mode):
    """Integer division through f32, exact while |a| < 2**24 (then the f32 quotient truncates right)."""
    a, b = cx.tensor(a, DType.i64), cx.tensor(b, DType.i64)
    q = cx.cast(cx.emit("div", [cx.cast(a, DType.f32), cx.cast(b, DType.f32)]), DType.i64)
    if mode == "trunc":
        return q
    r = cx.emit("sub", [a, cx.emit("mul", [q, b])])
    zero = cx.const(0, DType.i64)
    off = cx.emit("logical_and", [cx.emit("ne", [r, zero]),
                                  cx.emit("ne", [cx.emit("lt", [r, zero]), cx.emit("lt", [b, zero])])])
    return cx.emit("where", [off, cx.emit("sub", [q, cx.const(1, DType.i64)]), q])


@_converts("aten.div.Tensor_mode", "aten.div.Scalar_mode", "aten.floor_divide", "aten.floor_divide.Scalar")
def _div_mode(cx, a, b, mode="floor"):
    dt = cx.result_dtype()
    if mode is None:
        return _arith("div")(cx, a, b)
    if dt.is_int:
        return cx.cast(_int_div(cx, a, b, mode), dt)
    if mode not in ("trunc", "floor"):
        raise cx.error(f"unknown rounding_mode {mode!r}")
    q = cx.emit("div", [cx.tensor(a, dt), cx.tensor(b, dt)])
    return cx.cast(cx.cast(q, DType.i64), dt) if mode == "trunc" else _floor_f32(cx, q)


@_converts("aten.remainder.Scalar", "aten.remainder.Tensor")
def _remainder(cx, a, b):
    """a - floor(a / b) * b, with the sign of b (python's %)."""
    dt = cx.result_dtype()
    q = _div_mode(cx, a, b, "floor")
    return cx.emit("sub", [cx.tensor(a, dt), cx.emit("mul", [cx.cast(q, dt), cx.tensor(b, dt)])])


def _compare(ir_op: str):
    def conv(cx, a, b):
        dt = promote(a, b)
        return cx.emit(ir_op, [cx.tensor(a, dt), cx.tensor(b, dt)])
    return conv


for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    _converts(f"aten.{_n}.Tensor", f"aten.{_n}.Scalar")(_compare(_n))


def _logical(ir_op: str):
    def conv(cx, a, b):
        if cx.result_dtype() is not DType.bool:
            raise cx.unsupported(f"bitwise ops on {cx.result_dtype()} tensors have no IR op (only bool)")
        return cx.emit(ir_op, [cx.tensor(a, DType.bool), cx.tensor(b, DType.bool)])
    return conv


_converts("aten.bitwise_and.Tensor", "aten.logical_and", "aten.__and__.Tensor")(_logical("logical_and"))
_converts("aten.bitwise_or.Tensor", "aten.logical_or", "aten.__or__.Tensor")(_logical("logical_or"))


@_converts("aten.logical_not", "aten.bitwise_not")
def _not(cx, x):
    if cx.op.name == "torch.aten.bitwise_not" and x.type.dtype is not DType.bool:
        raise cx.unsupported(f"bitwise_not of {x.type.dtype} has no IR op (only bool)")
    return cx.emit("logical_not", [cx.tensor(x, DType.bool)])


def _unary(ir_op: str):
    def conv(cx, x, *_):
        return cx.emit(ir_op, [cx.tensor(x, cx.result_dtype())])
    return conv


for _n in ("neg", "abs", "relu", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sin", "cos", "erf",
           "sigmoid", "silu"):
    _converts(f"aten.{_n}")(_unary(_n))


@_converts("aten.gelu")
def _gelu(cx, x, approximate="none"):
    return cx.emit("gelu", [cx.tensor(x, cx.result_dtype())], approximate=approximate)


@_converts("aten.clamp", "aten.clamp_min", "aten.clamp_max")
def _clamp(cx, x, lo=None, hi=None):
    if cx.op.name == "torch.aten.clamp_max":
        lo, hi = None, lo
    dt = cx.result_dtype()
    return cx.emit("clip", [cx.tensor(x, dt)], min=None if lo is None else float(lo),
                   max=None if hi is None else float(hi))


@_converts("aten.clamp.Tensor")
def _clamp_tensor(cx, x, lo=None, hi=None):
    dt = cx.result_dtype()
    y = cx.tensor(x, dt)
    if lo is not None:
        y = cx.emit("maximum", [y, cx.tensor(lo, dt)])
    if hi is not None:
        y = cx.emit("minimum", [y, cx.tensor(hi, dt)])
    return y


@_converts("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(cx, cond, a, b):
    dt = cx.result_dtype()
    return cx.emit("where", [cx.tensor(cond, DType.bool), cx.tensor(a, dt), cx.tensor(b, dt)])


@_converts("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(cx, x, mask, value):
    dt = cx.result_dtype()
    return cx.emit("where", [cx.tensor(mask, DType.bool), cx.tensor(value, dt), cx.tensor(x, dt)])


@_converts("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other", "aten._to_copy",
           "prims.convert_element_type", "aten.type_as")
def _to(cx, x, *_):
    return cx.cast(x, cx.result_dtype())


@_converts("aten.clone", "aten.contiguous", "aten.detach", "aten.alias", "aten.lift_fresh_copy", "aten.dropout",
           "aten.copy")
def _identity(cx, x, *rest):
    if cx.op.name == "torch.aten.dropout" and rest and rest[1]:
        raise cx.unsupported("dropout in training mode")
    if cx.op.name == "torch.aten.copy":  # copy(self, src): the result is src in self's shape and dtype
        src = cx.tensor(rest[0], cx.result_dtype())
        return src if _same_shape(src.type.shape, x.type.shape) else cx.emit("broadcast_to", [src],
                                                                             shape=list(x.type.shape))
    return x


# -- creation --------------------------------------------------------------------------------------------------
def _int_bound(cx, v, what):
    if isinstance(v, float):
        if not v.is_integer():
            raise cx.unsupported(f"a fractional arange {what} ({v}) has no IR op")
        return int(v)
    return v


@_converts("aten.arange", "aten.arange.start", "aten.arange.start_step")
def _arange(cx, *args):
    n = {"torch.aten.arange": 1, "torch.aten.arange.start": 2}.get(cx.op.name, 3)
    vals = list(args[:n])
    start, end, step = ([0] + vals + [1])[:3] if n == 1 else (vals + [1])[:3]
    start, end = _int_bound(cx, start, "start"), _int_bound(cx, end, "end")
    step = _static_int(cx, _int_bound(cx, step, "step"), "arange step")
    return cx.emit("arange", [], start=start, end=end, step=step, dtype=cx.result_dtype())


def _shape_list(cx, size):
    return [as_dim(d) for d in size]


@_converts("aten.full")
def _full(cx, size, value, *_):
    return cx.emit("full", [], shape=_shape_list(cx, size), value=_fill_value(cx, value), dtype=cx.result_dtype())


def _fill_value(cx, v):
    if isinstance(v, sympy.Expr):
        if v.is_Number:
            return int(v) if v.is_Integer else float(v)
        raise cx.unsupported(f"a fill value that depends on sizes ({v})")
    if isinstance(v, Value):
        raise cx.unsupported("a fill value held in a tensor")
    return v


@_converts("aten.zeros", "aten.ones", "aten.empty.memory_format")
def _zeros(cx, size, *_):
    value = 1 if cx.op.name == "torch.aten.ones" else 0
    return cx.emit("full", [], shape=_shape_list(cx, size), value=value, dtype=cx.result_dtype())


@_converts("aten.zeros_like", "aten.ones_like", "aten.empty_like", "aten.full_like")
def _like(cx, x, *rest):
    value = {"torch.aten.ones_like": 1, "torch.aten.full_like": None}.get(cx.op.name, 0)
    if value is None:
        value = _fill_value(cx, rest[0])
    return cx.emit("full", [], shape=list(x.type.shape), value=value, dtype=cx.result_dtype())


@_converts("aten.new_zeros", "aten.new_ones", "aten.new_empty", "aten.new_full")
def _new(cx, x, size, *rest):
    value = {"torch.aten.new_ones": 1, "torch.aten.new_full": None}.get(cx.op.name, 0)
    if value is None:
        value = _fill_value(cx, rest[0])
    return cx.emit("full", [], shape=_shape_list(cx, size), value=value, dtype=cx.result_dtype())


@_converts("aten.fill.Scalar")
def _fill(cx, x, value):
    return cx.emit("full", [], shape=list(x.type.shape), value=_fill_value(cx, value), dtype=cx.result_dtype())


# -- linear algebra and nn -------------------------------------------------------------------------------------
@_converts("aten.mm", "aten.bmm", "aten.matmul")
def _matmul(cx, a, b):
    dt = cx.result_dtype()
    a, b = cx.tensor(a, dt), cx.tensor(b, dt)
    squeeze = []
    if a.type.rank == 1:
        a, squeeze = cx.emit("expand_dims", [a], axis=0), squeeze + [-2]
    if b.type.rank == 1:
        b, squeeze = cx.emit("expand_dims", [b], axis=1), squeeze + [-1]
    y = cx.emit("matmul", [a, b])
    if squeeze:
        y = cx.emit("squeeze", [y], axes=[normalize_axis(s, y.type.rank) for s in squeeze])
    return y


@_converts("aten.linear")
def _linear(cx, x, w, b=None):
    return cx.emit("linear", [x, w] + ([b] if b is not None else []))


@_converts("aten.addmm")
def _addmm(cx, bias, a, b, beta=1, alpha=1):
    dt = cx.result_dtype()
    y = cx.emit("matmul", [cx.tensor(a, dt), cx.tensor(b, dt)])
    if alpha != 1:
        y = cx.emit("mul", [y, cx.const(alpha, dt)])
    bias = cx.tensor(bias, dt)
    if beta != 1:
        bias = cx.emit("mul", [bias, cx.const(beta, dt)])
    return cx.emit("add", [bias, y])


@_converts("aten.embedding")
def _embedding(cx, weight, ids, *_):
    return cx.emit("embedding", [weight, ids])


@_converts("aten.layer_norm")
def _layer_norm(cx, x, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    ndim = len(normalized_shape)
    if weight is None and bias is not None:
        return cx.emit("add", [cx.emit("layer_norm", [x], eps=float(eps), ndim=ndim), bias])
    inputs = [x] + [t for t in (weight, bias) if t is not None]
    return cx.emit("layer_norm", inputs, eps=float(eps), ndim=ndim)


@_converts("aten.rms_norm")
def _rms_norm(cx, x, normalized_shape, weight=None, eps=None):
    if eps is None:  # torch uses the dtype's machine epsilon
        eps = float(np.finfo(x.type.dtype.numpy).eps) if x.type.dtype is not DType.bf16 else 2.0 ** -7
    return cx.emit("rms_norm", [x] + ([weight] if weight is not None else []), eps=float(eps),
                   ndim=len(normalized_shape))


@_converts("aten.scaled_dot_product_attention")
def _sdpa(cx, q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise cx.unsupported(f"attention dropout (dropout_p={dropout_p})")
    if mask is not None and mask.type.dtype is not DType.bool:
        mask = cx.cast(mask, q.type.dtype)
    return cx.emit("sdpa", [q, k, v] + ([mask] if mask is not None else []), is_causal=bool(is_causal),
                   scale=None if scale is None else float(scale))


@_converts("aten.softmax.int", "aten._softmax", "aten.log_softmax.int", "aten._log_softmax")
def _softmax(cx, x, dim, _dtype_or_half=None):
    op = "log_softmax" if "log_softmax" in cx.op.name else "softmax"
    return cx.emit(op, [cx.tensor(x, cx.result_dtype())], axis=cx.axis(dim, x.type.rank))


# -- reductions ------------------------------------------------------------------------------------------------
def _axes(cx, dims, rank):
    if dims is None or (isinstance(dims, list) and not dims):
        return list(range(rank))
    dims = dims if isinstance(dims, list) else [dims]
    return sorted({cx.axis(d, rank) for d in dims})


@_converts("aten.sum.dim_IntList", "aten.mean.dim", "aten.sum", "aten.mean", "aten.prod.dim_int")
def _sum(cx, x, dims=None, keepdim=False, *_):
    op = cx.op.name.split(".")[2]
    if cx.op.name in ("torch.aten.sum", "torch.aten.mean"):  # sum(x, dtype)
        dims, keepdim = None, False
    if op == "prod":
        dims = [dims]
    return cx.emit(op, [cx.tensor(x, cx.result_dtype())], axes=_axes(cx, dims, x.type.rank), keepdims=bool(keepdim))


@_converts("aten.amax", "aten.amin")
def _amax(cx, x, dims=None, keepdim=False):
    op = "max" if cx.op.name.endswith("amax") else "min"
    return cx.emit(op, [x], axes=_axes(cx, dims, x.type.rank), keepdims=bool(keepdim))


@_converts("aten.max.dim")
def _max_dim(cx, x, dim, keepdim=False):
    ax = cx.axis(dim, x.type.rank)
    return (cx.emit("max", [x], axes=[ax], keepdims=bool(keepdim)),
            cx.emit("argmax", [x], axis=ax, keepdims=bool(keepdim)))


@_converts("aten.argmax")
def _argmax(cx, x, dim=None, keepdim=False):
    if dim is None:
        flat = cx.emit("reshape", [x], shape=[as_dim(numel(x.type.shape))])
        y = cx.emit("argmax", [flat], axis=0, keepdims=False)
        return cx.emit("reshape", [y], shape=[1] * x.type.rank) if keepdim else y
    return cx.emit("argmax", [x], axis=cx.axis(dim, x.type.rank), keepdims=bool(keepdim))


@_converts("aten.cumsum")
def _cumsum(cx, x, dim, dtype=None):
    return cx.emit("cumsum", [x], axis=cx.axis(dim, x.type.rank), dtype=cx.result_dtype())


# -- shapes ----------------------------------------------------------------------------------------------------
def _reshape(cx, x, shape):
    shape = [as_dim(d) for d in shape]
    holes = [i for i, d in enumerate(shape) if isinstance(d, int) and d == -1]
    if len(holes) > 1:
        raise cx.error(f"at most one -1 in a view shape, got {shape}")
    if holes:
        rest = numel(d for i, d in enumerate(shape) if i != holes[0])
        shape[holes[0]] = as_dim(numel(x.type.shape) / rest)
    if _same_shape(shape, x.type.shape):
        return x
    return cx.emit("reshape", [x], shape=shape)


_converts("aten.view", "aten.reshape", "aten._unsafe_view", "aten._reshape_alias")(
    lambda cx, x, shape, *_: _reshape(cx, x, shape))


@_converts("aten.flatten.using_ints")
def _flatten(cx, x, start=0, end=-1):
    if x.type.rank == 0:
        return _reshape(cx, x, [1])
    s, e = cx.axis(start, x.type.rank), cx.axis(end, x.type.rank)
    shape = list(x.type.shape)
    return _reshape(cx, x, shape[:s] + [as_dim(numel(shape[s:e + 1]))] + shape[e + 1:])


@_converts("aten.unflatten.int")
def _unflatten(cx, x, dim, sizes):
    d = cx.axis(dim, x.type.rank)
    shape = list(x.type.shape)
    inner = [as_dim(s) for s in sizes]
    if any(isinstance(s, int) and s == -1 for s in inner):
        k = next(i for i, s in enumerate(inner) if isinstance(s, int) and s == -1)
        inner[k] = as_dim(shape[d] / numel(s for i, s in enumerate(inner) if i != k))
    return _reshape(cx, x, shape[:d] + inner + shape[d + 1:])


@_converts("aten.permute")
def _permute(cx, x, dims):
    perm = [cx.axis(d, x.type.rank) for d in dims]
    return x if perm == list(range(x.type.rank)) else cx.emit("permute", [x], perm=perm)


@_converts("aten.transpose.int")
def _transpose(cx, x, a, b):
    perm = list(range(x.type.rank))
    a, b = cx.axis(a, x.type.rank), cx.axis(b, x.type.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(cx, x, perm)


@_converts("aten.t", "aten.numpy_T")
def _t(cx, x):
    return _permute(cx, x, list(reversed(range(x.type.rank))))


@_converts("aten.unsqueeze")
def _unsqueeze(cx, x, dim):
    return cx.emit("expand_dims", [x], axis=normalize_axis(int(dim), x.type.rank + 1))


@_converts("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze")
def _squeeze(cx, x, dims=None):
    if dims is None:
        axes = list(range(x.type.rank))
    else:
        axes = [cx.axis(d, x.type.rank) for d in (dims if isinstance(dims, list) else [dims])]
    # torch leaves dims of size != 1 alone; a symbolic dim is assumed not to be 1 (it may be at run time only)
    axes = [a for a in axes if isinstance(x.type.shape[a], int) and x.type.shape[a] == 1]
    return cx.emit("squeeze", [x], axes=axes) if axes else x


def _broadcast(cx, x, sizes):
    sizes = [as_dim(s) for s in sizes]
    lead = len(sizes) - x.type.rank
    if lead < 0:
        raise cx.error(f"cannot expand {x.type} to {len(sizes)} dims")
    shape = [x.type.shape[i - lead] if isinstance(s, int) and s == -1 and i >= lead else s
             for i, s in enumerate(sizes)]
    return x if _same_shape(shape, x.type.shape) else cx.emit("broadcast_to", [x], shape=shape)


_converts("aten.expand", "aten.broadcast_to")(lambda cx, x, sizes, *_: _broadcast(cx, x, sizes))
_converts("aten.expand_as")(lambda cx, x, other: _broadcast(cx, x, list(other.type.shape)))


def _clamp_index(v, size, default):
    """A torch slice bound made non-negative and at most ``size`` (which may be symbolic)."""
    if v is None or (isinstance(v, int) and v >= 2 ** 62):
        return default
    v = as_dim(v)
    if isinstance(v, int) and v < 0:
        v = as_dim(size + v)
        if isinstance(v, int) and v < 0:
            return 0
    over = as_dim(v - size) if not (isinstance(v, int) and isinstance(size, int)) else v - size
    if isinstance(over, int) and over >= 0:
        return size
    return v


@_converts("aten.slice.Tensor")
def _slice(cx, x, dim=0, start=None, end=None, step=1):
    ax = cx.axis(dim, x.type.rank)
    size = x.type.shape[ax]
    s, e = _clamp_index(start, size, 0), _clamp_index(end, size, size)
    step = _static_int(cx, step, "slice step")
    if isinstance(s, int) and s == 0 and dims_equal(e, size) and step == 1:
        return x
    return cx.emit("slice", [x], axis=ax, start=s, end=e, step=step)


@_converts("aten.narrow")
def _narrow(cx, x, dim, start, length):
    return _slice(cx, x, dim, start, as_dim(start + length), 1)


@_converts("aten.select.int")
def _select(cx, x, dim, index):
    ax = cx.axis(dim, x.type.rank)
    i = as_dim(index)
    if isinstance(i, int) and i < 0:
        i = as_dim(x.type.shape[ax] + i)
    y = cx.emit("slice", [x], axis=ax, start=i, end=as_dim(i + 1), step=1)
    return cx.emit("squeeze", [y], axes=[ax])


@_converts("aten.cat", "aten.concat")
def _cat(cx, xs, dim=0):
    dt = cx.result_dtype()
    xs = [cx.tensor(x, dt) for x in xs]
    return xs[0] if len(xs) == 1 else cx.emit("concat", xs, axis=cx.axis(dim, xs[0].type.rank))


@_converts("aten.stack")
def _stack(cx, xs, dim=0):
    ax = normalize_axis(int(dim), xs[0].type.rank + 1)
    return _cat(cx, [cx.emit("expand_dims", [x], axis=ax) for x in xs], ax)


def _split_sizes(cx, x, ax, size):
    total = x.type.shape[ax]
    if not isinstance(total, int):
        raise cx.unsupported(f"splitting symbolic dim {total} into pieces of {size}")
    size = _static_int(cx, size, "split size")
    return [min(size, total - i) for i in range(0, total, size)] or [0]


@_converts("aten.split.Tensor", "aten.split_with_sizes", "aten.split.sizes", "aten.chunk", "aten.unbind.int")
def _split(cx, x, sizes=1, dim=0):
    name = cx.op.name
    if name == "torch.aten.unbind.int":
        sizes, dim = 1, sizes
    ax = cx.axis(dim, x.type.rank)
    if name == "torch.aten.chunk":
        total = x.type.shape[ax]
        if not isinstance(total, int):
            raise cx.unsupported(f"chunking symbolic dim {total}")
        sizes = -(-total // _static_int(cx, sizes, "chunks"))
    if not isinstance(sizes, list):
        sizes = _split_sizes(cx, x, ax, sizes)
    sizes = [as_dim(s) for s in sizes]
    parts = cx.emit("split", [x], axis=ax, sizes=sizes)
    parts = list(parts) if isinstance(parts, tuple) else [parts]
    if name == "torch.aten.unbind.int":
        parts = [cx.emit("squeeze", [p], axes=[ax]) for p in parts]
    return parts


@_converts("aten.index_select")
def _index_select(cx, x, dim, index):
    return cx.emit("take", [x, index], axis=cx.axis(dim, x.type.rank))


@_converts("aten.gather")
def _gather(cx, x, dim, index, *_):
    return cx.emit("gather", [x, index], axis=cx.axis(dim, x.type.rank))


@_converts("aten.index.Tensor_hacked_twin", "aten.index.Tensor", "aten._unsafe_index.Tensor")
def _index(cx, x, indices):
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used:
        return x
    if used == list(range(len(used))):
        return cx.emit("index", [x] + [indices[i] for i in used])
    if len(used) == 1:  # x[:, ..., idx]: one index tensor replaces its dim, as numpy.take
        return cx.emit("take", [x, indices[used[0]]], axis=used[0])
    raise cx.unsupported(f"advanced indexing with index tensors at dims {used} (only leading dims or a single dim)")
