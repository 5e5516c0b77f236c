"""The prune-heads pass: removing whole head groups (GQA: a kv head with its query heads; MHA: a head)
equals the original model with those heads' output-projection columns zeroed, shapes really shrink, the
TVM build agrees, exclude, keep-one, option errors, fused and attention-free graphs refused."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from llmasos.ir import Graph
from llmasos.ir.graph import param_array
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import PassManager
from llmasos.passes.base import PassNotApplicable
from llmasos.passes.pipeline import parse_pipeline
from tests.passes.test_prune import llama_calibration, llama_ids, tiny_llama_graph


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registers the pass when these tests run (until base.BUILTIN_MODULES lists llmasos.passes.prune_heads)."""
    import llmasos.passes.prune_heads as p
    return p


@functools.lru_cache(maxsize=None)
def tiny_gpt2_graph() -> Graph:
    from llmasos.frontends.torch_export import import_module
    from tests.models import gpt2, token_ids
    return import_module(gpt2(), (token_ids(2, 8),)).graph


def arr(g: Graph, name: str) -> np.ndarray:
    return np.array(param_array(g.param_data[name]))


def pruned_weight(g2: Graph, base: str) -> np.ndarray:
    (name,) = [k for k in g2.params if k.startswith(base + ".")]  # <base>.heads
    return arr(g2, name)


def kept_blocks(orig: np.ndarray, pruned: np.ndarray, unit: int, axis: int) -> list:
    """Which consecutive blocks of ``unit`` along ``axis`` of ``orig`` survive (in order) in ``pruned``."""
    o = np.moveaxis(orig, axis, 0)
    p = np.moveaxis(pruned, axis, 0)
    blocks = [o[i:i + unit] for i in range(0, o.shape[0], unit)]
    kept = []
    for j in range(0, p.shape[0], unit):
        (i,) = [i for i, b in enumerate(blocks) if np.array_equal(b, p[j:j + unit])]
        kept.append(i)
    return kept


def zero_blocks(g: Graph, name: str, unit: int, axis: int, drop) -> Graph:
    """``g`` with the blocks ``drop`` of parameter ``name`` zeroed (the heads' contributions removed)."""
    g3 = g.clone()
    w = arr(g, name).copy()
    for i in drop:
        idx = [slice(None)] * w.ndim
        idx[axis] = slice(i * unit, (i + 1) * unit)
        w[tuple(idx)] = 0
    g3.param_data[name] = w
    return g3


LLAMA_O = "model.layers.{}.self_attn.o_proj.weight"
GPT2_O = "transformer.h.{}.attn.c_proj.weight"


@pytest.mark.parametrize("calibrated", [False, True])
def test_llama_gqa_pruning_equals_zeroing_the_groups_o_proj_columns(calibrated):
    """4 query heads, 2 kv heads, D=16: one kv group (kv head + its 2 query heads, 32 o_proj columns) goes
    per layer; the interpreter on the pruned graph equals the original with those columns zeroed."""
    g = tiny_llama_graph()
    calib = llama_calibration() if calibrated else None
    g2 = PassManager("prune-heads", calibration=calib).run(g)
    verify(g2)
    ref = g
    for layer in range(2):
        o = LLAMA_O.format(layer)
        kept = kept_blocks(arr(g, o), pruned_weight(g2, o), unit=32, axis=1)
        assert len(kept) == 1
        ref = zero_blocks(ref, o, 32, 1, [i for i in range(2) if i not in kept])
    ids = llama_ids()
    got, want, dense = run(g2, [ids])[0], run(ref, [ids])[0], run(g, [ids])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(dense - want).max() > 1e-2  # the zeroed heads mattered: the comparison is not vacuous


def test_gpt2_mha_pruning_equals_zeroing_the_heads_c_proj_rows():
    """GPT-2: packed c_attn (q|k|v thirds) + split, 4 heads of 16: one head goes per layer."""
    g = tiny_gpt2_graph()
    g2 = PassManager("prune-heads").run(g)
    verify(g2)
    ref = g
    for layer in range(2):
        o = GPT2_O.format(layer)  # Conv1D weight [in, out]: the heads are its rows
        kept = kept_blocks(arr(g, o), pruned_weight(g2, o), unit=16, axis=0)
        assert len(kept) == 3 and kept == sorted(kept)
        ref = zero_blocks(ref, o, 16, 0, [i for i in range(4) if i not in kept])
        # the q, k and v thirds of c_attn (and its bias) keep the same heads as c_proj
        w = arr(g, f"transformer.h.{layer}.attn.c_attn.weight")
        w2 = pruned_weight(g2, f"transformer.h.{layer}.attn.c_attn.weight")
        want_cols = np.concatenate([np.arange(s * 64 + h * 16, s * 64 + h * 16 + 16) for s in range(3) for h in kept])
        np.testing.assert_array_equal(w2, w[:, want_cols])
        b2 = pruned_weight(g2, f"transformer.h.{layer}.attn.c_attn.bias")
        np.testing.assert_array_equal(b2, arr(g, f"transformer.h.{layer}.attn.c_attn.bias")[want_cols])
    ids = llama_ids()
    got, want, dense = run(g2, [ids])[0], run(ref, [ids])[0], run(g, [ids])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(dense - want).max() > 1e-3


