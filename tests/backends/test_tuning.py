"""MetaSchedule tuning: the database a tune writes is what a later build reads, its kernels compute the
same numbers, it is never slower than the default schedules by its own measurements, and it refuses a
build for another target."""
import json

import numpy as np
import pytest
import torch

import llmasos
from llmasos.backends.tvm import build, resolve_target
from llmasos.backends.tvm.tuning import (MANIFEST, MARGIN, TuningDatabase, TuningError, _choose, extract_tasks,
                                         tune_functions)
from llmasos.ir.interpreter import run
from llmasos.ir.parser import parse
from llmasos.passes import PassManager
from llmasos.llm.presets import hf_model

# a decode-shaped block: one row through a GEMM with a fused epilogue, a norm and a second GEMM, plus a
# symbolic-length twin that tuning must leave alone
GRAPH = """
graph @block(%x: f32[1, 64]) {
  param %w1: f32[128, 64]
  param %b1: f32[128]
  param %w2: f32[64, 128]
  param %g: f32[128]
  %h: f32[1, 128] = linear(%x, %w1, %b1)
  %a: f32[1, 128] = silu(%h)
  %n: f32[1, 128] = rms_norm(%a, %g) {eps = 1e-05, ndim = 1}
  %y: f32[1, 64] = linear(%n, %w2)
  return %y
}
"""


@pytest.fixture(scope="module")
def graph():
    g = PassManager("fuse").run(parse(GRAPH))
    rng = np.random.default_rng(0)
    for name, v in g.params.items():
        g.param_data[name] = (rng.standard_normal(v.type.shape) * 0.1).astype(np.float32)
    return g


@pytest.fixture(scope="module")
def tuned(graph, tmp_path_factory):
    db = tmp_path_factory.mktemp("tune") / "db"
    return db, tune_functions({"main": graph}, "cpu", db, trials_per_task=8)


def test_tune_writes_a_database_a_build_applies(graph, tuned):
    db, report = tuned
    assert (db / MANIFEST).is_file() and (db / "database_tuning_record.json").stat().st_size > 0
    names = {t.name for t in report.tasks}
    assert len(names) >= 2 and not report.failed, report.summary()
    for t in report.tasks:
        # a searched schedule replaces the default only when it measured MARGIN faster in the re-check
        assert t.default_us is not None and 0 < t.trials <= 8
        if t.chosen == "default":
            assert t.best_us == t.default_us
        else:
            assert t.best_us < (1 - MARGIN) * t.default_us
    manifest = json.loads((db / MANIFEST).read_text())
    assert manifest["target"] == resolve_target("cpu").target and len(manifest["report"]["tasks"]) == len(names)
    # one record per kernel: the chosen one, which is what a build applies
    lines = lambda f: len((db / f).read_text().strip().splitlines())  # noqa: E731
    assert lines("database_tuning_record.json") == lines("database_workload.json") == len(names)

    tdb = TuningDatabase.open(db, resolve_target("cpu"))
    exe = build(graph, "cpu", tuning_db=tdb)
    assert set(tdb.applied) >= names  # every tuned kernel came from the database
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    want = run(graph, [x])[0]
    np.testing.assert_allclose(exe(x)[0], want, rtol=1e-5, atol=1e-5)


def test_symbolic_and_copy_kernels_are_left_to_the_default_rules(graph):
    spec = resolve_target("cpu")
    sym = PassManager("fuse").run(parse(GRAPH.replace("%x: f32[1, 64]) {", "%x: f32[n, 64]) {\n  symbol n in [1, 8]")
                                        .replace("f32[1, ", "f32[n, ")))
    tasks, skipped = extract_tasks({"main": sym}, spec)
    assert tasks == [] and skipped.get("symbolic shape", 0) >= 2
    _, skipped_all = extract_tasks({"main": graph}, spec, ops="all")
    tasks_red, skipped_red = extract_tasks({"main": graph}, spec, ops="reduce")
    assert "no reduction" not in skipped_all and len(tasks_red) >= 2
    with pytest.raises(ValueError, match="ops must be one of"):
        extract_tasks({"main": graph}, spec, ops="gemm")


def test_choose_keeps_the_default_unless_a_candidate_beats_it_by_the_margin():
    cands = [("default", "d"), ("tuned", "a"), ("tuned", "b")]
    assert _choose(cands, [[1.0], [0.99], [0.98]]) == (0, "default")       # 2% faster: noise
    assert _choose(cands, [[1.0], [0.99], [0.5]]) == (2, "tuned")
    assert _choose(cands, [[], [0.99], [2.0]]) == (1, "tuned")            # the default did not run
    assert _choose(cands, [[], [], []]) == (None, None)
    assert _choose(cands, [[1.0, 9.0, 1.0], [0.9, 0.9, 0.9], []]) == (1, "tuned")  # medians, not means


