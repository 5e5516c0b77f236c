"""torch.export frontend: small GPT-2 / Llama / BERT / MLP imported once each, then run by the reference
interpreter at several (batch, seq) sizes and compared with torch."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_unflatten

from llmasos.frontends import torch_export as te
from llmasos.frontends.aten import unregister_converter
from llmasos.ir import DType, sym
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import verify
from tests import models

SIZES = [(1, 5), (2, 8), (3, 17)]
BATCH, SEQ = sym("batch"), sym("seq")


def lm_inputs(batch, seq, seed=0):
    ids = models.token_ids(batch, seq, seed=seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # right padding on one row exercises the attention mask without empty rows
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def mlp():
    m = models.mlp()
    return m, te.import_module(m, (torch.randn(2, 8, 16),))


@pytest.fixture(scope="module")
def gpt2():
    m = models.gpt2()
    return m, te.import_module(m, (), lm_inputs(2, 8))


@pytest.fixture(scope="module")
def llama():
    m = models.llama()
    return m, te.import_module(m, (), lm_inputs(2, 8))


@pytest.fixture(scope="module")
def bert():
    m = models.bert()
    return m, te.import_module(m, (), lm_inputs(2, 8))


def run_imported(imp, inputs: dict):
    """Interpreter outputs re-assembled into the model's output structure through out_spec/out_leaves."""
    got = run(imp.graph, [inputs[n].numpy() for n in imp.input_names])
    leaves = [got[i] if isinstance(i, int) else i[1] for i in imp.out_leaves]
    return tree_unflatten(leaves, imp.out_spec)


def assert_close(got, ref, what):
    ref = ref.detach().numpy()
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs torch {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} vs torch {ref.dtype}"
    if ref.dtype.kind in "biu":  # masks, indices, counts: exact
        np.testing.assert_array_equal(got, ref, err_msg=what)
        return
    err, scale = float(np.max(np.abs(got - ref))), max(1.0, float(np.max(np.abs(ref))))
    assert err <= 1e-4 * scale, f"{what}: max abs error {err} > {1e-4 * scale}"


@pytest.mark.parametrize("batch,seq", SIZES)
def test_mlp_matches_torch(mlp, batch, seq):
    m, imp = mlp
    x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(batch * 100 + seq))
    out = run_imported(imp, {"x": x})
    with torch.no_grad():
        assert_close(out, m(x), f"mlp {batch}x{seq}")


@pytest.mark.parametrize("name,keys", [("gpt2", ["logits"]), ("llama", ["logits"]),
                                       ("bert", ["last_hidden_state", "pooler_output"])])
@pytest.mark.parametrize("batch,seq", SIZES)
def test_lm_matches_torch(request, name, keys, batch, seq):
    m, imp = request.getfixturevalue(name)
    inputs = lm_inputs(batch, seq, seed=batch * 100 + seq)
    out = run_imported(imp, inputs)
    with torch.no_grad():
        ref = m(**inputs)
    assert list(out.keys()) == keys
    for k in keys:
        assert_close(out[k], ref[k], f"{name} {k} {batch}x{seq}")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_inputs_carry_batch_and_seq(request, name):
    _, imp = request.getfixturevalue(name)
    g = imp.graph
    verify(g)
    assert imp.input_names == ["input_ids", "attention_mask"]
    assert [v.name for v in g.inputs] == imp.input_names
    for v in g.inputs:
        assert v.type.shape == (BATCH, SEQ) and v.type.dtype is DType.i64
    # bounds: batch from max_batch, seq from the config's max positions (64 in the small configs)
    assert g.symbols == {"batch": (1, 64), "seq": (2, 64)}


def test_derived_dims_are_expressions_of_named_symbols(gpt2):
    _, imp = gpt2
    shapes = [n.attrs["shape"] for n in imp.graph.nodes if n.op == "reshape"]
    assert [BATCH * SEQ, 64] in shapes  # GPT-2's Conv1D flattens tokens: view(-1, 64)
    for shape in shapes:
        for d in shape:
            assert isinstance(d, int) and d > 0 or d.free_symbols <= {BATCH, SEQ}, shape


def test_mlp_seq_bound_defaults_without_config(mlp):
    _, imp = mlp
    assert imp.graph.inputs[0].type.shape == (BATCH, SEQ, 16)
    assert imp.graph.symbols == {"batch": (1, 64), "seq": (2, 2048)}


