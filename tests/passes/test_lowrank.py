"""The lowrank pass: what it rewrites (linear, fused.linear_act, matmul), parameter reduction, the SVD error
bound, SVD-LLM beating SVD on calibration data, skipping layers that would not save FLOPs, and errors."""
from __future__ import annotations

import numpy as np
import pytest

from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.graph import param_array
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import PassManager
from llmasos.passes.base import PassError
from llmasos.passes.calibration import Calibration
from llmasos.passes.pipeline import parse_pipeline


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registers the pass when these tests run, not at collection (see test_prune.py)."""
    import llmasos.passes.lowrank as lr
    return lr


def mlp_graph(seed=0, low_rank_fc2: int = 0) -> Graph:
    """x -> linear(+bias) [128, 64] -> fused.linear_act(silu) [128, 128] -> matmul [128, 64] -> lm_head."""
    rng = np.random.default_rng(seed)
    g = Graph("mlp")
    g.add_symbol("s", 1, 64)
    x = g.add_input("x", TensorType((sym("s"), 64), DType.f32))
    p = lambda name, *shape: g.add_param(name, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32))  # noqa: E731
    fc2 = p("fc2.weight", 128, 128)
    if low_rank_fc2:
        u, v = rng.standard_normal((128, low_rank_fc2)), rng.standard_normal((low_rank_fc2, 128))
        g.param_data["fc2.weight"] = (u @ v / 128).astype(np.float32)
    h = g.add_node("linear", [x, p("fc1.weight", 128, 64), p("fc1.bias", 128)])
    h = g.add_node("fused.linear_act", [h, fc2], {"act": "silu"})
    h = g.add_node("matmul", [h, p("proj.weight", 128, 64)])
    g.set_outputs([g.add_node("linear", [h, p("lm_head.weight", 32, 64)])])
    return g


def calibration(n=2, rows=48) -> Calibration:
    # correlated, unevenly scaled inputs: where activation-aware factoring has something to exploit
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((64, 64)) * np.exp(rng.standard_normal(64))[None, :]
    return Calibration([(rng.standard_normal((rows, 64)) @ mix).astype(np.float32) for _ in range(n)],
                       progress=False)


X = np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)
SHAPES = {"fc1.weight": (128, 64), "fc2.weight": (128, 128), "proj.weight": (64, 128)}  # as [N, K]


def factors(g2: Graph, name: str):
    """(A [N, r], B [r, K]) of a factored weight, whatever the layout it is stored in."""
    a, b = (param_array(g2.param_data[f"{name}.lr_{s}"]) for s in "ab")
    return (a.T, b.T) if name == "proj.weight" else (a, b)


@pytest.mark.parametrize("method", ["svd", "asvd", "svdllm"])
def test_factored_graph_equals_the_original_with_w_replaced_by_a_b(method):
    g = mlp_graph()
    g2 = PassManager(f"lowrank{{method={method}}}", calibration=calibration()).run(g)
    verify(g2)
    assert g2.op_counts() == {"linear": 4, "fused.linear_act": 1, "matmul": 2}
    act = next(n for n in g2.nodes if n.op == "fused.linear_act")
    assert act.attrs["act"] == "silu" and act.inputs[1].name == "fc2.weight.lr_a"   # the act stays outside
    assert act.inputs[0].producer.op == "linear" and act.inputs[0].producer.inputs[1].name == "fc2.weight.lr_b"
    outer = next(n for n in g2.nodes if n.inputs[1].name == "fc1.weight.lr_a")   # the bias stays outside too
    assert outer.op == "linear" and outer.inputs[2].name == "fc1.bias"
    assert outer.inputs[0].producer.inputs[1].name == "fc1.weight.lr_b"
    mm = next(n for n in g2.nodes if n.inputs[1].name == "proj.weight.lr_a")    # matmul(matmul(x, B^T), A^T)
    assert mm.op == "matmul" and mm.inputs[0].producer.op == "matmul"
    ref = g.clone()
    for name, (n, k) in SHAPES.items():
        a, b = factors(g2, name)
        assert a.shape[0] == n and b.shape[1] == k
        # ratio 0.2: the factored layer keeps at most 80% of its parameters
        assert a.size + b.size <= 0.8 * n * k
        ref.param_data[name] = (a @ b).T if name == "proj.weight" else a @ b
        assert name not in g2.params
    # the head is excluded by default: the same, untouched parameter
    assert g2.param_data["lm_head.weight"] is g.param_data["lm_head.weight"]
    want = run(ref, [X])[0]
    np.testing.assert_allclose(run(g2, [X])[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert g2.param_bytes() < g.param_bytes() - 0.2 * 4 * sum(n * k for n, k in SHAPES.values())


def test_svd_error_equals_the_discarded_singular_values(registered):
    g = mlp_graph()
    g2 = PassManager("lowrank{ratio=0.5}").run(g)
    for name in SHAPES:
        w = param_array(g.param_data[name])
        w = w.T if name == "proj.weight" else w
        a, b = factors(g2, name)
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        r = a.shape[1]
        assert registered.last_report["factored"][name] == r
        err = np.linalg.norm(w - a.astype(np.float64) @ b)
        np.testing.assert_allclose(err, np.sqrt((s[r:] ** 2).sum()), rtol=1e-4)


def test_svdllm_output_error_on_calibration_data_is_at_most_svds():
    g, calib = mlp_graph(), calibration()
    x = np.concatenate([b[0] for b in calib.batches]).astype(np.float64)   # fc1's input rows
    w = param_array(g.param_data["fc1.weight"]).astype(np.float64)
    errs = {}
    for method in ("svd", "asvd", "svdllm"):
        a, b = factors(PassManager(f"lowrank{{method={method},ratio=0.5}}", calibration=calib).run(g), "fc1.weight")
        errs[method] = np.linalg.norm(x @ (w - a.astype(np.float64) @ b).T)
    assert errs["svdllm"] <= errs["svd"] * (1 + 1e-5), errs
    assert errs["svdllm"] < 0.9 * errs["svd"], errs    # and by a margin on these correlated inputs


def test_energy_factors_only_layers_that_save_flops_and_counts_the_rest(registered):
    g = mlp_graph(low_rank_fc2=4)
    g2 = PassManager("lowrank{energy=0.99}").run(g)
    verify(g2)
    # fc2 has rank 4: factored at rank <= 4; the full-rank ones need r with r (N + K) >= N K and stay
    assert list(registered.last_report["factored"]) == ["fc2.weight"]
    assert registered.last_report["factored"]["fc2.weight"] <= 4
    assert sorted(registered.last_report["skipped"]) == ["fc1.weight", "proj.weight"]
    assert g2.param_data["fc1.weight"] is g.param_data["fc1.weight"]
    with pytest.raises(PassError, match=r"no layer qualifies: factoring saves FLOPs only where r \(N \+ K\) < N K, "
                                        r"and none of the 3 candidate GEMMs' ranks does \(%fc1.weight \[128, 64\] -> r="):
        PassManager("lowrank{energy=0.999}").run(mlp_graph())
    with pytest.raises(PassError, match=r"no GEMM with a static rank-2 float parameter weight outside "
                                        r"exclude='fc,proj,lm_head' to factor"):
        PassManager('lowrank{exclude="fc,proj,lm_head"}').run(g)


@pytest.mark.parametrize("method", ["asvd", "svdllm"])
def test_activation_aware_methods_need_calibration(method):
    with pytest.raises(PassError, match=rf"pass 'lowrank\{{method={method}\}}': needs calibration data"):
        PassManager(f"lowrank{{method={method}}}").run(mlp_graph())


@pytest.mark.parametrize("text, message", [
    ("lowrank{ratio=0.0}", "ratio=0.0 must be in (0, 1): the fraction of each layer's parameters removed"),
    ("lowrank{ratio=1.0}", "ratio=1.0 must be in (0, 1)"),
    ("lowrank{energy=1.5}", "energy=1.5 must be in (0, 1] (or 0 to choose the rank by ratio)"),
    ("lowrank{method=tucker}", "option 'method' of pass 'lowrank' takes one of 'svd', 'asvd', 'svdllm'"),
])
def test_bad_options_fail_when_the_pipeline_is_built(text, message):
    with pytest.raises(ValueError) as e:
        parse_pipeline(text)
    assert message in str(e.value)
    assert str(e.value).startswith("pipeline: column ")


def test_llama_svdllm_runs_and_shrinks():
    from tests.passes.test_prune import llama_calibration, llama_ids, tiny_llama_graph
    g = tiny_llama_graph()
    g2 = PassManager("lowrank{method=svdllm}", calibration=llama_calibration()).run(g)
    verify(g2)
    assert g2.op_counts()["linear"] == g.op_counts()["linear"] + 14   # 7 GEMMs per layer; lm_head kept
    assert g2.param_bytes() < g.param_bytes() - 0.2 * 4 * 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert np.all(np.isfinite(run(g2, [llama_ids()])[0]))
