"""What a converter sees: the torch node being converted and helpers that build IR with its location."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

from llmasos.ir import DType, Graph, TensorType, Value
from llmasos.ir.torch_dtypes import dtype_from_torch, dtype_to_torch

from ..errors import FrontendError


class SymbolTable:
    """Maps torch's shape symbols (s0, s43, ...) to the IR's named symbols (batch, seq, ...)."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)  # torch sympy.Symbol -> IR sympy.Symbol
        self._cache: dict = {}

    def dim(self, d, what: str = "dim"):
        """An IR dim (int or sympy expression over IR symbols) from an int, SymInt or torch sympy expr."""
        if isinstance(d, (bool, np.bool_)):
            return int(d)
        if isinstance(d, (int, np.integer)):
            return int(d)
        if isinstance(d, (torch.SymInt, torch.SymFloat)):
            expr = d.node.expr
        elif isinstance(d, sympy.Basic):
            expr = d
        else:
            raise FrontendError(f"{what} must be an int or a SymInt, got {type(d).__name__} {d!r}")
        if expr in self._cache:
            return self._cache[expr]
        out = self._cache[expr] = self._convert(expr, what)
        return out

    def _convert(self, expr, what: str):
        expr = _translate(sympy.sympify(expr)).xreplace(self.mapping)
        unknown = {s for s in expr.free_symbols if s not in self.mapping.values()}
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise FrontendError(f"{what} {expr} depends on data-dependent or unknown symbol(s) {names}; only "
                                f"input sizes may be symbolic (torch.export names data-dependent sizes u0, u1...)")
        if expr.is_Integer:
            return int(expr)
        if expr.is_Float or expr.is_Rational:
            return float(expr)
        return expr


def _translate(expr):
    """torch's integer sympy functions (FloorDiv, Mod, Max...) as plain sympy, which the IR understands."""
    if not expr.args:
        return expr
    args = [_translate(a) for a in expr.args]
    if isinstance(expr, torch_sympy.FloorDiv):  # includes CleanDiv
        return sympy.floor(args[0] / args[1])
    if isinstance(expr, torch_sympy.CeilDiv):
        return sympy.ceiling(args[0] / args[1])
    if isinstance(expr, (torch_sympy.Mod, torch_sympy.PythonMod)):
        return sympy.Mod(args[0], args[1])
    if isinstance(expr, torch_sympy.Max):
        return sympy.Max(*args)
    if isinstance(expr, torch_sympy.Min):
        return sympy.Min(*args)
    if isinstance(expr, torch_sympy.PowByNatural):
        return args[0] ** args[1]
    if isinstance(expr, (torch_sympy.CeilToInt,)):
        return sympy.ceiling(args[0])
    if isinstance(expr, (torch_sympy.FloorToInt,)):
        return sympy.floor(args[0])
    if isinstance(expr, (torch_sympy.IntTrueDiv, torch_sympy.FloatTrueDiv)):
        return args[0] / args[1]
    if isinstance(expr, (torch_sympy.ToFloat, torch_sympy.Identity)):
        return args[0]
    return expr.func(*args)


def is_dim(x) -> bool:
    return isinstance(x, (int, np.integer, sympy.Expr)) and not isinstance(x, (bool, np.bool_))


