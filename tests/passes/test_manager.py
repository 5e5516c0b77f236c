"""The pass manager's instruments, and the exact passes dce and cse on random graphs."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, strategies as st

from llmasos.ir import DType, Graph, Node, TensorType, Value, print_graph
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from llmasos.passes import (NumericDriftError, NumericTieWarning, Pass, PassError, PassManager, PassNotApplicable,
                            PassVerificationError, all_passes, get_pass, register_pass)
from tests.graph_strategies import graphs, graphs_with_inputs, random_inputs

F32 = DType.f32


def small_graph() -> Graph:
    """x -> sq = x*x -> y = sq + x -> z = tanh(y); plus dead and duplicate nodes, an unused param."""
    g = Graph("small")
    x = g.add_input("x", TensorType((2, 3), F32))
    w = g.add_param("w", np.full((2, 3), 0.5, np.float32))
    g.add_param("unused", np.ones((4,), np.float32))
    sq = g.add_node("mul", [x, x], name="sq")
    sq2 = g.add_node("mul", [x, x], name="sq2")
    y = g.add_node("add", [sq, x], name="y")
    g.add_node("exp", [y], name="dead")
    y2 = g.add_node("add", [sq2, x], name="y2")
    z = g.add_node("tanh", [g.add_node("mul", [y, y2], name="yy")], name="z")
    g.set_outputs([g.add_node("mul", [z, w], name="out")])
    return g


X = [np.arange(6, dtype=np.float32).reshape(2, 3) / 7 - 0.3]


# -- dce and cse ------------------------------------------------------------------------------------

def test_dce_and_cse_on_a_small_graph():
    g = small_graph()
    before = print_graph(g)
    g2 = PassManager("dce,cse").run(g)
    assert print_graph(g) == before
    assert print_graph(g2) == "\n".join([
        "graph @small(%x: f32[2, 3]) {",
        "  param %w: f32[2, 3]",
        "  %sq: f32[2, 3] = mul(%x, %x)",
        "  %y: f32[2, 3] = add(%sq, %x)",
        "  %yy: f32[2, 3] = mul(%y, %y)",
        "  %z: f32[2, 3] = tanh(%yy)",
        "  %out: f32[2, 3] = mul(%z, %w)",
        "  return %out",
        "}"])
    assert "unused" not in g2.param_data and "unused" in g.param_data
    assert run(g2, X)[0].tobytes() == run(g, X)[0].tobytes()


def test_cse_keeps_negative_zero_apart():
    g = Graph("z")
    x = g.add_input("x", TensorType((2,), F32))
    a = g.add_node("const", [], {"value": np.array([0.0, 1.0], np.float32), "dtype": F32}, name="a")
    b = g.add_node("const", [], {"value": np.array([-0.0, 1.0], np.float32), "dtype": F32}, name="b")
    c = g.add_node("const", [], {"value": np.array([0.0, 1.0], np.float32), "dtype": F32}, name="c")
    g.set_outputs([g.add_node("div", [x, a]), g.add_node("div", [x, b]), g.add_node("div", [x, c])])
    g2 = get_pass("cse")().run(g)
    assert [n.outputs[0].name for n in g2.nodes if n.op == "const"] == ["a", "b"]
    assert [v.name for v in g2.outputs] == [g.outputs[0].name, g.outputs[1].name, g.outputs[0].name]
    out = run(g2, [np.ones(2, np.float32)])
    assert out[0][0] == np.inf and out[1][0] == -np.inf


def _bits(arrays) -> list:
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


@st.composite
def graphs_with_duplicates(draw):
    """A random graph with copies of some of its nodes appended (and used as outputs): CSE's food."""
    g, inputs = draw(graphs_with_inputs(max_nodes=8))
    if not g.nodes:  # a graph of parameters only (its outputs are params): nothing to duplicate
        return g, inputs
    for n in draw(st.lists(st.sampled_from(g.nodes), max_size=3)):
        outs = g.add_node(n.op, n.inputs, dict(n.attrs), loc=n.loc)
        g.outputs.append(outs[0] if isinstance(outs, tuple) else outs)
    return g, inputs


