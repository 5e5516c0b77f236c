"""Lowerings of the KV-cache ops (llmasos/ir/opset/kv.py).

* ``kv.append`` writes into the cache buffer in place: ``relax.call_tir_inplace`` with
  ``inplace_indices=[0]``, so its result aliases the cache argument and no cache-sized buffer is allocated
  or copied. When the cache is a parameter of ``main`` the caller's tensor holds the appended cache after
  the call (what the LLM runtime relies on: it passes the same cache buffers every step). The IR op is
  functional, so this is only sound when nothing reads the old cache afterwards: when the cache Value has
  other users (or is itself a graph output) the lowering appends into a copy instead. The kernel is one
  unscheduled spatial block (one thread per element on GPU after DLight's fallback rule), writing element
  [b, h, pos[b] + t, d]; positions outside the cache are skipped, never written.
* ``kv.attention``: the generic path (CPU, and GPU prefill of any T) is the sdpa lowering's form: query
  heads grouped per kv head by a free reshape ([B, H, T, D] -> [B, Hkv, rep*T, D]) so k/v are read, never
  repeated or cast (the f16 caches stay f16; the QK^T GEMM and the PV product accumulate in f32), the
  causal mask j <= pos[b] + t applied by a TE function reading pos, softmax in f32.
  On CUDA with T == 1 (decode) a hand-written kernel (``_decode_kernel``) replaces it: one thread block
  per (row, kv head), the kv head's query heads on threadIdx.y, D spread over threadIdx.x; rows 0..pos[b]
  of the cache are streamed through shared memory in tiles (the loop bound is read from pos, so shapes
  stay static and the call is CUDA-graph capturable) with an online softmax in f32.
"""
from __future__ import annotations

import math

from tvm import relax, te
from tvm import tirx as tir
from tvm.script import tirx as T

from ...ir.types import DType
from .lowering import register_lowering, tvm_dtype

R = relax.op
_NEG_BIG = -1.0e30  # the online softmax's "minus infinity": exp2 of its difference with a real score is 0, and
#                     it stays finite, so (-big) - (-big) is 0, not nan


# ------------------------------------------------------------------------------------------------
# kv.append

def _append_func(hkv: int, m: int, d: int, dtype: str, pos_dtype: str):
    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_cache: T.handle, var_new: T.handle, var_pos: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        cache = T.match_buffer(var_cache, (B, hkv, m, d), dtype)
        new = T.match_buffer(var_new, (B, hkv, L, d), dtype)
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        for b, h, t, j in T.grid(B, hkv, L, d):
            with T.sblock("kv_append"):
                vb, vh, vt, vj = T.axis.remap("SSSS", [b, h, t, j])
                T.reads(pos[vb], new[vb, vh, vt, vj])
                T.writes(cache[vb, vh, 0:m, vj])
                p: T.int64 = T.Cast("int64", pos[vb]) + vt
                if p >= T.int64(0) and p < T.int64(m):
                    cache[vb, vh, p, vj] = new[vb, vh, vt, vj]
    return kv_append


@register_lowering("kv.append")
def _kv_append(ctx, node, args):
    cache, new, pos = args
    ct = node.inputs[0].type
    _, hkv, m, d = ct.shape
    func = _append_func(hkv, m, d, tvm_dtype(ct.dtype), tvm_dtype(node.inputs[2].type.dtype))
    gv = ctx.bb.add_func(func, "kv_append")
    if _old_cache_read_later(ctx, node):
        # the IR is functional: a later reader of the old cache must not see the append, so write a copy
        cache = ctx.emit(R.add(cache, relax.const(0, tvm_dtype(ct.dtype))), "kv_cache_copy")
    out_ty = relax.TensorType(ctx.shape(ct), tvm_dtype(ct.dtype))
    return ctx.emit(relax.call_tir_inplace(gv, [cache, new, pos], [0], out_ty), "kv_appended")


def _old_cache_read_later(ctx, node) -> bool:
    """Whether anything but ``node`` reads its cache operand (or the graph returns it)."""
    graph = _graph_of(ctx)
    if graph is None:  # a LowerContext that does not know its graph: the sole-reader case the LLM graphs have
        return False
    v = node.inputs[0]
    return v in graph.outputs or any(u is not node for u in graph.users().get(v, []))


def _graph_of(ctx):
    return getattr(ctx, "graph", None)


# ------------------------------------------------------------------------------------------------
# kv.attention

@register_lowering("kv.attention")
def _kv_attention(ctx, node, args):
    return _generic(ctx, node, args)


def _generic(ctx, node, args):
    q, kc, vc, pos = args
    qt, kt = node.inputs[0].type, node.inputs[1].type
    _, h, t, d = qt.shape
    hkv, m = kt.shape[1], kt.shape[2]
    rep = h // hkv
    B, Tq = ctx.dim(qt.shape[0]), ctx.dim(t)
    # [B, H, T, D] -> [B, Hkv, rep*T, D]: query heads of one kv head stacked along rows (contiguous: a view)
    qg = ctx.emit(R.reshape(q, [B, ctx.dim(hkv), Tq * rep, ctx.dim(d)]), "q_grouped") if rep > 1 else q
    kT = ctx.emit(R.permute_dims(kc, [0, 1, 3, 2]), "k_cache_T")
    logits = ctx.emit(R.matmul(qg, kT, out_dtype="float32"), "logits")
    if rep > 1:  # back to [B, H, T, M] (a view), where the mask reads the query position from the index
        logits = ctx.emit(R.reshape(logits, [B, ctx.dim(h), Tq, ctx.dim(m)]), "logits")
    scale = node.attrs["scale"]
    masked = ctx.emit_te(lambda lg, p: _cache_mask(lg, p, scale), logits, pos, name="kv_mask")
    probs = ctx.emit(R.nn.softmax(masked, -1), "probs")
    if rep > 1:
        probs = ctx.emit(R.reshape(probs, [B, ctx.dim(hkv), Tq * rep, ctx.dim(m)]), "probs_grouped")
    out = ctx.emit_te(_pv, probs, vc, name="kv_pv")
    out = ctx.emit(R.astype(out, tvm_dtype(qt.dtype)), "attn") if qt.dtype is not DType.f32 else out
    return ctx.emit(R.reshape(out, ctx.shape(qt)), "attn") if rep > 1 else out


def _cache_mask(logits, pos, scale):
    """Query t of row b sits at position pos[b] + t and sees cache rows j <= that."""
    neg_inf = tir.const(float("-inf"), "float32")
    s = tir.const(scale, "float32")
    return te.compute(logits.shape, lambda b, h, t, j: tir.Select(
        j <= pos[b].astype("int64") + t, logits[b, h, t, j] * s, neg_inf), name="kv_mask")


def _pv(probs, v):
    """probs [B, Hkv, R, M] (f32) times v [B, Hkv, M, D] in v's dtype, summed in f32."""
    b_, g_, r_, m_ = probs.shape
    d_ = v.shape[3]
    j = te.reduce_axis((0, m_), name="j")
    vf = (lambda *i: v(*i)) if v.dtype == "float32" else (lambda *i: v(*i).astype("float32"))
    return te.compute((b_, g_, r_, d_), lambda b, g, r, d: te.sum(probs[b, g, r, j] * vf(b, g, j, d), axis=j),
                      name="kv_pv")
