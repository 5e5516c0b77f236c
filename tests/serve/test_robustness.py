"""Review fixes of the serving stack: a non-streaming client that disconnects is cancelled while tokens flow,
a dead engine thread fails its requests (no handler waits forever) and answers 503, bad scheduler options are
refused, a request larger than the whole waiting queue is a 400, build_app alone feeds /metrics, load_engine
never silently lowers max_batch. Toy paged runner (exact tokens), servers on 127.0.0.1, always stopped."""
from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from llmasos.serve import Engine, SamplingParams
from llmasos.serve.engine import EngineLoop, Observer
from llmasos.serve.metrics import Metrics
from llmasos.serve.server import Server, build_app

from .fake_runner import FakeRunner, reference
from .test_server import make_server, metric, wait_blocks_free


# -- 1. a non-streaming client that goes away is cancelled while its tokens flow ---------------------------
def test_non_streaming_disconnect_cancels_while_tokens_flow(smol_tokenizer):
    """A token every ~30 ms, so the handler's queue never stays empty: the disconnect must still be seen."""
    with make_server(smol_tokenizer, delay=0.03).start() as s:       # 90 tokens: >= 2.7 s if never cancelled
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 90, "temperature": 0,
                                                         "ignore_eos": True}, timeout=0.4)
        wait_blocks_free(s)
        assert metric(s, 'llmasos_requests_total{reason="abort"}') == 1
        assert 'reason="length"' not in httpx.get(s.url + "/metrics", timeout=10).text     # not run to the end
        assert s.engine.generated_tokens_total < 90                       # it stopped early
        s.engine.blocks.check()


# -- 2. the engine thread dies: every request in flight ends, new ones get 503 ----------------------------
def _collect():
    outs, done = [], threading.Event()

    def sink(o):
        outs.append(o)
        if o.finished:
            done.set()
    return outs, done, sink


@pytest.mark.parametrize("how", ["abort", "observer"])
def test_engine_thread_death_fails_every_request(how):
    class Boom(Observer):
        def finished(self, req):
            raise RuntimeError("observer bug")

    eng = Engine(FakeRunner(vocab=50, delay=0.01), max_batch=2)
    loop = EngineLoop(eng).start()
    try:
        sinks = [_collect() for _ in range(3)]         # two run, one waits (max_batch 2)
        for i, (_, _, sink) in enumerate(sinks):
            loop.submit([1, 2, 3 + i], SamplingParams(max_tokens=40), sink)
        time.sleep(0.1)
        if how == "abort":
            def bad_abort(rid):
                raise RuntimeError("abort bug")
            eng.abort = bad_abort
        else:
            eng.observer = Boom()
        loop.abort(f"{'nope' if how == 'abort' else next(iter(eng.requests))}")
        for outs, done, _ in sinks:
            assert done.wait(5), "a request in flight never ended after the engine thread died"
            assert outs[-1].finish_reason in ("error", "abort"), outs[-1]
        assert sum(outs[-1].finish_reason == "error" for outs, _, _ in sinks) >= 2
        deadline = time.monotonic() + 5
        while loop.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not loop.alive and isinstance(loop.error, RuntimeError)
        outs, done, sink = _collect()                  # submitted after the death: failed at once, not queued
        loop.submit([4, 5], SamplingParams(max_tokens=3), sink)
        assert done.is_set() and outs[-1].finish_reason == "error"
    finally:
        loop.stop()


