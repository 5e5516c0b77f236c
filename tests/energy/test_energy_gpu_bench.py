"""The GPU energy run's CPU-side logic (issue 15): the accuracy file measured on the CPU and read on the GPU
(load_accuracy, --accuracy-from), the planner's choice on measured rows (select / make_plan / --replan), the
time budget that skips what does not fit (and says so), and the committed SmolLM2 accuracy file itself."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import llmasos
from llmasos.energy import EnergyError
from llmasos.energy.planner import key, load_accuracy, select

ROOT = Path(__file__).resolve().parents[2]


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_bench():
    return _bench("energy_gpu")


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return p


# -- the accuracy file ------------------------------------------------------------------------------------------
def test_load_accuracy_forms(tmp_path):
    nested = _write(tmp_path, "acc.json", {"model": "SmolLM2", "ppl_increase": {
        "f32": {"f32": 0.0, "int8": -0.004}, "f16": {"f16": 0.0002, "int8": -0.003, "int4-g128": 0.61}}})
    incs, src = load_accuracy(nested, "f16")
    assert incs == {"f16": 0.0002, "int8": -0.003, "int4-g128": 0.61}
    assert "f16 weights" in src and "SmolLM2" in src
    assert load_accuracy(nested, "f32")[0] == {"f32": 0.0, "int8": -0.004}
    flat = _write(tmp_path, "flat.json", {"ppl_increase": {"f16": 0, "int8": 0.001}})
    assert load_accuracy(flat, "f16")[0] == {"f16": 0.0, "int8": 0.001}
    plan = _write(tmp_path, "plan.json", {"rows": [{"pipeline": "f32", "ppl_increase": 0.0},
                                                   {"pipeline": "int8", "ppl_increase": -0.0069},
                                                   {"pipeline": "int8", "ppl_increase": -0.0069}]})
    assert load_accuracy(plan)[0] == {"f32": 0.0, "int8": -0.0069}


@pytest.mark.parametrize("doc,msg", [
    ("not json", "not JSON"), ([1, 2], "expected a JSON object"),
    ({"ppl_increase": {"f32": {"int8": 0.1}}}, "not 'f16'"),
    ({"ppl_increase": {"int8": "small"}}, "must be a number"),
    ({"ppl_increase": {"int8": float("nan")}}, "must be a number"),
    ({"ppl_increase": {}}, "no perplexity increases"), ({"other": 1}, "no 'ppl_increase' table")])
def test_load_accuracy_refuses_bad_files(tmp_path, doc, msg):
    with pytest.raises(EnergyError, match=msg):
        load_accuracy(_write(tmp_path, "bad.json", doc), "f16")


def test_load_accuracy_missing_file(tmp_path):
    with pytest.raises(EnergyError, match="cannot read"):
        load_accuracy(tmp_path / "nope.json")


def test_plan_energy_checks_given_accuracy_before_work():
    w = np.zeros((1, 8), np.int64)
    with pytest.raises(EnergyError, match="no figure for pipeline.*int4-g128"):
        llmasos.plan_energy("llama-tiny", "cpu", windows=w, pipelines=["f32", "int4-g128"],
                            ppl_increase={"f32": 0.0})
    with pytest.raises(EnergyError, match="dtype must be one of"):
        llmasos.plan_energy("llama-tiny", "cpu", windows=w, dtype="f8")
    # perplexity measured here is the f32 model's: cast weights need their own figures (ppl_increase)
    for kw in ({"pipelines": ["f16", "int8"]}, {"pipelines": ["int8"], "dtype": "bf16"}):
        with pytest.raises(EnergyError, match="measures perplexity on the f32 model"):
            llmasos.plan_energy("llama-tiny", "cpu", windows=np.zeros((2, 16), np.int64), **kw)


@pytest.mark.slow
def test_plan_energy_with_given_accuracy_on_a_random_shape():
    """A random-weight preset (no tokenizer, no meaningful perplexity) planned with increases measured
    elsewhere: random prompt ids, no perplexity run, the given figures on every row."""
    res = llmasos.plan_energy("llama-tiny", "cpu", slo={"tpot_ms": 5000}, accuracy={"max_ppl_increase": 0.01},
                              pipelines=["f32", "int4-g128"], batches=[1, 2], prompt_len=4, new_tokens=4,
                              ppl_increase={"f32": 0.0, "int4-g128": 0.5}, ppl_source="test")
    assert {r["ppl_increase"] for r in res.rows} == {0.0, 0.5} and all(r["perplexity"] is None for r in res.rows)
    assert res.choice["pipeline"] == "f32" and any("taken from test" in n for n in res.notes)


def test_committed_accuracy_file_is_real():
    """bench/data/energy_accuracy_smollm2.json: SmolLM2 perplexity on held-out text, f32 and f16 weights."""
    path = ROOT / "bench" / "data" / "energy_accuracy_smollm2.json"
    doc = json.loads(path.read_text())
    assert doc["model"].startswith("SmolLM2") and doc["predicted_tokens"] >= 500
    for dt in ("f32", "f16"):
        incs, _ = load_accuracy(path, dt)
        assert {"int8", "int4-g128", "int4-g32-asym"} <= set(incs)
        p = doc["perplexity"][dt]
        assert all(5 < v < 200 for v in p.values())          # a real LM on English text
        assert abs(incs["int8"]) < 0.02                         # int8 is near lossless...
        assert incs["int4-g128"] > 0.05                         # ...round-to-nearest int4 is not
    assert abs(load_accuracy(path, "f16")[0]["f16"]) < 0.01     # f16 weights ~ f32


# -- the choice on measured rows -------------------------------------------------------------------------------
def _row(pipe, b, jpt, tpot=5.0, build=None):
    return {"pipeline": pipe, "batch": b, "build": build or "batch<=32", "variant": f"llmasos {pipe}",
            "tok_s": 1000.0 * b, "ttft_ms": 10.0, "tpot_ms": tpot, "j_per_token": jpt,
            "active_j_per_token": jpt / 2, "avg_w": 300.0, "estimated": False}


def test_select_with_a_default_row():
    rows = [{"pipeline": "f16", "batch": 1, "build": "batch=1", "tokens_per_s": 800, "joules_per_token": 0.5,
             "tpot_ms": 1.2, "ttft_ms": 7, "ppl_increase": 0.0},
            {"pipeline": "int8", "batch": 8, "tokens_per_s": 5000, "joules_per_token": 0.1, "tpot_ms": 1.6,
             "ttft_ms": 9, "ppl_increase": 0.002}]
    front, choice, dflt = select(rows, {"tpot_ms": 20}, {"max_ppl_increase": 0.01}, rows[0])
    assert dflt is rows[0] and choice is rows[1] and key(dflt) == "f16/b1/batch=1"
    with pytest.raises(EnergyError, match="not among the measured rows"):
        select(rows, {}, {}, ("f16", 32))


def test_make_plan_meets_slo_and_accuracy(gpu_bench):
    rows = [_row("f16", 1, 0.50, build="batch=1"), _row("f16", 1, 0.55), _row("f16", 8, 0.09),
            _row("f16", 32, 0.040), _row("int8", 1, 0.40), _row("int8", 8, 0.07), _row("int8", 32, 0.035, tpot=30),
            _row("int4-g128", 32, 0.02), {"variant": "torch eager f16", "batch": 1, "j_per_token": 1.1}]
    incs = {"f16": 0.0, "int8": 0.003, "int4-g128": 0.6}
    plan = gpu_bench.make_plan(rows, incs, "test", {"tpot_ms": 20}, {"max_ppl_increase": 0.01}, "f16", 1)
    # int4 is cheapest but over the perplexity budget; int8/b32 over the TPOT SLO: f16/b32 is the choice
    assert plan["default"] == "f16/b1/batch=1" and plan["choice"] == "f16/b32/batch<=32"
    assert plan["ratio"] == pytest.approx(0.040 / 0.50) and plan["saving"] == pytest.approx(0.92)
    assert plan["meets_target"] is True
    by = {r["config"]: r for r in plan["rows"]}
    assert any("perplexity" in m for m in by["int4-g128/b32/batch<=32"]["misses"])
    assert any("tpot_ms" in m for m in by["int8/b32/batch<=32"]["misses"])
    assert "torch eager f16" not in json.dumps(plan["rows"])           # baselines are not candidates
    # without the batch-1 build the default is the shared build's batch-1 row
    plan = gpu_bench.make_plan(rows[1:], incs, "test", {"tpot_ms": 20}, {"max_ppl_increase": 0.01}, "f16", 1)
    assert plan["default"] == "f16/b1/batch<=32"
    assert "error" in gpu_bench.make_plan(rows, None, None, {}, {}, "f16", 1)


def test_replan_an_earlier_run(gpu_bench, tmp_path, capsys):
    run = _write(tmp_path, "run.json", {"dtype": "f16", "rows": [_row("f16", 1, 0.5, build="batch=1"),
                                                                  _row("f16", 8, 0.2), _row("int8", 8, 0.1)]})
    acc = _write(tmp_path, "acc.json", {"ppl_increase": {"f16": {"f16": 0.0, "int8": 0.004}}})
    doc = gpu_bench.main(["--replan", str(run), "--accuracy-from", str(acc), "--tpot-ms", "10"])
    assert doc["plan"]["choice"] == "int8/b8/batch<=32" and doc["plan"]["saving"] == pytest.approx(0.8)
    assert json.loads(capsys.readouterr().out)["plan"]["choice"] == "int8/b8/batch<=32"
    doc = gpu_bench.main(["--replan", str(run), "--accuracy-from", str(acc), "--max-ppl-increase", "0.001"])
    assert doc["plan"]["choice"] == "f16/b8/batch<=32"
    with pytest.raises(SystemExit, match="not a bench/energy_gpu.py result"):
        gpu_bench.main(["--replan", str(acc)])


# -- the time budget -------------------------------------------------------------------------------------------
def test_budget_skips_what_does_not_fit(gpu_bench):
    b = gpu_bench.Budget(10.0)
    configs = [{"what": "a", "gen_s": 0.5}, {"what": "b", "gen_s": 0.5}, {"what": "c", "gen_s": 3.0},
               {"what": "d", "gen_s": 0.1}]
    kept = gpu_bench.measure_plan(b, configs, window_s=2.0)
    # a and b need 3.5 s each; c would need 8.5 more; d (2.7 s) still fits
    assert [c["what"] for c in kept] == ["a", "b", "d"]
    assert [s["what"] for s in b.skipped] == ["c"] and "time budget" in b.skipped[0]["why"]
    assert gpu_bench.Budget(None).fits("anything", 1e9)
    with pytest.raises(SystemExit, match="time-budget"):
        gpu_bench.Budget(-1)


def test_run_out_of_budget_reports_skips(gpu_bench, tmp_path):
    """A whole run (CPU, tiny preset) whose budget is gone before the compiles finish: the workers are
    stopped, nothing is measured silently, every omission is listed in "skipped"."""
    acc = _write(tmp_path, "acc.json", {"ppl_increase": {"f32": {"f32": 0.0, "int8": 0.001}}})
    doc = gpu_bench.main(["--target", "cpu", "--model", "llama-tiny", "--dtype", "f32", "--pipelines", "f32,int8",
                          "--batches", "1,2", "--prompt", "4", "--new", "4", "--no-torch-compile",
                          "--time-budget", "0.5", "--window-s", "0.05", "--accuracy-from", str(acc)])
    skipped = [s["what"] for s in doc["skipped"]]
    assert {"compile f32", "compile int8", "compile f32-b1"} <= set(skipped)
    assert all("time budget" in s["why"] for s in doc["skipped"])
    assert "torch eager f32 b1" in skipped and not doc["table"]
    assert all("error" in doc["compiles"][k] for k in ("f32", "int8", "f32-b1"))
    assert "error" in doc["plan"]


def test_unknown_pipeline_and_bad_accuracy_are_refused(gpu_bench, tmp_path):
    with pytest.raises(SystemExit, match="unknown pipeline"):
        gpu_bench.main(["--target", "cpu", "--pipelines", "f16,fp4"])
    with pytest.raises(SystemExit, match="tpot_ms must be a number of milliseconds > 0"):
        gpu_bench.main(["--target", "cpu", "--tpot-ms", "-5"])
    acc = _write(tmp_path, "acc.json", {"ppl_increase": {"f16": {"f16": 0.0}}})
    with pytest.raises(SystemExit, match="no perplexity increase for int8"):
        gpu_bench.main(["--target", "cpu", "--pipelines", "f16,int8", "--accuracy-from", str(acc)])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
