"""The serving engine: requests in, a paged runner stepping them together, tokens out.

``Engine`` is synchronous (``add`` / ``abort`` / ``step``; ``generate`` runs a list of prompts to the end)
and owns the block manager and the scheduler. ``EngineLoop`` runs an Engine in a background thread: the
server's event loop submits requests and cancellations through thread-safe queues and receives each
request's outputs through the ``sink`` it passed (e.g. ``loop.call_soon_threadsafe(queue.put_nowait, out)``).

The runner (llmasos/llm: ``CompiledLM.paged_runner(num_blocks)`` or the pure-torch ``TorchPagedRunner``)
has ``vocab, max_seq, block_size, num_blocks, max_blocks_per_seq``, ``step(ids [B, T] i32, pos [B] i32,
last [B] i32, block_table [B, MB] i32) -> logits [B, vocab] f32`` and ``copy_blocks([(src, dst)])``.
A step that computes only one token a row (decodes) is one ``step`` call with T = 1. A step with prompt
chunks is one ``ragged_sample_step`` / ``ragged_step`` call where the runner has them (``runner.ragged``: the
decode rows and the chunks packed, unpadded, in one pass over the weights); otherwise two calls: the decode
rows, then the chunks right-padded to the longest (a padded position lands in an unallocated (-1) entry,
where nothing is written, or in the row's own not-yet-computed blocks, which later steps overwrite).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import numpy as np

from ..llm.sampling import sample_rows
from .blocks import UNALLOCATED, BlockManager
from .request import Request, RequestError, RequestOutput, SamplingParams, Status
from .scheduler import Scheduler, cdiv


class Observer:
    """Engine events (the server's Prometheus metrics implement these); every method is optional."""

    def admitted(self, req: Request) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, req: Request) -> None: ...
    def preempted(self, req: Request) -> None: ...


