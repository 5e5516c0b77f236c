"""Common subexpression elimination: a node with the same op, operands and attributes as an earlier one
is replaced by that earlier node's results."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..ir import Graph, Node
from ..ir.graph import attrs_equal
from .base import NO_CONTEXT, Pass, PassContext, register_pass


def attrs_identical(a: dict, b: dict) -> bool:
    """attrs_equal, and bit-identical floats: 0.0 and -0.0 are equal but 1/x tells them apart."""
    if not attrs_equal(a, b):
        return False
    return all(_same_bits(a[k], b[k]) for k in a)


def _same_bits(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return x.tobytes() == y.tobytes()
    if isinstance(x, float) and isinstance(y, float):
        return math.isnan(x) and math.isnan(y) or np.float64(x).tobytes() == np.float64(y).tobytes()
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return all(_same_bits(p, q) for p, q in zip(x, y))
    return True


@register_pass("cse")
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Keeps the first of each set of equal nodes; ops are pure, so equal nodes compute equal results."""

    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        g = graph.clone()
        seen: dict[tuple, list[Node]] = {}
        twins = []  # the duplicates; in program order, a node's operands already read the kept nodes when keyed
        for node in list(g.nodes):
            key = (node.op, tuple(node.inputs), tuple(str(o.type) for o in node.outputs), tuple(sorted(node.attrs)))
            twin = next((n for n in seen.get(key, ()) if attrs_identical(n.attrs, node.attrs)), None)
            if twin is None:
                seen.setdefault(key, []).append(node)
            else:
                g.replace_uses(dict(zip(node.outputs, twin.outputs)))  # later nodes now read the twin
                twins.append(node)
        if not twins:
            return graph
        g.erase_nodes(twins)
        return g
