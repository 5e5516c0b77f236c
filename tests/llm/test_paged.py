"""The paged KV cache end to end (llmasos/llm/paged.py): the compiled paged runner against the contiguous
compile_lm path and the eager TorchPagedRunner on mixed steps (prefill chunks + decode rows, padded) with
scattered block tables, copy-on-write through copy_blocks, padding that never touches a block it must not,
input validation, GPT-2 and quantized pipelines, and SmolLM2 greedy tokens (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmasos
from llmasos.llm import GenerationError, TorchPagedRunner, paged_generate
from llmasos.llm.presets import decoder_config, hf_model

MAX_SEQ, BS, NB = 40, 4, 48
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def hf_llama():
    return hf_model("llama-tiny", seed=3)


@pytest.fixture(scope="module")
def contiguous(hf_llama):
    return llmasos.compile_lm(hf_llama, "cpu", max_seq=MAX_SEQ, max_batch=4)


@pytest.fixture(scope="module")
def paged_lm(hf_llama):
    return llmasos.compile_lm(hf_llama, "cpu", max_seq=MAX_SEQ, max_batch=4, kv="paged", block_size=BS)


def reference_logits(lm, seq: list, p: int) -> np.ndarray:
    """The contiguous compiled model's logits of token p of ``seq`` (a prefill of seq[:p+1])."""
    buf = lm._buffers_for(1)
    logits, _ = lm.prefill([seq[:p + 1]], buf)
    return np.asarray(torch.from_dlpack(logits))[0].copy()


class Schedule:
    """Sequences fed to a runner in steps (rows join, leave and mix prefill chunks with decode tokens),
    each sequence given blocks on demand from a shuffled free list (so tables are scattered and interleave)."""

    def __init__(self, runner, seqs: dict, seed: int = 0):
        self.runner, self.seqs = runner, seqs
        self.free = list(np.random.default_rng(seed).permutation(runner.num_blocks))
        self.blocks = {name: [] for name in seqs}
        self.done = {name: 0 for name in seqs}       # tokens of each sequence already in the cache

    def row_table(self, name: str, upto: int) -> np.ndarray:
        while len(self.blocks[name]) * self.runner.block_size < upto:
            self.blocks[name].append(int(self.free.pop()))
        row = np.full(self.runner.max_blocks_per_seq, -1, np.int32)
        row[:len(self.blocks[name])] = self.blocks[name]
        return row

    def inputs(self, rows: list):
        """rows: [(sequence, number of new tokens)] -> (ids, pos, last, table, [(sequence, position)])."""
        T = max(n for _, n in rows)
        ids = np.zeros((len(rows), T), np.int32)
        pos, last, table, where = [], [], [], []
        for r, (name, n) in enumerate(rows):
            start = self.done[name]
            ids[r, :n] = self.seqs[name][start:start + n]
            ids[r, n:] = 7                                   # padding: a real token id, not 0
            pos.append(start)
            last.append(n - 1)
            table.append(self.row_table(name, start + n))
            where.append((name, start + n - 1))
        return ids, np.array(pos, np.int32), np.array(last, np.int32), np.stack(table), where

    def step(self, rows: list, ragged: bool = False):
        """One step: padded rows (``runner.step``) or, ragged, the rows' tokens packed (``ragged_step``)."""
        ids, pos, last, table, where = self.inputs(rows)
        if ragged:
            flat = np.concatenate([ids[r, :n] for r, (_, n) in enumerate(rows)])
            logits = self.runner.ragged_step(flat, last + 1, pos, table)
        else:
            logits = self.runner.step(ids, pos, last, table)
        for name, n in rows:
            self.done[name] += n
        return logits, where


def _seqs(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, vocab, (n,), generator=g).tolist() for name, n in
            (("a", 16), ("b", 12), ("c", 14), ("d", 9))}


