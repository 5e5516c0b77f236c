"""Weight quantization passes: ``quantize`` (int8 / int4 / fp8 weight-only) and ``w8a8``.

    quantize{bits=8|4, group=0|32|64|128, method=rtn|gptq|awq, sym=true, per_tensor=false,
             dtype=int|f8e4m3, exclude="lm_head"}
    w8a8{smooth=false, alpha=0.5, exclude="lm_head"}

Both replace every GEMM with a parameter weight -- ``linear``, ``matmul`` with a rank-2 weight [K, N]
(transposed to [N, K] at quantize time), ``fused.linear_act``, ``fused.matmul_act``, ``fused.linear_glu``
-- by ``quant.linear`` / ``quant.linear_a8`` (llmasos/ir/opset/quant.py). quant.linear has no activation:
a fused activation is kept as its own op right after it (the TVM backend fuses such an elementwise tail;
the quantized GEMM kernel itself stays the one dequant-fused loop). The float weight is dropped from the
graph when nothing else uses it.

``exclude``: comma-separated substrings of weight parameter names -- or of the module path a GEMM was
traced from (its loc) -- never touched. The default keeps the
output head (``lm_head``) in float: it is one GEMM whose errors land directly on the logits (perplexity
moves most there), and in small models it is often tied to the embedding table, which stays float anyway
-- quantizing it would keep both copies.

Options are checked when the pass is built (bits, group, method, dtype combinations) and against the
graph before any weight is touched (int4: an even K, for every GEMM), so a bad pipeline fails before
minutes of GPTQ. ``group`` need not divide K: a weight gets G = ceil(K / group) groups, the last one
shorter (SmolLM2's K = 576 at group 128: four groups of 128 and one of 64).

GPTQ / AWQ / SmoothQuant read calibration statistics (require_calibration + gemm_stats); their numerics
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

from ..ir import Graph
from ..ir.graph import param_array
from ..ir.opset.fused import ACTIVATIONS
from ..ir.types import DType
from .base import Pass, PassError, register_pass

GROUPS = (0, 32, 64, 128)
# op -> weight layout ("nk": [N, K] as linear; "kn": [K, N] as matmul)
_TARGETS = {"linear": "nk", "fused.linear_act": "nk", "fused.linear_glu": "nk", "matmul": "kn",
            "fused.matmul_act": "kn"}
_F8_MAX = 448.0


def _excluded(name: str, exclude: str) -> bool:
    return any(s and s in name for s in (p.strip() for p in exclude.split(",")))


def gemm_targets(graph: Graph, exclude: str) -> list:
    """GEMM nodes whose weight is a static rank-2 float parameter not matched by ``exclude``."""
    out = []
    for n in graph.nodes:
        if n.op not in _TARGETS or len(n.inputs) < 2:
            continue
        w = n.inputs[1]
        if graph.params.get(w.name) is not w or w.type.rank != 2 or not w.type.is_static:
            continue
        if not w.type.dtype.is_float or w.type.dtype is DType.f8e4m3 or not n.inputs[0].type.dtype.is_float:
            continue
        if len(n.inputs) > 2 and graph.params.get(n.inputs[2].name) is not n.inputs[2]:
            continue  # a computed bias: rare, left alone
        # by weight name, or by the module the GEMM came from: a tied output head reads the embedding
        # table (model.embed_tokens.weight) but its node's loc is "lm_head (modeling_llama.py:...)"
        if _excluded(w.name, exclude) or _excluded((n.loc or "").split(" (")[0], exclude):
            continue
        out.append(n)
    return out


def weight_nk(graph: Graph, node) -> np.ndarray:
    """The node's weight as f32 [N, K]."""
    w = param_array(graph.param_data[node.inputs[1].name]).astype(np.float32)
    return np.ascontiguousarray(w.T if _TARGETS[node.op] == "kn" else w)


def _replace(g: Graph, node, build) -> None:
    """Splice the nodes ``build(g)`` appends (returning the new result) in place of ``node``."""
    start = len(g.nodes)
    new_out = build(g)
    added = g.nodes[start:]
    del g.nodes[start:]
    at = g.nodes.index(node)
    g.nodes[at:at + 1] = added
    old = node.outputs[0]
    for n in g.nodes:
        n.inputs = [new_out if v is old else v for v in n.inputs]
    g.outputs = [new_out if v is old else v for v in g.outputs]


def _drop_unused_params(g: Graph, names) -> None:
    used = {v.name for n in g.nodes for v in n.inputs} | {v.name for v in g.outputs}
    for name in names:
        if name not in used and name in g.params:
            del g.params[name]
            g.param_data.pop(name, None)


