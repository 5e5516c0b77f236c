"""The TVM backend against the reference interpreter: a transformer block with dynamic shapes, export and
load, lowering errors and plugins, the target registry.

Every op against the interpreter is the conformance kit's job (llmasos.testing.conformance, run for the
CPU by tests/test_conformance_cpu.py): compiling is the slow part, so all op cases live in ONE graph with
symbolic dims (llmasos/testing/allops.py), built once; Hypothesis varies the symbol values and the data.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from llmasos.backends.tvm import (Executable, LoweringError, Signature, TargetSpec, build, compile_module,
                                  known_targets, lower, missing_lowerings, register_lowering, register_target,
                                  resolve_target)
from llmasos.backends.tvm import lowering as lowering_mod
from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.interpreter import run
from llmasos.testing.allops import assert_close

F32 = DType.f32
n = sym("n")


# ------------------------------------------------------------------------------------------------
# every op against the interpreter: the all-ops graph (llmasos/testing/allops.py) is checked for the CPU by
# the conformance kit, tests/test_conformance_cpu.py (fixed sizes, Hypothesis sizes, bad inputs)

def test_every_registered_op_has_a_lowering():
    assert missing_lowerings() == []


# ------------------------------------------------------------------------------------------------
# a transformer block with dynamic batch and seq

def llama_block(d=32, heads=4, kv_heads=2, ffn=48, max_seq=32, seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    hd = d // heads
    B, S = sym("batch"), sym("seq")
    g = Graph("block")
    g.add_symbol("seq", 1, max_seq)
    p = lambda name, *shape: g.add_param(name, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))  # noqa: E731
    x = g.add_input("x", TensorType((B, S, d), F32))
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(max_seq), inv)
    cos = g.add_param("cos", np.concatenate([np.cos(ang)] * 2, -1).astype(np.float32))
    sin = g.add_param("sin", np.concatenate([np.sin(ang)] * 2, -1).astype(np.float32))
    n1 = g.add_node("rms_norm", [x, g.add_param("ln1", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))],
                    {"eps": 1e-6})
    cos_s = g.add_node("slice", [cos], {"axis": 0, "start": 0, "end": S})
    sin_s = g.add_node("slice", [sin], {"axis": 0, "start": 0, "end": S})

    def heads_of(t, h):
        t = g.add_node("reshape", [t], {"shape": [B, S, h, hd]})
        return g.add_node("permute", [t], {"perm": [0, 2, 1, 3]})

    def rope(t):
        lo = g.add_node("slice", [t], {"axis": 3, "start": 0, "end": hd // 2})
        hi = g.add_node("slice", [t], {"axis": 3, "start": hd // 2, "end": hd})
        rot = g.add_node("concat", [g.add_node("neg", [hi]), lo], {"axis": 3})
        return g.add_node("add", [g.add_node("mul", [t, cos_s]), g.add_node("mul", [rot, sin_s])])

    q = rope(heads_of(g.add_node("linear", [n1, p("wq", d, d)]), heads))
    k = rope(heads_of(g.add_node("linear", [n1, p("wk", kv_heads * hd, d)]), kv_heads))
    v = heads_of(g.add_node("linear", [n1, p("wv", kv_heads * hd, d)]), kv_heads)
    att = g.add_node("sdpa", [q, k, v], {"is_causal": True})
    att = g.add_node("reshape", [g.add_node("permute", [att], {"perm": [0, 2, 1, 3]})], {"shape": [B, S, d]})
    h = g.add_node("add", [x, g.add_node("linear", [att, p("wo", d, d)])])
    n2 = g.add_node("rms_norm", [h, g.add_param("ln2", np.ones(d, np.float32))], {"eps": 1e-6})
    gate = g.add_node("silu", [g.add_node("linear", [n2, p("wg", ffn, d)])])
    up = g.add_node("linear", [n2, p("wu", ffn, d)])
    out = g.add_node("add", [h, g.add_node("linear", [g.add_node("mul", [gate, up]), p("wd", d, ffn)])])
    g.set_outputs([out])
    return g


@pytest.fixture(scope="session")
def block():
    g = llama_block()
    return g, build(g, "cpu")


def test_transformer_block_dynamic_shapes(block):
    g, exe = block
    rng = np.random.default_rng(0)
    for b, s in ((1, 1), (2, 7), (3, 32)):
        x = rng.standard_normal((b, s, 32)).astype(np.float32)
        assert_close(exe(x)[0], run(g, [x])[0], f"block batch={b} seq={s}", rel=1e-4)


def test_torch_in_torch_out(block):
    g, exe = block
    x = torch.randn(2, 5, 32)
    out = exe(x)[0]
    assert isinstance(out, torch.Tensor)
    assert_close(out.numpy(), run(g, [x.numpy()])[0], "torch io", rel=1e-4)


def test_export_and_load(block, tmp_path):
    g, exe = block
    path = exe.export_library(tmp_path / "block.so")
    x = np.random.default_rng(1).standard_normal((2, 9, 32)).astype(np.float32)
    want = exe(x)[0]
    params = {k: torch.from_numpy(np.asarray(v)) for k, v in g.param_data.items()}  # torch weights too
    by_graph = Executable.load(path, g, params, "cpu")
    np.testing.assert_array_equal(by_graph(x)[0], want)
    text = exe.signature.to_json()
    by_json = Executable.load(path, text, g.param_data, "cpu")
    np.testing.assert_array_equal(by_json(x)[0], want)
    assert by_json.param_names == list(g.params) == exe.param_names
    assert Signature.from_json(text).to_json() == text
    with pytest.raises(ValueError, match="missing data for parameters"):
        Executable.load(path, json.loads(text), {}, "cpu")


def test_lower_signature_and_attrs():
    g = llama_block()
    mod = lower(g)
    main = mod["main"]
    names = [p.name for p in main.params]
    assert names == ["x", *g.params]
    assert dict(main.attrs["tir_var_upper_bound"]) == {"seq": 32}
    assert int(main.attrs["num_input"]) == 1


def test_cpu_schedules_cover_a_transformer_block():
    """Every fused kernel of a Llama block gets a CPU schedule, GEMMs the register-tiled one (no compile:
    an unscheduled kernel runs serial and scalar, ~50x slower, while still passing numeric tests)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from llmasos.backends.tvm import cpu_schedule
    spec = resolve_target("cpu")
    target = spec.tvm_target()
    mod = relax.transform.LiftTransformParams()(lower(llama_block(), spec))
    with target:
        mod = tvm.transform.Sequential([relax.transform.FastMathTransform(), *cpu.library_dispatch_passes(target),
                                        *cpu.legalize_passes(target)])(mod)
    picked = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint != "main_transform_params":
            picked[gv.name_hint] = next((type(r).__name__ for r in cpu_schedule.default_rules()
                                         if r.apply(f, target, False) is not None), None)
    unscheduled = sorted(n for n, r in picked.items() if r is None)
    assert unscheduled == []
    gemms = {n: r for n, r in picked.items() if "matmul" in n}
    assert len(gemms) >= 3 and set(gemms.values()) == {"Matmul"}, gemms