def test_zero_trials_keeps_the_default_schedules_exactly(graph, tmp_path):
    report = tune_functions({"main": graph}, "cpu", tmp_path / "db0", trials_per_task=0)
    assert report.trials == 0 and all(t.chosen == "default" for t in report.tasks)
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    plain = build(graph, "cpu")(x)[0]
    from_db = build(graph, "cpu", tuning_db=tmp_path / "db0")(x)[0]
    np.testing.assert_array_equal(from_db, plain)  # the same schedule, replayed from its trace


def test_a_second_tune_extends_the_database(graph, tmp_path):
    db = tmp_path / "shared"
    first = tune_functions({"main": graph}, "cpu", db, trials_per_task=0)
    other = PassManager("fuse").run(parse(GRAPH.replace("64", "32")))  # other shapes: other kernels
    for name, v in other.params.items():
        other.param_data[name] = np.zeros(v.type.shape, np.float32)
    tune_functions({"main": other}, "cpu", db, trials_per_task=0)
    import tvm_ffi
    spec = resolve_target("cpu")
    kernels = {tvm_ffi.structural_hash(t.dispatched[0])
               for g in (graph, other) for t, _ in extract_tasks({"main": g}, spec)[0]}
    assert len(kernels) > len(first.tasks)  # (the two share the 128-wide rms_norm)
    assert len((db / "database_workload.json").read_text().strip().splitlines()) == len(kernels)
    tdb = TuningDatabase.open(db, resolve_target("cpu"))
    build(graph, "cpu", tuning_db=tdb)
    assert len(tdb.applied) == len(first.tasks)  # the first graph's records were carried over


def test_nothing_to_tune_warns(tmp_path):
    sym = PassManager("fuse").run(parse(GRAPH.replace("%x: f32[1, 64]) {", "%x: f32[n, 64]) {\n  symbol n in [1, 8]")
                                        .replace("f32[1, ", "f32[n, ")))
    with pytest.warns(UserWarning, match="nothing to tune: no kernel of static shape"):
        report = tune_functions({"main": sym}, "cpu", tmp_path / "empty", trials_per_task=4)
    assert report.tasks == []


def test_database_for_another_target_or_missing_is_refused(graph, tuned, tmp_path):
    db, _ = tuned
    other = resolve_target("cpu:znver4") if resolve_target("cpu").target.get("mcpu") != "znver4" \
        else resolve_target("cpu:skylake")
    with pytest.raises(TuningError, match=r"was tuned for .*mcpu.*this build targets .*cpu:"):
        build(graph, other, tuning_db=db)
    with pytest.raises(TuningError, match="not a tuning database"):
        build(graph, "cpu", tuning_db=tmp_path / "nothing-here")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(TuningError, match="unreadable manifest"):
        TuningDatabase.open(tmp_path / "bad", resolve_target("cpu"))
    with pytest.raises(ValueError, match="trials_per_task must be an int >= 0"):
        tune_functions({"main": graph}, "cpu", tmp_path / "x", trials_per_task=-1)


@pytest.mark.slow   # ~60 s of MetaSchedule on 2 cores; tune + apply stays in the default run (test_tune_writes_a_database_a_build_applies)
def test_tuned_lm_generates_the_same_tokens(tmp_path):
    model = hf_model("llama-tiny", seed=5)
    opts = dict(max_seq=32, batch=1)
    report = llmasos.tune_lm(model, "cpu", tmp_path / "lmdb", trials_per_task=2, **opts)
    assert report.tasks and report.skipped.get("symbolic shape", 0) > 0  # the prefill's kernels
    lm = llmasos.compile_lm(model, "cpu", tuning_db=tmp_path / "lmdb", **opts)
    assert lm.timings["tuned_kernels"] >= len(report.tasks)
    prompt = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         use_cache=True, pad_token_id=0)[0, len(prompt):].tolist()
    assert lm.generate(prompt, 16) == ref


def test_compile_takes_a_database_and_warns_when_none_of_it_applies(tuned, tmp_path):
    from tests.models import mlp
    model = mlp()
    x = torch.randn(2, 5, 16)
    cm = llmasos.compile(model, "cpu", (x,), dynamic_shapes=None)
    tune_functions({"main": cm.graph}, "cpu", tmp_path / "mlp", trials_per_task=0)
    cm2 = llmasos.compile(model, "cpu", (x,), dynamic_shapes=None, tuning_db=tmp_path / "mlp")
    assert cm2.executable.tuned_kernels
    torch.testing.assert_close(cm2(x), cm(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="holds none of this library's kernels"):
        cm3 = llmasos.compile(model, "cpu", (x,), dynamic_shapes=None, tuning_db=tuned[0])
    assert cm3.executable.tuned_kernels == []
