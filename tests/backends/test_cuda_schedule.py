"""DecodeGEMV (cuda_schedule.py) on the generated CUDA source: built here without a GPU. Its numerics and
speed are checked on a GPU by bench/gemv_check.py (every variant matched the reference interpreter to
<= 4.3e-4 relative on an H200); the same TE functions are checked against the interpreter on the CPU by
test_quant_lowering.py."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from llmasos.backends.tvm import resolve_target
from llmasos.backends.tvm.build import cuda_source, pipeline_stages, prepare_module
from llmasos.backends.tvm.cuda_schedule import DecodeGEMV
from llmasos.backends.tvm.lower import lower
from llmasos.compress.quant import quantize_rtn, storage
from llmasos.ir import DType, Graph, TensorType, sym
from tests.backends.cuda_codegen import needs_cuda_codegen

pytestmark = needs_cuda_codegen
SPEC = resolve_target("cuda:sm_90a")


def _gemv_graph(kind: str, n: int, k: int, rows=1) -> Graph:
    g = Graph("g")
    if not isinstance(rows, int):
        g.add_symbol("batch", 1, 8)
    x = g.add_input("x", TensorType((rows, k), DType.f16))
    res = g.add_input("r", TensorType((rows, n), DType.f16))
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.02
    if kind == "f16":
        y = g.add_node("linear", [x, g.add_param("w", w.astype(np.float16))])
    else:
        bits, group = (4, 128) if kind == "int4" else (8, 0)
        q, s, z = quantize_rtn(w, bits, group, True, False)
        codes, z = storage(q, z, bits, True)
        y = g.add_node("quant.linear", [x, g.add_param("q", codes), g.add_param("s", s), g.add_param("z", z)],
                       {"bits": bits, "group": group})
    g.set_outputs([g.add_node("add", [y, res])])  # the residual add: DecodeGEMV's epilogue
    return g


def _gemv_kernel(g: Graph):
    """(the fused GEMV PrimFunc, DecodeGEMV's schedule of it or None)."""
    mod, config = prepare_module(lower(g, SPEC), SPEC)
    fusion, _ = pipeline_stages(SPEC)
    with tvm.transform.PassContext(opt_level=3, config=config), SPEC.tvm_target():
        mod = tvm.transform.Sequential(fusion)(mod)
    func = next(f for gv, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "linear" in gv.name_hint)
    return func, DecodeGEMV().apply(func, SPEC.tvm_target(), False)


def _source(sch) -> str:
    m = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "k")})
    lib = tvm.compile(m, target=SPEC.tvm_target())
    return cuda_source(lib)


@pytest.mark.parametrize("kind,n,k", [("f16", 2048, 8192), ("f16", 3072, 2048), ("int4", 2048, 2048),
                                      ("int8", 512, 1024)])
def test_decode_gemv_loads_16_bytes_a_lane_and_reduces_in_the_warp(kind, n, k):
    _, sch = _gemv_kernel(_gemv_graph(kind, n, k))
    assert sch is not None
    src = _source(sch)
    body = src[src.index("k_kernel("):]
    weight = "half* __restrict__ w_ptr" if kind == "f16" else "uint* __restrict__"
    assert weight in body.splitlines()[0]
    # the weight reaches registers only through 128-bit loads
    vector_loaded = set(re.findall(r"\*\(uint4\*\)\((\w+?)_local_ptr", body))
    assert vector_loaded == ({"w", "x"} if kind == "f16" else vector_loaded | {"x"}) and len(vector_loaded) == 2
    assert "__shfl_down_sync" in body                 # the lanes' partial sums, joined in the warp
    assert "+ r_ptr[" in body                         # the residual add rides along
    if kind != "f16":  # codes become floats through their bit pattern, not an int->float conversion
        assert "1258291200" in body and "(float)((" not in body


def test_decode_gemv_splits_k_over_warps_for_few_rows():
    """2048 rows of K=8192 (Llama-1B's down projection): several warps a row, joined in shared memory,
    so the grid has enough warps to keep HBM busy."""
    _, sch = _gemv_kernel(_gemv_graph("f16", 2048, 8192))
    src = _source(sch)
    assert "__shared__" in src and "red_result" in src


def test_decode_gemv_declines_symbolic_batches():
    """A symbolic batch stays with DLight's LowBatchGEMV (schedule_rules orders DecodeGEMV first)."""
    func, sch = _gemv_kernel(_gemv_graph("f16", 256, 512, rows=sym("batch")))
    assert sch is None
    assert DecodeGEMV().apply(func, tvm.target.Target({"kind": "llvm"}), False) is None


