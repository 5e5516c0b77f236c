"""Split a GEMM result into attention heads before slicing it: ``split-heads``.

    q, k, v = split(qkv){axis=-1}; q4 = reshape(q){[b, s, hq, d]}; ...
 => qkv4 = reshape(qkv){[b, s, hq+hk+hv, d]}; q4 = slice(qkv4){axis=-2, 0, hq}; ...

Same values (pure data movement), so exact. Why: a slice of a row is not contiguous, so a backend
copies it and then copies again for the reshape (TVM keeps such a reshape as its own kernel); the
reshape of the whole result is a free view, and the slice then fuses with the heads transpose after it.
Merged Q/K/V projections (merge-linears) and GPT-2's c_attn produce exactly this split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, register_pass


@register_pass("split-heads")
@dataclass(frozen=True)
class SplitHeads(Pass):
    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        if not any(n.op == "split" and _heads(graph, n) is not None for n in graph.nodes):
            return graph
        g = graph.clone()
        for n in [m for m in g.nodes if m.op == "split"]:
            heads = _heads(g, n)
            if heads is not None:
                _rewrite(g, n, *heads)
        return g


def _heads(g: Graph, node):
    """(lead dims, d) when the split is on the last axis and each result's one use is a reshape to
    [*lead, heads_i, d] with d dividing every piece."""
    x = node.inputs[0]
    if node.attrs["axis"] % x.type.rank != x.type.rank - 1:
        return None
    lead = d = None
    for out in node.outputs:
        if len(out.uses) != 1 or out.uses[0].node.op != "reshape" or out in g.outputs:
            return None
        shape = tuple(out.uses[0].node.outputs[0].type.shape)
        if len(shape) != x.type.rank + 1 or shape[:-2] != tuple(x.type.shape[:-1]):
            return None
        if lead is None:
            lead, d = shape[:-2], shape[-1]
        elif shape[:-2] != lead or shape[-1] != d:
            return None
    if not isinstance(d, int) or any(not isinstance(s, int) or s % d for s in node.attrs["sizes"]):
        return None
    return lead, d


def _rewrite(g: Graph, node, lead, d) -> None:
    """One reshape of the split's input to heads, and a slice of it for each piece's reshape, where the split
    was; the reshapes' users read the slices."""
    x = node.inputs[0]
    reshapes = [out.uses[0].node for out in node.outputs]
    slices, off = [], 0
    with g.insert_before(node):
        x4 = g.add_node("reshape", [x], {"shape": [*lead, x.type.shape[-1] // d, d]}, loc=node.loc,
                        name=x.name + "_heads")
        for reshape, size in zip(reshapes, node.attrs["sizes"]):
            slices.append(g.add_node("slice", [x4], {"axis": -2, "start": off // d, "end": (off + size) // d},
                                     loc=reshape.loc))
            off += size
    for reshape, sl in zip(reshapes, slices):
        g.replace_node(reshape, sl)
    g.erase(node)
