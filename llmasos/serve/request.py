"""A serving request: its sampling options, its sequence state in the paged cache, and its text output."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..llm.sampling import Sampling


class RequestError(ValueError):
    """A request the engine refuses: ``status`` is the HTTP status the server answers (400 bad input, 404
    unknown model, 429 overloaded), ``param`` the offending field (OpenAI's error body has both)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


@dataclass(frozen=True)
class SamplingParams:
    """Per-request options. temperature 0 is greedy; ``seed`` makes sampling reproducible; a token in
    ``stop_token_ids`` (or the tokenizer's EOS unless ``ignore_eos``) ends the request (the token counts but
    is not shown as text); a string in ``stop`` ends it with the text cut before the string."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}", param="max_tokens")
        try:
            Sampling(float(self.temperature), self.top_k, float(self.top_p), self.seed)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e).replace("sampling ", ""), param=str(e).split()[1]) from None
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an int in 0..2**63-1, got {self.seed!r}", param="seed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}", param="stop")

    @property
    def sampling(self) -> Sampling:
        return Sampling(float(self.temperature), self.top_k, float(self.top_p), self.seed)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one engine step produced for one request (queued to its consumer)."""
    request_id: str
    index: int                      # the choice index the server gave it
    text: str = ""                  # new text (held back while it could be the start of a stop string)
    token_ids: list = field(default_factory=list)    # new token ids
    finished: bool = False
    finish_reason: Optional[str] = None              # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


_ids = itertools.count()


class TextTracker:
    """Incremental detokenization with stop strings: ``add(ids) -> (new_text, stopped)``.

    Each call decodes a short window of the continuation, not the whole of it (the whole took 5.4 us at 16
    tokens and 46.8 us at 256 with SmolLM2's tokenizer, every token of every running request; a window 8.5 us
    at any length): the tokens
    from ``prefix`` to the end, minus the text of those from ``prefix`` to ``read`` (the last tokens already
    shown), as vLLM's and TGI's detokenizers do -- the window starts a token early so a tokenizer that renders
    a token by its left neighbour (a leading space, a byte sequence split over tokens) sees it. A window that
    ends inside a character (U+FFFD) shows nothing until the character completes. Text that could still become
    a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop: tuple):
        self.tok, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.shown = 0        # characters of self.text already emitted
        self.text = ""        # the continuation's text so far (decoded window by window)
        self.prefix = 0       # ids[prefix:read] were decoded last time, as prefix_text
        self.read = 0
        self.prefix_text = ""

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _extend(self, ids: list, final: bool) -> None:
        """Append the text of ids[read:] to self.text (once it ends on a whole character, or ``final``)."""
        if len(ids) <= self.read:
            return
        window = self._decode(ids[self.prefix:])
        if window.endswith("\ufffd") and not final:
            return
        if window.startswith(self.prefix_text):
            self.text += window[len(self.prefix_text):]
        else:       # the new token changed how its neighbours render: take the difference of the whole text
            whole = self._decode(ids)
            self.text = self.text + whole[len(self.text):] if whole.startswith(self.text) else whole
        self.prefix, self.read = self.read, len(ids)
        self.prefix_text = self._decode(ids[self.prefix:self.read])

    def add(self, ids: list, final: bool = False) -> tuple[str, bool]:
        """The text to show now that the continuation is ``ids`` (the ids of the previous call plus new ones;
        ``final``: the request ends here, so an incomplete character is shown as decoded and nothing is held
        back but a stop string)."""
        if self.tok is None:
            return "", False
        self._extend(ids, final)
        text = self.text
        if self.stop:
            # a stop string can only begin where it could overlap the newly shown part
            start = max(0, self.shown - self.hold)
            cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                new = text[self.shown:cut] if cut > self.shown else ""
                self.shown = max(self.shown, cut)
                self.text = text[:cut]
                return new, True
            safe = len(text)
            for k in range(min(self.hold, len(text)), 0, -1):     # the longest suffix that starts a stop string
                if any(s.startswith(text[-k:]) for s in self.stop):
                    safe = len(text) - k
                    break
        else:
            safe = len(text)
        if final:
            safe = len(text)
        new = text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return new, False


class Request:
    """One sequence: prompt + generated tokens, how many of them have K/V in the cache, its block table."""

    def __init__(self, prompt_ids: list, params: SamplingParams, *, request_id: Optional[str] = None,
                 index: int = 0, sink: Optional[Callable[[RequestOutput], Any]] = None, tokenizer=None,
                 eos_token_id: Optional[int] = None):
        self.seq_no = next(_ids)                      # arrival order: preemption takes the newest first
        self.request_id = request_id or f"req-{self.seq_no}"
        self.index = index
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.output_ids: list = []
        self.params = params
        self.sink = sink
        self.status = Status.WAITING
        self.num_computed = 0                         # tokens whose K/V are in the cache
        self.block_table: list = []
        self.keys: list = []                          # prefix-cache keys of the full blocks of all_ids
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(int(eos_token_id))
        self.text = TextTracker(tokenizer, params.stop)
        self.rng = None                               # numpy Generator of the sampling uniforms (seeded: own)
        self.step_u: Optional[float] = None           # this step's uniform (sampled rows that emit a token)
        self.arrival = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.preemptions = 0
        self.finish_reason: Optional[str] = None

    @property
    def all_ids(self) -> list:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self):
        return (f"Request({self.request_id}, {self.status.value}, prompt {len(self.prompt_ids)}, out "
                f"{len(self.output_ids)}, computed {self.num_computed}, blocks {self.block_table})")
