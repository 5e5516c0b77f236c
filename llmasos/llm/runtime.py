"""CompiledLM: a compiled prefill + decode pair, the KV cache it owns on the device, and generation.

A CompiledLM is a view over a CompiledProgram of kind "lm" (llmasos/driver.py; ``lm.program``), whose meta
holds vocab, max_seq, cuda_graph and the DecoderConfig. The library has two entry functions sharing one set
of weights (backends.tvm.build_functions):

    prefill(ids [B, T], pos [B] i32, last [B] i64, k_0, v_0, k_1, v_1, ...) -> (logits [B, vocab], caches...)
    decode (ids [B, 1], pos [B] i32, last [B] i64, k_0, v_0, ...)           -> (logits [B, vocab], caches...)

(llmasos.llm.ops describes the cache layout.) The caches are updated in place by the compiled code, so the
runtime allocates them once per batch size and passes the same buffers on every call; the decode step's
inputs live in fixed device buffers too, which is what lets a CUDA graph replay the whole step.

With ``compile_lm(..., kv="paged")`` both functions take ``block_table [B, MB] i32`` after ``last`` and
block pools [NB, Hkv, BS, D] instead of the caches; ``paged_runner(num_blocks)`` then owns the pools and
steps the model (llmasos/llm/paged.py), and generate / stream refuse.

Requests are checked before any device work, and every request rewrites the cache from position 0, so a
rejected or failed request cannot leave state that changes the next one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ..artifact import ArtifactError
from ..driver import ProgramView
from .config import DECODE, PREFILL, RAGGED, DecoderConfig
from .errors import GenerationError
from .paged import PagedRunner
from .sampling import Sampling, make_generator, sample

N_FIXED_INPUTS = 3          # ids, pos, last; the caches follow
N_FIXED_INPUTS_PAGED = 4    # ids, pos, last, block_table; the pools follow


def _largest(fn, dim) -> int:
    """The largest value a function signature's dim takes: itself when static, else its symbol's bound."""
    return dim if isinstance(dim, int) else int(fn.symbols.get(str(dim), (1, 1))[1])


# Energy of each generation, in its stats: llmasos.energy.instrument() sets this to a factory
# label -> probe (started at the prefill) whose stop(tokens) returns the window's dict (energy imports llm,
# never the reverse). None: generations are not measured.
ENERGY_PROBE: Optional[Callable[[str], Any]] = None


@dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0          # generated tokens summed over rows
    steps: int = 0               # decode steps run
    prefill_s: float = 0.0
    decode_s: float = 0.0
    energy: Optional[dict] = None   # llmasos.energy window of prefill + decode (J, W, J/token, per device)
    _probe: Any = field(default=None, repr=False, compare=False)

    def _energy_start(self, label: str) -> None:
        if ENERGY_PROBE is not None:
            try:
                self._probe = ENERGY_PROBE(label)
            except Exception as e:  # noqa: BLE001 -- a meter failing must not fail the generation; said here
                self.energy = {"error": f"{type(e).__name__}: {e}"}

    def _energy_stop(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            try:
                self.energy = probe.stop(self.new_tokens)
            except Exception as e:  # noqa: BLE001 -- as above
                self.energy = {"error": f"{type(e).__name__}: {e}"}

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second during the decode steps (all rows)."""
        return self.batch * self.steps / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        d = {"batch": self.batch, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
             "decode_steps": self.steps, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
             "decode_tokens_per_s": self.decode_tokens_per_s}
        if self.energy is not None:
            d["energy"] = self.energy
        return d


def _sampling(x) -> Sampling:
    try:
        return Sampling.of(x)
    except (TypeError, ValueError) as e:
        raise GenerationError(str(e)) from None


def _is_id(t) -> bool:
    """A token id: a Python or numpy int, not a bool (nor a float, even a whole one)."""
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


@dataclass
class _Buffers:
    """Device tensors reused across calls for one batch size."""
    caches: list
    ids: Any = None      # [B, 1] int64, decode
    pos: Any = None      # [B] int32
    last: Any = None     # [B] int64


