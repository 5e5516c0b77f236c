"""The fused ops' own rules: malformed or inconsistent uses fail with precise messages, and printed text
of a graph using each fused op parses back to the same graph and the same numbers.

Their numerics against torch are in test_interpreter.py; against TVM in tests/backends/test_tvm.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from llmasos.ir import DType, Graph, OpError, TensorType, graph_diff, parse, print_graph, sym
from llmasos.ir.interpreter import run
from llmasos.ir.opset.fused import ExprError, parse_expr
from llmasos.ir.verifier import VerificationError, verify

F32 = DType.f32


def two_inputs():
    g = Graph("t")
    return g, g.add_input("x", TensorType((2, 3), F32)), g.add_input("y", TensorType((3,), F32))


# -- fused.elementwise expressions --------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("mul(silu(%0), %1", "expected ) at 16 in expr 'mul(silu(%0), %1'"),
    ("mul(silu(%0)%1)", "expected ) at 12 in expr 'mul(silu(%0)%1)'"),
    ("mul(#0, %1)", "bad character at 4 in expr 'mul(#0, %1)'"),
    ("silu(%0)extra", "unexpected 'extra' at 8 in expr 'silu(%0)extra'"),
    ("gelu{approximate=}(%0)", "expected a term at 17 in expr 'gelu{approximate=}(%0)'"),
    ("", "expected a term at 0 in expr ''"),
    # after whitespace the position is the token's, not the space's
    ("silu(%0) extra", "unexpected 'extra' at 9 in expr 'silu(%0) extra'"),
    ("mul(silu(%0)  %1)", "expected ) at 14 in expr 'mul(silu(%0)  %1)'"),
])
def test_malformed_expr_names_the_position(text, message):
    with pytest.raises(ExprError) as e:
        parse_expr(text)
    assert str(e.value) == message


def test_bad_character_after_a_space_is_located_at_the_character():
    with pytest.raises(ExprError) as e:
        parse_expr("mul( #0)")
    assert str(e.value) == "bad character at 5 in expr 'mul( #0)'"


def test_malformed_expr_on_a_node_names_the_op_and_position():
    g, x, y = two_inputs()
    with pytest.raises(OpError, match=r"op 'fused.elementwise': .*expected \) at 12 in expr 'mul\(silu\(%0\)%1\)'"):
        g.add_node("fused.elementwise", [x, y], {"expr": "mul(silu(%0)%1)"})


def test_non_elementwise_op_in_expr_is_named():
    g, x, _ = two_inputs()
    with pytest.raises(OpError, match="op 'softmax' in a fused.elementwise expr is not elementwise "
                                      r"\(known: abs, add, cast, "):
        g.add_node("fused.elementwise", [x], {"expr": "exp(softmax(%0))"})


def test_operand_index_out_of_range():
    g, x, y = two_inputs()
    with pytest.raises(OpError, match="expr uses %2 but the node has 2 operands"):
        g.add_node("fused.elementwise", [x, y], {"expr": "add(%0, mul(%1, %2))"})


def test_unused_operand():
    g, x, y = two_inputs()
    with pytest.raises(OpError, match=r"operand\(s\) \[1\] unused by expr 'exp\(%0\)'"):
        g.add_node("fused.elementwise", [x, y], {"expr": "exp(%0)"})


def test_expr_attrs_parse_to_values():
    assert parse_expr("clip{min=-1.0, max=6}(cast{dtype=f16}(%1))") == (
        "clip", (("max", 6), ("min", -1.0)), (("cast", (("dtype", DType.f16),), (1,)),))


# -- attrs and operand rules ----------------------------------------------------------------------
@pytest.mark.parametrize("op", ["fused.linear_act", "fused.matmul_act"])
def test_unknown_activation_lists_the_choices(op):
    g, x, _ = two_inputs()
    w = g.add_param("w", np.ones((3, 3), np.float32))
    with pytest.raises(OpError, match=rf"op '{op}': attribute 'act' must be one of \['none', 'relu', 'gelu', "
                                      r"'gelu_tanh', 'silu', 'tanh', 'sigmoid'\], got 'swish'"):
        g.add_node(op, [x, w], {"act": "swish"})


@pytest.mark.parametrize("op", ["fused.add_rms_norm", "fused.add_layer_norm"])
def test_residual_must_not_broadcast_x_larger(op):
    g, x, y = two_inputs()
    with pytest.raises(OpError, match=rf"op '{op}': .*the residual f32\[2, 3\] must not broadcast x f32\[3\] "
                                      "to a larger shape"):
        g.add_node(op, [y, x])
    s, normed = g.add_node(op, [x, y])  # the other way round is the point: a bias-like residual
    assert s.type == normed.type == x.type


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_act_needs_a_rank_2_weight(bias):
    # a rank-3 weight used to pass without a bias and then break the CPU lowering (its panels are [K, N])
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 4, 8), F32))
    w = g.add_param("w", np.ones((2, 8, 5), np.float32))
    b = [g.add_param("b", np.ones(5, np.float32))] if bias else []
    with pytest.raises(OpError, match=r"op 'fused.matmul_act': .*fused.matmul_act takes a rank-2 weight \[in, out\] "
                                      r"and a rank-1 bias, got f32\[2, 8, 5\]"):
        g.add_node("fused.matmul_act", [x, w, *b], {"act": "relu"})


# -- text round trip --------------------------------------------------------------------------------
def fused_graph() -> Graph:
    rng = np.random.default_rng(0)
    S = sym("seq")
    g = Graph("fused")
    g.add_symbol("seq", 1, 64)
    x = g.add_input("x", TensorType((S, 8), F32))
    h = g.add_input("h", TensorType((S, 8), DType.f16))
    p = lambda name, *shape: g.add_param(name, rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    s, n1 = g.add_node("fused.add_rms_norm", [x, p("bias8", 8), p("ln1", 8)], {"eps": 1e-6}, loc="h.0.ln_1")
    up = g.add_node("fused.linear_act", [n1, p("w_up", 12, 8), p("b_up", 12)], {"act": "gelu_tanh"})
    gate = g.add_node("fused.matmul_act", [n1, p("w_gate", 8, 12)], {"act": "silu"})
    m = g.add_node("fused.elementwise", [up, gate], {"expr": 'mul(clip{min=-6.0, max=6.0}(%0), %1)'})
    down = g.add_node("fused.linear_act", [m, p("w_down", 8, 12)])
    s2, n2 = g.add_node("fused.add_layer_norm", [s, down, p("ln2_w", 8), p("ln2_b", 8)], {"eps": 1e-5},
                        names=["resid", "normed"])
    hf = g.add_node("fused.elementwise", [h, n2], {"expr": "cast{dtype=f16}(add(cast{dtype=f32}(%0), %1))"})
    g.set_outputs([s2, n2, hf])
    return g


def test_printed_text_of_every_fused_op_round_trips():
    g = fused_graph()
    verify(g)
    assert {n.op for n in g.nodes} == {"fused.linear_act", "fused.matmul_act", "fused.add_rms_norm",
                                       "fused.add_layer_norm", "fused.elementwise"}
    text = print_graph(g)
    assert 'fused.elementwise(%h, %normed) {expr = "cast{dtype=f16}(add(cast{dtype=f32}(%0), %1))"}' in text
    assert 'fused.linear_act(%v4, %w_down) {act = "none"}' in text, text
    back = parse(text, params=g.param_data)
    assert graph_diff(back, g) is None
    assert print_graph(back) == text
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float16)]
    for a, b in zip(run(g, inputs), run(back, inputs)):
        np.testing.assert_array_equal(a, b)


def test_parsed_bad_expr_is_caught_by_the_verifier_with_the_node():
    text = '''graph @t(%x: f32[2, 3]) {
  %v0: f32[2, 3] = fused.elementwise(%x) {expr = "mul(silu(%0)%0)"}
  return %v0
}'''
    g = parse(text)  # the parser takes the printed types; type rules are the verifier's to run
    with pytest.raises(VerificationError, match=r"node %v0 = fused.elementwise\(...\): rule 'operand-type': .*"
                                                r"expected \) at 12 in expr 'mul\(silu\(%0\)%0\)'"):
        verify(g)
