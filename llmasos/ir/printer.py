"""The canonical text form of a graph; ``llmasos.ir.parser.parse`` reads it back.

Canonical means: ``print_graph(parse(print_graph(g), params=g.param_data))`` equals ``print_graph(g)``
and the parsed graph equals ``g`` (``graph_diff``). Hence every attribute is printed (defaults too),
floats are printed so that they read back bit-exactly, and dims are printed in a form whose parse is
structurally the same sympy expression (sympy's ``floor(x/2)`` is written ``x//2``).
"""
from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy

from .types import DType, TensorType, dim_str

if TYPE_CHECKING:  # annotations only: graph.py imports this module (Graph.__str__ prints)
    from .graph import Graph, Node, Value

INDENT = "  "


def print_graph(g: Graph) -> str:
    ins = ", ".join(_binding(v) for v in g.inputs)
    lines = [f"graph @{g.name}({ins}) {{"]
    for name, (lo, hi) in g.symbols.items():
        lines.append(INDENT + print_symbol(name, lo, hi))
    for axis, size in getattr(g, "mesh", {}).items():
        lines.append(f"{INDENT}mesh {axis} = {size}")
    for v in g.params.values():
        lines.append(f"{INDENT}param {_binding(v)}")
    for n in g.nodes:
        lines.append(INDENT + print_node(n))
    rets = ", ".join(f"%{v.name}" for v in g.outputs)
    lines.append(f"{INDENT}return {rets}" if rets else f"{INDENT}return")
    lines.append("}")
    return "\n".join(lines)


def print_symbol(name: str, lo, hi) -> str:
    if lo is None and hi is None:
        return f"symbol {name}"
    return f"symbol {name} in [{'?' if lo is None else lo}, {'?' if hi is None else hi}]"


def print_node(n: Node) -> str:
    outs = ", ".join(_binding(o) for o in n.outputs)
    ins = ", ".join(f"%{v.name}" for v in n.inputs)
    text = f"{outs} = {n.op}({ins})"
    if n.attrs:
        text += " {" + ", ".join(f"{k} = {print_attr(n.attrs[k])}" for k in sorted(n.attrs)) + "}"
    if n.loc is not None:
        text += f" loc({_quote(n.loc)})"
    return text


def _binding(v: Value) -> str:
    s = getattr(v, "sharding", None)
    return f"%{v.name}: {print_type(v.type)}" + ("" if s is None else f" {s}")


@functools.lru_cache(maxsize=4096)
def print_type(t: TensorType) -> str:
    return f"{t.dtype}[{', '.join(print_dim(d) for d in t.shape)}]"


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


# -- attribute values -------------------------------------------------------------------------------
# Printed by python type, not by the op's schema, so that a scalar attr keeps int/float/bool apart and
# the printer never needs the registry; the parser reads values back through the schema.

