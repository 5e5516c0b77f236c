"""Lowerings of the KV-cache ops (llmasos/ir/opset/kv.py).

* ``kv.append`` writes into the cache buffer in place: ``relax.call_tir_inplace`` with
  ``inplace_indices=[0]``, so its result aliases the cache argument and no cache-sized buffer is allocated
  or copied. When the cache is a parameter of ``main`` the caller's tensor holds the appended cache after
  the call (what the LLM runtime relies on: it passes the same cache buffers every step). The IR op is
  functional, so this is only sound when nothing reads the old cache afterwards: when the cache Value has
  other users (or is itself a graph output) the lowering appends into a copy instead. The kernel is one
  unscheduled spatial block (one thread per element on GPU after DLight's fallback rule), writing element
  [b, h, pos[b] + t, d]; positions outside the cache are skipped, never written.
* ``kv.attention``: the generic path (any T: prefill) groups query heads per kv head by a free reshape
  ([B, H, T, D] -> [B, Hkv, rep*T, D]) so k/v are read, never repeated or cast (f16 caches stay f16; the
  QK^T and PV products accumulate in f32); the mask j <= pos[b] + t is a TE function reading pos; softmax
  in f32. On targets with ``gemm_nt`` (GPU), QK^T reads the cache untransposed with the mask in its
  epilogue (3 kernels: logits, softmax, PV); elsewhere the sdpa lowering's form (a transposed cache
  feeding the panel GEMM on the CPU). The generic path computes logits for all M cache rows whatever pos
  is. With T == 1 (decode) the target's hand-written kernel (``Target.kv_decode_attention``), if it has
  one, replaces it, reading only rows 0..pos[b] (the loop bound is read from pos, so shapes
  stay static and the CUDA call is CUDA-graph capturable), with an online softmax in f32:
  - CUDA (``decode_attention_func``): one thread block per (row, kv head), the kv head's query heads on
    threadIdx.y, D over threadIdx.x, rows streamed through shared memory in tiles;
  - CPU (``decode_attention_cpu_func``): one parallel task per (row, kv head), each cache row read once
    for all the kv head's query heads (at M=2048, pos=1024, H=9, Hkv=3, D=64, one thread: 0.21 ms
    against the generic path's 0.83 ms).

The paged ops (layout: a pool per layer and per k/v, [NB, Hkv, BS, D], NB symbolic so one library serves any
pool size, and a block table [B, MB] i32 per call; row b's position p is pool[table[b, p // BS], :, p % BS]):

* ``kv.paged_append`` writes into the pool in place (``relax.call_tir_inplace``, like ``kv.append``): one
  unscheduled spatial block over (B, Hkv, T, D) (one thread per element on GPU after DLight's fallback
  rule); a token whose position is past MB*BS or whose table entry is outside [0, NB) (-1: unallocated) is
  dropped, so nothing is ever written outside the pool.
* ``kv.paged_attention`` with one query per row (a decode step) runs the target's hand-written kernel
  (``Target.kv_paged_decode_attention``), which walks the row's table block by block up to pos[b] and
  reads only those blocks (never the rest of the pool, never the row's blocks past pos), with an online
  softmax in f32:
  - CPU (``paged_decode_attention_cpu_func``): one parallel task per (row, kv head), each cache row read
    once for all the kv head's query heads; an unallocated block is skipped.
  - CUDA (``paged_decode_attention_func``): the contiguous decode kernel's layout, its
    shared-memory tiles filled through the block table; positions in unallocated blocks score -inf.
  Each paged kernel and its contiguous twin come from one template (``_decode_attention_cpu``,
  ``_decode_attention_cuda``) that differs only where a cache position is addressed: [b, :, p] or
  [table[b, p // BS], :, p % BS]; ``_decode_prim_func`` binds either layout's arguments.
* ``kv.paged_attention`` with T > 1 (prefill chunks, or a step that mixes prefill chunks and padded decode
  rows) runs the target's prefill kernel (``Target.kv_paged_prefill_attention``: on CUDA with
  flash_prefill="on", cuda_attention.paged_prefill_attention_func, which stages the row's blocks through the
  table) when it has one; otherwise it gathers each row's positions 0..pos[b]+T-1 through its table into a [B, Hkv, MB*BS, D] buffer
  (``if_then_else``: an unallocated entry's block and the positions past the last query are not read but
  zero) and runs kv.attention's generic path (``_generic``) with the mask ``j <= pos[b] + t and
  table[b, j // BS] is allocated``. Like the contiguous generic path it then computes logits for all
  MB*BS positions of a row (masked), which a dedicated paged prefill kernel would avoid.
* ``kv.ragged_attention`` (a serving step's tokens of several sequences packed in one row, q [1, H, N, D],
  each token its own position and table row) is kv.paged_attention over the token-major view [N, H, 1, D]:
  the decode kernel, one query a row. The appends it reads come from separate kv.paged_append kernels (the
  fuse-attention pass leaves it alone: a token reads what the call's other tokens appended).
"""
from __future__ import annotations

import math
from typing import Optional

from tvm import relax, te
from tvm import tirx as tir
from tvm.script import tirx as T

from ...ir.types import DType, TensorType, eval_dim
from .lowering import register_lowering, tvm_dtype
from .lowering_fused import emit_op

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
                # one element (none when p is outside the cache): DLight's analyses expect point regions of a
                # one-element block -- [0:m] here failed an assertion in its GEMV rule with hkv == 1 (CPU, CUDA)
                T.writes(cache[vb, vh, T.Cast("int64", pos[vb]) + vt, vj])
                p: T.int64 = T.Cast("int64", pos[vb]) + vt
                if p >= T.int64(0) and p < T.int64(m):
                    cache[vb, vh, p, vj] = new[vb, vh, vt, vj]
    return kv_append


@register_lowering("kv.append")
def _kv_append(ctx, node, args):
    return _append(ctx, args, node.inputs[0].type, node.inputs[2].type, _old_cache_read_later(ctx, node))


def _append(ctx, args, ct, pos_t, copy: bool):
    """kv.append of args (cache, new, pos) with the cache typed ``ct``: in place, or into a new cache (``copy``)."""
    cache, new, pos = args
    if copy:
        # the IR is functional: a later reader of the old cache must not see the append, so build a new cache.
        # (Not a copy followed by the in-place kernel: RewriteDataflowReshape turns an identity copy into a
        # view of its input, and the in-place write would then land in the old cache after all.)
        return ctx.emit_te(_append_functional, cache, new, pos, name="kv_append_copy")
    _, hkv, m, d = ct.shape
    gv = ctx.bb.add_func(_append_func(hkv, m, d, tvm_dtype(ct.dtype), tvm_dtype(pos_t.dtype)), "kv_append")
    out_ty = relax.TensorType(ctx.shape(ct), tvm_dtype(ct.dtype))
    return ctx.emit(relax.call_tir_inplace(gv, [cache, new, pos], [0], out_ty), "kv_appended")


def _append_functional(cache, new, pos):
    """A new cache: row j of batch row b is new[b, :, j - pos[b]] where that is a new token, else the cache's."""
    L = new.shape[2]

    def at(b, h, j, x):
        r = j - pos[b].astype("int64")
        safe = tir.max(tir.min(r, L - 1), tir.const(0, "int64"))  # Select evaluates both sides: stay in bounds
        return tir.Select(tir.all(r >= 0, r < L), new[b, h, safe, x], cache[b, h, j, x])
    return te.compute(cache.shape, at, name="kv_append_copy")


def _old_cache_read_later(ctx, node, index: int = 0) -> bool:
    """Whether anything but ``node`` reads its cache operand ``index`` (or the graph returns it)."""
    graph = _graph_of(ctx)
    if graph is None:  # a LowerContext that does not know its graph: the sole-reader case the LLM graphs have
        return False
    v = node.inputs[index]
    return v in graph.outputs or any(u is not node for u in graph.users().get(v, []))


def _graph_of(ctx):
    """The graph a LowerContext lowers (None for a context made without one, e.g. by a plugin)."""
    return getattr(ctx, "graph", None)


# ------------------------------------------------------------------------------------------------
# kv.attention

@register_lowering("kv.attention")
def _kv_attention(ctx, node, args):
    kernel = _decode_kernel(ctx, node)
    if kernel is None:
        kernel = _prefill_kernel(ctx, node)
    if kernel is not None:
        return _decode_call(ctx, node, args, kernel)
    return _generic(ctx, node, args)


