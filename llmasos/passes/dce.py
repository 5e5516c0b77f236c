"""Dead code elimination: drop nodes whose results nothing uses, and parameters nothing reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from .base import Pass, register_pass


@register_pass("dce")
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Graph outputs are the roots; graph inputs stay even when unused (they are the signature)."""

    exact: ClassVar[bool] = True

    def run(self, graph: Graph) -> Graph:
        live: set[int] = {id(v) for v in graph.outputs}
        keep = [False] * len(graph.nodes)
        for i in range(len(graph.nodes) - 1, -1, -1):  # reverse program order: users before producers
            node = graph.nodes[i]
            if any(id(o) in live for o in node.outputs):
                keep[i] = True
                live.update(id(v) for v in node.inputs)
        dead_params = [name for name, v in graph.params.items() if id(v) not in live]
        if all(keep) and not dead_params:
            return graph
        g = graph.clone()
        g.nodes = [n for n, k in zip(g.nodes, keep) if k]
        for name in dead_params:
            del g.params[name]
            g.param_data.pop(name, None)
        return g
