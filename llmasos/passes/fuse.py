"""Operator fusion passes. ``fuse`` runs them all, in this order:

    recognize         rules/recognize.rw   decomposed RMSNorm / tanh-GELU -> rms_norm / gelu   (tolerance)
    merge-linears     merge_linears.py     GEMMs sharing an input -> one GEMM + split         (tolerance)
    split-heads       split_heads.py       split + per-head reshapes -> one reshape + slices  (exact)
    fuse-epilogue     rules/epilogue.rw    GEMM + bias + activation -> fused.linear_act / matmul_act (exact)
    fuse-norm         rules/norm.rw        residual add + norm -> fused.add_rms_norm / add_layer_norm (exact)
    fuse-elementwise  fuse_elementwise.py  elementwise chains -> fused.elementwise            (exact)
    fuse-attention    fuse_attention.py    a decode step's RoPE + cache appends + attention    (exact)
                                           -> fused.rope_append_attention (or its paged twin)
    dce

Each fused op lowers to one kernel in the TVM backend (backends/tvm/lowering_fused.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Graph
from .base import NO_CONTEXT, Pass, PassContext, register_pass
from .dce import DeadCodeElimination
from .fuse_attention import FuseAttention
from .fuse_elementwise import FuseElementwise
from .merge_linears import MergeLinears
from .split_heads import SplitHeads
from .rewrite_pass import ShippedRules


@register_pass("recognize")
@dataclass(frozen=True)
class Recognize(ShippedRules):
    """rules/recognize.rw: rms_norm divides by sqrt where the decomposed form multiplies by rsqrt."""

    rules: ClassVar[str] = "recognize"
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-5
    # a norm's output is O(1), and a residual add after it can cancel to a small value while keeping the
    # absolute rounding difference of the O(1) terms: Hypothesis found 2.1e-6 at a value of 0.08, a few f32
    # ulps of the addends. 1e-5 absolute is ~40 ulps at 1.0.
    atol: ClassVar[float] = 1e-5


@register_pass("fuse-epilogue")
@dataclass(frozen=True)
class FuseEpilogue(ShippedRules):
    rules: ClassVar[str] = "epilogue"
    exact: ClassVar[bool] = True


@register_pass("fuse-norm")
@dataclass(frozen=True)
class FuseNorm(ShippedRules):
    rules: ClassVar[str] = "norm"
    exact: ClassVar[bool] = True


@register_pass("fuse")
@dataclass(frozen=True)
class Fuse(Pass):
    """Every fusion above; the options switch parts off (``fuse{merge=false}``)."""

    recognize: bool = True
    merge: bool = True
    epilogue: bool = True
    norm: bool = True
    elementwise: bool = True
    attention: bool = True

    exact: ClassVar[bool] = False  # recognize's and merge-linears' tolerance; the rest is exact
    rtol: ClassVar[float] = Recognize.rtol
    atol: ClassVar[float] = Recognize.atol

    def parts(self) -> list:
        on = [(self.recognize, Recognize()), (self.merge, MergeLinears()), (self.merge, SplitHeads()), (self.epilogue, FuseEpilogue()),
              (self.norm, FuseNorm()), (self.elementwise, FuseElementwise()), (self.attention, FuseAttention())]
        return [p for keep, p in on if keep] + [DeadCodeElimination()]

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        for p in self.parts():
            graph = p.apply(graph, ctx)
        return graph
