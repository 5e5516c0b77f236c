"""Read the canonical text form (``llmasos.ir.printer``) back into a Graph.

The parser resolves names and reads attributes through each op's schema, but leaves type checking to
the verifier: a node keeps the result types written in the text, so ill-typed text can be loaded and
then diagnosed. Every error is a ParseError located at the offending token.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np
import sympy
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .graph import Graph, Node, Value, type_of_data
from .sharding import Sharding, logical_type
from .ops import REQUIRED, OpDef, OpError, normalize_attr, get_op
from .types import DType, TensorType, as_dim, sym


class ParseError(ValueError):
    """A located error in IR text: ``line`` and ``column`` are 1-based; the message quotes the line."""

    def __init__(self, msg: str, text: str, line: int, column: int):
        self.msg, self.line, self.column = msg, line, column
        lines = text.split("\n")
        src = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
        caret = "".join(c if c == "\t" else " " for c in src[:column - 1]) + "^"
        super().__init__(f"line {line}, column {column}: {msg}\n  {src}\n  {caret}")


def parse(text: str, params: Optional[dict] = None) -> Graph:
    """Parse one graph. ``params`` maps parameter names to data (numpy arrays or torch tensors)."""
    try:
        tree = _lark().parse(text, start="graph")
    except UnexpectedInput as e:
        raise _syntax_error(e, text) from None
    return _Reader(text).graph(tree, params)


def parse_type(text: str) -> TensorType:
    """One type, e.g. ``f32[batch*seq, 64]``."""
    try:
        return _build_type(text.strip())
    except _Located as e:
        raise ParseError(e.msg, text.strip(), e.line, e.column) from None


def parse_dim(text: str):
    """One dim expression, e.g. ``(seq+1)//2``: an int or a normalised sympy expression."""
    try:
        tree = _lark().parse(text, start="dim_text")
    except UnexpectedInput as e:
        raise _syntax_error(e, text) from None
    try:
        return _dim(tree.children[0])
    except _Located as e:
        raise ParseError(e.msg, text, e.line, e.column) from None


# -- grammar ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = Path(__file__).with_name("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", start=["graph", "type_text", "dim_text"],
                maybe_placeholders=False)


_TERMINAL_NAMES = {
    "GRAPH_NAME": "a graph name (@name)", "VALUE_NAME": "a value name (%name)", "NAME": "a name",
    "TYPE": "a type such as f32[batch, 64]", "INT": "an integer", "FLOAT": "a float", "STRING": "a string",
    "$END": "end of input",
}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    return repr(pattern.value) if pattern.type == "str" else name


def _expected(names) -> str:
    descs = sorted({_describe_terminal(n) for n in names})
    if not descs:
        return ""
    return "; expected " + (descs[0] if len(descs) == 1 else "one of " + ", ".join(descs))


def _syntax_error(e: UnexpectedInput, text: str, line0: int = 0, col0: int = 0) -> ParseError:
    """A lark error as a ParseError; (line0, col0) shift positions when ``text`` is one token's text."""
    if isinstance(e, UnexpectedToken) and e.token.type == "$END" or isinstance(e, UnexpectedEOF):
        expected = e.expected if isinstance(e, UnexpectedEOF) else e.accepts or e.expected
        lines = text.split("\n")
        line, col, msg = len(lines), len(lines[-1]) + 1, "unexpected end of input"
    elif isinstance(e, UnexpectedToken):
        expected = e.accepts or e.expected
        line, col, msg = e.line, e.column, f"unexpected {e.token.value!r}"
    elif isinstance(e, UnexpectedCharacters):
        expected = e.allowed or ()
        char = text[e.pos_in_stream]
        line, col, msg = e.line, e.column, f"unexpected character {char!r}"
        if char == "/":
            msg += " (dims divide with //, floor division)"
    else:  # pragma: no cover - lark has no other kinds today
        expected, line, col, msg = (), getattr(e, "line", 1), getattr(e, "column", 1), str(e)
    if line0:  # inside a type token: LALR lookaheads merged from other contexts would mislead
        expected = [n for n in expected if n != "RBRACE"]
        return _Located(msg + _expected(expected), line0, col0 + col - 1)
    return ParseError(msg + _expected(expected), text, line, col)


class _Located(Exception):
    """An error inside a cached sub-parse (a type token), positioned in the whole text by the caller."""

    def __init__(self, msg: str, line: int, column: int):
        super().__init__(msg)
        self.msg, self.line, self.column = msg, line, column


