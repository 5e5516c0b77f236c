"""Weight quantization passes: ``quantize`` (int8 / int4 / fp8 weight-only) and ``w8a8``.

    quantize{bits=8|4, group=0|32|64|128, method=rtn|gptq|awq, sym=true, per_tensor=false,
             dtype=int|f8e4m3, head=int8|same|float, exclude=""}
    w8a8{smooth=false, alpha=0.5, exclude="lm_head"}

Both replace every GEMM with a parameter weight -- ``linear``, ``matmul`` with a rank-2 weight [K, N]
(transposed to [N, K] at quantize time), ``fused.linear_act``, ``fused.matmul_act``, ``fused.linear_glu``
-- by ``quant.linear`` / ``quant.linear_a8`` (llmasos/ir/opset/quant.py). quant.linear has no activation:
a fused activation is kept as its own op right after it (the TVM backend fuses such an elementwise tail;
the quantized GEMM kernel itself stays the one dequant-fused loop). The float weight is dropped from the
graph when nothing else uses it.

``exclude``: comma-separated substrings of weight parameter names -- or of the module path a GEMM was
traced from (its loc) -- never touched.

``head``: how the output head (the GEMM traced from ``lm_head``) and the token embedding table (an
``embedding`` whose table has the head's shape) are stored. ``int8`` (default): 8-bit symmetric codes
in groups of 32 whatever ``bits``/``group`` say -- llama.cpp's Q8_0 grid, which its own 4-bit files keep
for that tensor (SmolLM2's GGUF: Q4_1 body, Q8_0 ``token_embd``), since the head's errors land directly
on the logits; ``same``: the pass's own bits/group/sym; ``float``: both left in float (the behaviour
before issue 16). The head is a quarter of SmolLM2-135M's weights and, in f32, more than half of what an
int4 decode step reads. A tied head and embedding (one table, or two parameters holding the same data)
share one quantized copy: the embedding becomes ``quant.embedding`` on the head's codes.

Options are checked when the pass is built (bits, group, method, dtype combinations) and against the
graph before any weight is touched (int4: an even K, for every GEMM), so a bad pipeline fails before
minutes of GPTQ. ``group`` need not divide K: a weight gets G = ceil(K / group) groups, the last one
shorter (SmolLM2's K = 576 at group 128: four groups of 128 and one of 64).

GPTQ / AWQ / SmoothQuant read calibration statistics (ctx.require_calibration + gemm_stats); their numerics
live in llmasos/compress/{gptq,awq,smoothquant}.py. AWQ and SmoothQuant scale W's input columns by s
and divide the activation by s: GEMMs that share an input (q/k/v, gate/up) share one s (computed on
their stacked weights), folded into the preceding norm's weight (and bias) where the norm feeds only
them -- free at run time -- else applied by one ``mul`` by 1/s in front of the group.

Numerics: these passes are lossy by design. The per-pass numeric check compares against the float graph
elementwise, which no quantizer meets on arbitrary random graphs (a weight rounding to zero turns inf
inputs into nan; 4-bit error is ~10% of a weight). The tolerances below are what int8 meets on
well-scaled data; the real accuracy measure is perplexity (bench/accuracy.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ..compress import awq, gptq, quant, smoothquant
from ..compress.quant import quantize_rtn
from ..ir import Graph, TensorType
from ..ir.graph import param_array
from ..ir.opset.fused import ACTIVATIONS
from ..ir.opset.rules import to_dtype
from ..ir.types import DType
from .base import NO_CONTEXT, Pass, PassContext, PassError, register_pass
from .surgery import (drop_unused_params, gemm_targets, in_features, input_groups, is_param, new_param,
                      node_excluded, replace_node, scale_group, weight_nk)

GROUPS = (0, 32, 64, 128)
_F8_MAX = 448.0
HEAD = "lm_head"      # the module path (or weight name) of the output head
HEAD_GROUP = 32       # head=int8: Q8_0's grid


def _same_data(a, b) -> bool:
    if b is None:
        return False
    if a is b:
        return True
    b = param_array(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def _epilogue(g: Graph, node, y, loc):
    """The fused op's epilogue after a plain GEMM result y: its activation, or linear_glu's act(gate)*up."""
    act = node.attrs.get("act", "none")
    if node.op == "fused.linear_glu":
        n2 = y.type.shape[-1]
        f = n2 // 2
        gate = g.add_node("slice", [y], {"axis": -1, "start": 0, "end": f}, loc=loc)
        up = g.add_node("slice", [y], {"axis": -1, "start": f, "end": n2}, loc=loc)
        if ACTIVATIONS[act] is not None:
            gate = g.add_node(ACTIVATIONS[act][0], [gate], dict(ACTIVATIONS[act][1]), loc=loc)
        return g.add_node("mul", [gate, up], loc=loc)
    if ACTIVATIONS[act] is not None:
        return g.add_node(ACTIVATIONS[act][0], [y], dict(ACTIVATIONS[act][1]), loc=loc)
    return y


def _check_k(pass_, nodes, group: int, bits: int) -> None:
    # a group that does not divide K is fine (G = ceil(K / group), the last group shorter); an odd K is
    # not for int4, whose codes pack two per byte along K
    for n in nodes:
        k = in_features(n)
        if bits == 4 and k % 2:
            raise PassError(str(pass_), f"bits=4 packs two codes per byte along K and needs an even K, got K={k} "
                                        f"(%{n.inputs[1].name}); use bits=8 or exclude it", n)


@register_pass("quantize")
@dataclass(frozen=True)
class Quantize(Pass):
    bits: int = 8
    group: int = 0                    # 0: one scale per output channel
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    sym: bool = True
    per_tensor: bool = False          # one scale for the whole weight (rtn only)
    dtype: Literal["int", "f8e4m3"] = "int"   # f8e4m3: fp8 codes, per-channel scale, weight-only
    head: Literal["int8", "same", "float"] = "int8"   # the output head and the token embedding (module doc)
    exclude: str = ""

    # lossy by design (see the module doc): what int8 per-channel meets on well-scaled data
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 0.1
    atol: ClassVar[float] = 0.1

    def __post_init__(self):
        super().__post_init__()
        bad = None
        if self.bits not in (4, 8):
            bad = f"bits={self.bits} is not supported: the backends store and dequantize 4 or 8 bit codes"
        elif self.group not in GROUPS:
            bad = f"group={self.group} is not supported: use one of {list(GROUPS)} (0 = per channel)"
        elif self.per_tensor and (self.group or self.method != "rtn"):
            bad = "per_tensor=true takes one scale for the whole weight: it needs group=0 and method=rtn"
        elif self.dtype == "f8e4m3" and (self.bits != 8 or self.group or self.method != "rtn" or self.per_tensor):
            bad = "dtype=f8e4m3 is fp8 weight-only with a per-channel scale: bits=8, group=0, method=rtn"
        if bad:  # a ValueError, so the pipeline parser points at the pass in the text
            raise ValueError(bad)

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        nodes = gemm_targets(graph, self.exclude)
        heads = [n for n in nodes if node_excluded(n, HEAD)]
        if self.head != "same":  # int8 heads are quantized below, on their own grid; float ones left alone
            nodes = [n for n in nodes if not node_excluded(n, HEAD)]
        if not nodes and not (heads and self.head == "int8"):
            return graph
        _check_k(self, nodes, self.group, self.bits)
        stats = None
        if self.method != "rtn":
            stats = ctx.require_calibration(self).gemm_stats(graph, nodes)
        m: dict = {}
        g = graph.clone(mapping=m)
        weights = {}
        if self.method == "awq":
            for grp in input_groups([m[n] for n in nodes]):
                ws = [weight_nk(g, n) for n in grp]
                st = stats[grp[0].outputs[0].name]
                s = np.asarray(awq.awq_scales(np.concatenate(ws), st.abs_mean, None, self.bits, self.group,
                                              self.sym), np.float32)
                scale_group(g, grp, ws, s, weights)
        dropped, done = [], {}
        for orig in nodes:
            node = m[orig]
            wname = node.inputs[1].name
            w = weights.get(node.outputs[0].name)
            w = weight_nk(g, node) if w is None else w
            st = stats[orig.outputs[0].name] if stats is not None else None
            codes, scale, zero = self._quantize(w, st)
            done[orig] = self._emit(g, node, codes, scale, zero, wname)
            dropped.append(wname)
        qheads = []   # (the head's float weight Value, its quant.linear node)
        for orig in heads:
            node = m[orig]
            wname, hw = node.inputs[1].name, node.inputs[1]
            if self.head == "int8":
                q, scale, zero = quantize_rtn(weight_nk(g, node), 8, HEAD_GROUP, True)
                qheads.append((hw, self._emit(g, node, q, scale, zero, wname, bits=8, group=HEAD_GROUP)))
                dropped.append(wname)
            elif self.head == "same":
                qheads.append((hw, done.get(orig)))
        if self.head != "float":
            dropped += self._embeddings(g, [h for h in qheads if h[1] is not None])
        drop_unused_params(g, dropped)
        return g

    def _embeddings(self, g: Graph, qheads: list) -> list:
        """The token embedding(s) read from the heads' codes (tied: the same data) or quantized like them
        (a table of the head's shape); returns the float tables replaced."""
        out = []
        for hw, q in qheads:
            shape = (q.inputs[1].type.shape[0], q.inputs[0].type.shape[-1])   # [N, K] of the head
            hdata = g.param_data.get(hw.name)
            for node in [n for n in g.nodes if n.op == "embedding"]:
                table = node.inputs[0]
                if not is_param(g, table) or tuple(table.type.shape) != shape or not table.type.dtype.is_float:
                    continue
                if node_excluded(node, self.exclude, weight=0):
                    continue
                data = param_array(g.param_data[table.name])
                tied = table is hw or _same_data(data, hdata)
                if tied:
                    qp, sp, zp = q.inputs[1:4]
                else:  # its own codes, on the head's grid (an fp8 head's table stays float)
                    if self.head == "same" and self.dtype != "int":
                        continue
                    bits, group, sym = (8, HEAD_GROUP, True) if self.head == "int8" else (self.bits, self.group,
                                                                                          self.sym)
                    codes, scale, zero = quantize_rtn(np.asarray(data, np.float32), bits, group, sym)
                    codes, zero = quant.storage(codes, zero, bits, sym)
                    qp = new_param(g, f"{table.name}.qweight", codes)
                    sp = new_param(g, f"{table.name}.scale", np.asarray(scale, np.float32))
                    zp = new_param(g, f"{table.name}.zero", np.asarray(zero, np.float32))

                def build(g, node=node, qp=qp, sp=sp, zp=zp, attrs=dict(q.attrs)):
                    y = g.add_node("quant.embedding", [qp, sp, zp, node.inputs[1]], attrs, loc=node.loc)
                    return y if node.outputs[0].type.dtype is DType.f32 else \
                        g.add_node("cast", [y], {"dtype": node.outputs[0].type.dtype}, loc=node.loc)
                replace_node(g, node, build)
                out.append(table.name)
        return out

    def _quantize(self, w: np.ndarray, st):
        if self.dtype == "f8e4m3":
            amax = np.abs(w).max(axis=1, keepdims=True)
            scale = np.where(amax > 0, amax / _F8_MAX, 1.0).astype(np.float32)
            return to_dtype(w / scale, DType.f8e4m3), scale, np.zeros_like(scale)
        if self.method == "gptq":
            q, scale, zero = gptq.gptq_quantize(w, st.hessian, self.bits, self.group, self.sym)
        else:
            q, scale, zero = quant.quantize_rtn(w, self.bits, self.group, self.sym, self.per_tensor)
        codes, zero = quant.storage(np.asarray(q), np.asarray(zero, np.float32), self.bits, self.sym)
        return codes, np.asarray(scale, np.float32), zero

    def _emit(self, g, node, codes, scale, zero, wname, bits=None, group=None):
        loc = node.loc
        bits = self.bits if bits is None else bits
        group = self.group if group is None else group

        def build(g):
            x = node.inputs[0]
            qp = new_param(g, f"{wname}.qweight", codes)
            # scales stay f32 whatever x's dtype (bf16 scales would add their own 0.4% error)
            sp = new_param(g, f"{wname}.scale", scale.astype(np.float32))
            zp = new_param(g, f"{wname}.zero", zero.astype(np.float32))
            ins = [x, qp, sp, zp] + ([node.inputs[2]] if len(node.inputs) > 2 else [])
            y = g.add_node("quant.linear", ins, {"bits": bits, "group": group}, loc=loc)
            made.append(y.producer)
            return _epilogue(g, node, y, loc)
        made = []
        replace_node(g, node, build)
        return made[0]


@register_pass("w8a8")
@dataclass(frozen=True)
class W8A8(Pass):
    """int8 weights (per channel, symmetric) times int8 activations quantized per token at run time."""
    smooth: bool = False   # SmoothQuant: migrate activation outliers into the weights first
    alpha: float = 0.5     # SmoothQuant's migration strength, in [0, 1]
    exclude: str = "lm_head"

    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 0.1
    atol: ClassVar[float] = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        nodes = [n for n in gemm_targets(graph, self.exclude)
                 if n.inputs[0].type.dtype in (DType.f32, DType.f16, DType.bf16)
                 and (len(n.inputs) < 3 or n.inputs[2].type.dtype is n.inputs[0].type.dtype)]
        if not nodes:
            return graph
        stats = None
        if self.smooth:
            stats = ctx.require_calibration(self).gemm_stats(graph, nodes)
        m: dict = {}
        g = graph.clone(mapping=m)
        weights = {}
        if self.smooth:
            for grp in input_groups([m[n] for n in nodes]):
                ws = [weight_nk(g, n) for n in grp]
                s = np.asarray(smoothquant.smooth_scales(stats[grp[0].outputs[0].name].abs_max, np.concatenate(ws),
                                                         self.alpha), np.float32)
                scale_group(g, grp, ws, s, weights)
        dropped, done = [], {}
        for orig in nodes:
            node = m[orig]
            wname = node.inputs[1].name
            w = weights.get(node.outputs[0].name)
            w = weight_nk(g, node) if w is None else w
            q, scale, _ = quantize_rtn(w, 8, 0, True)

            def build(g, node=node, q=q, scale=scale, wname=wname):
                x = node.inputs[0]
                qp = new_param(g, f"{wname}.qweight", q)
                sp = new_param(g, f"{wname}.wscale", np.ascontiguousarray(scale[:, 0]))
                ins = [x, qp, sp] + ([node.inputs[2]] if len(node.inputs) > 2 else [])
                return _epilogue(g, node, g.add_node("quant.linear_a8", ins, loc=node.loc), node.loc)
            replace_node(g, node, build)
            dropped.append(wname)
        drop_unused_params(g, dropped)
        return g
