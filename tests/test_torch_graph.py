"""GraphModule: the torch executor of IR graphs against the reference interpreter and the source model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmasos.frontends.torch_export import import_module
from llmasos.ir import Graph
from llmasos.ir.interpreter import run
from llmasos.ir.ops import all_ops
from llmasos.ir.types import DType, TensorType, sym
from llmasos.passes import PassManager
from llmasos.backends.torch_graph import TORCH_IMPLS, GraphModule, register_torch_impl, unsupported_ops
from tests.models import bert, gpt2, llama, token_ids

IDS = token_ids(2, 8)


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def imported(request):
    model = {"gpt2": gpt2, "llama": llama, "bert": bert}[request.param]()
    return model, import_module(model, (IDS,)).graph


def _outs(x):
    return [t.detach().numpy() for t in (x if isinstance(x, tuple) else (x,))]


@pytest.mark.parametrize("fused", [False, True], ids=["imported", "fused"])
def test_matches_interpreter_and_torch(imported, fused):
    model, graph = imported
    if fused:
        graph = PassManager("fuse").run(graph)
        assert any(op.startswith("fused.") for op in graph.op_counts())
    gm = GraphModule(graph, trainable=False)
    with torch.no_grad():
        got = _outs(gm(IDS))
        ref = model(IDS)
    want = run(graph, [IDS.numpy()])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    first = ref.logits if hasattr(ref, "logits") else ref[0]
    np.testing.assert_allclose(got[0], first.numpy(), rtol=1e-5, atol=1e-5)
    # another (batch, seq) binds the symbolic attrs (reshape / slice / arange) afresh
    ids = token_ids(1, 5, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(_outs(gm(ids))[0], run(graph, [ids.numpy()])[0], rtol=1e-5, atol=1e-5)


CORE_OPSETS = {f"llmasos.ir.opset.{m}" for m in ("creation", "elementwise", "fused", "linalg", "nn", "reduce",
                                                  "shape")}


def test_every_core_op_has_a_torch_impl():
    core = {name for name, d in all_ops().items() if d.infer.__module__ in CORE_OPSETS}
    assert len(core) > 60
    assert sorted(core & set(unsupported_ops())) == []


def test_reference_fallback_runs_ops_without_torch_impl():
    g = _graph("relu", [TensorType((N, 4), F32)], {})
    saved = TORCH_IMPLS.pop("relu")
    try:
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        out = GraphModule(g, reference_fallback=True)(x)
        np.testing.assert_array_equal(out.numpy(), [[0.0, 2.0, 0.0, 4.0]])
    finally:
        register_torch_impl("relu", saved)


def _graph(op, in_types, attrs, n_out=1):
    g = Graph("t")
    g.add_symbol("n", 1, 16)
    xs = [g.add_input(f"x{i}", t) for i, t in enumerate(in_types)]
    out = g.add_node(op, xs, attrs)
    g.set_outputs(out if isinstance(out, tuple) else [out])
    return g


N = sym("n")
F32 = DType.f32
CASES = [
    ("prod", [TensorType((N, 3, 4), F32)], {"axes": [0, 2], "keepdims": True}),
    ("sum", [TensorType((N, 3), DType.i32)], {"axes": [], "keepdims": False}),
    ("argmax", [TensorType((N, 5), F32)], {"axis": 1}),
    ("cumsum", [TensorType((N, 5), F32)], {"axis": 1, "dtype": DType.i64}),
    ("take", [TensorType((N, 5), F32), TensorType((2, 2), DType.i64)], {"axis": 1}),
    ("gather", [TensorType((N, 5), F32), TensorType((N, 3), DType.i64)], {"axis": 1}),
    ("split", [TensorType((N, 6), F32)], {"axis": 1, "sizes": [2, 4]}),
    ("clip", [TensorType((N, 4), F32)], {"min": -0.5, "max": 0.25}),
    ("cast", [TensorType((N, 4), F32)], {"dtype": DType.i32}),
    ("log_softmax", [TensorType((N, 4), F32)], {"axis": 0}),
    ("gelu", [TensorType((N, 4), F32)], {"approximate": "tanh"}),
    ("layer_norm", [TensorType((N, 2, 4), F32)], {"ndim": 2, "eps": 1e-3}),
    ("squeeze", [TensorType((N, 1, 4), F32)], {"axes": [1]}),
    ("fused.elementwise", [TensorType((N, 4), F32)] * 2, {"expr": "where(gt(%0, %1), gelu{approximate=tanh}(%0), "
                                                                  "cast{dtype=f32}(cast{dtype=i32}(%1)))"}),
    ("sdpa", [TensorType((N, 2, 3, 4), F32), TensorType((N, 1, 5, 4), F32), TensorType((N, 1, 5, 4), F32),
              TensorType((3, 5), DType.bool)], {"is_causal": True}),
]


@pytest.mark.parametrize("op,types,attrs", CASES, ids=[c[0] for c in CASES])
def test_op_matches_reference(op, types, attrs):
    g = _graph(op, types, attrs)
    rng = np.random.default_rng(0)
    arrays = []
    for t in types:
        shape = tuple(3 if not isinstance(d, int) else d for d in t.shape)
        if t.dtype is DType.bool:
            arrays.append(rng.random(shape) < 0.7)
        elif t.dtype.is_int:
            hi = 3 if op in ("take", "gather") else 9
            arrays.append(rng.integers(-2 if op == "take" else 0, hi, shape).astype(t.dtype.numpy))
        else:
            arrays.append((rng.standard_normal(shape) * 3).astype(t.dtype.numpy))
    want = run(g, arrays)
    got = _outs(GraphModule(g, trainable=False)(*arrays))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_op_is_named():
    g = _graph("relu", [TensorType((N, 4), F32)], {})
    saved = TORCH_IMPLS.pop("relu")
    try:
        with pytest.raises(NotImplementedError, match=r"no torch implementation for op\(s\) \['relu'\].*register_torch_impl"):
            GraphModule(g)
    finally:
        register_torch_impl("relu", saved)
    with pytest.raises(ValueError, match="op 'relu' already has a torch implementation"):
        register_torch_impl("relu", saved)


def _linear_graph():
    g = Graph("lin")
    g.add_symbol("n", 1, 16)
    x = g.add_input("x", TensorType((N, 4), F32))
    w = g.add_param("fc.weight", np.arange(12, dtype=np.float32).reshape(3, 4) / 10)
    g.set_outputs([g.add_node("linear", [x, w])])
    return g


def test_params_masks_and_to_graph():
    g = _linear_graph()
    original = g.param_data["fc.weight"].copy()
    gm = GraphModule(g)
    p = gm.param("fc.weight")
    assert gm.param_attr == {"fc.weight": "p_fc_weight"} and p.requires_grad
    assert not GraphModule(g, trainable=False).param("fc.weight").requires_grad
    mask = torch.tensor(original) > 0.5
    gm.set_masks({"fc.weight": mask})
    assert torch.equal(p.detach() == 0, ~mask)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    x = torch.ones(2, 4)
    gm(x).sum().backward()
    assert torch.all(p.grad[~mask] == 0) and torch.all(p.grad[mask] != 0)
    opt.step()
    g2 = gm.to_graph()
    w2 = g2.param_data["fc.weight"]
    assert np.all(w2[~mask.numpy()] == 0) and not np.allclose(w2[mask.numpy()], original[mask.numpy()])
    np.testing.assert_array_equal(g.param_data["fc.weight"], original)  # the source graph is untouched
    np.testing.assert_allclose(run(g2, [x.numpy()])[0], gm(x).detach().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"mask for %fc.weight has shape \[4, 3\], parameter is \[3, 4\]"):
        gm.set_masks({"fc.weight": mask.T})
    with pytest.raises(KeyError, match="graph has no parameter %nope"):
        gm.set_masks({"nope": mask})
    with pytest.raises(ValueError, match="input %x: expected dtype f32, got torch.int64"):
        gm(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("pipeline", ["quantize{bits=4,group=32}", "quantize{bits=4,group=32,sym=false}",
                                      "quantize{bits=8}", "quantize{bits=8,per_tensor=true}", "w8a8"])
def test_quantized_graphs_match_the_interpreter(pipeline):
    import llmasos.passes.quantize  # noqa: F401  (registers quantize / w8a8)
    model, ids = llama(), token_ids(1, 8)
    g = PassManager(pipeline).run(import_module(model, (ids,)).graph)
    assert any(n.op.startswith("quant.") for n in g.nodes)
    ref = run(g, [ids.numpy()])[0]
    got = _outs(GraphModule(g, trainable=False)(ids))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