# prefill chunks, decode rows and rows joining / leaving, in changing row order; T = 1 steps run the decode
# function, the others the prefill function with every shorter row padded
STEPS = [
    [("a", 5), ("b", 6)],
    [("c", 4), ("a", 6), ("b", 1)],
    [("b", 1), ("d", 3), ("c", 5), ("a", 1)],
    [("a", 1), ("b", 1), ("c", 1), ("d", 1)],
    [("d", 4), ("c", 2)],
    [("c", 1), ("a", 1)],
]


def test_mixed_steps_equal_the_contiguous_model_and_torch(hf_llama, contiguous, paged_lm):
    seqs = _seqs()
    runners = {"compiled": paged_lm.paged_runner(NB), "torch": TorchPagedRunner(hf_llama, NB, BS, max_seq=MAX_SEQ)}
    scheds = {k: Schedule(r, seqs, seed=1) for k, r in runners.items()}
    ref = {}
    for rows in STEPS:
        got = {k: s.step(rows) for k, s in scheds.items()}
        logits, where = got["compiled"]
        np.testing.assert_allclose(logits, got["torch"][0], **TOL)
        for r, (name, p) in enumerate(where):
            if (name, p) not in ref:
                ref[name, p] = reference_logits(contiguous, seqs[name], p)
            np.testing.assert_allclose(logits[r], ref[name, p], **TOL, err_msg=f"{name} at {p}")
    assert len(ref) == sum(len(r) for r in STEPS)


