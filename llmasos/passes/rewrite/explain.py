""""Why didn't it match": for a rule and a node, the sub-pattern or constraint that failed, or why a match was
rejected (the replacement declined, or a multi-result rewrite would create a cycle)."""
from __future__ import annotations

from llmasos.ir import Graph, Node, Value

from .engine import build
from .pattern import match
from .rule import RewriteError, Rule


def explain(rule: Rule, graph: Graph, node) -> str:
    """A report on matching ``rule`` at ``node`` (a Node, its result Value, or the result's name)."""
    root = _root(graph, node)
    trace: list = []
    candidates = 0
    for b in match(rule.pattern, root, {}, trace):
        candidates += 1
        b = {**b, "$root": root, "$graph": graph}
        if rule.constraint is not None:
            try:
                ok = rule.constraint(b)
            except Exception as e:
                return f"{rule.where()}: constraint `{rule.constraint}` raised {e!r} with {_bindings(b)}"
            if not ok:
                detail = rule.constraint.describe(b) if hasattr(rule.constraint, "describe") else _bindings(b)
                trace.append(f"constraint `{rule.constraint}` is false: {detail}")
                continue
        rejected = _trial(graph, rule, b)
        if rejected:
            return f"{rule.where()} matches %{root.name} but {rejected}; with {_bindings(b)}"
        return f"{rule.where()} matches %{root.name}: {_bindings(b)}"
    what = root.producer.describe() if root.producer is not None else "a graph input or parameter"
    head = f"{rule.where()} does not match %{root.name} ({what}):"
    if not trace:
        return head + " no candidate"
    # the deepest failure is the most informative; alternatives and operand orders each add one
    lines = [f"  - {t}" for t in dict.fromkeys(str(t) for t in trace)]
    return "\n".join([head, *lines])


def _trial(graph: Graph, rule: Rule, m: dict):
    """Why the engine would not apply this match (None if it would): builds the replacement into ``graph``
    and takes it out again, leaving the graph's names as they were."""
    names, counter = set(graph._names), graph._counter
    try:
        new, why = build(graph, rule, m)
        if new is not None:
            graph.erase_nodes(why)  # the nodes it added, unused
            why = None
    except RewriteError as e:
        return f"applying it fails: {e}"
    finally:
        graph._names, graph._counter = names, counter
    return why


def _root(graph: Graph, node) -> Value:
    if isinstance(node, Value):
        return node
    if isinstance(node, Node):
        if len(node.outputs) != 1:
            raise ValueError(f"{node.describe()} has {len(node.outputs)} results; pass the result to explain "
                             f"(a Value or its name)")
        return node.outputs[0]
    for v in graph.values():
        if v.name == str(node).lstrip("%"):
            return v
    raise KeyError(f"no value %{node} in graph {graph.name}")


def _bindings(b: dict) -> str:
    parts = []
    for k, v in b.items():
        if k.startswith("$"):
            continue
        parts.append(f"{k} = %{v.name}: {v.type}" if isinstance(v, Value) else f"{k} = {v!r}")
    return ", ".join(parts) or "(no variables)"
