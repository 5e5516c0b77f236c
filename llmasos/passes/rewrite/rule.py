"""The one Rule type, the replacement builder and templates, and the load-time type check.

A rule's replacement is a callable ``(builder, bindings) -> Value`` (with a result list ``results=("root",
"s")``: a tuple of Values, result i replacing the i-th listed value). Text and traced rules use a
``Template`` (a tree of ``TOp``/``TVar``/``TConst``); Python rules may pass any function that builds IR
through the ``Builder``. A constraint is a callable ``(bindings) -> bool``; ``describe(bindings)`` (if it
has one) says what the constraint's parts evaluated to, for ``explain``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from llmasos.ir import DType, Graph, OpError, TensorType, Value, get_op
from llmasos.ir.ops import REQUIRED

from .pattern import Alt, AttrVar, Choice, Const, Op, Pattern, Var, attr_eq, attr_literal, as_names, const_scalar


class RuleError(ValueError):
    """A rule that cannot be loaded or applied; the message names the rule (and file:line:col if any)."""


class RewriteError(RuntimeError):
    """The engine gave up: a rewrite produced a wrong type, or rules kept firing past the guard."""


class Decline(Exception):
    """Raised while building a replacement: the rule does not apply here (not an error), e.g. ``value(v)`` of
    a value that is no constant."""


class Builder:
    """Builds replacement nodes into the graph being rewritten (the engine moves them before the root)."""

    def __init__(self, graph: Graph, loc: Optional[str] = None):
        self.graph = graph
        self.loc = loc

    def op(self, name: str, *inputs: Value, _result: Optional[int] = None, **attrs) -> Value:
        """The result of a new node; ``_result=i`` picks result ``i`` of a multi-result op."""
        out = self.results(name, *inputs, **attrs)
        if _result is None:
            if len(out) != 1:
                raise RewriteError(f"replacement op {name} has {len(out)} results; use a single-result op "
                                   f"or pick one (_result=i, `{name}(...)[i]` in rule text)")
            return out[0]
        if not 0 <= _result < len(out):
            raise RewriteError(f"replacement op {name} has {len(out)} result(s), there is no result #{_result}")
        return out[_result]

    def results(self, name: str, *inputs: Value, **attrs) -> tuple:
        """Every result of a new node, as a tuple (for rules with a result list)."""
        out = self.graph.add_node(name, inputs, attrs, loc=self.loc)
        return out if isinstance(out, tuple) else (out,)

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
class Pick:
    """In a replacement: what a pattern ``Choice`` named ``name`` matched, mapped by position -- alternative
    i of ``source`` (the pattern's) gives ``options[i]`` (text ``act:("gelu"|"gelu_tanh")``); with
    ``options`` None the matched alternative itself (an op choice's name used as an op: ``f(x)``)."""
    name: str
    source: tuple
    options: Optional[tuple] = None
    ops: bool = False  # alternatives are op names (printed bare)

    def possible(self) -> tuple:
        return self.source if self.options is None else self.options

    def resolve(self, m: dict):
        v = m[self.name]
        for s, o in zip(self.source, self.possible()):
            if attr_eq(s, v):
                return o
        raise Decline(f"{self.name} = {v!r} is none of its alternatives {list(self.source)}")

    def __str__(self):
        if self.options is None:
            return self.name
        show = str if self.ops else attr_literal
        return f"{self.name}:({'|'.join(show(o) for o in self.options)})"


@dataclass(frozen=True, eq=False)
class TOp:
    op: Union[str, Pick]
    args: tuple
    attrs: dict = field(default_factory=dict)  # values: literals or AttrVar (bound in the pattern)
    pos: Optional[tuple] = None
    result: Optional[int] = None  # `split(x){...}[i]`: result i of a multi-result op

    def possible_ops(self) -> tuple:
        return (self.op,) if isinstance(self.op, str) else self.op.possible()

    def __str__(self):
        s = f"{self.op}({', '.join(str(a) for a in self.args)})"
        if self.attrs:
            s += "{" + ", ".join(f"{k}={v}" for k, v in self.attrs.items()) + "}"
        return s + (f"[{self.result}]" if self.result is not None else "")


def _compose(p, q):
    """The perm of ``permute(permute(x){perm=p}){perm=q}`` as one permute."""
    return [p[i] for i in q]


def _value(v):
    """The scalar of an all-equal constant Value; anything else declines the rewrite."""
    s = const_scalar(v)
    if s is None:
        what = f"%{v.name}" if isinstance(v, Value) else repr(v)
        raise Decline(f"value({what}): not a constant with all elements equal")
    return s


# Functions replacement attributes may apply to attribute values (or values) the pattern bound.
ATTR_FUNCTIONS: dict[str, Callable] = {"compose": _compose, "value": _value}


@dataclass(frozen=True, eq=False)
class AttrCall:
    fn: str
    args: tuple

    def __str__(self):
        return f"{self.fn}({', '.join(str(a) for a in self.args)})"


def _attr(v, m: dict):
    if isinstance(v, AttrVar):
        return m[v.name]
    if isinstance(v, Pick):
        return v.resolve(m)
    if isinstance(v, AttrCall):
        return ATTR_FUNCTIONS[v.fn](*(_attr(a, m) for a in v.args))
    if isinstance(v, list):
        return [_attr(a, m) for a in v]
    return v


class Template:
    """A replacement given as a tree; calling it builds the tree through a Builder.

    With ``multi`` the root op's results are returned as a tuple (rules with a result list)."""

    def __init__(self, root, multi: bool = False):
        self.root = root
        self.multi = multi

    def __call__(self, b: Builder, m: dict):
        return self._build(self.root, b, m, None, self.multi)

    def _build(self, t, b: Builder, m: dict, dtype: Optional[DType], multi: bool = False):
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
        name = _attr(t.op, m)
        if multi:
            return b.results(name, *built, **attrs)
        return b.op(name, *built, _result=t.result, **attrs)

    def ops(self) -> set:
        out, todo = set(), [self.root]
        while todo:
            t = todo.pop()
            if isinstance(t, TOp):
                out.update(t.possible_ops())
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
    # ("root", "s"): the replacement returns one Value per name; each replaces every use of that value
    results: Optional[tuple] = None

    def __post_init__(self):
        if not isinstance(self.pattern, (Op, Alt)) or (
                isinstance(self.pattern, Alt) and not all(isinstance(o, Op) for o in self.pattern.options)):
            raise RuleError(f"rule '{self.name}': the pattern root must be an op, got `{self.pattern}`")
        if self.results is not None:
            self._check_results()
        self.check()

    def _check_results(self) -> None:
        if isinstance(self.results, str) or not all(isinstance(n, str) for n in self.results):
            raise RuleError(f"{self.where()}: results must be a tuple of names, got {self.results!r}")
        self.results = tuple(self.results)
        shown = f"({', '.join(self.results)})"
        if "root" not in self.results:
            raise RuleError(f"{self.where()}: the result list {shown} must include root "
                            f"(the matched value is always replaced)")
        dup = sorted({n for n in self.results if self.results.count(n) > 1})
        if dup:
            raise RuleError(f"{self.where()}: the result list {shown} names {', '.join(dup)} twice")
        named = as_names(self.pattern)
        for n in self.results:
            if n != "root" and n not in named:
                how = "binds it as a variable, not with @" if n in self.pattern.var_names() else "does not bind it"
                raise RuleError(f"{self.where()}: result list names {n!r} but the pattern {how} "
                                f"(list root and values bound as name@op(...); @-bound: "
                                f"{', '.join(sorted(named)) or 'none'})")
        if isinstance(self.replacement, Template) and (
                not isinstance(self.replacement.root, TOp) or self.replacement.root.result is not None):
            raise RuleError(f"{self.where()}: with a result list the replacement must be one op call giving "
                            f"{len(self.results)} results, got `{self.replacement}`")

    def replaced(self, m: dict) -> list:
        """The values a match replaces, in result order."""
        return [m["$root"] if n == "root" else m[n] for n in (self.results or ("root",))]

    def check_outputs(self, out, olds: list) -> Optional[str]:
        """None if ``out`` (what the replacement returned) fits the replaced values, else what is wrong."""
        if self.results is None:
            if not isinstance(out, Value) or out.type != olds[0].type:
                got = out.type if isinstance(out, Value) else repr(out)
                return f"replacement has type {got}, the replaced value %{olds[0].name} has {olds[0].type}"
            return None
        shown = f"({', '.join(self.results)})"
        if not isinstance(out, (tuple, list)) or not all(isinstance(o, Value) for o in out):
            return f"replacement must give a tuple of values for the result list {shown}, got {out!r}"
        if len(out) != len(self.results):
            return f"replacement gives {len(out)} result(s) but the result list {shown} has {len(self.results)}"
        for i, (n, o, v) in enumerate(zip(self.results, out, olds)):
            if o.type != v.type:
                return (f"replacement result #{i} has type {o.type}, the value it replaces ({n} = %{v.name}) "
                        f"has {v.type}")
        return None

    def where(self) -> str:
        return f"rule '{self.name}'" + (f" ({self.source})" if self.source else "")

    def __str__(self) -> str:
        s = f"rule {self.name}: {self.pattern} => {self.replacement}"
        if self.results is not None:
            s += f" -> ({', '.join(self.results)})"
        return s + (f" where {self.constraint}" if self.constraint is not None else "")

    __repr__ = __str__

    def check(self) -> None:
        """Reject the rule if its replacement type differs from the root's on a probe typing.

        The vars are given one common probe type after another, bound attributes their op's default; the
        first typing under which the pattern builds (and the constraint holds) decides. No typing builds
        (e.g. an attribute without default is bound) -> nothing to check ("where possible"). A pattern with
        alternatives (``|``, choices) is checked for each combination of them (up to 64; beyond, the i-th
        alternative of every one together).
        """
        for sel in _selections(self.pattern):
            self._check_typing(sel)

    def _check_typing(self, sel: dict) -> None:
        for t in PROBES:
            g = Graph("probe")
            m: dict = {}
            try:
                root = _instantiate(self.pattern, g, m, t, sel=sel)
            except Exception:
                continue
            m["$root"] = root
            m["$graph"] = g
            if self.constraint is not None:
                try:
                    if not self.constraint(m):
                        continue
                except Exception:
                    continue
            try:
                out = self.replacement(Builder(g), m)
            except Decline:
                continue
            except Exception as e:
                raise RuleError(f"{self.where()}: replacement `{self.replacement}` does not build for "
                                f"operands of type {t}{_shown(sel, m)}: {e}") from None
            if self.results is None:
                if not isinstance(out, Value) or out.type != root.type:
                    got = out.type if isinstance(out, Value) else repr(out)
                    raise RuleError(f"{self.where()}: replacement produces {got} but the pattern root is "
                                    f"{root.type} (for operands of type {t}{_shown(sel, m)})")
                return
            problem = self.check_outputs(out, self.replaced(m))
            if problem:
                raise RuleError(f"{self.where()}: {problem} (for operands of type {t}{_shown(sel, m)})")
            return


PROBES = tuple(TensorType(s, d) for d, s in [
    (DType.f32, (3, 3)), (DType.f32, (2, 3, 3)), (DType.f32, (3,)), (DType.f32, ()),
    (DType.i64, (3, 3)), (DType.bool, (3, 3))])


_MAX_SELECTIONS = 64


def _choice_points(p) -> list:
    """The pattern's alternations (Alt nodes and Choices), in pattern order."""
    if isinstance(p, Alt):
        return [p] + [c for o in p.options for c in _choice_points(o)]
    if isinstance(p, Op):
        out = [p.op] if isinstance(p.op, Choice) else []
        out += [a for a in p.attrs.values() if isinstance(a, Choice)]
        return out + [c for a in p.args for c in _choice_points(a)]
    return []


def _selections(p) -> list:
    """Dicts alternation -> index of the alternative a probe instantiates: every combination, or (past
    _MAX_SELECTIONS) the i-th alternative of each together."""
    points = _choice_points(p)
    sizes = [len(c.options) for c in points]
    total = 1
    for n in sizes:
        total *= n
    if total <= _MAX_SELECTIONS:
        return [dict(zip(points, idx)) for idx in itertools.product(*(range(n) for n in sizes))]
    return [{c: min(i, n - 1) for c, n in zip(points, sizes)} for i in range(max(sizes))]


def _shown(sel: dict, m: dict) -> str:
    """Which alternatives a probe took, for messages: ", with f = 'silu', a = 'tanh'"."""
    names = [c.name for c in sel if isinstance(c, Choice) and c.name and c.name in m]
    return (", with " + ", ".join(f"{n} = {m[n]!r}" for n in dict.fromkeys(names))) if names else ""


def _chosen(c: Choice, sel: dict, m: dict):
    v = c.options[sel.get(c, 0)]
    if c.name:
        if c.name in m and not attr_eq(m[c.name], v):
            raise RuleError(f"{c.name} takes two alternatives in one probe")  # an inconsistent combination
        m[c.name] = v
    return v


def _instantiate(p, g: Graph, m: dict, t: TensorType, dtype: Optional[DType] = None, *,
                 sel: Optional[dict] = None) -> Value:
    """Build one graph the pattern matches, vars typed ``t`` (a probe for the type check); ``sel`` picks the
    alternative of each alternation (the first by default)."""
    sel = {} if sel is None else sel
    if isinstance(p, Alt):
        return _instantiate(p.options[sel.get(p, 0)], g, m, t, dtype, sel=sel)
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
    op_name = _chosen(p.op, sel, m) if isinstance(p.op, Choice) else p.op
    attrs = {}
    for k, a in p.attrs.items():
        if isinstance(a, AttrVar):  # a bound attribute: probe with the op's default (none -> no probe)
            if a.name not in m:
                spec = get_op(op_name).attrs[k]
                if spec.default is REQUIRED:
                    raise RuleError(f"attribute {k} of {op_name} has no default to probe with")
                m[a.name] = spec.default
            a = m[a.name]
        elif isinstance(a, Choice):
            a = _chosen(a, sel, m)
        attrs[k] = a
    args: list = [None] * len(p.args)
    for i, a in enumerate(p.args):
        if not isinstance(a, Const):
            args[i] = _instantiate(a, g, m, t, sel=sel)
    sib = next((v.type.dtype for v in args if v is not None), t.dtype)
    for i, a in enumerate(p.args):
        if isinstance(a, Const):
            args[i] = _instantiate(a, g, m, t, sib, sel=sel)
    out = g.add_node(op_name, args, attrs, name=p.name)
    if isinstance(out, tuple):
        if p.result is None:
            raise RuleError(f"{op_name} has {len(out)} results")
        out = out[p.result]
    elif p.result not in (None, 0):
        raise RuleError(f"{op_name} has 1 result")
    if p.name:
        m[p.name] = out
    return out


def check_ops(rule_name: str, tmpl: Template) -> None:
    """Every replacement op (each alternative a Pick may give) exists, takes that many operands and those
    attrs (raises RuleError)."""
    todo = [tmpl.root]
    while todo:
        t = todo.pop()
        if not isinstance(t, TOp):
            continue
        for name in t.possible_ops():
            try:
                d = get_op(name)
            except OpError as e:
                raise RuleError(f"rule '{rule_name}': {e}") from None
            problem = d.arity_error(len(t.args))
            if problem:
                raise RuleError(f"rule '{rule_name}': replacement op {name} {problem}")
            unknown = set(t.attrs) - set(d.attrs)
            if unknown:
                raise RuleError(f"rule '{rule_name}': replacement op {name} has no attribute(s) "
                                f"{sorted(unknown)}; it takes {sorted(d.attrs) or 'none'}")
        todo.extend(t.args)
