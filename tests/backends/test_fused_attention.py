"""A decode step's RoPE + cache appends + attention as one kernel (fused.rope_append_attention and its paged
twin, passes/fuse_attention.py): the CUDA kernels in the SIMT interpreter and the CPU kernels compiled, both
against the op's reference (the unfused ops evaluated one by one: the appended caches bit for bit), the
lowering's choice between the kernel and the unfused ops, and whole models with the fusion on and off."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from llmasos.backends.tvm import build, compile_module, resolve_target, simt
from llmasos.backends.tvm.build import cuda_source
from llmasos.backends.tvm.lower import lower
from llmasos.backends.tvm.lowering_kv import (decode_attention_cpu_func, decode_attention_func,
                                              paged_decode_attention_cpu_func, paged_decode_attention_func)
from llmasos.ir import DType, Graph, TensorType, get_op, interpreter, sym
from llmasos.passes import run_pipeline
from tests.backends.cuda_codegen import needs_cuda_codegen

REF = get_op("fused.rope_append_attention").ref
PAGED_REF = get_op("fused.rope_paged_append_attention").ref


def _operands(b, h, hkv, m, d, dt, positions, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, 1, d)).astype(dt)
    kn, vn = (rng.standard_normal((b, hkv, 1, d)).astype(dt) for _ in range(2))
    k, v = ((rng.standard_normal((b, hkv, m, d)) * 2).astype(dt) for _ in range(2))
    cos, sin = (rng.uniform(-1, 1, (b, 1, 1, d)).astype(dt) for _ in range(2))
    return q, kn, vn, k, v, np.array(positions, np.int32), cos, sin


CASES = [  # (B, H, HKV, M, D, dtype, positions, rope)
    (2, 4, 2, 64, 32, "float16", (3, 40), True),      # GQA
    (3, 8, 2, 100, 64, "float32", (0, 99, 57), True),   # the first and the last position of the cache
    (1, 9, 3, 50, 64, "float16", (49,), False),        # rep 3, no RoPE (GPT-2's learned positions)
    (2, 4, 4, 40, 16, "float32", (39, 7), True),       # MHA (two rows a tile)
    (2, 2, 1, 16, 8, "float32", (15, 5), True),        # a small head dim (two lanes), the cache's last row
]


def _check(out, caches, want, dt):
    o_r, k_r, v_r = want
    tol = 2e-3 if dt == "float16" else 2e-6
    np.testing.assert_allclose(out.astype(np.float64), o_r.astype(np.float64), atol=tol, rtol=tol)
    np.testing.assert_array_equal(caches[0], k_r)   # the appends (and the key's rotation) exactly as unfused
    np.testing.assert_array_equal(caches[1], v_r)


def _cpu_run(func, arrays):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target("llvm"))
    dev = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*dev)
    return [x.numpy() for x in dev]


def _packed(q, kn, vn, order=("v", "q", "k"), gap=1):
    """(X [B, 1, W], (W, qo, ko, vo)): q, kn and vn laid out head after head in one projection row (in
    ``order``, ``gap`` unused heads first), as the kernels' ``packed`` form reads them."""
    b, _, _, d = q.shape
    parts = {"q": q, "k": kn, "v": vn}
    rows, offs, at = [np.zeros((b, gap * d), q.dtype)], {}, gap
    for name in order:
        t = parts[name]
        offs[name] = at
        rows.append(t[:, :, 0, :].reshape(b, -1))
        at += t.shape[1]
    x = np.ascontiguousarray(np.concatenate(rows, axis=1)[:, None, :])
    return x, (x.shape[2], offs["q"], offs["k"], offs["v"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}m{c[3]}d{c[4]}{c[5][5:]}"
                                                     f"{'rope' if c[7] else ''}")