def test_decode_gemv_is_the_first_gpu_rule():
    from llmasos.backends.tvm.build import schedule_rules
    assert isinstance(schedule_rules(SPEC)[0], DecodeGEMV)


def test_decode_gemv_target_option_narrows_or_removes_it():
    """decode_gemv = "quantized" leaves float weights to DLight's GEMV, "off" drops the rule (A/B runs)."""
    import dataclasses

    from llmasos.backends.tvm.build import schedule_rules
    quantized = dataclasses.replace(SPEC, extra={"decode_gemv": "quantized"})
    rule = schedule_rules(quantized)[0]
    assert isinstance(rule, DecodeGEMV) and rule.quantized_only
    f16, _ = _gemv_kernel(_gemv_graph("f16", 256, 512))
    int4, _ = _gemv_kernel(_gemv_graph("int4", 256, 1024))
    assert rule.apply(f16, SPEC.tvm_target(), False) is None
    assert rule.apply(int4, SPEC.tvm_target(), False) is not None
    off = schedule_rules(dataclasses.replace(SPEC, extra={"decode_gemv": "off"}))
    assert not any(isinstance(r, DecodeGEMV) for r in off)
    with pytest.raises(ValueError, match=r"decode_gemv must be 'all', 'quantized' or 'off', got 'some'"):
        schedule_rules(dataclasses.replace(SPEC, extra={"decode_gemv": "some"}))


def _prefill_linear_kernel(spec, n=1024, k=512):
    """The fused prefill projection: x [seq, k] f16 (seq symbolic) times w [n, k] f16, plus a residual."""
    g = Graph("g")
    g.add_symbol("seq", 1, 1024)
    x = g.add_input("x", TensorType((sym("seq"), k), DType.f16))
    res = g.add_input("r", TensorType((sym("seq"), n), DType.f16))
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float16)
    g.set_outputs([g.add_node("add", [g.add_node("linear", [x, g.add_param("w", w)]), res])])
    mod, config = prepare_module(lower(g, spec), spec)
    fusion, _ = pipeline_stages(spec)
    with tvm.transform.PassContext(opt_level=3, config=config), spec.tvm_target():
        mod = tvm.transform.Sequential(fusion)(mod)
    return next(f for gv, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "linear" in gv.name_hint)


def test_sm_version_reads_the_hopper_a_variants():
    from llmasos.backends.tvm.cuda_schedule import sm_version
    assert [sm_version(a) for a in ("sm_90a", "sm_90", "sm_80", "sm_100a", "", "gfx90a")] == [90, 90, 80, 100, -1, -1]


def test_prefill_gemm_runs_on_the_tensor_cores_on_sm_90a():
    """DLight's Matmul reads "sm_90a" as no tensor cores; TensorCoreMatmul emits wmma (mma.sync) for it, and
    tensor_cores = "off" gives the CUDA-core schedule back (A/B runs)."""
    import dataclasses

    from llmasos.backends.tvm.build import schedule_rules
    from llmasos.backends.tvm.cuda_schedule import TensorCoreMatmul
    func = _prefill_linear_kernel(SPEC)
    sch = TensorCoreMatmul().apply(func, SPEC.tvm_target(), False)
    assert sch is not None
    src = _source(sch)
    assert "wmma::mma_sync" in src and "wmma::load_matrix_sync" in src
    rules = schedule_rules(SPEC)
    assert any(isinstance(r, TensorCoreMatmul) for r in rules)
    assert [type(r).__name__ for r in rules].index("TensorCoreMatmul") < [type(r).__name__ for r in rules].index("Matmul")
    off = schedule_rules(dataclasses.replace(SPEC, extra={"tensor_cores": "off"}))
    assert not any(isinstance(r, TensorCoreMatmul) for r in off)
    with pytest.raises(ValueError, match=r"tensor_cores must be 'on' or 'off', got 'yes'"):
        schedule_rules(dataclasses.replace(SPEC, extra={"tensor_cores": "yes"}))


def test_tensor_core_rule_leaves_gemvs_and_small_static_gemms_alone():
    from llmasos.backends.tvm.cuda_schedule import TensorCoreMatmul
    f16, _ = _gemv_kernel(_gemv_graph("f16", 2048, 2048))      # one row: a GEMV
    assert TensorCoreMatmul().apply(f16, SPEC.tvm_target(), False) is None
    small, _ = _gemv_kernel(_gemv_graph("f16", 2048, 2048, rows=32))   # static M = 32 <= 64
    assert TensorCoreMatmul().apply(small, SPEC.tvm_target(), False) is None