@pytest.mark.parametrize("name", ["dce", "cse", "dce,cse"])
@given(case=graphs_with_duplicates())
def test_exact_passes_keep_numerics_bit_for_bit(name, case):
    g, inputs = case
    before_text = print_graph(g)
    want = run(g, inputs)
    g2 = PassManager(name, numeric_check=inputs).run(g)
    assert print_graph(g) == before_text  # the input graph is untouched
    verify(g2)
    assert _bits(run(g2, inputs)) == _bits(want)
    assert len(g2.nodes) <= len(g.nodes)
    again = PassManager(name).run(g2)  # a fixed point after one run
    assert print_graph(again) == print_graph(g2)


@given(case=graphs_with_duplicates())
def test_dce_leaves_nothing_dead_and_cse_nothing_duplicate(case):
    g, _ = case
    g2 = PassManager("cse,dce").run(g)
    users = g2.users()
    outs = {id(v) for v in g2.outputs}
    for n in g2.nodes:
        assert any(users[o] or id(o) in outs for o in n.outputs), n
    assert all(users[p] or id(p) in outs for p in g2.params.values())  # a param may be returned as is
    from llmasos.passes.cse import attrs_identical
    for i, a in enumerate(g2.nodes):
        for b in g2.nodes[:i]:
            assert not (a.op == b.op and [id(v) for v in a.inputs] == [id(v) for v in b.inputs]
                        and attrs_identical(a.attrs, b.attrs)), (a, b)


def _constructible(cls) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False


@pytest.mark.parametrize("name", sorted(n for n, c in all_passes().items() if _constructible(c)))
@given(case=graphs_with_inputs(max_nodes=8))
def test_every_registered_pass_keeps_numerics_within_its_tolerance(name, case):
    """Exact passes must hold their tolerance on any graph. A lossy pass's tolerance bounds the error it
    makes where it rewrites; a random graph downstream may amplify that without bound (a pruned row into
    rsqrt gives inf, a mul compounds two relative errors), so for lossy passes a drift report is allowed
    here, and must be well formed. Their accuracy bounds are tested on real models in their own tests."""
    g, inputs = case
    p = get_pass(name)()
    try:
        PassManager([name], numeric_check=inputs).run(g)  # raises NumericDriftError past tolerance
    except PassNotApplicable as e:  # the one refusal allowed: nothing to apply to, said by name
        assert e.pass_name == name
    except NumericDriftError as e:
        if p.exact:
            raise
        assert e.pass_name == name and "numeric drift past the pass's tolerance (tolerance rtol" in str(e)
        assert e.node is not None and e.value in {o.name for o in e.node.outputs}


# -- instruments ----------------------------------------------------------------------------------

def test_unchanged_pass_is_recorded_and_returns_its_input():
    g = PassManager("dce").run(small_graph())
    pm = PassManager("dce,cse,dce")
    g2 = pm.run(g)
    assert [(r.name, r.changed, r.nodes_before, r.nodes_after) for r in pm.records] == [
        ("dce", False, 7, 7), ("cse", True, 7, 5), ("dce", False, 5, 5)]
    g3 = PassManager("cse").run(g2)
    assert g3 is g2


def test_print_after_all_and_timing():
    out = io.StringIO()
    g = small_graph()
    g2 = PassManager("dce,cse", print_after_all=True, timing=True, out=out).run(g)
    text = out.getvalue()
    after_dce = PassManager("dce").run(g)
    assert text.startswith("// ----- IR after dce -----\n" + print_graph(after_dce) + "\n"
                           "// ----- IR after cse -----\n" + print_graph(g2) + "\n// ----- pass timing -----\n")
    table = text.split("// ----- pass timing -----\n")[1].splitlines()
    assert table[0].split() == ["//", "seconds", "changed", "nodes", "pass"]
    assert table[1].split()[2:] == ["yes", "8->7", "dce"]
    assert table[2].split()[2:] == ["yes", "7->5", "cse"]
    assert table[3].split()[2] == "(verify)"
    assert table[-1].split()[2] == "total"
    total = float(table[-1].split()[1])
    assert total >= sum(float(row.split()[1]) for row in table[1:-1]) - 1e-5


def test_nothing_printed_without_instruments():
    out = io.StringIO()
    PassManager("dce,cse", out=out).run(small_graph())
    assert out.getvalue() == ""


def _replace_op(g: Graph, old: str, new: str) -> Graph:
    g = g.clone()
    node = next(n for n in g.nodes if n.op == old)
    node.op = new
    return g