def test_server_answers_when_the_engine_thread_dies(smol_tokenizer):
    with make_server(smol_tokenizer, delay=0.02).start() as s:
        body = {"prompt": [1, 2, 3], "max_tokens": 80, "temperature": 0, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
                plain = asyncio.create_task(c.post("/v1/completions", json=body))

                async def streamed():
                    lines = []
                    async with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                        async for line in r.aiter_lines():
                            lines.append(line)
                    return lines
                st = asyncio.create_task(streamed())
                await asyncio.sleep(0.3)

                def bad_abort(rid):
                    raise RuntimeError("abort bug")
                s.engine.abort = bad_abort
                s.loop.abort("nope")                   # the engine thread dies
                return await plain, await st
        t0 = time.monotonic()
        plain, lines = asyncio.run(main())
        assert time.monotonic() - t0 < 8
        assert plain.status_code in (500, 503) and plain.json()["error"]["type"] == "server_error", plain.text
        assert any('"engine_error"' in ln or '"engine_dead"' in ln for ln in lines), lines
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


# -- 3. scheduler options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(prefill_budget=-1), dict(prefill_budget=0), dict(prefill_budget=2.5),
                                dict(prefill_budget=True), dict(prefill_chunk=0), dict(prefill_chunk=-3),
                                dict(prefill_chunk=True)])
def test_bad_prefill_options_refused(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        Engine(FakeRunner(vocab=50), **kw)


def test_prefill_budget_is_kept():
    eng = Engine(FakeRunner(vocab=50), prefill_chunk=4, prefill_budget=1)
    assert eng.scheduler.prefill_budget == 1
    p = [1, 2, 3, 4, 5, 6, 7]
    assert eng.generate([p], SamplingParams(max_tokens=5)) == [reference(p, 5, 50)]


# -- 4. a request that can never fit the waiting queue -----------------------------------------------------
def test_request_larger_than_the_queue_is_400(smol_tokenizer):
    with make_server(smol_tokenizer, max_waiting=4).start() as s:
        for body, param in (({"prompt": [1, 2], "n": 5}, "n"), ({"prompt": [[1, 2]] * 5}, "prompt"),
                            ({"prompt": [[1, 2]] * 3, "n": 2}, "n")):
            r = httpx.post(s.url + "/v1/completions", json=dict(body, max_tokens=2), timeout=10)
            assert r.status_code == 400 and "retry-after" not in r.headers, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param and "at most 4" in err["message"]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2], "n": 4, "max_tokens": 2,
                                                         "temperature": 0}, timeout=10)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4        # exactly max_waiting: it fits


# -- 5. build_app alone feeds /metrics; the prefix-cache hits are a counter ------------------------------
def _value(text, name):
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in the exposition"
    return float(m.group(1))


def test_build_app_alone_wires_the_metrics():
    seen = []

    class Mine(Observer):
        def finished(self, req):
            seen.append(req.finish_reason)

    eng = Engine(FakeRunner(vocab=50, block_size=4), observer=Mine())
    m = Metrics("m")
    build_app(EngineLoop(eng), metrics=m)
    shared = [7, 8, 9, 10, 11, 12, 13, 14]
    a, b = shared + [1, 2], shared + [3]
    out = eng.generate([a], SamplingParams(max_tokens=4)) + eng.generate([b], SamplingParams(max_tokens=3))
    assert out == [reference(a, 4, 50), reference(b, 3, 50)]
    text = m.render().decode()
    assert _value(text, "llmasos_prompt_tokens_total") == len(a) + len(b)
    assert _value(text, "llmasos_generation_tokens_total") == 7
    assert _value(text, 'llmasos_requests_total{reason="length"}') == 2
    assert seen == ["length", "length"]                       # the engine's own observer still hears too
    assert "# TYPE llmasos_prefix_cache_hit_blocks_total counter" in text
    assert _value(text, "llmasos_prefix_cache_hit_blocks_total") == eng.blocks.hits == 2


# -- 6. load_engine never silently lowers max_batch ------------------------------------------------------
def test_load_engine_refuses_a_batch_above_the_runner(monkeypatch):
    from llmasos.llm import paged
    from llmasos.serve import load
    assert load.DEFAULT_BLOCK_SIZE is paged.DEFAULT_BLOCK_SIZE
    monkeypatch.setattr(load, "load_runner", lambda spec, **kw: (FakeRunner(vocab=50, max_batch=4), None, spec))
    with pytest.raises(ValueError, match="max_batch 8 exceeds the runner's compiled batch 4"):
        load.load_engine("x", max_batch=8)
    assert load.load_engine("x")[0].max_batch == 4
    assert load.load_engine("x", max_batch=2)[0].max_batch == 2


