"""The one Rule type, the replacement builder and templates, and the load-time type check.

A rule's replacement is a callable ``(builder, bindings) -> Value``. Text and traced rules use a
``Template`` (a tree of ``TOp``/``TVar``/``TConst``); Python rules may pass any function that builds IR
through the ``Builder``. A constraint is a callable ``(bindings) -> bool``; ``describe(bindings)`` (if it
has one) says what the constraint's parts evaluated to, for ``explain``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from llmasos.ir import DType, Graph, OpError, TensorType, Value, get_op

from .pattern import Alt, AttrVar, Const, Op, Pattern, Var


class RuleError(ValueError):
    """A rule that cannot be loaded or applied; the message names the rule (and file:line:col if any)."""


class RewriteError(RuntimeError):
    """The engine gave up: a rewrite produced a wrong type, or rules kept firing past the guard."""


class Builder:
    """Builds replacement nodes into the graph being rewritten (the engine moves them before the root)."""

    def __init__(self, graph: Graph, loc: Optional[str] = None):
        self.graph = graph
        self.loc = loc

    def op(self, name: str, *inputs: Value, **attrs) -> Value:
        out = self.graph.add_node(name, inputs, attrs, loc=self.loc)
        if isinstance(out, tuple):
            raise RewriteError(f"replacement op {name} has {len(out)} results; use a single-result op")
        return out

    def const(self, value, dtype: DType, shape=()) -> Value:
        arr = np.full(tuple(shape), value).astype(dtype.numpy)
        return self.op("const", value=arr, dtype=dtype)


# -- templates: replacements written as expression trees ----------------------------------------------

@dataclass(frozen=True, eq=False)
class TVar:
    name: str
    pos: Optional[tuple] = None  # (line, column) in a rule file

    def __str__(self):
        return self.name


@dataclass(frozen=True, eq=False)
class TConst:
    """A scalar constant; its dtype is that of its first non-constant sibling operand (else f32)."""
    value: Any
    pos: Optional[tuple] = None

    def __str__(self):
        return repr(self.value)


@dataclass(frozen=True, eq=False)
class TOp:
    op: str
    args: tuple
    attrs: dict = field(default_factory=dict)  # values: literals or AttrVar (bound in the pattern)
    pos: Optional[tuple] = None

    def __str__(self):
        s = f"{self.op}({', '.join(str(a) for a in self.args)})"
        if self.attrs:
            s += "{" + ", ".join(f"{k}={v}" for k, v in self.attrs.items()) + "}"
        return s


def _compose(p, q):
    """The perm of ``permute(permute(x){perm=p}){perm=q}`` as one permute."""
    return [p[i] for i in q]


# Functions replacement attributes may apply to attribute values the pattern bound.
ATTR_FUNCTIONS: dict[str, Callable] = {"compose": _compose}


@dataclass(frozen=True, eq=False)
class AttrCall:
    fn: str
    args: tuple

    def __str__(self):
        return f"{self.fn}({', '.join(str(a) for a in self.args)})"


def _attr(v, m: dict):
    if isinstance(v, AttrVar):
        return m[v.name]
    if isinstance(v, AttrCall):
        return ATTR_FUNCTIONS[v.fn](*(_attr(a, m) for a in v.args))
    if isinstance(v, list):
        return [_attr(a, m) for a in v]
    return v


class Template:
    """A replacement given as a tree; calling it builds the tree through a Builder."""

    def __init__(self, root):
        self.root = root

    def __call__(self, b: Builder, m: dict) -> Value:
        return self._build(self.root, b, m, None)

    def _build(self, t, b: Builder, m: dict, dtype: Optional[DType]) -> Value:
        if isinstance(t, TVar):
            return m[t.name]
        if isinstance(t, TConst):
            return b.const(t.value, dtype or DType.f32)
        built: list = [None] * len(t.args)
        for i, a in enumerate(t.args):  # non-constants first: they give literal constants their dtype
            if not isinstance(a, TConst):
                built[i] = self._build(a, b, m, None)
        sib = next((v.type.dtype for v in built if v is not None), dtype)
        for i, a in enumerate(t.args):
            if isinstance(a, TConst):
                built[i] = self._build(a, b, m, sib)
        attrs = {k: _attr(v, m) for k, v in t.attrs.items()}
        return b.op(t.op, *built, **attrs)

    def ops(self) -> set:
        out, todo = set(), [self.root]
        while todo:
            t = todo.pop()
            if isinstance(t, TOp):
                out.add(t.op)
                todo.extend(t.args)
        return out

    def __str__(self):
        return str(self.root)


@dataclass(eq=False)
class Rule:
    name: str
    pattern: Pattern
    replacement: Callable[[Builder, dict], Value]
    constraint: Optional[Callable[[dict], bool]] = None
    source: Optional[str] = None  # "file.rw:3:1" for rules from files

    def __post_init__(self):
        if not isinstance(self.pattern, (Op, Alt)) or (
                isinstance(self.pattern, Alt) and not all(isinstance(o, Op) for o in self.pattern.options)):
            raise RuleError(f"rule '{self.name}': the pattern root must be an op, got `{self.pattern}`")
        self.check()

    def where(self) -> str:
        return f"rule '{self.name}'" + (f" ({self.source})" if self.source else "")

    def __str__(self) -> str:
        s = f"rule {self.name}: {self.pattern} => {self.replacement}"
        return s + (f" where {self.constraint}" if self.constraint is not None else "")

    __repr__ = __str__

    def check(self) -> None:
        """Reject the rule if its replacement type differs from the root's on a probe typing.

        The vars are given one common probe type after another; the first typing under which the pattern
        builds (and the constraint holds) decides. No typing builds -> nothing to check ("where possible").
        """
        if _has_attr_vars(self.pattern):
            return
        for t in PROBES:
            g = Graph("probe")
            m: dict = {}
            try:
                root = _instantiate(self.pattern, g, m, t)
            except Exception:
                continue
            m["$root"] = root
            if self.constraint is not None:
                try:
                    if not self.constraint(m):
                        continue
                except Exception:
                    continue
            try:
                out = self.replacement(Builder(g), m)
            except Exception as e:
                raise RuleError(f"{self.where()}: replacement `{self.replacement}` does not build for "
                                f"operands of type {t}: {e}") from None
            if not isinstance(out, Value) or out.type != root.type:
                got = out.type if isinstance(out, Value) else repr(out)
                raise RuleError(f"{self.where()}: replacement produces {got} but the pattern root is "
                                f"{root.type} (for operands of type {t})")
            return


PROBES = tuple(TensorType(s, d) for d, s in [
    (DType.f32, (3, 3)), (DType.f32, (2, 3, 3)), (DType.f32, (3,)), (DType.f32, ()),
    (DType.i64, (3, 3)), (DType.bool, (3, 3))])


def _has_attr_vars(p) -> bool:
    if isinstance(p, Alt):
        return any(_has_attr_vars(o) for o in p.options)
    if isinstance(p, Op):
        return any(isinstance(v, AttrVar) for v in p.attrs.values()) or any(_has_attr_vars(a) for a in p.args)
    return False


def _instantiate(p, g: Graph, m: dict, t: TensorType, dtype: Optional[DType] = None) -> Value:
    """Build one graph the pattern matches, vars typed ``t`` (a probe for the type check)."""
    if isinstance(p, Alt):
        return _instantiate(p.options[0], g, m, t, dtype)
    if isinstance(p, Var):
        want = TensorType(p.shape if p.shape and None not in p.shape else t.shape, p.dtype or t.dtype)
        if p.name == "_":
            return g.add_input(f"any{len(g.inputs)}", want)
        if p.name not in m:
            m[p.name] = g.add_input(p.name, want)
        return m[p.name]
    if isinstance(p, Const):
        dt = dtype or t.dtype
        v = g.add_node("const", [], {"value": np.full((), 0 if p.value is None else p.value).astype(dt.numpy),
                                     "dtype": dt})
        if p.name:
            m[p.name] = v
        return v
    args: list = [None] * len(p.args)
    for i, a in enumerate(p.args):
        if not isinstance(a, Const):
            args[i] = _instantiate(a, g, m, t)
    sib = next((v.type.dtype for v in args if v is not None), t.dtype)
    for i, a in enumerate(p.args):
        if isinstance(a, Const):
            args[i] = _instantiate(a, g, m, t, sib)
    return g.add_node(p.op, args, dict(p.attrs))


def check_ops(rule_name: str, tmpl: Template) -> None:
    """Every replacement op exists, takes that many operands and those attrs (raises RuleError)."""
    todo = [tmpl.root]
    while todo:
        t = todo.pop()
        if not isinstance(t, TOp):
            continue
        try:
            d = get_op(t.op)
        except OpError as e:
            raise RuleError(f"rule '{rule_name}': {e}") from None
        problem = d.arity_error(len(t.args))
        if problem:
            raise RuleError(f"rule '{rule_name}': replacement op {t.op} {problem}")
        unknown = set(t.attrs) - set(d.attrs)
        if unknown:
            raise RuleError(f"rule '{rule_name}': replacement op {t.op} has no attribute(s) {sorted(unknown)}; "
                            f"it takes {sorted(d.attrs) or 'none'}")
        todo.extend(t.args)