def test_ragged_steps_equal_the_contiguous_model_and_torch(hf_llama, contiguous, paged_lm):
    """The same steps as one packed call each (ragged_step: decode rows and prompt chunks unpadded, every
    token its own position and table row): logits equal the contiguous model's, the eager torch runner's, and
    the padded steps' of a second compiled runner; and the pools' real slots equal the padded runner's."""
    seqs = _seqs()
    runners = {"ragged": paged_lm.paged_runner(NB), "torch": TorchPagedRunner(hf_llama, NB, BS, max_seq=MAX_SEQ),
               "padded": paged_lm.paged_runner(NB)}
    assert runners["ragged"].ragged and runners["ragged"].max_ragged_tokens == 4 * MAX_SEQ
    scheds = {k: Schedule(r, seqs, seed=1) for k, r in runners.items()}
    for rows in STEPS:
        got = {k: s.step(rows, ragged=k != "padded") for k, s in scheds.items()}
        logits, where = got["ragged"]
        np.testing.assert_allclose(logits, got["torch"][0], **TOL)
        np.testing.assert_allclose(logits, got["padded"][0], **TOL)
        for r, (name, p) in enumerate(where):
            np.testing.assert_allclose(logits[r], reference_logits(contiguous, seqs[name], p), **TOL,
                                       err_msg=f"{name} at {p}")
    real = np.zeros((NB, BS), bool)                 # every slot a real token was written to
    for name, blocks in scheds["ragged"].blocks.items():
        for p in range(scheds["ragged"].done[name]):
            real[blocks[p // BS], p % BS] = True
    padded, ragged = _host_pools(runners["padded"]), _host_pools(runners["ragged"])
    for a, b in zip(ragged, padded):
        np.testing.assert_allclose(np.where(real[:, None, :, None], a, 0), np.where(real[:, None, :, None], b, 0),
                                   **TOL)
        assert not np.where(real[:, None, :, None], 0, a).any()     # unpadded: nothing written past a token


def test_ragged_step_is_checked(hf_llama, paged_lm):
    for runner in (TorchPagedRunner(hf_llama, 8, BS, max_seq=MAX_SEQ), paged_lm.paged_runner(8)):
        table = np.full((2, runner.max_blocks_per_seq), -1, np.int32)
        table[0, :2], table[1, :1] = [3, 4], [7]
        good = dict(ids=np.array([1, 2, 3, 4, 5]), lens=np.array([3, 2]), pos=np.array([2, 0]), block_table=table)
        assert runner.ragged_step(**good).shape == (2, 128)
        for bad, msg in [(dict(lens=np.array([3, 3])), "ids must be \\[N\\] = \\[6\\]"),
                         (dict(lens=np.array([5, 0])), "sequence 1 has lens 0"),
                         (dict(lens=np.ones(9, int), ids=np.ones(9, int)), "lens must be \\[S\\] with 1 <= S <= [48] "),
                         (dict(ids=np.array([1, 2, 300, 4, 5])), "token 2: id 300 is outside the vocabulary"),
                         (dict(pos=np.array([38, 0])), "row 0: its tokens take positions 38..40, past"),
                         (dict(pos=np.array([2])), "pos must have shape \\[2\\]"),
                         (dict(block_table=np.where(table == 4, -1, table)), "row 0 attends positions 0..4 but"),
                         (dict(block_table=np.where(table == 7, 4, table)), "row 0 writes block 4, which row 1"),
                         (dict(ids=np.array([1.0, 2, 3, 4, 5])), "ids must be an integer array")]:
            with pytest.raises(GenerationError, match=msg):
                runner.ragged_step(**{**good, **bad})
        too_many = runner.max_ragged_tokens + 1
        with pytest.raises(GenerationError, match=f"{too_many} tokens exceed the compiled"):
            runner.ragged_step(np.zeros(too_many, int), np.array([too_many]), np.array([0]), table[:1])


def test_padded_decode_rows_of_a_captured_step_change_nothing(paged_lm):
    """A captured (CUDA-graph) decode step runs its rows padded to graph_bucket's size with all -1 tables; on
    the CPU the same padding path (forced) must give the real rows' logits and leave every pool slot but the
    real tokens' as it was, step after step."""
    from llmasos.llm.paged import GRAPH_BUCKETS, graph_bucket
    assert [graph_bucket(b, 64) for b in (1, 2, 3, 5, 17, 33, 64)] == [1, 2, 4, 8, 24, 48, 64]
    assert graph_bucket(3, 3) == 3 and graph_bucket(70, 80) == 80 and list(GRAPH_BUCKETS) == sorted(GRAPH_BUCKETS)
    seqs = _seqs(seed=4)
    plain, padded = paged_lm.paged_runner(NB), paged_lm.paged_runner(NB)
    assert not padded._graph          # a CPU model is never captured
    padded._graph = True
    scheds = [Schedule(r, seqs, seed=3) for r in (plain, padded)]
    steps = [[("a", 5), ("b", 6), ("c", 3)], [("a", 1), ("b", 1), ("c", 1)], [("c", 1)],
             [("b", 1), ("a", 1), ("c", 1)], [("d", 4)], [("d", 1), ("a", 1), ("b", 1)]]
    for rows in steps:
        want, where = scheds[0].step(rows)
        got, _ = scheds[1].step(rows)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, **TOL, err_msg=str(rows))
        if all(n == 1 for _, n in rows) and len(rows) == 3:
            assert padded._gstage is not None          # the padded path ran (3 rows -> a bucket of 4)
    for a, b in zip(_host_pools(plain), _host_pools(padded)):
        np.testing.assert_allclose(a, b, **TOL)
    ids, pos, last, table, _ = scheds[1].inputs([("a", 1), ("b", 1), ("c", 1)])
    assert padded.sample_step(ids, pos, last, table).shape == (3,)
    # the captured path runs on a VM of the runner's own: a VM's CUDA graphs hold the addresses of the
    # buffers they were captured with, so two runners must never share one
    assert padded._graph_decode is not None and padded._graph_decode is not paged_lm._decode


def test_greedy_generation_equals_contiguous_generate(contiguous, paged_lm):
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
    want = contiguous.generate(prompts, 10)
    assert paged_generate(paged_lm.paged_runner(NB), prompts, 10, first_block=5) == want


@pytest.mark.parametrize("which", ["compiled", "torch"])
def test_copy_blocks_forks_a_sequence(hf_llama, contiguous, paged_lm, which):
    """Copy-on-write: q shares p's full blocks and gets a copy of p's partial last block; then p and q
    decode different tokens in one step, each equal to the contiguous model on its own sequence."""
    runner = paged_lm.paged_runner(16) if which == "compiled" else TorchPagedRunner(hf_llama, 16, BS, max_seq=MAX_SEQ)
    prompt = [11, 22, 33, 44, 55, 66, 77, 88, 99, 10]                      # 10 tokens: blocks 0, 1 full, 2 partial
    table = np.full((1, runner.max_blocks_per_seq), -1, np.int32)
    table[0, :3] = [9, 2, 14]
    runner.step(np.array([prompt], np.int32), np.zeros(1, np.int32), np.array([9], np.int32), table)
    two = np.full((2, runner.max_blocks_per_seq), -1, np.int32)
    two[0, :3] = [9, 2, 14]
    two[1, :3] = [9, 2, 5]                                                # q's partial block: 5, not yet a copy
    ids, pos, last = np.array([[40], [41]], np.int32), np.array([10, 10], np.int32), np.zeros(2, np.int32)
    runner.copy_blocks([(14, 5)])
    pools = runner.pools
    k0 = np.asarray(torch.from_dlpack(pools[0])) if which == "compiled" else pools[0].numpy()
    np.testing.assert_array_equal(k0[5], k0[14])
    logits = runner.step(ids, pos, last, two)
    np.testing.assert_allclose(logits[0], reference_logits(contiguous, prompt + [40], 10), **TOL)
    np.testing.assert_allclose(logits[1], reference_logits(contiguous, prompt + [41], 10), **TOL)
    # writing a block another row holds (no copy first) is refused
    shared = two.copy()
    shared[1, 2] = 14
    with pytest.raises(GenerationError, match="row 0 writes block 14, which row 1 also holds"):
        runner.step(ids, pos, last, shared)


def _host_pools(runner) -> list:
    return [np.asarray(torch.from_dlpack(p)).copy() for p in runner.pools]


def test_padding_never_touches_a_block_it_must_not(contiguous, paged_lm):
    """A step whose short rows are padded to T = 7: every slot but the real tokens' and the tails of the rows'
    last blocks stays bit-identical -- the rows' own past, other sequences' blocks, and a block of another
    sequence listed in a padded row's table past its last token; that sequence then decodes as if alone."""
    runner = paged_lm.paged_runner(24)
    seqs = _seqs(seed=5)
    sched = Schedule(runner, seqs, seed=2)
    sched.step([("a", 6), ("b", 3), ("c", 9)])
    ids, pos, last, table, where = sched.inputs([("a", 1), ("b", 7), ("c", 1)])
    victim = sched.blocks["c"][0]
    table[0, len(sched.blocks["a"]):] = -1
    table[0, len(sched.blocks["a"])] = victim                     # row "a" lists c's block past its own end
    ids_c = ids[2].copy()
    ids, pos, last, table = ids[:2], pos[:2], last[:2], table[:2]   # "c" sits this step out
    before = _host_pools(runner)
    runner.step(ids, pos, last, table)
    after = _host_pools(runner)
    allowed = np.zeros(before[0].shape[:1] + before[0].shape[2:3], bool)      # [NB, BS]: slots that may change
    for r in range(len(ids)):
        for p in range(int(pos[r]), int(pos[r]) + int(last[r]) + 1):          # the real tokens
            allowed[table[r, p // BS], p % BS] = True
        end = int(pos[r]) + int(last[r])
        allowed[table[r, end // BS], end % BS + 1:] = True                    # the tail of the last block
    assert not allowed[victim].any()
    for b, a in zip(before, after):
        np.testing.assert_array_equal(np.where(allowed[:, None, :, None], 0, a), np.where(allowed[:, None, :, None], 0, b))
    sched.done["a"] += 1
    sched.done["b"] += 7
    logits, where = sched.step([("c", 1)])
    assert ids_c[0] == seqs["c"][9]
    np.testing.assert_allclose(logits[0], reference_logits(contiguous, seqs["c"], 9), **TOL)
    logits, where = sched.step([("a", 1), ("b", 1)])
    for r, (name, p) in enumerate(where):
        np.testing.assert_allclose(logits[r], reference_logits(contiguous, seqs[name], p), **TOL)


# -- validation ----------------------------------------------------------------------------------------------
def _good(runner):
    table = np.full((2, runner.max_blocks_per_seq), -1, np.int32)
    table[0, :2], table[1, :1] = [3, 4], [7]
    return dict(ids=np.array([[1, 2, 3], [4, 5, 0]], np.int32), pos=np.array([2, 0], np.int32),
                last=np.array([2, 1], np.int32), block_table=table)


BAD = [
    (dict(ids=np.array([1, 2, 3], np.int32)), "ids must be \\[B, T\\]"),
    (dict(ids=np.array([[1.0, 2, 3], [4, 5, 0]])), "ids must be an integer array"),
    (dict(ids=np.array([[1, 2, 3], [4, 500, 0]], np.int32)), "row 1: token id 500 .* outside the vocabulary"),
    (dict(pos=np.array([2], np.int32)), "pos must have shape \\[2\\]"),
    (dict(pos=np.array([-1, 0], np.int32)), "row 0: negative pos -1"),
    (dict(pos=np.array([38, 0], np.int32)), "row 0: its tokens take positions 38..40, past the compiled max_seq=40"),
    (dict(last=np.array([3, 1], np.int32)), "row 0: last=3 is not a token index of 0..2"),
    (dict(last=np.array([2.0, 1.0])), "last must be an integer array"),
    (dict(block_table=np.zeros((2, 3), np.int32)), "block_table must have shape \\[2, 10\\]"),
    (dict(block_table="bad"), "block_table must be an integer array"),
]


@pytest.mark.parametrize("bad, msg", BAD)
def test_step_rejects_bad_inputs(hf_llama, bad, msg):
    runner = TorchPagedRunner(hf_llama, 8, BS, max_seq=MAX_SEQ)
    args = {**_good(runner), **bad}
    with pytest.raises(GenerationError, match=msg):
        runner.step(**args)


def test_step_rejects_bad_tables(hf_llama, paged_lm):
    for runner in (TorchPagedRunner(hf_llama, 8, BS, max_seq=MAX_SEQ), paged_lm.paged_runner(8)):
        good = _good(runner)
        runner.step(**good)                                        # the good inputs are good
        for edit, msg in [((0, 0, 8), "block_table\\[0, 0\\] = 8 is not a block id of 0..7"),
                          ((0, 0, -2), "block_table\\[0, 0\\] = -2 is not a block id"),
                          ((0, 1, -1), "row 0 attends positions 0..4 but block_table\\[0, 1\\] .* unallocated"),
                          ((0, 1, 3), "row 0 lists block 3 twice"),
                          ((1, 0, 4), "row 0 writes block 4, which row 1 also holds")]:
            table = good["block_table"].copy()
            table[edit[0], edit[1]] = edit[2]
            with pytest.raises(GenerationError, match=msg):
                runner.step(**{**good, "block_table": table})
        with pytest.raises(GenerationError, match="batch 9, but this model was compiled for batch up to"):
            runner.step(np.zeros((9, 1), np.int32), np.zeros(9, np.int32), np.zeros(9, np.int32),
                        np.zeros((9, runner.max_blocks_per_seq), np.int32))
        for pairs, msg in [([(0, 8)], "dst block 8 is outside 0..7"), ([(1, 2), (3, 2)], "destination block appears"
                           " twice"), ([(1, 2), (2, 3)], "blocks \\[2\\] are both a source and a destination"),
                           ([(1,)], "pair 0 must be \\(src, dst\\) int block ids"), ([(1.5, 2)], "int block ids")]:
            with pytest.raises(GenerationError, match=msg):
                runner.copy_blocks(pairs)


def test_compile_and_runner_options_are_checked(hf_llama, contiguous, paged_lm):
    with pytest.raises(ValueError, match="kv must be one of \\('contiguous', 'paged'\\), got 'pages'"):
        llmasos.compile_lm(hf_llama, "cpu", kv="pages")
    for bs in (0, 2.0, True, 4096):
        with pytest.raises(ValueError, match="block_size must be an int in 1..1024"):
            llmasos.compile_lm(hf_llama, "cpu", kv="paged", block_size=bs)
    with pytest.raises(GenerationError, match="compile_lm\\(..., kv='paged'\\)"):
        contiguous.paged_runner(8)
    with pytest.raises(GenerationError, match="compiled with kv='paged'"):
        paged_lm.generate([1, 2, 3], 4)
    for nb in (0, -3, 2.5, None):
        with pytest.raises(GenerationError, match="num_blocks must be an int >= 1"):
            paged_lm.paged_runner(nb)
    r = paged_lm.paged_runner(8)
    assert (r.vocab, r.max_seq, r.block_size, r.num_blocks, r.max_blocks_per_seq) == (128, MAX_SEQ, BS, 8, 10)
    assert paged_lm.cache_bytes(8) == 2 * 2 * 8 * 2 * BS * 16 * 4       # layers * (k, v) * NB * Hkv * BS * D * f32


# -- other families and pipelines ----------------------------------------------------------------------------
def test_gpt2_paged_runner_equals_torch():
    hf = hf_model("gpt2-tiny", seed=1)
    lm = llmasos.compile_lm(hf, "cpu", max_seq=24, max_batch=3, kv="paged", block_size=8)
    seqs = _seqs(seed=3)
    runners = [lm.paged_runner(12), TorchPagedRunner(hf, 12, 8, max_seq=24),
               lm.paged_runner(12), TorchPagedRunner(hf, 12, 8, max_seq=24)]       # padded steps, then ragged
    scheds = [Schedule(r, seqs, seed=4) for r in runners]
    for rows in ([("a", 5), ("b", 9)], [("a", 1), ("b", 1), ("c", 3)], [("c", 1), ("a", 1)]):
        got = [s.step(rows, ragged=i >= 2)[0] for i, s in enumerate(scheds)]
        for g in got[1:]:
            np.testing.assert_allclose(g, got[0], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_quantized_paged_equals_quantized_contiguous(name):
    hf = hf_model(name, seed=2)
    passes = "quantize{bits=4,group=32,sym=false},fuse"
    c = llmasos.compile_lm(hf, "cpu", max_seq=24, max_batch=3, passes=passes)
    p = llmasos.compile_lm(hf, "cpu", max_seq=24, max_batch=3, passes=passes, kv="paged", block_size=4)
    assert any(n.op == "quant.linear" for n in p.graphs["decode"].nodes)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    assert paged_generate(p.paged_runner(16), prompts, 8) == c.generate(prompts, 8)


@pytest.mark.slow
def test_smollm2_greedy_tokens_through_the_paged_runner():
    from llmasos.zoo import load_smollm2
    hf, tok = load_smollm2(verbose=False)
    # max_batch=2 trips a torch.export quirk (the batch Dim becomes two symbols, for the contiguous cache too)
    c = llmasos.compile_lm(hf, "cpu", max_seq=64, max_batch=4)
    p = llmasos.compile_lm(hf, "cpu", max_seq=64, max_batch=4, kv="paged", block_size=16)
    prompts = [tok("The capital of France is")["input_ids"], tok("def fibonacci(n):")["input_ids"]]
    want = c.generate(prompts, 16)
    assert paged_generate(p.paged_runner(12), prompts, 16, first_block=3) == want
    # the same tokens when the prompts arrive in chunks beside the other row's decode steps
    runner = p.paged_runner(12)
    sched = Schedule(runner, {"x": prompts[0] + want[0], "y": prompts[1] + want[1]}, seed=3)
    n0, n1 = len(prompts[0]), len(prompts[1])
    logits, _ = sched.step([("x", n0)])
    got = {"x": [int(logits[0].argmax())], "y": []}
    logits, _ = sched.step([("y", 3), ("x", 1)])
    got["x"].append(int(logits[1].argmax()))
    logits, _ = sched.step([("y", n1 - 3), ("x", 1)])
    got["y"].append(int(logits[0].argmax()))
    got["x"].append(int(logits[1].argmax()))
    while len(got["y"]) < 16:
        rows = [("y", 1)] + ([("x", 1)] if len(got["x"]) < 16 else [])
        logits, _ = sched.step(rows)
        got["y"].append(int(logits[0].argmax()))
        if len(rows) == 2:
            got["x"].append(int(logits[1].argmax()))
    assert got["x"] == want[0] and got["y"] == want[1]


def test_a_saved_paged_model_loads_and_steps_the_same(paged_lm, tmp_path):
    paged_lm.save(tmp_path / "paged.lm")
    loaded = llmasos.load_lm(tmp_path / "paged.lm")
    assert (loaded.kv, loaded.block_size) == ("paged", BS)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    assert paged_generate(loaded.paged_runner(12), prompts, 5) == paged_generate(paged_lm.paged_runner(12), prompts, 5)
    args = (np.array([5, 6, 7, 1, 2]), np.array([3, 2]), np.array([0, 0]), np.array([[0] + [-1] * 9, [1] + [-1] * 9]))
    np.testing.assert_array_equal(loaded.paged_runner(4).ragged_step(*args), paged_lm.paged_runner(4).ragged_step(*args))


def test_a_paged_model_without_the_ragged_step_saves_loads_and_serves(hf_llama, paged_lm, tmp_path):
    """compile_lm(..., ragged=False) (or an artifact saved before the ragged step existed): no ragged function,
    the runner says so, the engine runs mixed steps as two calls, and the tokens are the same."""
    from llmasos.serve import Engine, SamplingParams
    lm = llmasos.compile_lm(hf_llama, "cpu", max_seq=MAX_SEQ, max_batch=4, kv="paged", block_size=BS, ragged=False)
    assert set(lm.executable.signature.functions) == {"prefill", "decode"}
    lm.save(tmp_path / "two.lm")
    loaded = llmasos.load_lm(tmp_path / "two.lm")
    r = loaded.paged_runner(24)
    assert not r.ragged and r.max_ragged_tokens == 0
    with pytest.raises(GenerationError, match="this model has no ragged step"):
        r.ragged_step(np.array([1, 2]), np.array([2]), np.array([0]), np.array([[0] + [-1] * 9]))
    with pytest.raises(ValueError, match="ragged=True, but the runner PagedRunner takes no ragged steps"):
        Engine(r, ragged=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3, 4, 5, 6]]
    outs = [Engine(x.paged_runner(24), prefill_chunk=3).generate(prompts, SamplingParams(max_tokens=5))
            for x in (loaded, paged_lm)]
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="ragged must be True or False"):
        llmasos.compile_lm(hf_llama, "cpu", kv="paged", ragged="yes")


def test_torch_runner_takes_a_config_or_a_preset_name():
    for model in (decoder_config("llama-tiny"), "gpt2-tiny"):
        r = TorchPagedRunner(model, 6, 8, max_seq=32, max_batch=2)
        assert (r.vocab, r.max_seq, r.block_size, r.num_blocks, r.max_blocks_per_seq) == (128, 32, 8, 6, 4)
        assert paged_generate(r, [[1, 2, 3]], 4) == paged_generate(r, [[1, 2, 3]], 4, first_block=2)
    with pytest.raises(GenerationError, match="block_size must be an int >= 1"):
        TorchPagedRunner("llama-tiny", 6, 0)
    with pytest.raises(GenerationError, match="max_seq must be an int in 2..64"):
        TorchPagedRunner("llama-tiny", 6, 4, max_seq=100)


def test_a_pool_past_int32_indexing_is_refused(paged_lm):
    """The paged kernels index a pool in int32: a block count that takes a pool to 2**31 elements is an error
    naming the largest allowed count, before any pool is allocated."""
    per_block = int(np.prod(paged_lm._cache_types[0].shape[1:]))
    too_many = (1 << 31) // per_block + 1
    with pytest.raises(GenerationError, match=rf"num_blocks={too_many}: .* at most {((1 << 31) - 1) // per_block} blocks"):
        paged_lm.paged_runner(too_many)
