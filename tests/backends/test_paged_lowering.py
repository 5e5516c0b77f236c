"""TVM lowerings of kv.paged_append / kv.paged_attention: CPU builds against the contiguous-cache kernels
(kv.append / kv.attention built the same way) over scattered block tables, the in-place pool update, the decode
kernel reading only the row's blocks up to pos, and the CUDA build (the paged kernels in its source)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import given
from hypothesis import strategies as st

from llmasos.backends.tvm import build, compile_module, lowering_kv, resolve_target
from llmasos.backends.tvm.build import cuda_source
from llmasos.backends.tvm.lower import lower
from llmasos.backends.tvm.lowering import LoweringError
from llmasos.ir import DType, Graph, TensorType, interpreter, sym
from tests.paged_util import gather, scatter, scattered_table
from tests.backends.cuda_codegen import needs_cuda_codegen

BATCH, SEQ, BLOCKS = sym("batch"), sym("seq"), sym("blocks")
# (H, Hkv, D, BS, MB): GQA with small blocks, and MHA with one block size of the serving default
CONFIGS = {"gqa-bs4": (4, 2, 8, 4, 5), "mha-bs16": (2, 2, 16, 16, 2)}


def paged_graph(cfg, t, dt=DType.f32) -> Graph:
    h, hkv, d, bs, mb = cfg
    g = Graph("paged")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("blocks", 1, 4096)
    if not isinstance(t, int):
        g.add_symbol("seq", 1, mb * bs)
    q = g.add_input("q", TensorType((BATCH, h, t, d), dt))
    k = g.add_input("k", TensorType((BATCH, hkv, t, d), dt))
    v = g.add_input("v", TensorType((BATCH, hkv, t, d), dt))
    kp = g.add_input("k_pool", TensorType((BLOCKS, hkv, bs, d), dt))
    vp = g.add_input("v_pool", TensorType((BLOCKS, hkv, bs, d), dt))
    pos = g.add_input("pos", TensorType((BATCH,), DType.i32))
    table = g.add_input("block_table", TensorType((BATCH, mb), DType.i32))
    k2 = g.add_node("kv.paged_append", [kp, k, pos, table], name="k_appended")
    v2 = g.add_node("kv.paged_append", [vp, v, pos, table], name="v_appended")
    g.set_outputs([g.add_node("kv.paged_attention", [q, k2, v2, pos, table], {"scale": 0.3}, name="attn"), k2, v2])
    return g


def contiguous_graph(cfg, t, dt=DType.f32) -> Graph:
    h, hkv, d, bs, mb = cfg
    g = Graph("contiguous")
    g.add_symbol("batch", 1, 8)
    if not isinstance(t, int):
        g.add_symbol("seq", 1, mb * bs)
    q = g.add_input("q", TensorType((BATCH, h, t, d), dt))
    k = g.add_input("k", TensorType((BATCH, hkv, t, d), dt))
    v = g.add_input("v", TensorType((BATCH, hkv, t, d), dt))
    kc = g.add_input("k_cache", TensorType((BATCH, hkv, mb * bs, d), dt))
    vc = g.add_input("v_cache", TensorType((BATCH, hkv, mb * bs, d), dt))
    pos = g.add_input("pos", TensorType((BATCH,), DType.i32))
    k2 = g.add_node("kv.append", [kc, k, pos])
    v2 = g.add_node("kv.append", [vc, v, pos])
    g.set_outputs([g.add_node("kv.attention", [q, k2, v2, pos], {"scale": 0.3}), k2, v2])
    return g


@pytest.fixture(scope="module")
def builds():
    """(config name, decode?) -> (paged exe, contiguous exe): built once for the module."""
    out = {}
    for name, cfg in CONFIGS.items():
        for decode in (True, False):
            t = 1 if decode else SEQ
            out[name, decode] = (build(paged_graph(cfg, t), "cpu"), build(contiguous_graph(cfg, t), "cpu"))
    return out


def case(cfg, rng, batch: int, t: int, spare: int = 3, noise: float = 0.0):
    """Random contiguous caches and positions, and the same caches scattered into pools through a random
    table. noise: value of every pool slot no row may see (0: random finite data)."""
    h, hkv, d, bs, mb = cfg
    m = mb * bs
    pos = rng.integers(0, m - t + 1, batch).astype(np.int32)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((batch, h, t, d), (batch, hkv, t, d),
                                                                   (batch, hkv, t, d)))
    kc, vc = (rng.standard_normal((batch, hkv, m, d)).astype(np.float32) for _ in range(2))
    used = (pos + t - 1) // bs + 1
    table, nb = scattered_table(rng, batch, mb, used, spare)
    kp, vp = scatter(kc, table, nb, bs, rng), scatter(vc, table, nb, bs, rng)
    if noise:
        for p in (kp, vp):
            mask = np.ones(p.shape, bool)                                 # True: no row sees this slot
            for b in range(batch):
                for j in range(int(pos[b]) + t):                          # what row b's queries may see
                    blk = table[b, j // bs]
                    mask[blk, :, j % bs] = False
            p[mask] = noise
    return [q, k, v, kc, vc, pos], [q, k, v, kp, vp, pos, table], table


@pytest.mark.parametrize("name", list(CONFIGS))
@given(data=st.data())
def test_paged_kernels_equal_the_contiguous_kernels(builds, name, data):
    """Hypothesis over batch mixes, lengths, T (1: the decode kernel; more: the gather path), positions and
    scattered tables: the paged build's attention equals the contiguous build's, and the pools read back
    through the table equal the appended caches; blocks in no table are untouched."""
    cfg = CONFIGS[name]
    t = data.draw(st.sampled_from([1, 1, 2, 3, 7]), label="T")
    t = min(t, cfg[3] * cfg[4])
    batch = data.draw(st.integers(1, 4), label="batch")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    contiguous, paged, table = case(cfg, rng, batch, t)
    pexe, cexe = builds[name, t == 1]
    kp_before = paged[3].copy()
    p_attn, p_k, p_v = pexe(*[a.copy() for a in paged])
    c_attn, c_k, c_v = cexe(*[a.copy() for a in contiguous])
    np.testing.assert_allclose(p_attn, c_attn, rtol=1e-5, atol=1e-5)
    m = cfg[3] * cfg[4]
    pos = contiguous[5]
    seen = (np.arange(m)[None, :] < (pos + t)[:, None])[:, None, :, None]
    for pool, cache in ((p_k, c_k), (p_v, c_v)):
        np.testing.assert_array_equal(np.where(seen, gather(pool, table, m), 0), np.where(seen, cache, 0))
    untouched = np.setdiff1d(np.arange(kp_before.shape[0]), table[table >= 0])
    np.testing.assert_array_equal(p_k[untouched], kp_before[untouched])


@pytest.mark.parametrize("t", [1, 3])
def test_kernels_read_nothing_a_query_cannot_see(builds, t):
    """Every pool slot no query may see (other rows' blocks, spare blocks, the rows' own positions past
    pos + t) holds NaN: the decode kernel skips them, the gather path does not read them."""
    cfg = CONFIGS["gqa-bs4"]
    rng = np.random.default_rng(3 + t)
    contiguous, paged, table = case(cfg, rng, 3, t, spare=4, noise=np.nan)
    p_attn = builds["gqa-bs4", t == 1][0](*paged)[0]
    c_attn = builds["gqa-bs4", t == 1][1](*contiguous)[0]
    assert np.isfinite(p_attn).all()
    np.testing.assert_allclose(p_attn, c_attn, rtol=1e-5, atol=1e-5)


def test_decode_takes_the_paged_kernel_and_prefill_the_gather():
    spec = resolve_target("cpu")
    cfg = CONFIGS["gqa-bs4"]
    decode = {gv.name_hint for gv in lower(paged_graph(cfg, 1), spec).functions}
    prefill = {gv.name_hint for gv in lower(paged_graph(cfg, SEQ), spec).functions}
    assert "kv_paged_decode_attention_cpu" in decode and "kv_paged_gather" not in decode
    assert "kv_paged_gather" in prefill and "kv_paged_decode_attention_cpu" not in prefill


def test_append_updates_the_callers_pool_in_place(builds):
    cfg = CONFIGS["gqa-bs4"]
    text = lower(paged_graph(cfg, SEQ), resolve_target("cpu"))["main"].script()
    assert text.count("R.call_tir_inplace(kv_paged_append") == 2
    exe = builds["gqa-bs4", False][0]
    _, host, table = case(cfg, np.random.default_rng(0), 2, 3)
    want = interpreter.run(paged_graph(cfg, SEQ), host)
    dev = [tvm.runtime.tensor(a, tvm.cpu()) for a in host]
    exe.raw("main")(*dev, *exe.weights)
    np.testing.assert_array_equal(dev[3].numpy(), want[1])
    np.testing.assert_array_equal(dev[4].numpy(), want[2])


def test_unallocated_entries_drop_the_write(builds):
    """Positions whose table entry is -1 (the runtime's padding) are not written anywhere."""
    cfg = CONFIGS["gqa-bs4"]
    h, hkv, d, bs, mb = cfg
    exe = builds["gqa-bs4", False][0]
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, h, 6, d), (1, hkv, 6, d), (1, hkv, 6, d)))
    kp, vp = (rng.standard_normal((6, hkv, bs, d)).astype(np.float32) for _ in range(2))
    table = np.array([[2, -1, -1, -1, -1]], np.int32)                   # positions 0..3 in block 2, the rest unset
    _, k2, v2 = exe(q, k, v, kp.copy(), vp.copy(), np.zeros(1, np.int32), table)
    np.testing.assert_array_equal(np.delete(k2, 2, axis=0), np.delete(kp, 2, axis=0))
    np.testing.assert_array_equal(k2[2], k[0, :, :4])


