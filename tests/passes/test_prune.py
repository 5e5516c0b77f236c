"""The prune and prune-channels passes: exact sparsity and N:M masks per layer, exclude, calibration
required, option errors, and structured MLP pruning that shrinks shapes and equals zeroing those channels."""
from __future__ import annotations

import functools

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
    """Registers the passes when these tests run, not at collection (test_pipeline.py registers toy passes
    into a scratch registry). Until base.BUILTIN_MODULES lists llmasos.passes.prune."""
    import llmasos.passes.prune as p
    return p


@functools.lru_cache(maxsize=None)
def tiny_llama_graph() -> Graph:
    """The imported 2-layer Llama of tests/models.py, imported once per session (test_lowrank uses it too).
    Passes never mutate their input, so sharing it is safe."""
    from llmasos.frontends.torch_export import import_module
    from tests.models import llama, token_ids
    return import_module(llama(), (token_ids(2, 8),)).graph


def llama_calibration() -> Calibration:
    from tests.models import token_ids
    return Calibration([token_ids(2, 8, seed=10 + i).numpy() for i in range(2)], progress=False)


def llama_ids() -> np.ndarray:
    from tests.models import token_ids
    return token_ids(2, 8, seed=3).numpy()


def weights(g: Graph) -> dict:
    return {k: np.array(param_array(v)) for k, v in g.param_data.items()}


