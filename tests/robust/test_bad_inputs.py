"""Issue 13: no silent wrong answers, and every rejected input is one of our errors (CompileError, FrontendError,
GenerationError, ...), saying what was wrong and what is allowed -- never a torch assertion, KeyError or
AttributeError from inside."""
import numpy as np
import pytest
import torch

import llmasos
from llmasos import CompileError
from llmasos.frontends import FrontendError
from llmasos.llm import GenerationError
from llmasos.llm.presets import hf_model
from tests import models


# -- silent wrong answers ------------------------------------------------------------------------------------
def test_max_seq_beyond_the_models_positions_is_refused():
    """Before: accepted, and seq 100 returned logits (the position gather clamped) where PyTorch raises."""
    g = models.gpt2()          # n_positions=64
    with pytest.raises(CompileError, match=r"max_seq=1000 exceeds the model's 64 positions \(config.max_position_embeddings\)"):
        llmasos.compile(g, "cpu", example_inputs=(models.token_ids(2, 8),), max_seq=1000)
    with pytest.raises(CompileError, match=r"max_seq=100 exceeds the model's 64 positions"):
        llmasos.compile_lm(g, "cpu", max_seq=100)


@pytest.fixture(scope="module")
def lm():
    return llmasos.compile_lm(hf_model("llama-tiny", seed=5), "cpu", max_seq=16, max_batch=2)


@pytest.mark.parametrize("prompts,msg", [
    ([1.0, 2.0], r"prompt 0: token ids are ints, got float 1.0"),
    ([[1, 2], [3.5, 4]], r"prompt 1: token ids are ints, got float 3.5"),
    (np.array([1.0, 2.0]), r"prompt 0: token ids are ints, got float"),
    (torch.tensor([[1.0, 2.0]]), r"prompt 0: token ids are ints, got float"),
    ([True, 3], r"prompt 0: token ids are ints, got bool"),
    ([[1, 2], 3], r"prompt 1: token ids are ints, got int 3"),
    ([], r"no prompts given"),
    ([[200]], r"token id 200 is outside the vocabulary \[0, 128\)"),
    ([[-1]], r"token id -1 is outside the vocabulary"),
    (None, r"prompts must be token ids"),
])
def test_generate_refuses_what_is_not_token_ids(lm, prompts, msg):
    with pytest.raises(GenerationError, match=msg):
        lm.generate(prompts, 2)


def test_generate_refuses_bad_counts_and_stops(lm):
    for n in (0, True, 2.0, None):
        with pytest.raises(GenerationError, match="max_new_tokens must be an int >= 1"):
            lm.generate([1, 2], n)
    with pytest.raises(GenerationError, match=r"stop tokens are token ids \(ints\) or token strings, got 2.5"):
        lm.generate([1, 2], 2, stop=[2.5])
    assert lm.generate([1, 2], 2, stop=None) == lm.generate([1, 2], 2)


# -- compile arguments -----------------------------------------------------------------------------------------
X = torch.randn(2, 16)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(example_inputs=(X.numpy(),)), r"example_inputs\[0\] is a numpy array; .*torch.from_numpy"),
    (dict(example_inputs=(None,)), r"needs at least one torch tensor among the example inputs"),
    (dict(example_inputs=([[1.0] * 16],)), r"example_inputs\[0\] is a list of numbers; pass a tensor"),
    (dict(example_inputs=({1, 2},)), r"example_inputs\[0\] holds a set"),
    (dict(example_inputs=(X,), example_kwargs=[1]), r"example_kwargs must be a dict, got list"),
    (dict(example_inputs=(X,), passes=123), r"passes must be a pipeline string .* got int 123"),
    (dict(example_inputs=(X,), max_batch=0), r"max_batch must be an int >= 1, got 0"),
    (dict(example_inputs=(X,), max_batch=1), r"example input has batch 2 > max_batch=1"),
    (dict(example_inputs=(X,), max_batch=2.5), r"max_batch must be an int >= 1, got 2.5"),
    (dict(example_inputs=(X,), max_seq=1), r"max_seq must be None .* or an int >= 2, got 1"),
    (dict(example_inputs=(X,), max_seq=0), r"max_seq must be None .* or an int >= 2, got 0"),
    (dict(example_inputs=(torch.randn(2, 5, 16),), max_seq=4), r"example input has length 5 \(dim 1\) > max_seq=4"),
])
def test_compile_arguments_are_checked(kwargs, msg):
    with pytest.raises(CompileError, match=msg):
        llmasos.compile(models.mlp(), "cpu", **kwargs)


def test_compile_lm_arguments_are_checked():
    for kw, msg in [(dict(max_seq=1), r"max_seq must be None .* or an int >= 2, got 1"),
                    (dict(max_batch=0), r"max_batch must be an int >= 1, got 0"),
                    (dict(max_batch=True), r"max_batch must be an int >= 1, got True"),
                    (dict(batch=0), r"batch must be None or an int >= 1, got 0")]:
        with pytest.raises(CompileError, match=msg):
            llmasos.compile_lm("llama-tiny", "cpu", **kw)
    with pytest.raises(CompileError, match=r"unknown model 'gpt-5'"):
        llmasos.compile_lm("gpt-5")
    with pytest.raises(CompileError, match=r"compile_lm takes a llmasos Decoder, .* got int"):
        llmasos.compile_lm(3)
    with pytest.raises(CompileError, match=r"model_type 'bert' is not supported"):
        llmasos.compile_lm(hf_model("bert-tiny"))


def test_max_batch_1_compiles_static_batch():
    cm = llmasos.compile(models.mlp(), "cpu", example_inputs=(torch.randn(1, 16),), max_batch=1)
    x = torch.randn(1, 16)
    torch.testing.assert_close(cm(x), models.mlp()(x))
    with pytest.raises(llmasos.InputError):
        cm(torch.randn(2, 16))


def test_meta_weights_are_refused():
    with pytest.raises(CompileError, match=r"the model's fc1.weight is on the meta device"):
        llmasos.compile(models.mlp().to("meta"), "cpu", example_inputs=(X,))
    with pytest.raises(CompileError, match=r"is on the meta device"):
        llmasos.compile_lm(hf_model("llama-tiny").to("meta"))


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:    # the line the error must name
            return x * 2
        return x


def test_a_data_dependent_branch_is_explained_in_one_line():
    with pytest.raises(FrontendError) as e:
        llmasos.compile(_Branchy(), "cpu", example_inputs=(X,))
    msg = str(e.value)
    assert "\n" not in msg
    assert "the model branches on tensor values at " in msg and "test_bad_inputs.py:" in msg
    assert "(if x.sum() > 0:" in msg and "use torch.cond" in msg


class _Raises(torch.nn.Module):
    def forward(self, x):
        return x.view(3, 7)    # not the example's size


def test_a_model_that_raises_while_tracing_is_a_frontend_error():
    with pytest.raises(FrontendError, match=r"tracing the model with torch.export failed at .*test_bad_inputs.py"):
        llmasos.compile(_Raises(), "cpu", example_inputs=(X,))