def test_a_pool_read_after_its_append_is_refused(monkeypatch):
    g = Graph("reuse")
    g.add_symbol("blocks", 1, 64)
    kp = g.add_input("k_pool", TensorType((BLOCKS, 2, 4, 8), DType.f32))
    k = g.add_input("k", TensorType((1, 2, 1, 8), DType.f32))
    pos = g.add_input("pos", TensorType((1,), DType.i32))
    table = g.add_input("table", TensorType((1, 2), DType.i32))
    g.set_outputs([g.add_node("kv.paged_append", [kp, k, pos, table]), kp])
    # LowerContext does not carry the graph yet (see lowering_kv._graph_of): hand it over here
    monkeypatch.setattr(lowering_kv, "_graph_of", lambda ctx: g)
    with pytest.raises(LoweringError, match="kv.paged_append.*read again after the append.*in place only"):
        lower(g, resolve_target("cpu"))


# -- CUDA: build only (no GPU here; bench/paged_gpu_check.py runs the kernels) ------------------------------


@needs_cuda_codegen
@pytest.mark.parametrize("dt", [DType.f16, DType.f32])
def test_cuda_paged_kernels_build(dt):
    spec = resolve_target("cuda:sm_90a")
    cfg = CONFIGS["gqa-bs4"]
    src = cuda_source(compile_module(lower(paged_graph(cfg, 1, dt), spec), spec))
    assert "kv_paged_decode_attention_kernel" in src and "kv_paged_append_kernel" in src
    assert "kv_paged_gather" not in src
    src = cuda_source(compile_module(lower(paged_graph(cfg, SEQ, dt), spec), spec))
    assert "kv_paged_gather_kernel" in src and "kv_paged_append_kernel" in src
    assert "kv_paged_decode_attention_kernel" not in src


