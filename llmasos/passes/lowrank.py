"""Low-rank factorization pass: ``lowrank``.

    lowrank{method=svd|asvd|svdllm, ratio=0.2, energy=0.0, exclude="lm_head"}

Every GEMM with a static rank-2 float parameter weight (surgery.gemm_targets) is factored W ~= A B
(A [N, r], B [r, K]; llmasos/compress/lowrank.py) and rewritten as two GEMMs, the original op (its
activation / GLU epilogue and bias included) running on the rank-r intermediate:

    linear(x, W, b)               -> linear(linear(x, B), A, b)
    fused.linear_act(x, W, b){act} -> fused.linear_act(linear(x, B), A, b){act}
    fused.linear_glu(x, W)         -> fused.linear_glu(linear(x, B), A)      (W = [Wg; Wu])
    matmul(x, W[K, N])             -> matmul(matmul(x, B^T), A^T)           (and fused.matmul_act)

The rank: ``ratio`` is the fraction of the layer's parameters removed (compress.lowrank.rank_for); with
``energy`` > 0 instead the smallest rank keeping that fraction of the squared singular values of the
matrix the method truncates (W; ASVD's W S; SVD-LLM's whitened W L). A layer is factored only where
r (N + K) < N K (flops_saved); the others are skipped and counted (``last_report`` and the log); when no
layer qualifies the pass fails saying why. ASVD and SVD-LLM read calibration statistics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ..compress import lowrank as lr
from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, PassNotApplicable, register_pass
from .surgery import drop_unused_params, gemm_targets, new_param, replace_node, weight_layout, weight_nk

log = logging.getLogger(__name__)
# what the last run did: {"factored": {weight name: rank}, "skipped": {weight name: rank}}
last_report: dict = {}


def _energy_singular_values(method: str, w: np.ndarray, st) -> np.ndarray:
    if method == "asvd":
        s = st.abs_mean ** 0.5            # asvd_factor's default alpha, and its floor for dead channels
        w = w * np.maximum(s, max(s.max(), 1.0) * 1e-6)[None, :]
    elif method == "svdllm":
        w = w.astype(np.float64) @ lr.whitening_factor(st.xtx)
    return np.linalg.svd(w, compute_uv=False)


@register_pass("lowrank")
@dataclass(frozen=True)
class LowRank(Pass):
    method: Literal["svd", "asvd", "svdllm"] = "svd"
    ratio: float = 0.2        # fraction of each factored layer's parameters removed
    energy: float = 0.0       # > 0: pick the rank by kept singular-value energy instead of ratio
    exclude: str = "lm_head"

    # lossy by design; this only catches a wrecked graph. The accuracy measure is perplexity.
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1.0
    atol: ClassVar[float] = 1.0

    def __post_init__(self):
        super().__post_init__()
        bad = None
        if not 0.0 <= self.energy <= 1.0:
            bad = f"energy={self.energy} must be in (0, 1] (or 0 to choose the rank by ratio)"
        elif not self.energy and not 0.0 < self.ratio < 1.0:
            bad = f"ratio={self.ratio} must be in (0, 1): the fraction of each layer's parameters removed"
        if bad:  # a ValueError, so the pipeline parser points at the pass in the text
            raise ValueError(bad)

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        global last_report
        nodes = gemm_targets(graph, self.exclude)
        if not nodes:
            raise PassNotApplicable(str(self), f"no GEMM with a static rank-2 float parameter weight outside "
                                       f"exclude={self.exclude!r} to factor")
        stats = None
        if self.method != "svd":
            stats = ctx.require_calibration(self).gemm_stats(graph, nodes)
        plan, skipped = [], {}
        for node in nodes:
            w = weight_nk(graph, node)
            n, k = w.shape
            st = stats[node.outputs[0].name] if stats is not None else None
            if self.energy:
                r = lr.rank_for((n, k), energy=self.energy,
                                singular_values=_energy_singular_values(self.method, w, st))
            else:
                r = lr.rank_for((n, k), ratio=self.ratio) if (1 - self.ratio) * n * k >= n + k else 0
            if r < 1 or not lr.flops_saved(n, k, r):
                skipped[node.inputs[1].name] = r
            else:
                plan.append((node, w, st, r))
        if not plan:
            shapes = ", ".join(f"%{n.inputs[1].name} {list(weight_nk(graph, n).shape)} -> r={skipped[n.inputs[1].name]}"
                               for n in nodes[:4])
            raise PassNotApplicable(str(self), f"no layer qualifies: factoring saves FLOPs only where r (N + K) < N K, "
                                       f"and none of the {len(nodes)} candidate GEMMs' ranks does ({shapes}"
                                       f"{', ...' if len(nodes) > 4 else ''})")
        m: dict = {}
        g = graph.clone(mapping=m)
        dropped, factored = [], {}
        for orig, w, st, r in plan:
            if self.method == "svd":
                a, b = lr.svd_factor(w, r)
            elif self.method == "asvd":
                a, b = lr.asvd_factor(w, st.abs_mean, r)
            else:
                a, b = lr.svdllm_factor(w, st.xtx, r)
            node = m[orig]
            wname = node.inputs[1].name
            self._emit(g, node, a, b)
            dropped.append(wname)
            factored[wname] = r
        drop_unused_params(g, dropped)
        last_report = {"factored": factored, "skipped": skipped}
        log.info("%s: factored %d GEMM(s), skipped %d where the rank saves no FLOPs", self, len(factored),
                 len(skipped))
        return g

    @staticmethod
    def _emit(g: Graph, node, a: np.ndarray, b: np.ndarray) -> None:
        old = node.inputs[1]
        dt = old.type.dtype.numpy
        kn = weight_layout(node) == "kn"

        def build(g):
            x = node.inputs[0]
            bp = new_param(g, f"{old.name}.lr_b", np.ascontiguousarray(b.T if kn else b).astype(dt))
            ap = new_param(g, f"{old.name}.lr_a", np.ascontiguousarray(a.T if kn else a).astype(dt))
            y = g.add_node("matmul" if kn else "linear", [x, bp], loc=node.loc)
            return g.add_node(node.op, [y, ap, *node.inputs[2:]], dict(node.attrs), loc=node.loc)
        replace_node(g, node, build)
