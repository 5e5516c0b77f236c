"""Alternation in rules: whole patterns (``p | q``), ops (``(silu|relu)``) and attribute values
(``("none"|"tanh")``), named alternatives reused or mapped by position in the replacement, the Python
form (``one_of``), explain, load-time errors, and the collapsed epilogue.rw fusing every GEMM form."""
from __future__ import annotations

import numpy as np
import pytest

from llmasos.ir import DType, Graph, TensorType, graph_equal
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import PassManager
from llmasos.passes.rewrite import (Choice, Op, Rule, RuleError, apply_rules, bind, explain, one_of, op, parse_rules,
                                    rewrite, var)

F32 = DType.f32
RNG = np.random.default_rng(0)

ACT = """
rule act: f:(silu|relu)(y@linear(x, w)) => fused.linear_act(x, w){act=f} where users(y) == 1
rule gelu: gelu(y@g:(linear|matmul)(x, w)){approximate=a:("none"|"tanh")} => g:(fused.linear_act|fused.matmul_act)(x, w){act=a:("gelu"|"gelu_tanh")} where rank(w) == 2
rule move: f:(silu|relu)(r@reshape(y){shape=s}) => reshape(f(y)){shape=s}
rule bias: add(y@linear(x, w), b) | add(b, y@linear(x, w)) => fused.linear_act(x, w, b) where rank(b) == 1
"""


def gemm(op_name: str = "linear", lead=(3,)):
    g = Graph("t")
    x = g.add_input("x", TensorType((*lead, 4), F32))
    shape = (4, 6) if op_name == "matmul" else (6, 4)
    y = g.add_node(op_name, [x, g.add_param("w", RNG.standard_normal(shape).astype(np.float32))], name="y")
    return g, x, y


def test_parsing_gives_choices_and_alternatives():
    rules = parse_rules(ACT, "alt.rw")
    act = rules["act"].pattern
    assert isinstance(act, Op) and isinstance(act.op, Choice) and act.op.options == ("silu", "relu")
    assert act.op.name == "f"
    gelu = rules["gelu"].pattern
    assert gelu.attrs["approximate"].options == ("none", "tanh") and gelu.attrs["approximate"].name == "a"
    assert [str(o) for o in rules["bias"].pattern.options] == ["add(y@linear(x, w), b)", "add(b, y@linear(x, w))"]
    # the text form prints back
    assert str(rules["gelu"]).startswith('rule gelu: gelu(y@g:(linear|matmul)(x, w)){approximate=a:("none"|"tanh")} '
                                         '=> g:(fused.linear_act|fused.matmul_act)(x, w){act=a:("gelu"|"gelu_tanh")}')
    assert str(rules["move"]).startswith("rule move: f:(silu|relu)(r@reshape(y){shape=s}) => reshape(f(y))")
    assert parse_rules(str(rules["gelu"]).replace(" where rank(w) == 2", ""))  # re-parses


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_each_op_alternative_matches_and_its_name_reaches_the_replacement(act):
    g, x, y = gemm()
    g.set_outputs([g.add_node(act, [y])])
    out = apply_rules(g, parse_rules(ACT))
    assert [(n.op, n.attrs.get("act")) for n in out.nodes] == [("fused.linear_act", act)]
    xs = [RNG.standard_normal((3, 4)).astype(np.float32)]
    assert run(out, xs)[0].tobytes() == run(g, xs)[0].tobytes()


@pytest.mark.parametrize("gemm_op, approximate, fused, act", [
    ("linear", "none", "fused.linear_act", "gelu"), ("linear", "tanh", "fused.linear_act", "gelu_tanh"),
    ("matmul", "none", "fused.matmul_act", "gelu"), ("matmul", "tanh", "fused.matmul_act", "gelu_tanh")])
def test_alternatives_map_by_position(gemm_op, approximate, fused, act):
    g, x, y = gemm(gemm_op)
    g.set_outputs([g.add_node("gelu", [y], {"approximate": approximate})])
    out = apply_rules(g, parse_rules(ACT))
    assert [(n.op, n.attrs.get("act")) for n in out.nodes] == [(fused, act)]