def test_static_and_explicit_dynamic_shapes():
    m = models.mlp()
    static = te.import_module(m, (torch.randn(2, 3, 16),), dynamic_shapes=None)
    assert static.graph.inputs[0].type.shape == (2, 3, 16) and static.graph.symbols == {}
    rows = torch.export.Dim("rows", min=2, max=8)
    imp = te.import_module(m, (torch.randn(4, 16),), dynamic_shapes=({0: rows},))
    assert imp.graph.inputs[0].type.shape == (sym("rows"), 16)
    assert imp.graph.symbols == {"rows": (2, 8)}
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert_close(run_imported(imp, {"x": x}), m(x), "mlp rows=7")


def test_tied_weights_are_one_param(gpt2):
    m, imp = gpt2
    g = imp.graph
    assert m.lm_head.weight is m.transformer.wte.weight
    assert "transformer.wte.weight" in g.params and "lm_head.weight" not in g.params
    assert g.param_data["transformer.wte.weight"] is m.transformer.wte.weight  # the tensor itself, no copy
    users = [n.op for n in g.nodes if g.params["transformer.wte.weight"] in n.inputs]
    assert sorted(users) == ["embedding", "linear"]
    assert len(g.params) == len(list(m.parameters()))  # named_parameters() already dedupes tied ones


def test_params_and_buffers_keep_state_dict_names(llama, bert):
    m, imp = llama
    g = imp.graph
    assert g.param_data["model.layers.0.self_attn.q_proj.weight"] is m.model.layers[0].self_attn.q_proj.weight
    assert g.param_data["model.rotary_emb.inv_freq"] is m.model.rotary_emb.inv_freq  # non-persistent buffer
    assert g.params["model.layers.1.mlp.down_proj.weight"].type.shape == (64, 128)
    assert "embeddings.token_type_ids" in bert[1].graph.params  # BERT's persistent buffer


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_every_node_has_a_location(request, name):
    _, imp = request.getfixturevalue(name)
    # "module.path (file.py:line)", or "file.py:line" for ops of the root module itself
    pattern = re.compile(r"([\w.]+ \([\w.]+\.py:\d+\))|([\w.]+\.py:\d+)")
    missing = [repr(n) for n in imp.graph.nodes if not n.loc or not pattern.fullmatch(n.loc)]
    assert not missing, missing[:5]


def test_location_names_module_path_and_model_line(llama):
    _, imp = llama
    q = imp.graph.params["model.layers.0.self_attn.q_proj.weight"]
    (node,) = [n for n in imp.graph.nodes if q in n.inputs]
    assert node.op == "linear"
    assert re.fullmatch(r"model\.layers\.0\.self_attn\.q_proj \(modeling_llama\.py:\d+\)", node.loc), node.loc
    rotary = [n for n in imp.graph.nodes if n.op in ("cos", "sin")]
    assert rotary and all(re.fullmatch(r"model\.rotary_emb \(modeling_llama\.py:\d+\)", n.loc) for n in rotary)


def test_ir_attrs_are_normalised(llama):
    _, imp = llama
    slices = [n for n in imp.graph.nodes if n.op == "slice"]
    assert {(n.attrs["start"], n.attrs["end"]) for n in slices} == {(0, 8), (8, 16)}  # rotate_half, no sentinel
    ops = imp.graph.op_counts()
    assert ops["sdpa"] == 2 and ops["linear"] == 15 and ops["embedding"] == 1