@pytest.fixture
def broken_passes(registry):
    @register_pass("flip-add")
    @dataclass(frozen=True)
    class FlipAdd(Pass):
        """Deliberately wrong: the first add becomes a sub, keeping its result's name."""

        def run(self, graph):
            return _replace_op(graph, "add", "sub")

    @register_pass("rename-and-negate")
    @dataclass(frozen=True)
    class RenameAndNegate(Pass):
        """Deliberately wrong, and every value renamed, so only the output can be named."""

        def run(self, graph):
            g = graph.clone()
            for v in g.values():
                if v not in g.inputs and v.name not in g.params:
                    v.name = "r_" + v.name
            out = g.add_node("neg", [g.outputs[0]], name="negated")
            g.outputs = [out]
            return g

    @register_pass("nudge")
    @dataclass(frozen=True)
    class Nudge(Pass):
        """Scales the output by (1 + eps): inexact, with a declared tolerance."""

        exact: ClassVar[bool] = False
        rtol: ClassVar[float] = 1e-3
        eps: float = 1e-4

        def run(self, graph):
            g = graph.clone()
            c = g.add_node("const", [], {"value": np.array(1 + self.eps, np.float32),
                                         "dtype": F32}, name="scale")
            g.outputs = [g.add_node("mul", [g.outputs[0], c], name="nudged")]
            return g

    @register_pass("tilt")
    @dataclass(frozen=True)
    class Tilt(Pass):
        """Scales the last element of param %w by (1 + eps): inexact, with a declared tolerance."""

        exact: ClassVar[bool] = False
        rtol: ClassVar[float] = 1e-3
        eps: float = 1e-4

        def run(self, graph):
            g = graph.clone()
            w = g.param_data["w"].copy()
            w[..., -1] *= np.float32(1 + self.eps)
            g.param_data["w"] = w
            return g

    @register_pass("tilt-exact")
    @dataclass(frozen=True)
    class TiltExact(Tilt):
        """Claims to be exact while tilting %w by 1e-7: a flipped argmax must be reported."""

        exact: ClassVar[bool] = True
        eps: float = 1e-7

    @register_pass("drop-first")
    @dataclass(frozen=True)
    class DropFirst(Pass):
        """Deliberately wrong: removes the first node, leaving its users dangling."""

        def run(self, graph):
            g = graph.clone()
            g.nodes = g.nodes[1:]
            return g

    @register_pass("raise-on-tanh")
    @dataclass(frozen=True)
    class RaiseOnTanh(Pass):
        def run(self, graph):
            for n in graph.nodes:
                if n.op == "tanh":
                    raise PassError(self.pass_name, "cannot handle tanh", n)
            return graph

    @register_pass("in-place")
    @dataclass(frozen=True)
    class InPlace(Pass):
        """Breaks the contract: edits its input and returns it."""

        def run(self, graph):
            graph.nodes[0].op = "add"
            return graph

    @register_pass("crash")
    @dataclass(frozen=True)
    class Crash(Pass):
        def run(self, graph):
            return {}["missing"]


def test_numeric_check_names_the_broken_pass_and_node(broken_passes):
    g = small_graph()
    with pytest.raises(NumericDriftError) as e:
        PassManager("dce,cse,flip-add,dce", numeric_check=X).run(g)
    err = e.value
    assert err.pass_name == "flip-add" and err.value == "y"
    assert err.node.op == "sub" and err.node.outputs[0].name == "y"
    msg = str(err)
    assert msg.startswith("pass 'flip-add': node %y = sub(...): numeric drift past the pass's tolerance "
                          "(exact: rtol 1e-06): first diverging value %y: ")
    assert "elements past tolerance; worst at" in msg


def test_numeric_check_falls_back_to_the_output_when_names_change(broken_passes):
    with pytest.raises(NumericDriftError, match=r"pass 'rename-and-negate': node %negated = neg\(...\): numeric "
                                                r"drift .* at graph output 0 %negated \(no value with the same "
                                                r"name diverged first\)"):
        PassManager("dce,rename-and-negate", numeric_check=lambda graph: random_inputs(graph)).run(small_graph())


def test_numeric_check_honours_declared_tolerance(broken_passes):
    PassManager("nudge", numeric_check=X).run(small_graph())  # 1e-4 drift within rtol 1e-3
    with pytest.raises(NumericDriftError, match=r"pass 'nudge\{eps=0.01\}': .*\(tolerance rtol 0.001, atol 0\) "
                                                r"at graph output 0 %nudged"):
        PassManager("nudge{eps=0.01}", numeric_check=lambda: X).run(small_graph())


