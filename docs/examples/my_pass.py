"""A pass in a few lines: rules from a .rw file next to this module, run to a fixed point."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llmasos.ir import Graph
from llmasos.passes import Pass, PassContext, register_pass
from llmasos.passes.rewrite import apply_rules, load_rules

RULES = load_rules(Path(__file__).with_name("my_rules.rw"))


@register_pass("strength-reduce")
@dataclass(frozen=True)
class StrengthReduce(Pass):
    """pow(x, 2) -> x*x, x/2 -> x*0.5; pow may round differently from mul, so declare a tolerance."""

    max_rewrites: int = 1000  # an option: strength-reduce{max_rewrites=10}

    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-6
    atol: ClassVar[float] = 1e-7

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        stats: dict = {}
        out = apply_rules(graph, RULES, max_rewrites=self.max_rewrites, stats=stats)
        return out if stats else graph  # unchanged: return the input itself
