"""Structured attention-head pruning that shrinks tensor shapes: ``prune-heads``.

    prune-heads{ratio=0.25, exclude=""}

Finds attention blocks as imported from torch.export -- projections (linear with weight [out, in], or
GPT-2's Conv1D matmul [in, out] + bias, packed q|k|v and split), head reshapes / transposes, RoPE,
grouped-query repeat (expand_dims + broadcast_to + reshape), ``sdpa``, the transpose back and reshape, and
the output projection -- and removes whole head *groups*: under GQA a kv head together with the ``rep``
query heads that read it (so the q:kv ratio stays), under multi-head attention one head. The groups of a
layer are scored (compress.heads.head_group_scores: with calibration data the output projection's input
rms per channel times its weight column norms, pooled per group; else weight norms) and
round(G * (1 - ratio)) are kept, at least one. q/k/v rows, the output projection's columns, biases and
every shape attribute in between (reshape / broadcast_to / split) shrink. Dropping a group is exactly the
original model with that group's output-projection columns zeroed.

How blocks are found: from each ``sdpa`` the q, k and v operands are walked back to the GEMM that produces
each (the projections), and the sdpa result forward through permute / reshape to the GEMM that consumes it
(the output projection). The nodes between carry a "group axis" -- (axis, unit, segments): that axis
holds ``segments`` copies of G consecutive blocks of ``unit`` elements, one block per group -- which the
pass follows through every node; a node it cannot follow it through is an error naming that node, never
a silently wrong graph.

It must run before ``fuse``: merge-linears concatenates q/k/v weights (a computed weight) and the fused
ops hide the reshapes, so a fused attention block is a PassNotApplicable saying so.
``exclude``: comma-separated substrings of a projection's weight name or module path (its loc); a block
any of whose projections matches is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import sympy

from ..compress.heads import channel_index, groups_to_keep, head_group_scores, kept_groups
from ..ir import Graph
from ..ir.graph import param_array
from ..ir.types import as_dim, normalize_axis
from .base import NO_CONTEXT, Pass, PassContext, PassError, PassNotApplicable, register_pass
from .surgery import drop_unused_params, is_param, node_excluded, swap_param

# op -> weight layout: "nk" weight [out, in] (linear), "kn" weight [in, out] (matmul)
_GEMMS = {"linear": "nk", "matmul": "kn"}
_FUSED_GEMMS = ("fused.linear_act", "fused.matmul_act", "fused.linear_glu")
# ops applied independently per element (with numpy broadcasting): the group axis passes straight through
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "where", "neg", "abs", "relu", "exp", "log",
    "sqrt", "rsqrt", "reciprocal", "tanh", "sin", "cos", "erf", "sigmoid", "silu", "gelu", "clip", "cast"})
_OUT_CHAIN = ("permute", "reshape")


@dataclass(frozen=True)
class _Ann:
    """The group axis of a value: ``axis`` holds ``segments`` copies of G blocks of ``unit`` elements."""
    axis: int
    unit: int
    segments: int = 1


@dataclass
class _Block:
    sdpa: object
    projections: list          # GEMM nodes producing q, k, v (one node for GPT-2's packed c_attn)
    out_proj: object           # GEMM node consuming the heads
    region: list               # nodes strictly between, in graph order (sdpa included)
    groups: int = 0
    ann: dict = field(default_factory=dict)        # Value -> _Ann
    attrs: dict = field(default_factory=dict)      # node -> {attr: fn(G') -> value}
    ext_params: list = field(default_factory=list)  # (node, input index, axis of the param, _Ann)

    @property
    def name(self) -> str:
        return (self.out_proj.loc or self.sdpa.loc or self.sdpa.outputs[0].name).split(" (")[0]


def _numel(dims) -> sympy.Expr:
    n = sympy.Integer(1)
    for d in dims:
        n = n * d
    return n


def _same(a, b) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _fused_error(pass_name: str, node) -> PassNotApplicable:
    return PassNotApplicable(pass_name, "the attention block is already fused (merge-linears concatenated its "
                                        "q/k/v weights, or fuse made fused ops of it): prune-heads must run before "
                                        "fuse in the pipeline", node)


def _walk_back(g: Graph, v, pass_name: str):
    """The GEMM nodes reached walking back from ``v`` (stopping at each), and every node visited."""
    gemms, seen, stack = [], set(), [v]
    visited = []
    while stack:
        x = stack.pop()
        n = x.producer
        if n is None or n in seen:
            continue
        seen.add(n)
        if n.op in _FUSED_GEMMS or n.op.startswith("fused."):
            raise _fused_error(pass_name, n)
        if n.op.startswith("quant."):  # its codes / scales are laid out per output row group: not sliced here
            raise PassNotApplicable(pass_name, "the attention projections are already quantized: prune-heads must "
                                               "run before quantize in the pipeline", n)
        if n.op in _GEMMS:
            w = n.inputs[1]
            if w.producer is not None and w.producer.op == "concat" and all(is_param(g, i) for i in w.producer.inputs):
                raise _fused_error(pass_name, n)
            gemms.append(n)
            continue
        visited.append(n)
        stack.extend(n.inputs)
    return gemms, visited


def _gemm_ok(g: Graph, n) -> bool:
    w = n.inputs[1]
    return (is_param(g, w) and w.type.rank == 2 and w.type.is_static and w.type.dtype.is_float
            and all(is_param(g, b) for b in n.inputs[2:]))


def find_blocks(g: Graph, pass_name: str = "prune-heads"):
    """(attention blocks found, reasons an sdpa was not one)."""
    outs = set(g.outputs)
    blocks, reasons = [], []
    for sdpa in [n for n in g.nodes if n.op == "sdpa"]:
        where = sdpa.describe()
        projections, visited = [], set()
        for role, v in zip("qkv", sdpa.inputs[:3]):
            gemms, seen = _walk_back(g, v, pass_name)
            visited.update(seen)
            if len(gemms) != 1 or not _gemm_ok(g, gemms[0]):
                reasons.append(f"{where}: its {role} operand does not come from exactly one GEMM with a parameter "
                               f"weight (found {len(gemms)})")
                break
            if gemms[0] not in projections:
                projections.append(gemms[0])
        else:
            # the output chain: sdpa -> permute/reshape ... -> GEMM
            chain, v = [], sdpa.outputs[0]
            out_proj = None
            while True:
                if v in outs or len(v.uses) != 1:
                    break
                u = v.uses[0].node
                if u.op in _GEMMS and u.inputs[0] is v and _gemm_ok(g, u):
                    out_proj = u
                    break
                if u.op not in _OUT_CHAIN:
                    break
                chain.append(u)
                v = u.outputs[0]
            if out_proj is None:
                reasons.append(f"{where}: its result does not reach an output projection through "
                               f"permute / reshape only")
                continue
            # the region: visited ancestors of q/k/v that depend on a projection, sdpa, the out chain
            proj_outs = {p.outputs[0] for p in projections}
            tainted: set = set()
            region = []
            for n in g.nodes:
                if n in visited and any(i in proj_outs or i.producer in tainted for i in n.inputs):
                    tainted.add(n)
                    region.append(n)
            region += [sdpa] + chain
            blocks.append(_Block(sdpa, projections, out_proj, region))
    return blocks, reasons


def _track(g: Graph, b: _Block, pass_name: str) -> None:
    """Find G and follow the group axis from the projections to the output projection, recording how
    each shape attribute and each per-channel parameter on the way shrinks. Raises PassError at the first
    node it cannot follow the axis through."""
    q = b.sdpa.inputs[0].type
    heads, d = q.shape[-3], q.shape[-1]
    if not (isinstance(heads, int) and isinstance(d, int)):
        raise PassError(pass_name, f"query heads and head size must be static, got {q}", b.sdpa)
    n_out = {p: p.outputs[0].type.shape[-1] for p in b.projections}
    if len(b.projections) == 1:  # packed q|k|v (GPT-2's c_attn): multi-head, three equal segments
        p = b.projections[0]
        b.groups = heads
        if n_out[p] % (3 * heads):
            raise PassError(pass_name, f"packed q/k/v projection of {n_out[p]} features is not 3 x {heads} heads", p)
        b.ann[p.outputs[0]] = _Ann(p.outputs[0].type.rank - 1, n_out[p] // (3 * heads), 3)
    elif len(b.projections) == 3:
        pq, pk, pv = b.projections
        if n_out[pk] % d:
            raise PassError(pass_name, f"key projection's {n_out[pk]} features are not whole heads of {d}", pk)
        b.groups = n_out[pk] // d
        for p in b.projections:
            if n_out[p] % b.groups:
                raise PassError(pass_name, f"{n_out[p]} features are not {b.groups} equal kv groups", p)
            b.ann[p.outputs[0]] = _Ann(p.outputs[0].type.rank - 1, n_out[p] // b.groups)
        if heads % b.groups:
            raise PassError(pass_name, f"{heads} query heads are not a multiple of {b.groups} kv heads", b.sdpa)
    else:
        raise PassError(pass_name, f"q, k and v come from {len(b.projections)} GEMMs (expected 3, or 1 packed)",
                        b.sdpa)
    G = b.groups

    def fail(node, why):
        raise PassError(pass_name, f"cannot follow the attention heads axis: {why}", node)

    for n in b.region:
        ins = [(i, v, b.ann.get(v)) for i, v in enumerate(n.inputs)]
        annotated = [(i, v, a) for i, v, a in ins if a is not None]
        if not annotated:
            fail(n, "no operand carries the heads")  # region nodes all depend on a projection
        out = n.outputs[0]
        r = out.type.rank
        _, x, a = annotated[0]
        if n.op == "reshape":
            xs, ys = x.type.shape, out.type.shape
            pre, inner = _numel(xs[:a.axis]), _numel(xs[a.axis + 1:])
            for bx in range(len(ys)):
                if ys[bx] != 1 and _same(_numel(ys[:bx]), pre):
                    break
            else:
                fail(n, f"the heads axis {a.axis} of [{', '.join(map(str, xs))}] merges with the axes before it")
            unit = sympy.simplify(a.unit * inner / _numel(ys[bx + 1:]))
            if not (unit.is_Integer and unit >= 1 and _same(ys[bx], a.segments * G * unit)):
                fail(n, f"reshape splits the {G} head groups unevenly (axis {bx} of the result)")
            na = _Ann(bx, int(unit), a.segments)
            b.attrs.setdefault(n, {})["shape"] = (bx, na)
            b.ann[out] = na
        elif n.op == "permute":
            b.ann[out] = _Ann(list(n.attrs["perm"]).index(a.axis), a.unit, a.segments)
        elif n.op == "expand_dims":
            ax = normalize_axis(n.attrs["axis"], r)
            b.ann[out] = _Ann(a.axis + (ax <= a.axis), a.unit, a.segments)
        elif n.op == "squeeze":
            axes = [normalize_axis(s, x.type.rank) for s in n.attrs["axes"]]
            if a.axis in axes:
                fail(n, "squeezes the heads axis")
            b.ann[out] = _Ann(a.axis - sum(s < a.axis for s in axes), a.unit, a.segments)
        elif n.op == "broadcast_to":
            ax = a.axis + r - x.type.rank
            if not _same(out.type.shape[ax], x.type.shape[a.axis]):
                fail(n, "broadcasts along the heads axis")
            na = _Ann(ax, a.unit, a.segments)
            b.attrs.setdefault(n, {})["shape"] = (ax, na)
            b.ann[out] = na
        elif n.op == "slice":
            if normalize_axis(n.attrs["axis"], r) == a.axis:
                fail(n, "slices along the heads axis")
            b.ann[out] = a
        elif n.op == "concat":
            if normalize_axis(n.attrs["axis"], r) == a.axis:
                fail(n, "concatenates along the heads axis")
            if len(annotated) != len(ins) or any(aa != a for _, _, aa in annotated):
                fail(n, "concatenates values with different heads layouts")
            b.ann[out] = a
        elif n.op == "split":
            if normalize_axis(n.attrs["axis"], x.type.rank) == a.axis:
                sizes = list(n.attrs["sizes"])
                if len(sizes) != a.segments or any(not _same(s, G * a.unit) for s in sizes):
                    fail(n, f"split sizes {[str(s) for s in sizes]} are not {a.segments} x {G} head groups")
                b.attrs.setdefault(n, {})["sizes"] = (None, _Ann(a.axis, a.unit, 1))
                for o in n.outputs:
                    b.ann[o] = _Ann(a.axis, a.unit, 1)
            else:
                for o in n.outputs:
                    b.ann[o] = a
        elif n.op in _ELEMENTWISE or n.op == "sdpa":
            if n.op == "sdpa":
                if any(b.ann.get(v) is None for v in n.inputs[:3]):
                    fail(n, "q, k and v must all come from the projections")
                a = b.ann[n.inputs[0]]
                na = _Ann(r - 3, a.unit, a.segments)
                if a.axis != x.type.rank - 3 or any(b.ann[v].axis != v.type.rank - 3 for v in n.inputs[1:3]):
                    fail(n, "q, k and v must have their heads at axis -3")
                ext = [(i, v) for i, v, aa in ins[3:]]
            else:
                aligned = {(aa.axis + r - v.type.rank, aa.unit, aa.segments) for _, v, aa in annotated}
                if len(aligned) != 1:
                    fail(n, "operands with different heads layouts")
                na = _Ann(*aligned.pop())
                ext = [(i, v) for i, v, aa in ins if aa is None]
            for i, v in ext:
                ax = na.axis - (r - v.type.rank)
                if ax < 0 or v.type.shape[ax] == 1:
                    continue  # broadcast along the heads: the same for every head
                if is_param(g, v) and v.type.is_static and v.type.shape[ax] == na.segments * G * na.unit:
                    b.ext_params.append((n, i, ax, na))
                    continue
                fail(n, f"operand %{v.name} varies along the heads axis and is not a parameter")
            b.ann[out] = na
        else:
            fail(n, f"op '{n.op}' is not one the pass knows to follow")

    x = b.out_proj.inputs[0]
    a = b.ann.get(x)
    if a is None or a.axis != x.type.rank - 1 or a.segments != 1:
        raise PassError(pass_name, "the output projection's input features are not the heads", b.out_proj)
    # a region value used outside the block would change shape under its other user
    inside = set(b.region) | {b.out_proj}
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in b.region + b.projections:
        for o in n.outputs:
            other = sorted((u.node for u in o.uses if u.node not in inside), key=order.get)  # name the first
            if other or o in g.outputs:
                what = other[0].describe() if other else "the graph outputs"
                raise PassError(pass_name, f"%{o.name} of the attention block is also used by {what}", n)


def _slice(arr: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.take(arr, idx, axis=axis))


@register_pass("prune-heads")
@dataclass(frozen=True)
class PruneHeads(Pass):
    ratio: float = 0.25       # fraction of each layer's head groups removed (rounded; at least one stays)
    exclude: str = ""

    # lossy by design: whole heads go (perplexity is the measure, docs/compression.md)
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1.0
    atol: ClassVar[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1)")

    def plan(self, graph: Graph) -> list:
        """The attention blocks the pass would prune, tracked (groups, layouts): for tests and reports."""
        blocks, reasons = find_blocks(graph, str(self))
        if not blocks:
            raise PassNotApplicable(str(self), "found no attention block (projections -> heads -> sdpa -> output "
                                               "projection) to prune" + (f"; {reasons[0]}" if reasons else ""))
        for b in blocks:
            _track(graph, b, str(self))
        return blocks

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        def skip(b):
            return any(node_excluded(n, self.exclude) for n in b.projections + [b.out_proj])
        blocks = [b for b in self.plan(graph)
                  if not skip(b) and groups_to_keep(b.groups, self.ratio) < b.groups]
        if not blocks:
            return graph
        calib = ctx.calibration  # optional: weight norms alone without it
        stats = calib.gemm_stats(graph, [b.out_proj for b in blocks]) if calib is not None else None

        nmap: dict = {}
        g = graph.clone(mapping=nmap)
        arr = lambda v: param_array(g.param_data[v.name])  # noqa: E731
        dropped = []

        def replace(node, i, data):
            dropped.append(swap_param(g, node, i, data, "heads").name)

        for b in blocks:
            G = b.groups
            o = nmap[b.out_proj]
            o_layout = _GEMMS[o.op]
            w_o = arr(o.inputs[1])
            w_o_nk = w_o if o_layout == "nk" else w_o.T
            rms = stats[b.out_proj.outputs[0].name].rms if stats is not None else None
            w_in = []
            for p in b.projections:
                w = arr(p.inputs[1])
                w = w if _GEMMS[p.op] == "nk" else w.T
                a = b.ann[p.outputs[0]]
                # each segment of a packed projection holds its own G groups
                w_in += list(np.split(w.astype(np.float32), a.segments, axis=0))
            score = head_group_scores(w_o_nk.astype(np.float32), G, rms, w_in)
            kept = kept_groups(score, groups_to_keep(G, self.ratio))
            Gk = len(kept)

            for p in b.projections:
                a = b.ann[p.outputs[0]]
                idx = channel_index(G, a.unit, a.segments, kept)
                node = nmap[p]
                replace(node, 1, _slice(arr(node.inputs[1]), 0 if _GEMMS[node.op] == "nk" else 1, idx))
                if len(node.inputs) > 2:
                    replace(node, 2, _slice(arr(node.inputs[2]), 0, idx))
            for n0, i, ax, a in b.ext_params:
                node = nmap[n0]
                replace(node, i, _slice(arr(node.inputs[i]), ax, channel_index(G, a.unit, a.segments, kept)))
            a = b.ann[b.out_proj.inputs[0]]
            replace(o, 1, _slice(w_o, 1 if o_layout == "nk" else 0, channel_index(G, a.unit, 1, kept)))
            for n0 in b.projections + b.region:  # graph order: each node sees its inputs' new types
                node = nmap[n0]
                for attr, (ax, na) in b.attrs.get(n0, {}).items():
                    if attr == "sizes":
                        node.attrs["sizes"] = [Gk * na.unit] * len(node.attrs["sizes"])
                    else:
                        shape = list(node.attrs["shape"])
                        shape[ax] = na.segments * Gk * na.unit
                        node.attrs["shape"] = [as_dim(s) for s in shape]
                node.retype()
        drop_unused_params(g, dropped)
        return g


def head_counts(graph: Graph) -> list:
    """(query heads, key heads) as every sdpa of ``graph`` sees them, in graph order (HF Llama repeats the
    kv heads before sdpa, so there both are the query heads)."""
    return [(n.inputs[0].type.shape[-3], n.inputs[1].type.shape[-3]) for n in graph.nodes if n.op == "sdpa"]


__all__ = ["PruneHeads", "find_blocks", "head_counts"]