@pytest.mark.parametrize("where", ["cuda-simt", "cpu"])
@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
def test_kernel_matches_the_unfused_ops(case, where, packed):
    b, h, hkv, m, d, dt, positions, rope = case
    q, kn, vn, k, v, pos, cos, sin = _operands(b, h, hkv, m, d, dt, positions, seed=b * h + m)
    cs = (cos, sin) if rope else ()
    want = REF(q, kn, vn, k, v, pos, *cs, scale=d ** -0.5)
    out = np.full((b, h, 1, d), np.nan, dt)
    qkv, layout = (q, kn, vn), None
    if packed:
        x, layout = _packed(q, kn, vn)
        qkv = (x,)
    if where == "cpu":
        got = _cpu_run(decode_attention_cpu_func(h, hkv, m, d, dt, "int32", d ** -0.5, fused=rope, packed=layout),
                       [*qkv, k, v, pos, *cs, out])
        out, caches = got[-1], got[len(qkv):len(qkv) + 2]
    else:
        caches = [k.copy(), v.copy()]
        simt.run(decode_attention_func(h, hkv, m, d, dt, "int32", d ** -0.5, fused=rope, packed=layout),
                 *qkv, *caches, pos, *cs, out)
    _check(out, caches, want, dt)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("where", ["cuda-simt", "cpu"])
@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
def test_paged_kernel_matches_the_unfused_ops(rope, where, packed):
    b, h, hkv, bs, mb, nb, d, dt = 4, 4, 2, 16, 6, 14, 32, "float16"
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, h, 1, d)).astype(dt)
    kp, vp = (rng.standard_normal((nb, hkv, bs, d)).astype(dt) for _ in range(2))
    kn, vn = (rng.standard_normal((b, hkv, 1, d)).astype(dt) for _ in range(2))
    cos, sin = (rng.uniform(-1, 1, (b, 1, 1, d)).astype(dt) for _ in range(2))
    kp[13], vp[13] = np.inf, np.nan   # a block no table names: never read, never written
    table = np.array([[5, 2, 9, -1, -1, -1],      # pos 40: block 2 of the row
                      [0, 1, 3, 4, 6, 7],         # pos 70
                      [8, -1, 10, 11, -1, -1],    # an unallocated block inside the range: not attended
                      [12, -1, -1, -1, -1, -1]],  # pos 20 falls in an unallocated block: dropped, not attended
                     np.int32)
    pos = np.array([40, 70, 50, 20], np.int32)
    cs = (cos, sin) if rope else ()
    want = PAGED_REF(q, kn, vn, kp, vp, pos, table, *cs, scale=0.2)
    out = np.full((b, h, 1, d), np.nan, dt)
    qkv, layout = (q, kn, vn), None
    if packed:
        x, layout = _packed(q, kn, vn, order=("q", "k", "v"), gap=0)
        qkv = (x,)
    if where == "cpu":
        got = _cpu_run(paged_decode_attention_cpu_func(h, hkv, bs, mb, d, dt, "int32", 0.2, fused=rope,
                                                       packed=layout), [*qkv, kp, vp, pos, table, *cs, out])
        out, caches = got[-1], got[len(qkv):len(qkv) + 2]
    else:
        caches = [kp.copy(), vp.copy()]
        simt.run(paged_decode_attention_func(h, hkv, bs, mb, d, dt, "int32", 0.2, fused=rope, packed=layout),
                 *qkv, *caches, pos, table, *cs, out)
    _check(out, caches, want, dt)


@pytest.mark.parametrize("where", ["cuda-simt", "cpu"])
def test_a_position_past_the_cache_writes_nothing(where):
    """A caller error the runtime refuses, but the kernels must still stay inside the cache (the SIMT
    interpreter raises on an access out of bounds): row 0 at position 20 of 16 leaves its cache as it was."""
    b, h, hkv, m, d, dt = 2, 2, 1, 16, 8, "float32"
    q, kn, vn, k, v, pos, cos, sin = _operands(b, h, hkv, m, d, dt, (20, 5), seed=2)
    out = np.zeros((b, h, 1, d), dt)
    if where == "cpu":
        got = _cpu_run(decode_attention_cpu_func(h, hkv, m, d, dt, "int32", 0.3, fused=True),
                       [q, kn, vn, k, v, pos, cos, sin, out])
        caches = got[3:5]
    else:
        caches = [k.copy(), v.copy()]
        simt.run(decode_attention_func(h, hkv, m, d, dt, "int32", 0.3, fused=True), q, kn, vn, *caches, pos, cos,
                 sin, out)
    np.testing.assert_array_equal(caches[0][0], k[0])
    np.testing.assert_array_equal(caches[1][0], v[0])
    assert not np.array_equal(caches[1][1], v[1])   # row 1 (position 5) was appended


