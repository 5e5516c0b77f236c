"""llmasos.backends.tvm.simt, the lock-step SIMT interpreter that checks the hand-written CUDA kernels'
numerics on the CPU: its mma.sync m16n8k16 fragment layout and half2 / bit instructions against numpy, a
wrong layout caught, and its errors."""
from __future__ import annotations

import numpy as np
import pytest
from tvm.script import tirx as T

from llmasos.backends.tvm import simt


def _mma_tile(a_pos, b_pos):
    """One warp: D [16, 8] = A [16, 16] @ B [16, 8], lane (g, t) loading A element a_pos(i) and B element
    b_pos(i) into fragment register i (the functions give (row, col) from g, t, i)."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def tile(A: T.Buffer((16, 16), "float16"), B: T.Buffer((16, 8), "float16"), D: T.Buffer((16, 8), "float32")):
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("mma"):
                a = T.sblock_alloc_buffer((8,), "float16", scope="local")
                b = T.sblock_alloc_buffer((4,), "float16", scope="local")
                c = T.sblock_alloc_buffer((4,), "float32", scope="local")
                g: T.let[T.int32] = tx // 4
                t: T.let[T.int32] = tx % 4
                for i in T.unroll(8):
                    a[i] = A[a_pos(g, t, i)[0], a_pos(g, t, i)[1]]
                for i in T.unroll(4):
                    b[i] = B[b_pos(g, t, i)[0], b_pos(g, t, i)[1]]
                for i in T.unroll(4):
                    c[i] = T.float32(1)
                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", a.data, 0, b.data, 0,
                                            c.data, 0, False, dtype="float32"))
                for i in T.unroll(4):
                    D[g + 8 * (i // 2), 2 * t + i % 2] = c[i]
    # fmt: on
    return tile


def _ptx_a(g, t, i):   # the PTX ISA's A fragment of m16n8k16 (f16): a0..a7
    return g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4)


def _ptx_b(g, t, i):   # B fragment: b0..b3 = (k 2t, 2t+1, 2t+8, 2t+9; column g)
    return 2 * t + i % 2 + 8 * (i // 2), g


def _operands():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((16, 16)).astype(np.float16), rng.standard_normal((16, 8)).astype(np.float16))


def test_mma_follows_the_ptx_fragment_layout():
    a, b = _operands()
    d = np.zeros((16, 8), np.float32)
    simt.run(_mma_tile(_ptx_a, _ptx_b), a, b, d)
    np.testing.assert_allclose(d, a.astype(np.float32) @ b.astype(np.float32) + 1, rtol=1e-5, atol=1e-5)


def test_a_kernel_with_a_wrong_fragment_layout_computes_a_wrong_product():
    """Rows g and g + 8 swapped in A's registers (a classic slip): the interpreter must not hide it."""
    a, b = _operands()
    d = np.zeros((16, 8), np.float32)
    swapped = lambda g, t, i: _ptx_a(g, t, i ^ 2)  # noqa: E731
    simt.run(_mma_tile(swapped, _ptx_b), a, b, d)
    assert np.abs(d - (a.astype(np.float32) @ b.astype(np.float32) + 1)).max() > 0.5


# fmt: off
@T.prim_func(private=True, s_tir=True)
def _half2(U: T.Buffer((32, 4), "uint32"), O: T.Buffer((32, 4), "uint32")):
    for tx in T.thread_binding(32, thread="threadIdx.x"):
        with T.sblock("h"):
            h = T.sblock_alloc_buffer((4,), "uint32", scope="local")
            T.ptx.lop3.b32(h[0], U[tx, 0], T.uint32(0x000F000F), T.uint32(0x64006400), 0xEA)
            T.ptx.sub.f16x2(h[1], h[0], T.uint32(0x64006400))
            T.ptx.fma.rn.f16x2(h[2], h[1], U[tx, 1], U[tx, 2])
            T.ptx.prmt.b32(h[3], U[tx, 3], U[tx, 0], T.uint32(0x7351))
            for i in T.unroll(4):
                O[tx, i] = h[i]
# fmt: on


def test_half2_and_bit_instructions_follow_the_isa():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 2 ** 32, (32, 4), dtype=np.uint64).astype(np.uint32)
    u[:, 1:3] = rng.standard_normal((32, 2, 2)).astype(np.float16).view(np.uint32).reshape(32, 2)
    o = np.zeros((32, 4), np.uint32)
    simt.run(_half2, u, o)
    lop = (u[:, 0] & 0x000F000F) | 0x64006400
    assert (o[:, 0] == lop).all()
    codes = np.stack([u[:, 0] & 0xF, (u[:, 0] >> 16) & 0xF], 1).astype(np.float16)
    assert (o[:, 1:2].view(np.float16) == codes).all()                       # 1024 + c - 1024, exact
    s, zs = u[:, 1:2].view(np.float16), u[:, 2:3].view(np.float16)
    want = (codes.astype(np.float64) * s.astype(np.float64) + zs.astype(np.float64)).astype(np.float16)
    assert (o[:, 2:3].view(np.float16) == want).all()                        # one rounding
    src = np.concatenate([u[:, 3:4].view(np.uint8), u[:, 0:1].view(np.uint8)], 1)   # bytes 0-3 a, 4-7 b
    want = src[:, [1, 5, 3, 7]].copy().view(np.uint32)[:, 0]
    assert (o[:, 3] == want).all()