# -- 6. energy on /metrics: each meter's joules since the start, idle subtracted, J per generated token ------
def test_metrics_carry_the_energy_of_each_meter():
    from llmasos.energy import CounterMeter
    clock = {"gpu0": 1000.0, "cpu": 50.0}
    meters = [CounterMeter("gpu0", lambda: clock["gpu0"]),
              CounterMeter("cpu", lambda: clock["cpu"], method="estimated: TDP x utilisation", estimated=True)]
    eng = Engine(FakeRunner(vocab=50, block_size=4))
    m = Metrics("m", meters=meters, idle_watts={"gpu0": 0.0, "cpu": 1e9})
    build_app(EngineLoop(eng), metrics=m)
    text = m.render().decode()
    assert _value(text, 'llmasos_energy_joules_total{device="gpu0",estimated="false"}') == 0.0
    assert "nan" in re.search(r"^llmasos_energy_joules_per_generated_token .*$", text, re.M).group(0).lower()
    eng.generate([[1, 2, 3]], SamplingParams(max_tokens=5))
    clock["gpu0"] += 30.0
    clock["cpu"] += 20.0
    text = m.render().decode()
    assert _value(text, 'llmasos_energy_joules_total{device="gpu0",estimated="false"}') == 30.0
    assert _value(text, 'llmasos_energy_joules_total{device="cpu",estimated="true"}') == 20.0   # labelled
    assert _value(text, 'llmasos_energy_idle_watts{device="gpu0",estimated="false"}') == 0.0
    assert _value(text, 'llmasos_energy_active_joules_total{device="gpu0",estimated="false"}') == 30.0
    assert _value(text, 'llmasos_energy_active_joules_total{device="cpu",estimated="true"}') == 0.0  # idle > all
    assert _value(text, "llmasos_energy_joules_per_generated_token") == 50.0 / 5
    with pytest.raises(ValueError, match="idle watts given for \\['npu'\\]"):
        Metrics("m", meters=meters, idle_watts={"npu": 1.0})
    assert "llmasos_energy" not in Metrics("m").render().decode()           # no meters: no energy lines


def test_server_serves_energy_on_metrics():
    from llmasos.energy import CounterMeter
    joules = [0.0]
    eng = Engine(FakeRunner(vocab=50, block_size=4))
    with Server(eng, port=0, energy_meters=[CounterMeter("gpu0", lambda: joules[0])], idle_watts={"gpu0": 0.0}) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "temperature": 0},
                       timeout=10)
        assert r.status_code == 200
        joules[0] = 9.0
        text = httpx.get(s.url + "/metrics", timeout=10).text
    assert _value(text, 'llmasos_energy_joules_total{device="gpu0",estimated="false"}') == 9.0
    assert _value(text, "llmasos_energy_joules_per_generated_token") == 3.0


def test_a_failing_meter_leaves_its_lines_out_and_the_scrape_up():
    from llmasos.energy import CounterMeter
    state = {"broken": False}

    def read():
        if state["broken"]:
            raise RuntimeError("NVML: GPU is lost")
        return 5.0
    m = Metrics("m", meters=[CounterMeter("gpu0", read), CounterMeter("cpu", lambda: 1.0)])
    build_app(EngineLoop(Engine(FakeRunner(vocab=50, block_size=4))), metrics=m)
    state["broken"] = True
    text = m.render().decode()
    assert 'device="gpu0"' not in text and 'llmasos_energy_joules_total{device="cpu"' in text
    assert m.energy_read_errors == 1
