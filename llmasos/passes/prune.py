"""Pruning passes: ``prune`` (unstructured / N:M weight sparsity) and ``prune-channels`` (structured MLP
channel pruning that shrinks tensor shapes).

    prune{method=magnitude|wanda|sparsegpt, sparsity=0.5, n=0, m=0, exclude="lm_head"}
    prune-channels{ratio=0.25, exclude=""}

``prune`` rewrites the weight of every GEMM with a static rank-2 float parameter weight (linear, matmul
[K, N], fused.linear_act / matmul_act / linear_glu -- surgery.gemm_targets) to a pruned copy under a new
parameter name (``<weight>.pruned``): shapes are unchanged, the input graph's arrays are never written, and
a weight shared with a non-GEMM use (a tied embedding) keeps its original data there. With n > 0 every
group of m consecutive input weights keeps exactly n (2:4); otherwise ``sparsity`` is the fraction zeroed
(per layer for magnitude and per block of columns for SparseGPT, per output row for Wanda). Wanda and
SparseGPT read calibration statistics (ctx.require_calibration + gemm_stats). The numerics live in
llmasos/compress/prune.py.

``prune-channels`` finds Llama-style MLPs as imported -- ``down(act(gate(x)) * up(x))`` with three linears
whose weights are parameters -- scores each of the F intermediate channels (compress.prune.channel_scores:
with calibration data the down projection's input rms times the norm of its weight column, else weight
norms only) and keeps the best ``F * (1 - ratio)`` rounded to a multiple of 8 (whole SIMD panels): gate/up
rows and down columns are removed, so the three GEMMs really shrink. Dropping a channel is exactly the
original model with that channel's activation zeroed. It must run before ``fuse`` (the fused
``fused.linear_glu`` packs gate and up into one weight); finding only fused MLPs is an error saying so.

``exclude``: comma-separated substrings of weight parameter names or of a GEMM's module path (its loc).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ..compress import prune as cp
from ..compress.prune import channel_scores
from ..ir import Graph
from ..ir.graph import param_array
from .base import NO_CONTEXT, Pass, PassContext, PassError, PassNotApplicable, register_pass
from .surgery import (drop_unused_params, gemm_targets, in_features, is_param, node_excluded, set_weight_nk,
                      swap_param, weight_nk)


@register_pass("prune")
@dataclass(frozen=True)
class Prune(Pass):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    sparsity: float = 0.5
    n: int = 0                # n:m: keep n of every m consecutive weights along K (ignores sparsity)
    m: int = 0
    exclude: str = "lm_head"

    # lossy by design: 50% of the weights go. Elementwise closeness to the dense graph is not the measure
    # (perplexity is, bench/accuracy.py); this only catches a pass that wrecks the graph (nan, garbage).
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1.0
    atol: ClassVar[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        bad = None
        if not 0.0 <= self.sparsity < 1.0:
            bad = f"sparsity={self.sparsity} must be in [0, 1)"
        elif self.n < 0 or self.m < 0:
            bad = f"n={self.n}, m={self.m}: n:m pruning needs n >= 1 and m >= 1"
        elif self.n and not self.m:
            bad = f"n={self.n} needs m (n:m pruning keeps n of every m weights, e.g. n=2,m=4)"
        elif self.m and not self.n:
            bad = f"m={self.m} needs n (n:m pruning keeps n of every m weights, e.g. n=2,m=4)"
        elif self.n > self.m:
            bad = f"n={self.n} must be <= m={self.m} (n:m pruning keeps n of every m weights)"
        if bad:  # a ValueError, so the pipeline parser points at the pass in the text
            raise ValueError(bad)

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        nodes = gemm_targets(graph, self.exclude)
        if not nodes:
            return graph
        if self.m:
            for node in nodes:
                k = in_features(node)
                if k % self.m:
                    raise PassError(str(self), f"m={self.m} does not divide the weight's K={k} input features "
                                               f"(%{node.inputs[1].name}); exclude it or pick another m", node)
        stats = None
        if self.method != "magnitude":
            stats = ctx.require_calibration(self).gemm_stats(graph, nodes)
        m: dict = {}
        g = graph.clone(mapping=m)
        dropped = []
        for orig in nodes:
            key = orig.outputs[0].name
            node = m[orig]
            w = weight_nk(g, node)
            if self.method == "magnitude":
                keep = cp.nm_mask(w, self.n, self.m) if self.n else cp.magnitude_mask(w, self.sparsity)
                w = np.where(keep, w, np.float32(0))
            elif self.method == "wanda":
                keep = cp.wanda_mask(w, stats[key].rms, self.sparsity, self.n, self.m)
                w = np.where(keep, w, np.float32(0))
            else:
                w, _ = cp.sparsegpt(w, stats[key].hessian, self.sparsity, self.n, self.m)
            dropped.append(set_weight_nk(g, node, w, "pruned").name)
        drop_unused_params(g, dropped)
        return g


# -- structured MLP channels -----------------------------------------------------------------------------

@dataclass
class _Mlp:
    gate: object   # linear(x, Wg[F, K], bg?)
    act: object    # unary activation of gate
    up: object     # linear(x, Wu[F, K], bu?)
    mul: object    # act * up
    down: object   # linear(mul, Wd[N, F], bd?)


def _param_weight(g: Graph, node) -> bool:
    w = node.inputs[1]
    return (is_param(g, w) and w.type.rank == 2 and w.type.is_static
            and all(is_param(g, v) for v in node.inputs[2:]))


def _only_use(g: Graph, v, n) -> bool:
    """``n`` reads ``v`` once, and nothing else does (graph outputs included)."""
    return len(v.uses) == 1 and v.uses[0].node is n and not any(o is v for o in g.outputs)


def find_mlps(g: Graph) -> list:
    """Unfused gate/up/down MLPs whose intermediate values are used only inside the MLP."""
    only = lambda v, n: _only_use(g, v, n)  # noqa: E731
    found = []
    for down in g.nodes:
        if down.op != "linear" or not _param_weight(g, down):
            continue
        mul = down.inputs[0].producer
        if mul is None or mul.op != "mul" or not only(mul.outputs[0], down):
            continue
        a, b = (v.producer for v in mul.inputs)
        for act, up in ((a, b), (b, a)):
            if act is None or up is None or up.op != "linear" or len(act.inputs) != 1 or act.op == "linear":
                continue
            gate = act.inputs[0].producer
            if gate is None or gate.op != "linear" or gate.inputs[0] is not up.inputs[0]:
                continue
            if not (_param_weight(g, gate) and _param_weight(g, up) and only(gate.outputs[0], act)
                    and only(act.outputs[0], mul) and only(up.outputs[0], mul)):
                continue
            f = down.inputs[1].type.shape[1]
            if gate.inputs[1].type.shape[0] != f or up.inputs[1].type.shape[0] != f or \
                    act.outputs[0].type.shape != up.outputs[0].type.shape:
                continue
            found.append(_Mlp(gate, act, up, mul, down))
            break
    return found


def kept_channels(f: int, ratio: float) -> int:
    """F * (1 - ratio) rounded to a multiple of 8, at least 8 (never more than F)."""
    return min(f, max(8, int(round(f * (1.0 - ratio) / 8.0)) * 8))


@register_pass("prune-channels")
@dataclass(frozen=True)
class PruneChannels(Pass):
    ratio: float = 0.25       # fraction of each MLP's intermediate channels removed
    exclude: str = ""

    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1.0
    atol: ClassVar[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1)")

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        mlps = find_mlps(graph)
        if not mlps:
            fused = [n for n in graph.nodes if n.op == "fused.linear_glu"]
            if fused:
                raise PassNotApplicable(str(self), f"found only fused MLPs ({len(fused)} fused.linear_glu): prune-channels "
                                           "must run before fuse in the pipeline", fused[0])
            raise PassNotApplicable(str(self), "found no gate/up/down MLP (down(act(gate(x)) * up(x)) with parameter "
                                       "weights) to prune")

        def skip(mlp):
            return any(node_excluded(n, self.exclude) for n in (mlp.gate, mlp.up, mlp.down))
        mlps = [m for m in mlps if not skip(m)
                and kept_channels(m.down.inputs[1].type.shape[1], self.ratio) < m.down.inputs[1].type.shape[1]]
        if not mlps:
            return graph
        calib = ctx.calibration  # optional: weight norms alone without it
        stats = calib.gemm_stats(graph, [m.down for m in mlps]) if calib is not None else None
        nmap: dict = {}
        g = graph.clone(mapping=nmap)
        dropped = []
        for orig in mlps:
            mlp = _Mlp(*(nmap[n] for n in (orig.gate, orig.act, orig.up, orig.mul, orig.down)))
            arr = lambda v: param_array(g.param_data[v.name])  # noqa: E731
            wg, wu, wd = arr(mlp.gate.inputs[1]), arr(mlp.up.inputs[1]), arr(mlp.down.inputs[1])
            f = wd.shape[1]
            rms = stats[orig.down.outputs[0].name].rms if stats is not None else None
            score = channel_scores(np.concatenate([wg, wu]).astype(np.float32), wd.astype(np.float32), rms)
            # the highest scores, kept in their original order (stable: ties keep the lower index)
            idx = np.sort(np.argsort(-score, kind="stable")[:kept_channels(f, self.ratio)])
            for node, w, take in ((mlp.gate, wg, lambda a: a[idx]), (mlp.up, wu, lambda a: a[idx]),
                                  (mlp.down, wd, lambda a: a[:, idx])):
                dropped.append(swap_param(g, node, 1, np.ascontiguousarray(take(w)), "channels").name)
                if node is not mlp.down and len(node.inputs) > 2:
                    b = param_array(g.param_data[node.inputs[2].name])
                    dropped.append(swap_param(g, node, 2, np.ascontiguousarray(b[idx]), "channels").name)
            for node in (mlp.gate, mlp.up, mlp.act, mlp.mul):  # intermediate size F -> len(idx)
                node.retype()
        drop_unused_params(g, dropped)
        return g