def test_errors_name_the_problem():
    a, b = _operands()
    with pytest.raises(ValueError, match="must have shape"):
        simt.run(_mma_tile(_ptx_a, _ptx_b), a[:8], b, np.zeros((16, 8), np.float32))
    with pytest.raises(TypeError, match="must be float32"):
        simt.run(_mma_tile(_ptx_a, _ptx_b), a, b, np.zeros((16, 8), np.float16))
    with pytest.raises(ValueError, match="takes 3 arguments"):
        simt.run(_mma_tile(_ptx_a, _ptx_b), a, b)
    with pytest.raises(IndexError, match="accesses A"):    # a lane reading past the end of A
        simt.run(_mma_tile(lambda g, t, i: (g + 16, 0), _ptx_b), a, b, np.zeros((16, 8), np.float32))


def _rotate(barrier: bool):
    """Each thread writes its value to shared memory and reads its neighbour's: correct only with a barrier."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def rotate(A: T.Buffer((64,), "float32"), B: T.Buffer((64,), "float32")):
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            with T.sblock("r"):
                sh = T.sblock_alloc_buffer((64,), "float32", scope="shared")
                sh[tx] = A[tx] * T.float32(2)
                if barrier:
                    T.tvm_storage_sync("shared")
                B[tx] = sh[(tx + 1) % 64]
    # fmt: on
    return rotate


def test_races_that_lock_step_would_hide_are_errors():
    a = np.arange(64, dtype=np.float32)
    b = np.zeros(64, np.float32)
    simt.run(_rotate(True), a, b)
    np.testing.assert_array_equal(b, np.roll(a, -1) * 2)
    with pytest.raises(RuntimeError, match="no barrier between"):
        simt.run(_rotate(False), a, np.zeros(64, np.float32))


def _rotate_twice(barrier: bool):
    """Read the neighbour's value, then overwrite the own slot: the second write may land before the
    neighbour's read on a GPU unless a barrier separates them (write after read)."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def rotate2(A: T.Buffer((64,), "float32"), B: T.Buffer((64,), "float32")):
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            with T.sblock("r"):
                sh = T.sblock_alloc_buffer((64,), "float32", scope="shared")
                acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                sh[tx] = A[tx]
                T.tvm_storage_sync("shared")
                acc[0] = sh[(tx + 1) % 64]
                if barrier:
                    T.tvm_storage_sync("shared")
                sh[tx] = acc[0] * T.float32(3)
                T.tvm_storage_sync("shared")
                B[tx] = sh[(tx + 1) % 64]
    # fmt: on
    return rotate2


def test_a_write_over_another_threads_read_needs_a_barrier():
    a = np.arange(64, dtype=np.float32)
    b = np.zeros(64, np.float32)
    simt.run(_rotate_twice(True), a, b)
    np.testing.assert_array_equal(b, np.roll(a, -2) * 3)
    with pytest.raises(RuntimeError, match="write-after-read race"):
        simt.run(_rotate_twice(False), a, np.zeros(64, np.float32))


