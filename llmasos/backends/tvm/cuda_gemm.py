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

Grid: N / 16 blocks of ``warps`` warps (one 16-row tile of W per block) times ceil(M / 32) (a block covers
32 batch rows: four column tiles, the ones past M skipped warp-uniformly). The block's warps split K
(interleaved 32-wide chunks, so together they read 512 contiguous bytes of each row per step) and sum their
partial tiles through shared memory. Rows of x past M are read clamped to row M - 1 and their columns of y
are never written: an MMA column depends only on its own B column.
"""
from __future__ import annotations

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
    """Warps per block (the K split): more when N gives few blocks, to keep enough loads in flight."""
    return 8 if n <= 4096 else 4


def small_m_gemm_supported(n: int, k: int, dtype: str) -> bool:
    """Whether the kernel takes a [*, K] x [N, K] GEMM: f16, N a multiple of 16, K of 32 * warps * UNROLL."""
    return dtype == "float16" and n % TILE_N == 0 and k % (CHUNK * small_m_warps(n) * UNROLL) == 0


def small_m_gemm_func(n: int, k: int, out_dtype: str = "float16"):
    """The PrimFunc ``small_m_gemm(x [M, K] f16, w [N, K] f16) -> y [M, N] out_dtype`` (M symbolic)."""
    warps = small_m_warps(n)
    steps = k // (CHUNK * warps)          # K chunks per warp
    outer = steps // UNROLL
    per_thread = TILE_N * TILES * COLS // (warps * 32)  # outputs each thread sums and writes

    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def small_m_gemm(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int32()
        X = T.match_buffer(var_x, (M, k), "float16")
        W = T.match_buffer(var_w, (n, k), "float16")
        Y = T.match_buffer(var_y, (M, n), out_dtype)
        for bx in T.thread_binding(n // TILE_N, thread="blockIdx.x"):
            for by in T.thread_binding((M + COLS * TILES - 1) // (COLS * TILES), thread="blockIdx.y"):
                for ty in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("gemm"):
                            w_reg = T.sblock_alloc_buffer((16,), "float16", scope="local")
                            x_reg = T.sblock_alloc_buffer((TILES * 8,), "float16", scope="local")
                            a_frag = T.sblock_alloc_buffer((8,), "float16", scope="local")
                            b_frag = T.sblock_alloc_buffer((4,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((TILES * 4,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((warps, TILE_N, TILES * COLS), "float32", scope="shared")
                            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            g: T.let[T.int32] = tx // 4
                            t: T.let[T.int32] = tx % 4
                            m0: T.let[T.int32] = by * (COLS * TILES)
                            for i in T.unroll(TILES * 4):
                                acc[i] = T.float32(0)
                            for ko in T.serial(outer):
                                for ku in T.unroll(UNROLL):
                                    k0: T.let[T.int32] = ((ko * UNROLL + ku) * warps + ty) * CHUNK + 8 * t
                                    for v in T.vectorized(8):
                                        w_reg[v] = W[bx * TILE_N + g, k0 + v]
                                    for v in T.vectorized(8):
                                        w_reg[8 + v] = W[bx * TILE_N + g + 8, k0 + v]
                                    for c in T.unroll(TILES):
                                        if m0 + c * COLS < M:
                                            for v in T.vectorized(8):
                                                x_reg[c * 8 + v] = X[T.min(m0 + c * COLS + g, M - 1), k0 + v]
                                    for s in T.unroll(2):
                                        # A: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
                                        a_frag[0] = w_reg[4 * s]
                                        a_frag[1] = w_reg[4 * s + 1]
                                        a_frag[2] = w_reg[8 + 4 * s]
                                        a_frag[3] = w_reg[8 + 4 * s + 1]
                                        a_frag[4] = w_reg[4 * s + 2]
                                        a_frag[5] = w_reg[4 * s + 3]
                                        a_frag[6] = w_reg[8 + 4 * s + 2]
                                        a_frag[7] = w_reg[8 + 4 * s + 3]
                                        for c in T.unroll(TILES):
                                            if m0 + c * COLS < M:
                                                # B: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)
                                                for v in T.unroll(4):
                                                    b_frag[v] = x_reg[c * 8 + 4 * s + v]
                                                T.evaluate(T.ptx_legacy.mma(
                                                    "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                                    a_frag.data, 0, b_frag.data, 0, acc.data, c * 4, False,
                                                    dtype="float32"))
                            # C: (row g, col 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
                            for c in T.unroll(TILES):
                                red[ty, g, c * COLS + 2 * t] = acc[c * 4]
                                red[ty, g, c * COLS + 2 * t + 1] = acc[c * 4 + 1]
                                red[ty, g + 8, c * COLS + 2 * t] = acc[c * 4 + 2]
                                red[ty, g + 8, c * COLS + 2 * t + 1] = acc[c * 4 + 3]
                            T.tvm_storage_sync("shared")
                            for j in T.unroll(per_thread):
                                # output o = (column m, row r) with rows fastest: consecutive threads write
                                # consecutive n of one y row
                                o: T.let[T.int32] = (ty * 32 + tx) + j * (warps * 32)
                                r: T.let[T.int32] = o % TILE_N
                                col: T.let[T.int32] = o // TILE_N
                                if m0 + col < M:
                                    total[0] = T.float32(0)
                                    for w_ in T.unroll(warps):
                                        total[0] = total[0] + red[w_, r, col]
                                    Y[m0 + col, bx * TILE_N + r] = T.Cast(out_dtype, total[0])
    # fmt: on
    return small_m_gemm
