"""Check the paged KV cache on a GPU: kernel numerics and time, and the compiled paged runner against
TorchPagedRunner (pure PyTorch, the baseline) on a Llama-1B-shaped model with random weights.

    python bench/paged_gpu_check.py                          # on a machine with a CUDA GPU (the lead: H200)
    python bench/paged_gpu_check.py --target cpu --model llama-tiny --max-seq 64 --batches 1,4 --blocks 64
                                                             # a dry run of the whole script on the host

Prints one JSON object:
  * "kernels": kv.paged_append + kv.paged_attention of one layer (H=32, Hkv=8, D=64, block 16, f16) built
    for the target: T=1 (the paged decode kernel) and T=7 (the gather path) against the numpy reference
    on scattered block tables (max abs error; pools updated in place); then the decode step's time
    (time_evaluator, us per call) beside the contiguous kernel (kv.append + kv.attention, M = max_seq) at
    the same positions, and with a 16x larger pool (the time must not grow: only the rows' blocks are read).
    Other head layouts (SmolLM2 9/3, GPT-2 12/12, D=128, D=80): numerics of the decode kernel only.
  * "lm": compile_lm(..., kv="paged") and TorchPagedRunner over the same weights (f16): logits of a
    schedule of mixed steps (prefill chunks + padded decode rows, scattered tables; max abs error and the
    rows whose argmax differs), greedy tokens of paged_generate (fraction equal: f16 kernels may differ in
    the last bit and flip a near-tie), and the time of one decode step at each batch size with every row at
    position --context (ms per step, both runners, the same host-side checks and copies).
Exits 1 when a kernel's error exceeds 2e-2, a pool was not updated in place, or the LM logits differ by
more than 5e-2 (f16) from the torch runner's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmasos.backends.tvm import compile_module, resolve_target  # noqa: E402
from llmasos.backends.tvm.lower import lower  # noqa: E402
from llmasos.ir import DType, Graph, TensorType, interpreter, sym  # noqa: E402
from tests.paged_util import scattered_table  # noqa: E402
from _target_options import bad_options, with_options  # noqa: E402  (bench/, the script's own folder)

H, HKV, D, BS = 32, 8, 64, 16
OTHER_LAYOUTS = [(9, 3, 64), (12, 12, 64), (32, 8, 128), (16, 2, 80)]
KERNEL_TOL, LM_TOL = 2e-2, 5e-2


def paged_graph(t, mb: int, h=H, hkv=HKV, d=D, dt=DType.f16) -> Graph:
    b, nb = sym("batch"), sym("blocks")
    g = Graph("paged")
    g.add_symbol("batch", 1, 256)
    g.add_symbol("blocks", 1, 1 << 20)
    q = g.add_input("q", TensorType((b, h, t, d), dt))
    k = g.add_input("k", TensorType((b, hkv, t, d), dt))
    v = g.add_input("v", TensorType((b, hkv, t, d), dt))
    kp = g.add_input("k_pool", TensorType((nb, hkv, BS, d), dt))
    vp = g.add_input("v_pool", TensorType((nb, hkv, BS, d), dt))
    pos = g.add_input("pos", TensorType((b,), DType.i32))
    table = g.add_input("block_table", TensorType((b, mb), DType.i32))
    k2 = g.add_node("kv.paged_append", [kp, k, pos, table])
    v2 = g.add_node("kv.paged_append", [vp, v, pos, table])
    g.set_outputs([g.add_node("kv.paged_attention", [q, k2, v2, pos, table], {"scale": 1.0 / np.sqrt(d)}), k2, v2])
    return g


def contiguous_graph(m: int, dt=DType.f16) -> Graph:
    b = sym("batch")
    g = Graph("contiguous")
    g.add_symbol("batch", 1, 256)
    q = g.add_input("q", TensorType((b, H, 1, D), dt))
    k = g.add_input("k", TensorType((b, HKV, 1, D), dt))
    v = g.add_input("v", TensorType((b, HKV, 1, D), dt))
    kc = g.add_input("k_cache", TensorType((b, HKV, m, D), dt))
    vc = g.add_input("v_cache", TensorType((b, HKV, m, D), dt))
    pos = g.add_input("pos", TensorType((b,), DType.i32))
    k2 = g.add_node("kv.append", [kc, k, pos])
    v2 = g.add_node("kv.append", [vc, v, pos])
    g.set_outputs([g.add_node("kv.attention", [q, k2, v2, pos], {"scale": 1.0 / np.sqrt(D)}), k2, v2])
    return g


def paged_inputs(rng, batch, t, mb, nb, pos, h=H, hkv=HKV, d=D):
    """Random q/k/v and pools; each row's blocks 0..(pos+t-1)//BS drawn at random from the pool."""
    used = (pos + t - 1) // BS + 1
    if used.sum() > nb:
        raise ValueError(f"{int(used.sum())} blocks needed, the pool has {nb}")
    table, _ = scattered_table(rng, batch, mb, used, spare=nb - int(used.sum()))
    f = lambda s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    return [f((batch, h, t, d)), f((batch, hkv, t, d)), f((batch, hkv, t, d)), f((nb, hkv, BS, d)),
            f((nb, hkv, BS, d)), pos.astype(np.int32), table]