def test_per_block_trip_counts_mask_threads_and_barriers():
    """A loop whose trip count is read per block (blockIdx.x + 1 rounds, a barrier in each): blocks leave at
    different rounds, each thread masked off past its own count."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def rounds(B: T.Buffer((4, 32), "float32")):
        for bx in T.thread_binding(4, thread="blockIdx.x"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("r"):
                    sh = T.sblock_alloc_buffer((32,), "float32", scope="shared")
                    acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    acc[0] = T.float32(0)
                    for i in T.serial(bx + 1):
                        sh[tx] = T.Cast("float32", i + tx)
                        T.tvm_storage_sync("shared")
                        acc[0] = acc[0] + sh[31 - tx]
                        T.tvm_storage_sync("shared")
                    B[bx, tx] = acc[0]
    # fmt: on
    b = np.zeros((4, 32), np.float32)
    simt.run(rounds, b)
    want = np.array([[sum(i + 31 - t for i in range(bx + 1)) for t in range(32)] for bx in range(4)], np.float32)
    np.testing.assert_array_equal(b, want)


def _ldmatrix_kernel(trans: bool):
    """One warp: a 32 x 8 f16 tile staged in shared memory, read back by ldmatrix.x4 (lane l addressing row
    l of the tile: row l % 8 of matrix l // 8), each lane's 8 fragment halves stored to F[l]."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def ld(A: T.Buffer((32, 8), "float16"), F: T.Buffer((32, 8), "float16")):
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("ld"):
                S = T.sblock_alloc_buffer((32 * 8,), "float16", scope="shared")
                f = T.sblock_alloc_buffer((8,), "float16", scope="local")
                for u in T.vectorized(8):
                    S[tx * 8 + u] = A[tx, u]
                T.tvm_storage_sync("shared")
                T.evaluate(T.ptx_legacy.ldmatrix(trans, 4, ".b16", f.data, 0, S.data, tx * 8, dtype="float16"))
                for u in T.unroll(8):
                    F[tx, u] = f[u]
    # fmt: on
    return ld


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_follows_the_ptx_fragment_layout(trans):
    """PTX ISA, ldmatrix .m8n8.x4.b16: lane l holds, of matrix i, row l // 4 columns 2 (l % 4) and 2 (l % 4) + 1;
    with .trans, rows 2 (l % 4) and 2 (l % 4) + 1 of column l // 4."""
    a = np.arange(32 * 8, dtype=np.float16).reshape(32, 8)
    f = np.zeros((32, 8), np.float16)
    simt.run(_ldmatrix_kernel(trans), a, f)
    want = np.zeros_like(f)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            m = a[8 * i:8 * i + 8]
            want[lane, 2 * i:2 * i + 2] = m[[2 * t, 2 * t + 1], g] if trans else m[g, [2 * t, 2 * t + 1]]
    np.testing.assert_array_equal(f, want)


def test_warp_shuffle_xor_reads_the_partner_lane():
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def shfl(A: T.Buffer((64,), "float32"), B: T.Buffer((64,), "float32")):
        for ty in T.thread_binding(2, thread="threadIdx.y"):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                with T.sblock("s"):
                    B[ty * 32 + tx] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), A[ty * 32 + tx], 5, 32, 32)
    # fmt: on
    a = np.arange(64, dtype=np.float32)
    b = np.zeros(64, np.float32)
    simt.run(shfl, a, b)
    np.testing.assert_array_equal(b, a[np.arange(64) ^ 5])


def _cp_async_kernel(wait: int, src_bytes: int):
    """One warp: thread l copies A[l * 8 .. l * 8 + 7] into shared by cp.async (16 bytes, src-size
    ``src_bytes``) in two committed groups (lanes' first and second halves of the copies), waits with
    wait_group ``wait``, then every lane reads its neighbour's row after a barrier."""
    # fmt: off
    @T.prim_func(private=True, s_tir=True)
    def cp(A: T.Buffer((512,), "float16"), B: T.Buffer((512,), "float16")):
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            with T.sblock("cp"):
                S = T.sblock_alloc_buffer((512,), "float16", scope="shared")
                T.evaluate(T.ptx["cp.async.cg.shared.global"](T.address_of(S[tx * 8]), T.address_of(A[tx * 8]),
                                                               16, T.uint32(src_bytes)))
                T.evaluate(T.ptx["cp.async.commit_group"]())
                T.evaluate(T.ptx["cp.async.cg.shared.global"](T.address_of(S[256 + tx * 8]),
                                                               T.address_of(A[256 + tx * 8]), 16))
                T.evaluate(T.ptx["cp.async.commit_group"]())
                T.evaluate(T.ptx["cp.async.wait_group"](wait))
                T.tvm_storage_sync("shared")
                for u in T.unroll(8):
                    B[tx * 8 + u] = S[(tx + 1) % 32 * 8 + u]
                for u in T.unroll(8):
                    B[256 + tx * 8 + u] = S[256 + (tx + 1) % 32 * 8 + u]
    # fmt: on
    return cp


def test_cp_async_lands_at_its_wait_and_zero_fills_past_src_size():
    a = np.arange(512, dtype=np.float16)
    b = np.zeros(512, np.float16)
    simt.run(_cp_async_kernel(0, 6), a, b)          # src-size 6 bytes: 3 halves copied, 5 zeros
    rows = a[:256].reshape(32, 8).copy()
    rows[:, 3:] = 0
    np.testing.assert_array_equal(b[:256].reshape(32, 8), np.roll(rows, -1, axis=0))
    np.testing.assert_array_equal(b[256:].reshape(32, 8), np.roll(a[256:].reshape(32, 8), -1, axis=0))
    with pytest.raises(RuntimeError, match="has not landed"):    # wait_group 1 leaves the second group in flight
        simt.run(_cp_async_kernel(1, 16), a, np.zeros(512, np.float16))
