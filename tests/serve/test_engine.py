"""The engine, scheduler and block manager against the toy paged runner (tests/serve/fake_runner.py), whose
logits hash the sequence read back through the block table: exact token equality with ``reference``."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from llmasos.serve import BlockManager, Engine, RequestError, SamplingParams
from llmasos.serve.blocks import NoFreeBlocks, block_key

from .fake_runner import FakeRunner, reference

VOCAB = 50


def prompts(n, lo=1, hi=30, seed=0):
    import random
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(**kw):
    r = {k: kw.pop(k) for k in ("num_blocks", "block_size", "max_seq", "max_batch", "ragged") if k in kw}
    return Engine(FakeRunner(vocab=VOCAB, **r), **kw)


def assert_all_free(eng):
    eng.blocks.check()
    assert eng.blocks.num_used == 0
    assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting


def test_block_manager_refcounts_and_prefix_cache():
    bm = BlockManager(4, 4)
    a, b = bm.allocate(), bm.allocate()
    assert (a, b) == (0, 1) and bm.num_used == 2 and bm.num_free == 2
    key = block_key(None, [1, 2, 3, 4])
    bm.register(a, key)
    assert bm.lookup(key) == a and bm.ref[a] == 2
    bm.release(a)
    bm.release(a)                          # ref 0: evictable, still findable
    assert bm.num_used == 1 and bm.lookup(key) == a and bm.ref[a] == 1
    copies = []
    assert bm.prepare_write(a, copies) == a and copies == []       # sole holder: written in place, uncached
    assert bm.lookup(key) is None
    bm.register(a, key)
    assert bm.lookup(key) == a
    new = bm.prepare_write(a, copies)      # shared: copy-on-write
    assert new not in (a, b) and copies == [(a, new)] and bm.ref[a] == 1
    with pytest.raises(RuntimeError, match="double free"):
        bm.release(new + 1)
    bm.allocate()
    with pytest.raises(NoFreeBlocks, match="all 4 KV blocks are in use"):
        bm.allocate()
    bm.check()
    assert block_key(None, [1, 2]) != block_key(block_key(None, [0]), [1, 2])


def test_drop_cache_frees_only_unheld_cached_blocks():
    bm = BlockManager(4, 4)
    a, b = bm.allocate(), bm.allocate()
    ka, kb = block_key(None, [1, 2, 3, 4]), block_key(None, [5, 6, 7, 8])
    bm.register(a, ka)
    bm.register(b, kb)
    bm.release(a)                          # cached, unheld
    assert bm.num_cached == 2 and bm.drop_cache() == 1
    assert bm.lookup(ka) is None and bm.lookup(kb) == b and bm.num_free == 3 and bm.num_cached == 1
    bm.check()


def test_one_request_matches_reference():
    eng = engine(prefill_chunk=8)
    p = prompts(1, 20, 20)[0]
    assert eng.generate([p], SamplingParams(max_tokens=12)) == [reference(p, 12, VOCAB)]
    assert (1, 8) in eng.runner.calls                   # chunked: 20 prompt tokens = 8 + 8 + 4
    assert_all_free(eng)


def test_busy_batch_equals_alone():
    ps = prompts(12, 1, 40)
    eng = engine(max_batch=4, prefill_chunk=8, prefill_budget=12, max_seq=64, num_blocks=200)
    outs = eng.generate(ps, [SamplingParams(max_tokens=3 + i % 7) for i in range(len(ps))])
    assert outs == [reference(p, 3 + i % 7, VOCAB) for i, p in enumerate(ps)]
    assert max(b for b, _ in eng.runner.calls) >= 3     # rows really shared steps
    assert any(t > 1 for _, t in eng.runner.calls) and any(t == 1 for _, t in eng.runner.calls)
    assert_all_free(eng)


def test_preemption_recomputes_identical_tokens():
    ps = prompts(6, 10, 20, seed=1)
    # 14 usable blocks of 4 tokens: six requests growing to 30-40 tokens cannot all stay resident
    eng = engine(num_blocks=15, block_size=4, max_batch=6, prefill_chunk=16, prefix_sharing=False)
    outs = eng.generate(ps, SamplingParams(max_tokens=20))
    assert eng.scheduler.num_preemptions > 0
    assert outs == [reference(p, 20, VOCAB) for p in ps]
    assert_all_free(eng)


def test_prefix_sharing_and_copy_on_write():
    base = prompts(1, 16, 16, seed=2)[0]
    eng = engine(block_size=4, prefill_chunk=64)
    first = eng.generate([base], SamplingParams(max_tokens=5))
    assert eng.blocks.num_cached >= 4
    ps = [base + [1, 2, 3], base, base[:9]]              # shares 4, 4 (last one rewritten: COW) and 2 blocks
    outs = eng.generate(ps, SamplingParams(max_tokens=6))
    assert first == [reference(base, 5, VOCAB)]
    assert outs == [reference(p, 6, VOCAB) for p in ps]
    assert eng.blocks.hits >= 10
    assert eng.runner.copies, "a fully cached prompt recomputes its last token into a copy of the shared block"
    assert_all_free(eng)


def test_abort_frees_blocks_at_once():
    eng = engine(max_batch=4)
    reqs = [eng.make_request(p, SamplingParams(max_tokens=30)) for p in prompts(3, 10, 20)]
    for r in reqs:
        eng.add(r)
    for _ in range(3):
        eng.step()
    used, held = eng.blocks.num_used, len(reqs[1].block_table)
    assert held > 0
    assert eng.abort(reqs[1].request_id) and not eng.abort("nope")
    assert eng.blocks.num_used == used - held
    assert reqs[1].finished and reqs[1].finish_reason == "abort" and reqs[1].block_table == []
    while eng.has_work:
        eng.step()
    assert [r.output_ids for r in (reqs[0], reqs[2])] == [reference(r.prompt_ids, 30, VOCAB) for r in (reqs[0], reqs[2])]
    assert_all_free(eng)


def test_stop_tokens_and_max_seq():
    p = prompts(1, 5, 5, seed=3)[0]
    ref = reference(p, 20, VOCAB)
    stop = ref[4]
    eng = engine()
    out = eng.generate([p], SamplingParams(max_tokens=20, stop_token_ids=(stop,)))
    assert out == [ref[:ref.index(stop) + 1]]
    eng2 = engine(eos_token_id=stop)
    assert eng2.generate([p], SamplingParams(max_tokens=20)) == out
    assert eng2.generate([p], SamplingParams(max_tokens=20, ignore_eos=True)) == [ref]


def test_seeded_sampling_reproducible_in_any_batch():
    p = prompts(4, 5, 25, seed=4)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    alone = engine().generate([p[0]], sp)
    busy = engine(max_batch=4, prefill_chunk=4).generate(p, [sp] + [SamplingParams(max_tokens=8)] * 3)
    assert busy[0] == alone[0]
    assert busy[1:] == [reference(q, 8, VOCAB) for q in p[1:]]


def test_bad_requests_rejected():
    eng = engine(max_seq=32, num_blocks=5, block_size=4)
    with pytest.raises(RequestError, match="prompt is empty"):
        eng.make_request([], SamplingParams())
    with pytest.raises(RequestError, match=r"token id 50 is outside the vocabulary \[0, 50\)"):
        eng.make_request([1, 50], SamplingParams())
    with pytest.raises(RequestError, match="the prompt has 32 tokens; this model serves at most 32"):
        eng.make_request([1] * 32, SamplingParams())
    with pytest.raises(RequestError, match="max_tokens 30 with a prompt of 3 tokens needs 33"):
        eng.make_request([1] * 3, SamplingParams(max_tokens=30))
    with pytest.raises(RequestError, match="need 6 KV blocks of 4; the cache has 5"):
        eng.make_request([1] * 3, SamplingParams(max_tokens=18))
    with pytest.raises(RequestError, match="max_tokens must be an int >= 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="top_p must be in"):
        SamplingParams(top_p=0)


class CharTokenizer:
    """ids -> letters: decode only (stop strings)."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_ragged_steps_pack_decode_rows_and_chunks_into_one_call():
    """With a runner that takes ragged steps, a step with prompt chunks is ONE call (the decode rows and the
    chunks packed, unpadded) and the tokens are the reference's; without, the same workload takes two calls
    on such steps. Asking for ragged steps of a runner without them is refused."""
    ps = prompts(6, 3, 20, seed=11)
    outs = {}
    for ragged in (False, True):
        eng = engine(max_batch=4, prefill_chunk=8, ragged=ragged)
        assert eng.ragged is ragged
        out = eng.generate(ps, SamplingParams(max_tokens=10))
        assert out == [reference(p, 10, VOCAB) for p in ps]
        assert_all_free(eng)
        outs[ragged] = eng.runner
    plain, packed = outs[False], outs[True]
    assert packed.ragged_calls and all(n > s for s, n in packed.ragged_calls)
    assert any(n < s * 8 for s, n in packed.ragged_calls)             # unpadded: fewer tokens than S x chunk
    assert len(packed.calls) < len(plain.calls)                       # one call, not two, on the mixed steps
    assert all(t == 1 for _, t in plain.calls[-3:]) and packed.calls[-1][1] == 1    # decode-only: step, T = 1
    with pytest.raises(ValueError, match="ragged=True, but the runner FakeRunner takes no ragged steps"):
        Engine(FakeRunner(vocab=VOCAB), ragged=True)


