"""The verifier: one broken graph per rule, checked for the rule id, the node and the message."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from llmasos.ir import DType, Graph, Node, TensorType, Value, sym
from llmasos.ir.graph import Use
from llmasos.ir.verifier import RULES, VerificationError, verify
from tests.graph_strategies import graphs

B, S = sym("batch"), sym("seq")


def block() -> tuple[Graph, dict]:
    """A small attention block over [batch, seq, 16]: what a frontend emits, and clean."""
    rng = np.random.default_rng(0)
    g = Graph("block")
    g.add_symbol("batch", 1, 8)
    g.add_symbol("seq", 1, 32)
    x = g.add_input("x", TensorType((B, S, 16), DType.f32))
    w = g.add_param("w_qkv", rng.standard_normal((48, 16)).astype(np.float32))
    ln_w = g.add_param("ln_w", np.ones(16, np.float32))
    h = g.add_node("layer_norm", [x, ln_w], {"eps": 1e-5}, loc="model.ln_1")
    qkv = g.add_node("linear", [h, w], loc="model.attn.c_attn")
    q, k, v = g.add_node("split", [qkv], {"axis": -1, "sizes": [16, 16, 16]}, names=["q", "k", "v"])
    heads = []
    for t in (q, k, v):
        r = g.add_node("reshape", [t], {"shape": [B, S, 2, 8]})
        heads.append(g.add_node("permute", [r], {"perm": [0, 2, 1, 3]}))
    a = g.add_node("sdpa", heads, {"is_causal": True}, loc="model.attn")
    a = g.add_node("permute", [a], {"perm": [0, 2, 1, 3]})
    a = g.add_node("reshape", [a], {"shape": [B, S, 16]})
    y = g.add_node("add", [x, a], name="y")
    g.set_outputs([y])
    return g, {"x": x, "w": w, "h": h, "qkv": qkv, "q": q, "y": y}


def only_error(g: Graph) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify(g)
    return info.value


def test_clean_graph_verifies_and_collect_returns_nothing():
    g, _ = block()
    assert verify(g) is None
    assert verify(g, collect=True) == []


def test_error_is_a_value_error_naming_node_op_and_rule():
    g, v = block()
    qkv = v["qkv"]
    qkv.type = TensorType((B, S, 64), DType.f32)
    e = only_error(g)
    assert isinstance(e, ValueError)
    assert e.rule == "result-type"
    assert e.node is qkv.producer
    assert str(e) == ("verify: node %v1 = linear(...) [from model.attn.c_attn]: rule 'result-type': "
                      "result 0 %v1: declared f32[batch, seq, 64] but op 'linear' infers f32[batch, seq, 48]")


def test_equal_symbolic_expressions_are_the_same_type():
    g = Graph()
    g.add_symbol("batch")
    g.add_symbol("seq")
    x = g.add_input("x", TensorType((B, S, 4), DType.f32))
    r = g.add_node("reshape", [x], {"shape": [B * S * 2, 2]})
    r.type = TensorType((2 * S * B, 2), DType.f32)  # a different but equal expression
    g.set_outputs([r])
    verify(g)
    r.type = TensorType((2 * S * B + 1, 2), DType.f32)
    assert only_error(g).rule == "result-type"


def test_unknown_op_suggests_close_matches():
    g, v = block()
    v["h"].producer.op = "layer_nrom"
    e = only_error(g)
    assert (e.rule, e.node) == ("unknown-op", v["h"].producer)
    assert "unknown op 'layer_nrom'" in str(e) and "did you mean 'layer_norm'" in str(e)


def test_arity():
    g, v = block()
    node = v["y"].producer
    node.inputs.append(v["x"])
    e = only_error(g)
    assert (e.rule, e.node) == ("arity", node)
    assert "op 'add' takes 2 operands (lhs, rhs), got 3" in str(e)


def test_attr_unknown_missing_and_kind():
    g, v = block()
    node = v["qkv"].producer
    node.attrs["transpose"] = True
    e = only_error(g)
    assert (e.rule, e.node) == ("attr-unknown", node)
    assert "op 'linear' has no attribute 'transpose'" in str(e)

    g, v = block()
    split = v["q"].producer
    del split.attrs["sizes"]
    e = only_error(g)
    assert (e.rule, e.node) == ("attr-missing", split)
    assert "op 'split' requires attribute 'sizes'" in str(e)

    g, v = block()
    split = v["q"].producer
    split.attrs["axis"] = 1.5
    e = only_error(g)
    assert (e.rule, e.node) == ("attr-kind", split)
    assert "op 'split' attribute 'axis' expected int, got float 1.5" in str(e)


def test_attr_kind_checks_choices():
    g = Graph()
    x = g.add_input("x", TensorType((4,), DType.f32))
    y = g.add_node("gelu", [x])
    y.producer.attrs["approximate"] = "erf"
    g.set_outputs([y])
    e = only_error(g)
    assert e.rule == "attr-kind" and "must be one of ['none', 'tanh'], got 'erf'" in str(e)


def test_defaults_may_be_left_out_of_hand_built_nodes():
    g = Graph()
    x = g.add_input("x", TensorType((2, 4), DType.f32))
    y = Value("y", TensorType((2, 4), DType.f32))
    g.append_node(Node("softmax", [x], {}, [y]))  # axis defaults to -1
    g.set_outputs([y])
    verify(g)


def test_operand_type():
    g = Graph()
    a = g.add_input("a", TensorType((2, 3), DType.f32))
    b = g.add_input("b", TensorType((4, 5), DType.f32))
    out = Value("out", TensorType((2, 5), DType.f32))
    node = g.append_node(Node("matmul", [a, b], {}, [out], loc="model.mm"))
    g.set_outputs([out])
    e = only_error(g)
    assert (e.rule, e.node) == ("operand-type", node)
    assert str(e).startswith("verify: node %out = matmul(...) [from model.mm]: rule 'operand-type': ")
    assert "rejects operand types (f32[2, 3], f32[4, 5])" in str(e) and "contraction dims differ: 3 vs 4" in str(e)


def test_result_count():
    g, v = block()
    split = v["q"].producer
    split.outputs.pop()
    e = only_error(g)
    assert (e.rule, e.node) == ("result-count", split)
    assert "op 'split' produces 3 result(s) here, the node declares 2" in str(e)


def test_undefined_value_use_before_def():
    g, v = block()
    # move the residual add in front of the node that defines its second operand
    add = g.nodes.pop()
    g.nodes.insert(0, add)
    e = only_error(g)
    assert (e.rule, e.node) == ("undefined-value", add)
    assert "operand 1 %" in str(e) and "is used before its definition by node" in str(e)


def test_undefined_value_foreign_and_same_named():
    g, v = block()
    stranger = Value("nowhere", TensorType((B, S, 16), DType.f32))
    node = v["y"].producer
    node.inputs[1] = stranger
    e = only_error(g)
    assert (e.rule, e.node) == ("undefined-value", node)
    assert "operand 1 %nowhere is not defined: not a graph input" in str(e)

    node.inputs[1] = Value("x", TensorType((B, S, 16), DType.f32))  # same name as the input, other object
    e = only_error(g)
    assert e.rule == "undefined-value" and "different Value object from the input %x" in str(e)


def test_duplicate_definition():
    g, v = block()
    # Graph.append_node refuses a taken name, so break the graph by editing the node list directly
    dup = Value("y", TensorType((B, S, 16), DType.f32))
    node = Node("neg", [v["y"]], {}, [dup])
    dup.producer = node
    g.nodes.append(node)
    e = only_error(g)
    assert (e.rule, e.node) == ("duplicate-definition", node)
    assert str(e) == ("verify: node %y = neg(...): rule 'duplicate-definition': result %y: value name %y is "
                      "already defined as result %y of node %y = add(...)")

    g, v = block()
    again = Node("neg", [v["x"]], {}, [v["h"]])  # the same Value object produced twice
    g.nodes.append(again)
    kinds = {e.rule for e in verify(g, collect=True)}
    assert "duplicate-definition" in kinds


def test_input_and_param_name_clash():
    g, v = block()
    g.inputs.append(Value("w_qkv", TensorType((2,), DType.f32)))
    e = only_error(g)
    assert e.rule == "duplicate-definition" and e.node is None
    assert str(e) == ("verify: param %w_qkv: rule 'duplicate-definition': value name %w_qkv is "
                      "already defined as input %w_qkv")


def test_outputs():
    g, v = block()
    g.outputs = []
    e = only_error(g)
    assert (e.rule, e.node) == ("no-outputs", None)
    assert str(e) == "verify: graph 'block': rule 'no-outputs': the graph has no outputs"

    g, v = block()
    g.outputs.append(Value("ghost", TensorType((1,), DType.f32)))
    e = only_error(g)
    assert (e.rule, e.node) == ("output-undefined", None)
    assert "output 1 %ghost is not defined in the graph" in str(e)


def test_param_data():
    g, v = block()
    g.param_data["w_qkv"] = np.zeros((48, 8), np.float32)
    e = only_error(g)
    assert (e.rule, e.node) == ("param-data", None)
    assert str(e) == ("verify: param %w_qkv: rule 'param-data': declared f32[48, 16] but its data is "
                      "f32[48, 8]")
    g.param_data["w_qkv"] = np.zeros((48, 16), np.float16)
    assert "its data is f16[48, 16]" in str(only_error(g))


def test_param_data_accepts_torch_tensors_and_missing_data():
    import torch
    g, v = block()
    g.param_data["w_qkv"] = torch.zeros(48, 16)
    verify(g)
    g.param_data["w_qkv"] = torch.zeros(48, 16, dtype=torch.bfloat16)
    assert "declared f32[48, 16] but its data is bf16[48, 16]" in str(only_error(g))
    del g.param_data["w_qkv"]  # data may be attached later
    verify(g)


def test_param_data_packed_int4():
    g = Graph()
    x = g.add_input("x", TensorType((4, 6), DType.f32))
    w = g.add_param("w", type=TensorType((4, 6), DType.i4))
    g.set_outputs([x])
    g.param_data["w"] = np.zeros((4, 6), DType.i4.numpy)  # unpacked
    verify(g)
    g.param_data["w"] = np.zeros(12, np.uint8)  # two per byte
    verify(g)
    g.param_data["w"] = np.zeros(13, np.uint8)
    assert only_error(g).rule == "param-data"
    assert w.type.dtype is DType.i4


def test_undeclared_symbol_in_types_and_attrs():
    g, v = block()
    del g.symbols["seq"]
    e = only_error(g)
    assert (e.rule, e.node) == ("undeclared-symbol", None)
    assert str(e).startswith("verify: graph input %x: rule 'undeclared-symbol': %x has type "
                             "f32[batch, seq, 16] using symbol(s) ['seq']")

    g = Graph()
    g.add_symbol("seq", 1, 16)
    x = g.add_input("x", TensorType((S,), DType.f32))
    r = g.add_node("arange", [], {"end": S})
    g.set_outputs([x, r])
    verify(g)
    r.producer.attrs["end"] = sym("len")
    errs = verify(g, collect=True)
    rules = [e.rule for e in errs]
    assert "undeclared-symbol" in rules
    attr_err = next(e for e in errs if e.rule == "undeclared-symbol")
    assert attr_err.node is r.producer and "attribute 'end' = len uses symbol(s) ['len']" in str(attr_err)


def test_bad_symbol_bounds():
    g, v = block()
    g.symbols["seq"] = (64, 8)
    e = only_error(g)
    assert (e.rule, e.node) == ("bad-symbol-bounds", None)
    assert str(e) == "verify: symbol 'seq': rule 'bad-symbol-bounds': min 64 > max 8"
    g.symbols["seq"] = (1.5, None)
    assert "bounds must be ints or None" in str(only_error(g))
    g.symbols["seq"] = (None, -1)
    assert "cannot be negative" in str(only_error(g))
    g.symbols["seq"] = (None, None)
    verify(g)


def test_producer_link():
    g, v = block()
    node = v["qkv"].producer
    v["qkv"].producer = None
    e = only_error(g)
    assert (e.rule, e.node) == ("producer-link", node)
    assert "result 0 %v1 has producer None and index 0, not this node and index 0" in str(e)

    g, v = block()
    split = v["q"].producer
    split.outputs[1].index = 0
    e = only_error(g)
    assert (e.rule, e.node) == ("producer-link", split)


def test_use_list():
    # the structures keep use-lists (tests/ir/test_mutation.py); a stale one needs private fields
    g, v = block()
    node = v["qkv"].producer
    del v["h"]._uses[Use(node, 0)]
    e = only_error(g)
    assert (e.rule, e.node) == ("use-list", node)
    assert str(e).endswith(f"rule 'use-list': operand 0 %{v['h'].name} does not list this node as a user "
                           f"(a stale use-list)")

    g, v = block()
    y = v["y"].producer
    v["x"]._uses[Use(y, 1)] = None  # y reads x as operand 0 only
    e = only_error(g)
    assert (e.rule, e.node) == ("use-list", y)
    assert "%x lists operand 1 of this node as a use, but the node does not read it there" in str(e)

    g, v = block()
    node = v["qkv"].producer
    node._graph = None
    errs = verify(g, collect=True)
    assert [(e.rule, e.node) for e in errs][:1] == [("use-list", node)]
    assert "in this graph's node list but attached to no graph" in str(errs[0])
    assert any(f"%{v['h'].name} (of graph @block) lists this node, which is in no graph" in str(e) for e in errs)


def test_collect_returns_every_problem_in_graph_order():
    g, v = block()
    g.symbols["batch"] = (9, 2)
    v["h"].producer.op = "layer_nrom"
    v["q"].producer.attrs["axis"] = "last"
    g.outputs.append(Value("ghost", TensorType((1,), DType.f32)))
    errs = verify(g, collect=True)
    assert [e.rule for e in errs] == ["bad-symbol-bounds", "unknown-op", "attr-kind", "output-undefined"]
    assert all(isinstance(e, VerificationError) for e in errs)
    with pytest.raises(VerificationError, match="bad-symbol-bounds"):
        verify(g)


def test_partitioned_graphs_need_their_collectives_and_mesh():
    from llmasos.ir import parse
    g = parse("""graph @m(%x: f32[2, 8]) {
  mesh tp = 2
  param %w: f32[4, 8] #split(0, tp)
  %h: f32[2, 4] #split(1, tp) = linear(%x, %w)
  %y: f32[2, 4] = relu(%h)
  return %y
}""", params={"w": np.zeros((8, 8), np.float32)})
    assert only_error(g).rule == "sharding"                    # a split value reaches a replicated one
    g = parse("""graph @m(%x: f32[2, 8]) {
  mesh tp = 2
  %y: f32[2, 8] = dist.all_reduce(%x) {axis = "tp", parts = 4}
  return %y
}""")
    assert only_error(g).rule == "mesh"                        # a group that does not fit the mesh


def test_every_rule_has_a_test():
    import inspect
    import sys
    src = inspect.getsource(sys.modules[__name__])
    untested = [r for r in RULES if f'"{r}"' not in src.split("def test_every_rule_has_a_test")[0]]
    assert not untested, f"rules without a test: {untested}"


@given(graphs(max_nodes=12))
def test_random_graphs_verify_clean(g):
    verify(g)