def test_numeric_check_compares_each_pass_with_the_one_before(broken_passes):
    # three nudges of 1e-4 drift 3e-4 in all, but each is within its own 1e-3
    PassManager("nudge,nudge,nudge", numeric_check=X).run(small_graph())


def argmax_graph() -> Graph:
    """p = x * w; am = argmax(p); twice = am + am: a discrete value and one computed from it."""
    g = Graph("am")
    x = g.add_input("x", TensorType((1, 2), F32))
    w = g.add_param("w", np.ones((1, 2), np.float32))
    p = g.add_node("mul", [x, w], name="p")
    am = g.add_node("argmax", [p], {"axis": 1}, name="am")
    g.set_outputs([g.add_node("add", [am, am], name="twice"), p])
    return g


TIE = [np.array([[1.0, 1.0]], np.float32)]


def test_lossy_pass_may_flip_a_discrete_value_at_a_near_tie(broken_passes):
    pm = PassManager("tilt", numeric_check=TIE)
    with pytest.warns(NumericTieWarning, match=r"pass 'tilt': 1 discrete value\(s\) flipped at near-ties .*: %am; "
                                               r"the values computed from them were not compared"):
        g2 = pm.run(argmax_graph())
    assert pm.records[0].tie_flips == 1
    assert run(g2, TIE)[0] == 2 and run(argmax_graph(), TIE)[0] == 0  # the flip is real, and reported
    no_tie = [np.array([[1.0, 0.5]], np.float32)]
    pm = PassManager("tilt", numeric_check=no_tie)
    pm.run(argmax_graph())
    assert pm.records[0].tie_flips == 0


def test_tie_rule_does_not_excuse_drifted_operands_or_exact_passes(broken_passes):
    with pytest.raises(NumericDriftError, match=r"pass 'tilt\{eps=0.01\}': node %p = mul\(...\): .*first diverging "
                                                r"value %p"):
        PassManager("tilt{eps=0.01}", numeric_check=TIE).run(argmax_graph())
    with pytest.raises(NumericDriftError, match=r"pass 'tilt-exact': node %am = argmax\(...\): numeric drift past "
                                                r"the pass's tolerance \(exact: rtol 1e-06\): first diverging value "
                                                r"%am: 1 of 1 elements differ; at \(0,\): 0 -> 1"):
        PassManager("tilt-exact", numeric_check=TIE).run(argmax_graph())


def test_verify_each_names_the_pass_that_broke_the_graph(broken_passes):
    with pytest.raises(PassVerificationError,
                       match=r"^pass 'drop-first': node %y = add\(...\): broke the graph: verify: node %y = "
                             r"add\(...\): rule 'undefined-value': operand 0 %sq is not defined") as e:
        PassManager("cse,drop-first").run(small_graph())
    assert e.value.cause.rule == "undefined-value"
    PassManager("drop-first", verify_each=False).run(small_graph())  # unchecked, it goes through


def test_input_graph_verified_first():
    g = small_graph()
    g.nodes[0].outputs[0].type = TensorType((2, 4), F32)
    with pytest.raises(PassError, match=r"pass '<input>': node %sq = mul\(...\): the input graph fails "
                                        r"verification before any pass: .*rule 'result-type'"):
        PassManager("dce").run(g)


def test_pass_errors_name_the_pass_and_node(broken_passes):
    with pytest.raises(PassError, match=r"^pass 'raise-on-tanh': node %z = tanh\(...\): cannot handle tanh$"):
        PassManager("dce,raise-on-tanh").run(small_graph())
    with pytest.raises(PassError, match=r"^pass 'crash': failed: KeyError: 'missing'$") as e:
        PassManager(["crash"]).run(small_graph())
    assert isinstance(e.value.__cause__, KeyError)


def test_numeric_check_needs_runnable_graphs():
    g = small_graph()
    del g.param_data["w"]
    with pytest.raises(PassError, match=r"pass '<input>': numeric check: the reference interpreter cannot run "
                                        r"the input graph: ValueError: parameter %w has no data"):
        PassManager("dce", numeric_check=X, verify_each=False).run(g)


def test_a_pass_that_mutates_its_input_is_caught(broken_passes):
    with pytest.raises(PassError, match=r"^pass 'in-place': mutated its input graph; a pass works on graph.clone\(\)"):
        PassManager("dce,in-place").run(small_graph())
