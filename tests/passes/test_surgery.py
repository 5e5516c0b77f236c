"""The weight-surgery module the compression passes share (llmasos.passes.surgery): GEMM targets and their
layouts, exclusion, parameters swapped under new names, node replacement in place, dropping unused
parameters, activation-aware scaling; and that no pass imports another pass's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import surgery

RNG = np.random.default_rng(0)


def w(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def gemms() -> tuple[Graph, dict]:
    """Every kind of GEMM the passes meet, and the ones they must leave alone."""
    g = Graph("gemms")
    g.add_symbol("s", 1, 8)
    x = g.add_input("x", TensorType((sym("s"), 4), DType.f32))
    n = {}
    n["linear"] = g.add_node("linear", [x, g.add_param("fc.weight", w(6, 4)), g.add_param("fc.bias", w(6))],
                             loc="fc (model.py:3)")
    n["matmul"] = g.add_node("matmul", [n["linear"], g.add_param("proj.weight", w(6, 4))], loc="proj")
    n["act"] = g.add_node("fused.linear_act", [n["matmul"], g.add_param("up.weight", w(8, 4))], {"act": "silu"})
    computed = g.add_node("neg", [g.add_param("tied.weight", w(8, 8))])
    n["computed"] = g.add_node("linear", [n["act"], computed])  # a computed weight: not a target
    bias = g.add_node("sum", [computed], {"axes": [1]})
    n["cbias"] = g.add_node("linear", [n["act"], g.add_param("cb.weight", w(8, 8)), bias])  # computed bias: neither
    n["head"] = g.add_node("linear", [n["cbias"], g.add_param("emb.weight", w(5, 8))], loc="lm_head (m.py:9)")
    g.set_outputs([n["computed"], n["head"]])
    return g, {k: v.producer for k, v in n.items()}


def test_gemm_targets_layouts_and_k():
    g, n = gemms()
    assert surgery.gemm_targets(g, "") == [n["linear"], n["matmul"], n["act"], n["head"]]
    # the tied head reads emb.weight but is excluded by its module path, as compression passes do by default
    assert surgery.gemm_targets(g, "lm_head") == [n["linear"], n["matmul"], n["act"]]
    assert surgery.gemm_targets(g, " proj , fc.weight") == [n["act"], n["head"]]
    assert [surgery.weight_layout(n[k]) for k in ("linear", "matmul", "act")] == ["nk", "kn", "nk"]
    assert [surgery.in_features(n[k]) for k in ("linear", "matmul", "act")] == [4, 6, 4]
    assert surgery.module_path(n["head"]) == "lm_head" and surgery.module_path(n["act"]) == ""
    assert surgery.excluded("model.lm_head.weight", "x,lm_head") and not surgery.excluded("w", ", ,")
    assert surgery.node_excluded(n["matmul"], "proj") and not surgery.node_excluded(n["matmul"], "fc")
    with pytest.raises(KeyError):
        surgery.weight_layout(g.nodes[3])  # neg is no GEMM
    assert g.nodes[3].op == "neg"


def test_weights_as_nk_and_back_under_a_new_name():
    g, n = gemms()
    mm = n["matmul"]
    wkn = g.param_data["proj.weight"]
    np.testing.assert_array_equal(surgery.weight_nk(g, mm), wkn.T)
    old = surgery.set_weight_nk(g, mm, 2 * surgery.weight_nk(g, mm), "scaled")
    assert old.name == "proj.weight" and mm.inputs[1].name == "proj.weight.scaled"
    np.testing.assert_array_equal(g.param_data["proj.weight.scaled"], 2 * wkn)  # stored [K, N] again
    assert g.param_data["proj.weight"] is wkn  # the old data is never written
    taken = surgery.new_param(g, "proj.weight.scaled", wkn)  # a taken hint: the graph's next fresh suffix
    assert taken.name.startswith("proj.weight.scaled_") and g.params[taken.name] is taken
    assert surgery.swap_param(g, mm, 1, wkn, "s").name == "proj.weight.scaled" and mm.inputs[1].name == \
        "proj.weight.scaled.s"
    f16 = Graph("h")
    x = f16.add_input("x", TensorType((2, 4), DType.f16))
    y = f16.add_node("linear", [x, f16.add_param("w", w(3, 4, dtype=np.float16))])
    surgery.set_weight_nk(f16, y.producer, np.ones((3, 4), np.float32), "ones")
    assert f16.param_data["w.ones"].dtype == np.float16  # the old dtype


def test_drop_unused_params_keeps_what_is_still_read():
    g, n = gemms()
    old = surgery.swap_param(g, n["linear"], 1, w(6, 4), "new")
    assert surgery.drop_unused_params(g, [old.name, "tied.weight", "nonexistent", old.name]) == ["fc.weight"]
    assert "fc.weight" not in g.params and "fc.weight" not in g.param_data and "tied.weight" in g.params
    verify(g)


def test_replace_node_puts_the_replacement_where_the_node_was():
    g, n = gemms()
    xs = [RNG.standard_normal((3, 4)).astype(np.float32)]
    want = run(g, xs)
    lin = n["linear"]
    at = g.nodes.index(lin)

    def build(g):  # linear(x, W, b) == linear(x, W) + b
        y = g.add_node("linear", [lin.inputs[0], lin.inputs[1]], loc=lin.loc, name="nobias")
        return g.add_node("add", [y, lin.inputs[2]], loc=lin.loc)
    new = surgery.replace_node(g, lin, build)
    assert lin.graph is None and [m.op for m in g.nodes[at:at + 2]] == ["linear", "add"]
    assert g.nodes[at + 1].outputs[0] is new and new.users == [n["matmul"]]
    verify(g)
    for a, b in zip(run(g, xs), want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_input_groups_follow_the_shared_activation():
    g, n = gemms()
    groups = surgery.input_groups([n["computed"], n["linear"], n["cbias"], n["matmul"]])
    assert groups == [[n["computed"], n["cbias"]], [n["linear"]], [n["matmul"]]]


def _normed(kind: str):
    """x -> norm (rms_norm with a weight, or mul by a [K] weight) -> two GEMMs sharing it (and, with
    ``leak``, another user)."""
    g = Graph(kind)
    x = g.add_input("x", TensorType((3, 4), DType.f32))
    nw = g.add_param("norm.weight", np.abs(w(4)) + 0.5)
    leak = kind.endswith("+leak")
    if kind.startswith("rms"):
        h = g.add_node("rms_norm", [x, nw], {"eps": 1e-5})
    else:
        h = g.add_node("mul", [g.add_node("tanh", [x]), nw])
    q = g.add_node("linear", [h, g.add_param("q.weight", w(5, 4))])
    k = g.add_node("linear", [h, g.add_param("k.weight", w(6, 4))])
    outs = [q, k] + ([g.add_node("exp", [h])] if leak else [])
    g.set_outputs(outs)
    return g, [q.producer, k.producer]


@pytest.mark.parametrize("kind, folded", [("rms", "norm.weight.smoothed"), ("mul", "norm.weight.smoothed"),
                                          ("rms+leak", None)])
def test_scale_group_divides_the_shared_input_exactly_where_it_can(kind, folded):
    g, group = _normed(kind)
    xs = [RNG.standard_normal((3, 4)).astype(np.float32)]
    want = run(g, xs)
    s = np.array([0.5, 2.0, 4.0, 1.0], np.float32)
    weights: dict = {}
    ws = [surgery.weight_nk(g, n) for n in group]
    surgery.scale_group(g, group, ws, s, weights)
    for n in group:
        surgery.set_weight_nk(g, n, weights[n.outputs[0].name], "smoothed")
    verify(g)
    norm = group[0].inputs[0].producer
    if folded:  # folded into the norm's weight: no new node
        assert g.params[folded] in norm.inputs and "norm.weight" not in [v.name for v in norm.inputs]
        assert not [v for v in g.params if v.endswith("act_inv_scale")]
    else:  # x has another user: one mul by 1/s in front of the group's first GEMM
        inv = group[0].inputs[0].producer
        assert inv.op == "mul" and inv.inputs[1].name == "q.weight.act_inv_scale"
        assert g.nodes.index(inv) == g.nodes.index(group[0]) - 1 and group[1].inputs[0] is group[0].inputs[0]
    for a, b in zip(run(g, xs), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- layering ---------------------------------------------------------------------------------------------

PASSES = Path(__file__).resolve().parents[2] / "llmasos" / "passes"
PASS_MODULES = {"quantize", "prune", "prune_heads", "lowrank", "cse", "dce", "fuse", "fuse_elementwise",
                "merge_linears", "split_heads", "rewrite_pass"}


def test_no_pass_imports_another_pass_s_private_names():
    bad = []
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in PASS_MODULES:
                bad += [f"{path.name}: from .{node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, bad
