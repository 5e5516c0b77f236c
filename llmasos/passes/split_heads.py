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
from .base import Pass, register_pass


@register_pass("split-heads")
@dataclass(frozen=True)
class SplitHeads(Pass):
    exact: ClassVar[bool] = True

    def run(self, graph: Graph) -> Graph:
        users = graph.users()
        todo = [n for n in graph.nodes if n.op == "split" and _heads(graph, n, users) is not None]
        if not todo:
            return graph
        g = graph.clone()
        users = g.users()
        for n in [m for m in g.nodes if m.op == "split"]:
            heads = _heads(g, n, users)
            if heads is not None:
                _rewrite(g, n, users, *heads)
        return g


def _heads(g: Graph, node, users):
    """(lead dims, d) when the split is on the last axis and each result's one use is a reshape to
    [*lead, heads_i, d] with d dividing every piece."""
    x = node.inputs[0]
    if node.attrs["axis"] % x.type.rank != x.type.rank - 1:
        return None
    lead = d = None
    for out in node.outputs:
        us = users.get(out, [])
        if len(us) != 1 or us[0].op != "reshape" or out in g.outputs:
            return None
        shape = tuple(us[0].outputs[0].type.shape)
        if len(shape) != x.type.rank + 1 or shape[:-2] != tuple(x.type.shape[:-1]):
            return None
        if lead is None:
            lead, d = shape[:-2], shape[-1]
        elif shape[:-2] != lead or shape[-1] != d:
            return None
    if not isinstance(d, int) or any(not isinstance(s, int) or s % d for s in node.attrs["sizes"]):
        return None
    return lead, d


def _rewrite(g: Graph, node, users, lead, d) -> None:
    x = node.inputs[0]
    start = len(g.nodes)
    x4 = g.add_node("reshape", [x], {"shape": [*lead, x.type.shape[-1] // d, d]}, loc=node.loc,
                    name=x.name + "_heads")
    old, off = {}, 0
    for out, size in zip(node.outputs, node.attrs["sizes"]):
        reshape = users[out][0]
        old[reshape.outputs[0]] = g.add_node("slice", [x4], {"axis": -2, "start": off // d,
                                                            "end": (off + size) // d}, loc=reshape.loc)
        off += size
    added = g.nodes[start:]
    del g.nodes[start:]
    i = g.nodes.index(node)
    g.nodes[i:i + 1] = added
    gone = {id(users[o][0]) for o in node.outputs}
    g.nodes = [n for n in g.nodes if id(n) not in gone]
    for n in g.nodes:
        n.inputs = [old.get(v, v) for v in n.inputs]
    g.outputs = [old.get(v, v) for v in g.outputs]