def test_shapes_shrink_and_head_counts_follow():
    from llmasos.passes.prune_heads import head_counts
    g = tiny_llama_graph()
    g2 = PassManager("prune-heads{ratio=0.25}").run(g)
    shapes = {k.rsplit(".weight", 1)[0]: tuple(v.type.shape) for k, v in g2.params.items() if "self_attn" in k}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn"
        assert (shapes[f"{p}.q_proj"], shapes[f"{p}.k_proj"], shapes[f"{p}.v_proj"], shapes[f"{p}.o_proj"]) \
            == ((32, 64), (16, 64), (16, 64), (64, 32))
    assert head_counts(g) == [(4, 4), (4, 4)] and head_counts(g2) == [(2, 2), (2, 2)]
    # the kv-repeat keeps the GQA ratio: 1 kv head broadcast to 2 query heads
    bcast = [n.attrs["shape"] for n in g2.nodes if n.op == "broadcast_to" and len(n.attrs["shape"]) == 5]
    assert [tuple(s[1:3]) for s in bcast] == [(1, 2)] * 4
    # per layer q and o lose 32x64 f32 each, k and v 16x64 each
    assert g2.param_bytes() == g.param_bytes() - 2 * (2 * 32 * 64 + 2 * 16 * 64) * 4
    # the original graph is untouched
    assert tuple(g.params["model.layers.0.self_attn.q_proj.weight"].type.shape) == (64, 64)


def test_at_least_one_group_stays_per_layer():
    from llmasos.passes.prune_heads import head_counts
    assert head_counts(PassManager("prune-heads{ratio=0.95}").run(tiny_gpt2_graph())) == [(1, 1), (1, 1)]
    assert head_counts(PassManager("prune-heads{ratio=0.9}").run(tiny_llama_graph())) == [(2, 2), (2, 2)]


def test_exclude_leaves_that_layer_untouched():
    g = tiny_gpt2_graph()
    g2 = PassManager('prune-heads{exclude="h.0."}').run(g)
    for name in ("c_attn.weight", "c_attn.bias", "c_proj.weight"):
        full = f"transformer.h.0.attn.{name}"
        assert full in g2.params and g2.param_data[full] is g.param_data[full]
        assert f"transformer.h.1.attn.{name}" not in g2.params  # replaced by <name>.heads
    from llmasos.passes.prune_heads import head_counts
    assert head_counts(g2) == [(4, 4), (3, 3)]
    assert PassManager('prune-heads{exclude="attn"}').run(g) is g  # everything excluded: no change


def test_ratio_zero_changes_nothing():
    g = tiny_gpt2_graph()
    assert PassManager("prune-heads{ratio=0.0}").run(g) is g


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_bad_ratio_is_rejected_up_front(ratio):
    from llmasos.passes.prune_heads import PruneHeads
    with pytest.raises(ValueError, match=rf"ratio={ratio} must be in \[0, 1\)"):
        PruneHeads(ratio=ratio)
    with pytest.raises(Exception, match=r"must be in \[0, 1\)"):
        parse_pipeline(f"prune-heads{{ratio={ratio}}}")


def test_fused_graph_is_refused_with_the_reason():
    g = PassManager("merge-linears").run(tiny_llama_graph())
    with pytest.raises(PassNotApplicable, match="prune-heads must run before fuse"):
        PassManager("prune-heads").run(g)


def test_graph_without_attention_is_not_applicable():
    from llmasos.frontends.torch_export import import_module
    from tests.models import mlp
    import torch
    g = import_module(mlp(), (torch.ones(2, 16),)).graph
    with pytest.raises(PassNotApplicable, match="found no attention block"):
        PassManager("prune-heads").run(g)


def test_calibrated_scores_pick_the_group_whose_output_matters():
    """Scale one kv group's v rows up by 100: the calibrated (and the weight-norm) score must keep it."""
    g = tiny_llama_graph().clone()
    for layer in range(2):
        v = f"model.layers.{layer}.self_attn.v_proj.weight"
        w = arr(g, v).copy()
        w[:16] *= 100.0  # kv group 0 (value rows 0..15)
        w[16:] *= 0.01
        g.param_data[v] = w
    for calib in (None, llama_calibration()):
        g2 = PassManager("prune-heads", calibration=calib).run(g)
        for layer in range(2):
            o = LLAMA_O.format(layer)
            assert kept_blocks(arr(g, o), pruned_weight(g2, o), 32, 1) == [0]


def test_pruned_llama_builds_on_tvm_and_matches_the_interpreter():
    from llmasos.backends.tvm import build
    g2 = PassManager("prune-heads").run(tiny_llama_graph())
    ids = llama_ids()
    want = run(g2, [ids])[0]
    np.testing.assert_allclose(build(g2, "cpu")(ids)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_head_group_scores_numerics():
    from llmasos.compress.heads import channel_index, groups_to_keep, head_group_scores, kept_groups
    w_out = np.array([[1.0, 0.0, 3.0, 4.0]], dtype=np.float32)  # 2 groups of 2 columns
    np.testing.assert_allclose(head_group_scores(w_out, 2, act_rms=[2.0, 1.0, 1.0, 0.0]), [2.0, 3.0])
    w_in = np.array([[1.0], [1.0], [2.0], [0.0]], dtype=np.float32)  # rows: group 0, group 0, group 1, ...
    np.testing.assert_allclose(head_group_scores(w_out, 2, None, [w_in]), [np.sqrt(2) * 1.0, 2.0 * 5.0])
    assert list(kept_groups([1.0, 3.0, 3.0, 0.5], 2)) == [1, 2]
    assert [groups_to_keep(g, 0.25) for g in (1, 2, 3, 4, 9)] == [1, 1, 2, 3, 7]
    assert list(channel_index(2, 2, 3, [1])) == [2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match="not a multiple of groups=3"):
        head_group_scores(w_out, 3)


def test_quantized_graph_is_refused_with_the_reason():
    g = PassManager("quantize{bits=8}").run(tiny_gpt2_graph())
    with pytest.raises(PassNotApplicable, match="prune-heads must run before quantize"):
        PassManager("prune-heads").run(g)
