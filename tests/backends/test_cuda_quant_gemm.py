"""The int4/int8 small-M tensor-core GEMM (cuda_gemm.small_m_quant_gemm_func) without a GPU: the generated
CUDA of a quant.linear at a symbolic batch, and the numerics of its weight layout and in-register dequant
emulated in numpy from the load-time repack (run through TVM on the CPU) and the PTX fragment layout of
mma.m16n8k16 -- a wrong permutation, nibble order or scale pairing fails here. Speed and the numerics of
the kernel itself on a GPU: bench/small_m_quant_gemm_check.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import te

from llmasos.backends.tvm import resolve_target
from llmasos.backends.tvm.build import compile_module, cuda_source
from llmasos.backends.tvm.cuda_gemm import (TILE_N, quant_chunk, quant_repack_scales, quant_repack_words,
                                            quant_words_dequant, small_m_quant_gemm_supported)
from llmasos.backends.tvm.lower import lower
from llmasos.compress.quant import dequantize, quantize_rtn, storage
from llmasos.ir import DType, Graph, TensorType, sym

# the kernel is opt-in until it has run on a GPU (bench/small_m_quant_gemm_check.py)
SPEC = dataclasses.replace(resolve_target("cuda:sm_90a"), extra={"small_m_quant_gemm": "on"})
needs_cuda = pytest.mark.skipif(tvm.get_global_func("target.build.cuda", allow_missing=True) is None,
                                reason="this TVM build has no CUDA code generator")


def _quant(n, k, bits, group, sym_, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    q, s, z = quantize_rtn(w, bits, group, sym_, False)
    codes, zs = storage(q, z, bits, sym_)
    return codes, s, zs


def _graph(n, k, bits, group, sym_=True, bias=False, rows=None):
    g = Graph("g")
    g.add_symbol("batch", 1, 64)
    x = g.add_input("x", TensorType((sym("batch") if rows is None else rows, 1, k), DType.f16))
    codes, s, z = _quant(n, k, bits, group, sym_)
    ins = [x, g.add_param("q", codes), g.add_param("s", s), g.add_param("z", z)]
    if bias:
        ins.append(g.add_param("b", np.ones(n, np.float16)))
    g.set_outputs([g.add_node("quant.linear", ins, {"bits": bits, "group": group})])
    return g


def _source(g, spec=SPEC):
    return cuda_source(compile_module(lower(g, spec), spec))


def _kernels(g, spec=SPEC):
    """Names of the lowered module's functions (no CUDA build: cheap)."""
    return {gv.name_hint for gv in lower(g, spec).functions}


@needs_cuda
def test_quant_linear_at_a_symbolic_batch_runs_the_int4_tensor_core_kernel():
    """One CUDA build (the int4 case with a bias, its repack hoisted into the load-time transform); the
    other cases are read off the lowered module."""
    from llmasos.backends.tvm.build import prepare_module
    g = _graph(256, 512, 4, 128, bias=True)
    src = _source(g)
    assert "small_m_quant_gemm_256x512_q4g128" in src
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    for ins in ("lop3.b32", "sub.f16x2", "fma.rn.f16x2", "prmt.b32"):   # the half2 dequant
        assert ins in src, ins
    assert "*(uint4*)(w_reg_ptr" in src                       # 16 bytes of codes per lane and step
    mod, _ = prepare_module(lower(g, SPEC), SPEC)             # the repack runs at load, not per step
    names = {gv.name_hint for gv in mod.functions}
    assert any(name.endswith("transform_params") for name in names), names
    assert "quant_words" not in str(mod["main"]) and "quant_words" in str(mod)
    assert any(n.startswith("small_m_quant_gemm_256x512_q8g0") for n in _kernels(_graph(256, 512, 8, 0, sym_=False)))
    off = dataclasses.replace(SPEC, extra={"small_m_quant_gemm": "off"})
    assert not any(n.startswith("small_m_quant_gemm") for n in _kernels(_graph(256, 512, 4, 128), off))
    default = resolve_target("cuda:sm_90a")                  # off by default (not yet run on a GPU)
    assert not any(n.startswith("small_m_quant_gemm") for n in _kernels(_graph(256, 512, 4, 128), default))
    assert not any(n.startswith("small_m_quant_gemm") for n in _kernels(_graph(256, 512, 4, 32)))  # group < chunk
    one = _graph(256, 512, 4, 128, rows=1)                   # batch 1: DecodeGEMV unless asked for "all"
    assert not any(n.startswith("small_m_quant_gemm") for n in _kernels(one))
    assert any(n.startswith("small_m_quant_gemm") for n in _kernels(one, dataclasses.replace(
        SPEC, extra={"small_m_quant_gemm": "all"})))
    with pytest.raises(ValueError, match="small_m_quant_gemm must be 'on', 'all' or 'off'"):
        dataclasses.replace(SPEC, extra={"small_m_quant_gemm": "no"}).small_m_quant_gemm(256, 512, 4, 128, "float16")


