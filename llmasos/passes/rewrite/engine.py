"""The rewrite driver: apply rule sets to a fixed point, with a guard against rules that never stop.

Only the root of a match is replaced (its uses are redirected to the replacement); interior nodes stay as
long as something else uses them, and a final cleanup drops nodes whose results nobody uses.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from llmasos.ir import Graph, Value
from llmasos.ir.graph import attrs_equal

from .pattern import match
from .rule import Builder, RewriteError, Rule


class RuleSet:
    """An ordered, composable collection of rules (``a + b``, ``a + [rule]``)."""

    def __init__(self, rules: Iterable[Rule] = (), name: str = "rules"):
        self.rules = list(rules)
        self.name = name
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule set {name}: duplicate rule name(s) {dup}")

    def __add__(self, other) -> "RuleSet":
        return RuleSet(self.rules + list(_rules(other)), f"{self.name}+{getattr(other, 'name', 'rules')}")

    def __radd__(self, other) -> "RuleSet":
        return RuleSet(list(_rules(other)) + self.rules, self.name)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)

    def __getitem__(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule {name!r} in {self.name}; it has {[r.name for r in self.rules]}")


def _rules(rules) -> list:
    if isinstance(rules, Rule):
        return [rules]
    out = []
    for r in rules:
        out.extend(_rules(r) if not isinstance(r, Rule) else [r])
    return out


@dataclass
class RewriteResult:
    graph: Graph
    stats: Counter = field(default_factory=Counter)  # rule name -> times it fired
    iterations: int = 0


def rewrite(graph: Graph, rules, *, max_iterations: int = 100, max_rewrites: int = 10_000) -> RewriteResult:
    """Rewrite a clone of ``graph`` until no rule matches; raises RewriteError past either guard."""
    rules = _rules(rules)
    g = graph.clone()
    stats: Counter = Counter()
    total = 0
    it = 0
    while True:
        if it >= max_iterations:
            raise RewriteError(f"no fixed point after {max_iterations} iterations; rules still firing: "
                               f"{_firing(stats)}")
        it += 1
        fired = Counter()
        for node in list(g.nodes):
            if len(node.outputs) != 1:
                continue
            for rule in rules:
                if _try(g, rule, node):
                    fired[rule.name] += 1
                    total += 1
                    if total > max_rewrites:
                        stats.update(fired)
                        raise RewriteError(f"gave up after {max_rewrites} rewrites (rules that may loop); "
                                           f"rules that kept firing: {_firing(stats)}")
                    break
        stats.update(fired)
        _dce(g)
        if not fired:
            return RewriteResult(g, stats, it)


def apply_rules(graph: Graph, rules, *, max_iterations: int = 100, max_rewrites: int = 10_000,
                stats: Optional[dict] = None) -> Graph:
    """The rewritten clone of ``graph``; ``stats`` (a dict) receives rule name -> number of rewrites."""
    res = rewrite(graph, rules, max_iterations=max_iterations, max_rewrites=max_rewrites)
    if stats is not None:
        stats.update(res.stats)
    return res.graph


def _firing(stats: Counter) -> str:
    return ", ".join(f"{n} ({c}x)" for n, c in stats.most_common()) or "none"


def first_match(rule: Rule, root: Value) -> Optional[dict]:
    for b in match(rule.pattern, root, {}):
        b = {**b, "$root": root}
        if rule.constraint is None or rule.constraint(b):
            return b
    return None


def _try(g: Graph, rule: Rule, node) -> bool:
    root = node.outputs[0]
    m = first_match(rule, root)
    if m is None:
        return False
    start = len(g.nodes)
    try:
        new = rule.replacement(Builder(g, loc=node.loc), m)
    except Exception as e:
        del g.nodes[start:]
        raise RewriteError(f"{rule.where()} failed to build its replacement at {node.describe()}: {e}") from e
    added = g.nodes[start:]
    if not isinstance(new, Value) or new.type != root.type:
        del g.nodes[start:]
        got = new.type if isinstance(new, Value) else repr(new)
        raise RewriteError(f"{rule.where()} at {node.describe()}: replacement has type {got}, "
                           f"the replaced value %{root.name} has {root.type}")
    if new is root or _same_node(new.producer, node):
        del g.nodes[start:]  # rebuilding the root as it was is no rewrite (and would never settle)
        return False
    # replacement nodes use only bound values (which dominate the root) and each other
    del g.nodes[start:]
    i = g.nodes.index(node)
    g.nodes[i:i] = added
    for n in g.nodes:
        n.inputs = [new if v is root else v for v in n.inputs]
    g.outputs = [new if v is root else v for v in g.outputs]
    return True


def _same_node(a, b) -> bool:
    return (a is not None and a.op == b.op and len(a.inputs) == len(b.inputs)
            and all(x is y for x, y in zip(a.inputs, b.inputs)) and attrs_equal(a.attrs, b.attrs))


def _dce(g: Graph) -> None:
    used = {id(v) for v in g.outputs}
    keep = []
    for n in reversed(g.nodes):
        if any(id(o) in used for o in n.outputs):
            keep.append(n)
            used.update(id(v) for v in n.inputs)
    g.nodes = keep[::-1]
