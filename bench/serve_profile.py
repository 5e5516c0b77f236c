"""Where an engine step's time goes: the compiled model vs the engine's own Python (scheduling, block
tables, input packing, sampling, outputs).

    python bench/serve_profile.py --null                     # the engine alone: a runner that costs nothing
    python bench/serve_profile.py --model smollm2            # SmolLM2-135M compiled (kv="paged") on the CPU
    python bench/serve_profile.py --model llama-1b --target cuda --dtype f16 --max-batch 64 --max-seq 1024 \\
        --prompt-len 32,512 --output-len 32,256

A closed loop of --concurrency requests (the bench/serve.py workload: fixed seed, exact output lengths)
stepped to the end under cProfile; prints JSON: steps, wall, the runner's share (its calls timed from
outside), the engine's per-step host time, and the top functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import workload  # noqa: E402  (bench/serve.py: the same requests)


def null_runner(vocab: int, max_seq: int, block_size: int, num_blocks: int, max_batch: int):
    from llmasos.llm.paged import _PagedRunner

    class NullRunner(_PagedRunner):
        """The checks and the interface of a paged runner, no model: every row's next token is 1000."""

        def __init__(self):
            self._init_shape(vocab, max_seq, block_size, num_blocks, max_batch)

        def sample_step(self, ids, pos, last, table, *sampling):
            self.check(ids, pos, last, table)
            return np.full(np.asarray(ids).shape[0], 1000 % vocab, np.int64)

        def copy_blocks(self, pairs):
            self._check_pairs(pairs)
    return NullRunner()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--null", action="store_true", help="a runner that costs nothing (the engine's work alone)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--artifact", default=None, help="a saved LM artifact compiled with kv='paged' (no compile)")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--dtype", default=None, choices=(None, "f32", "f16", "bf16"))
    ap.add_argument("--max-batch", type=int, default=None, help="default: 64 with --null, else 32")
    ap.add_argument("--max-seq", type=int, default=None, help="default: 1024 with --null, else 256")
    ap.add_argument("--concurrency", type=int, default=None, help="default: max-batch")
    ap.add_argument("--requests", type=int, default=None, help="default: 2 x concurrency")
    ap.add_argument("--prompt-len", default=None, help="default: 32,512 with --null, else 8,96")
    ap.add_argument("--output-len", default=None, help="default: 32,256 with --null, else 8,64")
    ap.add_argument("--vocab", type=int, default=128256, help="--null: the vocabulary (default Llama-3's)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    mb = args.max_batch or (64 if args.null else 32)
    ms = args.max_seq or (1024 if args.null else 256)
    plen = tuple(int(x) for x in (args.prompt_len or ("32,512" if args.null else "8,96")).split(","))
    olen = tuple(int(x) for x in (args.output_len or ("32,256" if args.null else "8,64")).split(","))
    c = args.concurrency or mb
    from llmasos.serve import Engine, SamplingParams
    from llmasos.serve.load import default_kv_blocks
    blocks = default_kv_blocks(mb, ms, 16)
    tok = None
    if args.null:
        runner, vocab, what = null_runner(args.vocab, ms, 16, blocks, mb), args.vocab, "null runner"
    elif args.artifact:
        import llmasos
        lm = llmasos.llm.load_lm(args.artifact)
        tok = lm.tokenizer
        runner, vocab, what = lm.paged_runner(blocks), lm.vocab, f"{args.artifact} ({lm.executable.spec.name})"
    else:
        import torch
        import llmasos
        from llmasos.zoo import load_model
        model, tok, _ = load_model(args.model)
        dtype = {None: None, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        lm = llmasos.compile_lm(model, args.target, max_seq=ms, max_batch=mb, dtype=dtype, kv="paged",
                                tokenizer=tok)
        runner, vocab, what = lm.paged_runner(blocks), lm.vocab, f"{args.model} compiled for {args.target}"
    spent = {"s": 0.0, "calls": 0, "prefill_s": 0.0, "prefill_calls": 0}
    for name in ("sample_step", "step"):
        if hasattr(runner, name):
            inner = getattr(runner, name)

            def timed(*a, _inner=inner):
                t = time.perf_counter()
                try:
                    return _inner(*a)
                finally:
                    dt = time.perf_counter() - t
                    spent["s"] += dt
                    spent["calls"] += 1
                    if np.asarray(a[0]).shape[1] > 1:
                        spent["prefill_s"] += dt
                        spent["prefill_calls"] += 1
            setattr(runner, name, timed)
    eng = Engine(runner, tok, max_batch=mb)
    queue = list(workload(args.requests or 2 * c, 0, vocab, plen, olen, ms))

    def send():
        ids, mt = queue.pop(0)
        eng.add(eng.make_request(ids, SamplingParams(max_tokens=mt, ignore_eos=True)))

    for _ in range(min(c, len(queue))):
        send()
    prof, steps = cProfile.Profile(), 0
    t0 = time.perf_counter()
    prof.enable()
    while eng.has_work:
        for o in eng.step():
            if o.finished and queue:
                send()
        steps += 1
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).sort_stats("tottime")
    top = []
    for (f, line, fn), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:args.top]:
        top.append({"function": f"{os.path.basename(f)}:{line}({fn})", "calls": nc, "own_s": round(tt, 4),
                    "cum_s": round(ct, 4)})
    host = wall - spent["s"]
    print(json.dumps({"bench": "serve_profile", "runner": what, "max_batch": mb, "concurrency": c,
                      "prompt_len": list(plen), "output_len": list(olen), "steps": steps,
                      "wall_s": round(wall, 3), "runner_s": round(spent["s"], 3), "runner_calls": spent["calls"],
                      "runner_prefill_s": round(spent["prefill_s"], 3), "runner_prefill_calls": spent["prefill_calls"],
                      "host_s": round(host, 3), "host_ms_per_step": round(host / steps * 1e3, 3),
                      "host_share": round(host / wall, 4), "load_avg": os.getloadavg()[0],
                      "note": "cProfile on: absolute host times are inflated; the runner's time (timed from "
                              "outside its call) includes its own checks and copies",
                      "top_own_time": top}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