def test_supported_shapes():
    assert small_m_quant_gemm_supported(2048, 2048, 4, 128, "float16")
    assert small_m_quant_gemm_supported(2048, 576, 4, 64, "float16")       # K = 9 chunks: a ragged K split
    assert small_m_quant_gemm_supported(2048, 2048, 8, 32, "float16")
    assert not small_m_quant_gemm_supported(2048, 2048, 4, 32, "float16")
    assert not small_m_quant_gemm_supported(2040, 2048, 4, 128, "float16")
    assert not small_m_quant_gemm_supported(2048, 2048, 4, 128, "float32")


def _run_te(fn, *arrays):
    """A load-time repack TE function run on the CPU."""
    ph = [te.placeholder(a.shape, str(a.dtype), name=f"a{i}") for i, a in enumerate(arrays)]
    out = fn(*ph)
    lib = tvm.compile(te.create_prim_func([*ph, out]), target="llvm")
    res = tvm.runtime.empty([int(d) for d in out.shape], out.dtype, tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in arrays], res)
    return res.numpy()


def _f16x2(u32):
    """uint32 words read as (low, high) f16 pairs: [..., 2]."""
    return np.ascontiguousarray(u32.astype(np.uint32)).view(np.float16).reshape(*u32.shape, 2)


def _emulate(x, words, sz, n, k, bits, group):
    """y [M, N] as the kernel computes it, from the repacked words and scale words: per 16-row tile, chunk,
    lane (g, t) and k-step s the kernel's dequant of its four A registers (lop3 / sub.f16x2 / fma.rn.f16x2 in
    f16), placed in the A tile by the PTX layout of mma.m16n8k16 (a0a1: row g, cols 2t..2t+1; a2a3: g+8;
    a4a5: g, 2t+8..; a6a7: g+8, 2t+8..), against B[col, m] = x[m, chunk + 4S t + 4s + e] for col = 2t, 2t+1,
    2t+8, 2t+9 (e = 0..3): the weight the MMA sees is scattered back to its K column and the product taken."""
    S = 4 if bits == 4 else 2
    ch = quant_chunk(bits)
    mask = 0x000F000F if bits == 4 else 0x00FF00FF
    wv = words.reshape(n // TILE_N, k // ch, 8, 4, 4).astype(np.uint32)     # tile, chunk, g, t, word
    szw = sz.reshape(n // TILE_N, -1, 8, 2).astype(np.uint32)              # tile, group, g, row half
    w_seen = np.zeros((n, k), np.float32)
    for s in range(S):
        for r in range(4):
            src = (wv[..., s] >> (4 * r)) if bits == 4 else (wv[..., 2 * s + r // 2] >> (8 * (r % 2)))
            h = _f16x2((src & mask) | 0x64006400) - np.float16(1024)            # exact: the code
            c = np.arange(k // ch)
            gi = (c * ch // group) if group else np.zeros_like(c)
            pair = _f16x2(szw[:, gi][..., r % 2])                                   # tile, chunk, g, (s, -z s)
            a = (h.astype(np.float32) * pair[..., None, 0:1].astype(np.float32)
                 + pair[..., None, 1:2].astype(np.float32)).astype(np.float16)   # one rounding, like fma.rn
            # a: tile, chunk, g, t, 2 -- row g + 8 (r % 2), logical cols (2t, 2t+1) + 8 (r // 2) -> e
            for half in range(2):
                e = 2 * (r // 2) + half
                for t in range(4):
                    rows = np.arange(n // TILE_N)[:, None] * TILE_N + np.arange(8)[None, :] + 8 * (r % 2)
                    cols = np.arange(k // ch) * ch + 4 * S * t + 4 * s + e
                    w_seen[rows[:, None, :], cols[None, :, None]] = a[:, :, :, t, half]
    return x.astype(np.float32) @ w_seen.T, w_seen


@pytest.mark.parametrize("bits,group,sym_", [(4, 128, True), (4, 64, False), (4, 0, True),
                                             (8, 32, True), (8, 0, False)])
def test_repacked_layout_and_dequant_give_the_weight(bits, group, sym_):
    n, k, m = 32, 256, 5
    codes, s, z = _quant(n, k, bits, group, sym_, seed=bits + group)
    signed8 = bits == 8 and codes.dtype == np.int8
    words = _run_te(lambda c: quant_repack_words(c, n, k, bits, signed8), codes)
    groups = 1 if group == 0 else -(-k // group)
    sz = _run_te(lambda a, b: quant_repack_scales(a, b, n, groups, signed8), s, z)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float16)
    y, w_seen = _emulate(x, words, sz, n, k, bits, group)
    q = codes if bits == 8 else None
    if bits == 4:
        from llmasos.compress.quant import unpack_int4
        q = unpack_int4(codes)
    w_ref = dequantize(q, s, z, bits, group)                      # f32 (q - z) * s of the stored codes
    err = np.abs(w_seen - w_ref).max() / np.abs(w_ref).max()
    assert err < 2e-3, err                                   # f16 rounding of s, -z s and the weight
    ref = x.astype(np.float32) @ w_ref.T
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-3
    # the prompt's GEMMs read the same words back into an f16 weight: exactly the weight the MMA sees
    w16 = _run_te(lambda a, b: quant_words_dequant(a, b, n, k, bits, group), words, sz)
    assert w16.dtype == np.float16
    np.testing.assert_array_equal(w16, w_seen.astype(np.float16))


def _two_functions(n, k, bits, group):
    """A prefill-like function (x [batch, seq, K]) and a decode-like one (x [batch, 1, K]) over one
    quant.linear weight, as compile_lm's functions share their parameters."""
    codes, s, z = _quant(n, k, bits, group, True)
    graphs = {}
    for name, lead in (("prefill", (sym("batch"), sym("seq"))), ("decode", (sym("batch"), 1))):
        g = Graph(name)
        g.add_symbol("batch", 1, 64)
        g.add_symbol("seq", 1, 512)
        x = g.add_input("x", TensorType((*lead, k), DType.f16))
        ins = [x, g.add_param("q", codes), g.add_param("s", s), g.add_param("z", z)]
        g.set_outputs([g.add_node("quant.linear", ins, {"bits": bits, "group": group})])
        graphs[name] = g
    return graphs


def _calls(mod):
    from tvm import relax
    out = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            out[gv.name_hint] = {b.value.args[0].name_hint for blk in f.body.blocks for b in blk.bindings
                                 if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.call_tir")}
    return out


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0)])
def test_prefill_and_decode_share_one_lifted_repack(bits, group):
    """The decode step reads the weight through the small-M kernel's repacked words; the prompt's GEMM
    must read the same words (dequantized per call into an f16 temporary, then the tensor-core prefill
    GEMM), or LiftTransformParams -- one transform for both functions -- lifts neither repacking and the
    decode step repacks its words at every step. With the kernel off, both read the plain packed words."""
    from llmasos.backends.tvm.lower import lower_functions
    from llmasos.backends.tvm.pipeline import prepare_module
    n, k = 128, 256
    for spec, decode_kernel in ((SPEC, "small_m_quant_gemm"), (dataclasses.replace(SPEC, extra={}), "quant_linear")):
        mod, _ = prepare_module(lower_functions(_two_functions(n, k, bits, group), spec), spec)
        calls = _calls(mod)
        repack = {c for c in calls["transform_params"] if "words" in c or "zero_times_scale" in c}
        assert repack, calls["transform_params"]
        assert not any("words" in c or "zero_times" in c for c in calls["decode"] | calls["prefill"]
                       if "dequant" not in c), calls
        assert any(c.startswith(decode_kernel) for c in calls["decode"]), calls["decode"]
        if decode_kernel == "small_m_quant_gemm":
            assert {"quant_words_dequant"} <= calls["prefill"] and any(c.startswith("prefill_gemm") for c in calls["prefill"])


@pytest.mark.parametrize("rows,n,k,bits,group,sym_", [
    ("1", 32, 512, 4, 128, True), ("2", 64, 576, 4, 64, False),   # 576: 9 chunks, a ragged K split
    ("4", 128, 512, 4, 0, True), ("4", 128, 256, 8, 0, False), ("2", 64, 256, 8, 32, True)])
def test_the_kernel_itself_in_the_simt_interpreter(rows, n, k, bits, group, sym_):
    """The int kernel the lowering emits (R = small_m_rows 16-row tiles a block), run lane by lane on the
    CPU by llmasos.backends.tvm.simt -- lop3 / prmt / sub.f16x2 / fma.rn.f16x2 bit for bit, mma.sync by
    the PTX fragment layout -- on the load-time repack's words, against numpy's x @ dequantize(codes)^T, at
    M = 3 (part of one column tile) and 40 (a second block row). Two blocks along N."""
    from llmasos.backends.tvm import simt
    from llmasos.compress.quant import unpack_int4
    spec = dataclasses.replace(SPEC, extra={"small_m_quant_gemm": "on", "small_m_rows": rows})
    name, func = next((gv.name_hint, f) for gv, f in lower(_graph(n, k, bits, group, sym_), spec).functions.items()
                      if gv.name_hint.startswith("small_m_quant_gemm"))
    assert name.endswith(f"_r{rows}" if rows != "1" else f"q{bits}g{group}")
    codes, s, z = _quant(n, k, bits, group, sym_)                  # the graph's parameters (same seed)
    signed8 = bits == 8 and codes.dtype == np.int8
    words = _run_te(lambda c: quant_repack_words(c, n, k, bits, signed8), codes)
    sz = _run_te(lambda a, b: quant_repack_scales(a, b, n, 1 if group == 0 else -(-k // group), signed8), s, z)
    w_ref = dequantize(unpack_int4(codes) if bits == 4 else codes, s, z, bits, group)
    for m in (3, 40):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
        y = np.full((m, n), np.nan, np.float16)          # an output never written stays NaN and fails
        simt.run(func, x, words, sz, y)
        ref = x.astype(np.float32) @ w_ref.T
        assert np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max() < 3e-3, m


def test_row_tiles_choice():
    from llmasos.backends.tvm.cuda_gemm import small_m_quant_rows
    assert [small_m_quant_rows(n) for n in (32000, 16384, 8192, 3072, 2048, 2040)] == [4, 4, 2, 1, 1, 1]
    forced = dataclasses.replace(SPEC, extra={"small_m_quant_gemm": "on", "small_m_rows": "4"})
    assert forced.small_m_quant_gemm(96, 512, 4, 128, "float16")[0].endswith("_r2")   # 96 rows: no 64-row tile
