"""Pattern combinators and the matcher.

A pattern is a tree over IR values: ``Op`` matches a value produced by a node of that op (``op(...)[i]``:
result ``i`` of a multi-result node; ``bind("s", op(...))``: also binds that value as ``s``), ``Var`` matches any
value (one name binds one value: ``op("add", x, x)`` needs both operands to be the same value), ``Const``
matches an inline ``const`` node (all elements equal to ``value`` when given), ``Alt`` (``p1 | p2``) tries
alternatives in order. Attribute patterns are literals (must be equal) or ``AttrVar`` (bind the value, so a
replacement can reuse it). ``Choice`` (``one_of("silu", "relu", name="f")``) is an alternation over literals:
as an ``Op``'s op it matches any of those ops, as an attribute pattern any of those values; with a name it
binds the alternative that matched (the op name, or the attribute value).

Matching is a backtracking generator of bindings; every failure is reported to an optional ``trace`` list
so ``explain`` can say which sub-pattern failed and why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from llmasos.ir import DType, Value
from llmasos.ir.graph import attrs_equal


class Pattern:
    def __or__(self, other: "Pattern") -> "Alt":
        left = self.options if isinstance(self, Alt) else (self,)
        right = other.options if isinstance(other, Alt) else (other,)
        return Alt(left + right)

    def ops(self) -> set:
        return set()

    def var_names(self) -> set:
        return set()


@dataclass(frozen=True, eq=False)
class Var(Pattern):
    """Any value; ``dtype``/``rank``/``shape`` (a tuple, ``None`` entries are free) and ``pred`` restrict it."""
    name: str
    dtype: Optional[DType] = None
    rank: Optional[int] = None
    shape: Optional[tuple] = None
    pred: Optional[Callable[[Value], bool]] = None

    def var_names(self) -> set:
        return set() if self.name == "_" else {self.name}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class AttrVar:
    """Binds an attribute's value under ``name`` (text form: ``reshape(x){shape=s}``)."""
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class Choice:
    """One of several literals: ops (an ``Op``'s op, text ``(add|mul)``) or attribute values (text
    ``("none"|"tanh")``). ``name`` binds the alternative that matched (text ``f:(silu|relu)``), which a
    replacement reuses (``f(...)``, ``{act=f}``) or maps by position (``f:(a|b)``, ``Pick``)."""
    options: tuple
    name: Optional[str] = None

    def index(self, value) -> Optional[int]:
        """The position of ``value`` among the alternatives (compared as attributes are), else None."""
        for i, o in enumerate(self.options):
            if attr_eq(o, value):
                return i
        return None

    def text(self, bare: bool = False) -> str:
        """``name:(a|b)``; ``bare`` writes strings without quotes (op names)."""
        show = (lambda o: str(o)) if bare else attr_literal
        body = "(" + "|".join(show(o) for o in self.options) + ")"
        return f"{self.name}:{body}" if self.name else body

    def __str__(self) -> str:
        return self.text()


def one_of(*options, name: Optional[str] = None) -> Choice:
    """``op(one_of("silu", "relu", name="f"), x)``; ``op("gelu", x, approximate=one_of("none", "tanh"))``."""
    if len(options) < 2:
        raise ValueError(f"one_of needs at least two alternatives, got {list(options)}")
    return Choice(tuple(options), name)


