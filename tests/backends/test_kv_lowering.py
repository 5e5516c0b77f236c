"""TVM lowerings of kv.append / kv.attention: CPU builds against the reference interpreter (symbolic batch and
sequence length, GQA, per-row positions), the in-place cache update, and the CUDA build (decode kernel)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from llmasos.backends.tvm import build, compile_module, resolve_target
from llmasos.backends.tvm import lowering_kv
from llmasos.backends.tvm.build import cuda_source
from llmasos.backends.tvm.lower import lower
from llmasos.ir import DType, Graph, TensorType, interpreter, sym
from tests.backends.cuda_codegen import needs_cuda_codegen

H, HKV, M, D = 4, 2, 16, 8
BATCH, SEQ = sym("batch"), sym("seq")


def step_graph(dt: DType = DType.f32, t=SEQ, outputs=("attn", "k", "v")) -> Graph:
    """Append k and v at pos, attend over the appended caches (a decoder layer's cache traffic)."""
    g = Graph("step")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, M)
    q = g.add_input("q", TensorType((BATCH, H, t, D), dt))
    k = g.add_input("k", TensorType((BATCH, HKV, t, D), dt))
    v = g.add_input("v", TensorType((BATCH, HKV, t, D), dt))
    kc = g.add_input("k_cache", TensorType((BATCH, HKV, M, D), dt))
    vc = g.add_input("v_cache", TensorType((BATCH, HKV, M, D), dt))
    pos = g.add_input("pos", TensorType((BATCH,), DType.i32))
    k2 = g.add_node("kv.append", [kc, k, pos], name="k_appended")
    v2 = g.add_node("kv.append", [vc, v, pos], name="v_appended")
    attn = g.add_node("kv.attention", [q, k2, v2, pos], {"scale": 0.3}, name="attn")
    g.set_outputs([{"attn": attn, "k": k2, "v": v2}[o] for o in outputs])
    return g


def step_inputs(batch: int, t: int, seed: int, dt=np.float32) -> list:
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(dt) for s in
              ((batch, H, t, D), (batch, HKV, t, D), (batch, HKV, t, D), (batch, HKV, M, D), (batch, HKV, M, D))]
    return arrays + [rng.integers(0, M - t + 1, batch).astype(np.int32)]


@pytest.fixture(scope="module")
def step_exe():
    g = step_graph()
    return g, build(g, "cpu")


@pytest.mark.parametrize("batch, t", [(1, 1), (3, 1), (2, 5), (4, 16)])
def test_cpu_matches_the_interpreter(step_exe, batch, t):
    g, exe = step_exe
    inputs = step_inputs(batch, t, seed=batch * 31 + t)
    want = interpreter.run(g, inputs)
    got = exe(*[a.copy() for a in inputs])
    for name, o, w in zip(("attn", "k_cache", "v_cache"), got, want):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-6, err_msg=f"{name} (batch={batch}, T={t})")


