"""Dead code elimination: drop nodes whose results nothing uses, and parameters nothing reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, register_pass


@register_pass("dce")
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Graph outputs are the roots; graph inputs stay even when unused (they are the signature)."""

    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        dead = set(graph.dead_nodes())
        outs = set(graph.outputs)
        dead_params = [name for name, v in graph.params.items()
                       if v not in outs and all(u.node in dead for u in v.uses)]
        if not dead and not dead_params:
            return graph
        m: dict = {}
        g = graph.clone(mapping=m)
        g.erase_nodes(m[n] for n in graph.nodes if n in dead)
        for name in dead_params:
            g.remove_param(name)
        return g