def attr_literal(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def op_text(o) -> str:
    """An Op's op as the rule text writes it: a name or an alternation of names."""
    return o.text(bare=True) if isinstance(o, Choice) else o


@dataclass(frozen=True, eq=False)
class Const(Pattern):
    """An inline ``const`` node; with ``value`` every element must equal it. ``name`` binds the value."""
    value: Any = None
    name: Optional[str] = None

    def var_names(self) -> set:
        return {self.name} if self.name else set()

    def __str__(self) -> str:
        return "const()" if self.value is None else repr(self.value)


@dataclass(frozen=True, eq=False)
class Op(Pattern):
    """``name`` binds the matched value (as-pattern ``s@op(...)``); ``result`` picks a multi-result node's
    result (``op(...)[i]``); without it only single-result nodes match. ``op`` is an op name or a ``Choice``
    of them."""
    op: Union[str, Choice]
    args: tuple
    attrs: dict = field(default_factory=dict)
    commutative: bool = False
    name: Optional[str] = None
    result: Optional[int] = None

    def __getitem__(self, i: int) -> "Op":
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TypeError(f"result index of {self.op} must be an int >= 0, got {i!r}")
        return replace(self, result=i)

    def ops(self) -> set:
        out = set(self.op.options) if isinstance(self.op, Choice) else {self.op}
        for a in self.args:
            out |= a.ops()
        return out

    def var_names(self) -> set:
        out = {v.name for v in self.attrs.values() if isinstance(v, (AttrVar, Choice)) and v.name}
        if self.name:
            out.add(self.name)
        if isinstance(self.op, Choice) and self.op.name:
            out.add(self.op.name)
        for a in self.args:
            out |= a.var_names()
        return out

    def __str__(self) -> str:
        s = f"{op_text(self.op)}({', '.join(str(a) for a in self.args)})"
        if self.attrs:
            s += "{" + ", ".join(f"{k}={v}" for k, v in self.attrs.items()) + "}"
        if self.result is not None:
            s += f"[{self.result}]"
        return f"{self.name}@{s}" if self.name else s


@dataclass(frozen=True, eq=False)
class Alt(Pattern):
    options: tuple

    def ops(self) -> set:
        return set().union(*(o.ops() for o in self.options))

    def var_names(self) -> set:
        # a name is usable by the replacement only if every alternative binds it
        sets = [o.var_names() for o in self.options]
        return set.intersection(*sets) if sets else set()

    def __str__(self) -> str:
        return " | ".join(str(o) for o in self.options)


# -- constructors (the Python combinator form) -------------------------------------------------------

def op(name: Union[str, Choice], *args, commutative: bool = False, **attrs) -> Op:
    """``name``: an op, or ``one_of(...)`` ops; attrs: literals, ``attr(name)`` or ``one_of(...)`` values."""
    return Op(name, tuple(_as_pattern(a) for a in args), dict(attrs), commutative)


def bind(name: str, p: Pattern) -> Pattern:
    """The as-pattern ``name@p``: ``p`` must match and its value is bound as ``name``."""
    if isinstance(p, Alt):
        return Alt(tuple(bind(name, o) for o in p.options))
    if isinstance(p, (Op, Const)):
        return replace(p, name=name)
    raise TypeError(f"bind({name!r}, ...) takes an op or constant pattern, got `{p}` (a variable binds itself)")


def as_names(p: Pattern) -> set:
    """Names bound with ``@`` (in every alternative): the values a multi-result rule may replace."""
    if isinstance(p, Alt):
        sets = [as_names(o) for o in p.options]
        return set.intersection(*sets) if sets else set()
    if isinstance(p, Op):
        return ({p.name} if p.name else set()).union(*(as_names(a) for a in p.args))
    return set()


def var(name: str, *, dtype=None, rank=None, shape=None, where=None) -> Var:
    if isinstance(dtype, str):
        dtype = DType.parse(dtype)
    return Var(name, dtype, rank, tuple(shape) if shape is not None else None, where)


def const(value=None, name: Optional[str] = None) -> Const:
    return Const(value, name)


def attr(name: str) -> AttrVar:
    return AttrVar(name)


def _as_pattern(a) -> Pattern:
    if isinstance(a, Pattern):
        return a
    if isinstance(a, (int, float, bool)):
        return Const(a)
    raise TypeError(f"not a pattern: {a!r} (use var('name'), const(...) or op(...))")


# -- matching ----------------------------------------------------------------------------------------

@dataclass
class Failure:
    """Why a sub-pattern did not match: ``path`` locates it from the root (``root.arg[1].arg[0]``)."""
    path: str
    pattern: str
    reason: str

    def __str__(self) -> str:
        return f"at {self.path} (pattern `{self.pattern}`): {self.reason}"


def match(p: Pattern, v: Value, bindings: dict, trace: Optional[list] = None, path: str = "root",
          nodes: Optional[list] = None) -> Iterator[dict]:
    """Yield every extension of ``bindings`` under which ``p`` matches ``v`` (the dict is copied)."""
    def fail(reason: str):
        if trace is not None:
            trace.append(Failure(path, str(p), reason))

    if isinstance(p, Alt):
        for i, o in enumerate(p.options):
            yield from match(o, v, bindings, trace, f"{path}|alt[{i}]", nodes)
        return
    if isinstance(p, Var):
        t = v.type
        if p.dtype is not None and t.dtype is not p.dtype:
            return fail(f"{p.name} must have dtype {p.dtype}, %{v.name} is {t}")
        if p.rank is not None and t.rank != p.rank:
            return fail(f"{p.name} must have rank {p.rank}, %{v.name} is {t}")
        if p.shape is not None and (len(p.shape) != t.rank or any(
                d is not None and d != e for d, e in zip(p.shape, t.shape))):
            return fail(f"{p.name} must have shape {list(p.shape)}, %{v.name} is {t}")
        if p.pred is not None and not p.pred(v):
            return fail(f"{p.name}: predicate {getattr(p.pred, '__name__', p.pred)} is false for %{v.name}")
        if p.name == "_":
            yield bindings
            return
        if p.name in bindings:
            if bindings[p.name] is not v:
                other = bindings[p.name]
                return fail(f"variable {p.name} is already bound to "
                            f"{'%' + other.name if isinstance(other, Value) else repr(other)}, "
                            f"here it would be %{v.name}")
            yield bindings
            return
        yield {**bindings, p.name: v}
        return
    node = v.producer
    if isinstance(p, Const):
        if node is None or node.op != "const":
            return fail(f"expected a constant, %{v.name} is "
                        f"{'a graph input or parameter' if node is None else 'produced by ' + node.op}")
        if p.value is not None and not const_equals(node.attrs["value"], p.value):
            return fail(f"constant %{v.name} is not all {p.value!r} (in its dtype {v.type.dtype})")
        if p.name:
            if p.name in bindings and bindings[p.name] is not v:
                return fail(f"variable {p.name} is already bound to a different value")
            bindings = {**bindings, p.name: v}
        if nodes is not None:
            nodes.append(node)
        yield bindings
        return
    assert isinstance(p, Op), p
    want_op = p.op.text(bare=True).split(":", 1)[-1] if isinstance(p.op, Choice) else p.op
    if node is None:
        return fail(f"expected op {want_op}, %{v.name} is a graph input or parameter")
    if isinstance(p.op, Choice):
        if node.op not in p.op.options:
            return fail(f"expected op {want_op}, %{v.name} is produced by {node.op}")
        if p.op.name:
            if p.op.name in bindings and bindings[p.op.name] != node.op:
                return fail(f"op choice {p.op.name} is already bound to {bindings[p.op.name]!r}, here it is "
                            f"{node.op!r}")
            bindings = {**bindings, p.op.name: node.op}
    elif node.op != p.op:
        return fail(f"expected op {want_op}, %{v.name} is produced by {node.op}")
    if p.result is None:
        if len(node.outputs) != 1:
            return fail(f"{node.op} has {len(node.outputs)} results; patterns match single-result nodes")
    elif p.result >= len(node.outputs):
        return fail(f"expected result #{p.result} of {want_op}, %{v.name}'s node has {len(node.outputs)} result(s)")
    elif v.index != p.result:
        return fail(f"expected result #{p.result} of {want_op}, %{v.name} is result #{v.index}")
    if len(node.inputs) != len(p.args):
        return fail(f"arity: pattern has {len(p.args)} operands, %{v.name} = {node.op} has {len(node.inputs)}")
    for k, want in p.attrs.items():
        if k not in node.attrs:
            return fail(f"{node.op} has no attribute {k!r}")
        have = node.attrs[k]
        if isinstance(want, AttrVar):
            if want.name in bindings and not attr_eq(bindings[want.name], have):
                return fail(f"attribute {k}: {want.name} is already bound to {bindings[want.name]!r}, "
                            f"here it is {have!r}")
            bindings = {**bindings, want.name: have}
        elif isinstance(want, Choice):
            if want.index(have) is None:
                return fail(f"attribute {k}: expected one of {Choice(want.options).text()}, %{v.name} has {have!r}")
            if want.name:
                if want.name in bindings and not attr_eq(bindings[want.name], have):
                    return fail(f"attribute {k}: {want.name} is already bound to {bindings[want.name]!r}, "
                                f"here it is {have!r}")
                bindings = {**bindings, want.name: have}
        elif not attr_eq(want, have):
            return fail(f"attribute {k}: expected {want!r}, %{v.name} has {have!r}")
    if p.name:
        if p.name in bindings and bindings[p.name] is not v:
            other = bindings[p.name]
            return fail(f"{p.name}@ is already bound to "
                        f"{'%' + other.name if isinstance(other, Value) else repr(other)}, here it would be %{v.name}")
        bindings = {**bindings, p.name: v}
    orders = [tuple(range(len(p.args)))]
    if p.commutative and len(p.args) == 2:
        orders.append((1, 0))
    for order in orders:
        yield from _match_args(p, node, order, 0, bindings, trace, path, nodes)


def _match_args(p: Op, node, order, i, bindings, trace, path, nodes):
    if i == len(order):
        if nodes is not None:
            nodes.append(node)
        yield bindings
        return
    j = order[i]
    for b in match(p.args[i], node.inputs[j], bindings, trace, f"{path}.arg[{j}]", nodes):
        yield from _match_args(p, node, order, i + 1, b, trace, path, nodes)


def const_equals(value, literal) -> bool:
    """Every element of ``value`` equals ``literal`` rounded to the array's dtype (ints: exactly)."""
    arr = np.asarray(value)
    if arr.size == 0:
        return False
    if arr.dtype.kind in "iu":
        return float(literal).is_integer() and bool(np.all(arr == int(literal)))
    if arr.dtype.kind == "b":
        return literal in (0, 1) and bool(np.all(arr == bool(literal)))
    try:
        want = np.asarray(literal).astype(arr.dtype).astype(np.float64)
        return bool(np.all(arr.astype(np.float64) == want))
    except (TypeError, ValueError, OverflowError):
        return False


def const_scalar(v: Value):
    """The one element value of a constant whose elements are all equal (a Python number), else None."""
    node = v.producer if isinstance(v, Value) else None
    if node is None or node.op != "const":
        return None
    arr = np.asarray(node.attrs["value"])
    if arr.size == 0:
        return None
    flat = arr.reshape(-1)
    first = flat[0]
    if arr.dtype.kind in "iub":
        if not np.all(flat == first):
            return None
        return bool(first) if arr.dtype.kind == "b" else int(first)
    try:
        f = flat.astype(np.float64)
    except (TypeError, ValueError):
        return None
    if not (np.all(f == f[0]) or np.all(np.isnan(f))):
        return None
    try:  # the shortest decimal that is this value in the constant's dtype: an f32 1e-6 reads 1e-06
        return float(str(first))
    except ValueError:
        return float(f[0])


def attr_eq(a, b) -> bool:
    return attrs_equal({"a": a}, {"a": b})
