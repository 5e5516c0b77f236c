"""Lowerings of the paged KV-cache ops ``kv.paged_append`` / ``kv.paged_attention`` (llmasos/ir/opset/kv.py).

Layout: a pool per layer and per k/v, [NB, Hkv, BS, D] (NB symbolic: one library serves any pool size), and a
block table [B, MB] i32 per call; row b's position p lives at pool[table[b, p // BS], :, p % BS].

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
  - CUDA (``paged_decode_attention_func``): the contiguous decode kernel's layout (lowering_kv.py), its
    shared-memory tiles filled through the block table; positions in unallocated blocks score -inf.
* ``kv.paged_attention`` with T > 1 (prefill chunks, or a step that mixes prefill chunks and padded decode
  rows) gathers each row's MB blocks into a [B, Hkv, MB*BS, D] view (only blocks of the row's table:
  ``if_then_else`` does not read an unallocated entry's block) and runs kv.attention's generic path
  (lowering_kv._generic) with the mask ``j <= pos[b] + t and table[b, j // BS] is allocated``.
"""
from __future__ import annotations

import math

from tvm import relax, te
from tvm import tirx as tir
from tvm.script import tirx as T

from ...ir.types import DType
from .lowering import register_lowering, tvm_dtype
from .lowering_kv import _NEG_BIG, _decode_shape, _exp2_nonpositive, _generic, _graph_of


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
                T.writes(pool[0:NB, vh, 0:bs, vj])
                p: T.int64 = T.Cast("int64", pos[vb]) + vt
                if p >= T.int64(0) and p < T.int64(mb * bs):
                    blk: T.int64 = T.Cast("int64", table[vb, p // T.int64(bs)])
                    if blk >= T.int64(0) and blk < NB:
                        pool[blk, vh, p % T.int64(bs), vj] = new[vb, vh, vt, vj]
    # fmt: on
    return kv_paged_append


@register_lowering("kv.paged_append")
def _kv_paged_append(ctx, node, args):
    pt, tt = node.inputs[0].type, node.inputs[3].type
    _, hkv, bs, d = pt.shape
    graph = _graph_of(ctx)
    if graph is not None:
        v = node.inputs[0]
        if v in graph.outputs or any(u is not node for u in graph.users().get(v, [])):
            raise NotImplementedError(
                f"kv.paged_append {node.name}: the pool {v.name} is read again after the append; the TVM backend "
                f"updates pools in place only (read the appended pool instead)")
    func = _paged_append_func(hkv, bs, d, tt.shape[1], tvm_dtype(pt.dtype), tvm_dtype(node.inputs[2].type.dtype))
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
            name, func = kernel
            gv = ctx.bb.add_func(func, name)
            return ctx.emit(relax.call_tir(gv, list(args), relax.TensorType(ctx.shape(qt), tvm_dtype(qt.dtype))),
                            "attn")
    kc = ctx.emit_te(_gather, kp, table, name="kv_paged_gather")
    vc = ctx.emit_te(_gather, vp, table, name="kv_paged_gather")
    return _generic(ctx, node, [q, kc, vc, pos], m=mb * bs, table=(table, bs))


def _gather(pool, table):
    """[B, Hkv, MB*BS, D]: each row's blocks end to end; an unallocated block reads as zeros (not read)."""
    nb, hkv, bs, d = pool.shape
    b_, mb = table.shape

    def at(b, h, j, x):
        blk = table[b, j // bs].astype("int64")
        ok = tir.all(blk >= 0, blk < nb)
        return tir.if_then_else(ok, pool[tir.max(blk, tir.const(0, "int64")), h, j % bs, x],
                                tir.const(0, pool.dtype))
    return te.compute((b_, hkv, mb * bs, d), at, name="kv_paged_gather")


# ------------------------------------------------------------------------------------------------
# the CPU paged decode kernel (T == 1)

def paged_decode_attention_cpu_func(h: int, hkv: int, bs: int, mb: int, d: int, dtype: str, pos_dtype: str,
                                    scale: float, lanes: int = 16):
    """q [B, H, 1, D], pools [NB, Hkv, BS, D], pos [B], table [B, MB] -> out [B, H, 1, D]: one parallel task per
    (row, kv head) walks the row's blocks 0..pos[b] // BS through the table (an unallocated one is skipped) and
    streams their rows 0..pos[b] once for all the kv head's query heads (online softmax, f32); the kernel of
    lowering_kv.decode_attention_cpu_func with the block table in its row loop."""
    group = h // hkv
    L = next(v for v in (16, 8, 4, 2, 1) if v <= lanes and d % v == 0)
    qk_scale = float(scale) * math.log2(math.e)
    neg = _NEG_BIG
    m = mb * bs

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def kv_paged_decode_attention_cpu(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                      var_table: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        NB = T.int64()
        Q = T.match_buffer(var_q, (B, h, 1, d), dtype)
        K = T.match_buffer(var_k, (NB, hkv, bs, d), dtype)
        V = T.match_buffer(var_v, (NB, hkv, bs, d), dtype)
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        table = T.match_buffer(var_table, (B, mb), "int32")
        O = T.match_buffer(var_out, (B, h, 1, d), dtype)
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
                for r in T.serial(group):
                    mx[r] = T.float32(neg)
                    den[r] = T.float32(0)
                    for x in T.vectorized(d):
                        qf[r, x] = T.Cast("float32", Q[b, g * group + r, 0, x]) * T.float32(qk_scale)
                        acc[r, x] = T.float32(0)
                for kb in T.serial((n + T.int64(bs - 1)) // T.int64(bs)):
                    blk: T.let[T.int64] = T.Cast("int64", table[b, kb])
                    if blk >= T.int64(0) and blk < NB:
                        for s in T.serial(T.min(T.int64(bs), n - kb * T.int64(bs))):
                            for r in T.serial(group):
                                for l in T.vectorized(L):
                                    part[l] = T.float32(0)
                                for xo in T.serial(d // L):
                                    for l in T.vectorized(L):
                                        part[l] = part[l] + qf[r, xo * L + l] * T.Cast("float32", K[blk, g, s, xo * L + l])
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
                                    acc[r, x] = acc[r, x] * alpha + p * T.Cast("float32", V[blk, g, s, x])
                                mx[r] = sc[1]
                for r in T.serial(group):
                    for x in T.vectorized(d):
                        O[b, g * group + r, 0, x] = T.Cast(dtype, acc[r, x] / T.max(den[r], T.float32(1e-30)))
    # fmt: on
    return kv_paged_decode_attention_cpu


# ------------------------------------------------------------------------------------------------
# the CUDA paged decode kernel (T == 1)

def paged_decode_attention_func(h: int, hkv: int, bs: int, mb: int, d: int, dtype: str, pos_dtype: str,
                                scale: float):
    """q [B, H, 1, D], pools [NB, Hkv, BS, D], pos [B], table [B, MB] -> out [B, H, 1, D].

    lowering_kv.decode_attention_func with the cache rows fetched through the block table: grid (B, Hkv *
    gdz); each block streams its row's positions 0..pos[b] (and nothing else of the pool) into shared memory
    in tiles, position p from pool[table[b, p // BS], kv head, p % BS]; a position in an unallocated block
    loads zeros and scores -inf. Online softmax in f32 (base 2), the bdz partial states merged at the end.
    """
    s = _decode_shape(h, hkv, d, dtype)
    group, VEC, bdx, bdy, bdz, gdz, tile = (s[k] for k in ("group", "vec", "bdx", "bdy", "bdz", "gdz", "tile"))
    rows = bdz * bdy * tile
    qk_scale = float(scale) * math.log2(math.e)
    neg = _NEG_BIG
    m = mb * bs

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def kv_paged_decode_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle,
                                  var_table: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int32()
        NB = T.int32()
        Q = T.match_buffer(var_q, (B, h, 1, d), dtype)
        K = T.match_buffer(var_k, (NB, hkv, bs, d), dtype)
        V = T.match_buffer(var_v, (NB, hkv, bs, d), dtype)
        pos = T.match_buffer(var_pos, (B,), pos_dtype)
        table = T.match_buffer(var_table, (B, mb), "int32")
        O = T.match_buffer(var_out, (B, h, 1, d), dtype)
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

                                by: T.let[T.int32] = fused_by_bz % hkv
                                bz: T.let[T.int32] = fused_by_bz // hkv
                                qh: T.let[T.int32] = by * group + bz * bdy + ty
                                kv_len[0] = T.min(T.max(T.Cast("int32", pos[bx]) + 1, 0), m)

                                st_m[0] = T.float32(neg)
                                st_d[0] = T.float32(1.0)
                                for vec in T.vectorized(VEC):
                                    O_local[vec] = T.float32(0)
                                for vec in T.vectorized(VEC):
                                    Q_local[vec] = Q[bx, qh, 0, tx * VEC + vec]

                                for iterator in T.serial(T.ceildiv(kv_len[0], rows)):
                                    tile_start_s: T.let[T.int32] = (tz * bdy + ty) * tile
                                    tile_start_g: T.let[T.int32] = ((iterator * bdz + tz) * bdy + ty) * tile
                                    for j in T.serial(tile):
                                        with T.sblock("KV_load"):
                                            T.reads()
                                            T.writes()
                                            row_g: T.let[T.int32] = tile_start_g + j
                                            blk: T.let[T.int32] = T.if_then_else(row_g < kv_len[0], table[bx, T.min(row_g, m - 1) // bs], -1)
                                            if blk >= 0 and blk < NB:
                                                for vec in T.vectorized(VEC):
                                                    K_smem[tile_start_s + j, tx * VEC + vec] = K[blk, by, row_g % bs, tx * VEC + vec]
                                                    V_smem[tile_start_s + j, tx * VEC + vec] = V[blk, by, row_g % bs, tx * VEC + vec]
                                                if tx == 0:
                                                    ok_smem[tile_start_s + j] = 1
                                            else:
                                                for vec in T.vectorized(VEC):
                                                    K_smem[tile_start_s + j, tx * VEC + vec] = T.Cast(dtype, 0)
                                                    V_smem[tile_start_s + j, tx * VEC + vec] = T.Cast(dtype, 0)
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
                                        S_local[j] = T.if_then_else(ok_smem[tz * bdy * tile + j] == 1, t0[0], T.float32(neg))
                                        st_m[0] = T.max(st_m[0], S_local[j])
                                    o_scale: T.let[T.float32] = T.exp2(m_prev[0] - st_m[0])
                                    st_d[0] *= o_scale
                                    for j in T.serial(bdy * tile):
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
                                    T.tvm_storage_sync("shared")

                                if bdz > 1:
                                    for vec in T.vectorized(VEC):
                                        O_allreduce[tz, ty, tx * VEC + vec] = O_local[vec]
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
                                for vec in T.vectorized(VEC):
                                    O_local[vec] /= T.max(st_d[0], T.float32(1e-30))
                                for vec in T.vectorized(VEC):
                                    O[bx, qh, 0, tx * VEC + vec] = T.Cast(dtype, O_local[vec])
    # fmt: on
    return kv_paged_decode_attention
