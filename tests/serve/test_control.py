"""The load-driven controller in the server (llmasos/serve/control.py): the engine's generated tokens/s go to
llmasos.energy.LoadController every interval, and the chosen configuration's max batch becomes the engine's
admission limit -- scale down at low load (after the controller's hysteresis), up at once under a burst; a
configuration file with replicas, a batch above the compiled one, or a missing field is refused by name."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from llmasos.energy.controller import LoadController, ServeConfig
from llmasos.serve import Engine, SamplingParams
from llmasos.serve.control import ServeController, load_controller
from llmasos.serve.server import Server

from .fake_runner import FakeRunner

SMALL = ServeConfig("b2", max_batch=2, replicas=1, tokens_per_s=100.0, tpot_ms=10.0, busy_w=200.0, idle_w=60.0)
BIG = ServeConfig("b8", max_batch=8, replicas=1, tokens_per_s=1000.0, tpot_ms=20.0, busy_w=400.0, idle_w=80.0)


def _engine():
    return Engine(FakeRunner(vocab=50, block_size=4, max_batch=8, num_blocks=256, max_seq=64), max_batch=8)


def test_low_load_lowers_the_admission_limit_and_a_burst_raises_it():
    eng = _engine()
    ctl = ServeController(eng, LoadController([SMALL, BIG], slo_tpot_ms=50, down_after=2), interval_s=0.1)
    assert ctl.current is BIG and eng.scheduler.max_batch == 8          # starts safe: the largest
    t = ctl._t
    assert ctl.tick(t + 0.05) is None                                    # not an interval yet
    assert ctl.tick(t + 0.1) is BIG and eng.scheduler.max_batch == 8     # 0 tok/s once: hysteresis holds
    assert ctl.tick(t + 0.3) is SMALL and eng.scheduler.max_batch == 2   # twice: down
    prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
    for p in prompts:
        eng.add(eng.make_request(p, SamplingParams(max_tokens=4)))
    eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 4                 # admission follows the limit
    while eng.has_work:
        eng.step()
    # 24 tokens in 0.11 s: 218 tok/s, past the small configuration's 100 x 0.8 -> up at once
    assert ctl.tick(ctl._t + 0.11) is BIG and eng.scheduler.max_batch == 8
    assert eng.generated_tokens_total == 24


def test_controller_configurations_are_checked(tmp_path):
    eng = _engine()
    two = ServeConfig("x2", max_batch=4, replicas=2, tokens_per_s=500.0, tpot_ms=10.0, busy_w=300.0, idle_w=70.0)
    with pytest.raises(ValueError, match="'x2' has 2 replicas; one server is one engine"):
        ServeController(eng, LoadController([two, BIG], slo_tpot_ms=50))
    wide = ServeConfig("b16", max_batch=16, replicas=1, tokens_per_s=2000.0, tpot_ms=20.0, busy_w=500.0, idle_w=80.0)
    with pytest.raises(ValueError, match="'b16' has max_batch 16, above the engine's 8"):
        ServeController(eng, LoadController([wide], slo_tpot_ms=50))
    f = tmp_path / "ctl.json"
    f.write_text(json.dumps({"configs": [{"name": "b2", "max_batch": 2, "tokens_per_s": 100}]}))
    with pytest.raises(ValueError, match=r"configs\[0\] lacks tpot_ms, busy_w, idle_w"):
        load_controller(f, eng)
    f.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_controller(f, eng)
    with pytest.raises(ValueError, match="ctl-missing.json"):
        load_controller(tmp_path / "ctl-missing.json", eng)
    f.write_text(json.dumps({"slo_tpot_ms": 5, "configs": [vars_of(SMALL)]}))
    with pytest.raises(ValueError, match="no configuration meets the TPOT SLO of 5"):
        load_controller(f, eng)


def vars_of(c: ServeConfig) -> dict:
    return {k: getattr(c, k) for k in ("name", "max_batch", "replicas", "tokens_per_s", "tpot_ms", "busy_w", "idle_w")}


def test_server_runs_the_controller_between_steps(tmp_path):
    """Through `Server(controller=...)` (what `llmasos serve --controller FILE` builds): the engine thread ticks it;
    /metrics shows the admission limit; tokens stay what they would be."""
    f = tmp_path / "ctl.json"
    f.write_text(json.dumps({"slo_tpot_ms": 50, "interval_s": 0.05, "down_after": 1,
                             "configs": [vars_of(SMALL), vars_of(BIG)]}))
    eng = _engine()
    ctl = load_controller(f, eng)
    assert eng.scheduler.max_batch == 8
    with Server(eng, port=0, controller=ctl) as s:
        for _ in range(200):                      # idle: 0 tok/s -> the small configuration
            if "llmasos_max_batch 2.0" in httpx.get(s.url + "/metrics", timeout=10).text:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the controller never lowered the max batch")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0},
                       timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_failing_controller_stops_controlling_and_the_engine_keeps_serving():
    class Broken:
        def tick(self):
            raise RuntimeError("controller bug")
    eng = _engine()
    with Server(eng, port=0, controller=Broken()) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0},
                       timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert s.loop.controller is None and "controller bug" in str(s.loop.error)