def _tail(g: Graph, node, y, loc):
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


def _new_param(g: Graph, hint: str, data):
    """A parameter named after ``hint`` (made unique), holding ``data``."""
    name = g.fresh_name(hint)
    g._names.discard(name)  # fresh_name reserved it; add_param claims it again
    return g.add_param(name, data)


def input_groups(nodes) -> list:
    """GEMM nodes grouped by their activation input (q/k/v, gate/up): one AWQ/SmoothQuant scale each,
    since the activation they share can be divided by only one s."""
    groups: dict = {}
    for n in nodes:
        groups.setdefault(id(n.inputs[0]), []).append(n)
    return list(groups.values())


# norm op -> (result index that is the normed value, operand indices of its per-channel weight and bias)
_NORMS = {"rms_norm": (0, (1,)), "layer_norm": (0, (1, 2)), "fused.add_rms_norm": (1, (2,)),
          "fused.add_layer_norm": (1, (2, 3))}


def scale_group(g, grp, ws, s, weights: dict) -> None:
    """Multiply the input channels of each GEMM of ``grp`` (weights ``ws``, [N, K]) by ``s`` into
    ``weights`` and divide their shared input by ``s`` (AWQ and SmoothQuant both do this)."""
    for n, w in zip(grp, ws):
        weights[n.outputs[0].name] = w * s[None, :]
    divide_input(g, grp, s)


def divide_input(g: Graph, group: list, s: np.ndarray) -> None:
    """Make the group's shared input x become x / s (its weights were multiplied by s).

    Folded into the norm that produced x when that norm has a parameter weight (and bias) along K and
    nothing but this group reads x: the norm's weight and bias become new parameters divided by s (the
    model then costs nothing extra). Otherwise one ``mul(x, 1/s)`` feeds every GEMM of the group."""
    x = group[0].inputs[0]
    p = x.producer
    users = [n for n in g.nodes if any(v is x for v in n.inputs)]
    only_group = all(any(u is n for n in group) for u in users) and x not in g.outputs
    k = x.type.shape[-1]
    if only_group and p is not None and p.op == "mul":
        # an unfused norm ends in mul(normed, weight): the weight is a [K] parameter
        for i, v in enumerate(p.inputs):
            if g.params.get(v.name) is v and v.type.shape == (k,) and p.inputs[1 - i].type.shape[-1] == k:
                data = (param_array(g.param_data[v.name]).astype(np.float32) / s).astype(v.type.dtype.numpy)
                p.inputs[i] = _new_param(g, f"{v.name}.smoothed", data)
                return
    if only_group and p is not None and p.op in _NORMS and x.index == _NORMS[p.op][0] \
            and p.attrs.get("ndim", 1) == 1:
        idx = [i for i in _NORMS[p.op][1] if i < len(p.inputs)]
        if idx and all(g.params.get(p.inputs[i].name) is p.inputs[i] and p.inputs[i].type.rank == 1
                       for i in idx):
            for i in idx:
                v = p.inputs[i]
                data = (param_array(g.param_data[v.name]).astype(np.float32) / s).astype(v.type.dtype.numpy)
                p.inputs[i] = _new_param(g, f"{v.name}.smoothed", data)
            return
    inv = _new_param(g, f"{group[0].inputs[1].name}.act_inv_scale", (1.0 / s).astype(x.type.dtype.numpy))
    start = len(g.nodes)
    y = g.add_node("mul", [x, inv], loc=group[0].loc)
    mul = g.nodes.pop(start)
    g.nodes.insert(min(g.nodes.index(n) for n in group), mul)
    for n in group:
        n.inputs[0] = y