def test_an_unlisted_op_or_value_does_not_match_and_explain_says_why():
    rules = parse_rules(ACT)
    g, x, y = gemm()
    e = g.add_node("exp", [y], name="e")
    h = g.add_node("gelu", [e], {"approximate": "none"}, name="h")
    g.set_outputs([h])
    assert apply_rules(g, rules).op_counts() == {"linear": 1, "exp": 1, "gelu": 1}
    assert "expected op (silu|relu), %e is produced by exp" in explain(rules["act"], g, "e")
    assert "expected op (linear|matmul), %e is produced by exp" in explain(rules["gelu"], g, "h")
    wrong = parse_rules('rule t: gelu(x){approximate=("tanh"|"none")} => x')["t"]
    assert explain(wrong, g, "h").startswith("rule 't' (<rules>:1:6) matches %h")
    only_tanh = Rule("tanh", op("gelu", var("x"), approximate=one_of("tanh", "tanh ", name="a")), lambda b, m: m["x"])
    assert 'attribute approximate: expected one of ("tanh"|"tanh "), %h has \'none\'' in explain(only_tanh, g, "h")


def test_the_pattern_alternatives_cover_both_operand_orders():
    for swap in (False, True):
        g, x, y = gemm()
        b = g.add_param("b", RNG.standard_normal(6).astype(np.float32))
        g.set_outputs([g.add_node("add", [b, y] if swap else [y, b])])
        out = rewrite(g, parse_rules(ACT))
        assert dict(out.stats) == {"bias": 1} and out.graph.op_counts() == {"fused.linear_act": 1}


def test_a_name_bound_twice_must_match_the_same_alternative():
    rules = parse_rules("rule same: add(f:(neg|exp)(x), f:(neg|exp)(y)) => f(add(x, y)) where f == \"neg\"")
    g = Graph("s")
    x, y = (g.add_input(n, TensorType((3,), F32)) for n in "xy")
    a = g.add_node("add", [g.add_node("neg", [x]), g.add_node("neg", [y])], name="a")
    b = g.add_node("add", [g.add_node("exp", [x]), g.add_node("exp", [y])], name="b")
    c = g.add_node("add", [g.add_node("neg", [x]), g.add_node("exp", [y])], name="c")
    g.set_outputs([a, b, c])
    out = rewrite(g, rules)
    assert dict(out.stats) == {"same": 1}  # a; b fails the constraint on f, c binds f twice differently
    assert "op choice f is already bound to 'neg', here it is 'exp'" in explain(rules["same"], g, "c")
    assert "constraint `f == \"neg\"` is false: f = exp" in explain(rules["same"], g, "b")


def test_the_python_form_is_the_same_rule():
    text = parse_rules(ACT)
    x, w = var("x"), var("w")
    py = [Rule("act", op(one_of("silu", "relu", name="f"), bind("y", op("linear", x, w))),
               lambda b, m: b.op("fused.linear_act", m["x"], m["w"], act=m["f"])),
          Rule("gelu", op("gelu", bind("y", op(one_of("linear", "matmul", name="g"), x, w)),
                          approximate=one_of("none", "tanh", name="a")),
               lambda b, m: b.op(m["g"].replace("linear", "fused.linear_act").replace("matmul", "fused.matmul_act"),
                                 m["x"], m["w"], act={"none": "gelu", "tanh": "gelu_tanh"}[m["a"]]))]
    for act in ("relu", "gelu"):
        g, _, y = gemm()
        g.set_outputs([g.add_node(act, [y], {"approximate": "tanh"} if act == "gelu" else {})])
        assert graph_equal(apply_rules(g, py), apply_rules(g, text))
    with pytest.raises(ValueError, match="at least two alternatives"):
        one_of("silu")


def test_every_alternative_is_type_checked_at_load():
    with pytest.raises(RuleError, match=r"rule 't'.*replacement `f:\(exp\|logical_not\)\(x\)` does not build for "
                                        r"operands of type f32\[3, 3\], with f = 'neg'"):
        parse_rules("rule t: f:(exp|neg)(x) => f:(exp|logical_not)(x)")