def print_attr(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # repr is the shortest text that reads back to the same double
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, np.ndarray):
        return print_dense(v)
    if isinstance(v, sympy.Expr):
        return print_dim(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(print_attr(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r} of type {type(v).__name__}")


def print_dense(a: np.ndarray) -> str:
    dt = _dtype_of_array(a)
    native = np.asarray(a, dtype=dt.numpy)
    shape = ", ".join(str(n) for n in native.shape)
    if dt is DType.bool:
        vals = ["true" if x else "false" for x in native.reshape(-1).tolist()]
    elif dt.is_int:
        vals = [str(x) for x in native.reshape(-1).astype(np.int64).tolist()]
    else:
        flat = native.reshape(-1)
        vals = [_float_text(x, float(w), dt) for x, w in zip(flat, flat.astype(np.float64).tolist())]
    return f"dense<{dt}[{shape}] [{', '.join(vals)}]>"


def _dtype_of_array(a: np.ndarray) -> DType:
    for dt in DType:
        if dt.numpy == a.dtype:
            return dt
    # a float64 or other foreign array (the verifier rejects those): print it in the nearest IR dtype
    if a.dtype.kind == "f":
        return DType.f32
    if a.dtype.kind in "iu":
        return DType.i64
    raise TypeError(f"cannot print a constant of numpy dtype {a.dtype}")


def _float_text(native, wide: float, dt: DType) -> str:
    """The shortest decimal that reads back (via a double) to exactly ``native``; else the exact double."""
    if math.isnan(wide) or math.isinf(wide):
        return repr(wide)
    try:
        short = repr(float(str(native)))  # numpy/ml_dtypes print a short decimal for their own type
    except ValueError:
        return repr(wide)
    back = np.array(float(short)).astype(dt.numpy)
    if float(back) == wide and math.copysign(1.0, float(back)) == math.copysign(1.0, wide):
        return short
    return repr(wide)


# -- dims -------------------------------------------------------------------------------------------
# Precedence levels of the dim grammar (Python's): a sub-expression printed below the level its
# position needs gets parentheses.
_ADD, _MUL, _UNARY, _ATOM = 1, 2, 3, 4


class _Unprintable(Exception):
    pass


@functools.lru_cache(maxsize=8192)
def print_dim(d) -> str:
    """A dim as the text grammar writes it: ints, symbols, + - * // % and min(...)/max(...).

    A sympy ceiling(p/q) is written ``-((-p)//q)``, which the parser reads back as the ceiling. Dims
    outside that language (non-integer coefficients, say) fall back to sympy's text, which the parser
    rejects with a located error rather than misreading.
    """
    if isinstance(d, (int, np.integer)):
        return str(int(d))
    try:
        return _fmt(d)[0]
    except _Unprintable:
        return dim_str(d)


def _wrap(e, level: int) -> str:
    text, prec = _fmt(e)
    return text if prec >= level else f"({text})"


def _fmt(e) -> tuple[str, int]:
    if isinstance(e, int) or e.is_Integer:
        v = int(e)
        return str(v), (_ATOM if v >= 0 else _UNARY)
    if e.is_Symbol:
        return e.name, _ATOM
    if e.is_Add:
        terms = e.as_ordered_terms()
        text = _wrap(terms[0], _ADD)
        for t in terms[1:]:
            if _is_negative(t):
                text += "-" + _wrap(-t, _MUL)
            else:
                text += "+" + _wrap(t, _MUL)
        return text, _ADD
    if e.is_Mul or e.is_Pow:
        return _fmt_product(e)
    if isinstance(e, sympy.floor):
        return _floordiv(e.args[0]), _MUL
    if isinstance(e, sympy.ceiling):
        # ceiling(a) == -floor(-a); the parser turns "-(x//q)" back into a ceiling
        return f"-({_floordiv(-e.args[0])})", _UNARY
    if isinstance(e, sympy.Mod):
        p, q = e.args
        return f"{_wrap(p, _MUL)}%{_wrap(q, _UNARY)}", _MUL
    if isinstance(e, (sympy.Min, sympy.Max)):
        name = "min" if isinstance(e, sympy.Min) else "max"
        return f"{name}({', '.join(_fmt(a)[0] for a in e.args)})", _ATOM
    raise _Unprintable(e)


def _is_negative(t) -> bool:
    c = t.as_coeff_Mul()[0]
    return bool(c.is_negative)


def _fmt_product(e) -> tuple[str, int]:
    c, rest = e.as_coeff_Mul()
    if not c.is_Integer:
        raise _Unprintable(e)
    factors = []
    for f in rest.as_ordered_factors():
        if f.is_Pow:
            if not (f.exp.is_Integer and f.exp > 0):
                raise _Unprintable(e)
            factors.extend([f.base] * int(f.exp))
        elif f != 1:
            factors.append(f)
    c = int(c)
    if not factors:
        return _fmt(sympy.Integer(c))
    if c == -1 and not isinstance(factors[0], sympy.floor):
        # "-x*y" reads as (-x)*y, the same product; a floor keeps "-1*" so it is not read as a ceiling
        parts = ["-" + _wrap(factors[0], _UNARY)]
    elif c == 1:
        parts = [_wrap(factors[0], _MUL)]
    else:
        parts = [str(c), _wrap(factors[0], _UNARY)]
    parts += [_wrap(f, _UNARY) for f in factors[1:]]
    return "*".join(parts), _MUL


def _floordiv(arg) -> str:
    p, q = sympy.fraction(sympy.together(arg))
    return f"{_wrap(p, _MUL)}//{_wrap(q, _UNARY)}"