class CompiledLM(ProgramView):
    """A decoder-only LM compiled for prefill and decode with a device-resident KV cache.

    ``generate(prompts, max_new_tokens, sampling=..., stop=..., on_token=...)`` takes token-id lists (or text,
    with a tokenizer) and returns the generated ids (or text); ``stream(prompt, ...)`` yields tokens as they
    are made.
    """

    def __init__(self, program):
        self.program = program
        meta = program.meta
        try:
            self.config = DecoderConfig(**meta["config"]) if meta.get("config") else None
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{meta.get('artifact', 'the program')}: meta.config is not a DecoderConfig: "
                                f"{e}") from None
        self.vocab = int(meta["vocab"])
        self.max_seq = int(meta["max_seq"])
        self.cuda_graph = bool(meta.get("cuda_graph", False))
        executable = program.executable
        sig = executable.signature.functions
        for name in (PREFILL, DECODE):
            if name not in sig:
                raise ValueError(f"a CompiledLM needs '{PREFILL}' and '{DECODE}' functions; the library has "
                                 f"{', '.join(sig)}")
        # kv="paged" (compile_lm): pools of blocks and a block table instead of per-row caches; generation
        # goes through paged_runner(num_blocks) (llmasos/llm/paged.py)
        self.kv = meta.get("kv", "contiguous")
        self.block_size: Optional[int] = int(meta["block_size"]) if self.kv == "paged" else None
        n_fixed = N_FIXED_INPUTS_PAGED if self.kv == "paged" else N_FIXED_INPUTS
        self._cache_types = [i.type for i in sig[DECODE].inputs[n_fixed:]]
        b = sig[DECODE].inputs[0].type.shape[0]
        self.static_batch: Optional[int] = b if isinstance(b, int) else None
        self.max_batch = self.static_batch or _largest(sig[DECODE], b)
        if self.kv == "paged":
            mb = sig[DECODE].inputs[3].type.shape[1]
            if self._cache_types[0].shape[2] != self.block_size or mb * self.block_size < self.max_seq:
                raise ValueError(f"the pools hold blocks of {self._cache_types[0].shape[2]} positions and the block "
                                 f"table {mb} blocks, but block_size is {self.block_size} and max_seq {self.max_seq}")
        else:
            m = self._cache_types[0].shape[2]
            if m != self.max_seq:
                raise ValueError(f"the caches hold {m} positions but max_seq is {self.max_seq}")
        self._prefill = executable.raw(PREFILL)
        self._decode = executable.raw(DECODE)
        # a paged model's ragged step (compile_lm builds it; an artifact saved before it existed has none)
        self._ragged = executable.raw(RAGGED) if self.kv == "paged" and RAGGED in sig else None
        self.max_ragged_tokens = 0
        if self._ragged is not None:
            self.max_ragged_tokens = _largest(sig[RAGGED], sig[RAGGED].inputs[0].type.shape[1])
        self._weights = executable.weights
        self._dev = executable._dev
        self._buffers: dict[int, _Buffers] = {}
        self.last_stats = GenerationStats()

    # -- the program, seen as an LM ----------------------------------------------------------------
    @property
    def graphs(self) -> dict:
        return self.program.graphs

    @property
    def meta(self) -> dict:
        return self.program.meta

    # -- device buffers ----------------------------------------------------------------------------
    def _buffers_for(self, batch: int) -> _Buffers:
        import tvm  # deferred: TVM (`import llmasos` imports this module)
        buf = self._buffers.get(batch)
        if buf is None:
            caches = []
            for t in self._cache_types:
                shape = (batch, *t.shape[1:])
                # zeroed, not empty: masked positions get probability 0, and 0 * NaN garbage would be NaN
                caches.append(tvm.runtime.tensor(np.zeros(shape, t.dtype.numpy), self._dev))
            buf = _Buffers(caches,
                           tvm.runtime.empty((batch, 1), "int64", self._dev),
                           tvm.runtime.empty((batch,), "int32", self._dev),
                           tvm.runtime.tensor(np.zeros(batch, np.int64), self._dev))
            if not self.cuda_graph:
                self._buffers = {}  # one batch size resident at a time: caches can be large
            # (with CUDA graphs every batch size keeps its buffers: its captured graph holds their addresses)
            self._buffers[batch] = buf
        return buf

    def cache_bytes(self, batch: int = 1) -> int:
        """Bytes of the KV cache of ``batch`` rows (kv="paged": of ``batch`` blocks)."""
        return sum(int(np.prod((batch, *t.shape[1:]))) * t.dtype.numpy.itemsize for t in self._cache_types)

    def paged_runner(self, num_blocks: int) -> PagedRunner:
        """A runner over device pools of ``num_blocks`` blocks (kv="paged" only): ``step(ids, pos, last,
        block_table)`` and ``copy_blocks(pairs)``, llmasos/llm/paged.py. ``cache_bytes(num_blocks)`` is the
        device memory the pools take."""
        if self.kv != "paged":
            raise GenerationError("paged_runner needs a model compiled with compile_lm(..., kv='paged'); this one "
                                  f"has a {self.kv} KV cache (use generate)")
        return PagedRunner(self, num_blocks)

    # -- request checks ----------------------------------------------------------------------------
    def _check(self, prompts: list, max_new_tokens: int) -> None:
        if self.kv == "paged":
            raise GenerationError("this model was compiled with kv='paged': generate through lm.paged_runner("
                                  "num_blocks) (llmasos.llm.paged_generate, or a serving engine), or compile with "
                                  "the default kv='contiguous' for generate/stream")
        if not _is_id(max_new_tokens) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not prompts:
            raise GenerationError("no prompts given")
        limit = self.static_batch or self.max_batch
        if len(prompts) > limit:
            raise GenerationError(f"{len(prompts)} prompts, but this model was compiled for batch "
                                  f"{'of exactly ' if self.static_batch else 'up to '}{limit}")
        for r, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"prompt {r} is empty: generation needs at least one token")
            if len(p) + max_new_tokens > self.max_seq:
                raise GenerationError(f"prompt {r} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                                      f"needs {len(p) + max_new_tokens} cache positions, but the model was compiled "
                                      f"with max_seq={self.max_seq}")
            a = np.asarray(p)
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise GenerationError(f"prompt {r} must be a flat list of token ids, got {a.dtype} of shape "
                                      f"{list(a.shape)}")
            if a.min() < 0 or a.max() >= self.vocab:
                bad = int(a[(a < 0) | (a >= self.vocab)][0])
                raise GenerationError(f"prompt {r}: token id {bad} is outside the vocabulary [0, {self.vocab})")

    def _as_ids(self, prompts) -> tuple[list, bool, bool]:
        """(list of id lists, single, text)."""
        text = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                            and all(isinstance(p, str) for p in prompts))
        if text:
            if self.tokenizer is None:
                raise GenerationError("text prompts need a tokenizer (compile_lm(..., tokenizer=...)); "
                                      "or pass token ids")
            single = isinstance(prompts, str)
            items = [prompts] if single else list(prompts)
            return [list(self.tokenizer(p)["input_ids"]) for p in items], single, True
        if hasattr(prompts, "tolist"):
            prompts = prompts.tolist()
        if isinstance(prompts, (list, tuple)) and prompts and all(_is_id(t) for t in prompts):
            return [[int(t) for t in prompts]], True, False
        if isinstance(prompts, (list, tuple)) and prompts:
            rows = [p.tolist() if hasattr(p, "tolist") else p for p in prompts]
            for r, p in enumerate(rows):
                if not isinstance(p, (list, tuple)) or not all(_is_id(t) for t in p):
                    bad = p if not isinstance(p, (list, tuple)) else next(t for t in p if not _is_id(t))
                    raise GenerationError(f"prompt {r}: token ids are ints, got {type(bad).__name__} "
                                          f"{str(bad)[:40]} (a list of ids, a list of such lists, or text)")
            return [[int(t) for t in p] for p in rows], False, False
        if isinstance(prompts, (list, tuple)):
            raise GenerationError("no prompts given")
        raise GenerationError(f"prompts must be token ids (a list, or a list of lists) or text, "
                              f"got {type(prompts).__name__}")

    # -- the two compiled steps --------------------------------------------------------------------
    def prefill(self, prompts: list, buf: _Buffers):
        """Write every prompt into the cache (rows right-padded) and return the logits of its last token."""
        import tvm  # deferred: TVM (`import llmasos` imports this module)
        B = int(buf.caches[0].shape[0])
        lens = [len(p) for p in prompts] + [1] * (B - len(prompts))   # rows past the prompts are padding
        T = max(2, max(lens))          # the prefill function's seq is >= 2: pad a one-token prompt
        ids = np.zeros((B, T), np.int64)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = p
        last = np.array([n - 1 for n in lens], np.int64)
        pos = np.zeros(B, np.int32)
        args = [tvm.runtime.tensor(ids, self._dev), tvm.runtime.tensor(pos, self._dev),
                tvm.runtime.tensor(last, self._dev)]
        out = self._prefill(*args, *buf.caches, *self._weights)
        return out[0], np.array(lens, np.int32)

    def decode_step(self, ids: np.ndarray, pos: np.ndarray, buf: _Buffers):
        """One token per row at cache position pos[b]; returns logits [B, vocab] on the device."""
        buf.ids.copyfrom(ids.reshape(-1, 1).astype(np.int64))
        buf.pos.copyfrom(pos.astype(np.int32))
        return self._decode(buf.ids, buf.pos, buf.last, *buf.caches, *self._weights)[0]

    # -- generation --------------------------------------------------------------------------------
    def stream(self, prompt, max_new_tokens: int = 32, sampling=None, stop: Sequence[int] = (),
               ) -> Iterator[Union[int, str]]:
        """Yield the tokens of one prompt as they are generated (text pieces when the prompt is text)."""
        ids, single, text = self._as_ids(prompt)
        if len(ids) != 1:
            raise GenerationError(f"stream takes one prompt, got {len(ids)}; use generate(..., on_token=...) for "
                                  f"a batch")
        made, shown = [], ""
        for _row, tok in self._run(ids, max_new_tokens, _sampling(sampling), self._stop_ids(stop)):
            if not text:
                yield tok
                continue
            # decode the whole continuation and yield what is new: a character split over two tokens
            # (multi-byte UTF-8) appears once it is complete
            made.append(tok)
            s = self.tokenizer.decode(made, skip_special_tokens=True)
            if s.endswith("\ufffd"):
                continue
            yield s[len(shown):]
            shown = s

    def generate(self, prompts, max_new_tokens: int = 32, sampling=None, stop: Sequence[int] = (),
                 on_token: Optional[Callable[[int, int], None]] = None):
        """Generate up to ``max_new_tokens`` per prompt; a row ends early at a token in ``stop`` (kept in
        the output). ``on_token(row, token_id)`` is called as each token is made, in order.

        prompts: a list of token ids, a list of such lists (a batch; lengths may differ), a string or a list
        of strings (with a tokenizer). Returns the new tokens (a list, or a list per prompt), or text."""
        ids, single, text = self._as_ids(prompts)
        out = [[] for _ in ids]
        stop_ids = self._stop_ids(stop)
        # nothing needs a token before the end: every step stays on the device, no host sync per token
        run = self._run_on_device if not stop_ids and on_token is None else self._run
        for row, tok in run(ids, max_new_tokens, _sampling(sampling), stop_ids):
            out[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
        if text:
            out = [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]
        return out[0] if single else out

    def _stop_ids(self, stop) -> set:
        if stop is None:
            stop = ()
        if isinstance(stop, (int, np.integer, str)):
            stop = [stop]
        ids = set()
        for s in stop:
            if isinstance(s, str):
                if self.tokenizer is None:
                    raise GenerationError(f"stop token {s!r} is text but the model has no tokenizer")
                enc = self.tokenizer.convert_tokens_to_ids(s)
                if enc is None or enc == self.tokenizer.unk_token_id:
                    raise GenerationError(f"stop token {s!r} is not in the tokenizer's vocabulary")
                ids.add(int(enc))
            elif _is_id(s):
                ids.add(int(s))
            else:
                raise GenerationError(f"stop tokens are token ids (ints) or token strings, got {s!r}")
        return ids

    def _start(self, prompts: list, max_new_tokens: int, sampling: Sampling):
        """Checks, buffers and the prefill: (n, B, buf, stats, generator, first tokens on the device, lens)."""
        import torch  # deferred: torch (`import llmasos` imports this module)
        self._check(prompts, max_new_tokens)
        n = len(prompts)
        B = self.static_batch or n
        buf = self._buffers_for(B)
        stats = GenerationStats(batch=n, prompt_tokens=sum(len(p) for p in prompts))
        self.last_stats = stats
        device = self.executable.spec.torch_device
        gen = make_generator(sampling, device)
        stats._energy_start("generate")
        t0 = time.perf_counter()
        logits, lens = self.prefill(prompts, buf)
        tok = sample(torch.from_dlpack(logits), sampling, gen)
        return n, B, buf, stats, gen, tok, lens, t0

    def _run_on_device(self, prompts: list, max_new_tokens: int, sampling: Sampling, stop: set):
        """Every row runs max_new_tokens steps; the chosen ids go straight from the sampler into the decode
        step's id buffer and the positions advance in place, so the host waits only once, at the end."""
        import torch  # deferred: torch (`import llmasos` imports this module)
        n, B, buf, stats, gen, tok, lens, t0 = self._start(prompts, max_new_tokens, sampling)
        ids_dev, pos_dev = torch.from_dlpack(buf.ids), torch.from_dlpack(buf.pos)
        if not self.executable.spec.on_device(tok):
            raise RuntimeError(f"sampled ids on {tok.device}, decode inputs on {ids_dev.device}")
        pos_dev.copy_(torch.from_numpy(lens).to(pos_dev.device))
        self.executable.spec.synchronize()
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        toks = [tok]
        for _ in range(max_new_tokens - 1):
            ids_dev.copy_(tok.view(-1, 1))
            logits = self._decode(buf.ids, buf.pos, buf.last, *buf.caches, *self._weights)[0]
            pos_dev.add_(1)
            tok = sample(torch.from_dlpack(logits), sampling, gen)
            toks.append(tok)
            stats.steps += 1
        host = torch.stack(toks, 1).tolist()
        stats.decode_s = time.perf_counter() - t0
        stats.new_tokens = n * max_new_tokens
        stats._energy_stop()
        for step in range(max_new_tokens):
            for r in range(n):
                yield r, int(host[r][step])

    def _run(self, prompts: list, max_new_tokens: int, sampling: Sampling, stop: set):
        n, B, buf, stats, gen, tok, lens, t0 = self._start(prompts, max_new_tokens, sampling)
        import torch  # deferred: torch (`import llmasos` imports this module)
        host = tok.tolist()
        stats.prefill_s = time.perf_counter() - t0
        done = [False] * B
        for r in range(n, B):
            done[r] = True
        pos = lens.copy()                   # the cache position each row's next token goes to
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            for r in range(n):
                if not done[r]:
                    stats.new_tokens += 1
                    yield r, int(host[r])
                    if host[r] in stop or step == max_new_tokens - 1:
                        done[r] = True
            if all(done):
                break
            logits = self.decode_step(np.array(host, np.int64), pos, buf)
            stats.steps += 1
            pos = pos + 1
            host = sample(torch.from_dlpack(logits), sampling, gen).tolist()
        stats.decode_s = time.perf_counter() - t0
        stats._energy_stop()


    def __repr__(self) -> str:
        b = f"batch={self.static_batch}" if self.static_batch else f"batch<= {self.max_batch}"
        kv = f", kv='paged', block_size={self.block_size}" if self.kv == "paged" else ""
        return (f"CompiledLM(target={self.executable.spec.name!r}, {b}, max_seq={self.max_seq}, "
                f"vocab={self.vocab}, cuda_graph={self.cuda_graph}{kv})")
