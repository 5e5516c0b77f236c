"""kv.append / kv.attention: type rules, reference semantics (incl. bad positions), and the frontend import of
the torch custom ops (llmasos.llm.ops) with dynamic batch and sequence length."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmasos.ir import DType, Graph, TensorType, interpreter, sym
from llmasos.ir.interpreter import InterpreterError
from llmasos.ir.ops import OpError
from llmasos.frontends import kv_ops  # noqa: F401  (registers torch.ops.llmasos)

F32, F16, I32, I64 = DType.f32, DType.f16, DType.i32, DType.i64
B = sym("batch")


def _add(op, types, attrs=None):
    g = Graph("t")
    vals = [g.add_input(f"in{i}", TensorType(*t)) for i, t in enumerate(types)]
    return g.add_node(op, vals, attrs or {})


def test_types_follow_the_cache_and_q():
    out = _add("kv.append", [((B, 2, 16, 8), F16), ((B, 2, sym("seq"), 8), F16), ((B,), I32)])
    assert out.type == TensorType((B, 2, 16, 8), F16)
    out = _add("kv.attention", [((B, 8, 1, 8), F16), ((B, 2, 16, 8), F16), ((B, 2, 16, 8), F16), ((B,), I64)],
               {"scale": 0.5})
    assert out.type == TensorType((B, 8, 1, 8), F16)


@pytest.mark.parametrize("types, message", [
    ([((2, 16, 8), F32), ((2, 2, 1, 8), F32), ((2,), I32)], r"kv.append: cache must be rank 4 \[B, Hkv, M, D\]"),
    ([((2, 2, sym("seq"), 8), F32), ((2, 2, 1, 8), F32), ((2,), I32)], r"needs a static length M \(dim 2\), got seq"),
    ([((2, 2, 16, 8), F32), ((2, 3, 1, 8), F32), ((2,), I32)], r"differ in Hkv \(dim 1\): 3 vs 2"),
    ([((2, 2, 16, 8), F32), ((2, 2, 1, 4), F32), ((2,), I32)], r"differ in D \(dim 3\): 4 vs 8"),
    ([((B, 2, 16, 8), F32), ((2, 2, 1, 8), F32), ((2,), I32)], r"differ in B \(dim 0\): 2 vs batch"),
    ([((2, 2, 16, 8), F16), ((2, 2, 1, 8), F32), ((2,), I32)], r"new's dtype f32 must be the cache's f16"),
    ([((2, 2, 16, 8), F32), ((2, 2, 17, 8), F32), ((2,), I32)], r"17 new tokens do not fit a cache of length M=16"),
    ([((2, 2, 16, 8), F32), ((2, 2, 1, 8), F32), ((2,), F32)], r"pos must be i32 \(or i64\), got f32\[2\]"),
    ([((2, 2, 16, 8), F32), ((2, 2, 1, 8), F32), ((3,), I32)], r"pos must be \[B\] = \[2\]"),
])
def test_append_type_errors(types, message):
    with pytest.raises(OpError, match=r"op 'kv.append'.*" + message):
        _add("kv.append", types)


CACHE = ((2, 2, 16, 8), F32)


@pytest.mark.parametrize("types, message", [
    ([((2, 4, 8), F32), CACHE, CACHE, ((2,), I32)], r"q must be rank 4 \[B, H, T, D\]"),
    ([((2, 4, 1, 8), I32), CACHE, CACHE, ((2,), I32)], r"q must be a float tensor"),
    ([((2, 3, 1, 8), F32), CACHE, CACHE, ((2,), I32)], r"query heads H=3 must be a multiple of the caches' kv heads Hkv=2"),
    ([((2, 4, 1, 8), F32), CACHE, ((2, 2, 12, 8), F32), ((2,), I32)], r"k_cache f32\[2, 2, 16, 8\] and v_cache "
                                                                      r"f32\[2, 2, 12, 8\] must have one type"),
    ([((2, 4, 1, 8), F16), CACHE, CACHE, ((2,), I32)], r"the caches' dtype f32 must be q's f16"),
    ([((2, 4, 1, 4), F32), CACHE, CACHE, ((2,), I32)], r"differ in D \(dim 3\): 4 vs 8"),
    ([((2, 4, 1, 8), F32), CACHE, CACHE, ((2, 1), I32)], r"pos must be \[B\] = \[2\]"),
])
def test_attention_type_errors(types, message):
    with pytest.raises(OpError, match=r"op 'kv.attention'.*" + message):
        _add("kv.attention", types, {"scale": 1.0})


def test_attention_needs_a_scale():
    with pytest.raises(OpError, match=r"op 'kv.attention': missing required attribute 'scale'"):
        _add("kv.attention", [((2, 4, 1, 8), F32), CACHE, CACHE, ((2,), I32)])


def _run(op, arrays, attrs=None):
    g = Graph("t")
    vals = [g.add_input(f"in{i}", TensorType(a.shape, DType.from_numpy(a.dtype))) for i, a in enumerate(arrays)]
    g.set_outputs([g.add_node(op, vals, attrs or {})])
    return interpreter.run(g, arrays)[0]


def test_append_writes_each_row_at_its_position_and_leaves_the_rest():
    cache = np.zeros((2, 1, 6, 1), np.float32)
    new = np.array([1, 2, 3, 4], np.float32).reshape(2, 1, 2, 1)
    out = _run("kv.append", [cache, new, np.array([0, 4], np.int32)])
    assert out[:, 0, :, 0].tolist() == [[1, 2, 0, 0, 0, 0], [0, 0, 0, 0, 3, 4]]
    assert not cache.any()  # functional: the input is untouched


def test_attention_sees_positions_up_to_its_own():
    # v holds the position index; with equal logits (q = 0) the output is the mean of the visible positions
    M = 6
    v = np.broadcast_to(np.arange(M, dtype=np.float32)[None, None, :, None], (2, 1, M, 1)).copy()
    k = np.ones_like(v)
    q = np.zeros((2, 2, 2, 1), np.float32)  # 2 query heads on 1 kv head, T = 2
    out = _run("kv.attention", [q, k, v, np.array([0, 3], np.int32)], {"scale": 1.0})
    # row 0: queries at 0, 1 -> means of 0..0, 0..1; row 1: queries at 3, 4 -> means of 0..3, 0..4
    np.testing.assert_allclose(out[:, :, :, 0], [[[0.0, 0.5]] * 2, [[1.5, 2.0]] * 2], rtol=1e-6)


@pytest.mark.parametrize("op, pos, message", [
    ("kv.append", [0, 5], r"row 1 has pos 5: its 2 token\(s\) would take positions 5..6, outside the cache's 0..5"),
    ("kv.attention", [-1, 0], r"row 0 has pos -1"),
])
def test_positions_outside_the_cache_are_errors(op, pos, message):
    cache = np.zeros((2, 1, 6, 4), np.float32)
    new = np.zeros((2, 1, 2, 4), np.float32)
    args = [cache, new, np.array(pos, np.int32)] if op == "kv.append" else [new, cache, cache, np.array(pos, np.int32)]
    with pytest.raises(InterpreterError, match=op + ": " + message):
        _run(op, args, {} if op == "kv.append" else {"scale": 1.0})


# -- frontend ----------------------------------------------------------------------------------------------
class _Step(torch.nn.Module):
    def forward(self, q, k, v, k_cache, v_cache, pos):
        k_cache = torch.ops.llmasos.kv_append(k_cache, k, pos)
        v_cache = torch.ops.llmasos.kv_append(v_cache, v, pos)
        return torch.ops.llmasos.kv_attention(q, k_cache, v_cache, pos, 0.25), k_cache, v_cache


@pytest.fixture(scope="module")
def exported():
    from torch.export import Dim
    b, s = Dim("batch", min=1, max=8), Dim("seq", min=1, max=16)
    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 16, 8),
            torch.randn(2, 2, 16, 8), torch.tensor([0, 5], dtype=torch.int32))
    seq = {0: b, 2: s}
    return torch.export.export(_Step(), args, dynamic_shapes=(seq, seq, seq, {0: b}, {0: b}, {0: b}))


@pytest.mark.parametrize("decompose", [False, True])
def test_frontend_converts_the_custom_ops_whole(exported, decompose):
    from llmasos.frontends import import_exported_program
    g = import_exported_program(exported, decompose=decompose).graph
    assert g.op_counts() == {"kv.append": 2, "kv.attention": 1}
    assert [str(v.type) for v in g.inputs] == ["f32[batch, 4, seq, 8]", "f32[batch, 2, seq, 8]", "f32[batch, 2, seq, 8]",
                                              "f32[batch, 2, 16, 8]", "f32[batch, 2, 16, 8]", "i32[batch]"]
    attn = next(n for n in g.nodes if n.op == "kv.attention")
    assert attn.attrs == {"scale": 0.25}
    rng = np.random.default_rng(0)
    for batch, t in ((1, 1), (3, 5)):
        args = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in
                ((batch, 4, t, 8), (batch, 2, t, 8), (batch, 2, t, 8), (batch, 2, 16, 8), (batch, 2, 16, 8))]
        args.append(torch.from_numpy(rng.integers(0, 16 - t + 1, batch).astype(np.int32)))
        got = interpreter.run(g, [a.numpy() for a in args])
        for o, w in zip(got, _Step()(*args)):
            np.testing.assert_allclose(o, w.numpy(), rtol=1e-5, atol=1e-6)
