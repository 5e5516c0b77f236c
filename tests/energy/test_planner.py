"""The energy-aware planner: the Pareto front and the choice under a budget (fast, on rows), and the whole sweep
on a compiled model (slow: each pipeline compiles; SmolLM2 as the issue asks)."""
import numpy as np
import pytest

import llmasos
from llmasos.energy import EnergyError
from llmasos.energy.planner import meets, pareto_front


def _row(name, tok_s, jpt, tpot=10.0, ttft=50.0, inc=0.0):
    return {"pipeline": name, "batch": 1, "tokens_per_s": tok_s, "joules_per_token": jpt, "tpot_ms": tpot,
            "ttft_ms": ttft, "ppl_increase": inc}


def test_pareto_front():
    rows = [_row("a", 100, 1.0), _row("b", 200, 0.8), _row("c", 150, 0.9), _row("d", 50, 0.5),
            _row("e", 200, 0.8), _row("f", 120, 2.0)]
    front = pareto_front(rows)
    # c is dominated by b (faster and cheaper), a and f too; d is the cheapest; b and e tie (both kept)
    assert [r["pipeline"] for r in front] == ["d", "b", "e"]


def test_meets_budget():
    r = _row("x", 100, 1.0, tpot=30.0, ttft=90.0, inc=0.02)
    assert meets(r, {}, {}) == []
    assert meets(r, {"tpot_ms": 50, "ttft_ms": 100}, {"max_ppl_increase": 0.05}) == []
    why = meets(r, {"tpot_ms": 20}, {"max_ppl_increase": 0.01})
    assert len(why) == 2 and why[0].startswith("tpot_ms") and "perplexity +2.00%" in why[1]


def test_bad_requests_are_refused_before_any_work():
    w = np.zeros((1, 8), np.int64)
    for kw, msg in [(dict(slo={"latency": 5}), "unknown SLO key"), (dict(slo={"tpot_ms": -1}), "milliseconds"),
                    (dict(accuracy={"max_ppl": 1}), "unknown accuracy key"),
                    (dict(pipelines=["fp8"]), "unknown pipeline"), (dict(batches=[0]), "batches"),
                    (dict(new_tokens=0), "new_tokens")]:
        with pytest.raises(EnergyError, match=msg):
            llmasos.plan_energy("llama-tiny", "cpu", windows=w, **kw)
    with pytest.raises(EnergyError, match="neither 'smollm2' nor a decoder preset"):
        llmasos.plan_energy("gpt5", "cpu", windows=w)


@pytest.mark.slow
def test_planner_on_a_tiny_model(tmp_path):
    w = np.random.default_rng(0).integers(0, 128, (2, 32))
    res = llmasos.plan_energy("llama-tiny", "cpu", slo={"tpot_ms": 5000}, accuracy={"max_ppl_increase": 0.05},
                              windows=w, pipelines=["f32", "int8"], batches=[1, 4], prompt_len=8, new_tokens=8,
                              save=str(tmp_path / "green.llmasos"), record=llmasos.energy.Ledger(tmp_path / "e.db"))
    assert len(res.rows) == 4 and res.pareto and res.choice is not None and res.choice["misses"] == []
    assert res.choice["joules_per_token"] == min(r["joules_per_token"] for r in res.rows if not r["misses"])
    lm = llmasos.load_lm(res.artifact)
    assert len(lm.generate(list(w[0, :8]), 4)) == 4
    assert len(llmasos.energy.Ledger(tmp_path / "e.db").runs()) == 4


@pytest.mark.slow
def test_planner_on_smollm2():
    res = llmasos.plan_energy("smollm2", "cpu", slo={"tpot_ms": 5000}, accuracy={"max_ppl_increase": 0.01},
                              pipelines=["f32", "int8"], batches=[1, 4], prompt_len=16, new_tokens=8,
                              eval_windows=2)
    assert res.pareto and res.choice is not None
    c = res.choice
    assert c["misses"] == [] and c["tpot_ms"] <= 5000 and c["ppl_increase"] <= 0.01
    assert all(r["perplexity"] and 1 < r["perplexity"] < 100 for r in res.rows)   # a real LM on real text
    assert res.estimated == all(r["estimated"] for r in res.rows)
