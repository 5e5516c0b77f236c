"""Small-M tensor-core GEMM for decode steps at batch > 1: y[M, N] = x[M, K] @ w[N, K]^T, f16 in, f32 accumulate.

A decode step reads every weight once whatever the batch, so its GEMMs must stream W at HBM bandwidth and
do their few FLOPs per byte on the tensor cores: at batch 32 the CUDA cores cannot keep up with the loads
(DLight's LowBatchGEMV ran Llama-1B batch-32 decode at 4% of the bandwidth roofline, H200). The kernel computes
y^T = W x^T with ``mma.sync.m16n8k16`` (row.col, f16 -> f32): the weight is the 16-row A operand and up to 8
batch rows are the 8-column B operand, so M = 1..8 costs one MMA column tile and M = 32 four.

Operand loads go straight from global memory into registers, no shared-memory staging: for each 32-wide K
chunk, lane (g = lane / 4, t = lane % 4) loads 16 bytes of weight row g and 16 of row g + 8 at k = 8t..8t+7,
and 16 bytes of each x row g of every column tile. The MMA's own layout wants logical columns {2t, 2t+1,
2t+8, 2t+9} of a 16-wide K step from lane t; logical column c of step s (0, 1) is read from physical offset
8 * ((c % 8) // 2) + 4 s + (c % 2) + 2 (c // 8) of the chunk -- a permutation of the chunk's 32 positions
applied to W and x alike, so the dot products are unchanged and every lane's loads are 16-byte vectors.

Grid: N / (16 R) blocks of ``warps`` warps (R 16-row tiles of W per block) times ceil(M / 32) (a block
covers 32 batch rows: four column tiles, the ones past M skipped warp-uniformly). Each x fragment a lane
loads feeds R MMAs, one per weight tile: every block reads its 32 rows of x from L2 once per K sweep, so
x's L2 traffic is M / (16 R) times the weight's -- at M = 32 and R = 1 twice the weight stream, which held
the 16384-row gate/up and the 32000-row LM head to 0.75-1.0x cuBLAS (H100). R comes from small_m_rows (or
the target option small_m_rows); M is symbolic, so R depends on (N, K) alone: R * 16 f32 accumulators a
thread fit the registers at every M up to the block's 32 rows. The block's warps split K
(interleaved 32-wide chunks, so together they read 512 contiguous bytes of each row per step) and sum their
partial tiles through shared memory. Rows of x past M are read clamped to row M - 1 and their columns of y
are never written: an MMA column depends only on its own B column.

The kernels' numerics are checked without a GPU by llmasos.backends.tvm.simt, a lock-step SIMT interpreter
of this TIR (mma fragments placed by the PTX layout), in tests/backends/test_cuda_schedule.py and
test_cuda_quant_gemm.py; on a GPU against torch by bench/small_m_gemm_check.py / small_m_quant_gemm_check.py.

small_m_quant_gemm_func (below) is the same kernel for quant.linear's int4/int8 codes: codes repacked at load
into the lanes' fragment order (so x keeps its layout), dequantized in registers with lop3 + two half2
instructions per two codes, group scales and zeros applied in f16, then the same MMA and reduction. Batch-1
and batch > 1 int4 decode then stream ~0.53 bytes per weight (codes + f16 scale/zero words at group 128)
instead of 2.
"""
from __future__ import annotations

from tvm import te
from tvm import tirx as tir
from tvm.script import tirx as T

TILE_N = 16        # W rows per block (the MMA's M)
COLS = 8           # batch rows per MMA column tile (the MMA's N)
TILES = 4          # column tiles per block: 32 batch rows
CHUNK = 32         # K per lane step: two m16n8k16 steps
UNROLL = 4         # K chunks unrolled per warp, for loads in flight


def sm_version(arch: str) -> int:
    """The compute capability of a CUDA ``arch`` string as an integer: "sm_90a" -> 90, "sm_80" -> 80; -1 when
    it names none. (DLight's own check reads "sm_90a" as -1 -- "90a" is not all digits -- so on Hopper its
    Matmul rule never tried tensor cores and every prefill GEMM ran on the CUDA cores.)"""
    digits = str(arch).replace("sm_", "").rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits) if digits.isdigit() else -1


def small_m_warps(n: int) -> int:
    """Warps per block (the K split) of the one-tile kernel (R = 1): more when N gives few blocks, to keep
    enough loads in flight."""
    return 8 if n <= 4096 else 4


ROW_TILES = (1, 2, 4)   # the R choices: weight rows per block = 16 R
MIN_BLOCKS = 256        # auto R keeps at least this many blocks (about two per SM on an H100 / H200)


def small_m_rows(n: int, k: int) -> int:
    """The automatic R (16-row weight tiles per block) for an N x K weight: the largest of ROW_TILES that
    divides N into at least MIN_BLOCKS blocks. Every block reads all of x (M x K) from L2 per K sweep, so a
    block of 16 rows at M = 32 reads twice as many x bytes as weight bytes; R tiles reuse each x fragment for
    R MMAs and cut that to 2 / R. Few-row projections (N = 2048: 128 blocks at R = 1) keep R = 1 -- fewer
    blocks would leave SMs without work and the weight stream, not L2, is their limit."""
    for r in sorted(ROW_TILES, reverse=True):
        if n % (TILE_N * r) == 0 and n // (TILE_N * r) >= MIN_BLOCKS and small_m_gemm_supported(n, k, "float16", r):
            return r
    return 1


def small_m_plan(n: int, rows: int) -> tuple:
    """(warps, unroll) of the kernel with R = ``rows``. R = 1 keeps small_m_warps and UNROLL = 4 (128 bytes
    of weight in flight per lane). R = 2 and 4: 4 warps (the shared reduction buffer, warps * R * 2 KiB, stays
    within 32 KiB) and 2 chunks unrolled: 128 / 256 bytes a lane in flight, so the few blocks of a large-R
    grid (two a SM at 256 blocks) still keep ~60 KiB of loads in flight per SM. ptxas (sm_90a, N = 16384,
    K = 2048): R = 1 66 registers, R = 2 90, R = 4 128, no spills -- the R * 16 f32 accumulators fit."""
    if rows == 1:
        return small_m_warps(n), UNROLL
    return 4, 2


