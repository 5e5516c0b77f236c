"""Paged-KV-cache runners: one step of a compiled (or eager torch) LM over block pools and block tables --
what a serving engine (continuous batching, llmasos/serve/) drives.

Layout (vLLM's PagedAttention; ``llmasos.frontends.kv_ops``, IR ops ``kv.paged_append`` /
``kv.paged_attention`` in llmasos/ir/opset/kv.py):

* KV pool per layer, one for k and one for v: [num_blocks, n_kv_heads, block_size, head_dim], in the
  model's dtype, zero-initialised, owned by the runner and kept across calls.
* block_table: int32 [B, max_blocks_per_seq], max_blocks_per_seq = ceil(max_seq / block_size). Logical
  position p of the sequence in row b lives in block block_table[b, p // block_size], slot p % block_size.
  -1 marks an unallocated entry.

The interface (``CompiledLM.paged_runner(num_blocks)`` for a model compiled with ``compile_lm(model, ...,
kv="paged", block_size=16)``, and ``TorchPagedRunner(model, num_blocks, block_size)``, pure PyTorch):

    runner.vocab, runner.max_seq, runner.block_size, runner.num_blocks, runner.max_blocks_per_seq
    logits = runner.step(ids, pos, last, block_table)      # np.ndarray float32 [B, vocab]
    next_ids = runner.sample_step(ids, pos, last, block_table[, temperature, top_k, top_p, u])
                                                           # np.ndarray int64 [B], chosen on the device
    runner.copy_blocks([(src, dst), ...])                  # copy-on-write
    logits = runner.ragged_step(ids, lens, pos, block_table)    # [S, vocab]: S sequences packed, unpadded
    next_ids = runner.ragged_sample_step(ids, lens, pos, block_table[, ...])

``sample_step`` runs the same call and then ``sampling.sample_rows`` where the logits are (greedy rows:
argmax; sampled rows: top-k / top-p / inverse CDF at the row's uniform u), so only B ids come back. The
compiled runner sends ids, pos, last and the table to its device in one copy (a staging buffer, see
``PagedRunner._upload``).

``step``: ids int [B, T] (T >= 1; one call serves prefill chunks and decode rows together, every row padded
to T), pos int [B] = the position of ids[b, 0], last int [B] = the index in 0..T-1 of row b's last real token.
Row b's tokens ids[b, 0..last[b]] are written at positions pos[b] .. pos[b] + last[b] and attend (causally)
positions 0 .. pos[b] + t of their own sequence through the table; the logits of token last[b] of each row
come back. Tokens after last[b] are padding: before the call the runner sets every entry of row b past the
block of its last real position to -1 (so padding is dropped there), which leaves padding only the slots
after pos[b] + last[b] of that same block: positions the sequence has not reached, which its next real
tokens overwrite before anything attends them. So no block of another sequence, and no position
0 .. pos[b] + last[b] of the row's own, is ever touched by padding. T == 1 runs the compiled decode function
(the decode kernel: reads only the row's blocks up to pos[b]), T > 1 the prefill function.

Every call is checked on the host first (GenerationError naming the row): integer arrays of the right
shapes; token ids in the vocabulary; 0 <= last < T; pos >= 0 and pos + last < max_seq; block ids in
-1 .. num_blocks-1; every block a row's real tokens attend (0 .. (pos+last) // block_size) allocated and not
listed twice in the row; no block the call writes held by another row of the call (copy a shared block
with copy_blocks before writing it).

``ragged_step`` (``runner.ragged``; a compiled model's third function, ``ragged``): ids int [N] are the
tokens of S sequences end to end, lens [S] how many each has (>= 1), pos [S] and block_table [S, MB] as in
``step`` -- the rows ``step`` would take padded to [S, max(lens)], with the same checks, run unpadded in
one call (N <= ``runner.max_ragged_tokens``). Only the real tokens are written.

``copy_blocks(pairs)``: for each (src, dst), block dst of every layer's k and v pool becomes a copy of
block src (sources and destinations distinct).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .config import DECODE, DecoderConfig, max_ragged_tokens
from .errors import GenerationError
from .sampling import sample_rows

DEFAULT_BLOCK_SIZE = 16
# batch sizes a captured (CUDA-graph) paged decode step is padded to: one graph per size actually used
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def graph_bucket(batch: int, max_batch: int) -> int:
    """The padded batch of a captured decode step of ``batch`` rows: the smallest GRAPH_BUCKETS entry that
    holds them, capped at ``max_batch``."""
    return min(next((b for b in GRAPH_BUCKETS if b >= batch), max_batch), max_batch)


_TORCH_DTYPES = {}          # numpy dtype str (i4, i8) -> torch dtype, filled on first use (torch is deferred)


class _PagedRunner:
    """The checks and bookkeeping shared by the compiled and the torch runner."""
    vocab: int
    max_seq: int
    block_size: int
    num_blocks: int
    max_blocks_per_seq: int
    max_batch: int
    static_batch: Optional[int] = None
    max_ragged_tokens: int = 0      # tokens a ragged step may take (0: the runner takes none)

    def _init_shape(self, vocab: int, max_seq: int, block_size: int, num_blocks, max_batch: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise GenerationError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.vocab, self.max_seq, self.block_size = int(vocab), int(max_seq), int(block_size)
        self.num_blocks, self.max_batch = int(num_blocks), int(max_batch)
        self.max_blocks_per_seq = math.ceil(self.max_seq / self.block_size)

    @staticmethod
    def _ints(name: str, a) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise GenerationError(f"step: {name} must be an integer array (int32), got dtype {a.dtype}")
        return a

    def check(self, ids, pos, last, block_table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, pos int32, last int64, the table the kernels get: int32, padding-only entries -1), or
        a GenerationError saying what is wrong."""
        ids, pos, last, table = (self._ints(n, a) for n, a in
                                 (("ids", ids), ("pos", pos), ("last", last), ("block_table", block_table)))
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise GenerationError(f"step: ids must be [B, T] with B, T >= 1, got shape {list(ids.shape)}")
        B, T = ids.shape
        limit = self.static_batch or self.max_batch
        if B > limit or (self.static_batch and B != self.static_batch):
            raise GenerationError(f"step: batch {B}, but this model was compiled for batch "
                                  f"{'of exactly ' if self.static_batch else 'up to '}{limit}")
        if T > self.max_seq:
            raise GenerationError(f"step: {T} tokens per row exceed max_seq={self.max_seq}")
        MB = self.max_blocks_per_seq
        for name, a, shape in (("pos", pos, (B,)), ("last", last, (B,)), ("block_table", table, (B, MB))):
            if a.shape != shape:
                raise GenerationError(f"step: {name} must have shape {list(shape)} (B={B}, "
                                      f"max_blocks_per_seq={MB}), got {list(a.shape)}")
        bad = self._outside_vocab(ids)
        if bad is not None:
            b, t = bad
            raise GenerationError(f"step: row {b}: token id {int(ids[b, t])} (at {t}) is outside the vocabulary "
                                  f"[0, {self.vocab})")
        return (ids.astype(np.int64), pos.astype(np.int32), last.astype(np.int64),
                self._check_rows(pos, last, table, T))

    def _outside_vocab(self, ids: np.ndarray) -> Optional[tuple]:
        """The index of the first token id outside [0, vocab), or None."""
        bad = (ids < 0) | (ids >= self.vocab)
        return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None

    def _check_rows(self, pos, last, table, T: int) -> np.ndarray:
        """check's row checks (last, positions, table): the table the kernels get (int32, -1 past each row's
        last block)."""
        MB = self.max_blocks_per_seq
        bad = (last < 0) | (last >= T)
        if bad.any():
            b = int(np.argmax(bad))
            raise GenerationError(f"step: row {b}: last={int(last[b])} is not a token index of 0..{T - 1}")
        if (pos < 0).any():
            b = int(np.argmax(pos < 0))
            raise GenerationError(f"step: row {b}: negative pos {int(pos[b])}")
        end = pos.astype(np.int64) + last.astype(np.int64)         # each row's last real position
        if (end >= self.max_seq).any():
            b = int(np.argmax(end >= self.max_seq))
            raise GenerationError(f"step: row {b}: its tokens take positions {int(pos[b])}..{int(end[b])}, past "
                                  f"the compiled max_seq={self.max_seq} (positions 0..{self.max_seq - 1})")
        bad = (table < -1) | (table >= self.num_blocks)
        if bad.any():
            b, k = (int(i) for i in np.argwhere(bad)[0])
            raise GenerationError(f"step: block_table[{b}, {k}] = {int(table[b, k])} is not a block id of "
                                  f"0..{self.num_blocks - 1} (or -1: unallocated)")
        BS = self.block_size
        last_blk = end // BS                                              # [B]
        used = np.arange(MB)[None, :] <= last_blk[:, None]               # the blocks the real tokens attend
        holes = used & (table < 0)
        if holes.any():
            b, k = (int(i) for i in np.argwhere(holes)[0])
            raise GenerationError(f"step: row {b} attends positions 0..{int(end[b])} but block_table[{b}, {k}] "
                                  f"(positions {k * BS}..{k * BS + BS - 1}) is unallocated (-1)")
        eff = np.where(used, table, -1).astype(np.int32)                  # padding past the last block: dropped
        # vectorized (a Python loop over rows and blocks costs milliseconds a step at batch 64): a block listed
        # twice in a row, or written by a row while another row holds it, sends us to _explain for the message
        cols = np.arange(MB, dtype=np.int64)[None, :]
        srt = np.sort(np.where(used, eff, -2 - cols), axis=1)           # unused entries: distinct negatives
        twice = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
        writes = used & (cols >= (pos.astype(np.int64) // BS)[:, None])
        holders = np.bincount(eff[used], minlength=self.num_blocks)
        if twice or (holders[eff[writes]] > 1).any():
            self._explain(eff, pos, last_blk)
        return eff

    def check_ragged(self, ids, lens, pos, block_table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A ragged step's inputs as its compiled function takes them -- (ids [1, N] int64, each token's position
        [N] int32, each sequence's last token index [S] int64, each token's table row [N, MB] int32) -- or a
        GenerationError. The step is S sequences: sequence s's lens[s] tokens come next in ids (flat [N]) and
        take positions pos[s] .. pos[s] + lens[s] - 1 of its table row block_table[s]: the checks of ``check``
        on the rows, padded to the longest (what they would be as a [S, T] step)."""
        ids, lens, pos, table = (self._ints(n, a) for n, a in
                                 (("ids", ids), ("lens", lens), ("pos", pos), ("block_table", block_table)))
        if lens.ndim != 1 or not 1 <= lens.shape[0] <= (self.static_batch or self.max_batch):
            raise GenerationError(f"ragged step: lens must be [S] with 1 <= S <= {self.static_batch or self.max_batch} "
                                  f"(the compiled batch), got shape {list(lens.shape)}")
        S = lens.shape[0]
        if (lens < 1).any():
            s = int(np.argmax(lens < 1))
            raise GenerationError(f"ragged step: sequence {s} has lens {int(lens[s])}: every sequence needs a token")
        N = int(lens.sum())
        if ids.shape != (N,):
            raise GenerationError(f"ragged step: ids must be [N] = [{N}] (the sum of lens), got shape {list(ids.shape)}")
        limit = self.max_ragged_tokens
        if N > limit:
            raise GenerationError(f"ragged step: {N} tokens exceed the compiled {limit}")
        MB = self.max_blocks_per_seq
        for name, a, shape in (("pos", pos, (S,)), ("block_table", table, (S, MB))):
            if a.shape != shape:
                raise GenerationError(f"ragged step: {name} must have shape {list(shape)} (S={S}, "
                                      f"max_blocks_per_seq={MB}), got {list(a.shape)}")
        bad = self._outside_vocab(ids)
        if bad is not None:
            (t,) = bad
            raise GenerationError(f"ragged step: token {t}: id {int(ids[t])} is outside the vocabulary [0, {self.vocab})")
        last = lens.astype(np.int64) - 1
        eff = self._check_rows(pos, last, table, int(lens.max()))
        seq = np.repeat(np.arange(S), lens)                                   # each token's sequence
        start = np.cumsum(lens) - lens
        tok_pos = pos.astype(np.int64)[seq] + np.arange(N) - start[seq]
        return (ids.astype(np.int64).reshape(1, N), tok_pos.astype(np.int32), (start + last).astype(np.int64),
                np.ascontiguousarray(eff[seq]))

    def _explain(self, eff, pos, last_blk) -> None:
        """The GenerationError for a table the vectorized check refused (a duplicate or a shared write)."""
        B, BS = eff.shape[0], self.block_size
        held = {}
        for b in range(B):
            ids_b = eff[b, :last_blk[b] + 1]
            if len(set(ids_b.tolist())) != len(ids_b):
                dup = next(x for x in ids_b.tolist() if (ids_b == x).sum() > 1)
                raise GenerationError(f"step: row {b} lists block {dup} twice in its table")
            for x in ids_b.tolist():
                held.setdefault(x, []).append(b)
        for b in range(B):
            for x in eff[b, pos[b] // BS:last_blk[b] + 1].tolist():      # the blocks row b writes
                other = [r for r in held[x] if r != b]
                if other:
                    raise GenerationError(f"step: row {b} writes block {x}, which row {other[0]} also holds: copy a "
                                          f"shared block (copy_blocks) before writing it")
        raise AssertionError("the block-table check refused a table it cannot explain")

    def _check_pairs(self, pairs) -> tuple[list, list]:
        src, dst = [], []
        for i, pr in enumerate(pairs):
            try:
                s, d = pr
                if isinstance(s, (bool, np.bool_)) or isinstance(d, (bool, np.bool_)) \
                        or not all(isinstance(x, (int, np.integer)) for x in (s, d)):
                    raise TypeError
            except (TypeError, ValueError):
                raise GenerationError(f"copy_blocks: pair {i} must be (src, dst) int block ids, got {pr!r}") from None
            for what, x in (("src", s), ("dst", d)):
                if not 0 <= x < self.num_blocks:
                    raise GenerationError(f"copy_blocks: pair {i}: {what} block {x} is outside "
                                          f"0..{self.num_blocks - 1}")
            src.append(int(s))
            dst.append(int(d))
        if len(set(dst)) != len(dst):
            raise GenerationError(f"copy_blocks: a destination block appears twice in {list(zip(src, dst))}")
        if set(src) & set(dst):
            raise GenerationError(f"copy_blocks: blocks {sorted(set(src) & set(dst))} are both a source and a "
                                  f"destination")
        return src, dst

    def _forward(self, ids, pos, last, block_table):
        """The checked call: logits [B, vocab] as a torch tensor where the model left them (on its device)."""
        raise NotImplementedError

    def _forward_ragged(self, ids, lens, pos, block_table):
        """The checked ragged call: logits [S, vocab] as a torch tensor on the model's device."""
        raise NotImplementedError

    @property
    def ragged(self) -> bool:
        """Whether this runner takes ragged steps (ragged_step / ragged_sample_step)."""
        return self.max_ragged_tokens > 0

    def step(self, ids, pos, last, block_table) -> np.ndarray:
        """Logits [B, vocab] f32 on the host."""
        return self._forward(ids, pos, last, block_table).float().cpu().numpy()

    def ragged_step(self, ids, lens, pos, block_table) -> np.ndarray:
        """One step of S sequences of any lengths, unpadded (``check_ragged``): ids [N] flat, lens [S], pos [S],
        block_table [S, MB]; logits [S, vocab] f32 of each sequence's last token -- what ``step`` gives for
        the same rows padded to [S, max(lens)], in one pass over the weights for all N tokens."""
        return self._forward_ragged(ids, lens, pos, block_table).float().cpu().numpy()

    def sample_step(self, ids, pos, last, block_table, temperature=None, top_k=None, top_p=None, u=None
                    ) -> np.ndarray:
        """The step's next token per row, chosen on the model's device: only the ids [B] (int64) come back,
        never the [B, vocab] logits. temperature / top_k / top_p / u: [B] arrays (None: every row greedy);
        a row with temperature 0 takes the argmax, any other samples (``sampling.sample_rows``: top-k,
        top-p, inverse CDF at the row's uniform ``u``, drawn by the caller from the request's generator)."""
        return self._sample(self._forward(ids, pos, last, block_table), temperature, top_k, top_p, u)

    def ragged_sample_step(self, ids, lens, pos, block_table, temperature=None, top_k=None, top_p=None, u=None
                           ) -> np.ndarray:
        """ragged_step's next token per sequence, chosen on the device as in ``sample_step``."""
        return self._sample(self._forward_ragged(ids, lens, pos, block_table), temperature, top_k, top_p, u)

    def _sample(self, logits, temperature, top_k, top_p, u) -> np.ndarray:
        import torch  # deferred: torch (device-side sampling)
        B = logits.shape[0]
        if temperature is None:
            return torch.argmax(logits, dim=-1).cpu().numpy()
        t = np.asarray(temperature, np.float32)
        if t.shape != (B,):
            raise GenerationError(f"sample_step: temperature must have shape [{B}], got {list(t.shape)}")
        rows = np.flatnonzero(t > 0)
        if not len(rows):
            return torch.argmax(logits, dim=-1).cpu().numpy()
        if u is None:
            raise GenerationError("sample_step: rows with temperature > 0 need u, their [B] uniforms in [0, 1)")
        top_k = np.zeros(B, np.float32) if top_k is None else top_k      # 0: no top-k
        top_p = np.ones(B, np.float32) if top_p is None else top_p       # 1: no top-p
        try:
            opts = np.stack([t, np.asarray(top_k, np.float32), np.asarray(top_p, np.float32),
                             np.asarray(u, np.float32)])
        except ValueError:
            raise GenerationError(f"sample_step: top_k, top_p and u must be [{B}] arrays like temperature") from None
        if opts.shape != (4, B) or not np.isfinite(opts).all():
            raise GenerationError(f"sample_step: top_k, top_p and u must be finite [{B}] arrays")
        o = torch.from_numpy(opts).to(logits.device)                       # one upload for the options
        return sample_rows(logits, o[0], o[1], o[2], o[3], rows=rows.tolist()).cpu().numpy()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"max_seq={self.max_seq}, max_batch={self.max_batch}, vocab={self.vocab})")


class PagedRunner(_PagedRunner):
    """Steps of a CompiledLM built with ``kv="paged"``: the pools live on its device and persist across
    calls (made by ``CompiledLM.paged_runner(num_blocks)``); the compiled code appends into them in place."""

    def __init__(self, lm, num_blocks: int):
        import tvm  # deferred: TVM's runtime (`import llmasos` imports this module)
        self.lm = lm
        self._init_shape(lm.vocab, lm.max_seq, lm.block_size, num_blocks, lm.max_batch)
        if lm._cache_types and self.max_blocks_per_seq != -(-lm.max_seq // lm.block_size):
            raise GenerationError("the compiled block table does not match max_seq / block_size")
        self.static_batch = lm.static_batch
        self.max_ragged_tokens = lm.max_ragged_tokens      # 0: an artifact built before the ragged step
        self._dev = lm._dev
        self._host = self._stage = None             # the step inputs' staging buffers (host, device), see _upload
        # a captured decode step (the target's paged_cuda_graph): padded rows, inputs at fixed addresses, and
        # a VM of the runner's own (its graphs hold this runner's pools and staging buffer: a second runner
        # on the shared VM would replay them over the first one's)
        self._graph = bool(lm.cuda_graph)
        self._ghost = self._gstage = None
        self._graph_decode = None
        self._pools = []
        for t in lm._cache_types:
            shape = (self.num_blocks, *t.shape[1:])
            per_block = int(np.prod(shape[1:]))
            if self.num_blocks * per_block >= 1 << 31:
                # the hand-written paged kernels index a pool in int32: past 2**31 elements they would read
                # the wrong block, so refuse rather than answer wrong
                raise GenerationError(f"num_blocks={self.num_blocks}: a KV pool of {self.num_blocks} x "
                                      f"{list(shape[1:])} has 2**31 elements or more, past the kernels' int32 "
                                      f"indexing; at most {((1 << 31) - 1) // per_block} blocks a pool")
            # zeroed, not empty: masked positions get probability 0, and 0 * NaN garbage would be NaN
            self._pools.append(tvm.runtime.tensor(np.zeros(shape, t.dtype.numpy), self._dev))

    @property
    def pools(self) -> list:
        """The device pools (tvm tensors), k_0, v_0, k_1, ..."""
        return self._pools

    def pool_bytes(self) -> int:
        return self.lm.cache_bytes(self.num_blocks)

    def _upload(self, arrays, fixed: bool = False) -> list:
        """The step's inputs in ONE host-to-device copy: packed (64-byte aligned) into a staging buffer that
        lives on the device between calls, then handed to the compiled function as views of it (through
        torch, whose DLPack export offsets the data pointer: TVM's kernels take no byte_offset). Ordering:
        the copy, TVM's kernels and sample_rows all run on the default CUDA stream, in issue order; do not call
        a runner inside a ``torch.cuda.stream(...)`` context (the staging buffer would race the kernels)."""
        import torch  # deferred: torch (the staging buffer and its views)
        import tvm  # deferred: TVM's runtime
        if not _TORCH_DTYPES:
            _TORCH_DTYPES.update(i4=torch.int32, i8=torch.int64)
        offs, n = [], 0
        for a in arrays:
            offs.append(n)
            n += -(-a.nbytes // 64) * 64
        if fixed:
            # a captured graph replays the addresses it was captured with: one buffer, never reallocated,
            # sized once for max_batch decode rows (ids i8, pos i4, last i8, table i4 [B, MB])
            if self._gstage is None:
                rows = self.static_batch or self.max_batch
                cap = sum(-(-w // 64) * 64 for w in (8 * rows, 4 * rows, 8 * rows, 4 * rows * self.max_blocks_per_seq))
                self._gstage = torch.from_dlpack(tvm.runtime.empty((cap,), "uint8", self._dev))
                self._ghost = torch.empty(cap, dtype=torch.uint8, pin_memory=self._gstage.is_cuda)
            if n > self._gstage.numel():
                raise AssertionError(f"a captured step's inputs ({n} bytes) exceed their fixed buffer")
            stage, hbuf = self._gstage, self._ghost
        else:
            if self._host is None or self._host.numel() < n:
                cap = max(n, 2 * (0 if self._host is None else self._host.numel()))
                self._stage = torch.from_dlpack(tvm.runtime.empty((cap,), "uint8", self._dev))
                self._host = torch.empty(cap, dtype=torch.uint8, pin_memory=self._stage.is_cuda)
            stage, hbuf = self._stage, self._host
        host = hbuf.numpy()
        for a, o in zip(arrays, offs):
            host[o:o + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        stage[:n].copy_(hbuf[:n])
        return [tvm.runtime.from_dlpack(stage[o:o + a.nbytes].view(_TORCH_DTYPES[a.dtype.str[1:]])
                                        .view(a.shape)) for a, o in zip(arrays, offs)]

    def _call(self, ids, pos, last, block_table):
        """(the compiled call's logits, device tensor [B', vocab], B): B' > B where a captured decode step
        ran padded rows after the real ones."""
        ids, pos, last, table = self.check(ids, pos, last, block_table)
        B = ids.shape[0]
        if ids.shape[1] > 1:
            return self.lm._prefill(*self._upload((ids, pos, last, table)), *self._pools, *self.lm._weights)[0], B
        if not self._graph:
            return self.lm._decode(*self._upload((ids, pos, last, table)), *self._pools, *self.lm._weights)[0], B
        # a captured step: rows padded to the bucket's size (a padding row's table is all -1, so it writes no
        # block and reads none; its logits are dropped), inputs staged at the bucket's fixed addresses
        pad = (self.static_batch or graph_bucket(B, self.max_batch)) - B
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, 1), ids.dtype)])
            pos = np.concatenate([pos, np.zeros(pad, pos.dtype)])
            last = np.concatenate([last, np.zeros(pad, last.dtype)])
            table = np.concatenate([table, np.full((pad, table.shape[1]), -1, table.dtype)])
        args = self._upload((ids, pos, last, table), fixed=True)
        if self._graph_decode is None:
            self._graph_decode = self.lm.executable.private_function(DECODE)
        return self._graph_decode(*args, *self._pools, *self.lm._weights)[0], B

    def _forward(self, ids, pos, last, block_table):
        """The logits [B, vocab] on the device. A captured step's are a view of the graph's own output
        buffer, overwritten by the next step of the same padded size: consume them before the next call."""
        import torch  # deferred: torch (the logits through DLPack, on the device)
        out, B = self._call(ids, pos, last, block_table)
        return torch.from_dlpack(out)[:B]

    def step(self, ids, pos, last, block_table) -> np.ndarray:
        out, B = self._call(ids, pos, last, block_table)
        return out.numpy()[:B].astype(np.float32, copy=False)

    def _forward_ragged(self, ids, lens, pos, block_table):
        import torch  # deferred: torch (the logits through DLPack, on the device)
        if self.lm._ragged is None:
            raise GenerationError("this model has no ragged step (compiled with ragged=False, or saved before "
                                  "compile_lm built one): use step, or recompile")
        args = self.check_ragged(ids, lens, pos, block_table)
        return torch.from_dlpack(self.lm._ragged(*self._upload(args), *self._pools, *self.lm._weights)[0])

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        import torch  # deferred: torch (device-side block copies through DLPack)
        src, dst = self._check_pairs(pairs)
        if not src:
            return
        for p in self._pools:
            t = torch.from_dlpack(p)
            t[torch.tensor(dst, device=t.device)] = t[torch.tensor(src, device=t.device)]
        self.lm.executable.spec.synchronize()


class TorchPagedRunner(_PagedRunner):
    """The same interface in plain PyTorch, eager: the Decoder's paged forward writing its pools in place
    (the reference the compiled runner is tested against, and the baseline of bench/paged_gpu_check.py).

    model: a Decoder, a transformers causal LM of a registered family, a DecoderConfig (random weights) or a
    preset name. max_seq defaults to the model's max_positions; max_batch bounds B only to mirror a compiled
    model. dtype / device: cast / move the weights (and pools)."""

    def __init__(self, model, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *, max_seq: Optional[int] = None,
                 max_batch: int = 8, dtype=None, device=None, seed: int = 0):
        import torch  # deferred: torch
        from .model import Decoder, as_decoder  # deferred: torch (the Decoder)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise GenerationError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(model, DecoderConfig):
            dec = Decoder.random(model, mode="export", seed=seed, dtype=dtype or torch.float32, device=device)
        else:
            dec = as_decoder(model, dtype)
        if device is not None:
            dec = dec.to(device)
        max_seq = dec.cfg.max_positions if max_seq is None else max_seq
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or not 2 <= max_seq <= dec.cfg.max_positions:
            raise GenerationError(f"max_seq must be an int in 2..{dec.cfg.max_positions} (the model's positions), "
                                  f"got {max_seq!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self._init_shape(dec.cfg.vocab, max_seq, block_size, num_blocks, max_batch)
        self.decoder = dec.paged_twin(inplace=True)
        self.ragged_decoder = dec.ragged_twin(inplace=True)
        self.max_ragged_tokens = max_ragged_tokens(self.max_batch, self.max_seq)
        self.pools = dec.new_pools(self.num_blocks, self.block_size)
        self._torch = torch

    def _forward(self, ids, pos, last, block_table):
        return self._run(self.decoder, self.check(ids, pos, last, block_table))

    def _forward_ragged(self, ids, lens, pos, block_table):
        return self._run(self.ragged_decoder, self.check_ragged(ids, lens, pos, block_table))

    def _run(self, decoder, arrays):
        """The checked inputs through ``decoder`` (writing the pools in place): its logits."""
        torch = self._torch
        dev = self.pools[0].device
        with torch.no_grad():
            return decoder(*(torch.from_numpy(a).to(dev) for a in arrays), *self.pools)[0]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        src, dst = self._check_pairs(pairs)
        if src:
            for p in self.pools:
                p[dst] = p[src]


def paged_generate(runner: _PagedRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   first_block: int = 0) -> list[list[int]]:
    """Greedy generation through a paged runner, one batch of prompts, each row given consecutive blocks
    from ``first_block`` on (a plain allocator: what a test or an example needs; the serving engine has its
    own). Returns the new tokens of each prompt."""
    B, BS, MB = len(prompts), runner.block_size, runner.max_blocks_per_seq
    if B < 1 or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError("paged_generate needs at least one prompt and an int max_new_tokens >= 1")
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
        raise GenerationError(f"prompt {lens.index(0)} is empty: generation needs at least one token")
    table = np.full((B, MB), -1, np.int32)
    nxt = first_block
    for b, n in enumerate(lens):
        if n + max_new_tokens > runner.max_seq:
            raise GenerationError(f"prompt {b}: {n} tokens + {max_new_tokens} new exceed max_seq={runner.max_seq}")
        need = math.ceil((n + max_new_tokens) / BS)
        if nxt + need > runner.num_blocks:
            raise GenerationError(f"paged_generate: the prompts need more than the pool's {runner.num_blocks} blocks")
        table[b, :need] = np.arange(nxt, nxt + need)
        nxt += need
    T = max(lens)
    ids = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    logits = runner.step(ids, np.zeros(B, np.int32), np.array(lens, np.int32) - 1, table)
    out = [[int(t)] for t in logits.argmax(-1)]
    pos = np.array(lens, np.int32)
    for _ in range(max_new_tokens - 1):
        ids = np.array([[o[-1]] for o in out], np.int32)
        logits = runner.step(ids, pos, np.zeros(B, np.int32), table)
        for b, t in enumerate(logits.argmax(-1)):
            out[b].append(int(t))
        pos = pos + 1
    return out