def test_decode_gemm_at_a_symbolic_batch_runs_the_small_m_tensor_core_kernel():
    """x [batch, K] @ W^T with batch symbolic (a decode step at batch > 1): the hand-written small-M kernel
    (cuda_gemm.py), mma.sync m16n8k16 with 16-byte operand loads; its numerics are checked on a GPU by
    bench/small_m_gemm_check.py. A shape it does not take (K not a multiple of its K step) keeps the generic
    lowering, and small_m_gemm = "off" removes it."""
    import dataclasses

    from llmasos.backends.tvm.build import compile_module
    from llmasos.backends.tvm.cuda_gemm import small_m_gemm_supported

    def graph(n, k):
        g = Graph("g")
        g.add_symbol("batch", 1, 32)
        x = g.add_input("x", TensorType((sym("batch"), 1, k), DType.f16))
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float16)
        g.set_outputs([g.add_node("linear", [x, g.add_param("w", w)])])
        return g

    def source(g, spec=SPEC):
        return cuda_source(compile_module(lower(g, spec), spec))

    assert small_m_gemm_supported(1024, 1024, "float16") and not small_m_gemm_supported(1024, 1000, "float16")
    src = source(graph(1024, 1024))
    assert "small_m_gemm" in src and "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert re.search(r"\*\(uint4\*\)\(w_reg_ptr", src)           # 16-byte weight loads into registers
    assert "small_m_gemm" not in source(graph(1024, 1000))
    off = dataclasses.replace(SPEC, extra={"small_m_gemm": "off"})
    assert "small_m_gemm" not in source(graph(1024, 1024), off)


def _small_m_graph(n, k):
    g = Graph("g")
    g.add_symbol("batch", 1, 64)
    x = g.add_input("x", TensorType((sym("batch"), 1, k), DType.f16))
    w = (np.random.default_rng(n + k).standard_normal((n, k)) * 0.05).astype(np.float16)
    g.set_outputs([g.add_node("linear", [x, g.add_param("w", w)])])
    return g, w


def _small_m_kernel(g, rows):
    """(name, PrimFunc) of the small-M kernel the lowering emits with target option small_m_rows = rows."""
    import dataclasses
    spec = dataclasses.replace(SPEC, extra={"small_m_rows": rows})
    mod = lower(g, spec)
    return next((gv.name_hint, f) for gv, f in mod.functions.items() if gv.name_hint.startswith("small_m_gemm"))


@pytest.mark.parametrize("rows,n,k", [("1", 32, 1024), ("2", 64, 512), ("4", 128, 256), ("4", 96, 256)])
def test_small_m_gemm_row_tiles_compute_x_wt_in_the_simt_interpreter(rows, n, k):
    """The kernel the lowering emits for R = 1, 2, 4 weight tiles a block, run lane by lane on the CPU
    (llmasos.backends.tvm.simt: mma.sync by the PTX fragment layout) against numpy, at batch rows that fill
    one MMA column tile, part of the block's four, and spill into a second block row (M = 40); two blocks
    along N. N = 96 takes no 64-row tile: R = 4 falls back to R = 2."""
    from llmasos.backends.tvm import simt
    g, w = _small_m_graph(n, k)
    name, func = _small_m_kernel(g, rows)
    want_r = 2 if n == 96 else int(rows)
    assert name == f"small_m_gemm_{n}x{k}" + (f"_r{want_r}" if want_r > 1 else "")
    for m in (1, 13, 40):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float16)
        y = np.full((m, n), np.nan, np.float16)        # an output never written stays NaN and fails
        simt.run(func, x, w, y)
        ref = x.astype(np.float32) @ w.astype(np.float32).T
        assert np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max() < 2e-3, (rows, m)