class ConvertContext:
    """Built per torch node. Converters use ``emit``, ``const``, ``cast``, ``as_value`` and the result metadata."""

    def __init__(self, graph: Graph, symbols: SymbolTable, node, loc: Optional[str], module_path: Optional[str]):
        self.graph = graph
        self.symbols = symbols
        self.node = node  # the torch.fx.Node being converted
        self.loc = loc
        self.module_path = module_path
        self.emitted: list = []  # IR nodes built for this torch node
        self._out_types: dict = {}

    # -- the torch node's result ------------------------------------------------------------------
    @property
    def meta(self):
        return self.node.meta.get("val")

    def out_type(self, index: Optional[int] = None) -> TensorType:
        """The IR type of the node's result (``index`` picks one of several results)."""
        if index not in self._out_types:
            val = self.meta if index is None else self.meta[index]
            self._out_types[index] = self.type_of(val)
        return self._out_types[index]

    def type_of(self, fake) -> TensorType:
        return TensorType(tuple(self.dim(d) for d in fake.shape), dtype_from_torch(fake.dtype))

    @property
    def out_dtype(self) -> DType:
        return self.out_type().dtype

    @property
    def out_shape(self) -> tuple:
        return self.out_type().shape

    def dim(self, d):
        return self.symbols.dim(d, what=f"a size in %{self.node.name}")

    # -- building IR --------------------------------------------------------------------------------
    def emit(self, op: str, inputs: Sequence[Value], **attrs):
        """Append an IR node at this torch node's location; returns its Value (tuple for multi-result ops)."""
        out = self.graph.add_node(op, list(inputs), attrs, loc=self.loc, name=f"{self.node.name}_{op}")
        self.emitted.append(self.graph.nodes[-1])
        return out

    def const(self, value, dtype: DType) -> Value:
        """A small inline constant (python scalar or array) of ``dtype``."""
        arr = np.asarray(value)
        if dtype is DType.bool:
            arr = arr.astype(np.bool_)
        else:
            arr = arr.astype(dtype.numpy)
        return self.emit("const", [], value=arr, dtype=dtype)

    def cast(self, v: Value, dtype: DType) -> Value:
        if v.type.dtype is dtype:
            return v
        return self.emit("cast", [v], dtype=dtype)

    def as_value(self, x, dtype: Optional[DType] = None) -> Value:
        """``x`` as a Value of ``dtype``: Values are cast, python scalars become consts, symbolic ints become
        a 0-d tensor holding the dim's runtime value (arange(d, d+1) reshaped to [])."""
        if isinstance(x, Value):
            return x if dtype is None else self.cast(x, dtype)
        if isinstance(x, sympy.Expr) and not x.is_Number:
            v = self._materialize(x)
            return v if dtype is None else self.cast(v, dtype)
        if isinstance(x, sympy.Expr):
            x = int(x) if x.is_Integer else float(x)
        if dtype is None:
            dtype = DType.bool if isinstance(x, bool) else DType.i64 if isinstance(x, int) else DType.f32
        if isinstance(x, float) and dtype.is_int:
            raise FrontendError(f"%{self.node.name}: float scalar {x} cannot be an {dtype} operand")
        return self.const(x, dtype)

    def _materialize(self, e) -> Value:
        """A 0-d tensor holding the runtime value of a symbolic scalar: integer expressions read it off an
        arange(e, e+1); float ones (seq * 0.5) are built from their integer parts with IR arithmetic."""
        if e.is_integer:
            v = self.emit("arange", [], start=e, end=e + 1, step=1, dtype=DType.i64)
            return self.emit("reshape", [v], shape=[])
        if e.is_Number:
            return self.const(float(e), DType.f32)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            op = "add" if isinstance(e, sympy.Add) else "mul"
            parts = [self.cast(self._materialize(a), DType.f32) for a in e.args]
            out = parts[0]
            for p in parts[1:]:
                out = self.emit(op, [out, p])
            return out
        if isinstance(e, sympy.Pow) and e.exp.is_Number:
            base = self.cast(self._materialize(e.base), DType.f32)
            return self.emit("pow", [base, self.const(float(e.exp), DType.f32)])
        raise self.error(f"cannot compute the symbolic scalar {e} with IR ops")

    def promote(self, a, b) -> DType:
        """torch's type promotion of two operands (Values or python scalars; 0-d tensors rank below others)."""
        def proxy(x):
            if isinstance(x, Value):
                return torch.empty(() if x.type.rank == 0 else (1,), dtype=dtype_to_torch(x.type.dtype))
            if isinstance(x, sympy.Expr):
                return 1 if x.is_integer else 1.0
            return x

        return dtype_from_torch(torch.result_type(proxy(a), proxy(b)))

    def error(self, message: str) -> FrontendError:
        where = f" at {self.loc}" if self.loc else ""
        return FrontendError(f"%{self.node.name} = {self.node.target}{where}: {message}")
