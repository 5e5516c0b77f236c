"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``EngineLoop``.

    POST /v1/completions        prompt: text, token ids, or a list of either; stream: true -> SSE chunks
    POST /v1/chat/completions   messages through the tokenizer's chat template; stream: true -> SSE chunks
    GET  /v1/models             the one model served
    GET  /health                200 while the engine thread runs (503 otherwise)
    GET  /metrics               Prometheus text (llmasos/serve/metrics.py)

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: bad input 400 (malformed JSON,
unknown fields, a field of the wrong type, an out-of-range value, a prompt or ``max_tokens`` past the model's
positions, token ids outside the vocabulary, an unsupported option), 401 (``api_key`` set and the request
lacks ``Authorization: Bearer <key>``; /health and /metrics stay open), 404 (unknown model or route), 429
with ``Retry-After`` (more than ``max_waiting`` requests waiting; a request of more than ``max_waiting`` choices,
``len(prompts) * n``, can never fit and is a 400), 503 (the engine thread is not running; requests in flight
when it dies end with an error instead of waiting forever). A request is checked completely before it
reaches the engine, so a bad one never touches the running batch. A client that disconnects (stream or not)
has its requests cancelled, which frees their KV blocks at once: a streaming response notices when a write
fails, a non-streaming one polls the connection every ``DISCONNECT_POLL`` seconds while tokens flow.

``Server(engine, ...)`` runs it: ``.run()`` blocks (the CLI), ``with Server(...).start() as s: s.url`` runs
uvicorn in a thread on an ephemeral port (tests, bench/serve.py) and always stops it on exit.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import re
import socket
import threading
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineLoop, Observer
from .metrics import Metrics
from .request import RequestError, RequestOutput, SamplingParams

DEFAULT_MAX_WAITING = 256
DISCONNECT_POLL = 0.25       # seconds between checks of a waiting handler: client gone? engine thread alive?


# ---------------------------------------------------------------------------------------------------------
# request bodies: strict (no "5" for 5), unknown fields refused (a typo'd option is never silently ignored)
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: Optional[str] = None
    temperature: Optional[float] = None          # OpenAI's default: 1.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None                  # extension (vLLM's): 0 or -1 = no limit
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None   # extension (vLLM's)
    ignore_eos: bool = False                     # extension (vLLM's)
    return_token_ids: bool = False               # extension: each choice / chunk also has "token_ids"
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    user: Optional[str] = None
    # accepted only at their neutral value (said so in the 400 otherwise)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None