# -- one KV head (an MQA model, or a tensor-parallel rank holding one) -------------------------------------
MQA = (4, 1, 8, 4, 5)


def test_dlight_gemv_rules_decline_the_appends_with_one_kv_head():
    """The append kernels declare the one element they write: with a write region of the whole cache column,
    DLight's GEMV analysis (which takes a one-KV-head append, 3 iterators once the unit head axis is dropped,
    for a GEMV candidate) failed an assertion instead of declining -- on the CPU and CUDA alike."""
    from tvm.s_tir import dlight as dl
    funcs = [lowering_kv._append_func(1, 20, 8, "float16", "int32"),
             lowering_kv._paged_append_func(1, 4, 8, 5, "float16", "int32")]
    for f in funcs:
        assert dl.cpu.GEMV().apply(f, tvm.target.Target("llvm"), False) is None
        with tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}) as t:
            assert dl.gpu.GEMV().apply(f, t, False) is None


def test_single_kv_head_builds_on_cpu_and_matches_the_interpreter():
    cfg = MQA
    rng = np.random.default_rng(5)
    contiguous, paged, table = case(cfg, rng, 3, 1)
    p_attn, p_k, _ = build(paged_graph(cfg, 1), "cpu")(*[a.copy() for a in paged])
    c_attn, c_k, _ = build(contiguous_graph(cfg, 1), "cpu")(*[a.copy() for a in contiguous])
    want = interpreter.run(contiguous_graph(cfg, 1), contiguous)
    np.testing.assert_allclose(c_attn, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_attn, want[0], rtol=1e-5, atol=1e-5)
    m = cfg[3] * cfg[4]
    seen = (np.arange(m)[None, :] < (contiguous[5] + 1)[:, None])[:, None, :, None]
    np.testing.assert_array_equal(np.where(seen, gather(p_k, table, m), 0), np.where(seen, want[1], 0))