class Engine:
    def __init__(self, runner, tokenizer=None, *, max_batch: Optional[int] = None, prefill_chunk: int = 256,
                 prefill_budget: Optional[int] = None, prefix_sharing: bool = True,
                 eos_token_id: Optional[int] = None, observer: Optional[Observer] = None,
                 ragged: Optional[bool] = None):
        for attr in ("vocab", "max_seq", "block_size", "num_blocks", "max_blocks_per_seq", "step", "copy_blocks"):
            if not hasattr(runner, attr):
                raise TypeError(f"Engine: the runner {type(runner).__name__} has no {attr!r} (a paged runner "
                                f"from CompiledLM.paged_runner(num_blocks) or TorchPagedRunner)")
        if getattr(runner, "static_batch", None):
            raise ValueError(f"Engine: the runner was compiled for a fixed batch of {runner.static_batch}; continuous "
                             f"batching needs a dynamic batch (compile_lm without batch=, with max_batch=N)")
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocab, self.max_seq, self.block_size = int(runner.vocab), int(runner.max_seq), int(runner.block_size)
        self.max_blocks_per_seq = int(runner.max_blocks_per_seq)
        compiled_batch = getattr(runner, "max_batch", None)
        if max_batch is None:
            max_batch = compiled_batch or 8
        elif compiled_batch is not None and max_batch > compiled_batch:
            raise ValueError(f"max_batch {max_batch} exceeds the runner's compiled maximum batch {compiled_batch}")
        self.max_batch = int(max_batch)
        # steps with prompt chunks as one unpadded call (None: wherever the runner can)
        can = bool(getattr(runner, "ragged", False))
        if ragged and not can:
            raise ValueError(f"Engine: ragged=True, but the runner {type(runner).__name__} takes no ragged steps "
                             f"(a paged model compiled before they existed, or a runner without ragged_step)")
        self.ragged = can if ragged is None else bool(ragged)
        self.blocks = BlockManager(int(runner.num_blocks), self.block_size, prefix_sharing)
        self.scheduler = Scheduler(self.blocks, max_batch=self.max_batch, prefill_chunk=prefill_chunk,
                                   prefill_budget=prefill_budget)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos_token_id
        self.observer = observer or Observer()
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng()     # the uniforms of unseeded sampled requests
        self.steps = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0

    # -- requests -------------------------------------------------------------------------------------
    def check(self, prompt_ids, params: SamplingParams) -> list:
        """The prompt as a list of ints, or RequestError (400) saying what is wrong. Pure: any thread."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_ids)
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed", param="prompt")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab:
                raise RequestError(f"prompt token id {t!r} is outside the vocabulary [0, {self.vocab})",
                                   param="prompt")
        for t in params.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab:
                raise RequestError(f"stop token id {t!r} is outside the vocabulary [0, {self.vocab})",
                                   param="stop_token_ids")
        n = len(ids)
        if n >= self.max_seq:
            raise RequestError(f"the prompt has {n} tokens; this model serves at most {self.max_seq} positions "
                               f"(prompt + max_tokens), so a prompt may have at most {self.max_seq - 1}",
                               param="prompt", code="context_length_exceeded")
        if n + params.max_tokens > self.max_seq:
            raise RequestError(f"max_tokens {params.max_tokens} with a prompt of {n} tokens needs {n + params.max_tokens} "
                               f"positions; this model serves at most {self.max_seq} (max_tokens <= "
                               f"{self.max_seq - n} here)", param="max_tokens", code="context_length_exceeded")
        if cdiv(n + params.max_tokens, self.block_size) > self.blocks.capacity:
            raise RequestError(f"prompt + max_tokens = {n + params.max_tokens} tokens need "
                               f"{cdiv(n + params.max_tokens, self.block_size)} KV blocks of {self.block_size}; the "
                               f"cache has {self.blocks.capacity}", param="max_tokens")
        return [int(t) for t in ids]

    def make_request(self, prompt_ids, params: SamplingParams, **kw) -> Request:
        ids = self.check(prompt_ids, params)
        return Request(ids, params, tokenizer=self.tokenizer, eos_token_id=self.eos_token_id, **kw)

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req
        self.prompt_tokens_total += len(req.prompt_ids)
        self.scheduler.add(req)
        self.observer.admitted(req)

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks are free when this returns. False if it is unknown or finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> list:
        """Schedule, run the runner once or twice, sample; returns the outputs (also sent to each sink)."""
        plan = self.scheduler.schedule()
        for req in plan.preempted:
            self.observer.preempted(req)
        if plan.empty:
            return []
        self._copy(plan.copies)
        outs = []
        for req, n in plan.rows:        # each sampling row's uniform, drawn once (a retried call reuses it)
            req.step_u = None
            if req.params.temperature > 0 and req.num_computed + n == req.num_tokens:
                if req.rng is None:
                    req.rng = np.random.default_rng(req.params.seed) if req.params.seed is not None else self._rng
                req.step_u = float(req.rng.random())
        decode = [(r, n) for r, n in plan.rows if n == 1]
        prefill = [(r, n) for r, n in plan.rows if n > 1]
        calls = [plan.rows] if self.ragged and prefill else (decode, prefill)
        for rows in calls:
            if not rows:
                continue
            for (req, n), tok in self._run_isolated(rows, outs):
                if req.finished:
                    continue
                self.scheduler.computed(req, n)
                if req.num_computed == req.num_tokens:
                    try:
                        outs.append(self._emit(req, int(tok)))
                    except Exception as e:  # noqa: BLE001  one request's failure stays its own
                        outs.append(self._finish(req, "error", error=f"{type(e).__name__}: {e}"))
        self.steps += 1
        return [o for o in outs if o is not None]

    def _copy(self, copies: list) -> None:
        """Copy-on-write copies, in plan order: a batch of pairs goes to the runner at once until a pair reads
        or writes a block an earlier pair of the batch wrote or read (then the batch is flushed first)."""
        batch, touched = [], set()
        for s, d in copies:
            if s in touched or d in touched:
                self.runner.copy_blocks(batch)
                batch, touched = [], set()
            batch.append((s, d))
            touched |= {s, d}
        if batch:
            self.runner.copy_blocks(batch)

    def _run_isolated(self, rows: list, outs: list):
        """(row, token) pairs of one runner call; when the call fails, each row is run alone, so only the
        rows that fail alone end with an error and every other row's tokens are what they would have been
        (a row's K/V writes are to its own not-yet-computed positions, which the retry writes again)."""
        try:
            return list(zip(rows, self._run(rows)))
        except Exception as e:  # noqa: BLE001  a runner failure stays with the request(s) that cause it
            if len(rows) == 1:
                outs.append(self._finish(rows[0][0], "error", error=f"{type(e).__name__}: {e}"))
                return []
        good = []
        for r in rows:
            good += self._run_isolated([r], outs)
        return good

    def _run(self, rows: list) -> list:
        """The next token of each row (a row that has not reached its newest token gets one too, unused).
        With a runner that samples on its device (``sample_step``) only the B token ids leave the device;
        a runner with ``step`` alone sends the logits to the host, sampled here the same way
        (``sampling.sample_rows`` with the same uniforms; greedy: numpy's argmax)."""
        B, T = len(rows), max(n for _, n in rows)
        ragged = self.ragged and T > 1
        ids = np.zeros((B, T), np.int32)
        flat = []
        pos = np.zeros(B, np.int32)
        last = np.zeros(B, np.int32)
        table = np.full((B, self.max_blocks_per_seq), UNALLOCATED, np.int32)
        temp = np.zeros(B, np.float32)
        top_k = np.zeros(B, np.float32)
        top_p = np.ones(B, np.float32)
        u = np.zeros(B, np.float32)
        for b, (req, n) in enumerate(rows):
            s = req.num_computed
            if n == 1 and req.output_ids and s == req.num_tokens - 1:   # a decode row: its newest token
                ids[b, 0] = req.output_ids[-1]                            # (no copy of the whole sequence)
            else:
                ids[b, :n] = req.all_ids[s:s + n]
            if ragged:
                flat.append(ids[b, :n])
            pos[b], last[b] = s, n - 1
            table[b, :len(req.block_table)] = req.block_table
            if req.step_u is not None:
                p = req.params
                temp[b], top_k[b], top_p[b], u[b] = p.temperature, p.top_k, p.top_p, req.step_u
        sampled = bool((temp > 0).any())
        opts = (temp, top_k, top_p, u) if sampled else ()
        # a ragged call: the rows' tokens packed (ids [N], lens [B]) instead of padded to [B, T]
        args = (np.concatenate(flat), last + 1, pos, table) if ragged else (ids, pos, last, table)
        name = ("ragged_" if ragged else "") + "sample_step"
        if hasattr(self.runner, name):
            toks = np.asarray(getattr(self.runner, name)(*args, *opts))
            if toks.shape != (B,):
                raise RuntimeError(f"runner.{name} returned ids of shape {list(toks.shape)}, expected [{B}]")
            return toks.tolist()
        logits = np.asarray(getattr(self.runner, "ragged_step" if ragged else "step")(*args))
        if logits.shape != (B, self.vocab):
            raise RuntimeError(f"runner.step returned logits of shape {list(logits.shape)}, expected [{B}, {self.vocab}]")
        if not sampled:                 # greedy: numpy only
            return np.argmax(logits, axis=-1).tolist()
        import torch  # deferred: torch (sampled requests only; greedy stays in numpy)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
        return sample_rows(t(logits), t(temp), t(top_k), t(top_p), t(u),
                           rows=np.flatnonzero(temp > 0).tolist()).tolist()

    def _emit(self, req: Request, tok: int) -> Optional[RequestOutput]:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
            self.observer.first_token(now - req.arrival)
        else:
            self.observer.inter_token(now - req.last_token_time)
        req.last_token_time = now
        req.output_ids.append(tok)
        self.generated_tokens_total += 1
        reason = None
        if tok in req.stop_ids:
            reason = "stop"             # the stop token counts, its text is not shown
            text, stopped = req.text.add(req.output_ids[:-1], final=True)
        else:
            if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_seq:
                reason = "length"
            text, stopped = req.text.add(req.output_ids, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is not None:
            return self._finish(req, reason, text=text, new=[tok])
        out = RequestOutput(req.request_id, req.index, text, [tok], prompt_tokens=len(req.prompt_ids),
                            completion_tokens=len(req.output_ids))
        self._send(req, out)
        return out

    def _finish(self, req: Request, reason: str, *, text: str = "", new=(), error: Optional[str] = None):
        if req.finished:
            return None
        self.scheduler.free(req)
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        out = RequestOutput(req.request_id, req.index, text, list(new), finished=True, finish_reason=reason,
                            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids), error=error)
        self._send(req, out)            # first: a failing observer must not keep the request's end from its consumer
        self.observer.finished(req)
        return out

    @staticmethod
    def _send(req: Request, out: RequestOutput) -> None:
        if req.sink is not None:
            try:
                req.sink(out)
            except Exception:  # noqa: BLE001  a consumer gone (closed event loop) must not stop the engine
                req.sink = None

    # -- convenience ----------------------------------------------------------------------------------
    def generate(self, prompts: list, params=None, max_steps: int = 1_000_000) -> list:
        """Run prompts (lists of token ids) to completion; the generated ids per prompt, in order. ``params``:
        one SamplingParams or one per prompt."""
        if not isinstance(params, (list, tuple)):
            params = [params or SamplingParams()] * len(prompts)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs:
            self.add(r)
        for _ in range(max_steps):
            if all(r.finished for r in reqs):
                break
            self.step()
        else:
            raise RuntimeError(f"generate: not finished after {max_steps} steps")
        bad = [r for r in reqs if r.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"generate: request {bad[0].request_id} failed")
        return [r.output_ids for r in reqs]


class EngineLoop:
    """An Engine stepping in a background thread. ``submit`` / ``abort`` from any thread; outputs go to each
    request's sink from the engine thread."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05, controller=None):
        self.engine = engine
        self.idle_wait = idle_wait
        # an llmasos.serve.control.ServeController (or anything with tick()): run between steps, in this thread
        self.controller = controller
        self._adds: deque = deque()
        self._aborts: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self._dead = False

    def start(self) -> "EngineLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmasos-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """True while the engine thread serves requests (False before start, after stop or its death)."""
        return not self._dead and self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running (submitted or queued in the scheduler)."""
        return len(self._adds) + self.engine.num_waiting

    def submit(self, prompt_ids, params: SamplingParams, sink: Callable[[RequestOutput], Any], *,
               request_id: Optional[str] = None, index: int = 0) -> Request:
        """Check the request here (RequestError at once) and queue it for the engine thread."""
        return self.add(self.engine.make_request(prompt_ids, params, request_id=request_id, index=index, sink=sink))

    def add(self, req: Request) -> Request:
        """Queue a request made (and so checked) by ``engine.make_request``. Once the engine thread has ended,
        the request is failed (finish_reason "error") at once instead of waiting forever."""
        self._adds.append(req)
        self._wake.set()
        if self._dead:
            self._fail_adds("the engine is not running")
        return req

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def _run(self) -> None:
        died: Optional[BaseException] = None
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001  recorded; every request still in flight is failed below
            self.error = died = e
        finally:
            # the thread ends (stop, or an exception from abort / an observer / _finish): from here on no
            # request is served, so none may wait forever: each one queued or running gets finish_reason="error"
            self._dead = True
            why = "the engine stopped" if died is None else \
                f"the engine thread died: {type(died).__name__}: {died}"
            self._fail_adds(why)
            eng = self.engine
            for req in list(eng.scheduler.running) + list(eng.scheduler.waiting) + list(eng.requests.values()):
                try:
                    eng._finish(req, "error", error=why)
                except Exception:  # noqa: BLE001  the engine's own state is broken: tell the consumer directly
                    if not req.finished:
                        req.finish_reason, req.status = "error", Status.FINISHED
                        Engine._send(req, RequestOutput(req.request_id, req.index, finished=True,
                                                        finish_reason="error", error=why))

    def _fail_adds(self, why: str) -> None:
        """Fail the submitted requests the engine never took (the engine thread is gone); any thread."""
        while True:
            try:
                req = self._adds.popleft()
            except IndexError:
                return
            req.finish_reason, req.status = "error", Status.FINISHED
            Engine._send(req, RequestOutput(req.request_id, req.index, finished=True, finish_reason="error",
                                            error=why))

    def _serve(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            while self._adds:
                req = self._adds.popleft()
                try:
                    eng.add(req)
                except RequestError as e:
                    Engine._send(req, RequestOutput(req.request_id, req.index, finished=True,
                                                    finish_reason="error", error=e.message))
            while self._aborts:
                eng.abort(self._aborts.popleft())
            if self.controller is not None:
                try:
                    self.controller.tick()
                except Exception as e:  # noqa: BLE001  a failing controller stops controlling, never serving
                    self.error, self.controller = e, None
            if not eng.has_work:
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            try:
                eng.step()
            except Exception as e:  # noqa: BLE001  a bug in planning: fail what runs, keep the loop alive
                self.error = e
                for req in list(eng.scheduler.running) + list(eng.scheduler.waiting):
                    eng._finish(req, "error", error=f"{type(e).__name__}: {e}")
