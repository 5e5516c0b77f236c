"""Flash-style prefill attention for CUDA: kv.attention with many queries per row (a prompt, T > 1) on a
contiguous cache, in one kernel -- no [B, H, T, M] logits in memory, and cache rows past a block's last query
position never read.

kv.attention's generic path runs three kernels on the GPU (masked q k^T into an f32 [B, Hkv, rep*T, M]
buffer, softmax, p v), computes logits for all M cache rows whatever the position is, and writes and reads the
logits through HBM: about a third of a 1024-token Llama-1B prefill (issue 17). This kernel keeps the scores in
registers with an online softmax (f32, base-2 exponent, as the decode kernel in lowering_kv.py):

* Query rows are grouped per kv head as the generic path groups them, but interleaved: grouped row r of kv
  head g is query position t = r // rep of query head g * rep + r % rep, so a block's ``BQ`` rows are
  ``BQ / rep`` consecutive positions of all the kv head's query heads -- every K/V tile a block stages in
  shared memory serves all of them (GQA), and the block's causal range is tight.
* Grid (B, Hkv, ceil(T * rep / BQ)); ``NJ`` lanes per query row (threadIdx.x) x ``BQ`` rows (threadIdx.y).
  A thread holds its row's whole q (pre-scaled by scale * log2 e) and output accumulator in registers and
  scores the tile's cache rows j = NJ * i + lane: each lane keeps its own running max / sum / output over
  its rows, and the NJ partial states of a row are merged through shared memory at the end (the decode
  kernel's merge). Lanes of a warp that share a lane index read the same shared-memory address (a
  broadcast); the NJ lanes of a row read NJ consecutive rows of a tile padded to D + 4 floats, so the
  16-byte loads of one instruction fall in distinct banks.
* Tiles of ``BK`` cache rows (K and V, converted to f32 once while staged) cover positions
  0 .. pos[b] + t_hi of the block's last query position t_hi only (the tile's rows past it are staged as
  zeros, not read: stale inf/nan in a reused slot cannot reach p v); a position j scores only when
  j <= pos[b] + t (causal: the query at pos[b] + t sees itself) and j < M, else it weighs 0 exactly.
* Rows t >= T of the last block compute on clamped (never out-of-bounds) loads and store nothing.

Numerics are checked on the CPU by llmasos.backends.tvm.simt (tests/backends/test_cuda_attention.py) and on
a GPU against torch's scaled_dot_product_attention by bench/prefill_attention_check.py. Used when the CUDA
target's option ``flash_prefill`` is "on" (Target.kv_prefill_attention).
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

NJ = 4             # lanes per query row, each scoring its own cache rows of a tile (j % NJ)
PAD = 4            # floats of padding per staged cache row (16-byte loads of the NJ lanes in distinct banks)
THREADS_MAX = 128
NEG_BIG = -1.0e30  # the online softmax's minus infinity (finite: (-big) - (-big) is 0, never nan)


def prefill_attention_plan(d: int, dtype: str) -> dict:
    """The kernel's tiling for head dim ``d``: BQ grouped query rows a block, BK cache rows a tile, VEC
    elements a global load."""
    bq = THREADS_MAX // NJ if d <= 64 else THREADS_MAX // NJ // 2
    bk = max(NJ, min(64, 4096 // d))
    vec = 4
    return {"bq": bq, "bk": bk, "vec": vec, "threads": bq * NJ, "stride": d + PAD}


def prefill_attention_supported(h: int, hkv: int, m: int, d: int, dtype: str) -> bool:
    """Whether the kernel covers this head layout: query heads a whole multiple of kv heads, f16 or f32,
    head dim a multiple of NJ * VEC up to 64 (a thread keeps 2 D floats in registers; D = 128 would spill),
    and the staging arithmetic exact."""
    if dtype not in ("float16", "float32") or hkv <= 0 or h % hkv or d <= 0 or d > 64 or m <= 0:
        return False
    p = prefill_attention_plan(d, dtype)
    return (d % (NJ * p["vec"]) == 0 and p["bk"] % NJ == 0 and (p["bk"] * d) % (p["threads"] * p["vec"]) == 0
            and p["bq"] * NJ * (d + 1) <= 2 * p["bk"] * p["stride"])


def prefill_attention_func(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float):
    """kv_prefill_attention(q [B, H, T, D], k [B, Hkv, M, D], v [B, Hkv, M, D], pos [B], out [B, H, T, D]):
    out[b, hq, t] = softmax over j <= pos[b] + t (j < M) of scale * q . k[b, hq // rep, j], times v."""
    return _prefill_attention(h, hkv, m, d, dtype, pos_dtype, scale, paged=None)


def paged_prefill_attention_func(h: int, hkv: int, bs: int, mb: int, d: int, dtype: str, pos_dtype: str,
                                 scale: float):
    """kv_paged_prefill_attention(q [B, H, T, D], k/v pools [NB, Hkv, BS, D], pos [B], table [B, MB] i32,
    out [B, H, T, D]): the same attention with position j of row b at pool[table[b, j // BS], :, j % BS];
    a position in an unallocated block (table entry outside [0, NB)) is not read and weighs 0."""
    return _prefill_attention(h, hkv, mb * bs, d, dtype, pos_dtype, scale, paged=(bs, mb))


def _prefill_attention(h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, scale: float, paged):
    """Both cache layouts' kernel (``paged``: None, or (BS, MB) with M = MB * BS); they differ only where a
    staged cache row is addressed and in the paged kernel's per-row "allocated" flag."""
    if not prefill_attention_supported(h, hkv, m, d, dtype):
        raise ValueError(f"prefill attention: unsupported layout h={h} hkv={hkv} m={m} d={d} {dtype} "
                         f"(see prefill_attention_supported)")
    p = prefill_attention_plan(d, dtype)
    bq, bk, vec, threads, stride = p["bq"], p["bk"], p["vec"], p["threads"], p["stride"]
    rep = h // hkv
    qk = float(scale) * math.log2(math.e)
    jn = bk // NJ                       # cache rows a lane scores per tile
    loads = bk * d // (threads * vec)   # vector loads a thread stages per tile (of K, and of V)
    v_off = bk * stride                 # V's tile after K's in the one shared buffer
    dl = d // NJ                        # output columns a lane writes
    neg = NEG_BIG
    bs = paged[0] if paged is not None else None
    mb = paged[1] if paged is not None else None

    # fmt: off
    @T.inline
    def body(Q, K, V, pos, table, O, B, L, NB):
        # `if paged ...` below is resolved while parsing: each layout's kernel holds only its own branch
        for bx in T.thread_binding(B, thread="blockIdx.x"):
            for by in T.thread_binding(hkv, thread="blockIdx.y"):
                for bz in T.thread_binding(T.ceildiv(L * rep, bq), thread="blockIdx.z"):
                    for ty in T.thread_binding(bq, thread="threadIdx.y"):
                        for tx in T.thread_binding(NJ, thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                KV_s = T.sblock_alloc_buffer((2 * bk * stride,), "float32", scope="shared")
                                ML_s = T.sblock_alloc_buffer((bq * NJ * 2,), "float32", scope="shared")
                                if paged is not None:  # 1: the staged row's block is allocated
                                    ok_s = T.sblock_alloc_buffer((bk,), "int32", scope="shared")
                                q_l = T.sblock_alloc_buffer((d,), "float32", scope="local")
                                o_l = T.sblock_alloc_buffer((d,), "float32", scope="local")
                                s_l = T.sblock_alloc_buffer((jn,), "float32", scope="local")
                                kv4 = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                acc4 = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                st = T.sblock_alloc_buffer((4,), "float32", scope="local")  # m, l, m_prev, tmp

                                # blocks launch in blockIdx order: the last query rows (the most cache
                                # tiles) first, so the causal tail of short blocks fills the GPU at the end
                                qb: T.let[T.int32] = T.ceildiv(L * rep, bq) - 1 - bz
                                r: T.let[T.int32] = qb * bq + ty
                                t: T.let[T.int32] = r // rep
                                tc: T.let[T.int32] = T.min(t, L - 1)   # clamped: loads of rows t >= T stay in bounds
                                hq: T.let[T.int32] = by * rep + r % rep
                                p0: T.let[T.int32] = T.Cast("int32", pos[bx])
                                qpos: T.let[T.int32] = p0 + t
                                t_hi: T.let[T.int32] = T.min(L - 1, (qb * bq + bq - 1) // rep)
                                kv_end: T.let[T.int32] = T.min(T.max(p0 + t_hi + 1, 0), m)

                                for e in T.unroll(d):
                                    q_l[e] = T.Cast("float32", Q[bx, hq, tc, e]) * T.float32(qk)
                                    o_l[e] = T.float32(0)
                                st[0] = T.float32(neg)
                                st[1] = T.float32(0)

                                for it in T.serial(T.ceildiv(kv_end, bk)):
                                    for c in T.serial(loads):
                                        flat: T.let[T.int32] = ((c * bq + ty) * NJ + tx) * vec
                                        row: T.let[T.int32] = flat // d
                                        col: T.let[T.int32] = flat % d
                                        grow: T.let[T.int32] = T.min(it * bk + row, m - 1)
                                        # (no shared local staging buffer: TVM's C codegen reuses a local's
                                        # first load after a later store to it in the same scope)
                                        # rows at or past kv_end are zeros, never read: a stale inf/nan left in a
                                        # reused cache slot or block tail must not reach p v (0 * nan is nan)
                                        if paged is None:
                                            if it * bk + row < kv_end:
                                                for u in T.vectorized(vec):
                                                    KV_s[row * stride + col + u] = T.Cast("float32", K[bx, by, grow, col + u])
                                                for u in T.vectorized(vec):
                                                    KV_s[v_off + row * stride + col + u] = T.Cast("float32", V[bx, by, grow, col + u])
                                            else:
                                                for u in T.vectorized(vec):
                                                    KV_s[row * stride + col + u] = T.float32(0)
                                                for u in T.vectorized(vec):
                                                    KV_s[v_off + row * stride + col + u] = T.float32(0)
                                        else:
                                            blk: T.let[T.int32] = T.if_then_else(it * bk + row < kv_end, table[bx, grow // bs], -1)
                                            if blk >= 0 and blk < NB:
                                                for u in T.vectorized(vec):
                                                    KV_s[row * stride + col + u] = T.Cast("float32", K[blk, by, grow % bs, col + u])
                                                for u in T.vectorized(vec):
                                                    KV_s[v_off + row * stride + col + u] = T.Cast("float32", V[blk, by, grow % bs, col + u])
                                                if col == 0:
                                                    ok_s[row] = 1
                                            else:
                                                for u in T.vectorized(vec):
                                                    KV_s[row * stride + col + u] = T.float32(0)
                                                for u in T.vectorized(vec):
                                                    KV_s[v_off + row * stride + col + u] = T.float32(0)
                                                if col == 0:
                                                    ok_s[row] = 0
                                    T.tvm_storage_sync("shared")
                                    st[2] = st[0]
                                    for i in T.unroll(jn):
                                        j: T.let[T.int32] = i * NJ + tx
                                        for u in T.vectorized(4):
                                            acc4[u] = T.float32(0)
                                        for e0 in T.unroll(d // 4):
                                            for u in T.vectorized(4):
                                                kv4[u] = KV_s[j * stride + e0 * 4 + u]
                                            for u in T.vectorized(4):
                                                acc4[u] = acc4[u] + q_l[e0 * 4 + u] * kv4[u]
                                        if paged is None:
                                            s_l[i] = T.if_then_else(it * bk + j <= qpos and it * bk + j < kv_end,
                                                                    (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]), T.float32(neg))
                                        else:
                                            s_l[i] = T.if_then_else(it * bk + j <= qpos and it * bk + j < kv_end and ok_s[j] == 1,
                                                                    (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]), T.float32(neg))
                                        st[0] = T.max(st[0], s_l[i])
                                    st[3] = T.exp2(st[2] - st[0])
                                    st[1] = st[1] * st[3]
                                    for e in T.unroll(d):
                                        o_l[e] = o_l[e] * st[3]
                                    for i in T.unroll(jn):
                                        j2: T.let[T.int32] = i * NJ + tx
                                        # a masked row weighs exactly 0, also while this lane's max is still -big
                                        if paged is None:
                                            s_l[i] = T.if_then_else(it * bk + j2 <= qpos and it * bk + j2 < kv_end,
                                                                    T.exp2(s_l[i] - st[0]), T.float32(0))
                                        else:
                                            s_l[i] = T.if_then_else(it * bk + j2 <= qpos and it * bk + j2 < kv_end and ok_s[j2] == 1,
                                                                    T.exp2(s_l[i] - st[0]), T.float32(0))
                                        st[1] = st[1] + s_l[i]
                                        for e0 in T.unroll(d // 4):
                                            for u in T.vectorized(4):
                                                kv4[u] = KV_s[v_off + j2 * stride + e0 * 4 + u]
                                            for u in T.vectorized(4):
                                                o_l[e0 * 4 + u] = o_l[e0 * 4 + u] + s_l[i] * kv4[u]
                                    # the next tile's staging overwrites rows other lanes may still be reading
                                    T.tvm_storage_sync("shared")

                                # merge the NJ lanes' states of each row (the tiles' memory holds the outputs)
                                ML_s[(ty * NJ + tx) * 2] = st[0]
                                ML_s[(ty * NJ + tx) * 2 + 1] = st[1]
                                T.tvm_storage_sync("shared")
                                st[2] = T.float32(neg)
                                for ln in T.unroll(NJ):
                                    st[2] = T.max(st[2], ML_s[(ty * NJ + ln) * 2])
                                st[3] = T.float32(0)
                                for ln in T.unroll(NJ):
                                    st[3] = st[3] + ML_s[(ty * NJ + ln) * 2 + 1] * T.exp2(ML_s[(ty * NJ + ln) * 2] - st[2])
                                st[0] = T.exp2(st[0] - st[2])
                                for e in T.unroll(d):
                                    KV_s[(ty * NJ + tx) * (d + 1) + e] = o_l[e] * st[0]
                                T.tvm_storage_sync("shared")
                                if t < L:
                                    for e in T.serial(dl):
                                        st[1] = T.float32(0)
                                        for ln in T.unroll(NJ):
                                            st[1] = st[1] + KV_s[(ty * NJ + ln) * (d + 1) + tx * dl + e]
                                        O[bx, hq, t, tx * dl + e] = T.Cast(dtype, st[1] / T.max(st[3], T.float32(1e-30)))

    # fmt: on
    return _attention_prim_func(body, h, hkv, m, d, dtype, pos_dtype, paged)


def _attention_prim_func(body, h: int, hkv: int, m: int, d: int, dtype: str, pos_dtype: str, paged):
    """The PrimFunc around a prefill attention kernel's body (a T.inline taking Q, K, V, pos, table, O, B, L,
    NB): kv_prefill_attention(q, k, v, pos, out) over a contiguous cache, or (``paged`` = (BS, MB))
    kv_paged_prefill_attention(q, k_pool, v_pool, pos, table, out)."""
    # fmt: off
    if paged is None:
        @T.prim_func(private=True, s_tir=True)
        def kv_prefill_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                 var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            B = T.int32()
            L = T.int32()
            Q = T.match_buffer(var_q, (B, h, L, d), dtype)
            K = T.match_buffer(var_k, (B, hkv, m, d), dtype)
            V = T.match_buffer(var_v, (B, hkv, m, d), dtype)
            pos = T.match_buffer(var_pos, (B,), pos_dtype)
            O = T.match_buffer(var_out, (B, h, L, d), dtype)
            body(Q, K, V, pos, None, O, B, L, None)
        return kv_prefill_attention

    bs, mb = paged

    @T.prim_func(private=True, s_tir=True)
    def kv_paged_prefill_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                   var_table: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int32()
        L = T.int32()
        NB = T.int32()
        Q = T.match_buffer(var_q, (B, h, L, d), dtype)
        K = T.match_buffer(var_k, (NB, hkv, bs, d), dtype)
        V = T.match_buffer(var_v, (NB, hkv, bs, d), dtype)
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        table = T.match_buffer(var_table, (B, mb), "int32")
        O = T.match_buffer(var_out, (B, h, L, d), dtype)
        body(Q, K, V, pos, table, O, B, L, NB)
    # fmt: on
    return kv_paged_prefill_attention


# ------------------------------------------------------------------------------------------------
# Tensor-core prefill attention (f16): the same attention, q k^T and p v on mma.sync m16n8k16
#
# FlashAttention-2's forward on the grouped rows above: a block of 4 warps takes MQ = 64 grouped query rows
# (16 a warp: one MMA row tile) of one kv head and walks the cache in tiles of MK = 64 rows. A warp keeps
# its rows' q as MMA A fragments (loaded from global once), computes S = q k^T for the tile (m16n8k16, f32
# accumulate: MK / 8 column tiles by D / 16 k-steps), masks and scales S in f32 (base-2 exponent), takes the
# row max across the quad of lanes holding a row (two xor shuffles), rescales its running sum and output,
# and turns exp2(S - max) into the A fragments of p v directly (the accumulator layout of two n8 tiles is
# the A layout of one k16 step: no shared memory between the MMAs). K and V tiles are staged row-major by
# 16-byte loads (a warp reads whole cache rows), each row padded to D + 8 halves, so the 8 row addresses of
# one ldmatrix phase fall in 8 distinct 16-byte bank groups; q k^T's B fragments come from ldmatrix.x4
# (two column tiles a call), p v's from ldmatrix.x4.trans (V is K x N row-major; the transposed load gives
# the "col" fragment). Rows past kv_end (and, paged, in an unallocated block) are staged as zeros and
# masked. The running sum stays per lane and is summed over the quad once at the end.

TC_MK = 64         # cache rows a tile
TC_WARPS = (4, 8)  # warps a block (16 grouped query rows each)
TC_STAGES = (1, 2)  # K/V tiles in shared memory: 1 (loaded, then used) or 2 (cp.async: the next while this one runs)


def prefill_attention_mma_supported(h: int, hkv: int, m: int, d: int, dtype: str, warps: int = 4,
                                    stages: int = 1) -> bool:
    """Whether the tensor-core kernel covers the layout: f16, query heads a multiple of kv heads, head dim a
    multiple of 16 up to 128 (a lane holds D / 2 output floats in registers), the block's threads staging a
    K tile in whole 16-byte copies (with 8 warps: D a multiple of 32), and the K/V stages within the 48 KiB
    of static shared memory a block may have (two stages: D up to 64)."""
    smem = stages * 2 * TC_MK * (d + 8) * 2 + stages * TC_MK * 4
    return (dtype == "float16" and hkv > 0 and h % hkv == 0 and 0 < d <= 128 and d % 16 == 0 and m > 0
            and warps in TC_WARPS and stages in TC_STAGES and (TC_MK * d // 8) % (32 * warps) == 0
            and smem <= 48 * 1024)


def prefill_attention_mma_func(h: int, hkv: int, m: int, d: int, pos_dtype: str, scale: float, warps: int = 4,
                               stages: int = 1):
    """The tensor-core twin of prefill_attention_func (f16 only; same signature and meaning); ``warps`` 4 or 8
    a block (64 or 128 grouped query rows), ``stages`` 1 or 2 (see TC_STAGES)."""
    return _prefill_attention_mma(h, hkv, m, d, pos_dtype, scale, None, warps, stages)


def paged_prefill_attention_mma_func(h: int, hkv: int, bs: int, mb: int, d: int, pos_dtype: str, scale: float,
                                     warps: int = 4, stages: int = 1):
    """The tensor-core twin of paged_prefill_attention_func (f16 only; same signature and meaning)."""
    return _prefill_attention_mma(h, hkv, mb * bs, d, pos_dtype, scale, (bs, mb), warps, stages)


def _prefill_attention_mma(h: int, hkv: int, m: int, d: int, pos_dtype: str, scale: float, paged, warps: int,
                           stages: int):
    if not prefill_attention_mma_supported(h, hkv, m, d, "float16", warps, stages):
        raise ValueError(f"tensor-core prefill attention: unsupported layout h={h} hkv={hkv} m={m} d={d} "
                         f"warps={warps} stages={stages} (see prefill_attention_mma_supported, TC_STAGES)")
    rep = h // hkv
    qk = float(scale) * math.log2(math.e)
    mk = TC_MK
    mq = 16 * warps
    threads = 32 * warps
    ks = d + 8                          # K and V tile row stride (halves)
    kd = d // 16                        # k-steps of q k^T
    nk = mk // 8                        # n8 column tiles of S
    nd = d // 8                         # n8 column tiles of the output
    kvec = mk * d // 8 // threads       # 8-half vectors of K (and of V) a thread stages per tile
    tile = mk * ks                      # halves of one stage of K (and of V)
    neg = NEG_BIG
    bs = paged[0] if paged is not None else None
    mb = paged[1] if paged is not None else None

    # fmt: off
    @T.inline
    def stage(K, V, table, K_s, V_s, ok_s, it, sg, tid, bx, by, kv_end, NB):
        # K and V of tile `it` into stage `sg` (row-major, 8 halves a copy: a warp reads whole cache rows). A
        # row past kv_end (or in an unallocated block) is staged as zeros: by plain stores (stages 1), or by
        # the cp.async copy's src-size 0, its address clamped in bounds (stages 2: the copy is in flight
        # until a wait_group covers it)
        for c in T.unroll(kvec):
            krow: T.let[T.int32] = (c * threads + tid) // (d // 8)
            kcol: T.let[T.int32] = (c * threads + tid) % (d // 8) * 8
            kg: T.let[T.int32] = T.min(it * mk + krow, m - 1)
            if paged is None:
                sb: T.let[T.int32] = bx          # the source row: batch row and position
                sr: T.let[T.int32] = kg
                ok: T.let[T.bool] = it * mk + krow < kv_end
            else:
                kblk: T.let[T.int32] = T.if_then_else(it * mk + krow < kv_end, table[bx, kg // bs], -1)
                sb: T.let[T.int32] = T.min(T.max(kblk, 0), NB - 1)     # block, slot
                sr: T.let[T.int32] = kg % bs
                ok: T.let[T.bool] = kblk >= 0 and kblk < NB
            if stages == 2:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(K_s[sg * tile + krow * ks + kcol]), T.address_of(K[sb, by, sr, kcol]),
                    16, T.Cast("uint32", T.if_then_else(ok, 16, 0))))
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(V_s[sg * tile + krow * ks + kcol]), T.address_of(V[sb, by, sr, kcol]),
                    16, T.Cast("uint32", T.if_then_else(ok, 16, 0))))
            elif ok:
                for u in T.vectorized(8):
                    K_s[krow * ks + kcol + u] = K[sb, by, sr, kcol + u]
                for u in T.vectorized(8):
                    V_s[krow * ks + kcol + u] = V[sb, by, sr, kcol + u]
            else:
                for u in T.vectorized(8):
                    K_s[krow * ks + kcol + u] = T.float16(0)
                for u in T.vectorized(8):
                    V_s[krow * ks + kcol + u] = T.float16(0)
            if paged is not None:
                if kcol == 0:
                    ok_s[sg * mk + krow] = T.if_then_else(ok, 1, 0)

    @T.inline
    def body(Q, K, V, pos, table, O, B, L, NB):
        for bx in T.thread_binding(B, thread="blockIdx.x"):
            for by in T.thread_binding(hkv, thread="blockIdx.y"):
                for bz in T.thread_binding(T.ceildiv(L * rep, mq), thread="blockIdx.z"):
                    for ty in T.thread_binding(warps, thread="threadIdx.y"):
                        for tx in T.thread_binding(32, thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                K_s = T.sblock_alloc_buffer((stages * tile,), "float16", scope="shared")
                                V_s = T.sblock_alloc_buffer((stages * tile,), "float16", scope="shared")
                                if paged is not None:  # 1: the staged row's block is allocated
                                    ok_s = T.sblock_alloc_buffer((stages * mk,), "int32", scope="shared")
                                qf = T.sblock_alloc_buffer((kd * 8,), "float16", scope="local")
                                kf = T.sblock_alloc_buffer((kd * nk * 4,), "float16", scope="local")
                                vf = T.sblock_alloc_buffer((mk // 16 * nd * 4,), "float16", scope="local")
                                sf = T.sblock_alloc_buffer((nk * 4,), "float32", scope="local")
                                pf = T.sblock_alloc_buffer((mk // 16 * 8,), "float16", scope="local")
                                of = T.sblock_alloc_buffer((nd * 4,), "float32", scope="local")
                                # per row half hh (rows g, g + 8): max, sum, previous max, tile max
                                st = T.sblock_alloc_buffer((8,), "float32", scope="local")

                                tid: T.let[T.int32] = ty * 32 + tx
                                g: T.let[T.int32] = tx // 4
                                tq: T.let[T.int32] = tx % 4
                                # the last query rows (the most cache tiles) launch first
                                qb: T.let[T.int32] = T.ceildiv(L * rep, mq) - 1 - bz
                                r0: T.let[T.int32] = qb * mq + ty * 16 + g
                                p0: T.let[T.int32] = T.Cast("int32", pos[bx])
                                t_hi: T.let[T.int32] = T.min(L - 1, (qb * mq + mq - 1) // rep)
                                kv_end: T.let[T.int32] = T.min(T.max(p0 + t_hi + 1, 0), m)

                                for kk in T.unroll(kd):
                                    for hh in T.unroll(2):
                                        for c8 in T.unroll(2):
                                            for u in T.vectorized(2):
                                                qf[kk * 8 + c8 * 4 + hh * 2 + u] = Q[
                                                    bx, by * rep + (r0 + hh * 8) % rep,
                                                    T.min((r0 + hh * 8) // rep, L - 1), kk * 16 + c8 * 8 + tq * 2 + u]
                                for i in T.unroll(nd * 4):
                                    of[i] = T.float32(0)
                                for hh in T.unroll(2):
                                    st[hh * 4] = T.float32(neg)
                                    st[hh * 4 + 1] = T.float32(0)

                                if stages == 2:   # tile 0 in flight before the loop
                                    if paged is None:
                                        stage(K, V, None, K_s, V_s, None, 0, 0, tid, bx, by, kv_end, None)
                                    else:
                                        stage(K, V, table, K_s, V_s, ok_s, 0, 0, tid, bx, by, kv_end, NB)
                                    T.evaluate(T.ptx["cp.async.commit_group"]())
                                for it in T.serial(T.ceildiv(kv_end, mk)):
                                    sg: T.let[T.int32] = it % stages
                                    if stages == 2:
                                        # the next tile into the other stage (free: the barrier that ended the
                                        # last iteration), then wait for this one (all but the newest group)
                                        if it + 1 < T.ceildiv(kv_end, mk):
                                            if paged is None:
                                                stage(K, V, None, K_s, V_s, None, it + 1, (it + 1) % 2, tid, bx, by, kv_end, None)
                                            else:
                                                stage(K, V, table, K_s, V_s, ok_s, it + 1, (it + 1) % 2, tid, bx, by, kv_end, NB)
                                        T.evaluate(T.ptx["cp.async.commit_group"]())
                                        T.evaluate(T.ptx["cp.async.wait_group"](1))
                                    elif paged is None:
                                        stage(K, V, None, K_s, V_s, None, it, 0, tid, bx, by, kv_end, None)
                                    else:
                                        stage(K, V, table, K_s, V_s, ok_s, it, 0, tid, bx, by, kv_end, NB)
                                    T.tvm_storage_sync("shared")

                                    # S = q k^T (f32); ldmatrix.x4: column tiles j, j + 1 x both k halves
                                    for kk in T.unroll(kd):
                                        for j2 in T.unroll(nk // 2):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", kf.access_ptr("w"), (kk * nk + j2 * 2) * 4, K_s.access_ptr("r"),
                                                sg * tile + ((j2 * 2 + tx // 16) * 8 + tx % 8) * ks + kk * 16 + tx // 8 % 2 * 8,
                                                dtype="float16"))
                                    for j in T.unroll(nk):
                                        for i in T.unroll(4):
                                            sf[j * 4 + i] = T.float32(0)
                                        for kk in T.unroll(kd):
                                            T.evaluate(T.ptx_legacy.mma(
                                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                qf.access_ptr("r"), kk * 8, kf.access_ptr("r"), (kk * nk + j) * 4, sf.access_ptr("rw"), j * 4,
                                                False, dtype="float32"))
                                    # mask, scale, the rows' new max (over the quad of lanes sharing a row)
                                    for hh in T.unroll(2):
                                        st[hh * 4 + 2] = st[hh * 4]
                                        st[hh * 4 + 3] = T.float32(neg)
                                        for j in T.unroll(nk):
                                            for u in T.unroll(2):
                                                if paged is None:
                                                    sf[j * 4 + hh * 2 + u] = T.if_then_else(
                                                        it * mk + j * 8 + tq * 2 + u <= p0 + (r0 + hh * 8) // rep
                                                        and it * mk + j * 8 + tq * 2 + u < kv_end,
                                                        sf[j * 4 + hh * 2 + u] * T.float32(qk), T.float32(neg))
                                                else:
                                                    sf[j * 4 + hh * 2 + u] = T.if_then_else(
                                                        it * mk + j * 8 + tq * 2 + u <= p0 + (r0 + hh * 8) // rep
                                                        and it * mk + j * 8 + tq * 2 + u < kv_end
                                                        and ok_s[sg * mk + j * 8 + tq * 2 + u] == 1,
                                                        sf[j * 4 + hh * 2 + u] * T.float32(qk), T.float32(neg))
                                                st[hh * 4 + 3] = T.max(st[hh * 4 + 3], sf[j * 4 + hh * 2 + u])
                                        st[hh * 4 + 3] = T.max(st[hh * 4 + 3], T.tvm_warp_shuffle_xor(
                                            T.uint32(0xFFFFFFFF), st[hh * 4 + 3], 1, 32, 32))
                                        st[hh * 4 + 3] = T.max(st[hh * 4 + 3], T.tvm_warp_shuffle_xor(
                                            T.uint32(0xFFFFFFFF), st[hh * 4 + 3], 2, 32, 32))
                                        st[hh * 4] = T.max(st[hh * 4 + 2], st[hh * 4 + 3])
                                        # rescale this lane's sum and outputs of the row
                                        st[hh * 4 + 2] = T.exp2(st[hh * 4 + 2] - st[hh * 4])
                                        st[hh * 4 + 1] = st[hh * 4 + 1] * st[hh * 4 + 2]
                                        for n8 in T.unroll(nd):
                                            for u in T.unroll(2):
                                                of[n8 * 4 + hh * 2 + u] = of[n8 * 4 + hh * 2 + u] * st[hh * 4 + 2]
                                        # p = exp2(s - max) (a masked score weighs exactly 0), as p v's A fragments
                                        for j in T.unroll(nk):
                                            for u in T.unroll(2):
                                                sf[j * 4 + hh * 2 + u] = T.if_then_else(
                                                    sf[j * 4 + hh * 2 + u] > T.float32(neg * 0.5),
                                                    T.exp2(sf[j * 4 + hh * 2 + u] - st[hh * 4]), T.float32(0))
                                                st[hh * 4 + 1] = st[hh * 4 + 1] + sf[j * 4 + hh * 2 + u]
                                                pf[j // 2 * 8 + j % 2 * 4 + hh * 2 + u] = T.Cast("float16", sf[j * 4 + hh * 2 + u])
                                    # O += p v; ldmatrix.x4.trans: both k halves x column tiles n8, n8 + 1
                                    for kj in T.unroll(mk // 16):
                                        for n2 in T.unroll(nd // 2):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                True, 4, ".b16", vf.access_ptr("w"), (kj * nd + n2 * 2) * 4, V_s.access_ptr("r"),
                                                sg * tile + (kj * 16 + tx // 8 % 2 * 8 + tx % 8) * ks + (n2 * 2 + tx // 16) * 8,
                                                dtype="float16"))
                                    for n8 in T.unroll(nd):
                                        for kj in T.unroll(mk // 16):
                                            T.evaluate(T.ptx_legacy.mma(
                                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                pf.access_ptr("r"), kj * 8, vf.access_ptr("r"), (kj * nd + n8) * 4, of.access_ptr("rw"), n8 * 4,
                                                False, dtype="float32"))
                                    # the next tile's staging overwrites what other warps may still read
                                    T.tvm_storage_sync("shared")
                                if stages == 2:   # nothing left in flight at exit (a block with no tiles had tile 0)
                                    T.evaluate(T.ptx["cp.async.wait_group"](0))

                                for hh in T.unroll(2):
                                    st[hh * 4 + 1] = st[hh * 4 + 1] + T.tvm_warp_shuffle_xor(
                                        T.uint32(0xFFFFFFFF), st[hh * 4 + 1], 1, 32, 32)
                                    st[hh * 4 + 1] = st[hh * 4 + 1] + T.tvm_warp_shuffle_xor(
                                        T.uint32(0xFFFFFFFF), st[hh * 4 + 1], 2, 32, 32)
                                    if (r0 + hh * 8) // rep < L:
                                        for n8 in T.unroll(nd):
                                            for u in T.vectorized(2):
                                                O[bx, by * rep + (r0 + hh * 8) % rep, (r0 + hh * 8) // rep, n8 * 8 + tq * 2 + u] = T.Cast(
                                                    "float16", of[n8 * 4 + hh * 2 + u] / T.max(st[hh * 4 + 1], T.float32(1e-30)))

    # fmt: on
    return _attention_prim_func(body, h, hkv, m, d, "float16", pos_dtype, paged)