@needs_cuda_codegen
def test_cuda_single_kv_head_builds():
    spec = resolve_target("cuda:sm_90a")
    for graph in (paged_graph(MQA, 1, DType.f16), contiguous_graph(MQA, 1, DType.f16)):
        src = cuda_source(compile_module(lower(graph, spec), spec))
        assert "decode_attention_kernel" in src and "append_kernel" in src


@needs_cuda_codegen
def test_cuda_paged_decode_step_is_captured_only_when_asked():
    """Target option paged_cuda_graph=on: a paged model's decode step becomes a CUDA graph per batch size
    (TVM's RewriteCUDAGraph: run_or_capture keyed by the batch); off (the default) it launches its kernels
    one by one. The runner pads the rows to graph_bucket's sizes (tests/llm/test_paged.py)."""
    import dataclasses
    import torch
    import llmasos.llm.presets as P
    from llmasos.driver import lower as driver_lower, prepare
    from llmasos.llm.compile import lm_source
    from llmasos.llm.model import Decoder
    dec = Decoder.random(P.decoder_config("llama-tiny"), dtype=torch.float16)
    base = resolve_target("cuda:sm_90a")
    for opt, want in (("off", ()), ("on", ("decode",))):
        plan = prepare(dataclasses.replace(base, extra={**base.extra, "paged_cuda_graph": opt}), "fuse")
        src = driver_lower(plan, lambda s: lm_source(dec, s, max_seq=32, max_batch=4, batch=None, dtype=None,
                                                     kv="paged", block_size=4, cuda_graph=True))
        assert src.cuda_graph == want and src.meta["cuda_graph"] == bool(want)
    text = compile_module(lower(src.graphs["decode"], plan.spec), plan.spec, cuda_graph=("main",)).as_text()
    assert "vm.builtin.cuda_graph.run_or_capture" in text
    with pytest.raises(ValueError, match="paged_cuda_graph must be 'on' or 'off'"):
        dataclasses.replace(base, extra={"paged_cuda_graph": "yes"}).paged_graph_capture()


@needs_cuda_codegen
def test_cuda_ragged_step_builds_with_unfused_attention():
    """A paged model's ragged step (tokens of several sequences packed in one row) builds for sm_90a: its
    appends and its attention are separate kernels (a token reads what other tokens of the call appended,
    so the fused decode kernel, which appends and attends row by row, must not run it), its GEMMs the
    prefill tiles."""
    import re
    import torch
    import llmasos.llm.presets as P
    from llmasos.driver import lower as driver_lower, prepare
    from llmasos.llm.compile import lm_source
    from llmasos.llm.model import Decoder
    dec = Decoder.random(P.decoder_config("llama-tiny"), dtype=torch.float16)
    plan = prepare(resolve_target("cuda:sm_90a"), "fuse")
    src = driver_lower(plan, lambda s: lm_source(dec, s, max_seq=32, max_batch=4, batch=None, dtype=None,
                                                 kv="paged", block_size=4))
    ops = {n.op for n in src.graphs["ragged"].nodes}
    assert "kv.ragged_attention" in ops and "kv.paged_append" in ops
    assert not any(op.startswith("fused.rope") for op in ops)
    text = cuda_source(compile_module(lower(src.graphs["ragged"], plan.spec), plan.spec))
    kernels = set(re.findall(r"void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(", text))
    assert {"kv_paged_append_kernel", "kv_paged_decode_attention_kernel"} <= kernels
    assert any(k.startswith("prefill_gemm_") for k in kernels)