GEMM_WEIGHTS = [f"model.layers.{i}.{m}" for i in range(2) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_llama_sparsity_is_exact_per_layer_and_the_head_and_input_stay(method):
    g = tiny_llama_graph()
    before = weights(g)
    g2 = PassManager(f"prune{{method={method}}}", calibration=llama_calibration()).run(g)
    verify(g2)
    for name in GEMM_WEIGHTS:
        w = param_array(g2.param_data[f"{name}.weight.pruned"])
        assert f"{name}.weight" not in g2.params
        # 50% of the layer (magnitude, SparseGPT's whole-K block) or of each row (Wanda): here the same count
        assert (w == 0).sum() == w.size // 2, name
        if method == "wanda":
            assert np.all((w == 0).sum(axis=1) == w.shape[1] // 2), name
        if method != "sparsegpt":  # SparseGPT updates the kept weights; the others only zero
            orig = before[f"{name}.weight"]
            np.testing.assert_array_equal(w[w != 0], orig[w != 0])
    # the head is excluded by default: the same parameter, bit-identical
    assert g2.params["lm_head.weight"].name == "lm_head.weight"
    np.testing.assert_array_equal(param_array(g2.param_data["lm_head.weight"]), before["lm_head.weight"])
    for k, v in weights(g).items():  # the input graph's arrays are untouched
        np.testing.assert_array_equal(v, before[k])
    out = run(g2, [llama_ids()])[0]
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_llama_two_four_masks_are_exact(method):
    g2 = PassManager(f"prune{{method={method},n=2,m=4}}", calibration=llama_calibration()).run(tiny_llama_graph())
    verify(g2)
    for name in GEMM_WEIGHTS:
        w = param_array(g2.param_data[f"{name}.weight.pruned"])
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(axis=-1)
        assert np.all(groups == 2), name


def test_exclude_leaves_matching_layers_bit_identical():
    g = tiny_llama_graph()
    g2 = PassManager('prune{exclude="mlp,lm_head"}').run(g)
    for name in GEMM_WEIGHTS:
        if ".mlp." in name:
            assert f"{name}.weight" in g2.params and f"{name}.weight.pruned" not in g2.params
            assert g2.param_data[f"{name}.weight"] is g.param_data[f"{name}.weight"]
        else:
            assert f"{name}.weight.pruned" in g2.params


def mm_graph(seed=0) -> Graph:
    """x -> matmul [K, N] -> fused.linear_act(gelu) -> lm_head: the [K, N] layout prunes along K too."""
    rng = np.random.default_rng(seed)
    g = Graph("mm")
    g.add_symbol("s", 1, 16)
    x = g.add_input("x", TensorType((sym("s"), 32), DType.f32))
    h = g.add_node("matmul", [x, g.add_param("proj.weight", rng.standard_normal((32, 48)).astype(np.float32))])
    h = g.add_node("fused.linear_act", [h, g.add_param("fc.weight", rng.standard_normal((16, 48)).astype(np.float32)),
                                        g.add_param("fc.bias", rng.standard_normal(16).astype(np.float32))],
                   {"act": "gelu"})
    g.set_outputs([g.add_node("linear", [h, g.add_param("lm_head.weight", rng.standard_normal((8, 16)).astype(np.float32))])])
    return g


def test_kn_weights_are_pruned_along_k_and_keep_their_shape():
    g = mm_graph()
    g2 = PassManager("prune{n=1,m=4}").run(g)
    verify(g2)
    w = param_array(g2.param_data["proj.weight.pruned"])
    assert w.shape == (32, 48)
    assert np.all((w.T.reshape(48, 8, 4) != 0).sum(-1) == 1)   # 1 of every 4 consecutive inputs per output
    assert g2.op_counts() == {"matmul": 1, "fused.linear_act": 1, "linear": 1}
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    ref = g.clone()
    ref.param_data["proj.weight"] = w
    ref.param_data["fc.weight"] = param_array(g2.param_data["fc.weight.pruned"])
    np.testing.assert_allclose(run(g2, [x])[0], run(ref, [x])[0], rtol=1e-6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_data_driven_methods_need_calibration(method):
    with pytest.raises(PassError, match=rf"pass 'prune\{{method={method}\}}': needs calibration data"):
        PassManager(f"prune{{method={method}}}").run(mm_graph())


def test_m_must_divide_k_names_the_node(registered):
    with pytest.raises(PassError, match=r"%v0 = matmul\(\.\.\.\): m=5 does not divide the weight's K=32 input "
                                        r"features \(%proj.weight\)"):
        registered.Prune(n=2, m=5).run(mm_graph())


@pytest.mark.parametrize("text, message", [
    ("prune{sparsity=1.0}", "sparsity=1.0 must be in [0, 1)"),
    ("prune{sparsity=-0.1}", "sparsity=-0.1 must be in [0, 1)"),
    ("prune{n=2}", "n=2 needs m (n:m pruning keeps n of every m weights"),
    ("prune{m=4}", "m=4 needs n (n:m pruning"),
    ("prune{n=4,m=2}", "n=4 must be <= m=2"),
    ("prune{method=obs}", "option 'method' of pass 'prune' takes one of 'magnitude', 'wanda', 'sparsegpt'"),
    ("prune-channels{ratio=1.0}", "ratio=1.0 must be in [0, 1)"),
])
def test_bad_options_fail_when_the_pipeline_is_built(text, message):
    with pytest.raises(ValueError) as e:
        parse_pipeline(text)
    assert message in str(e.value)
    assert str(e.value).startswith("pipeline: column ")


# -- prune-channels -----------------------------------------------------------------------------------------

def gemm_macs(g: Graph) -> int:
    """Multiply-accumulates per token of the graph's linears."""
    return sum(int(np.prod(n.inputs[1].type.shape)) for n in g.nodes if n.op == "linear")


def zeroed_reference(g: Graph, g2: Graph) -> Graph:
    """The original graph with the down projection's columns of every dropped channel zeroed."""
    ref = g.clone()
    for i in range(2):
        name = f"model.layers.{i}.mlp"
        gate = param_array(g.param_data[f"{name}.gate_proj.weight"])
        kept = param_array(g2.param_data[f"{name}.gate_proj.weight.channels"])
        idx = [int(np.flatnonzero((gate == row).all(axis=1))[0]) for row in kept]
        assert idx == sorted(idx)  # kept channels stay in order
        np.testing.assert_array_equal(param_array(g2.param_data[f"{name}.up_proj.weight.channels"]),
                                      param_array(g.param_data[f"{name}.up_proj.weight"])[idx])
        down = np.array(param_array(g.param_data[f"{name}.down_proj.weight"]))
        drop = np.setdiff1d(np.arange(down.shape[1]), idx)
        down[:, drop] = 0
        ref.param_data[f"{name}.down_proj.weight"] = down
    return ref


@pytest.mark.parametrize("calibrated", [False, True])
def test_prune_channels_shrinks_the_mlp_and_equals_zeroing_those_channels(calibrated):
    g = tiny_llama_graph()
    g2 = PassManager("prune-channels", calibration=llama_calibration() if calibrated else None).run(g)
    verify(g2)
    for i in range(2):  # F = 128 -> 128 * 0.75 = 96
        name = f"model.layers.{i}.mlp"
        assert g2.params[f"{name}.gate_proj.weight.channels"].type.shape == (96, 64)
        assert g2.params[f"{name}.up_proj.weight.channels"].type.shape == (96, 64)
        assert g2.params[f"{name}.down_proj.weight.channels"].type.shape == (64, 96)
        assert f"{name}.down_proj.weight" not in g2.params
    assert g2.param_bytes() == g.param_bytes() - 2 * 3 * 32 * 64 * 4
    assert gemm_macs(g2) == gemm_macs(g) - 2 * 3 * 32 * 64
    ids = llama_ids()
    want = run(zeroed_reference(g, g2), [ids])[0]
    np.testing.assert_allclose(run(g2, [ids])[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_prune_channels_rounds_to_multiples_of_eight_and_respects_exclude(registered):
    assert [registered.kept_channels(128, r) for r in (0.0, 0.1, 0.5, 0.97)] == [128, 112, 64, 8]
    g = tiny_llama_graph()
    g2 = PassManager('prune-channels{ratio=0.5,exclude="layers.1."}').run(g)
    assert g2.params["model.layers.0.mlp.down_proj.weight.channels"].type.shape == (64, 64)
    assert g2.param_data["model.layers.1.mlp.down_proj.weight"] is g.param_data["model.layers.1.mlp.down_proj.weight"]


def test_prune_channels_after_fuse_says_to_run_it_before():
    with pytest.raises(PassError, match=r"found only fused MLPs \(2 fused.linear_glu\): prune-channels must run "
                                        r"before fuse in the pipeline"):
        PassManager("fuse,prune-channels").run(tiny_llama_graph())
    with pytest.raises(PassError, match=r"found no gate/up/down MLP"):
        PassManager("prune-channels").run(mm_graph())
