"""Where a decode step's time goes: the CUDA kernels of one llmasos decode step, from torch.profiler (CUPTI
sees TVM's kernels too, inside the step's CUDA graph), grouped by kernel name.

    python bench/profile_decode.py [--model llama-1b] [--batch 1] [--passes fuse] [--dtype f16] [--steps 32]
                                   [--layers N] [--source DIR] [--target-option KEY=VALUE ...]

Prints one JSON document: the step's wall time, the kernels' summed time per step, and per kernel: calls
and microseconds per step, and the share of the step. ``--layers`` shrinks the preset (same kernels, fewer
repeats); ``--source DIR`` also writes the generated CUDA source there.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _target_options import bad_options, with_options  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", default="fuse")
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "bf16"))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--max-seq", type=int, default=256)
    p.add_argument("--source", default=None)
    p.add_argument("--prefill", type=int, default=0,
                   help="profile the prefill of a prompt of this many tokens instead of the decode steps")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a target option (Target.extra), e.g. small_m_rows=auto; repeatable")
    a = p.parse_args(argv)
    if bad_options(a.target_option):
        p.error(f"--target-option takes KEY=VALUE, got {bad_options(a.target_option)}")
    if a.prefill and a.max_seq <= a.prefill:
        p.error(f"--max-seq ({a.max_seq}) must exceed --prefill ({a.prefill})")

    import torch
    from torch.profiler import ProfilerActivity, profile

    import llmasos
    from llmasos.llm.model import Decoder
    from llmasos.llm.presets import decoder_config

    tdtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = decoder_config(a.model)
    if a.layers:
        cfg = dataclasses.replace(cfg, layers=a.layers)
    # drawn on the GPU (a CPU draw of 1B weights takes a minute), compiled from a CPU copy
    dec = Decoder.random(cfg, mode="export", seed=0, dtype=tdtype, device="cuda").copy_as("export", "cpu")
    t0 = time.perf_counter()
    from llmasos.backends.tvm import resolve_target
    spec = with_options(resolve_target("cuda"), a.target_option)
    lm = llmasos.compile_lm(dec, spec, max_seq=a.max_seq, batch=a.batch, passes=a.passes)
    compile_s = time.perf_counter() - t0
    del dec
    if a.source:
        os.makedirs(a.source, exist_ok=True)
        with open(os.path.join(a.source, "kernels.cu"), "w") as f:
            f.write(lm.executable.cuda_source())
    prompt = [[(7 * r + 3 * i) % cfg.vocab for i in range(a.prefill or 16)] for r in range(a.batch)]
    lm.generate(prompt, 4)  # loads the kernels, captures the graph
    if a.prefill:  # one prefill (and its first token) per "step"
        lm.generate(prompt, 1)
        wall = lm.last_stats.prefill_s
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                lm.generate(prompt, 1)
            torch.cuda.synchronize()
    else:
        lm.generate(prompt, a.steps + 1)
        wall = lm.last_stats.decode_s / lm.last_stats.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lm.generate(prompt, a.steps + 1)
            torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        k = kernels.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    steps = a.steps  # the prefill's kernels are in the trace too; they show as calls < steps
    total = sum(v[1] for v in kernels.values()) / steps
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    doc = {"model": a.model, "phase": f"prefill of {a.prefill} tokens" if a.prefill else "decode step", "layers": cfg.layers, "batch": a.batch, "passes": a.passes, "dtype": a.dtype, "target_options": a.target_option,
           "compile_s": compile_s, "step_wall_us": wall * 1e6, "kernel_us_per_step": total,
           "kernels_per_step": sum(v[0] for v in kernels.values()) / steps,
           "kernels": [{"name": n[:120], "calls_per_step": c / steps, "us_per_step": t / steps,
                        "us_per_call": t / c, "share": t / steps / total} for n, (c, t) in rows[:40]]}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
