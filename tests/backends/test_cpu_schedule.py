"""Every GEMM / reduction kernel of a fused model gets one of our CPU schedules.

A PrimFunc no rule takes is compiled as written: serial, scalar loops. For a GEMM that is two orders of
magnitude slower (fused.linear_glu once fell through this way: a 135M Llama took 14.7 s instead of 80 ms),
and nothing else would notice: the numbers stay right.
"""
from __future__ import annotations

import pytest
import torch
import tvm
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block

from llmasos.backends.tvm.cpu_schedule import Matmul, default_rules
from llmasos.backends.tvm.kernels import fused_module
from llmasos.backends.tvm.targets import resolve_target
from llmasos.frontends.torch_export import import_module
from llmasos.passes import PassManager
from tests.models import gpt2, llama


def _has_reduction(func) -> bool:
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    return any(iv.iter_type != tvm.tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_every_reduction_kernel_is_scheduled(make):
    model = make()
    graph = import_module(model, (torch.randint(0, 64, (1, 8)),)).graph
    graph = PassManager("fuse").run(graph)
    spec = resolve_target("cpu")
    mod = fused_module(graph, spec)
    with spec.tvm_target():
        mod = dl.ApplyDefaultSchedule(*default_rules())(mod)
    unscheduled = [gv.name_hint for gv, f in mod.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc) and _has_reduction(f)
                   and not (f.attrs is not None and "tirx.is_scheduled" in f.attrs)]
    assert not unscheduled, f"reduction kernels no CPU schedule rule took: {unscheduled}"
    # a DLight fallback rule may still take a GEMM, with a schedule far from ours: the weight GEMMs
    # (the panel kernels of lowering.py / lowering_fused.py) must be taken by our register-tiled rule
    gemms = {gv.name_hint: f for gv, f in fused_module(graph, spec).functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith("panel_")}
    assert gemms, "no panel GEMM kernels: the CPU GEMM path was not taken"
    with spec.tvm_target() as target:
        missed = [name for name, f in gemms.items() if Matmul().apply(f, target, False) is None]
    assert not missed, f"panel GEMM kernels the Matmul rule does not schedule: {missed}"


def test_single_row_norm_reduces_once_and_matches():
    """A decode step's rms_norm over one row: DLight's CPU Reduction rule recomputed the row's sum of
    squares under every output column (576 x 576 work for SmolLM2); SingleRowReduction reduces once."""
    import numpy as np

    from llmasos.backends.tvm import build
    from llmasos.backends.tvm.cpu_schedule import SingleRowReduction
    from llmasos.ir.interpreter import run
    from llmasos.ir.parser import parse

    graph = parse("""
graph @norm(%x: f32[1, 576]) {
  param %g: f32[576]
  %y: f32[1, 576] = rms_norm(%x, %g) {eps = 1e-05, ndim = 1}
  return %y
}
""")
    rng = np.random.default_rng(0)
    graph.param_data["g"] = rng.standard_normal(576).astype(np.float32)
    spec = resolve_target("cpu")
    funcs = [f for gv, f in fused_module(graph, spec).functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and _has_reduction(f)]
    assert len(funcs) == 1
    with spec.tvm_target() as target:
        sch = SingleRowReduction().apply(funcs[0], target, False)
        assert sch is not None
        assert default_rules()[2].__class__ is SingleRowReduction  # tried before DLight's rules
    for b in sch.get_child_blocks(get_root_block(sch)):
        if any(iv.iter_type != tvm.tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
            extents = [int(sch.get(lp).extent) for lp in sch.get_loops(b)]
            assert int(np.prod(extents)) == 576, extents
    x = rng.standard_normal((1, 576)).astype(np.float32)
    np.testing.assert_allclose(build(graph, "cpu")(x)[0], run(graph, [x])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, parallel", [(1, False), (256, True)])
def test_small_elementwise_kernels_stay_on_the_calling_thread(rows, parallel):
    """A decode step's small kernels (one row of 576) run serial -- no fork/join of the thread pool -- and a
    large one stays parallel (issue 16); both compute the same numbers."""
    import numpy as np

    from llmasos.backends.tvm import build
    from llmasos.backends.tvm.cpu_schedule import MIN_PARALLEL_WORK, Elementwise
    from llmasos.ir import DType, Graph, TensorType

    g = Graph("ew")
    x = g.add_input("x", TensorType((rows, 576), DType.f32))
    g.set_outputs([g.add_node("mul", [g.add_node("silu", [x]), x])])
    assert (rows * 576 >= MIN_PARALLEL_WORK) == parallel
    spec = resolve_target("cpu")
    funcs = [f for f in fused_module(g, spec).functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    with spec.tvm_target() as target:
        scripts = [Elementwise().apply(f, target, False).mod["main"].script() for f in funcs]
    assert any("T.parallel" in s for s in scripts) == parallel
    xv = np.random.default_rng(rows).standard_normal((rows, 576)).astype(np.float32)
    np.testing.assert_allclose(build(g, "cpu")(xv)[0], xv / (1 + np.exp(-xv)) * xv, rtol=1e-5, atol=1e-5)
