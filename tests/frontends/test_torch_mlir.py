"""The torch-mlir frontend: numerics against torch, symbols, parameter names, errors, and the differential
test against the torch.export frontend.

Each model is imported once per module (dynamic batch/seq) and run at several sizes through the reference
interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmasos.frontends import torch_mlir as tm_frontend
from llmasos.ir import DType, sym
from llmasos.ir.interpreter import run
from tests import models

SIZES = [(1, 5), (3, 11), (2, 64)]  # (batch, seq); 64 is the configs' max positions
LMS = ("gpt2", "llama", "bert")


def _call(name, batch, seq):
    """(args, kwargs) for one forward call; BERT also gets an attention mask with padding in row 0."""
    if name == "mlp":
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        return (torch.randn(batch, seq, 16, generator=g),), {}
    ids = models.token_ids(batch, seq, seed=batch * 1000 + seq)
    if name != "bert":
        return (ids,), {}
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0
    return (ids,), {"attention_mask": mask}


def _flat(args, kwargs):
    return [t.numpy() for t in (*args, *kwargs.values())]


def _torch_outputs(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    values = out if isinstance(out, tuple) else out.values()
    return [v.numpy() for v in values if isinstance(v, torch.Tensor)]


@pytest.fixture(scope="module")
def zoo():
    """name -> (torch model, torch-mlir Graph), exported with example (batch, seq) = (2, 8)."""
    out = {}
    for name in ("mlp",) + LMS:
        model = getattr(models, name)()
        out[name] = (model, tm_frontend.import_module(model, *_call(name, 2, 8)))
    return out


def _close(got, ref, rel):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    assert err <= rel * max(1.0, float(np.max(np.abs(ref)))), f"max abs err {err}"


@pytest.mark.parametrize("name", ("mlp",) + LMS)
def test_matches_torch_at_several_sizes(zoo, name):
    model, graph = zoo[name]
    for batch, seq in SIZES:
        args, kwargs = _call(name, batch, seq)
        refs = _torch_outputs(model, args, kwargs)
        outs = run(graph, _flat(args, kwargs))
        assert len(outs) == len(refs)
        for got, ref in zip(outs, refs):
            _close(got, ref, 1e-4)


@pytest.mark.parametrize("name", LMS)
def test_batch_and_seq_are_named_symbols(zoo, name):
    _, graph = zoo[name]
    want = [("input_ids", "i64[batch, seq]")] + [("attention_mask", "i64[batch, seq]")] * (name == "bert")
    assert [(v.name, str(v.type)) for v in graph.inputs] == want
    assert graph.symbols == {"batch": (1, 64), "seq": (2, 64)}
    assert graph.outputs[0].type.shape[:2] == (sym("batch"), sym("seq"))


def test_mlp_graph_is_linear_gelu_linear(zoo):
    _, graph = zoo["mlp"]
    assert [n.op for n in graph.nodes] == ["linear", "gelu", "linear"]
    assert str(graph.inputs[0].type) == "f32[batch, seq, 16]"
    assert sorted(graph.params) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_fused_ops_survive_torch_mlir(zoo):
    counts = {name: zoo[name][1].op_counts() for name in LMS}
    assert counts["gpt2"]["sdpa"] == 2 and counts["gpt2"]["layer_norm"] == 5
    assert counts["llama"]["sdpa"] == 2 and counts["llama"]["linear"] == 15 and counts["llama"]["silu"] == 2
    assert counts["bert"]["sdpa"] == 2 and counts["bert"]["gelu"] == 2 and counts["bert"]["layer_norm"] == 5


def test_params_are_state_dict_tensors_and_tied_weights_are_one(zoo):
    model, graph = zoo["gpt2"]
    state = dict(model.state_dict())
    assert "lm_head.weight" not in graph.params  # tied to the token embedding: one parameter, used twice
    wte = graph.params["transformer.wte.weight"]
    assert sum(wte in n.inputs for n in graph.nodes) == 2
    for name, v in graph.params.items():
        assert name in state, name
        assert torch.equal(graph.param_data[name], state[name]), name
    llama_model, llama = zoo["llama"]
    assert "model.rotary_emb.inv_freq" in llama.params  # a non-persistent buffer
    assert torch.equal(llama.param_data["model.rotary_emb.inv_freq"], llama_model.model.rotary_emb.inv_freq)


def test_nodes_carry_model_source_locations(zoo):
    _, graph = zoo["gpt2"]
    sdpa = [n for n in graph.nodes if n.op == "sdpa"]
    assert sdpa and all(n.loc and n.loc.startswith("modeling_gpt2.py:") for n in sdpa)


def test_auto_makes_a_feature_dim_static_and_takes_a_batch_of_one():
    model = models.mlp()
    graph = tm_frontend.import_module(model, (torch.randn(1, 16),))
    assert str(graph.inputs[0].type) == "f32[batch, 16]" and graph.symbols == {"batch": (1, 64)}
    x = torch.randn(5, 16)
    _close(run(graph, [x.numpy()])[0], _torch_outputs(model, (x,), {})[0], 1e-4)


def test_static_shapes_when_asked():
    graph = tm_frontend.import_module(models.mlp(), (torch.randn(3, 4, 16),), dynamic_shapes=None)
    assert str(graph.inputs[0].type) == "f32[3, 4, 16]" and graph.symbols == {}


class _Floor(torch.nn.Module):
    def forward(self, x):
        return torch.floor(x) * 2.0


def test_unsupported_op_names_op_location_and_fix_then_converter_can_be_added():
    x = torch.tensor([[1.5, -2.5, 3.9]])
    with pytest.raises(tm_frontend.UnsupportedMlirOpError) as e:
        tm_frontend.import_module(_Floor(), (x,), dynamic_shapes=None)
    msg = str(e.value)
    assert "'torch.aten.floor'" in msg
    assert f"test_torch_mlir.py:{_Floor.forward.__code__.co_firstlineno + 1}" in msg
    assert "register_mlir_converter('torch.aten.floor', fn)" in msg

    def floor(cx, t):  # float -> int casts truncate toward zero; step down where that rounded up
        tr = cx.cast(cx.cast(t, DType.i64), t.type.dtype)
        return cx.emit("where", [cx.emit("lt", [t, tr]), cx.emit("sub", [tr, cx.const(1.0, t.type.dtype)]), tr])

    tm_frontend.register_mlir_converter("aten.floor", floor)
    try:
        graph = tm_frontend.import_module(_Floor(), (x,), dynamic_shapes=None)
    finally:
        del tm_frontend.MLIR_CONVERTERS["torch.aten.floor"]
    np.testing.assert_array_equal(run(graph, [x.numpy()])[0], np.array([[2.0, -6.0, 6.0]], np.float32))


class _Float64(torch.nn.Module):
    def forward(self, x):
        return (x.double() * 2).float()


def test_float64_is_refused_naming_the_op():
    with pytest.raises(tm_frontend.MlirImportError,
                       match=r"torch\.aten\.to\.dtype at test_torch_mlir\.py:\d+: element type f64 has no LLMasOS"):
        tm_frontend.import_module(_Float64(), (torch.randn(2, 3),), dynamic_shapes=None)


class _Kitchen(torch.nn.Module):
    """Ops the zoo models do not use, each reduced to a [batch, seq]-ish output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 6, generator=g))
        self.register_buffer("table", torch.randn(10, 16, generator=g))

    def forward(self, x, ids):
        b, s, _ = x.shape
        a, c = x.chunk(2, dim=-1)
        return (
            x.transpose(1, 2).sum(-1),
            torch.stack([a, c], dim=1).amax(dim=(1, 3)),
            x.select(1, 0) + x.narrow(1, 1, 1).squeeze(1),
            torch.clamp(x, -0.5, 0.5).mean(dim=-1),
            torch.where(x > 0, x, torch.zeros_like(x)).max(dim=-1).values + x.argmax(dim=-1).to(torch.float32),
            x.masked_fill(x < -1, 3.0).log_softmax(-1)[..., 0] + torch.cumsum(x, dim=1)[..., 1],
            torch.addmm(torch.ones(6), x.flatten(0, 1), self.w).unflatten(0, (b, s)).sum(-1) + x @ self.w[:, 0],
            torch.nn.functional.embedding(ids, self.table).sum(-1) + self.table.index_select(0, ids[0]).sum(-1),
            torch.gather(x, 2, ids.unsqueeze(-1) % 16).squeeze(-1),
            torch.ones(b, s)[:, ::2].sum(-1) + torch.arange(1, s + 1, 2, dtype=torch.float32).sum(),
            (ids // 3).float() + ((ids - 5) // -3).float() + ((ids - 5) % 3).float() + (x[..., 0] // 0.3),
            (ids * 0.5) + (ids > 4).float() + (~(ids > 4) & (ids < 8)).float(),
            torch.exp(-x.abs()).sum(-1) + torch.sqrt(x * x + 1).sum(-1) + torch.rsqrt(x * x + 1).sum(-1),
            torch.relu(x).pow(2).sum(-1) + torch.sigmoid(x).sum(-1) + torch.nn.functional.silu(x).sum(-1),
            torch.cat([x[:, :, :4], x[:, :, -4:]], dim=-1).reshape(b, -1)[:, :s],
            x.permute(2, 0, 1).contiguous().view(16, -1).t().reshape(b, s, 16).softmax(-1)[..., 3],
            torch.full((b, s), 2.5) - torch.rsub(x[..., 0], 1.0),
        )


def test_assorted_ops_match_torch():
    model = _Kitchen().eval()
    graph = tm_frontend.import_module(model, (torch.randn(2, 8, 16), torch.randint(0, 10, (2, 8))))
    assert graph.symbols == {"batch": (1, 64), "seq": (3, 2048)}  # torch's suggested fix: x.narrow needs 3
    for batch, seq in ((3, 5), (1, 9)):
        g = torch.Generator().manual_seed(seq)
        x, ids = torch.randn(batch, seq, 16, generator=g), torch.randint(0, 10, (batch, seq), generator=g)
        outs = run(graph, [x.numpy(), ids.numpy()])
        refs = _torch_outputs(model, (x, ids), {})
        assert len(outs) == len(refs) == 17
        for got, ref in zip(outs, refs):
            _close(got, ref, 1e-5)


class _Positions(torch.nn.Module):
    def forward(self, x):
        return x + torch.arange(x.shape[1], dtype=torch.float32)


def test_symbolic_sizes_are_checked_against_torch_and_raw_modules_import():
    module, info = tm_frontend.export_to_mlir(_Positions(), (torch.randn(2, 8),))
    raw = tm_frontend.import_mlir(module)  # without export info: torch's symbol names, positional inputs
    assert [v.name for v in raw.inputs] == ["input0"] and all(n.startswith("s") for n in raw.symbols)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(run(raw, [x])[0], x + np.arange(4, dtype=np.float32))

    def off_by_one(cx, start, end, step, *_):
        return cx.emit("arange", [], start=start, end=end + 1, step=step, dtype=cx.result_dtype())

    good = tm_frontend.MLIR_CONVERTERS["torch.aten.arange.start_step"]
    tm_frontend.register_mlir_converter("aten.arange.start_step", off_by_one)
    try:
        with pytest.raises(tm_frontend.MlirImportError, match=r"symbolic shape mismatch at test_torch_mlir\.py:"
                                                               r"\d+: %arange is f32\[seq\+1\] but torch says "
                                                               r"dim 0 is seq"):
            tm_frontend.import_mlir(module, info)
    finally:
        tm_frontend.register_mlir_converter("aten.arange.start_step", good)


# -- differential: torch-mlir vs torch.export -------------------------------------------------------------------
@pytest.mark.parametrize("name", ("mlp",) + LMS)
def test_same_outputs_as_torch_export_frontend(zoo, name):
    from llmasos.frontends import torch_export

    model, mlir_graph = zoo[name]
    export_graph = torch_export.import_module(model, *_call(name, 2, 8)).graph
    for batch, seq in SIZES:
        xs = _flat(*_call(name, batch, seq))
        a, b = run(export_graph, xs), run(mlir_graph, xs)
        assert len(a) == len(b)
        for p, q in zip(a, b):
            _close(q, p, 1e-5)
