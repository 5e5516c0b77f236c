"""Merge GEMMs that share their input into one (Q/K/V projections, Llama's gate/up): ``merge-linears``.

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
 => qkv = linear(x, concat(Wq, Wk, Wv)); q, k, v = split(qkv)

One GEMM with N = Nq + Nk + Nv reads x once and launches once; the weight concat is parameter-only work,
which the TVM backend hoists to load time (main_transform_params), so it costs nothing per call. Only
GEMMs whose weights (and biases) are parameters merge: concatenating activations would be per-call work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, register_pass
from .surgery import is_param

# op -> weight axis that holds the output features (linear: W [out, in]; matmul: W [in, out])
_OUT_AXIS = {"linear": 0, "matmul": 1}


@register_pass("merge-linears")
@dataclass(frozen=True)
class MergeLinears(Pass):
    """Exact in real arithmetic, not bit for bit: a GEMM library blocks K differently for a different N
    (numpy's BLAS does), so sums may round differently in the last bits."""

    min_group: int = 2  # merge only groups of at least this many GEMMs

    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-5
    atol: ClassVar[float] = 1e-6

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        groups = _groups(graph)
        groups = [g for g in groups if len(g) >= max(self.min_group, 2)]
        if not groups:
            return graph
        m: dict = {}
        g = graph.clone(mapping=m)
        for group in groups:
            _merge(g, [m[n] for n in group])
        return g


def _groups(graph: Graph) -> list:
    """Lists of GEMM nodes (program order) with the same op, input, dtype and bias presence."""
    found: dict = {}
    for n in graph.nodes:
        if n.op not in _OUT_AXIS or len(n.outputs) != 1:
            continue
        w = n.inputs[1]
        if not is_param(graph, w) or w.type.rank != 2 or not w.type.is_static:
            continue
        if n.op == "matmul" and len(n.inputs) != 2:
            continue
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        if bias is not None and not is_param(graph, bias):
            continue
        key = (n.op, n.inputs[0], w.type.dtype, bias is not None)
        found.setdefault(key, []).append(n)
    return list(found.values())


def _merge(g: Graph, nodes: list) -> None:
    """One GEMM + split where ``nodes`` (program order) were; their users read the split's pieces."""
    op = nodes[0].op
    axis = _OUT_AXIS[op]
    x = nodes[0].inputs[0]
    sizes = [n.inputs[1].type.shape[axis] for n in nodes]
    loc = nodes[0].loc
    with g.insert_before(nodes[0]):  # x and the parameters are defined before the first of them
        w = g.add_node("concat", [n.inputs[1] for n in nodes], {"axis": axis}, loc=loc, name="merged_weight")
        ins = [x, w]
        if len(nodes[0].inputs) > 2:
            ins.append(g.add_node("concat", [n.inputs[2] for n in nodes], {"axis": 0}, loc=loc, name="merged_bias"))
        y = g.add_node(op, ins, loc=loc, name="merged")
        parts = g.add_node("split", [y], {"axis": -1, "sizes": sizes}, loc=loc)
    parts = parts if isinstance(parts, tuple) else (parts,)
    for n, p in zip(nodes, parts):
        g.replace_node(n, p)
