"""The target conformance kit: what a target must do right, as pytest tests a plugin author runs.

In a test module of the plugin (pytest collects the functions this adds to the module):

    from llmasos.testing.conformance import conformance_tests
    conformance_tests(globals(), target="c")

It adds ``test_conformance_*`` functions that check, for the target (a registered name, a TVM target dict
or a Target):
  * the target resolves by name and from its own TVM target dict (what a saved artifact reloads through);
  * every registered op has a lowering (the core table or the target's ``lowerings()``) and the all-ops
    graph (llmasos.testing.allops) -- every op, fused and quantized ops and the KV-cache ops included --
    equals the reference interpreter at fixed sizes and at sizes and data Hypothesis draws;
  * a quantized + fused model equals the interpreter on its own graph;
  * ``llmasos.compile`` of tiny GPT-2, Llama and BERT configs (transformers, random weights) equals torch;
  * ``llmasos.compile_lm`` generates the same greedy tokens as transformers' own greedy ``generate``;
  * save -> load gives the same outputs (models and LMs);
  * bad inputs and requests are refused with an error (wrong dtype, count, out-of-range sizes and ids).

Everything is built once per module, on first use; on 2 CPU cores the kit takes about a minute for the
CPU. Hypothesis uses the profile ``LLMASOS_CONFORMANCE_PROFILE`` (``llmasos-conformance-ci``, 10 examples, by
default; ``llmasos-conformance-thorough``, 300) or ``LLMASOS_CONFORMANCE_EXAMPLES`` examples. Options of
``conformance_tests``: tolerances (``rel``, ``low_rel`` for f16, ``model_rel``), ``models`` /
``lm_models`` (which of "gpt2", "llama", "bert" to compile), ``extra_cases`` (a function adding cases for
ops the plugin registers: see llmasos.testing.allops), ``skip`` ({test name suffix: reason}).

Needs pytest, Hypothesis and transformers (LLMasOS's ``dev`` extra).
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmasos

from ..backends.tvm import Target, build, known_targets, resolve_target
from ..backends.tvm.lowering import LOWERINGS
from ..compiled import InputError
from ..driver import saved_target
from ..ir import all_ops
from ..ir.opset.collective import POINT_TO_POINT
from ..ir.interpreter import run
from ..llm import GenerationError
from ..zoo import from_preset
from .allops import all_ops_cases, assert_close, check_all_ops, make_inputs

MODELS = ("gpt2", "llama", "bert")
LM_MODELS = ("llama", "gpt2")
_PRESETS = {"gpt2": ("gpt2-tiny", {"n_layer": 1}), "llama": ("llama-tiny", {"num_hidden_layers": 1}),
            "bert": ("bert-tiny", {"num_hidden_layers": 1})}
SIZES = ((1, 5), (3, 17))       # (batch, seq) the compiled models run at: one compile, symbolic shapes
OP_SIZES = ((1, 1), (3, 7), (16, 16))
LM_MAX_SEQ, LM_NEW = 40, 16


PROFILES = {"llmasos-conformance-ci": 10, "llmasos-conformance-thorough": 300}


def _hypothesis_settings():
    """The Hypothesis profile ``LLMASOS_CONFORMANCE_PROFILE`` names (default ``llmasos-conformance-ci``: 10
    examples, what CI's 2 cores afford; ``llmasos-conformance-thorough``: 300); ``LLMASOS_CONFORMANCE_EXAMPLES``
    overrides its example count. No deadline: one example runs every op, a second or more on slow
    machines."""
    for name, n in PROFILES.items():
        settings.register_profile(name, max_examples=n, deadline=None, database=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    profile = os.environ.get("LLMASOS_CONFORMANCE_PROFILE", "llmasos-conformance-ci")
    if profile not in PROFILES:
        raise ValueError(f"LLMASOS_CONFORMANCE_PROFILE={profile!r}: known profiles {sorted(PROFILES)}")
    chosen = settings.get_profile(profile)
    n = os.environ.get("LLMASOS_CONFORMANCE_EXAMPLES")
    return settings(chosen, max_examples=int(n)) if n else chosen


class _Kit:
    """What the tests share: the target and its builds, made on first use."""

    def __init__(self, target: Any, rel: float, low_rel: float, model_rel: float, extra_cases):
        self.target_arg = target
        self.rel, self.low_rel, self.model_rel = rel, low_rel, model_rel
        self.extra_cases = extra_cases

    @functools.cached_property
    def target(self):
        return resolve_target(self.target_arg)

    @functools.cached_property
    def all_ops(self):
        cases = all_ops_cases(self.extra_cases)
        return cases, build(cases.g, self.target)

    def hf_model(self, name: str, seed: int = 0):
        preset, overrides = _PRESETS[name]
        return from_preset(preset, seed=seed, **overrides)

    @functools.lru_cache(maxsize=None)
    def compiled(self, name: str):
        m = self.hf_model(name)
        return m, llmasos.compile(m, target=self.target, example_inputs=(_ids(2, 8),), max_batch=4, max_seq=32)

    @functools.lru_cache(maxsize=None)
    def lm(self, name: str):
        m = self.hf_model(name, seed=3)
        return m, llmasos.compile_lm(m, self.target, max_seq=LM_MAX_SEQ, max_batch=4)


def _ids(batch: int, seq: int, vocab: int = 128, seed: int = 0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _main(out):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def _close(got, ref, rel: float, what: str) -> None:
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != torch's {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= rel * scale, f"{what}: max abs error {err} > {rel} * {scale}"


def _greedy_reference(model, prompt: list, n: int) -> list:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def conformance_tests(namespace: dict, target: Any, *, rel: float = 1e-5, low_rel: float = 2e-3,
                      model_rel: float = 1e-4, models: tuple = MODELS, lm_models: tuple = LM_MODELS,
                      extra_cases: Optional[Callable] = None, skip: Optional[dict] = None) -> None:
    """Add the conformance tests for ``target`` to ``namespace`` (a test module's ``globals()``)."""

    kit = _Kit(target, rel, low_rel, model_rel, extra_cases)
    skip = dict(skip or {})
    added = {}

    def test(fn):
        name = f"test_conformance_{fn.__name__}"
        if fn.__name__ in skip:
            fn = pytest.mark.skip(reason=skip[fn.__name__])(fn)
        fn.__name__ = fn.__qualname__ = name
        added[name] = fn
        return fn

    # -- the target itself ------------------------------------------------------------------------
    @test
    def target_resolves():
        t = kit.target
        assert isinstance(t, Target)
        if isinstance(kit.target_arg, str):
            assert kit.target_arg.partition(":")[0] in known_targets()
        # how a saved artifact finds its target again: by the name it was saved under, with its TVM dict
        again = resolve_target(saved_target(SimpleNamespace(target_name=t.name, target=dict(t.target))))
        assert type(again) is type(t) and again.target == t.target, \
            f"an artifact saved for {t.name!r} ({t.target}) reloads as {again!r}, not as a {type(t).__name__}"
        assert t.tvm_device().exist, f"target '{t.name}': no {t.device} device here"
        assert isinstance(t.schedule_rules(), list) and isinstance(t.pass_config(), dict)
        if t.variant_key is not None:
            v = t.with_variant("conformance")
            assert v.target[t.variant_key] == "conformance" and type(v) is type(t)

    # -- every op against the interpreter ---------------------------------------------------------
    @test
    def every_op_has_a_lowering():
        overrides = set(kit.target.lowerings())
        assert overrides <= set(all_ops()), f"lowerings for unregistered ops: {sorted(overrides - set(all_ops()))}"
        assert sorted(set(all_ops()) - set(LOWERINGS) - overrides) == []

    @test
    def all_ops_graph_covers_every_op():
        cases, _ = kit.all_ops
        missing = set(all_ops()) - set(cases.g.op_counts()) - set(POINT_TO_POINT)  # send/recv need a peer process
        assert not missing, (f"ops without a case in the all-ops graph: {sorted(missing)}; add cases with "
                             f"conformance_tests(..., extra_cases=fn) (see llmasos.testing.allops)")

    @test
    def ops_match_interpreter_at_fixed_sizes():
        cases, exe = kit.all_ops
        for nv, mv in OP_SIZES:
            check_all_ops(cases, exe, nv, mv, seed=nv * 31 + mv, rel=kit.rel, low_rel=kit.low_rel)

    @test
    @_hypothesis_settings()
    @given(nv=st.integers(1, 16), mv=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
    def ops_match_interpreter_hypothesis(nv, mv, seed):
        cases, exe = kit.all_ops
        check_all_ops(cases, exe, nv, mv, seed, rel=kit.rel, low_rel=kit.low_rel)

    @test
    def quantized_fused_model_matches_interpreter():
        m = kit.hf_model("llama")
        cm = llmasos.compile(m, target=kit.target, example_inputs=(_ids(2, 8),), max_batch=2, max_seq=16,
                             passes="quantize{bits=4,group=32},fuse")
        counts = cm.graph.op_counts()
        assert any(op.startswith("quant.") for op in counts) and any(op.startswith("fused.") for op in counts)
        ids = _ids(2, 11, seed=5).numpy()
        got = cm.executable(ids)[0]
        got = got.float().cpu().numpy() if hasattr(got, "cpu") else np.asarray(got)
        assert_close(got, run(cm.graph, [ids])[0], "quantized llama logits", rel=kit.model_rel)

    # -- models against torch ---------------------------------------------------------------------
    @test
    @pytest.mark.parametrize("model", models)
    def compile_matches_torch(model):
        m, cm = kit.compiled(model)
        for b, s in SIZES:
            ids = _ids(b, s, seed=b * 7 + s)
            with torch.no_grad():
                ref = m(ids)
            got = cm(ids)
            assert type(got) is type(ref), "the compiled model returns the model's own output structure"
            _close(_main(got), _main(ref), kit.model_rel, f"{model} at batch {b}, seq {s}")

    @test
    @pytest.mark.parametrize("model", lm_models)
    def compile_lm_greedy_equals_torch(model):
        hf, lm = kit.lm(model)
        prompts = [[5, 17, 3, 99, 42, 7, 1], [64, 2, 9]]
        refs = [_greedy_reference(hf, p, LM_NEW) for p in prompts]
        assert lm.generate(prompts[0], LM_NEW) == refs[0]
        assert lm.generate(prompts, LM_NEW) == refs, "a batch of prompts of different lengths"

    # -- artifacts --------------------------------------------------------------------------------
    @test
    def save_load_roundtrip(tmp_path):
        _, cm = kit.compiled(models[0])
        cm.save(tmp_path / "model.llmasos")
        cm2 = llmasos.load(tmp_path / "model.llmasos")
        assert type(cm2.executable.spec) is type(kit.target)
        ids = _ids(2, 6, seed=11)
        assert torch.equal(_main(cm(ids)).cpu(), _main(cm2(ids)).cpu())
        if lm_models:
            _, lm = kit.lm(lm_models[0])
            lm.save(tmp_path / "model.lm")
            lm2 = llmasos.load_lm(tmp_path / "model.lm")
            assert lm2.generate([3, 1, 4, 1, 5], 8) == lm.generate([3, 1, 4, 1, 5], 8)

    # -- bad inputs -------------------------------------------------------------------------------
    @test
    def bad_inputs_are_refused():
        cases, exe = kit.all_ops
        inputs = make_inputs(cases, 2, 17, 0)
        with pytest.raises(ValueError, match="'m' = 17 is outside"):
            exe(*inputs)
        inputs = make_inputs(cases, 2, 3, 0)
        with pytest.raises(ValueError, match=r"takes \d+ inputs"):
            exe(*inputs[:-1])
        bad = list(inputs)
        bad[0] = bad[0].astype(np.float64)
        with pytest.raises(ValueError, match="input %x: expected dtype f32"):
            exe(*bad)
        _, cm = kit.compiled(models[0])
        with pytest.raises(InputError, match="expected dtype"):
            cm(_ids(1, 4).float())
        with pytest.raises(InputError):
            cm(_ids(5, 4))                      # batch 5 > max_batch 4
        with pytest.raises(InputError, match="token ids must be in"):
            cm(torch.full((1, 4), 128))         # outside the vocabulary

    @test
    def lm_bad_requests_are_refused():
        if not lm_models:
            pytest.skip("no LM compiled (lm_models=())")
        _, lm = kit.lm(lm_models[0])
        with pytest.raises(GenerationError, match="outside the vocabulary"):
            lm.generate([1, 2, 500], 4)
        with pytest.raises(GenerationError):
            lm.generate([1] * LM_MAX_SEQ, 4)    # no room in the cache
        with pytest.raises(GenerationError, match="empty"):
            lm.generate([[1, 2], []], 4)
        assert len(lm.generate([1, 2, 3], 4)) == 4  # and it still serves good requests

    unknown = set(skip) - {n[len("test_conformance_"):] for n in added}
    if unknown:
        raise ValueError(f"skip names unknown conformance tests: {sorted(unknown)}; known: "
                         f"{sorted(n[len('test_conformance_'):] for n in added)}")
    namespace.update(added)
