"""Tensor / pipeline parallelism: the passes against the unpartitioned graph in the simulating interpreter,
the verifier's sharding rule, the distributed runtime (torch.distributed/gloo over 2-4 processes, each rank
its own TVM module) and the planner."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

from llmasos.ir import Graph, TensorType, DType, parse, print_graph, graph_diff
from llmasos.ir.interpreter import run
from llmasos.ir.verifier import VerificationError, verify
from llmasos.passes import PassError, run_pipeline
from tests.parallel import workers

F32 = DType.f32


def _lm_graphs(name):
    from llmasos.frontends import torch_export
    from llmasos.llm.export import export_decoder
    dec = workers.model(name)
    return {ph: torch_export.import_exported_program(export_decoder(dec, ph, 1, 1, 16), name=ph).graph
            for ph in ("prefill", "decode")}


@pytest.fixture(scope="module")
def lm_graphs():
    cache = {}

    class Lazy(dict):
        def __missing__(self, name):
            cache[name] = _lm_graphs(name)
            return cache[name]
    return Lazy()


def _inputs(g, phase, seed=0):
    rng = np.random.default_rng(seed)
    T = 5 if phase == "prefill" else 1
    ins = [rng.integers(0, 64, (1, T)).astype(np.int64), np.array([0 if phase == "prefill" else 3], np.int32),
           np.array([T - 1], np.int64)]
    return ins + [(rng.standard_normal(v.type.shape) * 0.1).astype(np.float32) for v in g.inputs[3:]]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,passes", [
    ("llama", "tensor-parallel{tp=2}"), ("llama", "pipeline-parallel{stages=2},tensor-parallel{tp=2}"),
    ("gpt2", "pipeline-parallel{stages=2}"),
    pytest.param("llama", "tensor-parallel{tp=4}", marks=SLOW), pytest.param("gpt2", "tensor-parallel{tp=2}", marks=SLOW),
    pytest.param("gpt2", "tensor-parallel{tp=4}", marks=SLOW), pytest.param("llama", "pipeline-parallel{stages=2}", marks=SLOW),
    pytest.param("gpt2", "pipeline-parallel{stages=2},tensor-parallel{tp=2}", marks=SLOW),
    pytest.param("llama", "fuse,tensor-parallel{tp=2}", marks=SLOW), pytest.param("gpt2", "fuse,tensor-parallel{tp=2}", marks=SLOW)])
def test_partitioned_lm_graph_equals_unpartitioned(lm_graphs, name, passes):
    for phase, g in lm_graphs[name].items():
        ins = _inputs(g, phase)
        want = run(g, ins)
        g2 = run_pipeline(g, passes)
        verify(g2)
        got = run(g2, ins)             # every rank simulated, outputs assembled
        assert len(got) == len(want) == len(g.outputs)
        for a, b in zip(want, got):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        # the text form round-trips, shardings and mesh included
        assert graph_diff(g2, parse(print_graph(g2), params=dict(g2.param_data))) is None


@pytest.mark.parametrize("passes", ["pipeline-parallel{stages=2, micro_batches=2}",
                                    pytest.param("pipeline-parallel{stages=2, micro_batches=4},tensor-parallel{tp=2}",
                                                 marks=pytest.mark.slow)])
def test_micro_batched_prefill_equals_unpartitioned(passes):
    from llmasos.frontends import torch_export
    from llmasos.llm.export import export_decoder
    g = torch_export.import_exported_program(export_decoder(workers.model("llama"), "prefill", 4, 4, 16),
                                             name="prefill").graph
    rng = np.random.default_rng(1)
    ins = [rng.integers(0, 64, (4, 5)).astype(np.int64), np.zeros(4, np.int32), np.array([4, 3, 2, 4], np.int64)]
    ins += [np.zeros(v.type.shape, np.float32) for v in g.inputs[3:]]
    g2 = run_pipeline(g, passes)
    verify(g2)
    sends = [n for n in g2.nodes if n.op == "dist.send"]
    assert len(sends) == int(passes.split("micro_batches=")[1][0])    # one per micro-batch
    want, got = run(g, ins), run(g2, ins)
    assert len(got) == len(want) == len(g.outputs)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_is_megatron(lm_graphs):
    g = run_pipeline(lm_graphs["llama"]["decode"], "tensor-parallel{tp=2}")
    ops = [n.op for n in g.nodes]
    layers = workers.CONFIGS["llama"].layers
    assert ops.count("dist.all_reduce") == 2 * layers      # after O and after down
    assert ops.count("dist.all_gather") == 1                # the vocabulary-parallel head
    assert all(v.sharding is not None for v in g.outputs[1:])   # every rank keeps its heads' KV cache


def test_heads_that_do_not_divide_are_a_clear_error(lm_graphs):
    with pytest.raises(PassError, match="do not divide|does not divide"):
        run_pipeline(lm_graphs["gpt2"]["decode"], "tensor-parallel{tp=3}")
    with pytest.raises(PassError, match="place"):
        run_pipeline(lm_graphs["gpt2"]["decode"], "pipeline-parallel{stages=9}")


def test_verifier_rejects_a_missing_collective():
    g = parse("""graph @m(%x: f32[2, 8]) {
  mesh tp = 2
  param %w1: f32[4, 8] #split(0, tp)
  param %w2: f32[8, 4] #split(1, tp)
  %h: f32[2, 4] #split(1, tp) = linear(%x, %w1)
  %y: f32[2, 8] #partial(tp) = linear(%h, %w2)
  %z: f32[2, 8] = dist.all_reduce(%y) {axis = "tp", parts = 2}
  return %z
}""")
    verify(g)
    bad = parse("""graph @m(%x: f32[2, 8]) {
  mesh tp = 2
  param %w1: f32[4, 8] #split(0, tp)
  param %w2: f32[8, 4] #split(1, tp)
  %h: f32[2, 4] #split(1, tp) = linear(%x, %w1)
  %y: f32[2, 8] #partial(tp) = linear(%h, %w2)
  %z: f32[2, 8] = relu(%y)
  return %z
}""")
    with pytest.raises(VerificationError, match="partial"):
        verify(bad)
    no_gather = parse("""graph @m(%x: f32[2, 8]) {
  mesh tp = 2
  param %w1: f32[4, 8] #split(0, tp)
  %h: f32[2, 4] = linear(%x, %w1)
  return %h
}""")
    with pytest.raises(VerificationError, match="collective"):
        verify(no_gather)


# -- Hypothesis: random MLP/attention-like graphs through tensor-parallel ------------------------------------
@st.composite
def tp_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tp = draw(st.sampled_from([2, 4]))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    H = 4 * draw(st.integers(1, 3))
    g = Graph("rand")
    x = g.add_input("x", TensorType((B, T, H), F32))
    cur, i = x, 0

    def p(shape):
        nonlocal i
        i += 1
        return g.add_param(f"w{i}", (rng.standard_normal(shape) * 0.3).astype(np.float32))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["mlp", "glu", "heads", "norm", "ew"]))
        F = 4 * draw(st.integers(1, 3))
        if kind == "mlp":
            h = g.add_node("linear", [cur, p((F, H)), p((F,))])
            h = g.add_node(draw(st.sampled_from(["gelu", "relu", "tanh"])), [h])
            cur = g.add_node("add", [cur, g.add_node("linear", [h, p((H, F)), p((H,))])])
        elif kind == "glu":
            h = g.add_node("fused.linear_glu", [cur, p((2 * F, H))], {"act": "silu"})
            cur = g.add_node("linear", [h, p((H, F))])
        elif kind == "heads":       # fused q|v projection, heads reshape, per-head softmax, merge, out proj
            nh, d = 4, draw(st.integers(1, 2))
            qv = g.add_node("linear", [cur, p((2 * nh * d, H))])
            q = g.add_node("slice", [qv], {"axis": 2, "start": 0, "end": nh * d})
            v = g.add_node("slice", [qv], {"axis": 2, "start": nh * d, "end": 2 * nh * d})
            q = g.add_node("reshape", [q], {"shape": [B, T, nh, d]})
            v = g.add_node("reshape", [v], {"shape": [B, T, nh, d]})
            a = g.add_node("mul", [g.add_node("softmax", [q], {"axis": 3}), v])
            a = g.add_node("reshape", [a], {"shape": [B, T, nh * d]})
            cur = g.add_node("linear", [a, p((H, nh * d))])
        elif kind == "norm":
            cur = g.add_node("rms_norm", [cur, p((H,))], {"eps": 1e-5})
        else:
            cur = g.add_node("mul", [cur, g.add_node("sigmoid", [cur])])
    out = g.add_node("linear", [cur, p((4 * tp, H))])   # a head column-split and all-gathered
    g.set_outputs([out, cur])
    xs = rng.standard_normal((B, T, H)).astype(np.float32)
    return g, tp, xs


@given(tp_graphs())
def test_random_graphs_through_tensor_parallel_equal_unsharded(case):
    g, tp, xs = case
    g2 = run_pipeline(g, f"tensor-parallel{{tp={tp}}}")
    verify(g2)
    assert any(n.op.startswith("dist.") for n in g2.nodes)
    want, got = run(g, [xs]), run(g2, [xs])
    assert len(got) == len(want) == len(g.outputs)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


# -- the runtime -----------------------------------------------------------------------------------------
def test_a_dead_rank_fails_the_others_with_a_clear_error():
    from llmasos.parallel import LaunchError, launch
    with pytest.raises(LaunchError) as e:
        launch(workers.die_mid_request, 2, timeout_s=120, comm_timeout_s=10)
    msg = str(e.value)
    assert "rank 1" in msg and "rank 0" in msg


def test_degrees_are_checked_before_any_work():
    from llmasos.parallel import check_degrees
    with pytest.raises(ValueError, match="tp=3"):
        check_degrees(workers.CONFIGS["llama"], 3, 1)
    with pytest.raises(ValueError, match="pp=3"):
        check_degrees(workers.CONFIGS["llama"], 1, 3)


def test_a_sharded_artifact_loads_only_on_its_world_size(tmp_path):
    import json
    from llmasos.parallel import LaunchError, load_parallel_lm
    (tmp_path / "parallel.json").write_text(json.dumps({"tp": 2, "pp": 1, "mesh": {"tp": 2}, "world_size": 2}))
    with pytest.raises(LaunchError, match="partitioned for 2 ranks.*world_size=2"):
        load_parallel_lm(tmp_path)
    with pytest.raises(LaunchError, match="not a sharded LM artifact"):
        load_parallel_lm(tmp_path / "nothing")


@pytest.fixture(scope="module")
def reference():
    from llmasos.parallel import launch
    return {name: launch(workers.generate, 1, name, 1, 1, timeout_s=600)[0] for name in ("llama", "gpt2")}


@pytest.mark.slow
@pytest.mark.parametrize("name,tp,pp", [("llama", 2, 1), ("gpt2", 2, 1), ("llama", 4, 1), ("gpt2", 1, 2),
                                        ("llama", 2, 2)])
def test_distributed_lm_equals_single_process(reference, name, tp, pp, tmp_path):
    from llmasos.parallel import LaunchError, launch
    logits, toks = reference[name]
    out = launch(workers.generate, tp * pp, name, tp, pp, 6, str(tmp_path / "sharded"), timeout_s=900)
    assert len(out) == tp * pp                    # one result per rank
    for first, t in out:
        np.testing.assert_allclose(first, logits, rtol=1e-5, atol=1e-5)
        assert t == toks
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == \
        sorted(["parallel.json"] + [f"rank{r}" for r in range(tp * pp)])
    again = launch(workers.load_and_generate, tp * pp, str(tmp_path / "sharded"), timeout_s=600)
    assert len(again) == tp * pp and all(t == toks for t in again)
    if tp * pp > 1:
        with pytest.raises(LaunchError, match="partitioned for"):
            launch(workers.load_and_generate, 1, str(tmp_path / "sharded"), timeout_s=300)


# -- the planner -----------------------------------------------------------------------------------------
def test_planner_picks_and_explains():
    from llmasos.parallel import plan_parallel
    p = plan_parallel("llama-70b", 8, memory_per_device=141e9, link_bandwidth=450e9)
    assert p.tp * p.pp * p.dp == 8 and p.tp > 1          # 70B fp16 does not fit one H200
    assert "GB" in p.explain() and "tok/s" in p.explain()
    one = plan_parallel("llama-8b", 1, memory_per_device=141e9)
    two = plan_parallel("llama-8b", 2, memory_per_device=141e9)
    assert two.per_request_tokens_per_s > 1.4 * one.per_request_tokens_per_s   # decode is memory-bound
    with pytest.raises(ValueError, match="fits"):
        plan_parallel("llama-70b", 1, memory_per_device=80e9)


# -- data parallelism on Ray ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_data_parallel_max_in_flight_is_checked_before_any_work(bad):
    from llmasos.parallel import DataParallelLM
    dp = DataParallelLM.__new__(DataParallelLM)      # no Ray cluster: the check comes before any Ray call
    with pytest.raises(ValueError, match="max_in_flight .*must be an int >= 1, got " + re.escape(repr(bad))):
        dp.generate([[1, 2, 3]], 4, max_in_flight=bad)


@pytest.mark.slow
def test_ray_replicas_balance_and_lose_no_request_when_one_dies(tmp_path):
    ray = pytest.importorskip("ray")
    import llmasos
    from llmasos.parallel import DataParallelLM
    lm = llmasos.compile_lm(workers.model("gpt2"), "cpu", max_seq=workers.MAX_SEQ, batch=1, passes="")
    lm.save(tmp_path / "lm")
    prompts = [[i + 1, (3 * i) % 60 + 2, 7] for i in range(8)]
    want = [lm.generate(p, 4) for p in prompts]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dp = DataParallelLM(tmp_path / "lm", replicas=2)
        got = dp.generate(prompts[:4], 4)
        # least-outstanding balancing: both replicas serve (the faster may take one more)
        assert got == want[:4] and sum(dp.served) == 4 and min(dp.served) >= 1
        killed = []

        def kill_after_first(idx, r):
            if not killed:
                killed.append(r)
                dp.kill_replica(1 - r)                           # the other one, with a request in flight
        got = dp.generate(prompts, 4, on_done=kill_after_first)
        assert got == want                                       # none lost
        assert dp.alive.count(False) == 1 and dp.retried >= 1
        dp.shutdown()
    finally:
        ray.shutdown()


def test_pipeline_runs_an_output_made_from_constants_on_the_stage_holding_its_copies():
    """A node made from constants alone is copied into each stage that reads it; an output made from such
    copies stays with them (a random graph Hypothesis found: `log(const)` returned while `add(const, ...)`
    runs on stage 1 -- the simulator used to place the returned log on stage 0 and the const with it)."""
    g = parse('''graph @main(%x: f32[1], %in: i64[]) {
      %v0: f32[1] = dist.all_gather(%x) {axis = "tp", dim = 0, parts = 1}
      %v1: f32[] = const() {dtype = f32, value = dense<f32[] [0.5]>}
      %v2: f32[1] = add(%v1, %v0)
      %v3: f32[] = log(%v1)
      return %v3, %v2
    }''')
    ins = [np.array([0.25], np.float32), np.array(2)]
    g2 = run_pipeline(g, "pipeline-parallel{stages=2}")
    assert [n.op for n in g2.nodes].count("dist.send") == 1
    for a, b in zip(run(g, ins), run(g2, ins)):
        np.testing.assert_array_equal(b, a)