@pytest.mark.parametrize("tile", [None, 4, 8])
def test_the_plain_cuda_decode_kernel_matches_attention_in_the_simt_interpreter(tile):
    """(kv.attention's CUDA decode kernel, which the fused one extends: one writer per output element);
    ``tile``: cache rows per row group and iteration (target option decode_attention_tile), positions that
    end mid-tile included."""
    b, h, hkv, m, d, dt = 3, 8, 2, 300, 64, "float16"
    q, _, _, k, v, pos, _, _ = _operands(b, h, hkv, m, d, dt, (0, 299, 157), seed=3)
    out = np.full((b, h, 1, d), np.nan, dt)
    simt.run(decode_attention_func(h, hkv, m, d, dt, "int32", 0.125, tile=tile), q, k, v, pos, out)
    want = get_op("kv.attention").ref(q, k, v, pos, scale=0.125)
    np.testing.assert_allclose(out.astype(np.float64), want.astype(np.float64), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("tile", [4, 8])
def test_paged_fused_kernel_with_larger_tiles_matches_the_unfused_ops(tile):
    """The paged fused kernel (RoPE + append + attention) with 4 / 8 rows a row group takes per iteration:
    unallocated blocks inside the range, a position in an unallocated block, a tile crossing block edges."""
    b, h, hkv, bs, mb, nb, d, dt = 3, 8, 2, 16, 24, 40, 64, "float16"
    rng = np.random.default_rng(tile)
    q = rng.standard_normal((b, h, 1, d)).astype(dt)
    kp, vp = (rng.standard_normal((nb, hkv, bs, d)).astype(dt) for _ in range(2))
    kn, vn = (rng.standard_normal((b, hkv, 1, d)).astype(dt) for _ in range(2))
    cos, sin = (rng.uniform(-1, 1, (b, 1, 1, d)).astype(dt) for _ in range(2))
    table = np.full((b, mb), -1, np.int32)
    table[0, :20] = np.arange(20)                       # pos 300: a long row
    table[1, :8] = np.arange(20, 28)
    table[1, 3] = -1                                    # an unallocated block inside the range
    table[2, :2] = [30, 31]                             # pos 40 falls in an unallocated block
    pos = np.array([300, 120, 40], np.int32)
    want = PAGED_REF(q, kn, vn, kp, vp, pos, table, cos, sin, scale=0.2)
    out = np.full((b, h, 1, d), np.nan, dt)
    caches = [kp.copy(), vp.copy()]
    simt.run(paged_decode_attention_func(h, hkv, bs, mb, d, dt, "int32", 0.2, fused=True, tile=tile),
             q, kn, vn, *caches, pos, table, cos, sin, out)
    _check(out, caches, want, dt)


def test_decode_attention_tile_option():
    import dataclasses
    spec = resolve_target("cuda:sm_90a")
    assert spec._decode_tile() is None
    assert dataclasses.replace(spec, extra={"decode_attention_tile": "4"})._decode_tile() == 4
    with pytest.raises(ValueError, match="decode_attention_tile must be one of auto, 1, 2, 4, 8, got '3'"):
        dataclasses.replace(spec, extra={"decode_attention_tile": "3"})._decode_tile()
    with pytest.raises(ValueError, match="tile must be one of"):
        decode_attention_func(8, 2, 64, 64, "float16", "int32", 0.125, tile=3)


# -- the lowering ---------------------------------------------------------------------------------------

H, HKV, M, D = 4, 2, 16, 8
BATCH = sym("batch")


def rope_step_graph(dt=DType.f32, outputs=("attn", "k", "v"), paged=False, cos_rows=BATCH) -> Graph:
    """A decoder layer's decode step after fuse-elementwise: RoPE of q and k, both appends, attention (paged:
    on pools of 4-position blocks through a block table)."""
    g = Graph("step")
    g.add_symbol("batch", 1, 8)
    q = g.add_input("q", TensorType((BATCH, H, 1, D), dt))
    k = g.add_input("k", TensorType((BATCH, HKV, 1, D), dt))
    v = g.add_input("v", TensorType((BATCH, HKV, 1, D), dt))
    if paged:
        g.add_symbol("blocks", 1, 64)
        kc = g.add_input("k_pool", TensorType((sym("blocks"), HKV, 4, D), dt))
        vc = g.add_input("v_pool", TensorType((sym("blocks"), HKV, 4, D), dt))
    else:
        kc = g.add_input("k_cache", TensorType((BATCH, HKV, M, D), dt))
        vc = g.add_input("v_cache", TensorType((BATCH, HKV, M, D), dt))
    pos = g.add_input("pos", TensorType((BATCH,), DType.i32))
    table = [g.add_input("block_table", TensorType((BATCH, M // 4), DType.i32))] if paged else []
    cos = g.add_input("cos", TensorType((cos_rows, 1, 1, D), dt))
    sin = g.add_input("sin", TensorType((cos_rows, 1, 1, D), dt))

    def rope(x):
        hi = g.add_node("slice", [x], {"axis": 3, "start": D // 2, "end": D})
        lo = g.add_node("slice", [x], {"axis": 3, "start": 0, "end": D // 2})
        rot = g.add_node("concat", [g.add_node("neg", [hi]), lo], {"axis": 3})
        return g.add_node("fused.elementwise", [x, cos, rot, sin], {"expr": "add(mul(%0, %1), mul(%2, %3))"})
    kv = "kv.paged_" if paged else "kv."
    k2 = g.add_node(kv + "append", [kc, rope(k), pos, *table])
    v2 = g.add_node(kv + "append", [vc, v, pos, *table])
    attn = g.add_node(kv + "attention", [rope(q), k2, v2, pos, *table], {"scale": 0.3})
    g.set_outputs([{"attn": attn, "k": k2, "v": v2, "old_k": kc}[o] for o in outputs])
    return g


def _inputs(batch, seed, dt=np.float32):
    rng = np.random.default_rng(seed)
    shapes = ((batch, H, 1, D), (batch, HKV, 1, D), (batch, HKV, 1, D), (batch, HKV, M, D), (batch, HKV, M, D))
    arrays = [rng.standard_normal(s).astype(dt) for s in shapes]
    pos = rng.integers(0, M, batch).astype(np.int32)
    return arrays + [pos] + [rng.uniform(-1, 1, (batch, 1, 1, D)).astype(dt) for _ in range(2)]


def test_the_pass_fuses_rope_appends_and_attention_exactly():
    g = rope_step_graph()
    fused = run_pipeline(g, "fuse-attention")
    assert fused.op_counts() == {"fused.rope_append_attention": 1}
    node = fused.nodes[0]
    assert [v.name for v in node.inputs] == ["q", "k", "v", "k_cache", "v_cache", "pos", "cos", "sin"]
    inputs = _inputs(3, seed=1)
    for a, b in zip(interpreter.run(g, inputs), interpreter.run(fused, inputs)):
        np.testing.assert_array_equal(a, b)
    assert run_pipeline(g, "fuse-attention{rope=false}").op_counts()["fused.rope_append_attention"] == 1
    assert len(run_pipeline(g, "fuse-attention{rope=false}").nodes[-1].inputs) == 6


def test_a_rotation_the_op_cannot_take_stays_unfused_and_the_rest_fuses():
    """cos/sin of one row for all (broadcast over the batch): the op wants [B, 1, T, D], so the RoPE stays as
    the elementwise ops and the appends and attention still fuse (exactly)."""
    g = rope_step_graph(cos_rows=1)
    fused = run_pipeline(g, "fuse-attention")
    counts = fused.op_counts()
    assert counts["fused.rope_append_attention"] == 1 and counts["fused.elementwise"] == 2
    assert len(next(n for n in fused.nodes if n.op == "fused.rope_append_attention").inputs) == 6
    inputs = _inputs(2, seed=4)
    inputs[6:] = [a[:1] for a in inputs[6:]]
    for a, b in zip(interpreter.run(g, inputs), interpreter.run(fused, inputs)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_build_runs_one_kernel_and_matches_the_interpreter(batch):
    g = run_pipeline(rope_step_graph(), "fuse-attention")
    text = lower(g, resolve_target("cpu"))["main"].script()
    assert "kv_decode_rope_append_attention_cpu" in text and "R.call_tir_inplace(kv_append," not in text
    assert "inplace_indices=[-1, 3, 4]" in text
    inputs = _inputs(batch, seed=batch)
    want = interpreter.run(rope_step_graph(), inputs)
    unfused = build(rope_step_graph(), "cpu")(*[a.copy() for a in inputs])
    kc = tvm.runtime.tensor(inputs[3], tvm.cpu())
    got = build(g, "cpu")(*inputs[:3], kc, *inputs[4:])
    for o, u, w in zip(got, unfused, want):
        np.testing.assert_array_equal(o, u)   # the same arithmetic as the unfused kernels, bit for bit
        # (both let LLVM contract the RoPE's x*cos + rot*sin into an FMA: an f32 ulp from the interpreter)
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kc.numpy(), got[1])   # in place: the caller's cache holds the append


def test_a_cache_read_again_takes_the_unfused_ops_with_a_copy():
    g = run_pipeline(rope_step_graph(outputs=("attn", "k", "v", "old_k")), "fuse-attention")
    assert g.op_counts() == {"fused.rope_append_attention": 1}
    text = lower(g, resolve_target("cpu"))["main"].script()
    assert "kv_decode_rope_append_attention_cpu" not in text and "kv_append_copy" in text
    inputs = _inputs(2, seed=5)
    got = build(g, "cpu")(*[a.copy() for a in inputs])
    want = interpreter.run(rope_step_graph(outputs=("attn", "k", "v", "old_k")), inputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], inputs[3])   # the old cache as it was


def test_a_target_without_the_kernel_runs_the_unfused_ops(monkeypatch):
    from llmasos.backends.tvm.targets import CPUTarget
    monkeypatch.setattr(CPUTarget, "kv_decode_append_attention", lambda self, *a: None)
    g = run_pipeline(rope_step_graph(), "fuse-attention")
    text = lower(g, resolve_target("cpu"))["main"].script()
    assert "kv_decode_rope_append_attention_cpu" not in text and "kv_decode_attention_cpu" in text
    inputs = _inputs(2, seed=8)
    got = build(g, "cpu")(*[a.copy() for a in inputs])
    want = interpreter.run(rope_step_graph(), inputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_type_rule_refuses_half_a_rotation_and_bad_tables():
    g = rope_step_graph()
    q, k, v, kc, vc, pos, cos, sin = g.inputs
    with pytest.raises(ValueError, match="cos and sin come together"):
        g.add_node("fused.rope_append_attention", [q, k, v, kc, vc, pos, cos], {"scale": 0.3})
    wide = g.add_input("wide", TensorType((BATCH, H, 1, D), DType.f32))
    with pytest.raises(ValueError, match=r"cos must be \[B, 1, T, D\]"):
        g.add_node("fused.rope_append_attention", [q, k, v, kc, vc, pos, wide, sin], {"scale": 0.3})


# -- whole models ---------------------------------------------------------------------------------------

# (the contiguous llama and GPT-2 builds of the default pipeline -- now fused -- are checked against
# transformers' greedy tokens in tests/llm; the fused-vs-unfused pairs cost ~30 s of the CI's budget:
# `pytest -m slow` runs them)
@pytest.mark.parametrize("preset, kv", [pytest.param("llama-tiny", "contiguous", marks=pytest.mark.slow),
                                        pytest.param("gpt2-tiny", "contiguous", marks=pytest.mark.slow),
                                        ("llama-tiny", "paged")])
def test_models_generate_the_same_with_and_without_the_fusion(preset, kv):
    import llmasos.llm.presets as P
    from llmasos.llm.compile import compile_lm
    from llmasos.llm.model import Decoder
    dec = Decoder.random(P.decoder_config(preset), dtype=torch.float32)
    on = compile_lm(dec, "cpu", max_seq=48, max_batch=2, kv=kv)
    off = compile_lm(dec, "cpu", max_seq=48, max_batch=2, kv=kv, passes="fuse{attention=false}")
    want_op = "fused.rope_paged_append_attention" if kv == "paged" else "fused.rope_append_attention"
    layers = P.decoder_config(preset).layers
    assert on.graphs["decode"].op_counts().get(want_op) == layers
    assert want_op not in off.graphs["decode"].op_counts()
    if kv == "paged":
        from llmasos.llm import paged_generate
        ids = [[5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2]]
        assert paged_generate(on.paged_runner(24), ids, 12) == paged_generate(off.paged_runner(24), ids, 12)
        return
    ids = torch.tensor([[5, 9, 2, 7, 1, 3], [3, 1, 4, 1, 5, 9]])
    assert on.generate(ids, 16) == off.generate(ids, 16)


@pytest.mark.parametrize("target, packed", [("cpu", False), pytest.param("cuda:sm_90a", False, marks=needs_cuda_codegen),
                                            pytest.param("cuda:sm_90a", True, marks=needs_cuda_codegen)])
def test_the_kernel_reads_q_k_v_from_the_merged_projection_where_asked(target, packed):
    """In a model the q, k and v of each layer are head views of the merged QKV GEMM's output: with the CUDA
    target option fused_attention_packed=on the fused kernel reads that output (inplace_indices [-1, 1, 2]) and
    the three slice copies are never made (the default), with =off or on the CPU (measured slower there) it
    takes the three views."""
    import dataclasses
    import llmasos.llm.presets as P
    from llmasos.driver import lower as driver_lower, prepare
    from llmasos.llm.compile import lm_source
    from llmasos.llm.model import Decoder
    cfg = P.decoder_config("llama-tiny")
    dec = Decoder.random(cfg, dtype=torch.float32)
    spec = resolve_target(target)
    if target.startswith("cuda") and not packed:
        spec = dataclasses.replace(spec, extra={"fused_attention_packed": "off"})
    plan = prepare(spec, "fuse")
    src = driver_lower(plan, lambda spec: lm_source(dec, spec, max_seq=32, max_batch=1, batch=1, dtype=None))
    text = lower(src.graphs["decode"], plan.spec)["main"].script()
    want, other = ("[-1, 1, 2]", "[-1, 3, 4]") if packed else ("[-1, 3, 4]", "[-1, 1, 2]")
    assert text.count(f"inplace_indices={want}") == cfg.layers
    assert f"inplace_indices={other}" not in text


@needs_cuda_codegen
@pytest.mark.parametrize("dt, paged", [(DType.f16, False), (DType.f32, False), (DType.f16, True)])
def test_cuda_build_of_the_fused_step(dt, paged):
    spec = resolve_target("cuda:sm_90a")
    g = run_pipeline(rope_step_graph(dt, paged=paged), "fuse-attention")
    assert g.op_counts() == {f"fused.rope_{'paged_' if paged else ''}append_attention": 1}
    mod = lower(g, spec)
    name = f"kv_{'paged_' if paged else ''}decode_rope_append_attention"
    prims = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert name in prims and not any("append" in p and p != name for p in prims)
    assert f"{name}_kernel" in cuda_source(compile_module(mod, spec))


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
def test_fused_kernel_on_the_gpu_matches_the_unfused_ops(rope, packed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b, h, hkv, m, d, dt = 4, 32, 8, 1024, 64, "float16"
    q, kn, vn, k, v, pos, cos, sin = _operands(b, h, hkv, m, d, dt, (0, 511, 1023, 77), seed=11)
    cs = (cos, sin) if rope else ()
    want = REF(q, kn, vn, k, v, pos, *cs, scale=0.125)
    qkv, layout = (q, kn, vn), None
    if packed:
        x, layout = _packed(q, kn, vn, order=("q", "k", "v"), gap=0)
        qkv = (x,)
    f = decode_attention_func(h, hkv, m, d, dt, "int32", 0.125, fused=rope, packed=layout)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=tvm.target.Target("cuda"))
    dev = tvm.cuda()
    args = [tvm.runtime.tensor(a, dev) for a in (*qkv, k, v, pos, *cs, np.zeros((b, h, 1, d), dt))]
    lib["main"](*args)
    n = len(qkv)
    if not rope:
        _check(args[-1].numpy(), [args[n].numpy(), args[n + 1].numpy()], want, dt)
        return
    # nvcc contracts the rotation's x * cos + rot * sin into an f16 FMA (one rounding, not two; as it does in
    # the unfused elementwise kernel): a rotated key may differ from numpy's op-by-op rounding by the rounding
    # of one product term (terms up to ~4 here: 2**-9), more than an ulp of the sum where the terms cancel
    # (H100: 487 of 2M elements differed)
    np.testing.assert_allclose(args[-1].numpy().astype(np.float64), want[0].astype(np.float64), atol=4e-3, rtol=4e-3)
    np.testing.assert_allclose(args[n].numpy().astype(np.float32), want[1].astype(np.float32), rtol=2 ** -10, atol=4e-3)
    np.testing.assert_array_equal(args[n + 1].numpy(), want[2])
