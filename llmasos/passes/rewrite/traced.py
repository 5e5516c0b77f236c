"""Rules from a pair of plain Python functions, traced like torch.fx's subgraph rewriter.

    def pattern(x, w, b):
        return ops.gelu(ops.linear(x, w, b))
    def replacement(x, w, b):
        return ops.gelu(ops.linear(x, w, b), approximate="tanh")
    rule = traced_rule("gelu-tanh", pattern, replacement)

Each parameter becomes a variable; ``ops.NAME(*values, **attrs)`` and the operators ``+ - * / -x`` build
op nodes, ``[i]`` picks result i of a multi-result op; Python numbers become constants (in the pattern: a
``const`` node all equal to the number; in the replacement: a scalar of the sibling operand's dtype). The
pattern trace is a pattern tree, the replacement trace a Template; both are checked like text rules at
construction.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

from llmasos.ir import OpError, get_op

from .pattern import Const, Op, Var
from .rule import Rule, RuleError, Template, TConst, TOp, TVar, check_ops


class Traced:
    """A value seen while tracing: an expression node (``("var", name)``, ``("const", v)``, ``("op", ...)``)."""

    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = expr

    def _bin(self, name, other, swap=False):
        other = _lift(other)
        return Traced(("op", name, (other.expr, self.expr) if swap else (self.expr, other.expr), {}))

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("div", o)
    def __rtruediv__(self, o): return self._bin("div", o, True)
    def __matmul__(self, o): return self._bin("matmul", o)
    def __neg__(self): return Traced(("op", "neg", (self.expr,), {}))

    def __getitem__(self, i):  # result i of a multi-result op: ops.split(x, axis=1, sizes=z)[1]
        if self.expr[0] != "op" or not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TypeError(f"only an op's result can be picked, by an int >= 0; got [{i!r}]")
        return Traced(("idx", self.expr, i))

    def __bool__(self):
        raise TypeError("traced values have no truth value: patterns cannot branch on data")


def _lift(v) -> Traced:
    if isinstance(v, Traced):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return Traced(("const", v))
    raise TypeError(f"cannot use {v!r} in a traced pattern (values, ints and floats only)")


class _Ops:
    """``ops.gelu(x)``, ``ops.linear(x, w, b)``, ``ops.reshape(x, shape=[...])``: any registered op."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def build(*args, **attrs):
            return Traced(("op", name, tuple(_lift(a).expr for a in args), attrs))
        build.__name__ = name
        return build


ops = _Ops()


def trace(fn: Callable):
    """The expression tree ``fn`` computes from its parameters, and those parameter names."""
    names = list(inspect.signature(fn).parameters)
    out = fn(*(Traced(("var", n)) for n in names))
    if not isinstance(out, Traced):
        raise TypeError(f"{fn.__name__} must return a traced value, got {type(out).__name__}")
    return out.expr, names


def _to_pattern(e, rule_name):
    if e[0] == "idx":
        return _to_pattern(e[1], rule_name)[e[2]]
    if e[0] == "var":
        return Var(e[1])
    if e[0] == "const":
        return Const(e[1])
    _, name, args, attrs = e
    try:
        d = get_op(name)
    except OpError as err:
        raise RuleError(f"rule '{rule_name}': pattern: {err}") from None
    problem = d.arity_error(len(args))
    if problem:
        raise RuleError(f"rule '{rule_name}': pattern op {name} {problem}")
    return Op(name, tuple(_to_pattern(a, rule_name) for a in args), dict(attrs))


def _to_template(e):
    if e[0] == "idx":
        t = _to_template(e[1])
        return TOp(t.op, t.args, t.attrs, t.pos, e[2])
    if e[0] == "var":
        return TVar(e[1])
    if e[0] == "const":
        return TConst(e[1])
    _, name, args, attrs = e
    return TOp(name, tuple(_to_template(a) for a in args), dict(attrs))


def traced_rule(name: str, pattern: Callable, replacement: Callable,
                constraint: Optional[Callable[[dict], bool]] = None) -> Rule:
    pexpr, pnames = trace(pattern)
    rexpr, rnames = trace(replacement)
    if pnames != rnames:
        raise RuleError(f"rule '{name}': pattern takes ({', '.join(pnames)}) but replacement takes "
                        f"({', '.join(rnames)}); they must have the same parameters")
    tmpl = Template(_to_template(rexpr))
    check_ops(name, tmpl)
    rule = Rule(name, _to_pattern(pexpr, name), tmpl, constraint)
    rule.check()
    return rule
