"""Common subexpression elimination: a node with the same op, operands and attributes as an earlier one
is replaced by that earlier node's results."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..ir import Graph, Node
from ..ir.graph import attrs_equal
from .base import Pass, register_pass


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

    def run(self, graph: Graph) -> Graph:
        g = graph.clone()
        replace: dict[int, Any] = {}  # id(duplicate's result) -> the kept node's result
        seen: dict[tuple, list[Node]] = {}
        kept: list[Node] = []
        for node in g.nodes:
            node.inputs = [replace.get(id(v), v) for v in node.inputs]
            key = (node.op, tuple(id(v) for v in node.inputs), tuple(str(o.type) for o in node.outputs),
                   tuple(sorted(node.attrs)))
            twin = next((n for n in seen.get(key, ()) if attrs_identical(n.attrs, node.attrs)), None)
            if twin is None:
                seen.setdefault(key, []).append(node)
                kept.append(node)
            else:
                for o, t in zip(node.outputs, twin.outputs):
                    replace[id(o)] = t
        if not replace:
            return graph
        g.nodes = kept
        g.outputs = [replace.get(id(v), v) for v in g.outputs]
        return g