def kernels(spec, dev, max_seq: int, batches, rng, timed: bool) -> tuple[dict, bool]:
    import tvm
    from tvm.runtime.vm import VirtualMachine
    mb = -(-max_seq // BS)
    out, ok = {"numerics": [], "decode_us": []}, True
    libs = {("paged", t): compile_module(lower(paged_graph(t, mb), spec), spec) for t in (1, 7)}
    for h, hkv, d in OTHER_LAYOUTS:
        libs[("paged", h, hkv, d)] = compile_module(lower(paged_graph(1, mb, h, hkv, d), spec), spec)
    libs["contiguous"] = compile_module(lower(contiguous_graph(mb * BS), spec), spec)
    if dev is None:
        return {"built_only": True}, True
    cases = [(("paged", 1), 1, (H, HKV, D)), (("paged", 7), 7, (H, HKV, D))] + \
        [(("paged", h, hkv, d), 1, (h, hkv, d)) for h, hkv, d in OTHER_LAYOUTS]
    for key, t, (h, hkv, d) in cases:
        vm = VirtualMachine(libs[key], dev)
        g = paged_graph(t, mb, h, hkv, d)
        for batch in (1, 8):
            pos = rng.integers(0, max_seq - t + 1, batch)
            host = paged_inputs(rng, batch, t, mb, int(((pos + t - 1) // BS + 1).sum()) + 8, pos, h, hkv, d)
            want = interpreter.run(g, host)
            args = [tvm.runtime.tensor(a, dev) for a in host]
            got = [o.numpy() for o in vm["main"](*args)]
            err = float(np.max(np.abs(got[0].astype(np.float32) - want[0].astype(np.float32))))
            in_place = all(np.array_equal(args[i].numpy(), want[j]) for j, i in ((1, 3), (2, 4)))
            ok &= err <= KERNEL_TOL and in_place
            out["numerics"].append({"case": "/".join(map(str, key)), "H": h, "Hkv": hkv, "D": d, "batch": batch,
                                    "T": t, "max_abs_err": err, "pools_in_place": bool(in_place)})
    if not timed:
        return out, ok
    pv, cv = VirtualMachine(libs[("paged", 1)], dev), VirtualMachine(libs["contiguous"], dev)
    for batch in batches:
        pos = rng.integers(max_seq // 4, max_seq - 1, batch)
        need = int(((pos + BS) // BS).sum())
        row = {"batch": batch, "mean_pos": float(pos.mean())}
        for label, nb in (("paged_us", need + 64), ("paged_us_16x_pool", 16 * (need + 64))):
            host = paged_inputs(rng, batch, 1, mb, nb, pos)
            args = [tvm.runtime.tensor(a, dev) for a in host]
            row[label] = float(np.median(pv.time_evaluator("main", dev, number=50, repeat=5)(*args).results) * 1e6)
        f = lambda s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
        host = [f((batch, H, 1, D)), f((batch, HKV, 1, D)), f((batch, HKV, 1, D)), f((batch, HKV, mb * BS, D)),
                f((batch, HKV, mb * BS, D)), pos.astype(np.int32)]
        args = [tvm.runtime.tensor(a, dev) for a in host]
        row["contiguous_us"] = float(np.median(cv.time_evaluator("main", dev, number=50, repeat=5)(*args).results)
                                     * 1e6)
        out["decode_us"].append(row)
    return out, ok


def schedule_rows(seqs):
    """Mixed steps: (name, new tokens) per row."""
    return [[("a", 37), ("b", 5)], [("b", 20), ("a", 1), ("c", 9)], [("a", 1), ("b", 1), ("c", 1)],
            [("c", 30), ("a", 1), ("d", 16)], [("a", 1), ("b", 1), ("c", 1), ("d", 1)]]


def run_schedule(runner, seqs, seed):
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(runner.num_blocks))
    blocks = {k: [] for k in seqs}
    done = {k: 0 for k in seqs}
    outs = []
    for rows in schedule_rows(seqs):
        T = max(n for _, n in rows)
        ids = np.zeros((len(rows), T), np.int32)
        table = np.full((len(rows), runner.max_blocks_per_seq), -1, np.int32)
        pos, last = [], []
        for r, (k, n) in enumerate(rows):
            ids[r, :n] = seqs[k][done[k]:done[k] + n]
            while len(blocks[k]) * runner.block_size < done[k] + n:
                blocks[k].append(int(free.pop()))
            table[r, :len(blocks[k])] = blocks[k]
            pos.append(done[k])
            last.append(n - 1)
            done[k] += n
        outs.append(runner.step(ids, np.array(pos, np.int32), np.array(last, np.int32), table))
    return outs


def time_decode(runner, batch: int, context: int, steps: int = 20) -> float:
    """ms per decode step of ``batch`` rows, every row at position ``context`` (its blocks consecutive)."""
    per = -(-(context + steps + 1) // runner.block_size)
    if batch * per > runner.num_blocks:
        return float("nan")
    table = np.full((batch, runner.max_blocks_per_seq), -1, np.int32)
    for b in range(batch):
        table[b, :per] = np.arange(b * per, (b + 1) * per)
    ids, last = np.ones((batch, 1), np.int32), np.zeros(batch, np.int32)
    pos = np.full(batch, context, np.int32)
    for _ in range(3):
        runner.step(ids, pos, last, table)
    t0 = time.perf_counter()
    for i in range(steps):
        runner.step(ids, pos + i, last, table)
    return (time.perf_counter() - t0) / steps * 1e3


def lm_check(args, spec, batches) -> tuple[dict, bool]:
    import torch

    import llmasos
    from llmasos.llm import TorchPagedRunner, paged_generate
    from llmasos.llm.model import Decoder
    from llmasos.llm.presets import decoder_config
    dtype = torch.float16 if args.dtype == "f16" else torch.float32
    cfg = decoder_config(args.model)
    device = spec.torch_device
    dec = Decoder.random(cfg, mode="export", seed=0, dtype=dtype, device=device)
    t0 = time.perf_counter()
    lm = llmasos.compile_lm(dec, with_options(spec, args.target_option), max_seq=args.max_seq,
                            max_batch=max(batches), kv="paged", block_size=BS)
    compile_s = time.perf_counter() - t0
    ours = lm.paged_runner(args.blocks)
    base = TorchPagedRunner(dec, args.blocks, BS, max_seq=args.max_seq, max_batch=max(batches), device=device)
    g = torch.Generator().manual_seed(1)
    seqs = {k: torch.randint(0, cfg.vocab, (n,), generator=g).tolist() for k, n in
            (("a", 60), ("b", 40), ("c", 50), ("d", 30))}
    a, b = run_schedule(ours, seqs, 2), run_schedule(base, seqs, 2)
    err = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    flips = sum(int((x.argmax(-1) != y.argmax(-1)).sum()) for x, y in zip(a, b))
    prompts = [seqs["a"][:13], seqs["b"][:29], seqs["c"][:7]]
    ta = paged_generate(lm.paged_runner(args.blocks), prompts, 24)
    tb = paged_generate(TorchPagedRunner(dec, args.blocks, BS, max_seq=args.max_seq, device=device), prompts, 24)
    same = sum(x == y for r, s in zip(ta, tb) for x, y in zip(r, s)) / sum(len(r) for r in ta)
    res = {"model": args.model, "dtype": args.dtype, "max_seq": args.max_seq, "num_blocks": args.blocks,
           "block_size": BS, "target_options": args.target_option, "cuda_graph": lm.cuda_graph,
           "compile_s": compile_s, "mixed_steps_max_abs_err": err,
           "mixed_steps_argmax_flips": flips, "greedy_tokens_equal_fraction": same, "decode_ms_per_step": []}
    context = min(args.context, args.max_seq - 32)
    for batch in batches:
        res["decode_ms_per_step"].append({"batch": batch, "context": context,
                                          "paged_compiled": time_decode(ours, batch, context),
                                          "torch_paged": time_decode(base, batch, context)})
    return res, err <= (LM_TOL if args.dtype == "f16" else 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--model", default="llama-1b", help="a decoder preset (random weights)")
    ap.add_argument("--dtype", default="f16", choices=("f16", "f32"))
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4096, help="pool size of the LM runners")
    ap.add_argument("--context", type=int, default=512, help="position of every row in the decode timings")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--build-only", action="store_true", help="compile the kernels for the target and stop")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the target for the LM build (e.g. paged_cuda_graph=on: the decode step as "
                         "CUDA graphs, its rows padded to GRAPH_BUCKETS)")
    args = ap.parse_args()
    if bad_options(args.target_option):
        ap.error(f"--target-option takes KEY=VALUE, got {bad_options(args.target_option)}")
    batches = [int(b) for b in args.batches.split(",")]
    spec = resolve_target(args.target)
    dev = spec.tvm_device()
    report = {"target": str(spec.target), "device": None}
    on_device = dev.exist and not args.build_only
    if on_device:
        report["device"] = dev.device_name or str(dev)
    rng = np.random.default_rng(0)
    report["kernels"], ok = kernels(with_options(spec, args.target_option), dev if on_device else None, args.max_seq, batches, rng,
                                    timed=True)
    if on_device and not args.skip_lm:
        report["lm"], lm_ok = lm_check(args, spec, batches)
        ok &= lm_ok
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
