"""TVM lowering of the quantized GEMMs (lowering_quant.py): compiled == interpreter, and the weights stay
packed on the device (resident bytes shrink ~4x for int8, ~7x for int4-g128 against f32)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmasos.backends.tvm import build, compile_module, resolve_target
from llmasos.backends.tvm.build import cuda_source
from llmasos.backends.tvm.lower import lower
from llmasos.compress.quant import quantize_rtn, storage
from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.interpreter import run

N, K = 40, 256  # 40 rows: not whole 16/32-wide panels, so the padding path runs too
# (bits, group, sym, per_tensor, bias)
VARIANTS = [(8, 0, True, False, True), (8, 0, False, False, False), (8, 0, True, True, False),
            (4, 32, True, False, True), (4, 32, False, False, False), (4, 128, True, False, False),
            (4, 128, False, False, True)]


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(N).astype(np.float32)


def _quant_graph(variants, w, bias, x_dtype=DType.f32) -> Graph:
    g = Graph("quant")
    g.add_symbol("s", 1, 32)
    x = g.add_input("x", TensorType((2, sym("s"), K), x_dtype))
    outs = []
    for i, (bits, group, symm, per_tensor, has_bias) in enumerate(variants):
        q, s, z = quantize_rtn(w, bits, group, symm, per_tensor)
        codes, z = storage(q, z, bits, symm)
        ins = [x, g.add_param(f"q{i}", codes), g.add_param(f"s{i}", s), g.add_param(f"z{i}", z)]
        if has_bias:
            ins.append(g.add_param(f"b{i}", bias.astype(x_dtype.numpy)))
        outs.append(g.add_node("quant.linear", ins, {"bits": bits, "group": group}))
    g.set_outputs(outs)
    return g


@pytest.fixture(scope="module")
def variants():
    w, bias = _weights()
    g = _quant_graph(VARIANTS, w, bias)
    return g, build(g, "cpu"), w, bias


@pytest.mark.parametrize("seq", [1, 7])
def test_quant_linear_cpu_matches_interpreter(variants, seq):
    g, exe, w, bias = variants
    x = np.random.default_rng(seq).standard_normal((2, seq, K)).astype(np.float32)
    want = run(g, [x])
    got = exe(x)
    for v, o, r in zip(VARIANTS, got, want):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=str(v))
    # and the quantized GEMM is close to the float one (int8: ~1%, int4: ~15% of the output's scale)
    ref = x @ w.T
    for v, r in zip(VARIANTS, want):
        r = r - bias if v[4] else r
        assert np.abs(r - ref).max() <= (0.02 if v[0] == 8 else 0.25) * np.abs(ref).max(), v


def test_weights_stay_int8_uint8_on_the_device(variants):
    g, exe, _, _ = variants
    dtypes = [str(a.dtype) for a in exe._weights]
    if resolve_target("cpu").int8_gemv_lanes() is None:
        assert dtypes.count("int8") == 2 and dtypes.count("uint8") == 5, dtypes
    else:  # the int8 GEMV's layout: signed codes flipped to unsigned bytes at load (c + 128)
        assert dtypes.count("uint8") == 7 and "int8" not in dtypes, dtypes
    # no dequantized float copy of any weight: float tensors are scales/zeros/biases only (<< N*K)
    assert max(int(np.prod(a.shape)) for a in exe._weights if str(a.dtype) == "float32") < N * K // 8


def _resident_bytes(exe) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(str(a.dtype)).itemsize for a in exe._weights)


def test_resident_weight_bytes_shrink():
    w, _ = _weights(1)
    g32 = Graph("f32")
    x = g32.add_input("x", TensorType((1, K), DType.f32))
    g32.set_outputs([g32.add_node("linear", [x, g32.add_param("w", w)])])
    f32 = _resident_bytes(build(g32, "cpu"))
    int8 = _resident_bytes(build(_quant_graph([(8, 0, True, False, False)], w, None), "cpu"))
    int4 = _resident_bytes(build(_quant_graph([(4, 128, True, False, False)], w, None), "cpu"))
    # f32 panels pad N=40 to 48 or 64 columns like the int codes do, so the ratios are the storage ratios:
    # int8: 1 byte + 8 bytes (scale, zero) per row of 256 -> 3.88x; int4-g128: 0.5 byte + 16/256 -> 7.1x
    assert f32 / int8 == pytest.approx(4 / (1 + 8 / K), rel=1e-6)
    assert f32 / int4 == pytest.approx(4 / (0.5 + 16 / K), rel=1e-6)


def test_f16_activations_take_the_generic_path():
    """The generic dequant+GEMM (CUDA's, and f16 activations on the CPU) reads the codes as uint32 words
    repacked at load -- signed int8, unsigned int8 and 4-bit nibbles, per-tensor and grouped scales."""
    from llmasos.backends.tvm.kernels import kernel_stats
    w, bias = _weights(2)
    g = _quant_graph(VARIANTS, w, bias, DType.f16)
    stats = kernel_stats(g, "cpu")  # the repacking (and -zero * scale) run at load: no kernel per call
    assert "pack_words" not in stats["by_name"] and stats["transform_params_kernels"] == 2 * len(VARIANTS)
    assert stats["by_name"]["quant_linear"] == len(VARIANTS)
    x = np.random.default_rng(0).standard_normal((2, 3, K)).astype(np.float16)
    for v, o, r in zip(VARIANTS, build(g, "cpu")(x), run(g, [x])):
        np.testing.assert_allclose(o.astype(np.float32), r.astype(np.float32), rtol=2e-3,
                                   atol=2e-3 * np.abs(r).max(), err_msg=str(v))


def test_cuda_target_compiles_quantized_gemms():
    """DLight schedules the dequant+GEMM function and the W8A8 kernels for CUDA (no GPU needed to build)."""
    w, bias = _weights(3)
    g = _quant_graph([(4, 32, False, False, True)], w, bias, DType.f16)
    q, s, _ = quantize_rtn(w, 8, 0, True)
    x32 = g.add_input("x32", TensorType((sym("s"), K), DType.f32))
    a8 = g.add_node("quant.linear_a8", [x32, g.add_param("qa", q), g.add_param("wa", np.ascontiguousarray(s[:, 0]))])
    g.set_outputs([*g.outputs, a8])
    spec = resolve_target("cuda")
    ex = compile_module(lower(g, spec), spec)
    cuda = cuda_source(ex)
    assert "__global__" in cuda
    # the 4-bit GEMV reads 32-bit words of codes (8 a load), not bytes
    sig = next(line for line in cuda.splitlines() if "void" in line and "quant_linear" in line)
    assert "uint* __restrict__" in sig and "uchar*" not in sig, sig


def test_ragged_last_group_k576_matches_interpreter():
    """SmolLM2's K=576 at group 128: G = 5 scale columns, the last group 64 wide. CPU panel kernel (f32
    activations: int4 sym + bias, int4 asym, int8 g128) and the generic dequant+GEMM (f16) in one build."""
    k, n = 576, 40
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[:, 512:] *= 0.01  # a quiet ragged group: wrong scale columns there would show as a large error
    bias = rng.standard_normal(n).astype(np.float32)
    g = Graph("ragged")
    g.add_symbol("s", 1, 32)
    x32 = g.add_input("x", TensorType((2, sym("s"), k), DType.f32))
    x16 = g.add_input("x16", TensorType((sym("s"), k), DType.f16))
    outs = []
    for i, (x, bits, symm, has_bias) in enumerate([(x32, 4, True, True), (x32, 4, False, False),
                                                  (x32, 8, True, False), (x16, 4, False, True)]):
        q, s, z = quantize_rtn(w, bits, 128, symm)
        assert s.shape == (n, 5)
        codes, z = storage(q, z, bits, symm)
        ins = [x, g.add_param(f"q{i}", codes), g.add_param(f"s{i}", s), g.add_param(f"z{i}", z)]
        if has_bias:
            ins.append(g.add_param(f"b{i}", bias.astype(x.type.dtype.numpy)))
        outs.append(g.add_node("quant.linear", ins, {"bits": bits, "group": 128}))
    g.set_outputs(outs)
    exe = build(g, "cpu")
    xv = rng.standard_normal((2, 5, k)).astype(np.float32)
    x16v = xv[0].astype(np.float16)
    got, want = exe(xv, x16v), run(g, [xv, x16v])
    for i, (o, r) in enumerate(zip(got, want)):
        o, r = o.astype(np.float32), r.astype(np.float32)
        tol = 2e-3 if i == 3 else 1e-4
        np.testing.assert_allclose(o, r, rtol=tol, atol=tol * np.abs(r).max(), err_msg=str(i))
    # the quiet last group keeps its own small scale (not one shared with a loud full group)
    s = quantize_rtn(w, 4, 128, True)[1]
    assert np.all(s[:, 4] < 0.02 * s[:, :4].min(axis=1))
    assert np.abs(want[1] - xv @ w.T).max() <= 0.25 * np.abs(xv @ w.T).max()


@pytest.mark.parametrize("k", [256, 576])
def test_single_row_takes_the_gemv_kernel_and_matches(k):
    """A decode step's one row: the GEMV kernel (scale and zero outside the inner loop, group sums of x;
    a ragged last group -- K=576 at group 128 -- padded with zero codes) against the interpreter."""
    from llmasos.backends.tvm.kernels import fused_module
    rng = np.random.default_rng(k)
    w = rng.standard_normal((N, k)).astype(np.float32)
    w[:, k - 64:] *= 0.01  # a quiet last group: a wrong group index there shows as a large error
    bias = rng.standard_normal(N).astype(np.float32)
    g = Graph("gemv")
    x = g.add_input("x", TensorType((1, 1, k), DType.f32))
    outs = []
    # + a group of 7: ragged at both K, and the padded length odd (a nibble past the last whole byte)
    # + the output head's int8 g32 (quantize's head=int8, issue 16)
    extra = [(8, 128, False, False, True), (4, 7, False, False, False), (4, 7, True, False, True),
             (8, 32, True, False, False)]
    for i, (bits, group, symm, per_tensor, has_bias) in enumerate(VARIANTS + extra):
        q, s, z = quantize_rtn(w, bits, group, symm, per_tensor)
        codes, z = storage(q, z, bits, symm)
        ins = [x, g.add_param(f"q{i}", codes), g.add_param(f"s{i}", s), g.add_param(f"z{i}", z)]
        if has_bias:
            ins.append(g.add_param(f"b{i}", bias))
        outs.append(g.add_node("quant.linear", ins, {"bits": bits, "group": group}))
    g.set_outputs(outs)
    spec = dataclasses.replace(resolve_target("cpu"), extra={"int8_gemv": "off"})  # the float GEMV (the int8
    kernels = [f for gv, f in fused_module(g, spec).functions.items()              # one: tests below)
               if gv.name_hint.startswith("quant_linear")]
    assert len(kernels) == len(outs) and all("qdot" in f.script() for f in kernels)
    xv = rng.standard_normal((1, 1, k)).astype(np.float32)
    for i, (o, r) in enumerate(zip(build(g, spec)(xv), run(g, [xv]))):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5 * np.abs(r).max(), err_msg=str(i))


def _host_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


def _int8_gemv_emulated(x, q, s, z, group, digits):
    """numpy: the int8-activation GEMV's arithmetic (lowering_quant._build_qgemv_int8) -- x quantized per
    32-block, integer dot products, scales per block -- and the bound its error against the exact float
    product with the same weights keeps: sum_k |w_k| |x_k - xq_k sx| <= sum_k |w_k| sx_b / 2."""
    k = x.shape[-1]
    xb = x.reshape(-1, 32).astype(np.float32)
    am = np.abs(xb).max(axis=1, keepdims=True)
    inv = np.where(am > 0, np.float32(127) / np.where(am > 0, am, 1), 0).astype(np.float32)
    xq = np.round(xb * inv)
    if digits == 2:   # the remainder as a second int8 digit, in 1/254ths
        xq = xq + np.round((xb * inv - xq) * np.float32(254)) / 254
    sx = am / np.float32(127)
    gi = np.arange(k) // group if group else np.zeros(k, int)
    gi = np.minimum(gi, s.shape[1] - 1)   # per tensor: [1, 1]
    w = (q.astype(np.float64) - z.astype(np.float64)[:, gi]) * s.astype(np.float64)[:, gi]
    y = (xq * sx).reshape(k) @ w.T
    bound = np.abs(w) @ np.repeat(sx[:, 0] / (2 if digits == 1 else 508), 32)
    return y, bound, w


@pytest.mark.skipif(not _host_has("avx512_vnni"), reason="the int8 GEMV needs AVX512-VNNI (x86)")
@pytest.mark.parametrize("n, k, alderlake", [(40, 256, False), (97, 576, False), (33, 1536, False), (40, 576, True)])
def test_int8_gemv_matches_numpy(n, k, alderlake):
    """A decode step's quant.linear through the int8-activation GEMV (x86 VNNI; 512-bit with two int8 digits of
    x, and 256-bit under ``cpu:alderlake`` (AVX-VNNI) with one, where the host runs it): every code layout -- int8 signed / unsigned /
    per-tensor, int4 sym / asym at groups 32 and 128 (a ragged one at K=576) -- against numpy's emulation of
    the same arithmetic (f32 rounding only: 1e-5 of |y|'s scale) and, elementwise, within the bound that x's
    quantization error gives against the exact float product (the declared tolerance); group 7 (not whole
    32-blocks) keeps the float GEMV."""
    from llmasos.backends.tvm.kernels import fused_module
    if alderlake and not _host_has("avx_vnni"):
        pytest.skip("AVX-VNNI not on this host")
    spec = resolve_target("cpu:alderlake" if alderlake else "cpu")
    if alderlake:   # and llama.cpp's one int8 digit of x
        spec = dataclasses.replace(spec, extra={"int8_gemv_digits": 1})
    digits = spec.int8_gemv_digits()
    lanes = spec.int8_gemv_lanes()
    assert lanes == (8 if alderlake else 16)
    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    g = Graph("gemv8")
    x = g.add_input("x", TensorType((1, k), DType.f32))
    cases = [*VARIANTS, (8, 32, True, False, False), (4, 7, False, False, False)]
    outs, qs = [], []
    for i, (bits, group, symm, per_tensor, has_bias) in enumerate(cases):
        q, s, z = quantize_rtn(w, bits, group, symm, per_tensor)
        codes, zs = storage(q, z, bits, symm)
        qs.append((q, s, z))
        ins = [x, g.add_param(f"q{i}", codes), g.add_param(f"s{i}", s), g.add_param(f"z{i}", zs)]
        if has_bias:
            ins.append(g.add_param(f"b{i}", bias))
        outs.append(g.add_node("quant.linear", ins, {"bits": bits, "group": group}))
    g.set_outputs(outs)
    names = sorted(gv.name_hint for gv in fused_module(g, spec).functions if gv.name_hint.startswith("quant_linear"))
    # (kernels of equal shapes are one function): the group-7 one alone keeps the float GEMV
    assert [nm for nm in names if not nm.startswith("quant_linear_int8")] == ["quant_linear_panels"], names
    xv = rng.standard_normal((1, k)).astype(np.float32)
    xv[0, :32] *= 40.0   # a loud block next to quiet ones: each block's own scale
    xv[0, 32:64] = 0.0   # an all-zero block: scale 0, codes 0
    got, want = build(g, spec)(xv), run(g, [xv])
    for (bits, group, symm, per_tensor, has_bias), (q, s, z), o, r in zip(cases, qs, got, want):
        if group == 7:  # the float GEMV: as exact as before
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
            continue
        y, bound, wd = _int8_gemv_emulated(xv[0], q, s, z, 0 if per_tensor else group, digits)
        o = o[0] - (bias if has_bias else 0)
        scale = np.abs(wd).max() * np.abs(xv).sum()
        np.testing.assert_allclose(o, y, rtol=0, atol=1e-5 * np.abs(y).max(), err_msg=str((bits, group, symm)))
        exact = xv[0].astype(np.float64) @ wd.T
        assert np.all(np.abs(o - exact) <= bound + 1e-6 * scale), (bits, group, symm)
        # and against the float GEMV (the interpreter): a few tenths of a percent of |y| with one digit,
        # ~1e-5 with two
        tol = 0.01 if digits == 1 else 1e-4
        assert np.abs(o + (bias if has_bias else 0) - r[0]).max() <= tol * np.abs(r).max()


@pytest.mark.skipif(not _host_has("avx512_vnni"), reason="the int8 GEMV needs AVX512-VNNI (x86)")
def test_int8_gemv_prefill_and_decode_share_the_repacked_weights():
    """An LM's prefill (rows symbolic) and decode step (one row) in one library share one weight transform:
    both read the int8 GEMV's repacked blocks, so the repacking is lifted and runs once, at load. (While
    the prefill read the float panels, LiftTransformParams lifted neither and the decode step repacked
    every weight on every call: SmolLM2 int4 decode 3.6 instead of 16+ tokens/s.)"""
    from llmasos.backends.tvm.build import build_functions
    rng = np.random.default_rng(7)
    k, n = 576, 40
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s_, z = quantize_rtn(w, 4, 32, False)
    codes, z = storage(q, z, 4, False)
    graphs = {}
    for name, shape in (("prefill", (sym("s"), k)), ("decode", (1, k))):
        g = Graph(name)
        if name == "prefill":
            g.add_symbol("s", 1, 32)
        x = g.add_input("x", TensorType(shape, DType.f32))
        ins = [x, g.add_param("q", codes), g.add_param("s", s_), g.add_param("z", z)]
        g.set_outputs([g.add_node("quant.linear", ins, {"bits": 4, "group": 32})])
        graphs[name] = g
    exe = build_functions(graphs, "cpu")
    assert [tuple(a.shape) for a in exe.weights if str(a.dtype) == "uint8"] == [(2, 18, 2, 4, 64)]
    for name, rows in (("prefill", 5), ("decode", 1)):
        xv = rng.standard_normal((rows, k)).astype(np.float32)
        want = run(graphs[name], [xv])[0]
        got = exe.call(name, xv)[0]
        tol = 1e-4   # (the decode row: x as two int8 digits per 32-block, ~16 bits)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)


def test_int8_gemv_option():
    """int8_gemv = auto / on / body / off: off and non-VNNI CPUs keep the float GEMV; 'on' where it cannot run is
    an error that names the requirement; a bad value is an error."""
    off = dataclasses.replace(resolve_target("cpu"), extra={"int8_gemv": "off"})
    assert off.int8_gemv_lanes() is None
    old = resolve_target("cpu:haswell")   # AVX2, no VNNI
    assert old.int8_gemv_lanes() is None
    with pytest.raises(ValueError, match="AVX512-VNNI or AVX-VNNI"):
        dataclasses.replace(old, extra={"int8_gemv": "on"}).int8_gemv_lanes()
    with pytest.raises(ValueError, match="int8_gemv must be"):
        dataclasses.replace(old, extra={"int8_gemv": "yes"}).int8_gemv_lanes()
    with pytest.raises(ValueError, match="int8_gemv_digits must be 1 or 2"):
        dataclasses.replace(old, extra={"int8_gemv_digits": 3}).int8_gemv_digits()
    assert old.int8_gemv_digits() == 2
    assert dataclasses.replace(old, extra={"int8_gemv_digits": "1"}).int8_gemv_digits() == 1   # --target-option
    assert resolve_target("cpu:icelake-server").int8_gemv_lanes() == 16


@pytest.mark.skipif(not _host_has("avx512_vnni"), reason="the int8 GEMV needs AVX512-VNNI (x86)")
def test_int8_gemv_body_keeps_the_head_on_the_float_gemv():
    from llmasos.backends.tvm.kernels import fused_module
    w, _ = _weights(5)
    q, s_, z = quantize_rtn(w, 8, 32, True)
    g = Graph("heads")
    x = g.add_input("x", TensorType((1, K), DType.f32))
    outs = [g.add_node("quant.linear", [x, g.add_param(f"q{i}", q), g.add_param(f"s{i}", s_),
                                        g.add_param(f"z{i}", z)], {"bits": 8, "group": 32}, loc=loc)
            for i, loc in enumerate(["model.layers.0.mlp.down_proj (m.py:1)", "lm_head (m.py:2)"])]
    g.set_outputs(outs)
    body = dataclasses.replace(resolve_target("cpu"), extra={"int8_gemv": "body"})
    names = sorted(gv.name_hint for gv in fused_module(g, body).functions if gv.name_hint.startswith("quant_linear"))
    assert names == ["quant_linear_int8", "quant_linear_panels"], names


@pytest.mark.parametrize("bits, group, symm", [(8, 32, True), (4, 32, False), (4, 128, True)])
def test_quant_embedding_matches_interpreter(bits, group, symm):
    """quant.embedding (issue 16): the picked rows dequantized, on the CPU, K=576 (a ragged group at 128);
    and the same function builds for CUDA (no GPU needed to compile)."""
    from llmasos.backends.tvm.kernels import fused_module
    rng = np.random.default_rng(bits + group)
    v, k = 50, 576
    table = rng.standard_normal((v, k)).astype(np.float32)
    q, s, z = quantize_rtn(table, bits, group, symm)
    codes, z = storage(q, z, bits, symm)
    g = Graph("qemb")
    ids = g.add_input("ids", TensorType((1, 3), DType.i64))
    g.set_outputs([g.add_node("quant.embedding", [g.add_param("q", codes), g.add_param("s", s), g.add_param("z", z),
                                                  ids], {"bits": bits, "group": group})])
    idv = np.array([[0, 49, 17]], np.int64)
    got, want = build(g, "cpu")(idv)[0], run(g, [idv])[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    step = s.max() * (0.5 + 1e-3)  # within half a grid step of the float table
    assert np.abs(got[0] - table[[0, 49, 17]]).max() <= step
    assert any(gv.name_hint.startswith("quant_embedding") for gv in fused_module(g, "cuda").functions)