def test_cpu_decode_kernel_reads_rows_up_to_pos():
    # T == 1 takes the CPU decode kernel; positions at both ends of the cache, rows past pos hold huge
    # values that would dominate the softmax if the kernel read them
    g = step_graph(t=1, outputs=("attn",))
    assert "kv_decode_attention_cpu" in {gv.name_hint for gv in lower(g, resolve_target("cpu")).functions}
    inputs = step_inputs(3, 1, seed=11)
    inputs[5] = np.array([0, 7, M - 1], np.int32)
    for b, p in enumerate(inputs[5]):
        inputs[3][b, :, p + 1:] = 1e4
        inputs[4][b, :, p + 1:] = 1e4
    want = interpreter.run(g, inputs)[0]
    got = build(g, "cpu")(*inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gpu_form_of_the_generic_path_matches_on_cpu(monkeypatch):
    # the GPU's masked q k^T reading the cache untransposed, checked numerically where it can run: here
    monkeypatch.setattr(lowering_kv, "_nt_logits", lambda ctx: True)
    g = step_graph(outputs=("attn",))
    assert "kv_qk_masked" in {gv.name_hint for gv in lower(g, resolve_target("cpu")).functions}
    exe = build(g, "cpu")
    for batch, t in ((2, 3), (1, 16)):
        inputs = step_inputs(batch, t, seed=t)
        np.testing.assert_allclose(exe(*inputs)[0], interpreter.run(g, inputs)[0], rtol=1e-5, atol=1e-6)


def test_cpu_f16_accumulates_in_f32():
    g = step_graph(DType.f16, t=1, outputs=("attn",))
    inputs = step_inputs(3, 1, seed=5, dt=np.float16)
    want = interpreter.run(g, inputs)[0].astype(np.float32)
    got = build(g, "cpu")(*inputs)[0].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_append_updates_the_callers_cache_in_place(step_exe):
    g, exe = step_exe
    host = step_inputs(2, 3, seed=7)
    want = interpreter.run(g, host)
    dev = [tvm.runtime.tensor(a, tvm.cpu()) for a in host]
    out = exe.raw("main")(*dev, *exe.weights)
    # the caller's buffers hold the appended caches, and the returned caches are those buffers (no copy)
    for i, w in ((3, want[1]), (4, want[2])):
        np.testing.assert_array_equal(dev[i].numpy(), w)
    for o, i in ((out[1], 3), (out[2], 4)):
        assert np.from_dlpack(o).ctypes.data == np.from_dlpack(dev[i]).ctypes.data
    np.testing.assert_allclose(out[0].numpy(), want[0], rtol=1e-5, atol=1e-6)
    # a second step on the same buffers appends after the first (what a decode loop does)
    pos2 = (host[5] + 3).astype(np.int32)
    step2 = step_inputs(2, 3, seed=8)[:3]
    want2 = interpreter.run(g, step2 + [want[1], want[2], pos2])
    out2 = exe.raw("main")(*[tvm.runtime.tensor(a, tvm.cpu()) for a in step2], dev[3], dev[4],
                           tvm.runtime.tensor(pos2, tvm.cpu()), *exe.weights)
    np.testing.assert_array_equal(dev[3].numpy(), want2[1])
    np.testing.assert_allclose(out2[0].numpy(), want2[0], rtol=1e-5, atol=1e-6)


def test_append_is_a_call_tir_inplace_on_the_cache_parameter():
    text = lower(step_graph(), resolve_target("cpu"))["main"].script()
    assert text.count("R.call_tir_inplace(") == 2
    for args in ("(k_cache, k, pos)", "(v_cache, v, pos)"):
        assert f"R.call_tir_inplace(kv_append, {args}, out_ty=" in text
    assert text.count("inplace_indices=[0]") == 2
    assert "kv_append_copy" not in text


def test_append_copies_a_cache_that_is_read_again():
    # the IR is functional: when the old cache is also read (here: returned), the append must not clobber it
    g = Graph("reuse")
    g.add_symbol("batch", 1, 4)
    kc = g.add_input("k_cache", TensorType((BATCH, HKV, M, D), DType.f32))
    k = g.add_input("k", TensorType((BATCH, HKV, 2, D), DType.f32))
    pos = g.add_input("pos", TensorType((BATCH,), DType.i32))
    g.set_outputs([g.add_node("kv.append", [kc, k, pos]), kc])
    # (LowerContext carries the graph being lowered: no hand-over needed)
    assert "kv_append_copy" in lower(g, resolve_target("cpu"))["main"].script()
    exe = build(g, "cpu")
    host = [np.random.default_rng(0).standard_normal((2, HKV, M, D)).astype(np.float32),
            np.ones((2, HKV, 2, D), np.float32), np.array([0, 3], np.int32)]
    cache = tvm.runtime.tensor(host[0], tvm.cpu())
    appended, old = exe(cache, host[1], host[2])
    np.testing.assert_array_equal(old, host[0])
    np.testing.assert_array_equal(cache.numpy(), host[0])
    np.testing.assert_array_equal(appended, interpreter.run(g, host)[0])


# -- CUDA: build only (no GPU here; bench/kv_attention_check.py runs the kernels) ------------------------


@needs_cuda_codegen
@pytest.mark.parametrize("dt", [DType.f16, DType.f32])
def test_cuda_decode_kernel_builds(dt):
    spec = resolve_target("cuda:sm_90a")
    decode = lower(step_graph(dt, t=1), spec)
    prims = {gv.name_hint for gv, f in decode.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "kv_decode_attention" in prims
    ex = compile_module(decode, spec)
    src = cuda_source(ex)
    assert "kv_decode_attention_kernel" in src and "kv_append_kernel" in src


@needs_cuda_codegen
def test_cuda_prefill_takes_the_generic_path():
    spec = resolve_target("cuda:sm_90a")
    prefill = lower(step_graph(DType.f16), spec)
    assert "kv_decode_attention" not in {gv.name_hint for gv in prefill.functions}
    compile_module(prefill, spec)



@pytest.mark.parametrize("d", [4, 8, 16, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cuda_decode_block_respects_cuda_limits(d, dtype):
    """blockDim.z <= 64 and x*y*z <= 1024 (a head dim of 4 once asked for 512 threads on z: a launch error
    the CUDA conformance kit found)."""
    from llmasos.backends.tvm.lowering_kv import _decode_shape
    s = _decode_shape(8, 2, d, dtype)
    assert s["bdz"] <= 64 and s["bdx"] <= 1024 and s["bdy"] <= 1024
    assert s["bdx"] * s["bdy"] * s["bdz"] <= 1024
    assert s["bdx"] * s["vec"] == d
