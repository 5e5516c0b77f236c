"""torch.compile(model, backend="llmasos"): found by name, equal to eager, eager fallback with a warning,
dynamic shapes served by one compile, clear errors for bad options."""
import importlib.metadata
import re
import warnings

import pytest
import torch

import llmasos.dynamo as D
from llmasos.frontends.aten import CONVERTERS
from tests import models


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompile counts carried between tests
    yield
    torch._dynamo.reset()


def _close(got, ref, tol=1e-4):
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs err {err}"


def _new_records(before: int) -> list:
    return D.records[before:]


class Glue(torch.nn.Module):
    """Linear layers around ops LLMasOS has no converter for (erfinv; sort, a two-result op)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.erfinv(h * 0.5) + torch.sort(h, dim=-1).values
        return torch.softmax(self.b(torch.nn.functional.gelu(h)), dim=-1)


def _glue():
    torch.manual_seed(0)
    return Glue().eval()


# -- registration ---------------------------------------------------------------------------------------------
def test_backend_found_by_name_through_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "llmasos" in eps.names and eps["llmasos"].value == "llmasos.dynamo:backend"
    assert "llmasos" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("llmasos") is D.backend


# -- whole models ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [models.gpt2, models.llama], ids=["gpt2", "llama"])
def test_hf_model_equals_eager(build):
    m = build()
    ids = models.token_ids(2, 8)
    before = len(D.records)
    fast = torch.compile(m, backend="llmasos", options={"fallback": "error"})  # nothing may run eagerly
    with torch.no_grad():
        got = fast(ids).logits
        ref = m(ids).logits
    _close(got, ref)
    (rec,) = _new_records(before)
    assert rec.partitions == 1 and not rec.eager_ops and not rec.failed
    (g,) = rec.graphs
    # weights are baked in as parameters (GPT-2's tied lm_head once), the token ids are the only input
    assert [v.type.dtype.name for v in g.inputs] == ["i64"]
    assert any(n.startswith(("transformer.wte", "model.embed_tokens")) for n in g.params)
    assert any(n.op.startswith("fused") or "attention" in n.op for n in g.nodes), "the fuse pipeline ran"


def test_dynamic_seq_one_compile_serves_two_lengths():
    m = models.llama()
    fast = torch.compile(m, backend="llmasos")
    before = len(D.records)
    with torch.no_grad():
        for batch, seq in [(2, 9), (3, 14)]:
            ids = models.token_ids(batch, seq, seed=seq)
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(ids, 1)
            _close(fast(ids).logits, m(ids).logits)
    (rec,) = _new_records(before)  # one graph compiled for both sizes
    assert rec.symbols == {"batch": (2, None), "seq": (2, None)}
    assert str(rec.graphs[0].inputs[0].type) == "i64[batch, seq]"


def test_dynamic_true_python_floats_stay_in_torch():
    """dynamic=True also lifts python floats (GPT-2's math.pi) to float64 0-d inputs: the IR has no float64,
    so that scalar arithmetic runs in torch (warned) and feeds the compiled graph."""
    m = models.gpt2()
    fast = torch.compile(m, backend="llmasos", dynamic=True)
    before = len(D.records)
    with torch.no_grad(), pytest.warns(D.FallbackWarning, match="dtype float64"):
        _close(fast(models.token_ids(2, 8)).logits, m(models.token_ids(2, 8)).logits)
    with torch.no_grad():
        ids = models.token_ids(3, 13, seed=1)
        _close(fast(ids).logits, m(ids).logits)
    (rec,) = _new_records(before)
    assert rec.partitions == 1 and set(rec.symbols) == {"batch", "seq"}


# -- fallback ----------------------------------------------------------------------------------------------------
def test_unsupported_ops_fall_back_with_one_warning_naming_them():
    assert "aten.erfinv.default" not in CONVERTERS and "aten.sort.default" not in CONVERTERS, \
        "this test needs ops without a converter: pick others"
    m = _glue()
    x = torch.randn(4, 16)
    before = len(D.records)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(m, backend="llmasos")(x)
    fallback = [w for w in caught if issubclass(w.category, D.FallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in fallback]
    msg = str(fallback[0].message)
    assert "\n" not in msg and "aten.erfinv.default" in msg and "aten.sort.default" in msg, msg
    _close(got, m(x), 1e-5)
    (rec,) = _new_records(before)
    assert rec.eager_ops == {"aten.erfinv.default": 1, "aten.sort.default": 1}
    assert rec.partitions == 2  # before and after the eager ops


def test_partition_that_fails_to_compile_falls_back(monkeypatch):
    def broken(ctx, x):
        raise RuntimeError("converter bug")

    monkeypatch.setitem(CONVERTERS, "aten.erfinv.default", broken)  # erfinv now "supported" but fails
    m = _glue()
    x = torch.randn(4, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(m, backend="llmasos", options={"passes": ""})(x)
    _close(got, m(x), 1e-5)
    msgs = [str(w.message) for w in caught if issubclass(w.category, D.FallbackWarning)]
    assert any(re.search(r"llmasos_\d+ \(\d+ ops\) runs eagerly in torch: LLMasOS could not compile it: "
                         r"FrontendError: .*aten\.erfinv\.default.*converter bug", m) for m in msgs), msgs


def test_fallback_error_option_raises():
    with torch.no_grad(), pytest.raises(Exception, match=r"fallback='error'.*aten\.erfinv\.default"):
        torch.compile(_glue(), backend="llmasos", options={"fallback": "error"})(torch.randn(4, 16))


def test_gradients_enabled_runs_eagerly_with_warning():
    m = _glue()
    x = torch.randn(4, 16)
    with pytest.warns(D.FallbackWarning, match="inference only"):
        got = torch.compile(m, backend="llmasos")(x)
    got.sum().backward()  # autograd still works: the graph ran in torch
    assert m.a.weight.grad is not None


# -- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(options={"tagret": "cpu"}), r"unknown option 'tagret'\. Options: target \(.*passes \(.*freeze"),
    (dict(options={"fallback": "maybe"}), r"option fallback must be 'warn' or 'error', got 'maybe'"),
    (dict(options={"passes": "no-such-pass"}), r"option passes='no-such-pass'"),
    (dict(options={"target": "tpu"}), r"option target=.tpu.: unknown target .tpu."),
    (dict(mode="max-autotune"), r"mode='max-autotune'\) is not supported.*Options: target"),
])
def test_bad_option_is_a_clear_error(kwargs, match):
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match):
        torch.compile(models.mlp(), backend="llmasos", **kwargs)(torch.randn(3, 16))


def test_options_as_keywords_of_the_backend_function():
    import functools
    m = models.mlp()
    x = torch.randn(3, 16)
    with torch.no_grad():
        got = torch.compile(m, backend=functools.partial(D.backend, target="cpu", passes="", freeze=False))(x)
    _close(got, m(x), 1e-5)
    rec = D.records[-1]
    assert len(rec.graphs[0].inputs) == 5 and not rec.graphs[0].params  # freeze=False: weights are inputs


# -- the FX importer and the partition calling convention ------------------------------------------------------------
def test_import_fx_symbolic_sizes_and_size_outputs():
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmasos.backends.tvm import build
    from llmasos.frontends.fx_import import import_fx

    w = torch.randn(8, 4)

    def f(x, w):
        return torch.relu(x @ w), x.shape[0] * 3

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(5, 8), w)
    imp = import_fx(gm, constants={1: w}, names={0: "x", 1: "w"})
    g = imp.graph
    assert [str(v.type) for v in g.inputs] == ["f32[batch, 8]"] and list(g.params) == ["w"]
    assert imp.input_positions == [0] and imp.outputs[0] == ("tensor", 0) and imp.outputs[1][0] == "dim"
    part = D.CompiledPartition(build(g, "cpu"), g, imp.input_positions, imp.outputs, imp.single)
    x = torch.randn(6, 8)
    y, n = part(x, w)
    _close(y, torch.relu(x @ w), 1e-5)
    assert n == 18


def test_min_ops_leaves_small_partitions_to_torch():
    m = _glue()
    x = torch.randn(4, 16)
    before = len(D.records)
    with torch.no_grad(), pytest.warns(D.FallbackWarning, match="aten.erfinv.default"):
        got = torch.compile(m, backend="llmasos", options={"min_ops": 100})(x)
    _close(got, m(x), 1e-6)
    (rec,) = _new_records(before)
    assert rec.partitions == 0 and not rec.graphs  # no partition has 100 ops: nothing was built


# -- frozen weights ----------------------------------------------------------------------------------------------
def test_frozen_weights_follow_instances_and_in_place_updates():
    a, b = models.mlp(seed=0), models.mlp(seed=1)
    x = torch.randn(3, 16)
    fa, fb = torch.compile(a, backend="llmasos"), torch.compile(b, backend="llmasos")
    before = len(D.records)
    with torch.no_grad():
        _close(fa(x), a(x), 1e-5)
        _close(fb(x), b(x), 1e-5)  # same class, same code: dynamo guards on the baked weights' identity
        assert len(_new_records(before)) == 2
        a.fc1.weight.mul_(2)       # in place: the next call uploads the weights again
        _close(fa(x), a(x), 1e-5)
        a.load_state_dict(b.state_dict())
        _close(fa(x), b(x), 1e-5)
    assert len(_new_records(before)) == 2


def test_in_place_update_of_weights_a_pass_derived_from_is_an_error():
    m = models.mlp()
    x = torch.randn(3, 16)
    fast = torch.compile(m, backend="llmasos", options={"passes": "quantize{bits=8}"})
    with torch.no_grad():
        _close(fast(x), m(x), 0.05)
        m.fc2.weight.mul_(2)
        with pytest.raises(RuntimeError, match=r"weights baked into .* changed .*passes derived new weights"):
            fast(x)