def test_stop_strings_cut_text_and_hold_back():
    p = prompts(1, 6, 6, seed=5)[0]
    ref = reference(p, 30, VOCAB)
    full = CharTokenizer().decode(ref)
    stop = full[10:13]
    eng = Engine(FakeRunner(vocab=VOCAB), CharTokenizer())
    got = []
    r = eng.make_request(p, SamplingParams(max_tokens=30, stop=(stop, "zzzzzz")), sink=got.append)
    eng.add(r)
    while eng.has_work:
        eng.step()
    text = "".join(o.text for o in got)
    assert text == full[:full.index(stop)] and got[-1].finish_reason == "stop"
    # a stop string that never appears: every character comes out, the held-back tail at the end
    got.clear()
    eng.add(eng.make_request(p, SamplingParams(max_tokens=30, stop=("zzzzzz",)), sink=got.append))
    while eng.has_work:
        eng.step()
    if "zzzzzz" not in full:
        assert "".join(o.text for o in got) == full and got[-1].finish_reason == "length"


TRACKER_TEXTS = ["The quick brown fox jumps over the lazy dog.  Twice,\n\tthen   stops.",
                 "naïve café — 東京タワー 🚀🧪 ok", "x" * 40 + " ¿qué? ∑∫ 👩‍👩‍👧"]


