"""Fusion passes on random transformer-shaped graphs: numerics within tolerance, and the fusions happen.

Random graphs from graph_strategies rarely contain a GEMM followed by its bias and activation; these are
built from the pieces transformer blocks are made of, in random combinations and orders, the way the
torch frontend imports them (decomposed RMSNorm and tanh-GELU included).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import PassManager

F32 = DType.f32


def _const(g: Graph, v: float):
    return g.add_node("const", [], {"value": np.array(v, np.float32), "dtype": F32})


def rms_norm_decomposed(g, x, w, eps=1e-6):
    """HF LlamaRMSNorm as torch.export gives it."""
    ms = g.add_node("mean", [g.add_node("pow", [x, _const(g, 2.0)])], {"axes": [x.type.rank - 1], "keepdims": True})
    y = g.add_node("mul", [x, g.add_node("rsqrt", [g.add_node("add", [ms, _const(g, eps)])])])
    return g.add_node("mul", [w, y])


def gelu_tanh_decomposed(g, x):
    """GPT-2's gelu_new as torch.export gives it."""
    half = g.add_node("mul", [x, _const(g, 0.5)])
    cube = g.add_node("mul", [g.add_node("pow", [x, _const(g, 3.0)]), _const(g, 0.044715)])
    inner = g.add_node("mul", [g.add_node("add", [x, cube]), _const(g, math.sqrt(2.0 / math.pi))])
    return g.add_node("mul", [half, g.add_node("add", [g.add_node("tanh", [inner]), _const(g, 1.0)])])


@st.composite
def blocks(draw):
    """(graph, inputs, expectations): a few transformer-ish blocks on x [batch, seq, d]."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    d = draw(st.sampled_from([8, 16]))
    symbolic = draw(st.booleans())
    g = Graph("block")
    if symbolic:
        g.add_symbol("seq", 2, 16)
    seq = sym("seq") if symbolic else 5
    x = g.add_input("x", TensorType((2, seq, d), F32))
    k = 0

    def param(*shape):
        nonlocal k
        k += 1
        return g.add_param(f"p{k}", (rng.standard_normal(shape) * 0.3).astype(np.float32))

    expect = set()
    h = x
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["llama_attn_in", "llama_mlp", "gpt2_mlp", "act_chain", "residual_norm"]))
        if kind == "llama_attn_in":  # rms_norm, then Q/K/V projections sharing the normed input
            n = rms_norm_decomposed(g, h, param(d))
            heads = [g.add_node("linear", [n, param(m, d)]) for m in (d, d // 2, d // 2)]
            if draw(st.booleans()):  # split into heads, as attention does
                heads = [g.add_node("reshape", [v], {"shape": [2, seq, v.type.shape[-1] // 4, 4]}) for v in heads]
                heads = [g.add_node("reshape", [v], {"shape": [2, seq, v.type.shape[-2] * 4]}) for v in heads]
            q, kk, v = heads
            h = g.add_node("add", [h, g.add_node("concat", [kk, v], {"axis": 2})])
            h = g.add_node("add", [h, q])
            expect |= {"rms_norm", "merge"}
        elif kind == "llama_mlp":
            gate = g.add_node("linear", [h, param(2 * d, d)])
            up = g.add_node("linear", [h, param(2 * d, d)])
            act = g.add_node("mul", [g.add_node("silu", [gate]), up])
            h = g.add_node("add", [h, g.add_node("linear", [act, param(d, 2 * d)])])
            expect |= {"merge", "glu"}
        elif kind == "gpt2_mlp":  # Conv1D: flatten, addmm, unflatten, gelu_new
            flat = g.add_node("reshape", [h], {"shape": [2 * seq, d]})
            y = g.add_node("add", [g.add_node("matmul", [flat, param(d, 2 * d)]), param(2 * d)])
            y = g.add_node("reshape", [y], {"shape": [2, seq, 2 * d]})
            y = gelu_tanh_decomposed(g, y) if draw(st.booleans()) else g.add_node("gelu", [y])
            y = g.add_node("linear", [y, param(d, 2 * d), param(d)])
            h = g.add_node("add", [y, h])
            expect |= {"epilogue_act"}
        elif kind == "act_chain":
            y = g.add_node("tanh", [g.add_node("mul", [h, _const(g, 1.5)])])
            h = g.add_node("sub", [y, g.add_node("exp", [g.add_node("neg", [h])])])
            expect |= {"elementwise"}
        else:  # residual add feeding a norm; the sum is used again
            r = g.add_node("add", [h, x])
            if draw(st.booleans()):
                n = g.add_node("layer_norm", [r, param(d), param(d)], {"eps": 1e-5})
            else:
                n = g.add_node("rms_norm", [r, param(d)], {"eps": 1e-6})
            h = g.add_node("add", [r, n])
            expect |= {"add_norm"}
    g.set_outputs([h])
    verify(g)
    s = 5 if not symbolic else draw(st.integers(2, 16))
    xs = [rng.standard_normal((2, s, d)).astype(np.float32)]
    return g, xs, expect


@settings(max_examples=25)
@given(case=blocks())
def test_fuse_keeps_numerics_and_fuses(case):
    g, xs, expect = case
    out = PassManager("fuse", numeric_check=xs, verify_each=True).run(g)
    ops = out.op_counts()
    np.testing.assert_allclose(run(out, xs)[0], run(g, xs)[0], rtol=1e-4, atol=1e-5)
    if "rms_norm" in expect:
        assert ops.get("rsqrt", 0) == 0 and ops.get("mean", 0) == 0, ops
    if "merge" in expect:
        assert ops.get("linear", 0) + ops.get("fused.linear_act", 0) < g.op_counts().get("linear", 0), ops
    if "epilogue_act" in expect:
        assert ops.get("gelu", 0) == 0 and ops.get("tanh", 0) == 0 and ops.get("fused.matmul_act", 0) >= 1, ops
    if "glu" in expect:
        assert ops.get("fused.linear_glu", 0) >= 1 and ops.get("silu", 0) == 0, ops
    if "elementwise" in expect:
        assert ops.get("fused.elementwise", 0) >= 1, ops
    if "add_norm" in expect:
        assert ops.get("fused.add_rms_norm", 0) + ops.get("fused.add_layer_norm", 0) >= 1, ops
    assert out.op_counts().get("const", 0) <= g.op_counts().get("const", 0)


@pytest.mark.parametrize("part", ["recognize", "merge-linears", "fuse-epilogue", "fuse-norm", "fuse-elementwise"])
@settings(max_examples=8)
@given(case=blocks())
def test_each_fusion_part_within_its_tolerance(part, case):
    g, xs, _ = case
    PassManager(part, numeric_check=xs, verify_each=True).run(g)
