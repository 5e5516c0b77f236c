"""The rewrite driver: apply rule sets to a fixed point, with a guard against rules that never stop.

Only the root of a match is replaced (its uses are redirected to the replacement) -- or, for a rule with a
result list, the root and the listed interior values, one result of the replacement each; interior nodes
stay as long as something else uses them, and a final cleanup drops nodes whose results nobody uses. Every
result of every node is tried as a root.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from llmasos.ir import Graph, Value
from llmasos.ir.graph import attrs_equal

from .pattern import match
from .rule import Builder, Decline, RewriteError, Rule


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
        # as the sweep starts: nodes a rewrite leaves dead stay until the sweep's end, and still count
        outs = set(g.outputs)
        used = {o for n in g.nodes if len(n.outputs) > 1 for o in n.outputs if o.uses or o in outs}
        for node in list(g.nodes):
            for root in list(node.outputs):
                if len(node.outputs) > 1 and root not in used:
                    continue  # an unused result of a live node: DCE cannot remove it, rewriting it never settles
                for rule in rules:
                    if _try(g, rule, node, root):
                        fired[rule.name] += 1
                        total += 1
                        if total > max_rewrites:
                            stats.update(fired)
                            raise RewriteError(f"gave up after {max_rewrites} rewrites (rules that may loop); "
                                               f"rules that kept firing: {_firing(stats)}")
                        break
        stats.update(fired)
        g.erase_nodes(g.dead_nodes())
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


def first_match(rule: Rule, root: Value, graph: Optional[Graph] = None) -> Optional[dict]:
    """The first bindings under which ``rule`` matches at ``root`` and its constraint holds.

    ``graph`` (bound as ``$graph``) is needed by constraints that count uses (``users(v)``)."""
    for b in match(rule.pattern, root, {}):
        b = {**b, "$root": root, "$graph": graph}
        if rule.constraint is None or rule.constraint(b):
            return b
    return None


def build(g: Graph, rule: Rule, m: dict, node=None):
    """Build the replacement into ``g`` right before ``node`` (the root's node when None), with its loc.

    Returns (what the replacement returned, the nodes it added) -- the nodes stay in ``g``, unused, for the
    caller to apply or erase -- or (None, reason) with nothing left behind if the rule declines or the
    match is rejected (it would form a cycle). Raises RewriteError if the replacement fails or has the
    wrong types."""
    node = node if node is not None else m["$root"].producer
    at = g.insert_before(node) if node is not None else g.insert_at_end()
    with at as ip:
        try:
            new = rule.replacement(Builder(g, loc=node.loc if node is not None else None), m)
        except Decline as e:
            g.erase_nodes(ip.inserted)
            return None, f"replacement declined: {e}"
        except Exception as e:
            g.erase_nodes(ip.inserted)
            raise RewriteError(f"{rule.where()} failed to build its replacement at {_at(m)}: {e}") from e
    added = ip.inserted
    olds = rule.replaced(m)
    problem = rule.check_outputs(new, olds)
    if problem:
        g.erase_nodes(added)
        raise RewriteError(f"{rule.where()} at {_at(m)}: {problem}")
    cycle = _cycle(added, new if rule.results is not None else (new,), olds)
    if cycle:
        g.erase_nodes(added)
        return None, cycle
    return new, added


def _at(m: dict) -> str:
    root = m["$root"]
    return root.producer.describe() if root.producer is not None else f"%{root.name}"


def _cycle(added: list, news, olds: list) -> Optional[str]:
    """Why replacing ``olds`` by ``news`` would make a cycle (an input of the new nodes depends on a replaced
    value), else None."""
    made = set(added)
    inputs = [v for n in added for v in n.inputs if v.producer not in made]
    inputs += [v for v in news if v.producer not in made]  # passed through as is
    replaced = set(olds)
    if len(replaced) != len(olds):
        return "match rejected: the result list names one value twice"
    seen: set = set()
    for start in inputs:
        todo = [start]
        while todo:
            v = todo.pop()
            if v in replaced:
                return (f"match rejected: replacement input %{start.name} "
                        f"{'is' if v is start else 'depends on'} %{v.name}, which the rule replaces; "
                        f"rewriting would create a cycle")
            if len(olds) == 1:
                break  # single result: inputs are bound below the root, only the root itself can be one
            if v in seen or v.producer is None:
                continue
            seen.add(v)
            todo.extend(v.producer.inputs)
    return None


def _try(g: Graph, rule: Rule, node, root: Value) -> bool:
    m = first_match(rule, root, g)
    if m is None:
        return False
    # replacement nodes use only bound values (which dominate the root) and each other: before the root
    new, added = build(g, rule, m, node)
    if new is None:
        return False
    olds = rule.replaced(m)
    news = list(new) if rule.results is not None else [new]
    if all(n is o or (n.producer is not None and o.producer is not None and n.index == o.index
                      and _same_node(n.producer, o.producer)) for n, o in zip(news, olds)):
        g.erase_nodes(added)
        return False  # rebuilding the replaced values as they were is no rewrite (and would never settle)
    g.replace_uses(dict(zip(olds, news)))
    if len(olds) > 1:  # a replaced interior value may have users before the root
        g.sort_topologically()
    return True


def _same_node(a, b) -> bool:
    return (a is not None and a.op == b.op and len(a.inputs) == len(b.inputs)
            and all(x is y for x, y in zip(a.inputs, b.inputs)) and attrs_equal(a.attrs, b.attrs))
