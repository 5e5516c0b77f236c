"""The declarative op registry.

An op is declared once: operand names, attribute schema, a type rule (``infer``) and reference semantics
(``ref``, numpy). Everything else about an op -- TVM lowering, cost, quantisation, sharding -- lives in
tables keyed by the op name elsewhere, so plugins add entries without touching this file.

The registry never imports its entries: ``llmasos/ir/__init__.py`` imports this module, then ``opset``
(whose modules call ``defop`` here), before anything that looks ops up, so importing any part of
``llmasos.ir`` yields the full built-in op set and the import graph has no registry <-> entries cycle.

Operand names: ``"x"`` is required, ``"bias?"`` optional (only trailing), ``"*xs"`` variadic (last).
``infer(*types, **attrs)`` returns a TensorType or a tuple of them; ``ref(*arrays, **attrs)`` returns an
array or a tuple, with symbolic dims in attrs already evaluated to ints.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .types import DType, TensorType, as_dim


class OpError(ValueError):
    """A bad op use: unknown op, wrong arity or attrs, or a type rule violation."""


REQUIRED = object()

# Attribute kinds: how the verifier checks a value and how the printer writes it.
ATTR_KINDS = ("int", "float", "bool", "str", "dtype", "ints", "dim", "dims", "scalar", "tensor")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    optional: bool = False  # None is an allowed value
    choices: Optional[tuple] = None

    def __post_init__(self):
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attr kind {self.kind!r}")

    def check(self, value: Any) -> Optional[str]:
        """None if ``value`` fits this attr, else what is wrong."""
        if value is None:
            return None if self.optional else "must not be None"
        k = self.kind
        ok = {
            "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (float, int, np.floating)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, (bool, np.bool_)),
            "str": lambda v: isinstance(v, str),
            "dtype": lambda v: isinstance(v, DType),
            "ints": lambda v: isinstance(v, (list, tuple)) and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in v),
            "dim": lambda v: _is_dim(v),
            "dims": lambda v: isinstance(v, (list, tuple)) and all(_is_dim(i) for i in v),
            "scalar": lambda v: isinstance(v, (int, float, bool, np.number, np.bool_)),
            "tensor": lambda v: isinstance(v, np.ndarray),
        }[k](value)
        if not ok:
            return f"expected {k}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        return None


def _is_dim(v) -> bool:
    try:
        as_dim(v)
        return not isinstance(v, str)
    except TypeError:
        return False


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple
    infer: Callable
    ref: Callable
    attrs: dict = field(default_factory=dict)
    doc: str = ""

    # -- operand arity --------------------------------------------------------------------------
    @property
    def min_operands(self) -> int:
        return sum(1 for o in self.operands if not o.endswith("?") and not o.startswith("*"))

    @property
    def max_operands(self) -> Optional[int]:
        return None if any(o.startswith("*") for o in self.operands) else len(self.operands)

    def arity_error(self, n: int) -> Optional[str]:
        lo, hi = self.min_operands, self.max_operands
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return f"takes {want} operands ({', '.join(self.operands)}), got {n}"
        return None

    # -- attributes ------------------------------------------------------------------------------
    def complete_attrs(self, attrs: dict, loc: Optional[str] = None) -> dict:
        """Attrs with defaults filled in; raises naming the op for unknown, missing or ill-typed ones."""
        where = f" [from {loc}]" if loc else ""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"op '{self.name}'{where}: unknown attribute(s) {sorted(unknown)}; "
                          f"it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for k, spec in self.attrs.items():
            if k in attrs:
                v = attrs[k]
            elif spec.default is not REQUIRED:
                v = spec.default
            else:
                raise OpError(f"op '{self.name}'{where}: missing required attribute '{k}'")
            problem = spec.check(v)
            if problem:
                raise OpError(f"op '{self.name}'{where}: attribute '{k}' {problem}")
            out[k] = normalize_attr(spec.kind, v)
        return out

    def infer_types(self, types: list, attrs: dict) -> tuple:
        problem = self.arity_error(len(types))
        if problem:
            raise OpError(f"op '{self.name}' {problem}")
        out = self.infer(*types, **attrs)
        return (out,) if isinstance(out, TensorType) else tuple(out)


def normalize_attr(kind: str, v: Any) -> Any:
    if v is None:
        return None
    if kind == "int":
        return int(v)
    if kind == "float":
        return float(v)
    if kind == "bool":
        return bool(v)
    if kind == "ints":
        return [int(i) for i in v]
    if kind == "dim":
        return as_dim(v)
    if kind == "dims":
        return [as_dim(i) for i in v]
    if kind == "scalar":
        return v.item() if isinstance(v, (np.number, np.bool_)) else v
    return v


OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef, *, replace: bool = False) -> OpDef:
    if opdef.name in OPS and not replace:
        raise OpError(f"op '{opdef.name}' is already registered")
    OPS[opdef.name] = opdef
    return opdef


def defop(name: str, operands, infer: Callable, ref: Callable, attrs: Optional[dict] = None,
          doc: str = "") -> OpDef:
    return register_op(OpDef(name, tuple(operands), infer, ref, dict(attrs or {}), doc))


def get_op(name: str, loc: Optional[str] = None) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        close = difflib.get_close_matches(name, OPS, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        where = f" [from {loc}]" if loc else ""
        raise OpError(f"unknown op '{name}'{where}{hint}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(OPS)
