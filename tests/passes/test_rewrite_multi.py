"""Rewrite-engine extensions: as-patterns, result indices, multi-result rules, attribute/constant constraints,
value() in replacements, literals compared in the constant's dtype, explain for all of them."""
from __future__ import annotations

import numpy as np
import pytest

from llmasos.ir import DType, Graph, TensorType, graph_equal, print_graph
from llmasos.ir import ops as op_registry
from llmasos.ir.interpreter import run
from llmasos.ir.ops import Attr, OpDef, register_op
from llmasos.ir.verifier import verify
from llmasos.passes.rewrite import (RewriteError, Rule, RuleError, RuleSyntaxError, apply_rules, attr, bind, explain,
                                    first_match, op, ops, parse_rules, rewrite, traced_rule, var)

F32 = DType.f32
RNG = np.random.default_rng(0)


# -- a two-result scratch op: (rms_norm(x + r, w), x + r); and one whose second result has the wrong type --

def _add_norm_infer(x, r, w, *, eps, ndim):
    if x != r or w.shape != x.shape[-1:] or w.dtype != x.dtype:
        raise ValueError(f"test.add_norm needs x == r and w of shape [last dim of x], got {x}, {r}, {w}")
    return x, x


def _add_norm_ref(x, r, w, *, eps, ndim):
    s = x + r
    y = s.astype(np.float32) / np.sqrt((s.astype(np.float32) ** 2).mean(axis=-1, keepdims=True) + eps)
    return (y * w).astype(x.dtype), s


def _norm_mask_infer(x, r, w, *, eps, ndim):
    return _add_norm_infer(x, r, w, eps=eps, ndim=ndim)[0], TensorType(x.shape, DType.bool)


_NORM = {"eps": Attr("float", 1e-5), "ndim": Attr("int", 1)}


@pytest.fixture
def scratch_ops():
    """test.add_norm / test.norm_mask exist for one test only (other tests iterate over every op)."""
    for d in (OpDef("test.add_norm", ("x", "r", "w"), _add_norm_infer, _add_norm_ref, dict(_NORM)),
              OpDef("test.norm_mask", ("x", "r", "w"), _norm_mask_infer, _add_norm_ref, dict(_NORM))):
        register_op(d)
    yield
    for name in ("test.add_norm", "test.norm_mask"):
        op_registry.OPS.pop(name, None)


FUSE = "rule add-norm: rms_norm(s@add(x, r), w){eps=e, ndim=n} => test.add_norm(x, r, w){eps=e, ndim=n} -> (root, s)"


def _residual_graph(earlier_user: bool):
    """h = x + r feeds rms_norm and (when ``earlier_user``) an exp placed before the norm."""
    g = Graph("res")
    x = g.add_input("x", TensorType((2, 4), F32))
    r = g.add_input("r", TensorType((2, 4), F32))
    w = g.add_param("w", RNG.standard_normal(4).astype(np.float32))
    h = g.add_node("add", [x, r], name="h")
    u = g.add_node("exp", [h], name="u") if earlier_user else None
    n = g.add_node("rms_norm", [h, w], {"eps": 1e-6}, name="n")
    late = g.add_node("mul", [h, n], name="late")
    g.set_outputs([late] if u is None else [g.add_node("add", [u, late], name="out")])
    return g


def _inputs():
    return [RNG.standard_normal((2, 4)).astype(np.float32) for _ in range(2)]