def small_m_gemm_supported(n: int, k: int, dtype: str, rows: int = 1) -> bool:
    """Whether the kernel with R = ``rows`` takes a [*, K] x [N, K] GEMM: f16, N a multiple of 16 R, K of
    32 * warps * unroll."""
    if rows not in ROW_TILES:
        return False
    warps, unroll = small_m_plan(n, rows)
    return dtype == "float16" and n % (TILE_N * rows) == 0 and k % (CHUNK * warps * unroll) == 0


def _grid_tags(m_fastest: bool) -> tuple:
    """(weight-tile axis, batch-row-group axis) thread tags of the small-M kernels. A block covers 32 batch rows,
    so M > 32 gives each weight tile several blocks, each streaming the same weight rows. With the batch-row
    groups on blockIdx.x (fastest: launched together) the second block of a tile finds its weights in L2; with
    the weight tiles fastest (``m_fastest=False``, the first order) a whole sweep over N -- all the step's
    weights, far past L2 -- runs between them, so every group re-reads them from HBM (twice the weight
    traffic at M = 64, the serving engine's batch). M <= 32 launches the same blocks in the same order either way."""
    return ("blockIdx.y", "blockIdx.x") if m_fastest else ("blockIdx.x", "blockIdx.y")


def small_m_gemm_func(n: int, k: int, out_dtype: str = "float16", rows: int = 1, warps: int = 0, unroll: int = 0,
                      m_fastest: bool = True):
    """The PrimFunc ``small_m_gemm(x [M, K] f16, w [N, K] f16) -> y [M, N] out_dtype`` (M symbolic), each
    block covering ``rows`` (R) 16-row weight tiles: every x fragment a lane loads feeds R MMAs. ``warps`` /
    ``unroll`` override small_m_plan (for sweeps on a GPU). ``m_fastest`` (see _grid_tags): the blocks of one
    weight tile's batch-row groups are launched together."""
    if rows not in ROW_TILES:
        raise ValueError(f"small_m_gemm_func: rows (R) must be one of {ROW_TILES}, got {rows!r}")
    plan = small_m_plan(n, rows)
    warps, unroll = warps or plan[0], unroll or plan[1]
    rt = TILE_N * rows                    # weight rows per block
    if n % rt or k % (CHUNK * warps * unroll):
        raise ValueError(f"small_m_gemm_func: N = {n} must be a multiple of {rt} and K = {k} of "
                         f"{CHUNK * warps * unroll} (R = {rows}, {warps} warps, unroll {unroll})")
    steps = k // (CHUNK * warps)          # K chunks per warp
    outer = steps // unroll
    per_thread = rt * TILES * COLS // (warps * 32)  # outputs each thread sums and writes
    if per_thread * warps * 32 != rt * TILES * COLS:
        raise ValueError(f"small_m_gemm_func: {warps} warps do not divide the block's {rt * TILES * COLS} outputs")
    tag_n, tag_m = _grid_tags(m_fastest)

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def small_m_gemm(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int32()
        X = T.match_buffer(var_x, (M, k), "float16")
        W = T.match_buffer(var_w, (n, k), "float16")
        Y = T.match_buffer(var_y, (M, n), out_dtype)
        for bx in T.thread_binding(n // rt, thread=tag_n):
            for by in T.thread_binding((M + COLS * TILES - 1) // (COLS * TILES), thread=tag_m):
                for ty in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("gemm"):
                            w_reg = T.sblock_alloc_buffer((16 * rows,), "float16", scope="local")
                            x_reg = T.sblock_alloc_buffer((TILES * 8,), "float16", scope="local")
                            a_frag = T.sblock_alloc_buffer((8 * rows,), "float16", scope="local")
                            b_frag = T.sblock_alloc_buffer((4,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((rows * TILES * 4,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((warps, rt, TILES * COLS), "float32", scope="shared")
                            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            g: T.let[T.int32] = tx // 4
                            t: T.let[T.int32] = tx % 4
                            m0: T.let[T.int32] = by * (COLS * TILES)
                            for i in T.unroll(rows * TILES * 4):
                                acc[i] = T.float32(0)
                            for ko in T.serial(outer):
                                for ku in T.unroll(unroll):
                                    k0: T.let[T.int32] = ((ko * unroll + ku) * warps + ty) * CHUNK + 8 * t
                                    # tile r's rows g and g + 8: 16 bytes each
                                    for r in T.unroll(rows):
                                        for v in T.vectorized(8):
                                            w_reg[r * 16 + v] = W[bx * rt + r * TILE_N + g, k0 + v]
                                        for v in T.vectorized(8):
                                            w_reg[r * 16 + 8 + v] = W[bx * rt + r * TILE_N + g + 8, k0 + v]
                                    for c in T.unroll(TILES):
                                        if m0 + c * COLS < M:
                                            for v in T.vectorized(8):
                                                x_reg[c * 8 + v] = X[T.min(m0 + c * COLS + g, M - 1), k0 + v]
                                    for s in T.unroll(2):
                                        # A of tile r: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
                                        for r in T.unroll(rows):
                                            a_frag[r * 8 + 0] = w_reg[r * 16 + 4 * s]
                                            a_frag[r * 8 + 1] = w_reg[r * 16 + 4 * s + 1]
                                            a_frag[r * 8 + 2] = w_reg[r * 16 + 8 + 4 * s]
                                            a_frag[r * 8 + 3] = w_reg[r * 16 + 8 + 4 * s + 1]
                                            a_frag[r * 8 + 4] = w_reg[r * 16 + 4 * s + 2]
                                            a_frag[r * 8 + 5] = w_reg[r * 16 + 4 * s + 3]
                                            a_frag[r * 8 + 6] = w_reg[r * 16 + 8 + 4 * s + 2]
                                            a_frag[r * 8 + 7] = w_reg[r * 16 + 8 + 4 * s + 3]
                                        for c in T.unroll(TILES):
                                            if m0 + c * COLS < M:
                                                # B: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g), shared by R MMAs
                                                for v in T.unroll(4):
                                                    b_frag[v] = x_reg[c * 8 + 4 * s + v]
                                                for r in T.unroll(rows):
                                                    T.evaluate(T.ptx_legacy.mma(
                                                        "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                        a_frag.data, r * 8, b_frag.data, 0, acc.data,
                                                        (r * TILES + c) * 4, False, dtype="float32"))
                            # C of tile r: (row g, col 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
                            for r in T.unroll(rows):
                                for c in T.unroll(TILES):
                                    red[ty, r * TILE_N + g, c * COLS + 2 * t] = acc[(r * TILES + c) * 4]
                                    red[ty, r * TILE_N + g, c * COLS + 2 * t + 1] = acc[(r * TILES + c) * 4 + 1]
                                    red[ty, r * TILE_N + g + 8, c * COLS + 2 * t] = acc[(r * TILES + c) * 4 + 2]
                                    red[ty, r * TILE_N + g + 8, c * COLS + 2 * t + 1] = acc[(r * TILES + c) * 4 + 3]
                            T.tvm_storage_sync("shared")
                            for j in T.unroll(per_thread):
                                # output o = (column m, row r) with rows fastest: consecutive threads write
                                # consecutive n of one y row
                                o: T.let[T.int32] = (ty * 32 + tx) + j * (warps * 32)
                                r_: T.let[T.int32] = o % rt
                                col: T.let[T.int32] = o // rt
                                if m0 + col < M:
                                    total[0] = T.float32(0)
                                    for w_ in T.unroll(warps):
                                        total[0] = total[0] + red[w_, r_, col]
                                    Y[m0 + col, bx * rt + r_] = T.Cast(out_dtype, total[0])
    # fmt: on
    return small_m_gemm


# ------------------------------------------------------------------------------------------------
# int4 / int8 codes: the same kernel with the weight dequantized in registers right before the MMA
#
# The codes are repacked once, at load (quant_repack_words: a parameter-only TE function, which
# LiftTransformParams hoists), into the order a lane consumes them. Per K chunk of CH = 16 * S columns
# (S MMA k-steps: int4 S = 4, CH = 64; int8 S = 2, CH = 32) and 16-row tile, lane (g, t) loads 16 bytes,
# 4 uint32 words, of its own -- the warp 512 contiguous bytes. Logical MMA column e in {2t, 2t+1, 2t+8,
# 2t+9} (e = 0..3 in that order) of k-step s is weight column (and x column) 4S t + 4s + e of the chunk,
# so x is read as stored, 4S contiguous halves (16 or 32 bytes) per lane and batch row; only the codes
# carry the permutation. Each k-step's 8 codes of the lane fill its A fragment's four half2 registers
#     r = 0: (row g, e 0..1)   1: (g + 8, e 0..1)   2: (g, e 2..3)   3: (g + 8, e 2..3)
# and are laid out so that one lop3 per register lifts both of them into f16 (FasterTransformer's trick):
#     int4, word s:          r = (word >> 4r) & 0x000F000F | 0x64006400   (nibbles r and r + 4)
#     int8, words 2s, 2s+1:  r = (word_{2s + r//2} >> 8 (r % 2)) & 0x00FF00FF | 0x64006400
# read as half2 that is (1024 + c_lo, 1024 + c_hi) exactly; sub.f16x2 takes the 1024 off (exact) and
# fma.rn.f16x2 applies scale and zero: w = c * s + (-z * s), two half2 instructions per two codes.
# Signed int8 codes are stored offset by 128 (byte ^ 0x80) and their zeros by +128.
# Scales and zeros go f16 into one word per row and group, (s, -z * s), interleaved [N/16, G, 8, 2]:
# lane (g, t) reads 8 bytes per chunk, rows g and g + 8 (prmt splats each half into a half2).

Q_UNROLL = 4       # K chunks unrolled per warp (an int4 chunk is 64 columns: twice the f16 kernel's K)
_MAGIC16 = 0x64006400  # f16 1024.0 in both halves


def quant_chunk(bits: int) -> int:
    """K columns per lane step (16 bytes of codes): 64 for int4, 32 for int8."""
    return 16 * (4 if bits == 4 else 2)


def small_m_quant_gemm_supported(n: int, k: int, bits: int, group: int, dtype: str) -> bool:
    """Whether the int kernel takes a quant.linear [*, K] x [N, K]: f16 x, 4- or 8-bit codes, N a multiple of
    16, K of the chunk (64 int4, 32 int8), groups (0: per channel or tensor) whole chunks."""
    if dtype != "float16" or bits not in (4, 8) or n % TILE_N:
        return False
    ch = quant_chunk(bits)
    return k % ch == 0 and (group == 0 or group % ch == 0)


def quant_repack_words(codes, n: int, k: int, bits: int, signed: bool):
    """TE: codes [N, Kq] (int4: two per byte, even k low; int8/uint8) -> uint32 words [N / 16, K / CH * 128] in
    the kernel's lane order (see above): word q of tile i is lane (q % 128) // 4's word q % 4 of chunk q // 128."""
    ch = quant_chunk(bits)
    u32 = "uint32"

    def code(row, kk):
        if bits == 4:
            byte = codes[row, kk // 2].astype(u32)
            return (byte >> ((kk % 2) * 4).astype(u32)) & tir.const(15, u32)
        v = codes[row, kk].astype("uint8").astype(u32)
        return v ^ tir.const(128, u32) if signed else v

    def word(i, q):
        c, lane, j = q // 128, (q % 128) // 4, q % 4
        g, t = lane // 4, lane % 4
        row0 = i * TILE_N + g
        out = tir.const(0, u32)
        if bits == 4:
            for p in range(8):     # nibble p: row g + 8 (p % 2), column e = 2 ((p % 4) // 2) + p // 4
                e = 2 * ((p % 4) // 2) + p // 4
                out = out | (code(row0 + 8 * (p % 2), c * ch + 16 * t + 4 * j + e) << tir.const(4 * p, u32))
        else:
            s, hh = j // 2, j % 2
            for b in range(4):     # byte b: row g + 8 (b % 2), column e = 2 hh + b // 2
                e = 2 * hh + b // 2
                out = out | (code(row0 + 8 * (b % 2), c * ch + 8 * t + 4 * s + e) << tir.const(8 * b, u32))
        return out
    return te.compute((n // TILE_N, k // ch * 128), word, name="quant_words")


def quant_words_dequant(words, sz, n: int, k: int, bits: int, group: int, out_dtype: str = "float16"):
    """TE: the weight [N, K] ``out_dtype`` back from quant_repack_words / quant_repack_scales' words (their
    inverse: the small-M kernel's own arithmetic, code * s + (-z * s), here in f32 with one rounding).
    A prompt's GEMMs (many rows: tensor-core tiles want f16 operands) read the weight this way, so they
    and the decode step share ONE repacked copy of the codes -- lifted once, at load -- and dequantize per
    call into a temporary. ``group`` 0: one scale word per row (per channel or per tensor)."""
    ch = quant_chunk(bits)
    u32 = "uint32"

    def w(r, kk):
        i, rr = r // TILE_N, r % TILE_N
        g, h = rr % 8, rr // 8
        c, col = kk // ch, kk % ch
        if bits == 4:          # col = 16 t + 4 j + e; nibble p = 4 (e % 2) + 2 (e // 2) + h
            t, j, e = col // 16, (col % 16) // 4, col % 4
            shift = (4 * (e % 2) + 2 * (e // 2) + h) * 4
            mask = 15
        else:                  # col = 8 t + 4 s + e; word j = 2 s + e // 2, byte 2 (e % 2) + h
            t, e = col // 8, col % 4
            j = 2 * ((col % 8) // 4) + e // 2
            shift = (2 * (e % 2) + h) * 8
            mask = 255
        word = words[i, c * 128 + (g * 4 + t) * 4 + j]
        code = ((word >> shift.astype(u32)) & tir.const(mask, u32)).astype("float32")
        gi = kk // group if group else 0
        sw = sz[i, gi * 16 + g * 2 + h]
        scale = tir.reinterpret("float16", (sw & tir.const(0xFFFF, u32)).astype("uint16")).astype("float32")
        offset = tir.reinterpret("float16", (sw >> tir.const(16, u32)).astype("uint16")).astype("float32")
        return (code * scale + offset).astype(out_dtype)
    return te.compute((n, k), w, name="quant_words_dequant")


def quant_repack_scales(scale, zero, n: int, groups: int, signed8: bool):
    """TE: scale, zero f32 [N, G] (or [1, 1]) -> uint32 [N / 16, G * 16]: word (g, h) of group gi of tile i is
    row 16 i + g + 8 h's (f16 s, f16 -(z [+ 128 for signed int8]) * s)."""
    per_tensor = tuple(int(d) for d in scale.shape) == (1, 1)

    def half_bits(v):
        return tir.reinterpret("uint16", v.astype("float16")).astype("uint32")

    def word(i, q):
        gi, g, h = q // 16, (q % 16) // 2, q % 2
        row = i * TILE_N + g + 8 * h
        s = scale[0, 0] if per_tensor else scale[row, gi]
        z = zero[0, 0] if per_tensor else zero[row, gi]
        s, z = s.astype("float32"), z.astype("float32")
        if signed8:
            z = z + tir.const(128.0, "float32")
        return half_bits(s) | (half_bits(-z * s) << tir.const(16, "uint32"))
    return te.compute((n // TILE_N, groups * 16), word, name="quant_scale_words")


def small_m_quant_rows(n: int) -> int:
    """The automatic R of the int kernel: as small_m_rows (the largest R leaving >= MIN_BLOCKS blocks). x's L2
    traffic weighs more here -- int4 codes are a quarter of the f16 weight's bytes, so at M = 32 and R = 1 a
    block reads 8x as many x bytes as code bytes."""
    for r in sorted(ROW_TILES, reverse=True):
        if n % (TILE_N * r) == 0 and n // (TILE_N * r) >= MIN_BLOCKS:
            return r
    return 1


def small_m_quant_plan(n: int, rows: int) -> tuple:
    """(warps, unroll) of the int kernel with R = ``rows``: R = 1 small_m_warps and Q_UNROLL; R = 2, 4: 4 warps
    (shared reduction <= 32 KiB) and 2 chunks unrolled (R * 2 * 16 bytes of codes in flight per lane)."""
    return (small_m_warps(n), Q_UNROLL) if rows == 1 else (4, 2)


def small_m_quant_gemm_func(n: int, k: int, bits: int, group: int, out_dtype: str = "float16", rows: int = 1,
                            warps: int = 0, unroll: int = 0, m_fastest: bool = True):
    """The PrimFunc ``small_m_quant_gemm(x [M, K] f16, words [N/16, K/CH*128] u32, sz [N/16, G*16] u32) ->
    y [M, N]`` (M symbolic) over quant_repack_words / quant_repack_scales' layouts; G = ceil(K / group), 1
    for group 0. Each block covers ``rows`` (R) 16-row tiles (the repacked layout is per tile, so R needs no
    other layout): each x fragment feeds R MMAs. ``warps`` / ``unroll`` override small_m_quant_plan;
    ``m_fastest``: the grid order (_grid_tags)."""
    if rows not in ROW_TILES or n % (TILE_N * rows):
        raise ValueError(f"small_m_quant_gemm_func: rows (R) must be one of {ROW_TILES} with N = {n} a multiple "
                         f"of 16 R, got {rows!r}")
    plan = small_m_quant_plan(n, rows)
    warps, unroll = warps or plan[0], unroll or plan[1]
    R = rows
    rt = TILE_N * R
    S = 4 if bits == 4 else 2
    ch = quant_chunk(bits)
    chunks = k // ch
    per_step = warps * unroll
    outer = -(-chunks // per_step)
    ragged = chunks % per_step != 0
    groups = 1 if group == 0 else -(-k // group)
    gshift = 0 if group == 0 else group // ch      # chunks per group
    per_thread = rt * TILES * COLS // (warps * 32)
    if per_thread * warps * 32 != rt * TILES * COLS:
        raise ValueError(f"small_m_quant_gemm_func: {warps} warps do not divide the block's "
                         f"{rt * TILES * COLS} outputs")
    tag_n, tag_m = _grid_tags(m_fastest)
    xw = 4 * S                                     # x halves per lane, batch row and chunk
    mask = 0x000F000F if bits == 4 else 0x00FF00FF
    u32 = "uint32"

    def gidx(c):       # the scale group of chunk c
        return c // gshift if gshift else 0

    def live(c):       # a K split that does not divide the chunks: the last warps skip the missing ones
        return c < chunks if ragged else True

    def src(wv, base, s, r):  # (s, r: unrolled loop variables; the shifts fold to constants)
        if bits == 4:
            return wv[base + s] >> (4 * r).astype(u32)
        return wv[base + 2 * s + r // 2] >> (8 * (r % 2)).astype(u32)

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def small_m_quant_gemm(var_x: T.handle, var_w: T.handle, var_sz: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int32()
        X = T.match_buffer(var_x, (M, k), "float16")
        Wq = T.match_buffer(var_w, (n // TILE_N, chunks * 128), "uint32")
        SZ = T.match_buffer(var_sz, (n // TILE_N, groups * 16), "uint32")
        Y = T.match_buffer(var_y, (M, n), out_dtype)
        for bx in T.thread_binding(n // rt, thread=tag_n):
            for by in T.thread_binding((M + COLS * TILES - 1) // (COLS * TILES), thread=tag_m):
                for ty in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("qgemm"):
                            w_reg = T.sblock_alloc_buffer((4 * unroll * R,), "uint32", scope="local")
                            sz_reg = T.sblock_alloc_buffer((2 * unroll * R,), "uint32", scope="local")
                            sc = T.sblock_alloc_buffer((4 * R,), "uint32", scope="local")
                            h = T.sblock_alloc_buffer((1,), "uint32", scope="local")
                            x_reg = T.sblock_alloc_buffer((TILES * xw,), "float16", scope="local")
                            a_frag = T.sblock_alloc_buffer((4 * R,), "uint32", scope="local")
                            b_frag = T.sblock_alloc_buffer((4,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((R * TILES * 4,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((warps, rt, TILES * COLS), "float32", scope="shared")
                            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            g: T.let[T.int32] = tx // 4
                            t: T.let[T.int32] = tx % 4
                            m0: T.let[T.int32] = by * (COLS * TILES)
                            for i in T.unroll(R * TILES * 4):
                                acc[i] = T.float32(0)
                            for ko in T.serial(outer):
                                # the HBM stream first: every unrolled chunk's codes (and scale words) in flight
                                for ku in T.unroll(unroll):
                                    if live((ko * unroll + ku) * warps + ty):
                                        for q in T.unroll(R):
                                            for v in T.vectorized(4):
                                                w_reg[(ku * R + q) * 4 + v] = Wq[
                                                    bx * R + q, ((ko * unroll + ku) * warps + ty) * 128 + tx * 4 + v]
                                            for v in T.vectorized(2):
                                                sz_reg[(ku * R + q) * 2 + v] = SZ[
                                                    bx * R + q, gidx((ko * unroll + ku) * warps + ty) * 16 + g * 2 + v]
                                for ku in T.unroll(unroll):
                                    cidx: T.let[T.int32] = (ko * unroll + ku) * warps + ty
                                    if live(cidx):
                                        for c in T.unroll(TILES):
                                            if m0 + c * COLS < M:
                                                for half in T.unroll(xw // 8):
                                                    for v in T.vectorized(8):
                                                        x_reg[c * xw + half * 8 + v] = X[
                                                            T.min(m0 + c * COLS + g, M - 1), cidx * ch + xw * t + half * 8 + v]
                                        # tile q: (s, s) and (-z s, -z s) of rows g and g + 8
                                        for q in T.unroll(R):
                                            T.ptx.prmt.b32(sc[q * 4], sz_reg[(ku * R + q) * 2],
                                                           sz_reg[(ku * R + q) * 2], T.uint32(0x1010))
                                            T.ptx.prmt.b32(sc[q * 4 + 1], sz_reg[(ku * R + q) * 2],
                                                           sz_reg[(ku * R + q) * 2], T.uint32(0x3232))
                                            T.ptx.prmt.b32(sc[q * 4 + 2], sz_reg[(ku * R + q) * 2 + 1],
                                                           sz_reg[(ku * R + q) * 2 + 1], T.uint32(0x1010))
                                            T.ptx.prmt.b32(sc[q * 4 + 3], sz_reg[(ku * R + q) * 2 + 1],
                                                           sz_reg[(ku * R + q) * 2 + 1], T.uint32(0x3232))
                                        for s in T.unroll(S):
                                            for q in T.unroll(R):
                                                for r in T.unroll(4):
                                                    T.ptx.lop3.b32(h[0], src(w_reg, (ku * R + q) * 4, s, r),
                                                                   T.uint32(mask), T.uint32(_MAGIC16), 0xEA)
                                                    T.ptx.sub.f16x2(h[0], h[0], T.uint32(_MAGIC16))
                                                    T.ptx.fma.rn.f16x2(a_frag[q * 4 + r], h[0], sc[q * 4 + 2 * (r % 2)],
                                                                       sc[q * 4 + 2 * (r % 2) + 1])
                                            for c in T.unroll(TILES):
                                                if m0 + c * COLS < M:
                                                    for v in T.unroll(4):
                                                        b_frag[v] = x_reg[c * xw + 4 * s + v]
                                                    for q in T.unroll(R):
                                                        T.evaluate(T.ptx_legacy.mma(
                                                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                            a_frag.data, q * 4, b_frag.data, 0, acc.data,
                                                            (q * TILES + c) * 4, False, dtype="float32"))
                            for q in T.unroll(R):
                                for c in T.unroll(TILES):
                                    red[ty, q * TILE_N + g, c * COLS + 2 * t] = acc[(q * TILES + c) * 4]
                                    red[ty, q * TILE_N + g, c * COLS + 2 * t + 1] = acc[(q * TILES + c) * 4 + 1]
                                    red[ty, q * TILE_N + g + 8, c * COLS + 2 * t] = acc[(q * TILES + c) * 4 + 2]
                                    red[ty, q * TILE_N + g + 8, c * COLS + 2 * t + 1] = acc[(q * TILES + c) * 4 + 3]
                            T.tvm_storage_sync("shared")
                            for j in T.unroll(per_thread):
                                o: T.let[T.int32] = (ty * 32 + tx) + j * (warps * 32)
                                r_: T.let[T.int32] = o % rt
                                col: T.let[T.int32] = o // rt
                                if m0 + col < M:
                                    total[0] = T.float32(0)
                                    for w_ in T.unroll(warps):
                                        total[0] = total[0] + red[w_, r_, col]
                                    Y[m0 + col, bx * rt + r_] = T.Cast(out_dtype, total[0])
    # fmt: on
    return small_m_quant_gemm


# ------------------------------------------------------------------------------------------------
# Large-M (prefill) tensor-core GEMM: y[M, N] = x[M, K] @ w[N, K]^T, f16 in, f32 accumulate
#
# A block computes a BM x BN tile of y (BM rows of x, BN rows of w) with 8 warps in a 2 (M) x 4 (N) grid,
# each warp a (BM / 2) x (BN / 4) tile: MI = BM / 32 MMA row tiles (m16) by NI = BN / 32 column tiles (n8).
# K advances BK = 32 columns a step through a STAGES-deep ring of shared-memory tiles filled by cp.async
# (16 bytes a copy, .cg: bypassing L1), so the copies of steps kt + 1 .. kt + STAGES - 1 are in flight while
# step kt's MMAs run. A shared tile row holds 32 halves = four 16-byte chunks; chunk c of row r is stored at
# chunk c ^ ((r >> 1) & 3) (prefill_swizzle), so the 8 row addresses of one ldmatrix phase hit 8 distinct
# 16-byte bank groups of the 128-byte bank line (no conflicts, no padding: 3 stages of 128 x 32 tiles of
# x and w fill exactly the 48 KiB a block may have statically).
# Operands reach the registers through ldmatrix.x4 (no transpose: x is row-major [M, K] -- MMA's "row" A --
# and w [N, K] is K x N column-major -- MMA's "col" B): for A, lane l addresses row l % 16 and k-chunk
# 2 kk + l // 16 of the 16 x 16 tile (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 in the fragment's a0..a3
# order); for B, lane l addresses w row (l % 8) + 8 (l // 16) and k-chunk 2 kk + (l // 8) % 2, giving
# (b0, b1) of two n8 tiles. Rows of x past M are zero-filled by cp.async's src-size (the address clamped to
# row M - 1) and their rows of y are not written. The accumulators go to y as f16 pairs (c0 c1 / c2 c3: rows
# g and g + 8, columns 2t, 2t + 1 of each n8 tile). Grid: (ceil(M / BM), N / BN), row tiles fastest.

PF_BK = 32         # K columns per pipeline step (two m16n8k16 k-steps)
PF_BKS = (32, 64)  # the step widths the kernel takes (64: four k-steps a barrier, 128-byte swizzled rows)
PF_WARPS_M = 2
PF_WARPS_N = 4
PF_STATIC_SMEM = 48 * 1024   # a block's static shared memory; more is dynamic (opted in at launch by TVM's runtime)


def prefill_swizzle(row, chunk, bk: int = PF_BK):
    """Shared-memory element offset of 16-byte k-chunk ``chunk`` of tile row ``row`` (ints or TIR): BK = 32 (64-byte
    rows, two a 128-byte bank line) ``chunk ^ ((row >> 1) & 3)``; BK = 64 (a row is a bank line) ``chunk ^ (row & 7)``.
    Either way the 8 rows one ldmatrix phase reads (consecutive rows, one chunk) hit 8 distinct bank groups."""
    if bk == 64:
        return row * 64 + ((chunk ^ (row & 7)) * 8)
    return row * PF_BK + ((chunk ^ ((row >> 1) & 3)) * 8)


def prefill_copy_row(c, tid, threads: int, bk: int = PF_BK):
    """Tile row of thread ``tid``'s ``c``-th 16-byte copy of a step (BK / 8 copies a row)."""
    return (c * threads + tid) // (bk // 8)


def prefill_copy_chunk(c, tid, threads: int, bk: int = PF_BK):
    """K-chunk (0 .. BK / 8 - 1, 8 halves each) of thread ``tid``'s ``c``-th 16-byte copy of a step."""
    return (c * threads + tid) % (bk // 8)


def prefill_a_offset(lane, mi, kk, warp_m, wm: int, bk: int = PF_BK):
    """Shared offset (within a stage's x tile) that ``lane`` gives ldmatrix.x4 for m16 tile ``mi`` of warp row
    ``warp_m`` at k-step ``kk``: row lane % 16, k-chunk 2 kk + lane // 16 (matrices a0..a3)."""
    return prefill_swizzle(warp_m * wm + mi * 16 + lane % 16, kk * 2 + lane // 16, bk)


def prefill_b_offset(lane, nj, kk, warp_n, wn: int, bk: int = PF_BK):
    """Shared offset (within a stage's w tile) that ``lane`` gives ldmatrix.x4 for n8 tiles 2 nj, 2 nj + 1 of
    warp column ``warp_n`` at k-step ``kk``: w row lane % 8 + 8 (lane // 16), k-chunk 2 kk + (lane // 8) % 2
    (registers b0, b1 of tile 2 nj, then b0, b1 of tile 2 nj + 1)."""
    return prefill_swizzle(warp_n * wn + nj * 16 + lane % 8 + lane // 16 * 8, kk * 2 + lane // 8 % 2, bk)


def prefill_tile(n: int):
    """(BM, BN) block tile for N: 128 x 128, or 128 x 64 where N is not a multiple of 128 or gives few
    column blocks (N = 512: 4 blocks of 128 a row tile leave most of the SMs idle at M = 1024)."""
    if n % 128 == 0 and n >= 1024:
        return 128, 128
    return 128, 64


def prefill_gemm_supported(n: int, k: int, dtype: str, bk: int = PF_BK) -> bool:
    """Whether the prefill kernel takes a [*, K] x [N, K] GEMM: f16, N a multiple of 64, K of BK."""
    return dtype == "float16" and bk in PF_BKS and n % 64 == 0 and k % bk == 0 and k >= bk


def prefill_smem_bytes(tile, stages: int, bk: int) -> int:
    """Shared memory of a block: ``stages`` tiles of x (BM x BK) and w (BN x BK), f16."""
    return stages * (tile[0] + tile[1]) * bk * 2


def prefill_gemm_func(n: int, k: int, out_dtype: str = "float16", stages: int = 3, tile=None, warps=None,
                      bk: int = PF_BK, frag_pipeline: bool = False):
    """The PrimFunc ``prefill_gemm(x [M, K] f16, w [N, K] f16) -> y [M, N] out_dtype`` (M symbolic); ``tile``
    (BM, BN) overrides prefill_tile (BM in {64, 128}, BN in {64, 128}, BN dividing N); ``warps`` (WM, WN)
    the warp grid (default 2 x 4; 2 x 2 gives 64 x 64 warp tiles at 128 x 128: fewer ldmatrix per MMA,
    twice the accumulators a thread). ``bk``: K columns a pipeline step (32, or 64: four k-steps per barrier
    and wait instead of two; its stages exceed 48 KiB and go to dynamic shared memory). ``frag_pipeline``: the
    fragments of k-step kk + 1 are loaded (ldmatrix, into the other of two register sets) before k-step kk's
    MMAs are issued, so the shared-memory latency hides behind the tensor cores within a step."""
    if bk not in PF_BKS:
        raise ValueError(f"prefill_gemm_func: bk must be one of {PF_BKS}, got {bk!r}")
    if not prefill_gemm_supported(n, k, "float16", bk):
        raise ValueError(f"prefill_gemm_func: N={n}, K={k} not supported (N % 64, K % {bk} must be 0)")
    bm, bn = tile or prefill_tile(n)
    if bm not in (64, 128) or bn not in (64, 128) or n % bn:
        raise ValueError(f"prefill_gemm_func: tile {(bm, bn)} for N={n}: BM, BN must be 64 or 128, BN dividing N")
    wgm, wgn = warps or (PF_WARPS_M, PF_WARPS_N)
    if (wgm, wgn) not in ((2, 4), (2, 2), (4, 2)) or bm // wgm < 32 or bn // wgn < 16:
        raise ValueError(f"prefill_gemm_func: warps {(wgm, wgn)} for tile {(bm, bn)}: (2, 4), (2, 2) or (4, 2), "
                         f"warp tiles at least 32 x 16")
    if stages < 2:
        raise ValueError(f"prefill_gemm_func: stages must be >= 2 (a ring of cp.async steps), got {stages}")
    threads = 32 * wgm * wgn
    mi_n = bm // (16 * wgm)                # m16 tiles a warp
    ni_n = bn // (8 * wgn)                 # n8 tiles a warp
    wm, wn = bm // wgm, bn // wgn
    a_copies = bm * bk // 8 // threads     # 16-byte copies a thread per step
    b_copies = bn * bk // 8 // threads
    ksteps = bk // 16                      # m16n8k16 k-steps a pipeline step
    ktiles = k // bk
    a_tile, b_tile = bm * bk, bn * bk
    smem = "shared.dyn" if prefill_smem_bytes((bm, bn), stages, bk) > PF_STATIC_SMEM else "shared"
    nbuf = 2 if frag_pipeline else 1       # fragment register sets
    a_set, b_set = mi_n * 8, ni_n * 4      # halves of one set

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def prefill_gemm(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int32()
        X = T.match_buffer(var_x, (M, k), "float16")
        W = T.match_buffer(var_w, (n, k), "float16")
        Y = T.match_buffer(var_y, (M, n), out_dtype)
        # row tiles fastest: the blocks resident together share W tiles (read from HBM about once) and
        # walk x, the smaller operand at prompt lengths up to several thousand, through L2
        for bx in T.thread_binding(n // bn, thread="blockIdx.y"):
            for by in T.thread_binding((M + bm - 1) // bm, thread="blockIdx.x"):
                for ty in T.thread_binding(wgm * wgn, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("gemm"):
                            A_s = T.sblock_alloc_buffer((stages * a_tile,), "float16", scope=smem)
                            B_s = T.sblock_alloc_buffer((stages * b_tile,), "float16", scope=smem)
                            a_frag = T.sblock_alloc_buffer((nbuf * a_set,), "float16", scope="local")
                            b_frag = T.sblock_alloc_buffer((nbuf * b_set,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((mi_n * ni_n * 4,), "float32", scope="local")
                            tid: T.let[T.int32] = ty * 32 + tx
                            m0: T.let[T.int32] = by * bm
                            n0: T.let[T.int32] = bx * bn
                            g: T.let[T.int32] = tx // 4
                            t: T.let[T.int32] = tx % 4
                            warp_m: T.let[T.int32] = ty // wgn
                            warp_n: T.let[T.int32] = ty % wgn
                            for i in T.unroll(mi_n * ni_n * 4):
                                acc[i] = T.float32(0)
                            # prologue: steps 0 .. stages - 2 in flight
                            for s in T.unroll(stages - 1):
                                if s < ktiles:
                                    for c in T.unroll(a_copies):
                                        T.evaluate(T.ptx["cp.async.cg.shared.global"](
                                            T.address_of(A_s[s * a_tile + prefill_swizzle(prefill_copy_row(c, tid, threads, bk),
                                                                                     prefill_copy_chunk(c, tid, threads, bk), bk)]),
                                            T.address_of(X[T.min(m0 + prefill_copy_row(c, tid, threads, bk), M - 1),
                                                           s * bk + prefill_copy_chunk(c, tid, threads, bk) * 8]),
                                            16, T.Cast("uint32", T.if_then_else(
                                                m0 + prefill_copy_row(c, tid, threads, bk) < M, 16, 0))))
                                    for c in T.unroll(b_copies):
                                        T.evaluate(T.ptx["cp.async.cg.shared.global"](
                                            T.address_of(B_s[s * b_tile + prefill_swizzle(prefill_copy_row(c, tid, threads, bk),
                                                                                     prefill_copy_chunk(c, tid, threads, bk), bk)]),
                                            T.address_of(W[n0 + prefill_copy_row(c, tid, threads, bk),
                                                           s * bk + prefill_copy_chunk(c, tid, threads, bk) * 8]),
                                            16))
                                T.evaluate(T.ptx["cp.async.commit_group"]())
                            for kt in T.serial(ktiles):
                                T.evaluate(T.ptx["cp.async.wait_group"](stages - 2))
                                T.tvm_storage_sync("shared")
                                # refill the stage consumed at step kt - 1 (every warp is past it: the barrier)
                                if kt + stages - 1 < ktiles:
                                    for c in T.unroll(a_copies):
                                        T.evaluate(T.ptx["cp.async.cg.shared.global"](
                                            T.address_of(A_s[(kt + stages - 1) % stages * a_tile
                                                             + prefill_swizzle(prefill_copy_row(c, tid, threads, bk),
                                                                               prefill_copy_chunk(c, tid, threads, bk), bk)]),
                                            T.address_of(X[T.min(m0 + prefill_copy_row(c, tid, threads, bk), M - 1),
                                                           (kt + stages - 1) * bk + prefill_copy_chunk(c, tid, threads, bk) * 8]),
                                            16, T.Cast("uint32", T.if_then_else(
                                                m0 + prefill_copy_row(c, tid, threads, bk) < M, 16, 0))))
                                    for c in T.unroll(b_copies):
                                        T.evaluate(T.ptx["cp.async.cg.shared.global"](
                                            T.address_of(B_s[(kt + stages - 1) % stages * b_tile
                                                             + prefill_swizzle(prefill_copy_row(c, tid, threads, bk),
                                                                               prefill_copy_chunk(c, tid, threads, bk), bk)]),
                                            T.address_of(W[n0 + prefill_copy_row(c, tid, threads, bk),
                                                           (kt + stages - 1) * bk + prefill_copy_chunk(c, tid, threads, bk) * 8]),
                                            16))
                                T.evaluate(T.ptx["cp.async.commit_group"]())
                                # k-step kk's fragments: register set kk % nbuf; with frag_pipeline the loads of
                                # kk + 1 are issued before kk's MMAs (set 0 of k-step 0 first)
                                for j in T.unroll(ksteps + nbuf - 1):
                                    if j < ksteps:
                                        for mi in T.unroll(mi_n):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", a_frag.access_ptr("w"), j % nbuf * a_set + mi * 8,
                                                A_s.access_ptr("r"),
                                                kt % stages * a_tile + prefill_a_offset(tx, mi, j, warp_m, wm, bk),
                                                dtype="float16"))
                                        for nj in T.unroll(ni_n // 2):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", b_frag.access_ptr("w"), j % nbuf * b_set + nj * 8,
                                                B_s.access_ptr("r"),
                                                kt % stages * b_tile + prefill_b_offset(tx, nj, j, warp_n, wn, bk),
                                                dtype="float16"))
                                    if j >= nbuf - 1:
                                        for mi in T.unroll(mi_n):
                                            for ni in T.unroll(ni_n):
                                                T.evaluate(T.ptx_legacy.mma(
                                                    "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                    a_frag.access_ptr("r"), (j - nbuf + 1) % nbuf * a_set + mi * 8,
                                                    b_frag.access_ptr("r"), (j - nbuf + 1) % nbuf * b_set + ni * 4,
                                                    acc.access_ptr("rw"), (mi * ni_n + ni) * 4, False, dtype="float32"))
                            T.evaluate(T.ptx["cp.async.wait_group"](0))
                            for mi in T.unroll(mi_n):
                                for h in T.unroll(2):
                                    if m0 + warp_m * wm + mi * 16 + h * 8 + g < M:
                                        for ni in T.unroll(ni_n):
                                            for v in T.vectorized(2):
                                                Y[m0 + warp_m * wm + mi * 16 + h * 8 + g,
                                                  n0 + warp_n * wn + ni * 8 + 2 * t + v] = T.Cast(
                                                    out_dtype, acc[(mi * ni_n + ni) * 4 + h * 2 + v])
    # fmt: on
    return prefill_gemm
