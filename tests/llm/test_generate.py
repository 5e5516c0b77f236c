"""CompiledLM on the CPU: KV-cache generation against PyTorch, sampling, batching, streaming, bad requests,
save -> load with TVM's runtime alone."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import llmasos
from llmasos.llm import GenerationError, Sampling
from llmasos.llm.sampling import filter_logits
from llmasos.llm.presets import hf_model

MAX_SEQ = 48


@pytest.fixture(scope="session")
def hf_llama():
    return hf_model("llama-tiny", seed=3)


@pytest.fixture(scope="session")
def lm(hf_llama):
    # symbolic batch (1..4): one library serves every request
    return llmasos.compile_lm(hf_llama, "cpu", max_seq=MAX_SEQ, max_batch=4)


def _prompt(n, seed=0, vocab=128):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_tokens_equal_transformers_generate(hf_llama, lm):
    prompt = _prompt(7)
    ref = hf_llama.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                            use_cache=True, pad_token_id=0)[0, len(prompt):].tolist()
    assert lm.generate(prompt, 32) == ref


def test_kv_cache_decode_equals_full_recompute(hf_llama, lm):
    """Logits of each decode step equal the logits of running the whole sequence so far without a cache."""
    prompt = _prompt(5, seed=1)
    steps = []
    lm.generate(prompt, 6, on_token=lambda r, t: steps.append(t))
    seq = prompt + steps
    with torch.no_grad():
        full = hf_llama(torch.tensor([seq])).logits[0]
    # re-run the compiled steps and keep their logits
    buf = lm._buffers_for(1)
    logits, lens = lm.prefill([prompt], buf)
    got = [np.asarray(torch.from_dlpack(logits))[0].copy()]
    pos = lens.copy()
    for t in steps[:-1]:
        got.append(np.asarray(torch.from_dlpack(lm.decode_step(np.array([t]), pos, buf)))[0].copy())
        pos = pos + 1
    want = full[len(prompt) - 1:len(seq) - 1].numpy()
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)


def test_batch_of_different_lengths_equals_one_by_one(lm):
    prompts = [_prompt(3, 2), _prompt(9, 3), _prompt(1, 4)]
    one = [lm.generate(p, 8) for p in prompts]
    assert lm.generate(prompts, 8) == one


def test_streaming_yields_tokens_in_generation_order(lm):
    prompt = _prompt(4, 5)
    seen = []
    out = lm.generate([prompt, prompt[:2]], 6, on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]
    assert [r for r, _ in seen][:2] == [0, 1]          # row order within a step
    assert list(lm.stream(prompt, 6)) == out[0]


def test_stop_tokens_end_a_row_and_are_kept(lm):
    prompt = _prompt(4, 6)
    full = lm.generate(prompt, 12)
    stop = full[3]
    cut = full[:full.index(stop) + 1]
    assert lm.generate(prompt, 12, stop=[stop]) == cut


def test_sampling_respects_top_k_and_seed(lm):
    prompt = _prompt(4, 7)
    greedy = lm.generate(prompt, 8)
    assert lm.generate(prompt, 8, sampling=Sampling(temperature=1.0, top_k=1, seed=0)) == greedy
    a = lm.generate(prompt, 8, sampling={"temperature": 1.5, "top_p": 0.9, "seed": 11})
    b = lm.generate(prompt, 8, sampling={"temperature": 1.5, "top_p": 0.9, "seed": 11})
    assert a == b


def test_filter_logits_keeps_exactly_top_k_and_the_top_p_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    k = filter_logits(logits, top_k=5)
    assert (torch.isfinite(k).sum(-1) == 5).all()
    assert torch.equal(torch.isfinite(k), logits >= torch.topk(logits, 5).values[:, -1:])
    p = filter_logits(logits, top_p=0.6)
    probs = logits.softmax(-1)
    for r in range(3):
        kept = torch.isfinite(p[r])
        # the kept set is the most likely tokens, reaches 0.6, and is minimal (dropping its least likely
        # member falls below 0.6)
        assert probs[r][kept].min() >= probs[r][~kept].max()
        assert probs[r][kept].sum() >= 0.6
        assert probs[r][kept].sum() - probs[r][kept].min() < 0.6
    # sampled ids always fall inside the filtered set
    from llmasos.llm.sampling import sample
    for seed in range(20):
        ids = sample(logits, Sampling(temperature=1.0, top_k=3, seed=seed), torch.Generator().manual_seed(seed))
        assert all(i in torch.topk(logits[r], 3).indices for r, i in enumerate(ids.tolist()))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(prompts=[], n=4), "no prompts given"),
    (dict(prompts=[[1, 2], []], n=4), "prompt 1 is empty"),
    (dict(prompts=[list(range(40))], n=10), "needs 50 cache positions, but the model was compiled with max_seq=48"),
    (dict(prompts=[[1, 2, 500]], n=4), "token id 500 is outside the vocabulary [0, 128)"),
    (dict(prompts=[[1]] * 5, n=4), "5 prompts, but this model was compiled for batch up to 4"),
    (dict(prompts=[[1, 2]], n=0), "max_new_tokens must be an int >= 1"),
])
def test_bad_requests_fail_clearly_and_leave_the_cache_usable(lm, kwargs, msg):
    prompt = _prompt(6, 8)
    before = lm.generate(prompt, 6)
    with pytest.raises(GenerationError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lm.generate(kwargs["prompts"], kwargs["n"])
    assert lm.generate(prompt, 6) == before


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['topk'\]"):
        Sampling.of({"topk": 3})


RUNTIME_ONLY = r"""
import json, sys
import tvm
assert getattr(tvm.base, "_RUNTIME_ONLY", False), "the compiler library was loaded"
import llmasos.llm as L
lm = L.load_lm(sys.argv[1])
print(json.dumps(lm.generate(json.loads(sys.argv[2]), 10)))
"""


def test_save_then_load_with_tvm_runtime_only_gives_the_same_tokens(lm, tmp_path):
    prompt = _prompt(5, 9)
    want = lm.generate(prompt, 10)
    lm.save(tmp_path / "lm")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(tmp_path / "lm"), json.dumps(prompt)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_corrupted_lm_artifacts_are_refused_naming_the_file(lm, tmp_path):
    path = tmp_path / "lm"
    lm.save(path)
    w = path / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(llmasos.ArtifactError, match=r"weights.safetensors: truncated"):
        llmasos.load_lm(path)
    with pytest.raises(llmasos.ArtifactError, match=r"holds a compiled LM \(kind 'lm'\), not a compiled model; load it "
                                                     r"with llmasos.load_lm"):
        llmasos.load(path)
    with pytest.raises(llmasos.ArtifactError, match=r"is not an LLMasOS LM artifact directory"):
        llmasos.load_lm(tmp_path / "nothing")


def test_cli_generate_compiles_saves_and_reloads(tmp_path, capsys):
    from llmasos.cli import main
    art = tmp_path / "tiny.lm"
    assert main(["generate", "llama-tiny", "--ids", "1,2,3", "-n", "5", "--max-seq", "32", "-o", str(art)]) == 0
    first = capsys.readouterr().out.split()
    assert main(["generate", str(art), "--ids", "1,2,3", "-n", "5"]) == 0
    assert capsys.readouterr().out.split() == first and len(first) == 5
    assert main(["generate", str(art), "--ids", "1,2,999", "-n", "5"]) == 2
    assert "token id 999 is outside the vocabulary [0, 128)" in capsys.readouterr().err


def test_generation_stats_carry_energy(lm):
    # llmasos.energy instruments every generation (llm.runtime.ENERGY_PROBE): a window from the prefill to the
    # last token, inside any window the caller opens
    from llmasos.energy import measure
    with measure("outer", idle=None) as outer:
        lm.generate([_prompt(5, 1), _prompt(3, 2)], 6)
    e = lm.last_stats.energy
    assert e is not None and "error" not in e, e
    assert e["tokens"] == lm.last_stats.new_tokens == 12
    assert e["joules_per_token"] == pytest.approx(e["joules"] / 12)
    assert 0 <= e["joules"] <= outer.joules + 1e-9 and e["seconds"] <= outer.seconds
    assert e["estimated"] == outer.estimated and set(e["devices"]) == set(outer.devices)
    assert lm.last_stats.as_dict()["energy"] is e
    # a stop token ends the run early: the window still closes, over the tokens actually made
    lm.generate(_prompt(4, 3), 5, stop=[int(t) for t in range(128)])
    assert lm.last_stats.energy["tokens"] == lm.last_stats.new_tokens == 1
