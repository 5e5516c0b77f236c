"""The accuracy harness: Lee corpus, token windows, the calibration/evaluation split, perplexity, bytes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmasos import eval as ev
from llmasos.frontends.torch_export import import_module
from llmasos.ir.graph import param_array
from tests.models import llama, token_ids


class CharTokenizer:
    """One id per character (mod 128): enough to test windowing without a real vocabulary."""

    def encode(self, text):
        return [ord(c) % 128 for c in text]


def test_lee_corpus_loads():
    text = ev.lee_corpus()
    lines = [a for a in text.split("\n") if a.strip()]
    assert len(lines) == 300 and text.count("\n") == 299  # the last article has no newline
    assert lines[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_split_is_disjoint_and_covers_the_corpus():
    articles = [a for a in ev.lee_corpus().split("\n") if a.strip()]
    e, c = ev.eval_text().split("\n"), ev.calibration_text().split("\n")
    assert (len(e), len(c)) == (240, 60)
    assert e + c == articles and not set(e) & set(c)


def test_token_windows():
    w = ev.token_windows(CharTokenizer(), "abcdefghij", window=3)
    assert w.dtype == np.int64 and w.shape == (3, 3)
    np.testing.assert_array_equal(w.ravel(), [ord(c) for c in "abcdefghi"])  # the tail "j" is dropped
    assert ev.token_windows(CharTokenizer(), "abcdefghij", window=3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="text has 2 tokens, fewer than one window of 3"):
        ev.token_windows(CharTokenizer(), "ab", window=3)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        ev.token_windows(CharTokenizer(), "abc", window=1)


def test_calibration_batches_come_from_the_calibration_articles():
    tok = CharTokenizer()
    b = ev.calibration_batches(tok, n=4, seq=64, seed=1)
    assert len(b) == 4 and all(x.shape == (1, 64) and x.dtype == np.int64 for x in b)
    pool = ev.token_windows(tok, ev.calibration_text(), 64)
    evals = ev.token_windows(tok, ev.eval_text(), 64)
    for x in b:
        assert any((pool == x[0]).all(1)) and not any((evals == x[0]).all(1))
    again = ev.calibration_batches(tok, n=4, seq=64, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(b, again))
    with pytest.raises(ValueError, match="need 100000"):
        ev.calibration_batches(tok, n=100000, seq=64)


class FixedLogits(torch.nn.Module):
    """log p = [log .5, log .25, log .25] at every position, returned as an HF-style output."""

    def forward(self, ids):
        lp = torch.log(torch.tensor([0.5, 0.25, 0.25]))

        class Out:
            logits = lp.expand(*ids.shape, 3)
        return Out()


def test_perplexity_by_hand():
    # targets 1 then 0: NLL log 4 and log 2, mean 1.5 log 2, so ppl = 2 ** 1.5
    assert ev.perplexity(FixedLogits(), np.array([[0, 1, 0]])) == pytest.approx(2 ** 1.5, rel=1e-6)  # log_softmax in f32
    # the mean is over all positions, not per window: a second window [2, 2] adds one log 4
    ppl = ev.perplexity(FixedLogits(), np.array([[0, 1, 0], [2, 2, 2]]), batch=1)
    assert ppl == pytest.approx(math.exp((3 * math.log(4) + math.log(2)) / 4), rel=1e-6)  # log_softmax in f32
    with pytest.raises(ValueError, match=r"windows must be token ids \[W, S\] with W >= 1 and S >= 2, got shape \[3\]"):
        ev.perplexity(FixedLogits(), np.array([0, 1, 0]))


@pytest.fixture(scope="module")
def tiny():
    model = llama()
    return model, import_module(model, (token_ids(2, 8),)).graph


def test_perplexity_module_graph_agree(tiny):
    model, graph = tiny
    windows = token_ids(5, 16, seed=4).numpy()
    p_model = ev.perplexity(model, windows, batch=2)
    p_graph = ev.perplexity(graph, windows, batch=3)
    assert p_graph == pytest.approx(p_model, rel=1e-5)
    # random weights on random tokens: close to uniform over the 128-token vocabulary
    assert 100 < p_model < 160


def test_model_bytes(tiny):
    model, graph = tiny
    n = sum(int(np.prod(v.type.shape)) for v in graph.params.values())
    assert ev.model_bytes(graph) == 4 * n
    g2 = graph.clone()
    g2.param_data["lm_head.weight"] = param_array(g2.param_data["lm_head.weight"]).astype(np.float16)
    assert ev.model_bytes(g2) == 4 * n - 2 * 128 * 64
    assert ev.model_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.slow  # a TVM build of the tiny Llama
def test_perplexity_of_compiled_model(tiny):
    import llmasos
    model, graph = tiny
    windows = token_ids(3, 16, seed=5).numpy()
    cm = llmasos.compile(model, example_inputs=(token_ids(1, 8),))
    assert ev.perplexity(cm, windows, batch=2) == pytest.approx(ev.perplexity(model, windows), rel=1e-4)