class _OpZoo(torch.nn.Module):
    """Ops the transformer zoo does not reach, one output each, so a wrong converter names itself."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g))
        self.register_buffer("table", torch.randn(10, 6, generator=g))

    def forward(self, x, ids):
        b, s, d = x.shape
        return {
            "addmm": torch.addmm(self.b, x.reshape(-1, d), self.w, beta=0.5, alpha=2.0),
            "index_inner_dim": x[:, (ids[0] > 5).long()],
            "select_last": x[:, -1],
            "slice_step": x[:, 1::2],
            "slice_neg_end": x[:, :-1],
            "cumsum": torch.cumsum(ids, dim=1),
            "tril": torch.tril(torch.ones(s, s, dtype=torch.bool)),
            "masked_fill": x.masked_fill(x > 0.5, -1.0),
            "softmax": torch.softmax(x, dim=-1) + torch.log_softmax(x, dim=1),
            "argmax": torch.argmax(x, dim=-1),
            "max_dim": torch.max(x, dim=1),
            "matvec": torch.matmul(x, self.w[:, 0]),
            "clamp": torch.clamp(x, -0.3, 0.4),
            "rsub": 1.0 - x,
            "int_true_div": ids / 3,
            "int_vs_float": ids > 2.5,
            "plus_seq": x + s,
            "full_symbolic": torch.full((b, s), s * 2.0),
            "arange_float": torch.arange(s, dtype=torch.float32) * 0.5,
            "where_scalar": torch.where(ids > 3, x[..., 0], 0.0),
            "embedding": torch.nn.functional.embedding(ids, self.table),
            "mean_all": x.mean(),
            "sum_bool": (ids > 2).sum(dim=1),
            "stack": torch.stack([x[..., 0], x[..., 1]], dim=-1),
            "chunk": x.chunk(2, dim=-1)[1],
            "transpose": x.transpose(1, 2).contiguous().view(b, d * s),
            "expand": x[:, :1].expand(b, s, d),
            "unary": torch.sigmoid(x) * torch.nn.functional.silu(x) + torch.relu(x) + x.abs().sqrt() + torch.exp(-x),
            "size": s,
            "nothing": None,
        }


def test_op_zoo_matches_torch():
    m = _OpZoo().eval()
    dim_b, dim_s = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=4, max=32)
    x, ids = torch.randn(2, 8, 6), torch.randint(0, 10, (2, 8))
    imp = te.import_module(m, (x, ids), dynamic_shapes=({0: dim_b, 1: dim_s}, {0: dim_b, 1: dim_s}))
    assert imp.out_leaves[-2:] == [("const", SEQ), ("const", None)]  # non-tensor outputs stay in out_leaves
    g = torch.Generator().manual_seed(1)
    for batch, seq in [(1, 4), (3, 11)]:
        x, ids = torch.randn(batch, seq, 6, generator=g), torch.randint(0, 10, (batch, seq), generator=g)
        out = run_imported(imp, {"x": x, "ids": ids})
        with torch.no_grad():
            ref = m(x, ids)
        assert out.keys() == ref.keys()
        for k, r in ref.items():
            if k == "max_dim":
                assert_close(out[k][0], r.values, k)
                np.testing.assert_array_equal(out[k][1], r.indices.numpy())
            elif k in ("size", "nothing"):
                assert out[k] == (SEQ if k == "size" else None)
            else:
                assert_close(out[k], r, f"{k} {batch}x{seq}")


class _Inner(torch.nn.Module):
    def forward(self, x):
        return torch.sign(x) * 2.0


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.proj(x))


def test_unsupported_op_error_then_register_converter():
    m = _Outer().eval()
    x = torch.randn(3, 5, 4)
    ep = te.export(m, (x,))
    with pytest.raises(te.UnsupportedOpError) as info:
        te.import_exported_program(ep)
    msg = str(info.value)
    assert "unsupported op aten.sign.default" in msg
    assert re.search(r"at inner \(test_torch_export\.py:\d+\)", msg), msg
    assert "in module 'inner'" in msg
    assert "register a converter with llmasos.frontends.register_converter('aten.sign.default')(fn)" in msg
    assert info.value.op == "aten.sign.default" and info.value.module_path == "inner"

    @te.register_converter("aten.sign.default")
    def wrong_sign(ctx, v):
        return ctx.cast(v, DType.i64)

    try:
        with pytest.raises(te.FrontendError, match=r"%sign = aten\.sign\.default at inner \(test_torch_export\.py:"
                                                   r"\d+\): converter for aten\.sign\.default produced "
                                                   r"i64\[batch, seq, 4\], but torch's result is f32\[batch, seq, 4\]"):
            te.import_exported_program(ep)
    finally:
        assert unregister_converter("aten.sign.default") is wrong_sign

    @te.register_converter("aten.sign.default")
    def sign(ctx, v):
        zero = ctx.const(0, v.type.dtype)
        pos = ctx.cast(ctx.emit("gt", [v, zero]), v.type.dtype)
        neg = ctx.cast(ctx.emit("lt", [v, zero]), v.type.dtype)
        return ctx.emit("sub", [pos, neg])

    try:
        imp = te.import_exported_program(ep)
    finally:
        assert unregister_converter("aten.sign.default") is sign
    assert any(n.op == "sub" and n.loc.startswith("inner (") for n in imp.graph.nodes)
    x2 = torch.randn(2, 9, 4)
    with torch.no_grad():
        assert_close(run_imported(imp, {"x": x2}), m(x2), "sign")


def test_duplicate_registration_is_an_error():
    original = te.CONVERTERS["aten.add.Tensor"]
    with pytest.raises(ValueError, match=r"aten\.add\.Tensor already has a converter .*replace=True"):
        te.register_converter(torch.ops.aten.add.Tensor, lambda ctx, a, b, alpha=1: a)
    try:
        te.register_converter("aten.add.Tensor", lambda ctx, a, b, alpha=1: a, replace=True)
        assert te.CONVERTERS["aten.add.Tensor"] is not original
    finally:
        te.register_converter("aten.add.Tensor", original, replace=True)
    with pytest.raises(ValueError, match="no torch op overload named 'aten.not_an_op.default'"):
        te.register_converter("aten.not_an_op.default", lambda ctx, x: x)
    with pytest.raises(TypeError, match="one overload, not the packet"):
        te.register_converter(torch.ops.aten.add, lambda ctx, x: x)


def test_no_grad_region_is_converted_in_place():
    class Rotary(torch.nn.Module):  # the shape of older transformers' rotary embedding
        def forward(self, x):
            with torch.no_grad():
                c = torch.cos(x * 2.0)
            return x * c

    m = Rotary()
    ep = torch.export.export(m, (torch.randn(2, 5),))
    assert any(n.target is torch.ops.higher_order.wrap_with_set_grad_enabled for n in ep.graph.nodes)
    imp = te.import_exported_program(ep)
    assert te.missing_converters(ep) == [] and imp.graph.op_counts()["cos"] == 1
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert_close(run_imported(imp, {"x": x}), m(x), "no_grad region")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_training_ir_is_converted_without_decomposition(request, name):
    m, imp = request.getfixturevalue(name)
    assert imp.decomposed is False and te.missing_converters(imp.exported) == []
    if name == "llama":
        # transformers < 5.24 runs the rotary embedding under no_grad, which torch.export keeps as a
        # higher-order sub-graph that the importer converts in place; newer releases inline it
        hops = [n for n in imp.exported.graph.nodes if n.target is torch.ops.higher_order.wrap_with_set_grad_enabled]
        assert len(hops) <= 1 and imp.graph.op_counts()["cos"] == 1
    slow = te.import_exported_program(imp.exported, decompose=True)
    assert slow.decomposed is True and slow.exported is not imp.exported
    assert slow.input_names == imp.input_names and slow.graph.symbols == imp.graph.symbols
    inputs = lm_inputs(3, 11, seed=7)
    fast_out, slow_out = run_imported(imp, inputs), run_imported(slow, inputs)
    assert fast_out.keys() == slow_out.keys()
    for k in fast_out:
        a, b = fast_out[k], slow_out[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        err = float(np.max(np.abs(a - b)))
        assert err <= 1e-5 * max(1.0, float(np.max(np.abs(b)))), f"{name} {k}: fast vs decomposed differ by {err}"


class _Tril(torch.nn.Module):
    def forward(self, x):
        return torch.tril(x) * 2.0


def test_op_without_converter_falls_back_to_decomposition():
    m = _Tril().eval()
    ep = te.export(m, (torch.randn(2, 5, 5),))
    assert te.missing_converters(ep) == ["aten.tril.default"]  # decomposes to core ATen that converts
    imp = te.import_exported_program(ep)
    assert imp.decomposed is True and imp.exported is not ep
    x = torch.randn(3, 7, 5)  # tril of a non-square trailing matrix
    with torch.no_grad():
        assert_close(run_imported(imp, {"x": x}), m(x), "tril")


class _Diff(torch.nn.Module):
    def forward(self, x):
        first = x[:, :1] - 1
        return torch.diff(x, dim=-1, prepend=first), torch.diff(x > 0, n=2, dim=1)


def test_diff_converts_without_decomposition():
    m = _Diff()
    imp = te.import_module(m, (torch.randn(2, 6),))
    assert not imp.decomposed
    for b, s in [(1, 5), (3, 9)]:
        x = torch.randn(b, s)
        got = run(imp.graph, [x.numpy()])
        ref = m(x)
        np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[1], ref[1].numpy())