@pytest.mark.parametrize("text, pos, message", [
    ("rule t: (silu|rleu)(x) => x", (1, 15), "unknown op 'rleu'; did you mean 'relu'"),
    ("rule t: (silu|relu|silu)(x) => x", (1, 20), "the alternation lists silu twice"),
    ("rule t: f:(silu|relu)(x) => (silu|relu)(x)", (1, 30), "a replacement cannot choose on its own: write "
                                                             "NAME:(silu|relu)"),
    ("rule t: f:(silu|relu)(x) => g:(silu|relu)(x)", (1, 29), "picks by the alternative 'g' matched, but the pattern "
                                                               "names no alternation 'g'"),
    ("rule t: f:(silu|relu)(x) => f:(silu|relu|tanh)(x)", (1, 29), "f:(silu|relu|tanh) has 3 alternatives but the "
                                                                    "pattern's f:(silu|relu) has 2; they pair up by "
                                                                    "position"),
    ('rule t: gelu(x){approximate=("none"|q)} => x', (1, 37), "alternatives are literals"),
    ('rule t: gelu(x){approximate=("none"|"tanhh")} => x', (1, 37), "attribute approximate of gelu: alternative "
                                                                     "\"tanhh\" must be one of ['none', 'tanh']"),
    ("rule t: add(f:(neg|exp)(x), f) => x", (1, 9), "'f' names an alternation and is bound as a value"),
    ("rule t: neg:(silu|relu)(x) => x", (1, 9), "cannot name an op alternation 'neg': that is an op"),
    ('rule t: gelu(x){approximate=a:("none"|"tanh")} => a(x)', (1, 51), "a names an alternation of attribute values"),
    ('rule t: reshape(x){shape=[2, (3|4)]} => x', (1, 30), "an alternation is a whole attribute value"),
    ("rule t: f:(silu|relu)(x) | f:(neg|exp)(x) => f(x)", (1, 28), "f names two different alternations"),
    ("rule t: f:(silu|relu)(x) | tanh(x) => f(x)", (1, 39), "'f' is not bound by the pattern (not by every "
                                                             "alternative)"),
])
def test_bad_alternations_are_located_errors(text, pos, message):
    with pytest.raises(RuleError) as e:
        parse_rules(text, "bad.rw")
    assert message in str(e.value)
    assert f"(bad.rw:{pos[0]}:{pos[1]})" in str(e.value)


# -- the collapsed epilogue rules -----------------------------------------------------------------------

@pytest.mark.parametrize("gemm_op, bias", [("linear", None), ("linear", "left"), ("linear", "right"),
                                           ("linear", "inside"), ("matmul", None), ("matmul", "left"),
                                           ("matmul", "right")])  # matmul has no bias operand
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("reshape", [False, True])
def test_fuse_epilogue_fuses_every_gemm_bias_activation_form(gemm_op, bias, act, reshape):
    g = Graph("e")
    x = g.add_input("x", TensorType((2, 3, 4), F32))
    w = g.add_param("w", RNG.standard_normal((4, 6) if gemm_op == "matmul" else (6, 4)).astype(np.float32))
    b = g.add_param("b", RNG.standard_normal(6).astype(np.float32))
    h = g.add_node("reshape", [x], {"shape": [6, 4]}) if reshape else x
    y = g.add_node(gemm_op, [h, w, b] if bias == "inside" else [h, w])
    if bias in ("left", "right"):
        y = g.add_node("add", [y, b] if bias == "right" else [b, y])
    if reshape:
        y = g.add_node("reshape", [y], {"shape": [2, 3, 6]})
    name, attrs = {"gelu": ("gelu", {}), "gelu_tanh": ("gelu", {"approximate": "tanh"}), "silu": ("silu", {}),
                   "relu": ("relu", {})}[act]
    g.set_outputs([g.add_node(name, [y], attrs)])
    xs = [RNG.standard_normal((2, 3, 4)).astype(np.float32)]
    out = PassManager("fuse-epilogue,dce", numeric_check=xs).run(g)
    verify(out)
    fused = [n for n in out.nodes if n.op.startswith("fused.")]
    assert [(n.op, n.attrs["act"], len(n.inputs)) for n in fused] == \
        [(f"fused.{gemm_op}_act", act, 3 if bias else 2)]
    assert sorted(n.op for n in out.nodes) == sorted(["reshape", "reshape"] * reshape + [fused[0].op])
    assert run(out, xs)[0].tobytes() == run(g, xs)[0].tobytes()


def test_epilogue_rw_is_a_handful_of_rules():
    from llmasos.passes.rewrite_pass import load_rule_set
    assert len(load_rule_set("fuse-epilogue", "epilogue")) == 10  # 26 before alternation
