"""The flash-style CUDA prefill attention kernel (llmasos/backends/tvm/cuda_attention.py): its numerics in
the SIMT interpreter (no GPU) against f64 attention of the same operands, its hook into kv.attention's
lowering (target option flash_prefill) and the CUDA C it generates."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from llmasos.backends.tvm import compile_module, resolve_target, simt
from llmasos.backends.tvm.build import cuda_source
from llmasos.backends.tvm.cuda_attention import (paged_prefill_attention_mma_func, prefill_attention_func,
                                                 prefill_attention_mma_func, prefill_attention_mma_supported,
                                                 prefill_attention_plan, prefill_attention_supported)
from llmasos.backends.tvm.lower import lower
from tests.backends.cuda_codegen import needs_cuda_codegen
from llmasos.ir import DType, Graph, TensorType, sym


def reference(q, k, v, pos, scale):
    """f64 attention: query t of row b at position pos[b] + t sees cache rows 0 .. min(pos[b] + t, M - 1)."""
    b_, h, t_, _ = q.shape
    hkv, m = k.shape[1], k.shape[2]
    rep = h // hkv
    out = np.zeros(q.shape, np.float64)
    for b in range(b_):
        for hq in range(h):
            for t in range(t_):
                n = max(0, min(int(pos[b]) + t + 1, m))
                if n == 0:
                    continue
                s = k[b, hq // rep, :n].astype(np.float64) @ q[b, hq, t].astype(np.float64) * scale
                p = np.exp(s - s.max())
                out[b, hq, t] = (p / p.sum()) @ v[b, hq // rep, :n].astype(np.float64)
    return out


CASES = [  # (B, H, HKV, T, M, D, dtype, positions)
    (2, 4, 2, 21, 80, 32, "float16", (0, 50)),      # GQA, a prefix, ragged last block
    (1, 4, 4, 40, 64, 16, "float32", (0,)),         # MHA, several cache tiles (BK = 64 at D = 16)
    (2, 8, 1, 9, 140, 64, "float16", (3, 131)),     # MQA; row 1 runs past the cache's end (clamped to M)
    (3, 2, 2, 70, 96, 64, "float32", (0, 7, 26)),   # more queries than a block's rows, three tiles
    (2, 6, 2, 23, 96, 48, "float16", (5, -9)),      # rep 3 (does not divide a block's rows); a negative
    #                                                 position: its first queries see nothing (zeros)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}t{c[3]}m{c[4]}d{c[5]}{c[6][5:]}")
def test_kernel_matches_attention_in_the_simt_interpreter(case):
    b, h, hkv, t, m, d, dt, positions = case
    rng = np.random.default_rng(sum(case[:6]))
    q = rng.standard_normal((b, h, t, d)).astype(dt)
    k = (rng.standard_normal((b, hkv, m, d)) * 2).astype(dt)
    v = rng.standard_normal((b, hkv, m, d)).astype(dt)
    pos = np.array(positions, np.int32)
    out = np.full((b, h, t, d), np.nan, dt)
    scale = d ** -0.5
    simt.run(prefill_attention_func(h, hkv, m, d, dt, "int32", scale), q, k, v, pos, out)
    assert np.isfinite(out).all(), "every query row must be written"
    ref = reference(q, k, v, pos, scale)
    tol = 2e-3 if dt == "float16" else 2e-6
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["cuda_cores", "mma"])
def test_positions_past_the_query_weigh_nothing(kernel):
    """Cache rows after a query's position hold huge values: any leak would swamp the output; non-finite
    values in rows no query sees (a reused slot) must not reach it either (0 * nan). The CUDA-core kernel in
    f32, the tensor-core one in f16 (its V rows past the query at 1e4: f16 has no 1e6)."""
    mma = kernel == "mma"
    dt, m, big, tol = (np.float16, 96, 1e4, 3e-3) if mma else (np.float32, 64, 1e6, 1e-5)
    b, h, hkv, t, d = 1, 2, 1, 12, 16
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, h, t, d)).astype(dt)
    k = rng.standard_normal((b, hkv, m, d)).astype(dt)
    v = rng.standard_normal((b, hkv, m, d)).astype(dt)
    k[:, :, 5 + t:] = 50.0
    v[:, :, 5 + t:] = big
    k[:, :, 5 + t + 3:] = np.inf      # stale non-finite values in the tile past the last query: never read
    v[:, :, 5 + t + 3:] = np.nan
    pos = np.array([5], np.int32)
    out = np.zeros((b, h, t, d), dt)
    func = (prefill_attention_mma_func(h, hkv, m, d, "int32", 0.25) if mma
            else prefill_attention_func(h, hkv, m, d, "float32", "int32", 0.25))
    simt.run(func, q, k, v, pos, out)
    np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, pos, 0.25), atol=tol, rtol=tol)
    assert np.abs(out).max() < 10


def test_supported_layouts():
    assert prefill_attention_supported(32, 8, 1152, 64, "float16")
    assert prefill_attention_supported(9, 3, 256, 64, "float32")            # SmolLM2
    assert not prefill_attention_supported(32, 8, 1152, 128, "float16")     # would spill: generic path
    assert not prefill_attention_supported(6, 4, 64, 64, "float16")         # heads not a multiple of kv heads
    assert not prefill_attention_supported(4, 2, 64, 24, "float16")         # D not a multiple of 16
    assert not prefill_attention_supported(4, 2, 64, 64, "bfloat16")
    with pytest.raises(ValueError, match="unsupported layout"):
        prefill_attention_func(4, 2, 64, 128, "float16", "int32", 0.1)
    for d in (16, 32, 48, 64):
        p = prefill_attention_plan(d, "float16")
        assert p["threads"] <= 1024 and 2 * p["bk"] * p["stride"] * 4 + p["bq"] * 4 * 2 * 4 <= 48 * 1024


def step_graph(dt: DType, t=None) -> Graph:
    """kv.attention over a cache (H 4, Hkv 2, M 32, D 16), T symbolic (a prompt) or a given count."""
    g = Graph("step")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 32)
    t = sym("seq") if t is None else t
    q = g.add_input("q", TensorType((sym("batch"), 4, t, 16), dt))
    kc = g.add_input("k_cache", TensorType((sym("batch"), 2, 32, 16), dt))
    vc = g.add_input("v_cache", TensorType((sym("batch"), 2, 32, 16), dt))
    pos = g.add_input("pos", TensorType((sym("batch"),), DType.i32))
    g.set_outputs([g.add_node("kv.attention", [q, kc, vc, pos], {"scale": 0.25}, name="attn")])
    return g


def _spec(**extra):
    spec = resolve_target("cuda:sm_90a")
    return dataclasses.replace(spec, extra={**spec.extra, **extra})


def _prims(mod):
    return {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_lowering_uses_the_kernel_unless_switched_off():
    g = step_graph(DType.f16)
    assert "kv_prefill_attention" in _prims(lower(g, _spec(flash_prefill="on")))
    assert "kv_prefill_attention_mma_w4s1" in _prims(lower(g, _spec()))   # the default: tensor cores (f16, sm_90a)
    assert "kv_prefill_attention_mma_w4s1" not in _prims(lower(g, _spec(flash_prefill="on")))
    mma = _prims(lower(g, _spec(flash_prefill="mma")))            # f16 on sm_90a: the tensor-core kernel
    assert "kv_prefill_attention_mma_w4s1" in mma and "kv_prefill_attention" not in mma
    w8 = _prims(lower(g, _spec(flash_prefill="mma", flash_prefill_warps="8", flash_prefill_stages="2")))
    assert "kv_prefill_attention" in w8          # D = 16 with 8 warps: not whole copies -- the CUDA-core kernel
    g64 = Graph("step64")
    g64.add_symbol("seq", 1, 32)
    ins = [g64.add_input(n, TensorType((1, h, t, 64), DType.f16)) for n, h, t in
           (("q", 4, sym("seq")), ("k_cache", 2, 32), ("v_cache", 2, 32))]
    ins.append(g64.add_input("pos", TensorType((1,), DType.i32)))
    g64.set_outputs([g64.add_node("kv.attention", ins, {"scale": 0.125}, name="attn")])
    assert "kv_prefill_attention_mma_w8s2" in _prims(lower(g64, _spec(flash_prefill="mma", flash_prefill_warps="8",
                                                                      flash_prefill_stages="2")))
    with pytest.raises(ValueError, match="flash_prefill_stages must be 1 or 2"):
        lower(g, _spec(flash_prefill="mma", flash_prefill_stages="3"))
    assert "kv_prefill_attention" in _prims(lower(step_graph(DType.f32), _spec(flash_prefill="mma")))  # f32
    sm75 = dataclasses.replace(resolve_target("cuda:sm_75"), extra={"flash_prefill": "mma"})
    assert "kv_prefill_attention" in _prims(lower(g, sm75))                              # no m16n8k16 before sm_80
    off = _prims(lower(g, _spec(flash_prefill="off")))             # the generic three kernels
    assert not any("prefill_attention" in n for n in off) and any("kv_qk_masked" in n for n in off)
    decode = _prims(lower(step_graph(DType.f16, t=1), _spec(flash_prefill="mma")))
    assert "kv_decode_attention" in decode and not any("prefill_attention" in n for n in decode)
    assert resolve_target("cpu").kv_prefill_attention(4, 2, 16, 8, "float32", "int32", 0.3) is None
    with pytest.raises(ValueError, match="flash_prefill must be 'on', 'mma' or 'off'"):
        lower(g, _spec(flash_prefill="yes"))


@needs_cuda_codegen
def test_cuda_source_of_the_kernel():
    spec = _spec(flash_prefill="on")
    src = cuda_source(compile_module(lower(step_graph(DType.f16), spec), spec))
    assert "kv_prefill_attention_kernel" in src and "kv_qk_masked" not in src
    assert "exp2f" in src and "__syncthreads" in src


@needs_cuda_codegen
def test_cuda_source_of_the_tensor_core_kernel():
    spec = _spec(flash_prefill="mma")
    src = cuda_source(compile_module(lower(step_graph(DType.f16), spec), spec))
    assert "kv_prefill_attention_mma_w4s1_kernel" in src and "kv_qk_masked" not in src
    assert src.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") >= 2    # q k^T and p v
    assert "__shfl_xor_sync" in src and "exp2f" in src


@needs_cuda_codegen
@pytest.mark.parametrize("d, warps, stages, paged", [(16, 4, 1, False), (64, 4, 1, False), (64, 4, 2, False),
                                                     (64, 8, 1, False), (128, 4, 1, False), (64, 4, 1, True),
                                                     (64, 4, 2, True)])
def test_tensor_core_kernel_addresses_its_buffers_in_elements(d, warps, stages, paged):
    """Every buffer an ldmatrix or an mma addresses is declared with its element type in the CUDA source.
    TVM retypes a buffer it only ever touches in vectors (K_s as uint4[], q's fragment as half2[]), and the
    intrinsics' offsets count halves: given the buffer's data pointer, the first GPU run read shared memory
    8x past K_s's end (an illegal address) -- which the SIMT interpreter, modelling buffers by element, could
    not see. The kernel passes access_ptr (typed) instead; this checks what nvcc is given."""
    import re
    g = Graph("tc")
    g.add_symbol("seq", 1, 128)
    q = g.add_input("q", TensorType((1, 4, sym("seq"), d), DType.f16))
    if paged:
        g.add_symbol("blocks", 1, 64)
        kv = [g.add_input(n, TensorType((sym("blocks"), 2, 16, d), DType.f16)) for n in ("k_pool", "v_pool")]
        extra = [g.add_input("pos", TensorType((1,), DType.i32)), g.add_input("table", TensorType((1, 8), DType.i32))]
        g.set_outputs([g.add_node("kv.paged_attention", [q, *kv, *extra], {"scale": 0.125}, name="attn")])
    else:
        kv = [g.add_input(n, TensorType((1, 2, 128, d), DType.f16)) for n in ("k_cache", "v_cache")]
        g.set_outputs([g.add_node("kv.attention", [q, *kv, g.add_input("pos", TensorType((1,), DType.i32))],
                                  {"scale": 0.125}, name="attn")])
    spec = _spec(flash_prefill="mma", flash_prefill_warps=str(warps), flash_prefill_stages=str(stages))
    src = cuda_source(compile_module(lower(g, spec), spec))
    assert f"_mma_w{warps}s{stages}_kernel" in src
    declared = dict((name, ty) for ty, name in re.findall(r"alignas\(\d+\)\s+(\w+)\s+(\w+)\[", src))
    used = set(re.findall(r"__cvta_generic_to_shared\(\(?&?\(?(\w+)", src))
    used |= set(re.findall(r"\(\((?:unsigned|float) \*\)\(\(?&?\(?(\w+)", src))
    assert {"K_s_ptr", "V_s_ptr", "qf_ptr", "kf_ptr", "vf_ptr", "pf_ptr", "sf_ptr", "of_ptr"} <= used, used
    wrong = {n: declared.get(n) for n in used if n.endswith("_ptr") and declared.get(n) not in ("half", "float")}
    assert not wrong, f"buffers addressed by ldmatrix / mma but declared as vectors: {wrong}"


TC_CASES = [  # (B, H, HKV, T, M, D, positions)
    (2, 4, 2, 21, 80, 32, (0, 50)),        # GQA, a prefix, a ragged last block
    (2, 8, 1, 9, 140, 64, (3, 131)),       # MQA; row 1 runs past the cache's end (clamped to M)
    (2, 6, 2, 23, 96, 48, (5, -9)),        # rep 3; a negative position: its first queries see nothing
    (1, 4, 4, 70, 160, 16, (0,)),          # MHA, more rows than a block, three cache tiles
    (1, 2, 1, 5, 40, 128, (30,)),          # D = 128
]


@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}t{c[3]}m{c[4]}d{c[5]}")
def test_tensor_core_kernel_matches_attention_in_the_simt_interpreter(case):
    """The MMA fragments, the quad shuffles and the online softmax, lane by lane (the interpreter's mma
    gathers each lane's registers by the PTX fragment layout). p is rounded to f16 before p v, as
    FlashAttention-2 does: about one f16 ulp of the output."""
    b, h, hkv, t, m, d, positions = case
    rng = np.random.default_rng(sum(case[:6]))
    q = rng.standard_normal((b, h, t, d)).astype(np.float16)
    k = (rng.standard_normal((b, hkv, m, d)) * 2).astype(np.float16)
    v = rng.standard_normal((b, hkv, m, d)).astype(np.float16)
    pos = np.array(positions, np.int32)
    out = np.full((b, h, t, d), np.nan, np.float16)
    simt.run(prefill_attention_mma_func(h, hkv, m, d, "int32", d ** -0.5), q, k, v, pos, out)
    assert np.isfinite(out).all(), "every query row must be written"
    np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, pos, d ** -0.5), atol=3e-3, rtol=3e-3)


def test_tensor_core_supported_layouts():
    assert prefill_attention_mma_supported(32, 8, 1152, 64, "float16")
    assert prefill_attention_mma_supported(32, 8, 1152, 128, "float16")
    assert not prefill_attention_mma_supported(32, 8, 1152, 64, "float32")      # MMA takes f16 here
    assert not prefill_attention_mma_supported(6, 4, 64, 64, "float16")
    assert not prefill_attention_mma_supported(4, 2, 64, 24, "float16")         # D not a multiple of 16
    assert not prefill_attention_mma_supported(4, 2, 64, 256, "float16")
    assert prefill_attention_mma_supported(4, 2, 64, 64, "float16", 8, 2)
    assert not prefill_attention_mma_supported(4, 2, 64, 128, "float16", 4, 2)   # two stages past 48 KiB
    assert not prefill_attention_mma_supported(4, 2, 64, 16, "float16", 8)        # 8 warps: D % 32
    with pytest.raises(ValueError, match="unsupported layout"):
        prefill_attention_mma_func(4, 2, 64, 24, "int32", 0.1)


def _paged_reference(q, kpool, vpool, pos, table, scale):
    """The contiguous reference over each row's blocks laid end to end, unallocated positions excluded."""
    b_, h, t_, d = q.shape
    nb, hkv, bs, _ = kpool.shape
    rep = h // hkv
    out = np.zeros(q.shape, np.float64)
    for b in range(b_):
        for hq in range(h):
            for t in range(t_):
                js = [j for j in range(min(int(pos[b]) + t + 1, table.shape[1] * bs))
                      if 0 <= table[b, j // bs] < nb]
                if not js:
                    continue
                k = np.stack([kpool[table[b, j // bs], hq // rep, j % bs] for j in js]).astype(np.float64)
                v = np.stack([vpool[table[b, j // bs], hq // rep, j % bs] for j in js]).astype(np.float64)
                s = k @ q[b, hq, t].astype(np.float64) * scale
                p = np.exp(s - s.max())
                out[b, hq, t] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("dt", ["float16", "float32"])
def test_paged_kernel_matches_attention_in_the_simt_interpreter(dt):
    from llmasos.backends.tvm.cuda_attention import paged_prefill_attention_func
    b, h, hkv, t, bs, mb, nb, d = 3, 4, 2, 19, 16, 6, 14, 32
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, h, t, d)).astype(dt)
    kpool = rng.standard_normal((nb, hkv, bs, d)).astype(dt)
    vpool = rng.standard_normal((nb, hkv, bs, d)).astype(dt)
    kpool[13] = np.inf     # a block no table entry names: never read
    vpool[13] = np.nan
    kpool[9, :, 8:] = np.inf    # the unused tail of row 0's last block (positions 40..47 > pos + T - 1 = 38)
    vpool[9, :, 8:] = np.nan
    table = np.array([[5, 2, 9, -1, -1, -1],        # a chunk at pos 20: blocks 0..2
                      [0, 1, 3, 4, 6, 7],           # pos 70: all six, the last partly
                      [8, -1, 10, 11, -1, -1]],     # an unallocated block inside the range: weighs 0
                     np.int32)
    pos = np.array([20, 70, 30], np.int32)
    out = np.full((b, h, t, d), np.nan, dt)
    simt.run(paged_prefill_attention_func(h, hkv, bs, mb, d, dt, "int32", 0.2), q, kpool, vpool, pos, table, out)
    tol = 2e-3 if dt == "float16" else 2e-6
    np.testing.assert_allclose(out.astype(np.float64), _paged_reference(q, kpool, vpool, pos, table, 0.2),
                               atol=tol, rtol=tol)


def test_paged_tensor_core_kernel_matches_attention_in_the_simt_interpreter():
    b, h, hkv, t, bs, mb, nb, d = 3, 4, 2, 19, 16, 6, 14, 32
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, h, t, d)).astype(np.float16)
    kpool = rng.standard_normal((nb, hkv, bs, d)).astype(np.float16)
    vpool = rng.standard_normal((nb, hkv, bs, d)).astype(np.float16)
    kpool[13] = np.inf     # a block no table entry names: never read
    vpool[13] = np.nan
    kpool[9, :, 8:] = np.inf    # the unused tail of row 0's last block
    vpool[9, :, 8:] = np.nan
    table = np.array([[5, 2, 9, -1, -1, -1], [0, 1, 3, 4, 6, 7], [8, -1, 10, 11, -1, -1]], np.int32)
    pos = np.array([20, 70, 30], np.int32)
    out = np.full((b, h, t, d), np.nan, np.float16)
    simt.run(paged_prefill_attention_mma_func(h, hkv, bs, mb, d, "int32", 0.2), q, kpool, vpool, pos, table, out)
    np.testing.assert_allclose(out.astype(np.float64), _paged_reference(q, kpool, vpool, pos, table, 0.2),
                               atol=3e-3, rtol=3e-3)


def test_paged_lowering_uses_the_kernel_for_prefill_chunks():
    g = Graph("paged")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 64)
    g.add_symbol("blocks", 1, 64)
    q = g.add_input("q", TensorType((sym("batch"), 4, sym("seq"), 16), DType.f16))
    kp = g.add_input("k_pool", TensorType((sym("blocks"), 2, 16, 16), DType.f16))
    vp = g.add_input("v_pool", TensorType((sym("blocks"), 2, 16, 16), DType.f16))
    pos = g.add_input("pos", TensorType((sym("batch"),), DType.i32))
    table = g.add_input("table", TensorType((sym("batch"), 4), DType.i32))
    g.set_outputs([g.add_node("kv.paged_attention", [q, kp, vp, pos, table], {"scale": 0.25}, name="attn")])
    on = _prims(lower(g, _spec(flash_prefill="on")))
    assert "kv_paged_prefill_attention" in on and not any("gather" in n for n in on)
    assert "kv_paged_prefill_attention_mma_w4s1" in _prims(lower(g, _spec()))      # the default
    assert "kv_paged_prefill_attention_mma_w4s1" in _prims(lower(g, _spec(flash_prefill="mma")))
    assert any("gather" in n for n in _prims(lower(g, _spec(flash_prefill="off"))))


@pytest.mark.gpu
@pytest.mark.parametrize("flash", ["on", "mma", "off"])
def test_prefill_attention_on_the_gpu_matches_torch(flash):
    """On a GPU: the compiled kv.attention (flash kernel or the generic path) against torch's math."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmasos.backends.tvm import build
    spec = resolve_target("cuda")     # this machine's GPU arch
    exe = build(step_graph(DType.f16), dataclasses.replace(spec, extra={**spec.extra, "flash_prefill": flash}))
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 13, 16)).astype(np.float16)
    kc = rng.standard_normal((2, 2, 32, 16)).astype(np.float16)
    vc = rng.standard_normal((2, 2, 32, 16)).astype(np.float16)
    pos = np.array([0, 11], np.int32)
    out = exe(*(torch.from_numpy(a).cuda() for a in (q, kc, vc, pos)))
    out = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu().numpy()
    np.testing.assert_allclose(out, reference(q, kc, vc, pos, 0.25), atol=3e-3, rtol=3e-3)


def test_the_kernel_is_not_used_when_an_index_could_pass_int32():
    """The kernels index in int32: a prompt bound that takes q past 2**31 elements keeps the generic path."""
    g = Graph("big")
    g.add_symbol("batch", 1, 64)
    g.add_symbol("seq", 1, 1 << 22)            # 64 x 4 heads x 4M x 16 = 2**34 elements of q at the bounds
    q = g.add_input("q", TensorType((sym("batch"), 4, sym("seq"), 16), DType.f16))
    kc = g.add_input("k_cache", TensorType((sym("batch"), 2, 32, 16), DType.f16))
    vc = g.add_input("v_cache", TensorType((sym("batch"), 2, 32, 16), DType.f16))
    pos = g.add_input("pos", TensorType((sym("batch"),), DType.i32))
    g.set_outputs([g.add_node("kv.attention", [q, kc, vc, pos], {"scale": 0.25}, name="attn")])
    assert not any("prefill_attention" in n for n in _prims(lower(g, _spec(flash_prefill="on"))))


@pytest.mark.parametrize("warps, stages", [(4, 2), (8, 1), (8, 2)])
def test_tensor_core_kernel_variants_match_attention_in_the_simt_interpreter(warps, stages):
    """8 warps (128 grouped rows a block) and the cp.async double-buffered K/V tiles (stages 2): the
    interpreter lands each copy only at the wait_group covering it, so reading a tile before its wait fails."""
    for b, h, hkv, t, m, d, positions in [(2, 8, 1, 9, 140, 64, (3, 131)), (1, 4, 4, 70, 160, 32, (0,)),
                                          (2, 6, 2, 23, 96, 64, (5, -9))]:
        rng = np.random.default_rng(m + t)
        q = rng.standard_normal((b, h, t, d)).astype(np.float16)
        k = (rng.standard_normal((b, hkv, m, d)) * 2).astype(np.float16)
        v = rng.standard_normal((b, hkv, m, d)).astype(np.float16)
        pos = np.array(positions, np.int32)
        out = np.full((b, h, t, d), np.nan, np.float16)
        simt.run(prefill_attention_mma_func(h, hkv, m, d, "int32", d ** -0.5, warps, stages), q, k, v, pos, out)
        np.testing.assert_allclose(out.astype(np.float64), reference(q, k, v, pos, d ** -0.5), atol=3e-3, rtol=3e-3)
    b, h, hkv, t, bs, mb, nb, d = 3, 4, 2, 19, 16, 6, 14, 32
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, h, t, d)).astype(np.float16)
    kpool = rng.standard_normal((nb, hkv, bs, d)).astype(np.float16)
    vpool = rng.standard_normal((nb, hkv, bs, d)).astype(np.float16)
    kpool[13], vpool[13] = np.inf, np.nan
    table = np.array([[5, 2, 9, -1, -1, -1], [0, 1, 3, 4, 6, 7], [8, -1, 10, 11, -1, -1]], np.int32)
    pos = np.array([20, 70, 30], np.int32)
    out = np.full((b, h, t, d), np.nan, np.float16)
    simt.run(paged_prefill_attention_mma_func(h, hkv, bs, mb, d, "int32", 0.2, warps, stages),
             q, kpool, vpool, pos, table, out)
    np.testing.assert_allclose(out.astype(np.float64), _paged_reference(q, kpool, vpool, pos, table, 0.2),
                               atol=3e-3, rtol=3e-3)