def _check_k(pass_, nodes, group: int, bits: int) -> None:
    # a group that does not divide K is fine (G = ceil(K / group), the last group shorter); an odd K is
    # not for int4, whose codes pack two per byte along K
    for n in nodes:
        k = n.inputs[1].type.shape[1 if _TARGETS[n.op] == "nk" else 0]
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
    exclude: str = "lm_head"

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

    def run(self, graph: Graph) -> Graph:
        nodes = gemm_targets(graph, self.exclude)
        if not nodes:
            return graph
        _check_k(self, nodes, self.group, self.bits)
        stats = None
        if self.method != "rtn":
            from .calibration import require_calibration
            stats = require_calibration(self).gemm_stats(graph, nodes)
        g = graph.clone()
        by_name = {n.outputs[0].name: n for n in g.nodes}
        weights = {}
        if self.method == "awq":
            from ..compress import awq
            for grp in input_groups([by_name[n.outputs[0].name] for n in nodes]):
                ws = [weight_nk(g, n) for n in grp]
                st = stats[grp[0].outputs[0].name]
                s = np.asarray(awq.awq_scales(np.concatenate(ws), st.abs_mean, None, self.bits, self.group,
                                              self.sym), np.float32)
                scale_group(g, grp, ws, s, weights)
        dropped = []
        for orig in nodes:
            node = by_name[orig.outputs[0].name]
            wname = node.inputs[1].name
            w = weights.get(node.outputs[0].name)
            w = weight_nk(g, node) if w is None else w
            st = stats[orig.outputs[0].name] if stats is not None else None
            codes, scale, zero = self._quantize(w, st)
            self._emit(g, node, codes, scale, zero, wname)
            dropped.append(wname)
        _drop_unused_params(g, dropped)
        return g

    def _quantize(self, w: np.ndarray, st):
        from ..compress import quant
        if self.dtype == "f8e4m3":
            from ..ir.opset.rules import to_dtype
            amax = np.abs(w).max(axis=1, keepdims=True)
            scale = np.where(amax > 0, amax / _F8_MAX, 1.0).astype(np.float32)
            return to_dtype(w / scale, DType.f8e4m3), scale, np.zeros_like(scale)
        if self.method == "gptq":
            from ..compress import gptq
            q, scale, zero = gptq.gptq_quantize(w, st.hessian, self.bits, self.group, self.sym)
        else:
            q, scale, zero = quant.quantize_rtn(w, self.bits, self.group, self.sym, self.per_tensor)
        codes, zero = quant.storage(np.asarray(q), np.asarray(zero, np.float32), self.bits, self.sym)
        return codes, np.asarray(scale, np.float32), zero

    def _emit(self, g, node, codes, scale, zero, wname):
        loc = node.loc

        def build(g):
            x = node.inputs[0]
            qp = _new_param(g, f"{wname}.qweight", codes)
            # scales stay f32 whatever x's dtype (bf16 scales would add their own 0.4% error)
            sp = _new_param(g, f"{wname}.scale", scale.astype(np.float32))
            zp = _new_param(g, f"{wname}.zero", zero.astype(np.float32))
            ins = [x, qp, sp, zp] + ([node.inputs[2]] if len(node.inputs) > 2 else [])
            y = g.add_node("quant.linear", ins, {"bits": self.bits, "group": self.group}, loc=loc)
            return _tail(g, node, y, loc)
        _replace(g, node, build)


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

    def run(self, graph: Graph) -> Graph:
        nodes = [n for n in gemm_targets(graph, self.exclude)
                 if n.inputs[0].type.dtype in (DType.f32, DType.f16, DType.bf16)
                 and (len(n.inputs) < 3 or n.inputs[2].type.dtype is n.inputs[0].type.dtype)]
        if not nodes:
            return graph
        stats = None
        if self.smooth:
            from .calibration import require_calibration
            stats = require_calibration(self).gemm_stats(graph, nodes)
        from ..compress.quant import quantize_rtn
        g = graph.clone()
        by_name = {n.outputs[0].name: n for n in g.nodes}
        weights = {}
        if self.smooth:
            from ..compress import smoothquant
            for grp in input_groups([by_name[n.outputs[0].name] for n in nodes]):
                ws = [weight_nk(g, n) for n in grp]
                s = np.asarray(smoothquant.smooth_scales(stats[grp[0].outputs[0].name].abs_max, np.concatenate(ws),
                                                         self.alpha), np.float32)
                scale_group(g, grp, ws, s, weights)
        dropped = []
        for orig in nodes:
            node = by_name[orig.outputs[0].name]
            wname = node.inputs[1].name
            w = weights.get(node.outputs[0].name)
            w = weight_nk(g, node) if w is None else w
            q, scale, _ = quantize_rtn(w, 8, 0, True)

            def build(g, node=node, q=q, scale=scale, wname=wname):
                x = node.inputs[0]
                qp = _new_param(g, f"{wname}.qweight", q)
                sp = _new_param(g, f"{wname}.wscale", np.ascontiguousarray(scale[:, 0]))
                ins = [x, qp, sp] + ([node.inputs[2]] if len(node.inputs) > 2 else [])
                return _tail(g, node, g.add_node("quant.linear_a8", ins, loc=node.loc), node.loc)
            _replace(g, node, build)
            dropped.append(wname)
        _drop_unused_params(g, dropped)
        return g