def _fits_int32(ctx, *types) -> bool:
    """Whether every tensor of ``types`` has fewer than 2**31 elements at its symbols' upper bounds (the
    hand-written kernels index in int32); an unbounded symbol counts as too large."""
    graph = _graph_of(ctx)
    env = {n: hi for n, (_, hi) in (graph.symbols.items() if graph is not None else ()) if hi is not None}
    for t in types:
        n = 1
        for dim in t.shape:
            try:
                n *= dim if isinstance(dim, int) else int(eval_dim(dim, env))
            except (KeyError, ValueError, TypeError):
                return False
        if n >= 1 << 31:
            return False
    return True


def _prefill_kernel(ctx, node):
    """(name, PrimFunc) of the target's prefill kernel (``Target.kv_prefill_attention``) for a node with
    several (or a symbolic number of) queries per row, else None (also when a tensor could reach 2**31
    elements: the kernel's indices are int32)."""
    qt, kt = node.inputs[0].type, node.inputs[1].type
    if ctx.spec is None or qt.shape[2] == 1 or qt.dtype not in (DType.f16, DType.f32):
        return None
    _, h, _, d = qt.shape
    hkv, m = kt.shape[1], kt.shape[2]
    if not all(isinstance(x, int) for x in (h, d, hkv, m)) or not _fits_int32(ctx, qt, kt):
        return None
    return ctx.spec.kv_prefill_attention(h, hkv, m, d, tvm_dtype(qt.dtype), tvm_dtype(node.inputs[3].type.dtype),
                                         node.attrs["scale"])


def _decode_kernel(ctx, node):
    """(name, PrimFunc) of the target's decode kernel (``Target.kv_decode_attention``) when the node has
    one query per row, else None."""
    qt, kt = node.inputs[0].type, node.inputs[1].type
    if ctx.spec is None or qt.shape[2] != 1 or qt.dtype not in (DType.f16, DType.f32):
        return None
    _, h, _, d = qt.shape
    hkv, m = kt.shape[1], kt.shape[2]
    return ctx.spec.kv_decode_attention(h, hkv, m, d, tvm_dtype(qt.dtype), tvm_dtype(node.inputs[3].type.dtype),
                                        node.attrs["scale"])


def _generic(ctx, node, args, m=None, table=None):
    """The any-T path. kv.paged_attention calls it on its gathered caches [B, Hkv, m, D]
    with table=(block table, BS): positions in unallocated blocks are masked too."""
    q, kc, vc, pos = args
    qt, kt = node.inputs[0].type, node.inputs[1].type
    _, h, t, d = qt.shape
    hkv = kt.shape[1]
    m = kt.shape[2] if m is None else m
    rep = h // hkv
    B, Tq = ctx.dim(qt.shape[0]), ctx.dim(t)
    # [B, H, T, D] -> [B, Hkv, rep*T, D]: query heads of one kv head stacked along rows (contiguous: a view)
    qg = ctx.emit(R.reshape(q, [B, ctx.dim(hkv), Tq * rep, ctx.dim(d)]), "q_grouped") if rep > 1 else q
    scale = node.attrs["scale"]
    if _nt_logits(ctx):
        # GPU: q k^T reading k as stored (each logit reduces over a contiguous cache row) with the mask in
        # the GEMM's epilogue; R.matmul on a permuted cache would copy the whole transposed cache per call.
        # q rides along unread so the PrimFunc can bind T (the grouped rows are rep*T)
        if table is None:
            qk = ctx.emit_te(lambda a, k, p, q0: _qk_masked(a, k, p, q0, scale), qg, kc, pos, q, name="kv_qk_masked")
        else:
            qk = ctx.emit_te(lambda a, k, p, q0, tb: _qk_masked(a, k, p, q0, scale, (tb, table[1])), qg, kc, pos, q,
                             table[0], name="kv_qk_masked")
        probs = ctx.emit(R.nn.softmax(qk, -1), "probs")
    else:
        # CPU: the transposed cache feeds the panel GEMM (cpu_schedule.Matmul wants N innermost)
        kT = ctx.emit(R.permute_dims(kc, [0, 1, 3, 2]), "k_cache_T")
        logits = ctx.emit(R.matmul(qg, kT, out_dtype="float32"), "logits")
        if rep > 1:  # back to [B, H, T, M] (a view), where the mask reads the query position from the index
            logits = ctx.emit(R.reshape(logits, [B, ctx.dim(h), Tq, ctx.dim(m)]), "logits")
        if table is None:
            masked = ctx.emit_te(lambda lg, p: _cache_mask(lg, p, scale), logits, pos, name="kv_mask")
        else:
            masked = ctx.emit_te(lambda lg, p, tb: _cache_mask(lg, p, scale, (tb, table[1])), logits, pos, table[0],
                                 name="kv_mask")
        probs = ctx.emit(R.nn.softmax(masked, -1), "probs")
        if rep > 1:
            probs = ctx.emit(R.reshape(probs, [B, ctx.dim(hkv), Tq * rep, ctx.dim(m)]), "probs_grouped")
    out = ctx.emit_te(_pv, probs, vc, name="kv_pv")
    out = ctx.emit(R.astype(out, tvm_dtype(qt.dtype)), "attn") if qt.dtype is not DType.f32 else out
    return ctx.emit(R.reshape(out, ctx.shape(qt)), "attn") if rep > 1 else out


