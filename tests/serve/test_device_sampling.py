"""Sampling on the runner's device (``sample_step``: only the token ids leave it) against the host path (a
runner with ``step`` alone: the logits come to the engine), and the batched sampler against filter_logits."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmasos.llm import TorchPagedRunner, presets  # noqa: E402
from llmasos.llm.sampling import filter_logits, sample_rows  # noqa: E402
from llmasos.serve import Engine, SamplingParams  # noqa: E402


@pytest.mark.parametrize("t,k,p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.75)])
def test_sample_rows_is_the_inverse_cdf_of_filter_logits(t, k, p):
    """u on a fine grid picks each token for a share of the grid equal to its probability after
    temperature, top-k and top-p (filter_logits + softmax): to within one grid step."""
    V, N = 16, 4000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    want = filter_logits(logits / t, k, p).softmax(-1)[0]
    u = (torch.arange(N, dtype=torch.float32) + 0.5) / N
    ids = sample_rows(logits.expand(N, V), torch.full((N,), t), torch.full((N,), float(k)), torch.full((N,), p),
                      u, rows=list(range(N)))
    got = torch.bincount(ids, minlength=V).double() / N
    assert (got - want.double()).abs().max() <= 1.0 / N + 1e-6
    assert bool(((want == 0) <= (got == 0)).all())          # never a filtered-out token


def test_sample_rows_top_p_one_keeps_the_whole_vocab_and_ties_pick_alike():
    """top_p = 1 keeps every token even where an f32 running sum would saturate at 1 (a dominant token over
    a 200k vocabulary: the tail's mass ~1e-8 is still reachable by a u near 1), and tied logits pick the
    same token whatever the batch (the sort is stable)."""
    V = 200_000
    logits = torch.zeros(1, V)
    logits[0, 7] = 30.0
    one = torch.ones(1)
    tail = sample_rows(logits, one, torch.zeros(1), one, torch.tensor([1 - 1e-10], dtype=torch.float64), rows=[0])
    assert int(tail[0]) != 7
    ties = torch.zeros(8, 64)                                     # every logit tied
    u = torch.full((8,), 0.3)
    ids = sample_rows(ties, torch.ones(8), torch.zeros(8), torch.ones(8), u, rows=list(range(8)))
    one_row = sample_rows(ties[:1], torch.ones(1), torch.zeros(1), torch.ones(1), u[:1], rows=[0])
    assert ids.tolist() == [int(one_row[0])] * 8


def test_sample_rows_greedy_rows_are_argmax():
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    temp = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0])
    ids = sample_rows(x, temp, torch.zeros(5), torch.ones(5), torch.full((5,), 0.3), rows=[1, 3])
    assert ids[[0, 2, 4]].tolist() == x.argmax(-1)[[0, 2, 4]].tolist()
    assert ids.tolist() == sample_rows(x, temp, torch.zeros(5), torch.ones(5), torch.full((5,), 0.3)).tolist()


class HostOnly:
    """The runner with ``step`` alone: the engine samples the logits on the host."""

    def __init__(self, runner):
        self.r = runner
        for a in ("vocab", "max_seq", "block_size", "num_blocks", "max_blocks_per_seq", "max_batch", "copy_blocks"):
            setattr(self, a, getattr(runner, a))

    def step(self, *a):
        return self.r.step(*a)


class DeviceOnly(HostOnly):
    """The runner with ``sample_step``; its ``step`` (the logits to the host) must not be called."""

    def step(self, *a):
        raise AssertionError("the engine fetched the logits although the runner samples on its device")

    def sample_step(self, *a):
        return self.r.sample_step(*a)


@pytest.fixture(scope="module")
def cfg():
    return presets.decoder_config("llama-tiny")


def run(cfg, wrap, prompts, params, **kw):
    runner = TorchPagedRunner(cfg, 48, 4, max_seq=48, max_batch=4, seed=1)
    eng = Engine(wrap(runner), max_batch=4, **kw)
    return eng.generate(prompts, params)


def test_device_sampling_equals_host_sampling_and_any_batch(cfg):
    rng = np.random.default_rng(0)
    ps = [rng.integers(0, cfg.vocab, int(n)).tolist() for n in (5, 11, 3, 17, 8, 9)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=1.2, seed=123, ignore_eos=True),
              SamplingParams(max_tokens=6, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.6, top_p=0.5, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=1.0, top_k=3, seed=9, ignore_eos=True)]
    dev = run(cfg, DeviceOnly, ps, params, prefill_chunk=4)
    host = run(cfg, HostOnly, ps, params, prefill_chunk=4)
    assert dev == host
    for i in (1, 4):                        # alone, unchunked: the same tokens (seeded: its own uniforms)
        assert run(cfg, DeviceOnly, [ps[i]], [params[i]]) == [dev[i]]
    # sampling does something: a seeded request differs from the greedy one of the same prompt
    greedy = run(cfg, DeviceOnly, [ps[1]], [SamplingParams(max_tokens=9, ignore_eos=True)])
    assert greedy != [dev[1]]