class CompletionBody(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None             # default: every position the model has left
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None


MAX_N = 16


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_TAG = re.compile(r"^[a-z-]+\[.*\]$")


def _validation_message(e: ValidationError) -> tuple[str, Optional[str]]:
    err = e.errors()[0]
    # drop pydantic's union-member tags ("str", "list[int]", "function-after[...]") from the field path
    loc = ".".join(str(x) for x in err["loc"]
                   if str(x) not in ("str", "int", "float", "bool") and not _TAG.match(str(x)))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown field {loc!r}", loc
    if kind == "missing":
        return f"field {loc!r} is required", loc
    given = err.get("input")
    shown = json.dumps(given)[:80] if isinstance(given, (str, int, float, bool, list, dict, type(None))) else "?"
    return f"field {loc!r}: {err['msg'].lower()} (got {shown})", loc


# ---------------------------------------------------------------------------------------------------------
class _Dispatcher:
    """Engine thread -> event loop: outputs are queued here and handed over by one ``call_soon_threadsafe``
    per burst (an engine step's outputs), not one wake-up of the event loop per token per request."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self.aio = None

    def push(self, queue: asyncio.Queue, out: RequestOutput) -> None:      # engine thread
        self._items.append((queue, out))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.aio.call_soon_threadsafe(self._drain)

    @property
    def pending(self) -> bool:
        """Outputs handed over by the engine thread and not yet in their queues."""
        return bool(self._items)

    def _drain(self) -> None:                                                # event loop
        with self._lock:
            self._scheduled = False
        while self._items:
            q, out = self._items.popleft()
            q.put_nowait(out)


class _App:
    """The routes' state: the engine loop, tokenizer, names and limits."""

    def __init__(self, loop: EngineLoop, metrics: Metrics, tokenizer, model_name: str, api_key: Optional[str],
                 max_waiting: int):
        self.loop, self.metrics, self.tok = loop, metrics, tokenizer
        self.model_name, self.api_key, self.max_waiting = model_name, api_key, max_waiting
        self.engine: Engine = loop.engine
        self.dispatch = _Dispatcher()

    # -- checks -----------------------------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                            param="model", code="model_not_found")

    @staticmethod
    def unsupported(body, **neutral) -> None:
        for name, ok in neutral.items():
            v = getattr(body, name)
            if v is not None and v != ok and not (ok == 0 and not v):
                raise HTTPError(400, f"{name}={v!r} is not supported by this server (leave it out)", param=name)

    def params(self, body, max_tokens: Optional[int], prompt_len: int) -> SamplingParams:
        if body.n < 1 or body.n > MAX_N:
            raise HTTPError(400, f"n must be in 1..{MAX_N}, got {body.n}", param="n")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 16:
            raise HTTPError(400, f"at most 16 stop strings, got {len(stop)}", param="stop")
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_seq - prompt_len)
        top_k = body.top_k
        if top_k is not None and top_k < -1:
            raise HTTPError(400, f"top_k must be -1 or 0 (no limit) or a positive int, got {top_k}", param="top_k")
        try:
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_k=max(0, top_k or 0), top_p=1.0 if body.top_p is None else body.top_p,
                                  seed=body.seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                                  ignore_eos=body.ignore_eos)
        except RequestError as e:
            raise HTTPError(e.status, e.message, param=e.param, code=e.code) from None

    def tokenize(self, text: str, param: str) -> list:
        if self.tok is None:
            raise HTTPError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, body: ChatBody) -> list:
        if self.tok is None:
            raise HTTPError(400, "this model has no tokenizer, so no chat template: use /v1/completions with "
                                 "token ids", param="messages")
        if not getattr(self.tok, "chat_template", None):
            raise HTTPError(400, "this model's tokenizer has no chat template: use /v1/completions",
                            param="messages")
        msgs = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            msgs.append({"role": m.role, "content": content or ""})
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  a template's own error (e.g. roles out of order) is bad input
            raise HTTPError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return self.tokenize(text, "messages")

    # -- running ----------------------------------------------------------------------------------------
    def submit(self, prompts: list, params: SamplingParams, n: int, prefix: str):
        """Queue n choices per prompt; (queue of RequestOutput, request ids). Refuses 429 when full, 400 when
        the engine says the request cannot run (then nothing stays queued), 503 when the engine is not running."""
        if not self.loop.alive:
            raise HTTPError(503, "the engine is not running", code="engine_dead")
        if len(prompts) * n > self.max_waiting:
            raise HTTPError(400, f"this request asks for {len(prompts) * n} completions ({len(prompts)} prompt(s) "
                                 f"x n={n}); this server queues at most {self.max_waiting} at once, so it can never "
                                 f"run: send fewer prompts or a smaller n", param="n" if n > 1 else "prompt")
        if self.loop.num_waiting + len(prompts) * n > self.max_waiting:
            raise HTTPError(429, f"the server has {self.loop.num_waiting} requests waiting (at most "
                                 f"{self.max_waiting}); retry later", code="server_busy", headers={"Retry-After": "1"})
        if self.dispatch.aio is None:
            self.dispatch.aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out: RequestOutput, _push=self.dispatch.push):
            _push(queue, out)

        base = f"{prefix}-{uuid.uuid4().hex[:16]}"
        checked = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    sp = params if params.seed is None or n == 1 else dataclasses.replace(params, seed=params.seed + j)
                    checked.append(self.engine.make_request(ids, sp, request_id=f"{base}-{i * n + j}",
                                                            index=i * n + j, sink=sink))
        except RequestError as e:
            raise HTTPError(e.status, e.message, param=e.param, code=e.code) from None
        for req in checked:
            self.loop.add(req)
        return queue, [r.request_id for r in checked], base

    def abort(self, ids) -> None:
        for rid in ids:
            self.loop.abort(rid)

    async def next_output(self, queue: asyncio.Queue, deadline: list) -> Optional[RequestOutput]:
        """The next output of a request, or None when it is time to poll (``deadline[0]``, a monotonic time,
        passed: it is moved on). Waiting is bounded even while outputs flow, so the caller checks the client
        connection and the engine thread every DISCONNECT_POLL seconds, not only when no token comes."""
        left = deadline[0] - time.monotonic()
        if left > 0:
            try:
                return await asyncio.wait_for(queue.get(), left)
            except asyncio.TimeoutError:
                pass
        deadline[0] = time.monotonic() + DISCONNECT_POLL
        return None

    def engine_dead(self, queue: asyncio.Queue) -> bool:
        """The engine thread is gone and nothing it sent is left: no more output will come."""
        return not self.loop.alive and queue.empty() and not self.dispatch.pending


class _Tee(Observer):
    """Engine events to two observers (the server's metrics and one the engine already had)."""

    def __init__(self, *obs):
        self.obs = obs

    def admitted(self, req) -> None:
        for o in self.obs:
            o.admitted(req)

    def first_token(self, seconds: float) -> None:
        for o in self.obs:
            o.first_token(seconds)

    def inter_token(self, seconds: float) -> None:
        for o in self.obs:
            o.inter_token(seconds)

    def finished(self, req) -> None:
        for o in self.obs:
            o.finished(req)

    def preempted(self, req) -> None:
        for o in self.obs:
            o.preempted(req)