def _allocated(paged, b, j):
    """True, or (paged: (block table, BS)) whether row b's position j is in an allocated block."""
    if paged is None:
        return tir.const(True, "bool")
    table, bs = paged
    return table[b, j // bs] >= 0


def _cache_mask(logits, pos, scale, paged=None):
    """Query t of row b sits at position pos[b] + t and sees cache rows j <= that (paged: in allocated blocks)."""
    neg_inf = tir.const(float("-inf"), "float32")
    s = tir.const(scale, "float32")
    return te.compute(logits.shape, lambda b, h, t, j: tir.Select(
        tir.all(j <= pos[b].astype("int64") + t, _allocated(paged, b, j)), logits[b, h, t, j] * s, neg_inf),
        name="kv_mask")


def _nt_logits(ctx) -> bool:
    return ctx.spec is not None and ctx.spec.gemm_nt


def _qk_masked(qg, kc, pos, q, scale, paged=None):
    """Grouped logits [B, Hkv, rep*T, M] in f32: row r is query r % T of head group r // T, at position
    pos[b] + r % T; cache rows past it are -inf. T is read from q's shape (q itself is not read)."""
    b_, g_, rows, d_ = qg.shape
    m_ = kc.shape[2]
    t_len = q.shape[2]
    x = te.reduce_axis((0, d_), name="x")
    f32 = (lambda e: e) if qg.dtype == "float32" else (lambda e: e.astype("float32"))
    s = te.compute((b_, g_, rows, m_), lambda b, g, r, j: te.sum(f32(qg[b, g, r, x]) * f32(kc[b, g, j, x]), axis=x),
                   name="kv_qk")
    neg_inf = tir.const(float("-inf"), "float32")
    return te.compute(s.shape, lambda b, g, r, j: tir.Select(
        tir.all(j <= pos[b].astype("int64") + tir.floormod(r, t_len), _allocated(paged, b, j)),
        s[b, g, r, j] * tir.const(scale, "float32"), neg_inf),
        name="kv_qk_masked")


def _pv(probs, v):
    """probs [B, Hkv, R, M] (f32) times v [B, Hkv, M, D] in v's dtype, summed in f32."""
    b_, g_, r_, m_ = probs.shape
    d_ = v.shape[3]
    j = te.reduce_axis((0, m_), name="j")
    vf = (lambda *i: v(*i)) if v.dtype == "float32" else (lambda *i: v(*i).astype("float32"))
    return te.compute((b_, g_, r_, d_), lambda b, g, r, d: te.sum(probs[b, g, r, j] * vf(b, g, j, d), axis=j),
                      name="kv_pv")


# ------------------------------------------------------------------------------------------------
# kv.attention: the CUDA decode kernel (T == 1)

_THREADS = 512  # per block; at D=64 f16: 16 lanes over D x 4 query heads x 8 row groups
_MAX_BLOCK_Z = 64  # CUDA's limit on blockDim.z (x and y allow 1024)


DECODE_TILES = (1, 2, 4, 8)   # cache rows each row group takes per iteration (target option decode_attention_tile)


def _decode_shape(h: int, hkv: int, d: int, dtype: str, tile: Optional[int] = None) -> dict:
    """Thread-block layout: D over threadIdx.x (VEC elements each), query heads of one kv head over
    threadIdx.y, independent row groups (merged at the end) over threadIdx.z, each taking ``tile`` consecutive
    cache rows an iteration (None: 2 without grouped queries, else 1)."""
    if tile is not None and tile not in DECODE_TILES:
        raise ValueError(f"decode attention: tile must be one of {DECODE_TILES}, got {tile!r}")
    group = h // hkv
    vec = min(max(8 // (2 if dtype == "float16" else 4), d // 32), 4)
    while d % vec:
        vec //= 2
    bdx = d // vec
    # one query head per block (bdy = 1): a decode step has only B * Hkv (kv head) blocks otherwise -- 8 of an
    # H100's 132 SMs for Llama-1B at batch 1, 6.7 us a layer; the other heads' re-reads of K/V hit in L2
    bdy = 1
    # CUDA caps blockDim.z at 64: a small head dim (bdx < 8) would otherwise ask for up to 512 row groups
    bdz = max(min(_THREADS // (bdx * bdy), _MAX_BLOCK_Z), 1)
    return {"group": group, "vec": vec, "bdx": bdx, "bdy": bdy, "gdz": group // bdy, "bdz": bdz,
            "tile": tile or (2 if group == 1 else 1)}


def decode_attention_func(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float,
                          fused: Optional[bool] = None, packed: Optional[tuple] = None, tile: Optional[int] = None):
    """The decode kernel: q [B, H, 1, D], caches [B, Hkv, M, D], pos [B] -> out [B, H, 1, D]
    (``_decode_attention_cuda`` with row b's position p at cache[b, :, p]). ``fused``: the kernel of
    fused.rope_append_attention (False: the appends; True: and RoPE), arguments as ``_decode_prim_func``;
    ``tile``: cache rows a row group takes per iteration (_decode_shape)."""
    return _decode_attention_cuda(h, hkv, m, d, dtype, pos_dtype, scale, paged=None, fused=fused, packed=packed,
                                  tile=tile)


def paged_decode_attention_func(h: int, hkv: int, bs: int, mb: int, d: int, dtype: str, pos_dtype: str,
                                scale: float, fused: Optional[bool] = None, packed: Optional[tuple] = None,
                                tile: Optional[int] = None):
    """q [B, H, 1, D], pools [NB, Hkv, BS, D], pos [B], table [B, MB] -> out [B, H, 1, D]
    (``_decode_attention_cuda`` with position p at pool[table[b, p // BS], :, p % BS]); ``fused`` and ``tile``
    as in decode_attention_func (fused.rope_paged_append_attention)."""
    return _decode_attention_cuda(h, hkv, mb * bs, d, dtype, pos_dtype, scale, paged=(bs, mb), fused=fused,
                                  packed=packed, tile=tile)


def _decode_attention_cuda(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float,
                           paged: Optional[tuple], fused: Optional[bool] = None, packed: Optional[tuple] = None,
                           tile: Optional[int] = None):
    """The CUDA decode kernel of both cache layouts (``paged``: None, or (BS, MB) with M = MB * BS; the arguments
    are ``_decode_prim_func``'s).

    Grid (B, Hkv * gdz); each block streams cache positions 0..pos[b] of its kv head (and nothing else of the
    cache or pool) through shared memory in tiles of bdz*bdy*tile rows; each thread group keeps a running max /
    sum / output (online softmax, f32, base-2 exponent) for its query head, and the bdz partial states are
    merged at the end. Paged, a position in an unallocated block loads zeros and scores -inf. Written after
    TVM's batch_decode_paged_kv (relax/frontend/nn/llm/_decode_kernels.py).

    ``fused`` (``_decode_prim_func``): each block rotates its query head as it loads it; the tile row at
    position pos[b] takes the new key (rotated) and value from their inputs instead of the cache, and the
    blocks of the kv head's first query head (bz == 0) write that row into the cache (or its block of the
    pool, when allocated). No block reads position pos[b] from the cache, so no block waits for another.
    """
    s = _decode_shape(h, hkv, d, dtype, tile)
    group, VEC, bdx, bdy, bdz, gdz, tile = (s[k] for k in ("group", "vec", "bdx", "bdy", "bdz", "gdz", "tile"))
    rows = bdz * bdy * tile  # cache rows per iteration of the whole block
    qk_scale = float(scale) * math.log2(math.e)
    neg = _NEG_BIG
    bs = paged[0] if paged is not None else None
    rope = bool(fused)
    ld = _head_loader(packed, d)
    rot = _rope_at(dtype, d, ld)
    qo, ko, vo = (0, 0, 0) if packed is None else packed[1:]   # the slices' offsets in heads
    split = (d // 2) % VEC == 0   # a thread's VEC elements lie in one half of the head (rotate_half's sign)

    # fmt: off
    @T.inline
    def body(Q, K, V, pos, table, O, B, NB, KN, VN, COS, SIN):
        # `if paged ...` (and `if fused ...`, `if rope ...`) below are resolved while parsing: each kernel holds
        # only its own branches
        for bx in T.thread_binding(B, thread="blockIdx.x"):
            for fused_by_bz in T.thread_binding(hkv * gdz, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        for tz in T.thread_binding(bdz, thread="threadIdx.z"):
                            with T.sblock("attn"):
                                Q_local = T.sblock_alloc_buffer((VEC,), dtype, scope="local")
                                kv_len = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                K_smem = T.sblock_alloc_buffer((rows, d), dtype, scope="shared")
                                V_smem = T.sblock_alloc_buffer((rows, d), dtype, scope="shared")
                                if paged is not None:  # 1: the row's position is in an allocated block
                                    ok_smem = T.sblock_alloc_buffer((rows,), "int32", scope="shared")
                                O_allreduce = T.sblock_alloc_buffer((bdz, bdy, d), "float32", scope="shared")
                                md_allreduce = T.sblock_alloc_buffer((bdz, bdy, 2), "float32", scope="shared")
                                S_reduce_local = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                t0 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                S_local = T.sblock_alloc_buffer((bdy * tile,), "float32", scope="local")
                                QK_local = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                V_local = T.sblock_alloc_buffer((VEC,), dtype, scope="local")
                                m_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                d_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                other_m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                other_d = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                exp_mprev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                exp_otherm = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                other_o = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                st_m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                st_d = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                O_local = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                R_local = T.sblock_alloc_buffer((VEC,), dtype, scope="local")  # a rotated chunk

                                @T.inline
                                def rope_chunk(X, hh):  # R_local <- the thread's VEC elements of rope(X[bx, hh, 0])
                                    if split:  # (resolved while parsing) the chunk lies in one half of the head
                                        if tx * VEC < d // 2:
                                            for vec in T.vectorized(VEC):
                                                R_local[vec] = rot(X, COS, SIN, bx, hh, tx * VEC + vec, True)
                                        else:
                                            for vec in T.vectorized(VEC):
                                                R_local[vec] = rot(X, COS, SIN, bx, hh, tx * VEC + vec, False)
                                    else:
                                        for vec in T.serial(VEC):
                                            R_local[vec] = rot(X, COS, SIN, bx, hh, tx * VEC + vec)

                                by: T.let[T.int32] = fused_by_bz % hkv
                                bz: T.let[T.int32] = fused_by_bz // hkv
                                qh: T.let[T.int32] = by * group + bz * bdy + ty
                                # rows 0..pos[b] (query at position pos[b] sees itself), clamped to the cache
                                kv_len[0] = T.min(T.max(T.Cast("int32", pos[bx]) + 1, 0), m)

                                st_m[0] = T.float32(neg)
                                st_d[0] = T.float32(1.0)
                                for vec in T.vectorized(VEC):
                                    O_local[vec] = T.float32(0)
                                if rope:
                                    rope_chunk(Q, qh + qo)
                                    for vec in T.vectorized(VEC):
                                        Q_local[vec] = R_local[vec]
                                else:
                                    for vec in T.vectorized(VEC):
                                        Q_local[vec] = ld(Q, bx, qh + qo, tx * VEC + vec)

                                for iterator in T.serial(T.ceildiv(kv_len[0], rows)):
                                    tile_start_s: T.let[T.int32] = (tz * bdy + ty) * tile
                                    tile_start_g: T.let[T.int32] = ((iterator * bdz + tz) * bdy + ty) * tile
                                    for j in T.serial(tile):
                                        with T.sblock("KV_load"):
                                            T.reads()
                                            T.writes()
                                            row_g: T.let[T.int32] = tile_start_g + j

                                            @T.inline
                                            def load(blk, row):  # cache row [blk, kv head, row] -> shared memory
                                                for vec in T.vectorized(VEC):
                                                    K_smem[tile_start_s + j, tx * VEC + vec] = K[blk, by, row, tx * VEC + vec]
                                                    V_smem[tile_start_s + j, tx * VEC + vec] = V[blk, by, row, tx * VEC + vec]

                                            @T.inline
                                            def load_new(blk, row):  # the appended row: from KN / VN, into the cache
                                                if rope:
                                                    rope_chunk(KN, by + ko)
                                                else:
                                                    for vec in T.vectorized(VEC):
                                                        R_local[vec] = ld(KN, bx, by + ko, tx * VEC + vec)
                                                for vec in T.vectorized(VEC):
                                                    K_smem[tile_start_s + j, tx * VEC + vec] = R_local[vec]
                                                    V_smem[tile_start_s + j, tx * VEC + vec] = ld(VN, bx, by + vo, tx * VEC + vec)
                                                if bz == 0:  # (from registers and the input: a shared-memory read here
                                                    #            would need a barrier inside this branch)
                                                    for vec in T.vectorized(VEC):
                                                        K[blk, by, row, tx * VEC + vec] = R_local[vec]
                                                        V[blk, by, row, tx * VEC + vec] = ld(VN, bx, by + vo, tx * VEC + vec)

                                            @T.inline
                                            def load_row(blk, row):
                                                if fused is None:
                                                    load(blk, row)
                                                else:
                                                    if row_g == T.Cast("int32", pos[bx]):
                                                        load_new(blk, row)
                                                    else:
                                                        load(blk, row)

                                            @T.inline
                                            def load_zeros():
                                                for vec in T.vectorized(VEC):
                                                    K_smem[tile_start_s + j, tx * VEC + vec] = T.Cast(dtype, 0)
                                                    V_smem[tile_start_s + j, tx * VEC + vec] = T.Cast(dtype, 0)

                                            if paged is None:
                                                if row_g < kv_len[0]:
                                                    load_row(bx, row_g)
                                                else:
                                                    load_zeros()
                                            else:
                                                blk: T.let[T.int32] = T.if_then_else(row_g < kv_len[0], table[bx, T.min(row_g, m - 1) // bs], -1)
                                                if blk >= 0 and blk < NB:
                                                    load_row(blk, row_g % bs)
                                                    if tx == 0:
                                                        ok_smem[tile_start_s + j] = 1
                                                else:
                                                    load_zeros()
                                                    if tx == 0:
                                                        ok_smem[tile_start_s + j] = 0
                                    T.tvm_storage_sync("shared")
                                    m_prev[0] = st_m[0]
                                    for j in T.serial(bdy * tile):
                                        for vec in T.vectorized(VEC):
                                            QK_local[vec] = T.Cast("float32", Q_local[vec]) * T.Cast("float32", K_smem[tz * bdy * tile + j, tx * VEC + vec]) * T.float32(qk_scale)
                                        S_reduce_local[0] = T.float32(0)
                                        for vec in T.unroll(VEC):
                                            S_reduce_local[0] += QK_local[vec]
                                        with T.sblock("block_cross_thread"):
                                            T.reads(S_reduce_local[0])
                                            T.writes(t0[0])
                                            T.attr(T.comm_reducer(lambda x0, y0: x0 + y0, [T.float32(0)]), "reduce_scope", T.int32(0))
                                            T.tvm_thread_allreduce(T.uint32(1), S_reduce_local[0], True, t0[0], tx, dtype="void")
                                        if paged is None:  # rows past kv_len score -inf
                                            S_local[j] = T.float32(neg)
                                            if (iterator * bdz + tz) * bdy * tile + j < kv_len[0]:
                                                S_local[j] = t0[0]
                                        else:  # and so do unallocated blocks'
                                            S_local[j] = T.if_then_else(ok_smem[tz * bdy * tile + j] == 1, t0[0], T.float32(neg))
                                        st_m[0] = T.max(st_m[0], S_local[j])
                                    o_scale: T.let[T.float32] = T.exp2(m_prev[0] - st_m[0])
                                    st_d[0] *= o_scale
                                    for j in T.serial(bdy * tile):
                                        if paged is None:
                                            S_local[j] = T.exp2(S_local[j] - st_m[0])
                                        else:
                                            # a masked score stays masked even while the running max is -big too
                                            S_local[j] = T.if_then_else(ok_smem[tz * bdy * tile + j] == 1, T.exp2(S_local[j] - st_m[0]), T.float32(0))
                                        st_d[0] += S_local[j]
                                    for j in T.vectorized(VEC):
                                        O_local[j] *= o_scale
                                    for j in T.serial(bdy * tile):
                                        for vec in T.vectorized(VEC):
                                            V_local[vec] = V_smem[tz * bdy * tile + j, tx * VEC + vec]
                                        for vec in T.vectorized(VEC):
                                            O_local[vec] += T.Cast("float32", V_local[vec]) * S_local[j]
                                    # the next tile's loads overwrite rows other warps may still be reading
                                    T.tvm_storage_sync("shared")

                                if bdz > 1:
                                    for vec in T.vectorized(VEC):
                                        O_allreduce[tz, ty, tx * VEC + vec] = O_local[vec]
                                    if tx == 0:  # (one writer: the tx lanes hold the same values)
                                        md_allreduce[tz, ty, 0] = st_m[0]
                                        md_allreduce[tz, ty, 1] = st_d[0]
                                    T.tvm_storage_sync("shared")
                                    st_m[0] = T.float32(neg)
                                    st_d[0] = T.float32(1.0)
                                    for vec in T.vectorized(VEC):
                                        O_local[vec] = T.float32(0)
                                    for j in T.serial(bdz):
                                        m_prev[0] = st_m[0]
                                        d_prev[0] = st_d[0]
                                        other_m[0] = md_allreduce[j, ty, 0]
                                        other_d[0] = md_allreduce[j, ty, 1]
                                        for vec in T.vectorized(VEC):
                                            other_o[vec] = O_allreduce[j, ty, tx * VEC + vec]
                                        st_m[0] = T.max(st_m[0], other_m[0])
                                        st_d[0] = d_prev[0] * T.exp2(m_prev[0] - st_m[0]) + other_d[0] * T.exp2(other_m[0] - st_m[0])
                                        exp_mprev[0] = T.exp2(m_prev[0] - st_m[0])
                                        exp_otherm[0] = T.exp2(other_m[0] - st_m[0])
                                        for vec in T.vectorized(VEC):
                                            O_local[vec] = O_local[vec] * exp_mprev[0] + other_o[vec] * exp_otherm[0]
                                if paged is None:
                                    for vec in T.vectorized(VEC):
                                        O_local[vec] /= st_d[0]
                                else:
                                    for vec in T.vectorized(VEC):
                                        O_local[vec] /= T.max(st_d[0], T.float32(1e-30))
                                if tz == 0:  # (after the merge every tz holds the same output)
                                    for vec in T.vectorized(VEC):
                                        O[bx, qh, 0, tx * VEC + vec] = T.Cast(dtype, O_local[vec])
    # fmt: on
    return _decode_prim_func(h, hkv, m, d, dtype, pos_dtype, paged, "int32", body, fused, packed)


def _decode_call(ctx, node, args, kernel: tuple):
    name, func = kernel
    qt = node.inputs[0].type
    gv = ctx.bb.add_func(func, name)
    return ctx.emit(relax.call_tir(gv, list(args), relax.TensorType(ctx.shape(qt), tvm_dtype(qt.dtype))), "attn")


def _decode_prim_func(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, paged: Optional[tuple],
                      index: str, body, fused: Optional[bool] = None, packed: Optional[tuple] = None):
    """A decode kernel's PrimFunc around ``body``, the kernel proper (a ``T.inline`` called with the buffers and
    sizes (Q, K, V, pos, table, O, B, NB, KN, VN, COS, SIN)). Arguments q [B, H, 1, D], the caches, pos [B], out
    [B, H, 1, D]: ``paged`` None, caches [B, Hkv, M, D] (row b's position p at [b, :, p]; table and NB are
    None); ``paged`` (BS, MB), pools [NB, Hkv, BS, D] and a block table [B, MB] i32 after pos (position p at
    [table[b, p // BS], :, p % BS]). B and NB are of dtype ``index``.

    ``fused`` (fused.rope_append_attention's kernel): None, attention only; False, the new key and value rows
    KN, VN [B, Hkv, 1, D] come after q and are appended at pos[b] (written into the caches, which the caller
    passes in place); True, and RoPE tables COS, SIN [B, 1, 1, D] follow pos (or the table) and q and the new
    key are rotated. Argument order: q, (KN, VN,) caches, pos, (table,) (COS, SIN,) out -- the fused op's
    operands, then the output. ``packed`` (W, qo, ko, vo), fused kernels only: q, the new keys and the new
    values are not three arguments but one, the projection X [B, 1, W] they are slices of (query head h at
    X[b, 0, (qo + h) * D:], kv head g's new key at (ko + g) * D, its value at (vo + g) * D) -- no copies of
    the slices are made."""
    bs, mb = paged if paged is not None else (None, None)
    index_var = T.int32 if index == "int32" else T.int64
    rope = bool(fused)

    # fmt: off
    @T.inline
    def kernel(var_q, var_k, var_v, var_pos, var_table, var_out, var_kn, var_vn, var_cos, var_sin):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = index_var()
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        O = T.match_buffer(var_out, (B, h, 1, d), dtype)

        @T.inline
        def run(K, V, table, NB):  # body with the fused kernels' extra buffers (None where absent)
            if fused is None:  # (resolved while parsing, as every `if` on these Python values below)
                Q = T.match_buffer(var_q, (B, h, 1, d), dtype)
                body(Q, K, V, pos, table, O, B, NB, None, None, None, None)
            elif packed is not None:
                Q = T.match_buffer(var_q, (B, 1, packed[0]), dtype)
                if rope:
                    COS = T.match_buffer(var_cos, (B, 1, 1, d), dtype)
                    SIN = T.match_buffer(var_sin, (B, 1, 1, d), dtype)
                    body(Q, K, V, pos, table, O, B, NB, Q, Q, COS, SIN)
                else:
                    body(Q, K, V, pos, table, O, B, NB, Q, Q, None, None)
            else:
                Q = T.match_buffer(var_q, (B, h, 1, d), dtype)
                KN = T.match_buffer(var_kn, (B, hkv, 1, d), dtype)
                VN = T.match_buffer(var_vn, (B, hkv, 1, d), dtype)
                if rope:
                    COS = T.match_buffer(var_cos, (B, 1, 1, d), dtype)
                    SIN = T.match_buffer(var_sin, (B, 1, 1, d), dtype)
                    body(Q, K, V, pos, table, O, B, NB, KN, VN, COS, SIN)
                else:
                    body(Q, K, V, pos, table, O, B, NB, KN, VN, None, None)

        if paged is None:
            K = T.match_buffer(var_k, (B, hkv, m, d), dtype)
            V = T.match_buffer(var_v, (B, hkv, m, d), dtype)
            run(K, V, None, None)
        else:
            NB = index_var()
            K = T.match_buffer(var_k, (NB, hkv, bs, d), dtype)
            V = T.match_buffer(var_v, (NB, hkv, bs, d), dtype)
            table = T.match_buffer(var_table, (B, mb), "int32")
            run(K, V, table, NB)

    if fused is None and paged is None:
        @T.prim_func(private=True, s_tir=True)
        def kv_decode_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                var_out: T.handle):
            kernel(var_q, var_k, var_v, var_pos, None, var_out, None, None, None, None)
        return kv_decode_attention
    if fused is None:
        @T.prim_func(private=True, s_tir=True)
        def kv_paged_decode_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                      var_table: T.handle, var_out: T.handle):
            kernel(var_q, var_k, var_v, var_pos, var_table, var_out, None, None, None, None)
        return kv_paged_decode_attention
    if packed is not None:
        return _packed_prim_func(kernel, paged, rope)
    if paged is None and not rope:
        @T.prim_func(private=True, s_tir=True)
        def kv_decode_append_attention(var_q: T.handle, var_kn: T.handle, var_vn: T.handle, var_k: T.handle,
                                       var_v: T.handle, var_pos: T.handle, var_out: T.handle):
            kernel(var_q, var_k, var_v, var_pos, None, var_out, var_kn, var_vn, None, None)
        return kv_decode_append_attention
    if paged is None:
        @T.prim_func(private=True, s_tir=True)
        def kv_decode_rope_append_attention(var_q: T.handle, var_kn: T.handle, var_vn: T.handle, var_k: T.handle,
                                            var_v: T.handle, var_pos: T.handle, var_cos: T.handle,
                                            var_sin: T.handle, var_out: T.handle):
            kernel(var_q, var_k, var_v, var_pos, None, var_out, var_kn, var_vn, var_cos, var_sin)
        return kv_decode_rope_append_attention
    if not rope:
        @T.prim_func(private=True, s_tir=True)
        def kv_paged_decode_append_attention(var_q: T.handle, var_kn: T.handle, var_vn: T.handle, var_k: T.handle,
                                             var_v: T.handle, var_pos: T.handle, var_table: T.handle,
                                             var_out: T.handle):
            kernel(var_q, var_k, var_v, var_pos, var_table, var_out, var_kn, var_vn, None, None)
        return kv_paged_decode_append_attention

    @T.prim_func(private=True, s_tir=True)
    def kv_paged_decode_rope_append_attention(var_q: T.handle, var_kn: T.handle, var_vn: T.handle,
                                              var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                              var_table: T.handle, var_cos: T.handle, var_sin: T.handle,
                                              var_out: T.handle):
        kernel(var_q, var_k, var_v, var_pos, var_table, var_out, var_kn, var_vn, var_cos, var_sin)
    # fmt: on
    return kv_paged_decode_rope_append_attention


def _packed_prim_func(kernel, paged, rope: bool):
    """The fused kernels' PrimFuncs with one projection argument X for q and the new keys and values
    (``_decode_prim_func``'s ``packed``): X, caches, pos, (table,) (cos, sin,) out."""
    # fmt: off
    if paged is None and not rope:
        @T.prim_func(private=True, s_tir=True)
        def kv_decode_append_attention(var_x: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                       var_out: T.handle):
            kernel(var_x, var_k, var_v, var_pos, None, var_out, None, None, None, None)
        return kv_decode_append_attention
    if paged is None:
        @T.prim_func(private=True, s_tir=True)
        def kv_decode_rope_append_attention(var_x: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                            var_cos: T.handle, var_sin: T.handle, var_out: T.handle):
            kernel(var_x, var_k, var_v, var_pos, None, var_out, None, None, var_cos, var_sin)
        return kv_decode_rope_append_attention
    if not rope:
        @T.prim_func(private=True, s_tir=True)
        def kv_paged_decode_append_attention(var_x: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                             var_table: T.handle, var_out: T.handle):
            kernel(var_x, var_k, var_v, var_pos, var_table, var_out, None, None, None, None)
        return kv_paged_decode_append_attention

    @T.prim_func(private=True, s_tir=True)
    def kv_paged_decode_rope_append_attention(var_x: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                              var_table: T.handle, var_cos: T.handle, var_sin: T.handle,
                                              var_out: T.handle):
        kernel(var_x, var_k, var_v, var_pos, var_table, var_out, None, None, var_cos, var_sin)
    # fmt: on
    return kv_paged_decode_rope_append_attention


def _head_loader(packed: Optional[tuple], d: int):
    """(X, b, hh, x) -> element x of head hh of row b: X [B, heads, 1, D] (q, or the new keys / values), or
    with ``packed`` the projection X [B, 1, W] all three were sliced from, head hh at [b, 0, hh * D + x] (the
    caller adds the slice's offset in heads)."""
    if packed is None:
        return lambda X, b, hh, x: X[b, hh, 0, x]
    return lambda X, b, hh, x: X[b, 0, hh * d + x]


def _rope_at(dtype: str, d: int, ld):
    """x * cos + rotate_half(x) * sin at element ``i`` of head ``hh`` of row ``b`` of X (read through ``ld``,
    _head_loader's), in ``dtype`` op by op as the unfused graph computes it (rotate_half(x)[i] = -x[i + D/2]
    for i < D/2, else x[i - D/2]; the partner index (i + D/2) mod D stays in bounds on both sides of the
    select)."""
    half = d // 2

    def at(X, COS, SIN, b, hh, i, low=None):
        """``low`` True / False: ``i`` is known to lie in the first / second half (no select: TVM's CUDA
        codegen cannot vectorise a select over halves)."""
        if low is None:
            partner = ld(X, b, hh, (i + half) % d)
            rot = tir.Select(i < half, tir.const(0, dtype) - partner, partner)
        elif low:
            rot = tir.const(0, dtype) - ld(X, b, hh, i + half)
        else:
            rot = ld(X, b, hh, i - half)
        return ld(X, b, hh, i) * COS[b, 0, 0, i] + rot * SIN[b, 0, 0, i]
    return at


# ------------------------------------------------------------------------------------------------
# kv.attention: the CPU decode kernel (T == 1)

# 2^f = e^(f ln2) for f in [-1/2, 1/2]: Taylor to degree 6, relative error below 2e-7 (f32 rounding level)
_EXP2_POLY = tuple(math.log(2) ** k / math.factorial(k) for k in range(7))


def _exp2_nonpositive(x):
    """2^x for x <= 0 as TIR arithmetic: libm's exp2 is a scalar call that took most of the CPU kernel's
    time (two per cache row and query head); this vectorises and costs a dozen flops. x is clamped to
    [-126, 0], where 2^round(x) is a normal float built from its exponent bits (2^-126 stands in for 0)."""
    x = tir.max(tir.min(x, tir.const(0.0, "float32")), tir.const(-126.0, "float32"))
    n = tir.round(x)
    f = x - n
    poly = tir.const(_EXP2_POLY[-1], "float32")
    for c in reversed(_EXP2_POLY[:-1]):
        poly = poly * f + tir.const(c, "float32")
    bits = tir.shift_left(tir.Cast("int32", n) + tir.const(127, "int32"), tir.const(23, "int32"))
    return poly * tir.reinterpret("float32", bits)


def decode_attention_cpu_func(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float,
                              lanes: int = 16, fused: Optional[bool] = None, packed: Optional[tuple] = None):
    """The CPU decode kernel: q [B, H, 1, D], caches [B, Hkv, M, D], pos [B] -> out [B, H, 1, D]
    (``_decode_attention_cpu`` with row b's position p at cache[b, :, p]). ``fused``: the kernel of
    fused.rope_append_attention (False: the appends; True: and RoPE), arguments as ``_decode_prim_func``."""
    return _decode_attention_cpu(h, hkv, m, d, dtype, pos_dtype, scale, lanes, paged=None, fused=fused, packed=packed)


def paged_decode_attention_cpu_func(h: int, hkv: int, bs: int, mb: int, d: int, dtype: str, pos_dtype: str,
                                    scale: float, lanes: int = 16, fused: Optional[bool] = None,
                                    packed: Optional[tuple] = None):
    """q [B, H, 1, D], pools [NB, Hkv, BS, D], pos [B], table [B, MB] -> out [B, H, 1, D]
    (``_decode_attention_cpu`` with position p at pool[table[b, p // BS], :, p % BS]); ``fused`` as in
    decode_attention_cpu_func (fused.rope_paged_append_attention)."""
    return _decode_attention_cpu(h, hkv, mb * bs, d, dtype, pos_dtype, scale, lanes, paged=(bs, mb), fused=fused,
                                 packed=packed)


def _decode_attention_cpu(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float,
                          lanes: int, paged: Optional[tuple], fused: Optional[bool] = None,
                          packed: Optional[tuple] = None):
    """The CPU decode kernel of both cache layouts (``paged``: None, or (BS, MB) with M = MB * BS; the arguments
    are ``_decode_prim_func``'s): one parallel task per (row, kv head); it streams cache positions 0..pos[b] once
    for all the kv head's query heads, keeping each one's running max / sum / output in f32 (online softmax).
    Paged, it walks the row's blocks 0..pos[b] // BS through the table and skips an unallocated one.

    The generic path computes all M logits whatever pos is (a 2048-row cache costs the same at position
    10 as at 2000); this reads only the rows a query sees, each once per kv head. The dot products run
    ``lanes`` wide (partial sums, then one horizontal add), the output updates over D vectorised.

    ``fused`` (``_decode_prim_func``): each task first writes its kv head's new key (rotated) and value rows
    at pos[b] (into the row's block of the pool, when allocated) and rotates its query heads as it loads
    them; the attention then reads the cache as it stands (the task wrote the rows it reads itself).
    """
    group = h // hkv
    L = next(v for v in (16, 8, 4, 2, 1) if v <= lanes and d % v == 0)
    qk_scale = float(scale) * math.log2(math.e)
    neg = _NEG_BIG
    bs = paged[0] if paged is not None else None
    rope = bool(fused)
    ld = _head_loader(packed, d)
    rot = _rope_at(dtype, d, ld)
    qo, ko, vo = (0, 0, 0) if packed is None else packed[1:]   # the slices' offsets in heads

    # fmt: off
    @T.inline
    def body(Q, K, V, pos, table, O, B, NB, KN, VN, COS, SIN):
        # `if paged ...` (and `if fused ...`, `if rope ...`) below are resolved while parsing: each kernel holds
        # only its own branches
        for bg in T.parallel(B * hkv):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                qf = T.sblock_alloc_buffer((group, d), "float32")
                acc = T.sblock_alloc_buffer((group, d), "float32")
                part = T.sblock_alloc_buffer((L,), "float32")
                mx = T.sblock_alloc_buffer((group,), "float32")
                den = T.sblock_alloc_buffer((group,), "float32")
                sc = T.sblock_alloc_buffer((2,), "float32")  # [score, new max]
                b: T.let[T.int64] = bg // hkv
                g: T.let[T.int64] = bg % hkv
                n: T.let[T.int64] = T.min(T.max(T.Cast("int64", pos[b]) + T.int64(1), T.int64(0)), T.int64(m))

                @T.inline
                def append(blk, j):  # the new key (rotated) and value rows at cache row [blk, kv head, j]
                    for x in T.serial(d):
                        if rope:
                            K[blk, g, j, x] = rot(KN, COS, SIN, b, g + ko, x)
                        else:
                            K[blk, g, j, x] = ld(KN, b, g + ko, x)
                        V[blk, g, j, x] = ld(VN, b, g + vo, x)

                if fused is not None:
                    p: T.let[T.int64] = T.Cast("int64", pos[b])
                    if p >= T.int64(0) and p < T.int64(m):
                        if paged is None:
                            append(b, p)
                        else:
                            pblk: T.let[T.int64] = T.Cast("int64", table[b, p // T.int64(bs)])
                            if pblk >= T.int64(0) and pblk < NB:
                                append(pblk, p % T.int64(bs))
                for r in T.serial(group):
                    mx[r] = T.float32(neg)
                    den[r] = T.float32(0)
                    for x in T.vectorized(d):
                        if rope:
                            qf[r, x] = T.Cast("float32", rot(Q, COS, SIN, b, g * group + r + qo, x)) * T.float32(qk_scale)
                        else:
                            qf[r, x] = T.Cast("float32", ld(Q, b, g * group + r + qo, x)) * T.float32(qk_scale)
                        acc[r, x] = T.float32(0)

                @T.inline
                def attend(blk, j):  # cache row [blk, kv head, j], for each of the kv head's query heads
                    for r in T.serial(group):
                        for l in T.vectorized(L):
                            part[l] = T.float32(0)
                        for xo in T.serial(d // L):
                            for l in T.vectorized(L):
                                part[l] = part[l] + qf[r, xo * L + l] * T.Cast("float32", K[blk, g, j, xo * L + l])
                        # horizontal sum as a tree of vector halvings (a serial chain of L adds was the
                        # kernel's critical path)
                        if L >= 16:
                            for l in T.vectorized(8):
                                part[l] = part[l] + part[l + 8]
                        if L >= 8:
                            for l in T.vectorized(4):
                                part[l] = part[l] + part[l + 4]
                        if L >= 4:
                            for l in T.vectorized(2):
                                part[l] = part[l] + part[l + 2]
                        if L >= 2:
                            part[0] = part[0] + part[1]
                        sc[0] = part[0]
                        sc[1] = T.max(mx[r], sc[0])
                        alpha: T.let[T.float32] = _exp2_nonpositive(mx[r] - sc[1])
                        p: T.let[T.float32] = _exp2_nonpositive(sc[0] - sc[1])
                        den[r] = den[r] * alpha + p
                        for x in T.vectorized(d):
                            acc[r, x] = acc[r, x] * alpha + p * T.Cast("float32", V[blk, g, j, x])
                        mx[r] = sc[1]

                if paged is None:
                    for j in T.serial(n):
                        attend(b, j)
                else:
                    for kb in T.serial((n + T.int64(bs - 1)) // T.int64(bs)):
                        blk: T.let[T.int64] = T.Cast("int64", table[b, kb])
                        if blk >= T.int64(0) and blk < NB:
                            for s in T.serial(T.min(T.int64(bs), n - kb * T.int64(bs))):
                                attend(blk, s)
                for r in T.serial(group):
                    for x in T.vectorized(d):
                        O[b, g * group + r, 0, x] = T.Cast(dtype, acc[r, x] / T.max(den[r], T.float32(1e-30)))
    # fmt: on
    return _decode_prim_func(h, hkv, m, d, dtype, pos_dtype, paged, "int64", body, fused, packed)


# ------------------------------------------------------------------------------------------------
# kv.paged_append

def _paged_append_func(hkv: int, bs: int, d: int, mb: int, dtype: str, pos_dtype: str):
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def kv_paged_append(var_pool: T.handle, var_new: T.handle, var_pos: T.handle, var_table: T.handle):
        T.func_attr({"tirx.noalias": True})
        NB = T.int64()
        B = T.int64()
        L = T.int64()
        pool = T.match_buffer(var_pool, (NB, hkv, bs, d), dtype)
        new = T.match_buffer(var_new, (B, hkv, L, d), dtype)
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        table = T.match_buffer(var_table, (B, mb), "int32")
        for b, h, t, j in T.grid(B, hkv, L, d):
            with T.sblock("kv_paged_append"):
                vb, vh, vt, vj = T.axis.remap("SSSS", [b, h, t, j])
                T.reads(pos[vb], table[vb, 0:mb], new[vb, vh, vt, vj])
                # one element or none, as in _append_func
                T.writes(pool[table[vb, (T.Cast("int64", pos[vb]) + vt) // T.int64(bs)], vh,
                              (T.Cast("int64", pos[vb]) + vt) % T.int64(bs), vj])
                p: T.int64 = T.Cast("int64", pos[vb]) + vt
                if p >= T.int64(0) and p < T.int64(mb * bs):
                    blk: T.int64 = T.Cast("int64", table[vb, p // T.int64(bs)])
                    if blk >= T.int64(0) and blk < NB:
                        pool[blk, vh, p % T.int64(bs), vj] = new[vb, vh, vt, vj]
    # fmt: on
    return kv_paged_append


@register_lowering("kv.paged_append")
def _kv_paged_append(ctx, node, args):
    _refuse_pool_read_later(ctx, node, 0)
    return _paged_append(ctx, args, node.inputs[0].type, node.inputs[2].type, node.inputs[3].type)


def _refuse_pool_read_later(ctx, node, index: int) -> None:
    if _old_cache_read_later(ctx, node, index):
        raise NotImplementedError(
            f"its pool %{node.inputs[index].name} is read again after the append; the TVM backend updates pools in "
            f"place only (read the appended pool instead)")


def _paged_append(ctx, args, pt, pos_t, tt):
    _, hkv, bs, d = pt.shape
    func = _paged_append_func(hkv, bs, d, tt.shape[1], tvm_dtype(pt.dtype), tvm_dtype(pos_t.dtype))
    gv = ctx.bb.add_func(func, "kv_paged_append")
    out_ty = relax.TensorType(ctx.shape(pt), tvm_dtype(pt.dtype))
    return ctx.emit(relax.call_tir_inplace(gv, list(args), [0], out_ty), "pool_appended")


# ------------------------------------------------------------------------------------------------
# kv.paged_attention

@register_lowering("kv.paged_attention")
def _kv_paged_attention(ctx, node, args):
    q, kp, vp, pos, table = args
    qt, pt, tt = node.inputs[0].type, node.inputs[1].type, node.inputs[4].type
    _, h, t, d = qt.shape
    _, hkv, bs, _ = pt.shape
    mb = tt.shape[1]
    if ctx.spec is not None and t == 1 and qt.dtype in (DType.f16, DType.f32):
        kernel = ctx.spec.kv_paged_decode_attention(h, hkv, bs, mb, d, tvm_dtype(qt.dtype),
                                                    tvm_dtype(node.inputs[3].type.dtype), node.attrs["scale"])
        if kernel is not None:
            return _decode_call(ctx, node, args, kernel)
    if (ctx.spec is not None and t != 1 and qt.dtype in (DType.f16, DType.f32)
            and all(isinstance(x, int) for x in (h, hkv, bs, mb, d)) and _fits_int32(ctx, qt)):
        # (the pools' block count is sized at run time: PagedRunner refuses pools of 2**31 elements)
        kernel = ctx.spec.kv_paged_prefill_attention(h, hkv, bs, mb, d, tvm_dtype(qt.dtype),
                                                     tvm_dtype(node.inputs[3].type.dtype), node.attrs["scale"])
        if kernel is not None:
            return _decode_call(ctx, node, args, kernel)
    kc = ctx.emit_te(_gather, kp, table, pos, q, name="kv_paged_gather")
    vc = ctx.emit_te(_gather, vp, table, pos, q, name="kv_paged_gather")
    return _generic(ctx, node, [q, kc, vc, pos], m=mb * bs, table=(table, bs))


def _gather(pool, table, pos, q):
    """[B, Hkv, MB*BS, D]: each row's blocks end to end, positions 0..pos[b]+T-1 only; the others (past the
    last query, or in an unallocated block) are zeros, not read -- so stale data in a block's unused tail
    (even inf/nan) cannot reach the masked p @ v. T is read from q's shape (q itself is not read)."""
    nb, hkv, bs, d = pool.shape
    b_, mb = table.shape
    t_len = q.shape[2]

    def at(b, h, j, x):
        blk = table[b, j // bs].astype("int64")
        ok = tir.all(blk >= 0, blk < nb, j < pos[b].astype("int64") + t_len)
        return tir.if_then_else(ok, pool[tir.max(blk, tir.const(0, "int64")), h, j % bs, x],
                                tir.const(0, pool.dtype))
    return te.compute((b_, hkv, mb * bs, d), at, name="kv_paged_gather")


# ------------------------------------------------------------------------------------------------
# kv.ragged_attention

@register_lowering("kv.ragged_attention")
def _kv_ragged_attention(ctx, node, args):
    """kv.paged_attention over the token-major view: q [1, H, N, D] permuted to [N, H, 1, D] (one query a
    row, so the target's decode kernel runs it), the output permuted back. Correct where a batch of decode
    rows is: the appends the tokens read were made by the separate kv.paged_append calls before it (this op
    is never fused with them)."""
    q, kp, vp, pos, table = args
    qt = node.inputs[0].type
    _, h, n, d = qt.shape
    tok = TensorType((n, h, 1, d), qt.dtype)
    qtok = ctx.emit(R.permute_dims(q, [2, 1, 0, 3]), "q_tokens")
    o, _ = emit_op(ctx, "kv.paged_attention", {"scale": node.attrs["scale"]},
                   [tok, *(v.type for v in node.inputs[1:])], [qtok, kp, vp, pos, table])
    return ctx.emit(R.permute_dims(o, [2, 1, 0, 3]), "attn")


# ------------------------------------------------------------------------------------------------
# fused.rope_append_attention / fused.rope_paged_append_attention

@register_lowering("fused.rope_append_attention")
def _rope_append_attention(ctx, node, args):
    return _fused_attention(ctx, node, args, paged=False)


@register_lowering("fused.rope_paged_append_attention")
def _rope_paged_append_attention(ctx, node, args):
    return _fused_attention(ctx, node, args, paged=True)


def _fused_attention(ctx, node, args, paged: bool):
    """One kernel (the target's ``kv_decode_append_attention`` / its paged twin) for one query per row where
    the caches are updated in place; otherwise the ops the node stands for, through their own lowerings."""
    if paged:
        _refuse_pool_read_later(ctx, node, 3)
        _refuse_pool_read_later(ctx, node, 4)
    packed = _packed_projection(ctx, node, args)
    kernel = _fused_kernel(ctx, node, paged, packed[1] if packed else None)
    if kernel is None and packed is not None:
        packed, kernel = None, _fused_kernel(ctx, node, paged, None)
    if kernel is None:
        return _fused_unfused(ctx, node, args, paged)
    name, func = kernel
    gv = ctx.bb.add_func(func, name)
    qt, kt = node.inputs[0].type, node.inputs[3].type
    tys = [relax.TensorType(ctx.shape(t), tvm_dtype(t.dtype)) for t in (qt, kt, kt)]
    if packed is not None:   # q, k, v -> the projection they are slices of
        call_args, where = [packed[0], *args[3:]], [-1, 1, 2]
    else:
        call_args, where = list(args), [-1, 3, 4]
    call = ctx.emit(relax.call_tir_inplace(gv, call_args, where, tys), "attn_append")
    return [ctx.emit(relax.TupleGetItem(call, i), n) for i, n in enumerate(("attn", "kv_appended", "kv_appended"))]


def _packed_projection(ctx, node, args):
    """(X, (W, qo, ko, vo)) when the node's q, new keys and new values are head views of one projection X
    [B, 1, W] -- each ``permute_dims(reshape(strided_slice(X, last axis, a:b), [B, 1, heads, D]), [0, 2, 1,
    3)`` with ``a`` a multiple of D (what split-heads leaves of the merged QKV GEMM's output, as lowered) --
    so the kernel reads them from X and the three slice copies are never made; else None. T = 1 only (the
    permute is then a reshape in memory)."""
    d = node.inputs[0].type.shape[3]
    found = []
    for arg, heads in zip(args[:3], (node.inputs[0].type.shape[1], node.inputs[1].type.shape[1],
                                     node.inputs[2].type.shape[1])):
        src = _head_view_source(ctx.bb, arg, heads, d)
        if src is None or (found and not src[0].same_as(found[0][0])):
            return None
        found.append(src)
    x, width = found[0][0], found[0][1]
    return x, (width, *(a // d for _, _, a in found))


def _head_view_source(bb, var, heads: int, d: int):
    """(X, W, a) when ``var`` is bound to permute_dims(reshape(strided_slice(X [B, 1, W], axis -1, a:a+heads*D,
    step 1), [B, 1, heads, D]), [0, 2, 1, 3]) with a % D == 0, else None."""
    def call_of(v, op):
        if not isinstance(v, relax.Var):
            return None
        try:
            e = bb.lookup_binding(v)
        except Exception:  # noqa: BLE001 -- not bound in this builder
            return None
        return e if isinstance(e, relax.Call) and getattr(e.op, "name", None) == op else None

    def ints(xs):
        """[int] of a relax Tuple of PrimValues, a ShapeExpr or a list of IntImms; None if any is not constant."""
        items = getattr(xs, "fields", None)
        if items is None:
            items = getattr(xs, "values", xs)
        try:
            return [int(getattr(x, "value", x)) for x in items]
        except (TypeError, ValueError):
            return None

    perm = call_of(var, "relax.permute_dims")
    if perm is None or perm.attrs.axes is None or ints(perm.attrs.axes) != [0, 2, 1, 3]:
        return None
    rs = call_of(perm.args[0], "relax.reshape")
    if rs is None:
        return None
    sl = call_of(rs.args[0], "relax.strided_slice")
    if sl is None or len(sl.args) < 4:
        return None
    x = sl.args[0]
    ty = x.ty if hasattr(x, "ty") else getattr(x, "struct_info", None)   # (this TVM: ty; older: struct_info)
    shape = getattr(getattr(ty, "shape", None), "values", None)
    if shape is None or len(shape) != 3:
        return None
    w = ints([shape[2]])
    t = ints([shape[1]])
    axes, begin, end = (ints(a) for a in sl.args[1:4])
    strides = ints(sl.args[4]) if len(sl.args) > 4 else [1]
    if None in (w, t, axes, begin, end, strides) or t != [1] or len(axes) != 1 or axes[0] not in (2, -1):
        return None
    a, b = begin[0], end[0]
    if strides != [1] or a % d or b - a != heads * d:
        return None
    return x, w[0], a


def _fused_kernel(ctx, node, paged: bool, packed):
    qt, ct, pt = node.inputs[0].type, node.inputs[3].type, node.inputs[5].type
    rope = len(node.inputs) > (7 if paged else 6)
    if ctx.spec is None or qt.shape[2] != 1 or qt.dtype not in (DType.f16, DType.f32):
        return None
    _, h, _, d = qt.shape
    if paged:
        _, hkv, bs, _ = ct.shape
        return ctx.spec.kv_paged_decode_append_attention(h, hkv, bs, node.inputs[6].type.shape[1], d,
                                                         tvm_dtype(qt.dtype), tvm_dtype(pt.dtype),
                                                         node.attrs["scale"], rope, packed)
    if _old_cache_read_later(ctx, node, 3) or _old_cache_read_later(ctx, node, 4):
        return None   # the kernel appends in place: the ops' lowerings copy instead
    _, hkv, m, _ = ct.shape
    return ctx.spec.kv_decode_append_attention(h, hkv, m, d, tvm_dtype(qt.dtype), tvm_dtype(pt.dtype),
                                               node.attrs["scale"], rope, packed)


def _fused_unfused(ctx, node, args, paged: bool):
    """The ops fused.rope_(paged_)append_attention stands for, each through its own lowering: RoPE as the
    unfused graph's slices, neg, concat, muls and add, the appends, then the attention."""
    ts = [v.type for v in node.inputs]
    q, k, v, kc, vc, pos = args[:6]
    extra = [args[6]] if paged else []
    if len(args) > 6 + len(extra):
        cs, cst = args[6 + len(extra):], ts[6 + len(extra):]
        q = _rope_ops(ctx, q, ts[0], cs, cst)
        k = _rope_ops(ctx, k, ts[1], cs, cst)
    if paged:
        kc2 = _paged_append(ctx, [kc, k, pos, *extra], ts[3], ts[5], ts[6])
        vc2 = _paged_append(ctx, [vc, v, pos, *extra], ts[4], ts[5], ts[6])
        o, _ = emit_op(ctx, "kv.paged_attention", {"scale": node.attrs["scale"]}, [ts[0], ts[3], ts[4], ts[5], ts[6]],
                        [q, kc2, vc2, pos, *extra])
    else:
        kc2 = _append(ctx, [kc, k, pos], ts[3], ts[5], _old_cache_read_later(ctx, node, 3))
        vc2 = _append(ctx, [vc, v, pos], ts[4], ts[5], _old_cache_read_later(ctx, node, 4))
        o, _ = emit_op(ctx, "kv.attention", {"scale": node.attrs["scale"]}, [ts[0], ts[3], ts[4], ts[5]],
                        [q, kc2, vc2, pos])
    return [o, kc2, vc2]


def _rope_ops(ctx, x, xt, cs, cst):
    d = xt.shape[3]
    hi, ht = emit_op(ctx, "slice", {"axis": 3, "start": d // 2, "end": d}, [xt], [x])
    lo, lt = emit_op(ctx, "slice", {"axis": 3, "start": 0, "end": d // 2}, [xt], [x])
    neg, nt = emit_op(ctx, "neg", {}, [ht], [hi])
    rot, rt = emit_op(ctx, "concat", {"axis": 3}, [nt, lt], [neg, lo])
    a, at = emit_op(ctx, "mul", {}, [xt, cst[0]], [x, cs[0]])
    b, bt = emit_op(ctx, "mul", {}, [rt, cst[1]], [rot, cs[1]])
    return emit_op(ctx, "add", {}, [at, bt], [a, b])[0]