def test_small_m_rows_choice_and_target_option():
    """auto: R = 4 for Llama-1B's 16384-row gate/up and 32000-row LM head (>= 256 blocks of 64 rows), R = 2
    for 8192 rows, R = 1 for the 2048 / 3072-row projections; small_m_rows = 1 | 2 | 4 forces it (A/B
    runs), and the CUDA it builds still runs on mma.sync with 16-byte weight loads."""
    import dataclasses

    from llmasos.backends.tvm.build import compile_module
    from llmasos.backends.tvm.cuda_gemm import small_m_gemm_supported, small_m_rows
    assert [small_m_rows(n, k) for n, k in ((16384, 2048), (32000, 2048), (8192, 2048), (3072, 2048),
                                            (2048, 2048), (2048, 8192))] == [4, 4, 2, 1, 1, 1]
    assert small_m_gemm_supported(1024, 256, "float16", 4) and not small_m_gemm_supported(1040, 256, "float16", 4)
    assert not small_m_gemm_supported(1024, 1024, "float16", 3)
    g, _ = _small_m_graph(1024, 1024)
    assert _small_m_kernel(g, "auto")[0] == "small_m_gemm_1024x1024"          # 64 blocks: R = 1
    g2, _ = _small_m_graph(16384, 256)
    assert _small_m_kernel(g2, "auto")[0] == "small_m_gemm_16384x256_r4"
    assert dataclasses.replace(SPEC, extra={}).small_m_gemm(16384, 2048, "float16")[0] == \
        "small_m_gemm_16384x2048"                                             # default: R = 1 (GPU-measured)
    spec = dataclasses.replace(SPEC, extra={"small_m_rows": "4"})
    src = cuda_source(compile_module(lower(g, spec), spec))
    body = src[src.index("small_m_gemm_1024x1024_r4"):]
    assert body.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") >= 4 * 4 * 2   # R x tiles x k-steps
    assert re.search(r"\*\(uint4\*\)\(w_reg_ptr", body)
    with pytest.raises(ValueError, match=r"small_m_rows must be 'auto' or one of 1, 2, 4, got '3'"):
        dataclasses.replace(SPEC, extra={"small_m_rows": "3"}).small_m_gemm(1024, 1024, "float16")


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_a_half_precision_norm_is_one_kernel(norm):
    """An f16 norm computes in f32 inside one kernel (the casts are the reduction's prologue and epilogue):
    R.astype + R.nn.<norm> left the cast of x a launch of its own, two a norm, 32 of a Llama-1B step."""
    g = Graph("n")
    x = g.add_input("x", TensorType((1, 1, 256), DType.f16))
    w = g.add_param("w", np.linspace(0.5, 1.5, 256).astype(np.float16))
    ins = [x, w] + ([g.add_param("b", np.full(256, 0.1, np.float16))] if norm == "layer_norm" else [])
    g.set_outputs([g.add_node(norm, ins, {"eps": 1e-5, "ndim": 1})])
    from llmasos.backends.tvm import compile_module
    src = cuda_source(compile_module(lower(g, SPEC), SPEC))
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src)
    assert sorted(set(kernels)) == [f"{norm}_in_f32_kernel"], kernels    # (a declaration, then the definition)


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_the_one_kernel_norm_equals_the_reference_on_the_cpu(norm):
    """The same lowering on the CPU against the reference interpreter (f32 accumulation, one f16 rounding)."""
    from llmasos.backends.tvm import build
    from llmasos.ir.interpreter import run
    rng = np.random.default_rng(1)
    g = Graph("n")
    x = g.add_input("x", TensorType((3, 5, 96), DType.f16))
    w = g.add_param("w", rng.uniform(0.5, 1.5, 96).astype(np.float16))
    ins = [x, w] + ([g.add_param("b", rng.standard_normal(96).astype(np.float16))] if norm == "layer_norm" else [])
    g.set_outputs([g.add_node(norm, ins, {"eps": 1e-5, "ndim": 1})])
    xs = (rng.standard_normal((3, 5, 96)) * 3).astype(np.float16)
    got = build(g, "cpu")(xs)
    got = np.asarray(got[0] if isinstance(got, (list, tuple)) else got.numpy() if hasattr(got, "numpy") else got)
    np.testing.assert_allclose(got.astype(np.float32), run(g, [xs])[0].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_small_m_kernels_launch_a_weight_tiles_batch_row_groups_together():
    """M > 32 gives a weight tile several blocks (32 batch rows each): they are the grid's fastest axis
    (blockIdx.x over M), so the second finds the tile's weights in L2 instead of HBM; ``m_fastest=False``
    keeps the first order (weight tiles on blockIdx.x) for A/B on a GPU."""
    from llmasos.backends.tvm.cuda_gemm import small_m_gemm_func, small_m_quant_gemm_func

    def grid(func):   # {tag: extent} of the block axes, from the TVMScript text
        return {tag: extent for extent, tag in re.findall(r'T\.thread_binding\((.*), thread="(blockIdx\.[xyz])"\)',
                                                         func.script())}

    for make in (lambda **kw: small_m_gemm_func(64, 1024, **kw),
                 lambda **kw: small_m_quant_gemm_func(64, 1024, 4, 128, **kw)):
        new, old = grid(make()), grid(make(m_fastest=False))
        assert "M" in new["blockIdx.x"] and "M" not in new["blockIdx.y"], new
        assert "M" in old["blockIdx.y"] and "M" not in old["blockIdx.x"], old