@pytest.mark.parametrize("text", TRACKER_TEXTS)
def test_text_tracker_streams_the_whole_decode(smol_tokenizer, text):
    """Token by token, the windowed detokenizer shows exactly what decoding the whole continuation shows
    (leading spaces, characters split over byte tokens, emoji sequences), stop strings or not."""
    from llmasos.serve.request import TextTracker
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    for stop in ((), ("zzzz",)):
        t = TextTracker(smol_tokenizer, stop)
        got = "".join(t.add(ids[:i], final=i == len(ids))[0] for i in range(1, len(ids) + 1))
        assert got == smol_tokenizer.decode(ids, skip_special_tokens=True)
    # a stop string found across window boundaries: the text up to it, then nothing
    stop = text[5:9]
    t = TextTracker(smol_tokenizer, (stop,))
    shown, stopped = "", False
    for i in range(1, len(ids) + 1):
        new, stopped = t.add(ids[:i], final=i == len(ids))
        shown += new
        if stopped:
            break
    assert stopped and shown == text[:text.index(stop)]


def test_text_tracker_random_ids_and_costs(smol_tokenizer):
    """Random ids (invalid UTF-8 byte runs included): the streamed text equals the whole decode once the
    request ends; and each call decodes a window of a few tokens, not the continuation."""
    from llmasos.serve.request import TextTracker
    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = rng.integers(0, smol_tokenizer.vocab_size, int(rng.integers(1, 60))).tolist()
        t = TextTracker(smol_tokenizer, ())
        got = "".join(t.add(ids[:i], final=i == len(ids))[0] for i in range(1, len(ids) + 1))
        assert got == smol_tokenizer.decode(ids, skip_special_tokens=True), (trial, ids)

    class Counting:
        def __init__(self):
            self.lengths = []

        def decode(self, ids, skip_special_tokens=True):
            self.lengths.append(len(ids))
            return smol_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    c = Counting()
    ids = smol_tokenizer.encode(" lorem ipsum dolor" * 40, add_special_tokens=False)
    t = TextTracker(c, ())
    for i in range(1, len(ids) + 1):
        t.add(ids[:i])
    assert len(ids) > 100 and max(c.lengths) <= 2