# ------------------------------------------------------------------------------------------------
# errors, registry, targets

def test_lowering_error_names_the_node():
    g = Graph("bad")
    x = g.add_input("x", TensorType((3,), F32))
    g.set_outputs([g.add_node("neg", [x], loc="model.py:7")])
    saved = lowering_mod.LOWERINGS["neg"]

    def broken(ctx, node, args):
        raise RuntimeError("boom")
    register_lowering("neg", broken, replace=True)
    try:
        with pytest.raises(LoweringError, match=r"node %v\d+ = neg\(\.\.\.\) \[from model.py:7\]: .*boom"):
            lower(g)
    finally:
        register_lowering("neg", saved, replace=True)
    with pytest.raises(ValueError, match="'neg' already has a TVM lowering"):
        register_lowering("neg", saved)


def test_plugin_op_lowering():
    from llmasos.ir import ops
    from llmasos.ir.ops import defop
    from tvm import relax
    defop("test_square", ("x",), lambda x: x, lambda x: x * x)
    register_lowering("test_square", lambda ctx, node, args: relax.op.multiply(args[0], args[0]))
    try:
        g = Graph("plugin")
        x = g.add_input("x", TensorType((n,), F32))
        g.set_outputs([g.add_node("test_square", [x])])
        xs = np.arange(5, dtype=np.float32)
        np.testing.assert_array_equal(build(g, "cpu")(xs)[0], xs * xs)
    finally:
        ops.OPS.pop("test_square", None)
        lowering_mod.LOWERINGS.pop("test_square", None)


def test_packed_dtype_is_refused():
    g = Graph("i4")
    x = g.add_input("x", TensorType((4,), DType.i4))
    g.set_outputs([g.add_node("neg", [x])])
    with pytest.raises(LoweringError, match="packed dtype i4"):
        lower(g)


def test_target_registry():
    assert {"cpu", "llvm", "cpu-generic", "cuda"} <= set(known_targets())
    cpu = resolve_target("cpu")
    assert cpu.device == "cpu" and cpu.target["kind"] == "llvm" and cpu.target["mcpu"]
    assert resolve_target("cuda:sm_80").target == {"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": 49152,
                                                   "max_threads_per_block": 1024, "thread_warp_size": 32}
    assert resolve_target("cpu:skylake").target["mcpu"] == "skylake"
    spec = resolve_target({"kind": "cuda", "arch": "sm_90a"})
    assert spec.device == "cuda" and spec.schedule == "dlight-gpu"
    assert resolve_target(spec) is spec
    with pytest.raises(ValueError, match="unknown target 'tpu'; known targets: .*cpu.*cuda"):
        resolve_target("tpu")
    with pytest.raises(ValueError, match="unsupported TVM target kind 'rocm'"):
        resolve_target({"kind": "rocm"})
    with pytest.raises(ValueError, match="'cpu' is already registered"):
        register_target("cpu", cpu)
    register_target("test-cpu", TargetSpec("test-cpu", {"kind": "llvm"}, "cpu"))
    try:
        assert resolve_target("test-cpu").target == {"kind": "llvm"}
    finally:
        from llmasos.backends.tvm import targets
        targets._REGISTRY.pop("test-cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: TVM cannot compile CUDA kernels here")
def test_cuda_build(block, tmp_path):
    """CUDA kernels (DLight schedules) compile here; running them needs a GPU (see test_cuda_run)."""
    g, _ = block
    spec = resolve_target("cuda:sm_90a")
    ex = compile_module(lower(g, spec), spec)
    path = tmp_path / "block_cuda.so"
    ex.export_library(str(path))
    assert path.stat().st_size > 0


@pytest.mark.gpu
def test_cuda_run(block):
    g, _ = block
    exe = build(g, "cuda")
    x = torch.randn(2, 7, 32)
    out = exe(x.cuda())[0]
    assert out.is_cuda
    assert_close(out.cpu().numpy(), run(g, [x.numpy()])[0], "cuda block", rel=1e-4)
