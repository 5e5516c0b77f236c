"""A toy paged "model" for the scheduler and server tests: its K/V pool stores token ids per block slot, and
the logits of a row are a hash of the row's whole sequence READ BACK THROUGH THE BLOCK TABLE. So any block
table, copy-on-write, preemption or scheduling bug (a wrong block, a stale slot, a token written to another
sequence's block) changes the tokens, and ``reference`` (the same hash over the plain sequence) says what
they must be."""
from __future__ import annotations

import time
import zlib

import numpy as np

UNALLOCATED = -1


def logits_of(seq, vocab: int) -> np.ndarray:
    h = zlib.crc32(np.asarray(seq, np.int64).tobytes())
    return np.random.default_rng(h).standard_normal(vocab).astype(np.float32)


def reference(prompt, n: int, vocab: int, stop=()) -> list:
    """Greedy generation without any cache: what the engine must produce."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(np.argmax(logits_of(seq, vocab)))
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out


class FakeRunner:
    def __init__(self, num_blocks=64, block_size=4, max_seq=64, vocab=50, max_batch=8, delay=0.0, ragged=False):
        self.vocab, self.max_seq, self.block_size, self.num_blocks = vocab, max_seq, block_size, num_blocks
        self.max_batch = max_batch
        self.max_blocks_per_seq = -(-max_seq // block_size)
        self.pool = np.full((num_blocks, block_size), -1, np.int64)
        self.calls = []          # (B, T) per step
        self.copies = []
        self.fail_when = None    # a callable(ids) -> bool: raise in step (tests of failure isolation)
        self.delay = delay       # seconds per step (tests that need requests to stay running or waiting)
        self.ragged = ragged     # takes ragged steps (ragged_step); the engine then packs prompt chunks
        self.ragged_calls = []   # (S, N) per ragged step

    def step(self, ids, pos, last, block_table):
        ids, pos, last, bt = np.asarray(ids), np.asarray(pos), np.asarray(last), np.asarray(block_table)
        B, T = ids.shape
        for a in (ids, pos, last, bt):
            assert a.dtype == np.int32, a.dtype
        assert bt.shape == (B, self.max_blocks_per_seq), bt.shape
        assert 1 <= B <= self.max_batch, f"batch {B} > max_batch {self.max_batch}"
        assert ((0 <= ids) & (ids < self.vocab)).all()
        assert ((bt >= -1) & (bt < self.num_blocks)).all()
        if self.fail_when is not None and self.fail_when(ids):
            raise RuntimeError("injected runner failure")
        self.calls.append((B, T))
        if self.delay:
            time.sleep(self.delay)
        bs, MB = self.block_size, self.max_blocks_per_seq
        writes = []
        for b in range(B):       # like the kernel: every position of every row is written where a block is
            assert 0 <= last[b] < T
            assert pos[b] + last[b] < self.max_seq, f"row {b} reaches position {pos[b] + last[b]} >= max_seq"
            for t in range(T):
                p = int(pos[b]) + t
                if p // bs < MB and bt[b, p // bs] >= 0:
                    writes.append((b, int(bt[b, p // bs]), p % bs, int(ids[b, t])))
        held = [set(bt[b][bt[b] >= 0].tolist()) for b in range(B)]
        for b, blk in {(b, blk) for b, blk, _, _ in writes}:   # as the real runner checks: a row writes only
            for o in range(B):                                  # blocks no other row of the call holds
                assert o == b or blk not in held[o], f"row {b} writes block {blk}, which row {o} also holds"
        for _, blk, slot, v in writes:
            self.pool[blk, slot] = v
        out = np.empty((B, self.vocab), np.float32)
        for b in range(B):
            end = int(pos[b]) + int(last[b])
            seq = []
            for p in range(end + 1):
                blk = int(bt[b, p // bs])
                assert blk != UNALLOCATED, f"row {b} reads position {p} from an unallocated block"
                v = int(self.pool[blk, p % bs])
                assert v >= 0, f"row {b} reads position {p} from block {blk}, never written"
                seq.append(v)
            out[b] = logits_of(seq, self.vocab)
        return out

    def ragged_step(self, ids, lens, pos, block_table):
        """The packed step: each sequence's tokens unpacked into a row of ``step`` (whose padding writes only
        the row's own blocks past its last token, as the padded call would)."""
        assert self.ragged, "the engine made a ragged call to a runner that takes none"
        ids, lens = np.asarray(ids), np.asarray(lens)
        assert ids.ndim == 1 and lens.ndim == 1 and ids.shape[0] == lens.sum() and (lens >= 1).all()
        S, T = len(lens), int(lens.max())
        rows = np.zeros((S, T), np.int32)
        for s, (a, n) in enumerate(zip(np.cumsum(lens) - lens, lens)):
            rows[s, :n] = ids[a:a + n]
        self.ragged_calls.append((S, int(ids.shape[0])))
        return self.step(rows, np.asarray(pos), (lens - 1).astype(np.int32), block_table)

    def copy_blocks(self, pairs):
        for s, d in pairs:
            self.copies.append((s, d))
            self.pool[d] = self.pool[s]
