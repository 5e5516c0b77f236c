"""The large-M (prefill) tensor-core GEMM (cuda_gemm.prefill_gemm_func) without a GPU: the generated CUDA of a
linear over a prompt's symbolic rows (cp.async ring, ldmatrix, mma.sync), and its numerics emulated in numpy
from the kernel's own index maps (cuda_gemm.prefill_copy_row / _chunk, prefill_swizzle, prefill_a_offset,
prefill_b_offset: the same Python functions the TIR is built from) and the PTX semantics of cp.async's
zero fill, ldmatrix.x4 and mma.m16n8k16 -- a swizzle applied on one side only, a wrong lane map or fragment
order, a stage of the ring read before it was filled, or a missing row guard fails here -- and the PrimFunc
itself run lane by lane in the SIMT interpreter (cp.async landing at its wait_group). Speed and the
kernel's numerics on a GPU: bench/prefill_gemm_check.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from llmasos.backends.tvm import resolve_target
from llmasos.backends.tvm.build import compile_module, cuda_source
from llmasos.backends.tvm.cuda_gemm import (PF_BK, PF_WARPS_M, PF_WARPS_N, prefill_a_offset, prefill_b_offset,
                                            prefill_copy_chunk, prefill_copy_row, prefill_gemm_func,
                                            prefill_gemm_supported, prefill_swizzle, prefill_tile)
from llmasos.backends.tvm.lower import lower
from llmasos.ir import DType, Graph, TensorType, sym

SPEC = dataclasses.replace(resolve_target("cuda:sm_90a"), extra={"prefill_gemm": "on"})
needs_cuda = pytest.mark.skipif(tvm.get_global_func("target.build.cuda", allow_missing=True) is None,
                                reason="this TVM build has no CUDA code generator")


def _ldmatrix_x4(smem, addr):
    """ldmatrix.sync.aligned.m8n8.x4.b16 (no transpose): lane l gives the address of row l % 8 of matrix
    l // 8; register j of lane l holds row l // 4 of matrix j, halves 2 (l % 4) and 2 (l % 4) + 1.
    smem: f16 [*]; addr: int [32] element offsets -> [32, 8] halves (registers 0..3, two halves each)."""
    lane = np.arange(32)
    out = np.empty((32, 8), np.float16)
    for j in range(4):
        base = addr[8 * j + lane // 4] + 2 * (lane % 4)
        out[:, 2 * j] = smem[base]
        out[:, 2 * j + 1] = smem[base + 1]
    return out


def _mma_16816(a, b, acc):
    """mma.sync.m16n8k16.row.col f32 += f16 x f16 over the fragments of 32 lanes (g = l // 4, t = l % 4):
    A a0a1 (g, 2t..), a2a3 (g + 8, 2t..), a4a5 (g, 2t + 8..), a6a7 (g + 8, 2t + 8..); B b0b1 (k 2t.., col g),
    b2b3 (k 2t + 8.., col g); C c0c1 (g, 2t..), c2c3 (g + 8, 2t..). a [32, 8], b [32, 4], acc [32, 4] f32."""
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    for e in range(2):
        A[g, 2 * t + e] = a[:, e]
        A[g + 8, 2 * t + e] = a[:, 2 + e]
        A[g, 2 * t + 8 + e] = a[:, 4 + e]
        A[g + 8, 2 * t + 8 + e] = a[:, 6 + e]
        B[2 * t + e, g] = b[:, e]
        B[2 * t + 8 + e, g] = b[:, 2 + e]
    D = A @ B
    for e in range(2):
        acc[:, e] += D[g, 2 * t + e]
        acc[:, 2 + e] += D[g + 8, 2 * t + e]


def _emulate(x, w, tile, stages, warps=(PF_WARPS_M, PF_WARPS_N)):
    """y [M, N] as prefill_gemm_func computes it: per block, the cp.async copies of each step into its ring
    stage (rows past M zero-filled), then per warp and k-step the ldmatrix.x4 loads and MMAs, then the
    guarded f16 stores. Unwritten outputs stay NaN."""
    M, K = x.shape
    N = w.shape[0]
    bm, bn = tile
    wgm, wgn = warps
    THREADS = 32 * wgm * wgn
    mi_n, ni_n = bm // (16 * wgm), bn // (8 * wgn)
    wm, wn = bm // wgm, bn // wgn
    a_tile, b_tile = bm * PF_BK, bn * PF_BK
    ktiles = K // PF_BK
    tid = np.arange(THREADS)
    lane = np.arange(32)
    y = np.full((M, N), np.nan, np.float16)
    for by in range(-(-M // bm)):
        for bx in range(N // bn):
            m0, n0 = by * bm, bx * bn
            A_s = np.full(stages * a_tile, np.nan, np.float16)   # NaN: a stage read before it is filled shows
            B_s = np.full(stages * b_tile, np.nan, np.float16)

            def load(kt):
                st = kt % stages
                for c in range(bm * PF_BK // 8 // THREADS):
                    r, ch = prefill_copy_row(c, tid, THREADS), prefill_copy_chunk(c, tid, THREADS)
                    src = x[np.minimum(m0 + r, M - 1)[:, None], kt * PF_BK + ch[:, None] * 8 + np.arange(8)]
                    src = np.where((m0 + r < M)[:, None], src, np.float16(0))     # src-size 0: zero fill
                    A_s[st * a_tile + prefill_swizzle(r, ch)[:, None] + np.arange(8)] = src
                for c in range(bn * PF_BK // 8 // THREADS):
                    r, ch = prefill_copy_row(c, tid, THREADS), prefill_copy_chunk(c, tid, THREADS)
                    B_s[st * b_tile + prefill_swizzle(r, ch)[:, None] + np.arange(8)] = \
                        w[(n0 + r)[:, None], kt * PF_BK + ch[:, None] * 8 + np.arange(8)]

            acc = np.zeros((wgm * wgn, mi_n * ni_n, 32, 4), np.float32)
            for s in range(min(stages - 1, ktiles)):
                load(s)
            for kt in range(ktiles):
                if kt + stages - 1 < ktiles:
                    load(kt + stages - 1)
                st = kt % stages
                for ty in range(wgm * wgn):
                    warp_m, warp_n = ty // wgn, ty % wgn
                    for kk in range(2):
                        a = [_ldmatrix_x4(A_s, st * a_tile + prefill_a_offset(lane, mi, kk, warp_m, wm))
                             for mi in range(mi_n)]
                        b = [_ldmatrix_x4(B_s, st * b_tile + prefill_b_offset(lane, nj, kk, warp_n, wn))
                             for nj in range(ni_n // 2)]
                        for mi in range(mi_n):
                            for ni in range(ni_n):
                                _mma_16816(a[mi], b[ni // 2][:, 4 * (ni % 2):4 * (ni % 2) + 4],
                                           acc[ty, mi * ni_n + ni])
            g, t = lane // 4, lane % 4
            for ty in range(wgm * wgn):
                warp_m, warp_n = ty // wgn, ty % wgn
                for mi in range(mi_n):
                    for h in range(2):
                        row = m0 + warp_m * wm + mi * 16 + h * 8 + g
                        ok = row < M
                        for ni in range(ni_n):
                            for v in range(2):
                                col = n0 + warp_n * wn + ni * 8 + 2 * t + v
                                y[row[ok], col[ok]] = acc[ty, mi * ni_n + ni][ok, h * 2 + v].astype(np.float16)
    return y


def test_swizzle_makes_every_ldmatrix_phase_conflict_free_and_is_a_permutation():
    """The 8 addresses of one ldmatrix phase (lanes 8j..8j+7) fall in 8 distinct 16-byte slots of the
    128-byte bank line; each row's 4 chunks land on 4 distinct chunks."""
    rows = np.arange(128)[:, None]
    off = prefill_swizzle(rows, np.arange(4)[None, :])                 # [row, chunk]
    assert (np.sort(off - rows * PF_BK, axis=1) == np.arange(4) * 8).all()
    lane = np.arange(32)
    for kk in range(2):
        for mi in range(4):
            for warp_m in range(2):
                addr = prefill_a_offset(lane, mi, kk, warp_m, 64) * 2          # bytes
                for j in range(4):
                    assert len(set(addr[8 * j:8 * j + 8] // 16 % 8)) == 8
        for nj in range(2):
            for warp_n in range(4):
                addr = prefill_b_offset(lane, nj, kk, warp_n, 32) * 2
                for j in range(4):
                    assert len(set(addr[8 * j:8 * j + 8] // 16 % 8)) == 8


@pytest.mark.parametrize("m,n,k,tile,stages,warps", [(72, 128, 96, (128, 128), 3, (2, 4)),
                                                     (200, 192, 64, (128, 64), 3, (2, 4)),
                                                     (40, 64, 160, (64, 64), 2, (2, 4)),
                                                     (130, 128, 32, (128, 128), 4, (2, 4)),
                                                     (100, 256, 96, (128, 128), 3, (2, 2)),
                                                     (70, 128, 64, (128, 64), 3, (4, 2))])
def test_emulated_kernel_computes_the_gemm(m, n, k, tile, stages, warps):
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    y = _emulate(x, w, tile, stages, warps)
    assert not np.isnan(y).any()                       # every output written once the row exists
    ref = x.astype(np.float32) @ w.astype(np.float32).T
    err = np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max()
    assert err < 2e-3, err                             # f32 accumulation, one f16 rounding of the output


def test_bk64_swizzle_is_a_conflict_free_permutation_of_128_byte_rows():
    """BK = 64: a tile row is one 128-byte bank line of 8 chunks, chunk c stored at c ^ (row % 8); the 8 rows of
    an ldmatrix phase (one chunk) hit 8 distinct 16-byte slots, and the copies of a step cover every slot once."""
    rows = np.arange(128)[:, None]
    off = prefill_swizzle(rows, np.arange(8)[None, :], 64)
    assert (np.sort(off - rows * 64, axis=1) == np.arange(8) * 8).all()
    lane = np.arange(32)
    for kk in range(4):
        for mi in range(4):
            addr = prefill_a_offset(lane, mi, kk, 1, 64, 64) * 2
            assert all(len(set(addr[8 * j:8 * j + 8] // 16 % 8)) == 8 for j in range(4))
        for nj in range(2):
            addr = prefill_b_offset(lane, nj, kk, 3, 32, 64) * 2
            assert all(len(set(addr[8 * j:8 * j + 8] // 16 % 8)) == 8 for j in range(4))
    tid = np.arange(256)
    cells = {(int(r), int(c)) for cc in range(4) for r, c in zip(prefill_copy_row(cc, tid, 256, 64),
                                                                   prefill_copy_chunk(cc, tid, 256, 64))}
    assert cells == {(r, c) for r in range(128) for c in range(8)}


def test_supported_shapes_and_tiles():
    assert prefill_gemm_supported(2048, 2048, "float16") and prefill_gemm_supported(32000, 2048, "float16")
    assert not prefill_gemm_supported(2048, 2048, "float32") and not prefill_gemm_supported(100, 2048, "float16")
    assert not prefill_gemm_supported(2048, 2000, "float16")
    assert prefill_tile(2048) == (128, 128) and prefill_tile(512) == (128, 64) and prefill_tile(1088) == (128, 64)
    with pytest.raises(ValueError, match="N=100, K=2048 not supported"):
        prefill_gemm_func(100, 2048)
    with pytest.raises(ValueError, match=r"tile \(128, 96\)"):
        prefill_gemm_func(2048, 2048, tile=(128, 96))
    with pytest.raises(ValueError, match=r"warps \(4, 4\)"):
        prefill_gemm_func(2048, 2048, warps=(4, 4))
    assert prefill_gemm_supported(2048, 2048, "float16", 64) and not prefill_gemm_supported(2048, 96, "float16", 64)
    with pytest.raises(ValueError, match="bk must be one of"):
        prefill_gemm_func(2048, 2048, bk=48)
    with pytest.raises(ValueError, match=r"K % 64 must be 0"):
        prefill_gemm_func(2048, 96, bk=64)
    with pytest.raises(ValueError, match="stages must be >= 2"):
        prefill_gemm_func(2048, 2048, stages=1)


def _graph(n, k, lead):
    g = Graph("g")
    for name in {str(d) for d in lead if not isinstance(d, int)}:
        g.add_symbol(name, 1, 512)
    x = g.add_input("x", TensorType((*lead, k), DType.f16))
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float16)
    g.set_outputs([g.add_node("linear", [x, g.add_param("w", w)])])
    return g


def _kernels(g, spec=SPEC):
    return {gv.name_hint for gv in lower(g, spec).functions}


@needs_cuda
def test_prefill_linear_runs_the_cp_async_mma_kernel():
    """x [1, seq, K] / [batch, seq, K] (a prompt) takes the kernel; a decode step's [batch, 1, K] does not
    (small_m_gemm's); prefill_gemm = "off" or an unsupported K keeps the generic lowering (on: the default)."""
    src = cuda_source(compile_module(lower(_graph(256, 256, (1, sym("seq"))), SPEC), SPEC))
    assert "prefill_gemm" in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
    assert "cp.async.cg.shared.global" in src and "cp.async.wait_group 1" in src and "cp.async.commit_group" in src
    assert "prefill_gemm_256x256" in _kernels(_graph(256, 256, (sym("batch"), sym("seq"))))
    assert not any("prefill" in f for f in _kernels(_graph(256, 256, (sym("batch"), 1))))
    assert not any("prefill" in f for f in _kernels(_graph(256, 250, (1, sym("seq")))))
    off = dataclasses.replace(SPEC, extra={"prefill_gemm": "off"})
    assert not any("prefill" in f for f in _kernels(_graph(256, 256, (1, sym("seq"))), off))
    default = dataclasses.replace(SPEC, extra={})
    assert any("prefill_gemm" in f for f in _kernels(_graph(256, 256, (1, sym("seq"))), default))
    bad = dataclasses.replace(SPEC, extra={"prefill_gemm": "yes"})
    with pytest.raises(ValueError, match=r"prefill_gemm must be 'on' or 'off', got 'yes'"):
        lower(_graph(256, 256, (1, sym("seq"))), bad)
    w2x4 = dataclasses.replace(SPEC, extra={"prefill_gemm": "on", "prefill_gemm_warps": "2x4"})
    assert "prefill_gemm_256x256_w2x4" in _kernels(_graph(256, 256, (1, sym("seq"))), w2x4)
    bad = dataclasses.replace(SPEC, extra={"prefill_gemm": "on", "prefill_gemm_warps": "4x4"})
    with pytest.raises(ValueError, match=r"prefill_gemm_warps must be '2x4' or '2x2', got '4x4'"):
        lower(_graph(256, 256, (1, sym("seq"))), bad)
    k64 = dataclasses.replace(SPEC, extra={"prefill_gemm_bk": "64", "prefill_gemm_stages": "4", "prefill_gemm_frags": "on"})
    assert "prefill_gemm_256x256_k64_s4_f" in _kernels(_graph(256, 256, (1, sym("seq"))), k64)
    assert "prefill_gemm_256x288_s4_f" in _kernels(_graph(256, 288, (1, sym("seq"))), k64)  # K % 64 != 0: BK 32
    src = cuda_source(compile_module(lower(_graph(256, 256, (1, sym("seq"))), k64), k64))
    assert "buf_dyn_shmem" in src and "cp.async.wait_group 2" in src   # 4 x (128 + 128) x 64 halves: dynamic
    for key, value in (("prefill_gemm_bk", "48"), ("prefill_gemm_stages", "5"), ("prefill_gemm_frags", "yes")):
        bad = dataclasses.replace(SPEC, extra={key: value})
        with pytest.raises(ValueError, match=f"{key} must be one of .*, got '{value}'"):
            lower(_graph(256, 256, (1, sym("seq"))), bad)


@pytest.mark.parametrize("m, n, k, tile, warps, extra", [
    (70, 64, 64, None, None, {}),                                       # one ragged row tile
    (130, 128, 160, (128, 64), None, {}),                               # 5 k-steps: the ring wraps
    (40, 128, 96, (64, 128), (2, 2), {}),
    (130, 128, 320, (128, 64), None, {"bk": 64}),                       # BK 64: 5 steps, dynamic shared memory
    (70, 128, 96, (128, 128), None, {"frag_pipeline": True}),           # k-step kk + 1 loaded before kk's MMAs
    (40, 128, 256, (64, 64), (2, 2), {"bk": 64, "stages": 4, "frag_pipeline": True}),
    (33, 64, 128, (64, 64), (2, 2), {"bk": 64, "stages": 2, "frag_pipeline": True})])
def test_the_kernel_itself_in_the_simt_interpreter(m, n, k, tile, warps, extra):
    """The PrimFunc itself, lane by lane (llmasos.backends.tvm.simt: cp.async copies land only at the
    wait_group that covers them, ldmatrix and mma by the ISA's fragment layouts, barriers and races
    checked), against f64 x @ w.T rounded once to f16."""
    from llmasos.backends.tvm import simt
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    y = np.full((m, n), np.nan, np.float16)
    simt.run(prefill_gemm_func(n, k, tile=tile, warps=warps, **extra), x, w, y)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-3, atol=2e-3)