class _Auth:
    """``Authorization: Bearer <api_key>`` on /v1/ routes. A plain ASGI middleware, not ``@app.middleware``
    (BaseHTTPMiddleware): that one wraps ``receive`` so ``request.is_disconnected()`` never sees the client go."""

    def __init__(self, app, *, st: "_App", metrics: Metrics):
        self.app, self.st, self.metrics = app, st, metrics

    async def __call__(self, scope, receive, send):
        key = self.st.api_key
        if key is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if got != f"Bearer {key}":
                self.metrics.rejected.labels("401").inc()
                resp = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(loop: EngineLoop, *, tokenizer=None, model_name: str = "model", api_key: Optional[str] = None,
              max_waiting: int = DEFAULT_MAX_WAITING, metrics: Optional[Metrics] = None) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) EngineLoop."""
    if not isinstance(max_waiting, int) or max_waiting < 1:
        raise ValueError(f"max_waiting must be an int >= 1, got {max_waiting!r}")
    metrics = metrics or Metrics(model_name)
    metrics.bind(loop)
    eng = loop.engine            # the engine's events feed the counters and histograms of /metrics
    if eng.observer is not metrics and not (isinstance(eng.observer, _Tee) and metrics in eng.observer.obs):
        eng.observer = metrics if type(eng.observer) is Observer else _Tee(eng.observer, metrics)
    st = _App(loop, metrics, tokenizer, model_name, api_key, max_waiting)
    app = FastAPI(title="llmasos serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmasos = st

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        metrics.rejected.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, e):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, msg, code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request, e):      # a bug: say so as a 500 with a body; the server keeps serving
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    app.add_middleware(_Auth, st=st, metrics=metrics)

    async def parse(request: HTTPRequest, cls):
        raw = await request.body()
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise HTTPError(400, msg, param=param) from None

    @app.get("/health")
    async def health():
        if not loop.alive:
            return error_response(503, "the engine thread is not running", code="engine_dead")
        return {"status": "ok", "running": st.engine.num_running, "waiting": loop.num_waiting}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(st_created),
                                            "owned_by": "llmasos", "max_model_len": st.engine.max_seq}]}

    st_created = time.time()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        st.check_model(body.model)
        st.unsupported(body, echo=False, logprobs=0, best_of=1, suffix="", presence_penalty=0.0,
                       frequency_penalty=0.0, logit_bias={})
        p = body.prompt
        if isinstance(p, str):
            prompts = [st.tokenize(p, "prompt")]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [st.tokenize(x, "prompt") for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            prompts = [list(p)]
        if not prompts:
            raise HTTPError(400, "the prompt list is empty", param="prompt")
        params = st.params(body, body.max_tokens, max(len(x) for x in prompts))
        return await run(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatBody)
        st.check_model(body.model)
        st.unsupported(body, logprobs=False, top_logprobs=0, presence_penalty=0.0, frequency_penalty=0.0,
                       logit_bias={}, tools=[], tool_choice="none")
        if body.response_format not in (None, {"type": "text"}):
            raise HTTPError(400, f"response_format={body.response_format!r} is not supported (only text)",
                            param="response_format")
        ids = st.chat_prompt(body)
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = st.params(body, mt, len(ids))
        return await run(request, body, [ids], params, chat=True)

    async def run(request: HTTPRequest, body, prompts, params, *, chat: bool):
        queue, rids, base = st.submit(prompts, params, body.n, "chatcmpl" if chat else "cmpl")
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(queue, rids, base, created, chat, include_usage, prompt_tokens,
                                            body.return_token_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = {i: [] for i in range(len(rids))}
        toks = {i: [] for i in range(len(rids))}
        done: dict = {}
        poll = [time.monotonic() + DISCONNECT_POLL]
        try:
            while len(done) < len(rids):
                out = await st.next_output(queue, poll)
                if out is None:           # every DISCONNECT_POLL s, tokens flowing or not
                    if await request.is_disconnected():
                        st.abort(rids)
                        return Response(status_code=499)
                    if st.engine_dead(queue):
                        raise HTTPError(503, "the engine stopped before this request finished",
                                        code="engine_dead")
                    continue
                texts[out.index].append(out.text)
                toks[out.index] += out.token_ids
                if out.finished:
                    done[out.index] = out
        except BaseException:
            st.abort(rids)        # cancelled (client gone, server stopping): free the blocks now
            raise
        errors = [o for o in done.values() if o.finish_reason == "error"]
        if errors:
            raise HTTPError(500, f"the engine failed on this request: {errors[0].error}", code="engine_error")
        choices = []
        for i in range(len(rids)):
            text = "".join(texts[i])
            c = {"index": i, "logprobs": None, "finish_reason": done[i].finish_reason}
            if chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            if body.return_token_ids:
                c["token_ids"] = toks[i]
            choices.append(c)
        return {"id": base, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": usage(prompt_tokens, done.values())}

    def usage(prompt_tokens: int, outs) -> dict:
        completion = sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def stream(queue, rids, base, created, chat, include_usage, prompt_tokens, with_ids):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text=None, finish=None, role=False, ids=()):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            if with_ids and not role:
                c["token_ids"] = list(ids)
            d = {"id": base, "object": obj, "created": created, "model": model_name, "choices": [c]}
            if include_usage:
                d["usage"] = None
            return f"data: {json.dumps(d)}\n\n"

        finished: dict = {}
        poll = [time.monotonic() + DISCONNECT_POLL]
        try:
            if chat:
                for i in range(len(rids)):
                    yield chunk(i, role=True)
            while len(finished) < len(rids):
                out = await st.next_output(queue, poll)
                if out is None:
                    if st.engine_dead(queue):
                        err = {"error": {"message": "the engine stopped before this request finished",
                                         "type": "server_error", "param": None, "code": "engine_dead"}}
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    continue
                if out.finished:
                    finished[out.index] = out
                    if out.finish_reason == "error":
                        err = {"error": {"message": f"the engine failed on this request: {out.error}",
                                         "type": "server_error", "param": None, "code": "engine_error"}}
                        yield f"data: {json.dumps(err)}\n\n"
                        continue
                    if out.text or (with_ids and out.token_ids):
                        yield chunk(out.index, out.text, ids=out.token_ids)
                    yield chunk(out.index, None if chat else "", finish=out.finish_reason)
                elif out.text or (with_ids and out.token_ids):     # text held back: ids only when asked
                    yield chunk(out.index, out.text, ids=out.token_ids)
            if include_usage:
                d = {"id": base, "object": obj, "created": created, "model": model_name, "choices": [],
                     "usage": usage(prompt_tokens, finished.values())}
                yield f"data: {json.dumps(d)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if len(finished) < len(rids):   # the client went away (or the server stops): free its blocks now
                st.abort([r for i, r in enumerate(rids) if i not in finished])

    return app


# ---------------------------------------------------------------------------------------------------------
class Server:
    """An engine, its background thread and the HTTP app. ``run()`` serves until interrupted (the CLI);
    ``start()`` serves from a thread and returns at once (``url``; ``stop()`` or use it as a context manager)."""

    def __init__(self, engine: Engine, *, tokenizer=None, model_name: str = "model", host: str = "127.0.0.1",
                 port: int = 8000, api_key: Optional[str] = None, max_waiting: int = DEFAULT_MAX_WAITING,
                 log_level: str = "warning", energy_meters=None, idle_watts: Optional[dict] = None,
                 controller=None):
        """``energy_meters`` (llmasos.energy meters, e.g. ``llmasos.energy.meters.discover().meters``) and their
        ``idle_watts`` ({name: W}, measured before loading: ``llmasos.energy.calibrate_idle``) put the energy
        since the start on /metrics (Metrics). ``controller``: a ServeController (llmasos/serve/control.py)
        setting the engine's admission limit from the load, every interval."""
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535 (0: any free port), got {port!r}")
        self.engine = engine
        self.loop = EngineLoop(engine, controller=controller)
        # build_app makes it the engine's observer
        self.metrics = Metrics(model_name, meters=energy_meters, idle_watts=idle_watts)
        self.app = build_app(self.loop, tokenizer=tokenizer if tokenizer is not None else engine.tokenizer,
                             model_name=model_name, api_key=api_key, max_waiting=max_waiting, metrics=self.metrics)
        self.host, self.port, self.log_level = host, port, log_level
        self._uv = None
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _config(self):
        import uvicorn  # deferred: uvicorn (the serve extra) only when serving
        return uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, timeout_graceful_shutdown=3,
                                             lifespan="off", access_log=self.log_level in ("info", "debug")))

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        return sock

    def run(self, ready=None) -> None:
        """Serve in this thread until Ctrl-C (uvicorn handles the signals), then stop the engine. ``ready(url)``
        is called once the port is bound (port 0: the one the system chose)."""
        sock = self._bind()
        self.loop.start()
        if ready is not None:
            ready(self.url)
        try:
            self._uv = self._config()
            self._uv.run(sockets=[sock])
        finally:
            self.loop.stop()
            sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._sock = self._bind()
        self.loop.start()
        self._uv = self._config()
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]},
                                        name="llmasos-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._uv is not None:
            self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.loop.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Server":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
