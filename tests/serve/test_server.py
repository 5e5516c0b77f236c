"""The HTTP server, driven by the official ``openai`` client and httpx, over the toy paged runner with
SmolLM2's real tokenizer (49152 ids, its chat template): every answer is checked token for token against
``reference`` (greedy generation by plain recomputation). Servers bind 127.0.0.1 on an ephemeral port and are
always stopped."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from llmasos.serve import Engine
from llmasos.serve.server import Server

from .fake_runner import FakeRunner, reference

openai = pytest.importorskip("openai")

VOCAB = 49152
EOS = 2


def make_server(tok, *, api_key=None, max_waiting=64, delay=0.0, **kw):
    r = dict(num_blocks=160, block_size=4, max_seq=96, max_batch=8)
    r.update(kw)
    runner = FakeRunner(vocab=VOCAB, delay=delay, **r)
    return Server(Engine(runner, tok, prefill_chunk=16), tokenizer=tok, model_name="fake-smol", port=0,
                  api_key=api_key, max_waiting=max_waiting)


@pytest.fixture(scope="module")
def server(smol_tokenizer):
    with make_server(smol_tokenizer).start() as s:
        yield s


def client(s, **kw):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw)


def expect(tok, ids, n):
    """(text, completion tokens, finish reason) that greedy decoding of ids must give."""
    out = reference(ids, n, VOCAB, stop=(EOS,))
    shown = out[:-1] if out[-1] == EOS else out
    return tok.decode(shown, skip_special_tokens=True), len(out), "stop" if out[-1] == EOS else "length"


def metric(s, name) -> float:
    text = httpx.get(s.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_blocks_free(s, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(s, "llmasos_kv_blocks_used") == 0 and metric(s, "llmasos_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV blocks still used: {metric(s, 'llmasos_kv_blocks_used')}")


PROMPT = "The capital of France is"


def test_completions_with_openai_client(server, smol_tokenizer):
    tok = smol_tokenizer
    c = client(server)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    text, n, reason = expect(tok, ids, 12)
    r = c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    pieces = list(c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text
    assert pieces[-1].choices[0].finish_reason == reason and len(pieces) >= 3
    # token ids in, several prompts in one request (choices by index)
    other = [5, 17, 300, 9000]
    r = c.completions.create(model="fake-smol", prompt=[ids, other], max_tokens=6, temperature=0)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == \
        [expect(tok, ids, 6)[0], expect(tok, other, 6)[0]]
    assert [m.id for m in c.models.list().data] == ["fake-smol"]
    # extension: the token ids (a model without tokenizer, a load generator counting tokens)
    want = reference(ids, 12, VOCAB, stop=(EOS,))
    r = c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=12, temperature=0,
                             extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want
    pieces = c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                  extra_body={"return_token_ids": True})
    assert [t for p in pieces for t in p.choices[0].model_extra.get("token_ids", [])] == want


def test_chat_with_openai_client(server, smol_tokenizer):
    tok = smol_tokenizer
    c = client(server)
    msgs = [{"role": "user", "content": "Say hello."}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    text, n, reason = expect(tok, ids, 10)
    r = c.chat.completions.create(model="fake-smol", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason and r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="fake-smol", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(ids)


def test_concurrent_requests_equal_alone(server, smol_tokenizer):
    """Sixteen concurrent streams with different lengths share the batch; each equals its greedy reference
    (as it would be alone)."""
    tok = smol_tokenizer
    prompts = [f"Request number {i}: " + "word " * (i % 7) for i in range(16)]

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        async def one(i, p):
            s = await c.completions.create(model="fake-smol", prompt=p, max_tokens=4 + i % 9, temperature=0,
                                           stream=True)
            return "".join([ch.choices[0].text async for ch in s])
        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await c.close()
    got = asyncio.run(main())
    want = [expect(tok, tok(p, add_special_tokens=False)["input_ids"], 4 + i % 9)[0] for i, p in enumerate(prompts)]
    assert got == want
    assert max(b for b, _ in server.engine.runner.calls) >= 4
    wait_blocks_free(server)


def test_sampling_options_and_stop_strings(server, smol_tokenizer):
    tok = smol_tokenizer
    c = client(server)
    kw = dict(model="fake-smol", prompt=PROMPT, max_tokens=20, temperature=0.8, top_p=0.9, seed=11)
    a = c.completions.create(**kw, extra_body={"top_k": 50})
    b = c.completions.create(**kw, extra_body={"top_k": 50})
    assert a.choices[0].text == b.choices[0].text             # seeded: reproducible
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    full = expect(tok, ids, 20)[0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model="fake-smol", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in s) == full[:full.index(stop)]


BAD = [
    # (description, path, raw body or json, status, param or code fragment)
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi",', 400, "invalid_json"),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("unknown field", "/v1/completions", {"prompt": "hi", "max_tokenz": 3}, 400, "max_tokenz"),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("wrong type temperature", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt too long", "/v1/completions", {"prompt": [7] * 96}, 400, "prompt"),
    ("max_tokens past max_seq", "/v1/completions", {"prompt": [7] * 10, "max_tokens": 87}, 400, "max_tokens"),
    ("max_tokens 0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("token id out of range", "/v1/completions", {"prompt": [1, VOCAB]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [1, -3]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("top_p out of range", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("stop token out of range", "/v1/completions", {"prompt": "hi", "stop_token_ids": [10 ** 6]}, 400,
     "stop_token_ids"),
    ("wrong type stream", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("wrong type prompt", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("bad seed", "/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("empty stop string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("unsupported logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("chat: no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat: bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("chat: unknown model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_answers_4xx_and_server_keeps_serving(server, what, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, timeout=10, **kw)
    assert r.status_code == status, (what, r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if param is not None:
        assert param in (err.get("param") or "") + (err.get("code") or ""), err
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0},
                    timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_api_key(smol_tokenizer):
    with make_server(smol_tokenizer, api_key="sekret").start() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        r = client(s, api_key="sekret").completions.create(model="fake-smol", prompt=[1, 2], max_tokens=3,
                                                           temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200      # open: for load balancers


def test_overload_429_with_retry_after(smol_tokenizer):
    """max_batch 1, max_waiting 2, slow steps: the first request runs, the next two wait, more get 429 with
    Retry-After; the accepted ones all finish correctly."""
    tok = smol_tokenizer
    with make_server(tok, max_batch=1, max_waiting=2, delay=0.02).start() as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                async def one(i):
                    return await c.post("/v1/completions", json={"prompt": [10 + i, 20, 30], "max_tokens": 8,
                                                                 "temperature": 0, "ignore_eos": True})
                first = asyncio.create_task(one(0))
                await asyncio.sleep(0.15)
                rest = [asyncio.create_task(one(i)) for i in range(1, 6)]
                return [await first] + [await t for t in rest]
        rs = asyncio.run(main())
        codes = [r.status_code for r in rs]
        assert codes.count(429) >= 1 and codes.count(200) >= 3, codes
        for i, r in enumerate(rs):
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
            else:
                assert r.json()["choices"][0]["text"] == tok.decode(reference([10 + i, 20, 30], 8, VOCAB),
                                                                    skip_special_tokens=True)
        assert metric(s, 'llmasos_requests_rejected_total{status="429"}') == codes.count(429)
        wait_blocks_free(s)


def test_disconnect_mid_stream_frees_blocks(smol_tokenizer):
    with make_server(smol_tokenizer, delay=0.01).start() as s:
        got = 0
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", s.url + "/v1/completions",
                          json={"prompt": "Tell me a long story", "max_tokens": 80, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        if got == 3:
                            assert metric(s, "llmasos_kv_blocks_used") > 0
                            break
        wait_blocks_free(s)
        assert metric(s, 'llmasos_requests_total{reason="abort"}') == 1
        assert s.engine.generated_tokens_total < 80                     # it really stopped early
        s.engine.blocks.check()


def test_a_failing_request_does_not_disturb_the_others(smol_tokenizer):
    """The runner raises whenever a poison token is in its input: that request answers 500 with an error
    body, the others of the same batch get exactly their reference tokens."""
    tok = smol_tokenizer
    poison = 4242
    with make_server(tok).start() as s:
        s.engine.runner.fail_when = lambda ids: (ids == poison).any()
        prompts = [[100 + i, 200, 300 + i] for i in range(6)]
        prompts[3] = [100, poison, 7]

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json={
                    "prompt": p, "max_tokens": 10, "temperature": 0, "stop_token_ids": [poison]}) for p in prompts))
        rs = asyncio.run(main())
        assert rs[3].status_code == 500 and "injected runner failure" in rs[3].json()["error"]["message"]
        for i, r in enumerate(rs):
            if i != 3:
                assert r.status_code == 200, r.text
                want = reference(prompts[i], 10, VOCAB, stop=(EOS, poison))
                assert r.json()["usage"]["completion_tokens"] == len(want)
                assert r.json()["choices"][0]["text"] == tok.decode(
                    [t for t in want if t not in (EOS, poison)], skip_special_tokens=True)
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        wait_blocks_free(s)


def test_metrics_exposition(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("llmasos_requests_total", "llmasos_prompt_tokens_total", "llmasos_generation_tokens_total",
                 "llmasos_requests_running", "llmasos_requests_waiting", "llmasos_kv_blocks_used",
                 "llmasos_kv_blocks_total", "llmasos_time_to_first_token_seconds_bucket",
                 "llmasos_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert metric(server, "llmasos_kv_blocks_total") == 160
    assert metric(server, "llmasos_time_to_first_token_seconds_count") >= 1