@given(st.data())
def test_random_workloads_match_reference(data):
    """Arrivals at random steps, random lengths, small pools (preemption), shared prefixes, cancellations:
    every finished request equals the reference and every block comes back."""
    bs = data.draw(st.sampled_from([1, 2, 4, 8]), "block_size")
    max_seq = 48
    num_blocks = data.draw(st.integers(max_seq // bs + 2, 3 * max_seq // bs), "num_blocks")
    eng = engine(num_blocks=num_blocks, block_size=bs, max_seq=max_seq,
                 max_batch=data.draw(st.integers(1, 6), "max_batch"),
                 prefill_chunk=data.draw(st.integers(1, 20), "chunk"),
                 prefill_budget=data.draw(st.integers(1, 40), "budget"),
                 prefix_sharing=data.draw(st.booleans(), "sharing"),
                 ragged=data.draw(st.booleans(), "ragged"))
    stem = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=16), "stem")
    n = data.draw(st.integers(1, 8), "n")
    todo = []
    for i in range(n):
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20), f"tail{i}")
        p = (stem + tail)[:max_seq - 1]
        mt = data.draw(st.integers(1, max_seq - len(p)), f"max_tokens{i}")
        at = data.draw(st.integers(0, 10), f"arrival{i}")
        cancel = data.draw(st.one_of(st.none(), st.integers(0, 15)), f"cancel{i}")
        todo.append((at, p, mt, cancel))
    reqs = []
    for step in range(2000):
        for at, p, mt, cancel in todo:
            if at == step:
                r = eng.make_request(p, SamplingParams(max_tokens=mt))
                r.cancel_at = None if cancel is None else step + cancel
                eng.add(r)
                reqs.append(r)
        for r in reqs:
            if r.cancel_at == step:
                eng.abort(r.request_id)
        if step > 10 and not eng.has_work:
            break
        eng.step()
        eng.blocks.check()
    assert len(reqs) == n
    for r in reqs:
        assert r.finished
        if r.finish_reason == "length":
            assert r.output_ids == reference(r.prompt_ids, r.params.max_tokens, VOCAB)
        else:
            assert r.finish_reason == "abort"
            assert r.output_ids == reference(r.prompt_ids, len(r.output_ids), VOCAB)
    assert_all_free(eng)


def test_runner_failure_stays_with_its_request():
    """A request the runner fails on ends with an error; the others in the same batch get exactly their
    reference tokens and every block comes back."""
    ps = prompts(5, 4, 12, seed=6)
    poison = 49
    ps[2] = ps[2] + [poison]
    eng = engine(max_batch=5, prefill_chunk=16)
    eng.runner.fail_when = lambda ids: (ids == poison).any()
    got = {}
    reqs = [eng.make_request(p, SamplingParams(max_tokens=8, stop_token_ids=(poison,)),
                             sink=lambda o: got.setdefault(o.request_id, []).append(o)) for p in ps]
    for r in reqs:
        eng.add(r)
    while eng.has_work:
        eng.step()
    assert reqs[2].finish_reason == "error" and "injected runner failure" in got[reqs[2].request_id][-1].error
    for i, r in enumerate(reqs):
        if i != 2:
            assert r.output_ids == reference(ps[i], 8, VOCAB, stop=(poison,)), i
    assert max(b for b, _ in eng.runner.calls) == 4          # the other four still ran batched
    assert_all_free(eng)
