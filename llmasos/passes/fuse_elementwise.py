"""Group chains of elementwise ops into ``fused.elementwise`` nodes: ``fuse-elementwise``.

A group is a tree: its root is an elementwise node, and every elementwise producer whose only use is
inside the group joins it (a value used twice is computed once, so it stays a group boundary). The
group's leaves become the fused node's operands, in first-use order; scalar constants stay operands (a
backend inlines them). The fused node's reference semantics evaluates the same ops with the same dtype
rules, so the pass is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from ..ir.opset.fused import ELEMENTWISE, format_expr
from .base import NO_CONTEXT, Pass, PassContext, register_pass


@register_pass("fuse-elementwise")
@dataclass(frozen=True)
class FuseElementwise(Pass):
    min_ops: int = 2  # smaller groups are left alone
    max_ops: int = 64  # a bound on one kernel's expression (and on the expr text)

    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        outputs = set(graph.outputs)

        def joins(v) -> bool:
            n = v.producer
            return (n is not None and n.op in ELEMENTWISE and len(n.outputs) == 1 and v not in outputs
                    and len(v.uses) == 1)

        plans = []
        for node in graph.nodes:
            if node.op not in ELEMENTWISE or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if joins(out) and out.uses[0].node.op in ELEMENTWISE:
                continue  # not a root: its single user is elementwise and will take it in
            leaves: list = []
            members: list = []

            def build(v, depth=0):
                n = v.producer
                if v is not out and (not joins(v) or len(members) >= self.max_ops):
                    if v not in leaves:
                        leaves.append(v)
                    return leaves.index(v)
                members.append(n)
                args = tuple(build(a) for a in n.inputs)
                attrs = tuple(sorted((k, val) for k, val in n.attrs.items()))
                return (n.op, attrs, args)

            expr = build(out)
            if len(members) >= self.min_ops:
                plans.append((node, members, leaves, format_expr(expr)))
        if not plans:
            return graph
        m: dict = {}
        g = graph.clone(mapping=m)
        for root, members, leaves, expr in plans:
            new_root = m[root]
            # a leaf may be the root of a group fused before this one: m maps it to its fused value by now
            with g.insert_before(new_root):
                fused = g.add_node("fused.elementwise", [m[v] for v in leaves], {"expr": expr}, loc=root.loc,
                                   name=root.outputs[0].name + "_fused")
            m[root.outputs[0]] = fused
            g.replace_all_uses_with(new_root.outputs[0], fused)
            g.erase_nodes(m[n] for n in members)
        return g
