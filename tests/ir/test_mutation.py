"""Use-lists and the mutation API of llmasos.ir.graph: every mutation keeps ``v.uses`` equal to what the
operands say (checked from scratch), replace/erase/insertion points, and random mutation sequences."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmasos.ir import DType, Graph, Node, TensorType, Value
from llmasos.ir.graph import GraphMutationError, InsertPoint, Use
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from tests.graph_strategies import graphs_with_inputs

F32 = TensorType((2, 3), DType.f32)


def expected_uses(g: Graph) -> dict:
    """value -> the set of Use slots, recomputed from the operands of the nodes in the list."""
    want: dict = {}
    for n in g.nodes:
        for i, v in enumerate(n.inputs):
            want.setdefault(v, set()).add(Use(n, i))
    return want


def assert_uses_consistent(g: Graph) -> None:
    want = expected_uses(g)
    for v in g.values():
        assert set(v.uses) == want.get(v, set()), (v, v.uses, want.get(v))
        assert len(v.uses) == len(set(v.uses))
    for n in g.nodes:
        assert n.graph is g
    assert not [e for e in verify(g, collect=True) if e.rule == "use-list"]


def chain():
    """x -> a = neg(x) -> b = exp(a) -> c = add(a, b) -> out c."""
    g = Graph("chain")
    x = g.add_input("x", F32)
    a = g.add_node("neg", [x], name="a")
    b = g.add_node("exp", [a], name="b")
    c = g.add_node("add", [a, b], name="c")
    g.set_outputs([c])
    return g, x, a, b, c


# -- use-lists ---------------------------------------------------------------------------------------

def test_add_node_registers_one_use_per_operand_slot():
    g, x, a, b, c = chain()
    assert x.uses == (Use(a.producer, 0),)
    assert a.uses == (Use(b.producer, 0), Use(c.producer, 0))
    assert a.users == [b.producer, c.producer] and a.num_uses == 2
    sq = g.add_node("mul", [b, b])
    assert b.uses == (Use(c.producer, 1), Use(sq.producer, 0), Use(sq.producer, 1))
    assert b.users == [c.producer, sq.producer]  # distinct nodes
    assert c.uses == ()  # a graph output is not a use
    assert_uses_consistent(g)


def test_operand_edits_move_uses():
    g, x, a, b, c = chain()
    add = c.producer
    add.inputs[1] = x  # item assignment
    assert Use(add, 1) in x.uses and b.uses == ()
    add.inputs = [b, b]  # assignment of a whole list
    assert a.uses == (Use(b.producer, 0),) and b.uses == (Use(add, 0), Use(add, 1))
    add.inputs.append(x)  # a broken arity, but the lists still follow the operands
    assert Use(add, 2) in x.uses
    add.inputs.pop()
    add.inputs[0:2] = [a, x]
    add.inputs.reverse()
    assert add.inputs == [x, a]  # still compares as a list
    assert_uses_consistent(g)


def test_a_replaced_operand_list_stays_usable_as_a_plain_list():
    g, x, a, b, c = chain()
    old = c.producer.inputs
    c.producer.inputs = [b, a]
    old.append(x)  # the old object no longer belongs to the node: no use appears
    assert all(u.node is not c.producer or u.index < 2 for u in x.uses)
    assert_uses_consistent(g)


def test_node_list_membership_decides_uses():
    g, x, a, b, c = chain()
    neg = a.producer
    stray = Node("neg", [x], {}, [Value("s", F32)])
    assert stray.graph is None and x.uses == (Use(neg, 0),)  # a detached node registers nothing
    g.nodes.append(stray)
    assert stray.graph is g and Use(stray, 0) in x.uses
    g.nodes.remove(stray)
    assert stray.graph is None and x.uses == (Use(neg, 0),)
    g.nodes.insert(0, g.nodes.pop())  # a move keeps the node in the graph
    g.nodes = list(reversed(g.nodes))
    g.nodes.sort(key=lambda n: n.outputs[0].name)
    assert all(n.graph is g for n in g.nodes)
    assert_uses_consistent(g)
    g.nodes = g.nodes[1:]
    assert neg.graph is None and x.uses == ()
    del g.nodes[:]
    assert a.uses == () and b.uses == ()


def test_a_node_is_in_one_graph_at_a_time():
    g, x, a, b, c = chain()
    h = Graph("other")
    with pytest.raises(GraphMutationError, match=r"node %a = neg\(...\) is in graph @chain; a node is in one graph"):
        h.nodes.append(a.producer)
    with pytest.raises(TypeError, match="the node list holds Nodes"):
        g.nodes.append("neg")
    assert h.nodes == [] and a.producer.graph is g


def test_clone_has_its_own_uses_and_a_mapping():
    g, x, a, b, c = chain()
    m: dict = {}
    g2 = g.clone(mapping=m)
    assert m[x] is g2.inputs[0] and m[a.producer] is g2.nodes[0] and m[c] is g2.outputs[0]
    assert m[a].uses == (Use(m[b.producer], 0), Use(m[c.producer], 0))
    assert a.uses == (Use(b.producer, 0), Use(c.producer, 0))  # the original is untouched
    assert_uses_consistent(g2)


# -- replace / erase ---------------------------------------------------------------------------------

def test_replace_all_uses_with_covers_operands_and_outputs():
    g, x, a, b, c = chain()
    g.set_outputs([c, a])
    e = g.add_node("exp", [x], name="e")
    assert g.replace_all_uses_with(a, e) == 3  # exp(a), add(a, _) and output 1
    assert a.uses == () and g.outputs == [c, e]
    assert [n.inputs[0] for n in (b.producer, c.producer)] == [e, e]
    assert g.replace_all_uses_with(e, e) == 0
    assert_uses_consistent(g)


def test_replace_all_uses_with_where_and_without_outputs():
    g, x, a, b, c = chain()
    g.set_outputs([c, a])
    n = g.add_node("neg", [a], name="n")
    assert g.replace_all_uses_with(a, n, where=lambda u: u.op == "add", outputs=False) == 1
    assert c.producer.inputs == [n, b] and b.producer.inputs == [a] and g.outputs == [c, a]


def test_replace_refuses_to_make_a_node_read_its_own_result():
    g, x, a, b, c = chain()
    n = g.add_node("neg", [a], name="n")
    with pytest.raises(GraphMutationError, match=r"would make node %n = neg\(...\) read its own result"):
        g.replace_all_uses_with(a, n)
    assert n.producer.inputs == [a] and c.producer.inputs == [a, b]  # refused before any change
    g.replace_all_uses_with(a, n, where=lambda u: u is not n.producer)
    assert c.producer.inputs == [n, b]


def test_replace_uses_is_simultaneous():
    g = Graph("two")
    x = g.add_input("x", F32)
    a, b = g.add_node("neg", [x]), g.add_node("exp", [x])
    c = g.add_node("sub", [a, b])
    g.set_outputs([a, c])
    assert g.replace_uses({a: b, b: a}) == 3
    assert c.producer.inputs == [b, a] and g.outputs == [b, c]
    assert_uses_consistent(g)


def test_erase_refuses_a_used_node_and_names_the_user():
    g, x, a, b, c = chain()
    with pytest.raises(GraphMutationError, match=r"cannot erase node %a = neg\(...\): its result %a is still used "
                                                 r"by node %b = exp\(...\) \(operand 0\) and 1 more use\(s\); "
                                                 r"redirect the uses first"):
        g.erase(a.producer)
    with pytest.raises(GraphMutationError, match=r"its result %c is a graph output"):
        g.erase(c.producer)
    stray = Node("neg", [x], {}, [Value("s", F32)])
    with pytest.raises(GraphMutationError, match="it is not in graph @chain"):
        g.erase(stray)
    assert len(g.nodes) == 3


def test_erase_and_erase_nodes():
    g, x, a, b, c = chain()
    g.replace_all_uses_with(c, a)
    g.erase(c.producer)
    assert b.uses == () and [n.op for n in g.nodes] == ["neg", "exp"]
    g.set_outputs([x])
    with pytest.raises(GraphMutationError, match="still used"):
        g.erase_nodes([a.producer])  # exp(a) still reads it
    g.erase_nodes([a.producer, b.producer])  # uses among the erased are fine
    assert g.nodes == [] and x.uses == ()
    verify(g)


def test_replace_node_and_dead_nodes():
    g, x, a, b, c = chain()
    n = g.add_node("neg", [x], name="n")
    m = g.add_node("neg", [n], name="m")
    assert [v.producer for v in (n, m)] == g.dead_nodes()
    g.replace_node(a.producer, m)  # a's users read m; neg(x) -> a is gone
    with pytest.raises(GraphMutationError, match=r"it has 1 result\(s\), got 2"):
        g.replace_node(b.producer, (x, x))
    assert g.dead_nodes() == [] and "a" not in [v.name for v in g.values()]
    # the new nodes sit after their users now: the topological sort moves them, stably
    assert g.sort_topologically()
    assert [o.name for n in g.nodes for o in n.outputs] == ["n", "m", "b", "c"]
    assert not g.sort_topologically()
    verify(g)


def test_sort_topologically_reports_a_cycle():
    g, x, a, b, c = chain()
    a.producer.inputs = [b]
    with pytest.raises(GraphMutationError, match=r"depends on itself \(a cycle\)"):
        g.sort_topologically()


def test_remove_param():
    g = Graph("p")
    x = g.add_input("x", TensorType((3,), DType.f32))
    w = g.add_param("w", np.ones(3, np.float32))
    y = g.add_node("mul", [x, w])
    g.set_outputs([y])
    with pytest.raises(GraphMutationError, match=r"cannot remove param %w: it is used by node %v0 = mul"):
        g.remove_param("w")
    g.replace_all_uses_with(y, x)
    g.erase(y.producer)
    g.remove_param("w")
    assert g.params == {} and g.param_data == {}


def test_unique_param_names():
    g = Graph("p")
    a = g.add_param("w.scale", np.ones(2, np.float32), unique=True)
    b = g.add_param("w.scale", np.ones(2, np.float32), unique=True)
    assert (a.name, b.name) == ("w.scale", "w.scale_0")
    with pytest.raises(ValueError, match="defined twice"):
        g.add_param("w.scale", np.ones(2, np.float32))


def test_retype_after_an_operand_changed_shape():
    g = Graph("r")
    x = g.add_input("x", TensorType((2, 3), DType.f32))
    z = g.add_input("z", TensorType((2, 5), DType.f32))
    e = g.add_node("exp", [x])
    e.producer.inputs[0] = z
    assert e.producer.retype() == (TensorType((2, 5), DType.f32),) and e.type.shape == (2, 5)


# -- insertion points ---------------------------------------------------------------------------------

def test_insert_before_and_after_keep_creation_order():
    g, x, a, b, c = chain()
    with g.insert_before(b.producer) as ip:
        p = g.add_node("neg", [a], name="p")
        q = g.add_node("neg", [p], name="q")
    assert ip.inserted == [p.producer, q.producer]
    with g.insert_after(a.producer):
        r = g.add_node("exp", [a], name="r")
        s = g.add_node("exp", [r], name="s")
    t = g.add_node("neg", [c], name="t")  # outside: the end again
    names = [n.outputs[0].name for n in g.nodes]
    assert names == ["a", "r", "s", "p", "q", "b", "c", "t"]
    with g.insert_at_end():
        g.add_node("neg", [t], name="u")
    assert g.nodes[-1].outputs[0].name == "u"
    assert "end of @chain" in repr(g.insert_point)
    assert_uses_consistent(g)


def test_append_node_goes_to_the_insertion_point():
    g, x, a, b, c = chain()
    n = Node("neg", [x], {}, [Value("early", F32)])
    with g.insert_before(a.producer):
        g.append_node(n)
    assert g.nodes[0] is n and n.outputs[0].producer is n and Use(n, 0) in x.uses


def test_insertion_point_follows_its_anchor_and_refuses_a_lost_one():
    g, x, a, b, c = chain()
    with g.insert_before(c.producer):
        g.nodes.insert(0, g.nodes.pop(0))  # a list edit moves nothing but invalidates the position hint
        y = g.add_node("neg", [b], name="y")
        assert g.nodes.index(y.producer) == g.nodes.index(c.producer) - 1
        g.replace_all_uses_with(c, b)
        g.erase(c.producer)
        with pytest.raises(GraphMutationError, match=r"its anchor node %c = add\(...\) has left graph @chain"):
            g.add_node("neg", [b])
    with pytest.raises(GraphMutationError, match="is not in graph @chain"):
        InsertPoint(g, c.producer)


# -- random mutation sequences ------------------------------------------------------------------------

@given(case=graphs_with_inputs(max_nodes=8), data=st.data())
def test_random_mutations_keep_use_lists_and_numerics(case, data):
    """Identity reshapes are wrapped around random values (insert + replace_all_uses_with), unwrapped
    again (replace_all_uses_with + erase, or replace_node), dead code is erased, nodes are moved and
    reassigned through raw list edits, and the graph is cloned: after every step the use-lists equal what
    the operands say, the graph verifies, and at the end it computes the same bits."""
    g, inputs = case
    want = run(g, inputs)
    wraps: list = []  # identity reshape nodes we put in
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        kind = data.draw(st.sampled_from(["wrap", "unwrap", "replace-node", "dce", "reassign", "move", "clone",
                                          "sort"]), label="kind")
        if kind == "wrap":
            v = data.draw(st.sampled_from(g.values()), label="value")
            anchor = v.producer
            where = (g.insert_after(anchor) if anchor is not None
                     else g.insert_before(g.nodes[0]) if g.nodes else g.insert_at_end())
            with where:
                r = g.add_node("reshape", [v], {"shape": list(v.type.shape)})
            g.replace_all_uses_with(v, r, where=lambda n, r=r: n is not r.producer)
            wraps.append(r.producer)
        elif kind in ("unwrap", "replace-node") and wraps:
            n = wraps.pop(data.draw(st.integers(0, len(wraps) - 1), label="which"))
            if kind == "unwrap":
                g.replace_all_uses_with(n.outputs[0], n.inputs[0])
                g.erase(n)
            else:
                g.replace_node(n, n.inputs[0])
        elif kind == "dce":
            dead = g.dead_nodes()
            g.erase_nodes(dead)
            wraps = [w for w in wraps if w not in dead]
        elif kind == "reassign" and g.nodes:
            n = data.draw(st.sampled_from(list(g.nodes)), label="node")
            if data.draw(st.booleans(), label="whole"):
                n.inputs = list(n.inputs)
            elif n.inputs:
                i = data.draw(st.integers(0, len(n.inputs) - 1), label="slot")
                n.inputs[i] = n.inputs[i]
        elif kind == "move" and g.nodes:
            i = data.draw(st.integers(0, len(g.nodes) - 1), label="at")
            g.nodes.insert(i, g.nodes.pop(i))
        elif kind == "clone":
            m: dict = {}
            g = g.clone(mapping=m)
            wraps = [m[w] for w in wraps]
        elif kind == "sort":
            assert not g.sort_topologically()  # every step keeps the graph topologically ordered
        assert_uses_consistent(g)
        verify(g)
    got = run(g, inputs)
    assert [(a.dtype, a.shape, a.tobytes()) for a in got] == [(a.dtype, a.shape, a.tobytes()) for a in want]