# -- types and dims -----------------------------------------------------------------------------------
# Types are cached by their token text; a failure is cached as (message, offset into the token).

_TYPE_CACHE: dict[str, Any] = {}


def _type_from_token(tok: Token) -> TensorType:
    text = str(tok)
    hit = _TYPE_CACHE.get(text)
    if hit is None:
        try:
            hit = _build_type(text)
        except _Located as e:
            hit = (e.msg, e.column - 1)
        if len(_TYPE_CACHE) > 20000:
            _TYPE_CACHE.clear()
        _TYPE_CACHE[text] = hit
    if isinstance(hit, tuple):
        raise _Located(hit[0], tok.line, tok.column + hit[1])
    return hit


def _build_type(text: str) -> TensorType:
    try:
        tree = _lark().parse(text, start="type_text")
    except UnexpectedInput as e:
        raise _syntax_error(e, text, 1, 1) from None
    name, *dims = tree.children
    dtype = _dtype(name)
    shape = []
    for d in dims:
        v = _dim(d)
        if isinstance(v, int) and v < 0:
            raise _Located(f"dim {v} is negative", 1, _first_token(d).column)
        shape.append(v)
    return TensorType(tuple(shape), dtype)


def _dtype(tok: Token) -> DType:
    try:
        return DType(str(tok))
    except ValueError:
        close = difflib.get_close_matches(str(tok), [d.value for d in DType], n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        known = ", ".join(d.value for d in DType)
        raise _Located(f"unknown dtype {str(tok)!r}{hint} (dtypes: {known})", tok.line, tok.column) from None


_EXPR_RULES = frozenset({"add", "sub", "mul", "floordiv", "mod", "neg", "call"})


def _is_expr(t) -> bool:
    return t.type in ("INT", "NAME") if isinstance(t, Token) else t.data in _EXPR_RULES


def _first_token(t) -> Optional[Token]:
    while isinstance(t, Tree):
        if not t.children:
            return None
        t = t.children[0]
    return t


def _last_token(t) -> Optional[Token]:
    while isinstance(t, Tree):
        if not t.children:
            return None
        t = t.children[-1]
    return t


MAX_DIM = 1 << 62    # no tensor has a dim past this (sizes are int64)
MAX_INT = 1 << 64    # an integer constant: int64 / uint64 values (dense<u64 ...> included)


def _dim(t, limit: int = MAX_DIM, what: str = "dim"):
    """A dim expression tree as an int or a normalised sympy expression (an int constant: ``limit`` and
    ``what`` say its range and name in the error)."""
    try:
        v = _expr(t)
    except RecursionError:
        tok = _first_token(t)
        raise _Located("dim expression nested too deeply (write it shorter, e.g. 5000*seq for a sum)",
                       tok.line, tok.column) from None
    if isinstance(v, int):
        if abs(v) > limit:
            tok = _first_token(t)
            bound = "2**62" if limit == MAX_DIM else "2**64: 64-bit integers"
            raise _Located(f"{what} {str(v)[:24]}{'...' if len(str(v)) > 24 else ''} is too large "
                           f"(at most {bound})", tok.line, tok.column)
        return v
    if v.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        tok = _first_token(t)
        raise _Located("dim expression divides by zero", tok.line, tok.column)
    return _normalize(v)


@functools.lru_cache(maxsize=8192)
def _normalize(e: sympy.Expr):
    return as_dim(e)  # sympy.simplify: milliseconds, so once per distinct expression


def _expr(t):
    if isinstance(t, Token):
        if t.type == "INT":
            return int(t)
        if t.type == "NAME":
            return sym(str(t))
        raise _Located(f"expected a dim expression, got {str(t)!r}", t.line, t.column)
    kind, ch = t.data, t.children
    if kind == "add":
        return _expr(ch[0]) + _expr(ch[-1])
    if kind == "sub":
        return _expr(ch[0]) - _expr(ch[-1])
    if kind == "mul":
        return _expr(ch[0]) * _expr(ch[-1])
    if kind in ("floordiv", "mod"):
        a, b = _expr(ch[0]), _expr(ch[-1])
        if b == 0:
            raise _Located("dim expression divides by zero", ch[1].line, ch[1].column)
        if isinstance(a, int) and isinstance(b, int):
            return a // b if kind == "floordiv" else a % b
        return sympy.floor(sympy.Integer(a) / b if isinstance(a, int) else a / b) if kind == "floordiv" \
            else sympy.Mod(a, b)
    if kind == "neg":
        x = _expr(ch[-1])
        if isinstance(x, sympy.floor):
            return sympy.ceiling(-x.args[0])  # the printer writes ceiling(a) as -((-a)//q)
        return -x
    if kind == "call":
        fn, *args = ch
        funcs = {"min": sympy.Min, "max": sympy.Max}
        if str(fn) not in funcs:
            raise _Located(f"unknown function {str(fn)!r} in a dim expression (dims may use min and max)",
                           fn.line, fn.column)
        return funcs[str(fn)](*(sympy.Integer(a) if isinstance(a, int) else a for a in map(_expr, args)))
    tok = _first_token(t)
    raise _Located("expected a dim expression", tok.line, tok.column)


# -- the graph ----------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, text: str):
        self.text = text
        self.values: dict[str, Value] = {}
        self.defined_at: dict[str, tuple[int, int]] = {}
        self.param_tokens: dict[str, Token] = {}
        self.sharding_axes: list = []

    def error(self, msg: str, tok: Optional[Token]) -> ParseError:
        line, col = (tok.line, tok.column) if tok is not None else (1, 1)
        return ParseError(msg, self.text, line, col)

    def graph(self, tree: Tree, params: Optional[dict]) -> Graph:
        try:
            g = self._graph(tree)
        except _Located as e:
            raise ParseError(e.msg, self.text, e.line, e.column) from None
        self._attach(g, params)
        return g

    def _graph(self, tree: Tree) -> Graph:
        name, *rest = tree.children
        g = Graph(str(name)[1:])
        for item in rest:
            kind = item.data
            if kind == "node":
                self._node(g, item)
            elif kind == "input":
                tok, type_tok, *sh = item.children
                v = g.add_input(self._define(tok), _type_from_token(type_tok), self._sharding(g, sh))
                self.values[v.name] = v
            elif kind == "param":
                tok, type_tok, *sh = item.children
                v = g.add_param(self._define(tok), type=_type_from_token(type_tok), sharding=self._sharding(g, sh))
                self.values[v.name] = v
                self.param_tokens[v.name] = tok
            elif kind == "symbol":
                self._symbol(g, item)
            elif kind == "mesh":
                name, size = item.children
                if str(name) in g.mesh:
                    raise self.error(f"mesh axis {name} is declared twice", name)
                if int(size) < 1:
                    raise self.error(f"mesh axis {name} must have at least 1 rank, got {size}", size)
                g.mesh[str(name)] = int(size)
            elif kind == "ret":
                g.set_outputs([self._use(t) for t in item.children])
        for axis, tok in self.sharding_axes:
            if axis not in g.mesh:
                raise self.error(f"sharding over mesh axis {axis!r}, which no 'mesh' line declares "
                                 f"(declared: {', '.join(g.mesh) or 'none'})", tok)
        return g

    def _define(self, tok: Token) -> str:
        name = str(tok)[1:]
        if name in self.defined_at:
            line, col = self.defined_at[name]
            raise self.error(f"value %{name} is already defined (at line {line}, column {col})", tok)
        self.defined_at[name] = (tok.line, tok.column)
        return name

    def _use(self, tok: Token) -> Value:
        v = self.values.get(str(tok)[1:])
        if v is None:
            close = difflib.get_close_matches(str(tok)[1:], self.values, n=3)
            hint = f"; did you mean {', '.join('%' + c for c in close)}?" if close else ""
            raise self.error(f"use of undefined value {tok}{hint}", tok)
        return v

    def _sharding(self, g: Graph, trees: list):
        """The Sharding an optional ``#split(dim, axis)`` / ``#partial(axis)`` suffix declares (None: replicated)."""
        if not trees:
            return None
        kind, *args = trees[0].children
        k = str(kind)
        if k == "split":
            if len(args) != 2 or args[0].type != "INT" or args[1].type != "NAME":
                raise self.error("a split sharding is written #split(DIM, AXIS), e.g. #split(1, tp)", kind)
            dim, axis = int(args[0]), str(args[1])
        elif k == "partial":
            if len(args) != 1 or args[0].type != "NAME":
                raise self.error("a partial sharding is written #partial(AXIS), e.g. #partial(tp)", kind)
            dim, axis = None, str(args[0])
        else:
            raise self.error(f"unknown sharding {k!r}: a value is #split(DIM, AXIS), #partial(AXIS) or replicated "
                             f"(no annotation)", kind)
        self.sharding_axes.append((axis, args[-1]))  # checked once every mesh line is read
        return Sharding(k, axis, dim)

    def _symbol(self, g: Graph, item: Tree) -> None:
        name, *bounds = item.children
        if str(name) in g.symbols:
            raise self.error(f"symbol {name} is declared twice", name)
        lo, hi = (None if b.type == "QMARK" else int(b) for b in bounds) if bounds else (None, None)
        if lo is not None and hi is not None and lo > hi:
            raise self.error(f"symbol {name} has an empty range [{lo}, {hi}]", bounds[0])
        g.add_symbol(str(name), lo, hi)

    def _node(self, g: Graph, item: Tree) -> None:
        results, op_tok, operands, attrs, loc = [], None, [], None, None
        for c in item.children:
            if isinstance(c, Tree):
                if c.data == "result":
                    results.append(c)
                elif c.data == "attrs":
                    attrs = c
                else:
                    loc = self._string(c.children[0])
            elif op_tok is None:
                op_tok = c
            else:
                operands.append(c)
        # checked in text order: result types, result names, op, operands, attributes
        typed = [(r.children[0], _type_from_token(r.children[1]), self._sharding(g, r.children[2:]))
                 for r in results]
        for tok, _, _ in typed:
            if str(tok)[1:] in self.defined_at:
                self._define(tok)  # raises, naming the first definition
        try:
            opdef = get_op(str(op_tok))
        except OpError as e:
            raise self.error(str(e), op_tok) from None
        inputs = [self._use(t) for t in operands]
        attr_values = self._attrs(opdef, op_tok, attrs)
        outs = [Value(self._define(tok), t, sharding=sh) for tok, t, sh in typed]
        g.append_node(Node(opdef.name, inputs, attr_values, outs, loc))
        for o in outs:
            self.values[o.name] = o

    # -- attributes -----------------------------------------------------------------------------
    def _attrs(self, opdef: OpDef, op_tok: Token, tree: Optional[Tree]) -> dict:
        given: dict[str, Any] = {}
        for a in (tree.children if tree is not None else ()):
            key, value = a.children
            k = str(key)
            spec = opdef.attrs.get(k)
            if spec is None:
                close = difflib.get_close_matches(k, opdef.attrs, n=2)
                hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
                takes = ", ".join(sorted(opdef.attrs)) or "no attributes"
                raise self.error(f"op '{opdef.name}' has no attribute '{k}'; {hint}it takes: {takes}", key)
            if k in given:
                raise self.error(f"attribute '{k}' is given twice", key)
            where = f"attribute '{k}' of op '{opdef.name}'"
            v = self._attr_value(spec.kind, spec.optional, value, where, key)
            if spec.kind in ("dim", "dims") and spec.choices is None:
                given[k] = v  # already normalised; Attr.check would re-simplify each symbolic dim
                continue
            problem = spec.check(v)
            if problem:
                raise self.error(f"{where} {problem}", _first_token(value) or key)
            given[k] = normalize_attr(spec.kind, v)
        # Defaults the way OpDef.complete_attrs fills them (not calling it: it re-simplifies every
        # symbolic dim, which costs milliseconds per node on a 2000-node graph).
        out = {}
        for k, spec in opdef.attrs.items():
            if k in given:
                out[k] = given[k]
            elif spec.default is REQUIRED:
                raise self.error(f"op '{opdef.name}' needs attribute '{k}'", op_tok)
            else:
                out[k] = normalize_attr(spec.kind, spec.default)
        return out

    def _attr_value(self, kind: str, optional: bool, t, where: str, key: Token):
        tok = _first_token(t) or key
        if isinstance(t, Token) and t.type == "NONE":
            if not optional:
                raise self.error(f"{where} must not be none", t)
            return None
        if kind == "int":
            v = self._constant(t, where, key, "an int")
            if not isinstance(v, int) or isinstance(v, bool):
                raise self.error(f"{where} expects an int, got {self._show(t)}", tok)
            return v
        if kind == "dim":
            if not _is_expr(t):
                raise self.error(f"{where} expects a dim (an int or symbolic expression), got {self._show(t)}",
                                 tok)
            return _dim(t)
        if kind == "float":
            v = self._constant(t, where, key, "a float")
            if isinstance(v, bool):
                raise self.error(f"{where} expects a float, got {self._show(t)}", tok)
            return float(v)
        if kind == "scalar":
            return self._constant(t, where, key)
        if kind == "bool":
            if isinstance(t, Token) and t.type in ("TRUE", "FALSE"):
                return t.type == "TRUE"
            raise self.error(f"{where} expects true or false, got {self._show(t)}", tok)
        if kind == "str":
            if isinstance(t, Token) and t.type == "STRING":
                return self._string(t)
            raise self.error(f"{where} expects a string, got {self._show(t)}", tok)
        if kind == "dtype":
            if isinstance(t, Token) and t.type == "NAME":
                return _dtype(t)
            raise self.error(f"{where} expects a dtype, got {self._show(t)}", tok)
        if kind in ("ints", "dims"):
            if not (isinstance(t, Tree) and t.data == "list"):
                raise self.error(f"{where} expects a list [...], got {self._show(t)}", tok)
            return [self._attr_value(kind[:-1], False, c, where, key) for c in t.children]
        if kind == "tensor":
            if not (isinstance(t, Tree) and t.data == "dense"):
                raise self.error(f"{where} expects a tensor dense<...>, got {self._show(t)}", tok)
            return self._dense(t, where)
        raise self.error(f"{where} has kind {kind!r}, which the text format cannot hold", key)

    def _constant(self, t, where: str, key: Token, what: str = "a number"):
        """A number or bool literal; an int may be written as a constant expression (-3, 2*4)."""
        if isinstance(t, Token):
            if t.type == "FLOAT":
                return float(t)
            if t.type == "INF":
                return math.inf
            if t.type == "NAN":
                return math.nan
            if t.type in ("TRUE", "FALSE"):
                return t.type == "TRUE"
        else:
            if t.data == "neg_float":
                return -float(t.children[1])
            if t.data == "neg_inf":
                return -math.inf
        if _is_expr(t):
            v = _dim(t, MAX_INT, "integer constant")      # a value (int64 range), not a dim
            if isinstance(v, int):
                return v
        raise self.error(f"{where} expects {what}, got {self._show(t)}", _first_token(t) or key)

    def _dense(self, t: Tree, where: str) -> np.ndarray:
        type_tok, *items = t.children
        ty = _type_from_token(type_tok)
        if not ty.is_static:
            raise self.error(f"{where}: a dense tensor needs a static shape, got {ty}", type_tok)
        n = int(np.prod(ty.shape, dtype=np.int64))
        if len(items) != n:
            raise self.error(f"{where}: dense<{ty}> needs {n} values, got {len(items)}", type_tok)
        dt = ty.dtype
        vals = [self._constant(i, where, type_tok) for i in items]
        for i, v in zip(items, vals):
            ok = (isinstance(v, bool) if dt is DType.bool else
                  isinstance(v, int) and not isinstance(v, bool) if dt.is_int else not isinstance(v, bool))
            if not ok:
                raise self.error(f"{where}: {self._show(i)} is not a {dt} value", _first_token(i))
            if dt.is_int:
                info = np.iinfo(np.int64) if dt is DType.i64 else _iinfo(dt)
                if not info.min <= v <= info.max:
                    raise self.error(f"{where}: {v} is out of range for {dt}", _first_token(i))
        if dt is DType.bool:
            arr = np.array(vals, dtype=np.bool_)
        elif dt.is_int:
            arr = np.array(vals, dtype=np.int64).astype(dt.numpy)
        else:
            arr = np.array(vals, dtype=np.float64).astype(dt.numpy)
        return arr.reshape(ty.shape)

    def _string(self, tok: Token) -> str:
        try:
            return json.loads(str(tok), strict=False)
        except json.JSONDecodeError as e:
            raise self.error(f"bad string literal: {e.msg}", tok) from None

    def _show(self, t) -> str:
        """The source text of a value, for messages."""
        if isinstance(t, Tree) and t.data == "list":
            return "a list"
        if isinstance(t, Tree) and t.data == "dense":
            return "a dense tensor"
        first, last = _first_token(t), _last_token(t)
        if first is None:
            return "nothing"
        return repr(self.text[first.start_pos:last.end_pos])

    # -- parameter data -------------------------------------------------------------------------
    def _attach(self, g: Graph, params: Optional[dict]) -> None:
        if not params:
            return
        unknown = sorted(set(params) - set(g.params))
        if unknown:
            raise ValueError(f"params given for names the text does not declare: {unknown}")
        for name, data in params.items():
            v = g.params[name]
            declared = logical_type(v.type, v.sharding, g.mesh)
            actual = type_of_data(data)
            if not actual.same_as(declared):
                raise self.error(f"parameter %{name} is declared {declared} but its data is {actual}",
                                 self.param_tokens[name])
            g.param_data[name] = data


def _iinfo(dt: DType):
    return ml_dtypes.iinfo(dt.numpy) if dt.is_packed else np.iinfo(dt.numpy)