# -- multi-result rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("earlier_user", [False, True])
def test_multi_result_rule_replaces_root_and_interior_value(scratch_ops, earlier_user):
    g = _residual_graph(earlier_user)
    before = print_graph(g)
    rules = parse_rules(FUSE, "fuse.rw")
    stats: dict = {}
    out = apply_rules(g, rules, stats=stats)
    assert print_graph(g) == before  # the input graph is untouched
    verify(out)  # an earlier user of h must now come after the fused node (topological re-sort)
    assert stats == {"add-norm": 1}
    want = ["test.add_norm", "exp", "mul", "add"] if earlier_user else ["test.add_norm", "mul"]
    assert [n.op for n in out.nodes] == want
    fused = out.nodes[0]
    assert fused.attrs == {"eps": 1e-6, "ndim": 1}
    mul = out.nodes[-1] if not earlier_user else out.nodes[2]
    assert mul.inputs == [fused.outputs[1], fused.outputs[0]]
    xs = _inputs()
    for a, b in zip(run(g, xs), run(out, xs)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_python_form_gives_the_same_rewrite(scratch_ops):
    g = _residual_graph(True)
    x, r, w = var("x"), var("r"), var("w")
    rule = Rule("add-norm", op("rms_norm", bind("s", op("add", x, r)), w, eps=attr("e"), ndim=attr("n")),
                lambda b, m: b.results("test.add_norm", m["x"], m["r"], m["w"], eps=m["e"], ndim=m["n"]),
                results=("root", "s"))
    assert str(rule.pattern) == "rms_norm(s@add(x, r), w){eps=e, ndim=n}"
    assert graph_equal(apply_rules(g, [rule]), apply_rules(g, parse_rules(FUSE)))


def test_multi_result_rewrite_that_would_cycle_is_rejected(scratch_ops):
    g = Graph("cyc")
    x = g.add_input("x", TensorType((2, 4), F32))
    r = g.add_input("r", TensorType((2, 4), F32))
    h = g.add_node("add", [x, r], name="h")
    w = g.add_node("mean", [h], {"axes": [0]}, name="w")  # the weight depends on the value the rule replaces
    g.set_outputs([g.add_node("rms_norm", [h, w], name="n")])
    rule = parse_rules(FUSE)["add-norm"]
    res = rewrite(g, rule)
    assert dict(res.stats) == {} and graph_equal(res.graph, g)
    msg = explain(rule, g, "n")
    assert ("matches %n but match rejected: replacement input %w depends on %h, which the rule replaces; "
            "rewriting would create a cycle") in msg
    assert len(g.nodes) == 3 and "v" not in {v.name for v in g.values()}  # explain left no trace


def test_multi_result_rules_keep_the_guards(scratch_ops):
    unfuse = "rule unfuse: test.add_norm(x, r, w){eps=e, ndim=n}[0] => rms_norm(add(x, r), w){eps=e, ndim=n}"
    g = _residual_graph(False)
    with pytest.raises(RewriteError, match=r"gave up after 20 rewrites.*rules that kept firing: .*add-norm"):
        apply_rules(g, parse_rules(FUSE + "\n" + unfuse), max_rewrites=20)
    # giving back the replaced values themselves is no rewrite: no loop, no error
    ident = Rule("ident", op("rms_norm", bind("s", op("add", var("x"), var("r"))), var("w")),
                 lambda b, m: (m["$root"], m["s"]), results=("root", "s"))
    assert dict(rewrite(g, ident, max_rewrites=5).stats) == {}
    # rebuilding a result as it was (same op, operands, attrs and result index) is no rewrite either
    split = parse_rules("rule same: split(x){axis=1, sizes=z}[1] => split(x){axis=1, sizes=z}[1]")
    g2 = Graph("s")
    xs = g2.add_input("x", TensorType((2, 4), F32))
    g2.set_outputs(list(g2.add_node("split", [xs], {"axis": 1, "sizes": [1, 3]})))
    assert dict(rewrite(g2, split, max_rewrites=5).stats) == {}


def test_result_list_errors_at_load_name_the_rule(scratch_ops):
    with pytest.raises(RuleError, match=r"rule 'nr' \(<rules>:1:6\): the result list \(s\) must include root"):
        parse_rules(FUSE.replace("add-norm", "nr").replace("(root, s)", "(s)"))
    with pytest.raises(RuleError, match=r"rule 'ub' \(<rules>:1:\d+\): result list names 'q', which the pattern "
                                        r"does not bind"):
        parse_rules(FUSE.replace("add-norm", "ub").replace("(root, s)", "(root, q)"))
    with pytest.raises(RuleError, match=r"rule 'v': result list names 'x' but the pattern binds it as a variable, "
                                        r"not with @"):
        Rule("v", op("neg", var("x")), lambda b, m: (m["x"],), results=("root", "x"))
    three = ("rule three: rms_norm(s@add(x, t@neg(r)), w){eps=e, ndim=n} => test.add_norm(x, r, w){eps=e, ndim=n} "
             "-> (root, s, t)")
    with pytest.raises(RuleError, match=r"rule 'three' \(t.rw:1:6\): replacement gives 2 result\(s\) but the "
                                        r"result list \(root, s, t\) has 3 \(for operands of type f32\[3\]\)"):
        parse_rules(three, "t.rw")
    bad = FUSE.replace("add-norm", "mask").replace("test.add_norm", "test.norm_mask")
    with pytest.raises(RuleError, match=r"rule 'mask' \(<rules>:1:6\): replacement result #1 has type bool\[3\], "
                                        r"the value it replaces \(s = %s\) has f32\[3\]"):
        parse_rules(bad)
    with pytest.raises(RuleError, match=r"rule 'idx' \(<rules>:1:\d+\): with a result list the replacement must be "
                                        r"one op call giving all 2 results"):
        parse_rules(FUSE.replace("add-norm", "idx").replace("{eps=e, ndim=n} ->", "{eps=e, ndim=n}[0] ->"))


def test_result_errors_at_apply_time_name_the_rule_and_result():
    # sum's axes have no default, so nothing can be probed at load: the engine checks when it applies
    def pattern():
        return op("neg", bind("s", op("sum", var("x"), axes=attr("a"))))
    g = Graph("late")
    x = g.add_input("x", TensorType((2, 3), F32))
    g.set_outputs([g.add_node("neg", [g.add_node("sum", [x], {"axes": [0]}, name="s")], name="n")])
    wrong_type = Rule("wt", pattern(), lambda b, m: (b.op("neg", m["x"]), m["x"]), results=("root", "s"))
    with pytest.raises(RewriteError, match=r"rule 'wt' at node %n = neg\(...\): replacement result #0 has type "
                                           r"f32\[2, 3\], the value it replaces \(root = %n\) has f32\[3\]"):
        apply_rules(g, wrong_type)
    wrong_count = Rule("wc", pattern(), lambda b, m: (m["s"],), results=("root", "s"))
    with pytest.raises(RewriteError, match=r"rule 'wc' at node %n = neg\(...\): replacement gives 1 result\(s\) "
                                           r"but the result list \(root, s\) has 2"):
        apply_rules(g, wrong_count)


# -- result indices and as-patterns ---------------------------------------------------------------------

def _split_graph():
    g = Graph("sp")
    x = g.add_input("x", TensorType((2, 5), F32))
    p0, p1 = g.add_node("split", [g.add_node("neg", [x], name="nx")], {"axis": 1, "sizes": [2, 3]}, names=["p0", "p1"])
    g.set_outputs([g.add_node("exp", [p0], name="e0"), p1])
    return g


def test_result_index_patterns_and_replacements():
    rules = parse_rules("rule split-neg: split(neg(x)){axis=a, sizes=z}[1] => neg(split(x){axis=a, sizes=z}[1])")
    assert str(rules["split-neg"].pattern) == "split(neg(x)){axis=a, sizes=z}[1]"
    g = _split_graph()
    stats: dict = {}
    out = apply_rules(g, rules, stats=stats)  # the root is a result of a two-result node
    verify(out)
    assert stats == {"split-neg": 1}
    assert out.outputs[1].producer.op == "neg" and out.outputs[1].producer.inputs[0].index == 1
    xs = [RNG.standard_normal((2, 5)).astype(np.float32)]
    for a, b in zip(run(g, xs), run(out, xs)):
        np.testing.assert_array_equal(b, a)
    py = Rule("split-neg", op("split", op("neg", var("x")), axis=attr("a"), sizes=attr("z"))[1],
              lambda b, m: b.op("neg", b.op("split", m["x"], _result=1, axis=m["a"], sizes=m["z"])))
    assert graph_equal(apply_rules(g, [py]), out)
    traced = traced_rule("split-neg", lambda x: ops.split(-x, axis=1, sizes=[2, 3])[1],
                         lambda x: -ops.split(x, axis=1, sizes=[2, 3])[1])
    assert graph_equal(apply_rules(g, [traced]), out)

    text = parse_rules("""
rule no-index: exp(split(x)) => x
rule other: exp(split(x)[1]) => x
rule first: exp(split(x)[0]) => x
""")
    assert "split has 2 results; patterns match single-result nodes" in explain(text["no-index"], g, "e0")
    assert "expected result #1 of split, %p0 is result #0" in explain(text["other"], g, "e0")
    assert "expected result #5 of split, %p0's node has 2 result(s)" in explain(
        Rule("r5", op("exp", op("split", var("x"))[5]), lambda b, m: b.op("exp", m["x"])), g, "e0")
    assert ("matches %e0 but applying it fails: rule 'first' (<rules>:4:6) at node %e0 = exp(...): replacement has "
            "type f32[2, 5], the replaced value %e0 has f32[2, 2]") in explain(text["first"], g, "e0")

    with pytest.raises(RuleError, match=r"rule 'pick': replacement .* does not build for operands of type "
                                        r"f32\[3, 3\]: replacement op split has 2 results; use a single-result op"):
        Rule("pick", op("exp", var("x", shape=(2, 5))),
             lambda b, m: b.op("exp", b.op("split", m["x"], axis=1, sizes=[2, 3])))


def test_as_pattern_binds_and_must_agree():
    rules = parse_rules("rule sq: mul(s@exp(x), s) => pow(s, 2.0)\nrule sq2: mul(s@exp(x), s@exp(x)) => pow(s, 2.0)")
    g = Graph("as")
    x = g.add_input("x", TensorType((3,), F32))
    e1 = g.add_node("exp", [x], name="e1")
    e2 = g.add_node("exp", [x], name="e2")
    g.set_outputs([g.add_node("mul", [e1, e1], name="same"), g.add_node("mul", [e1, e2], name="diff")])
    stats: dict = {}
    out = apply_rules(g, rules, stats=stats)
    assert stats == {"sq": 1}  # mul(e1, e2) has two different exps
    xs = [RNG.standard_normal(3).astype(np.float32)]
    for a, b in zip(run(g, xs), run(out, xs)):
        np.testing.assert_allclose(b, a, rtol=1e-6)
    assert "s@ is already bound to %e1, here it would be %e2" in explain(rules["sq2"], g, "diff")
    assert "variable s is already bound to %e1, here it would be %e2" in explain(rules["sq"], g, "diff")
    m = first_match(rules["sq"], out.outputs[1])
    assert m is None
    with pytest.raises(TypeError, match="a variable binds itself"):
        bind("s", var("x"))


# -- constraints over attributes and constants ------------------------------------------------------------

def test_constraints_on_attribute_values_constants_and_uses():
    rules = parse_rules("""
rule small-eps: rms_norm(x){eps=e} => x where e < 0.001
rule last: softmax(x){axis=a} => x where a == -1
rule last-list: mean(x){axes=a, keepdims=k} => x where a == [rank(x) - 1] and k == true
rule half: mul(x, c) => x where value(c) == 0.5 and numel(c) == 1
rule shared: exp(h@neg(x)) => x where users(h) == 2
""")
    g = Graph("c")
    x = g.add_input("x", TensorType((2, 3), F32))
    n1 = g.add_node("rms_norm", [x], {"eps": 1e-6}, name="n1")
    n2 = g.add_node("rms_norm", [x], {"eps": 0.01}, name="n2")
    s1 = g.add_node("softmax", [x], {"axis": -1}, name="s1")
    s2 = g.add_node("softmax", [x], {"axis": 0}, name="s2")
    m1 = g.add_node("mean", [x], {"axes": [1], "keepdims": True}, name="m1")
    m2 = g.add_node("mean", [x], {"axes": [0], "keepdims": True}, name="m2")
    half = g.add_node("const", [], {"value": np.full((), 0.5, np.float32), "dtype": F32}, name="half")
    mixed = g.add_node("const", [], {"value": np.array([0.5, 0.25], np.float32).reshape(2, 1), "dtype": F32},
                       name="mixed")
    h1 = g.add_node("mul", [x, half], name="h1")
    h2 = g.add_node("mul", [x, mixed], name="h2")
    h3 = g.add_node("mul", [x, x], name="h3")
    ng = g.add_node("neg", [x], name="ng")
    e = g.add_node("exp", [ng], name="e")
    g.set_outputs([n1, n2, s1, s2, m1, m2, h1, h2, h3, e])
    for rule, yes, no in [("small-eps", n1, n2), ("last", s1, s2), ("last-list", m1, m2), ("half", h1, h2)]:
        assert first_match(rules[rule], yes, g) is not None, rule
        assert first_match(rules[rule], no, g) is None, rule
    assert first_match(rules["half"], h3, g) is None  # value() of a non-constant is none: false, no error
    assert first_match(rules["shared"], e, g) is None
    g.outputs.append(ng)
    assert first_match(rules["shared"], e, g) is not None  # a graph output is a use too
    g.outputs.pop()
    assert "is false: e = 0.01" in explain(rules["small-eps"], g, "n2")
    assert "is false: a = [0], rank(x) = 2, k = True" in explain(rules["last-list"], g, "m2")
    assert "is false: value(c) = None, numel(c) = 2" in explain(rules["half"], g, "h2")  # not all equal
    assert "is false: value(c) = None, numel(c) = 6" in explain(rules["half"], g, "h3")
    assert "is false: users(h) = 1" in explain(rules["shared"], g, "e")
    with pytest.raises(RuleError, match=r"rule 'u' \(<rules>:1:\d+\): unknown name 'b' in constraint .*a bound "
                                        r"attribute: a\)"):
        parse_rules("rule u: softmax(x){axis=a} => x where b == 1")
    with pytest.raises(RuleError, match=r"unknown function 'size' in constraint; known: rank, dtype, shape, numel, "
                                        r"value, users"):
        parse_rules("rule u: softmax(x) => x where size(x) == 1")


RAISE = ("rule raise-rms-norm: mul(x, rsqrt(add(mean(pow(x, 2.0)){axes=a, keepdims=true}, e))) "
         "=> rms_norm(x){eps=value(e), ndim=1} where a == [-1] and numel(e) == 1")


def _decomposed_rms(eps_const: bool):
    g = Graph("rms")
    x = g.add_input("x", TensorType((2, 8), F32))
    two = g.add_node("const", [], {"value": np.full((), 2.0, np.float32), "dtype": F32})
    m = g.add_node("mean", [g.add_node("pow", [x, two])], {"axes": [-1], "keepdims": True})
    eps = (g.add_node("const", [], {"value": np.full((1,), 1e-6, np.float32), "dtype": F32}, name="eps")
           if eps_const else g.add_input("eps", TensorType((1,), F32)))
    g.set_outputs([g.add_node("mul", [x, g.add_node("rsqrt", [g.add_node("add", [m, eps])])], name="y")])
    return g


def test_value_in_replacement_attributes():
    rules = parse_rules(RAISE)
    g = _decomposed_rms(True)
    out = apply_rules(g, rules)
    verify(out)
    assert [n.op for n in out.nodes] == ["rms_norm"]
    assert out.nodes[0].attrs["eps"] == 1e-6  # the shortest decimal that is the f32 constant
    xs = [RNG.standard_normal((2, 8)).astype(np.float32)]
    np.testing.assert_allclose(run(out, xs)[0], run(g, xs)[0], rtol=1e-5, atol=1e-6)
    # eps is no constant: the rule declines (no error) and explain says why
    g2 = _decomposed_rms(False)
    assert dict(rewrite(g2, rules).stats) == {}
    msg = explain(rules["raise-rms-norm"], g2, "y")
    assert "matches %y but replacement declined: value(%eps): not a constant with all elements equal" in msg


# -- literals compared in the constant's dtype ----------------------------------------------------------

@pytest.mark.parametrize("literal,dtype,stored,matches", [
    ("0.7978845608028654", np.float32, np.sqrt(2 / np.pi), True),  # only equal after rounding to f32
    ("0.1", np.float16, 0.1, True),
    ("0.1", np.float32, 0.2, False),
    ("2", np.int64, 2, True),
    ("2.0", np.int32, 2, True),
    ("2.5", np.int64, 2, False),
])
def test_number_literals_match_in_the_constants_dtype(literal, dtype, stored, matches):
    rule = parse_rules(f"rule k: mul(x, {literal}) => x where shape(x) == shape(root)")["k"]
    g = Graph("lit")
    dt = DType.from_numpy(np.dtype(dtype))
    x = g.add_input("x", TensorType((3,), dt))
    c = g.add_node("const", [], {"value": np.full((3,), stored).astype(dtype), "dtype": dt}, name="c")
    root = g.add_node("mul", [x, c], name="m")
    assert (first_match(rule, root, g) is not None) is matches
    if not matches:
        assert f"constant %c is not all {float(literal) if '.' in literal else int(literal)!r}" in explain(rule, g, "m")


# -- syntax ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,line,col,msg", [
    ("rule a: neg(x) => x\nrule b: neg(s@x) => x", 2, 16, "unexpected ')'; expected '('"),
    ("rule a: split(x)[a] => x", 1, 18, "unexpected 'a'; expected an integer"),
    ("rule a: neg(x) => neg(x) -> (root", 1, 34, "unexpected end of input"),
    ("rule a: neg(x) => neg(x) -> root", 1, 29, "unexpected 'root'; expected '('"),
    ("rule a: neg(x) => x where rank(x) == [1, 2", 1, 43, "unexpected end of input"),
])
def test_syntax_errors_have_line_and_column(text, line, col, msg):
    with pytest.raises(RuleSyntaxError) as e:
        parse_rules(text, "s.rw")
    assert (e.value.line, e.value.column) == (line, col), str(e.value)
    assert str(e.value).startswith(f"s.rw:{line}:{col}: {msg}"), str(e.value)


def test_as_pattern_is_rejected_in_replacements():
    with pytest.raises(RuleError, match=r"rule 'a' \(<rules>:1:23\): '@' binds values in patterns"):
        parse_rules("rule a: neg(x) => neg(s@exp(x))")
