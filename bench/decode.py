"""Decode benchmark (issue 5): tokens/s of KV-cache generation, llmasos against torch eager and
torch.compile(mode="reduce-overhead") on the same static-KV-cache model, plus the HBM roofline.

    python bench/decode.py [--target cuda] [--models gpt2-124m,llama-1b] [--batch 1,8,32] [--prompt 128]
                           [--new 128] [--dtype f16] [--int4 llama-1b] [--tune 64] [--no-compile-baseline] [--out FILE]
                           [--target-option KEY=VALUE ...] [--ab-option KEY=VALUE[+KEY=VALUE] ...] [--energy]

--ab-option: one more llmasos variant ``llmasos_KEY_VALUE`` per flag, compiled with that target option on top of
--target-option (``a=1+b=2``: one variant with both), measured in the same run as the plain build.

--energy: J/token beside tokens/s for every variant (llmasos.energy windows: NVML on GPUs, RAPL or the labelled
CPU estimate on CPUs; idle power measured first and reported).

What each figure means: llmasos/llm/bench.py. One JSON document on stdout; progress on stderr.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _target_options import ab_key, bad_options, with_options  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="cuda")
    p.add_argument("--models", default="gpt2-124m,llama-1b")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "bf16"))
    p.add_argument("--int4", default="", help="comma-separated models also run with quantize{bits=4,group=128}")
    p.add_argument("--passes", default="fuse")
    p.add_argument("--no-compile-baseline", action="store_true", help="skip torch.compile (slow to compile)")
    p.add_argument("--repeat", type=int, default=3, help="timed generations per figure (median)")
    p.add_argument("--tune", type=int, default=0, help="also MetaSchedule-tune with this many trials per kernel "
                                                        "and report a llmasos_tuned variant")
    p.add_argument("--out", default=None, help="also write the JSON here, after every model")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a target option (Target.extra), e.g. small_m_gemm=off, for A/B runs; repeatable")
    p.add_argument("--ab-option", action="append", default=[], metavar="KEY=VALUE",
                   help="also a variant compiled with this option added (KEY=VALUE+KEY2=VALUE2: both); repeatable")
    p.add_argument("--energy", action="store_true", help="also measure J/token (llmasos.energy)")
    a = p.parse_args(argv)

    from llmasos.backends.tvm import resolve_target
    meter = None
    if a.energy:
        import llmasos.energy
        llmasos.energy.calibrate_idle(seconds=2.0)
        meter = lambda label: llmasos.energy.measure(label, idle="cached", sync=_sync)  # noqa: E731
    from llmasos.llm.bench import run
    target = resolve_target(a.target)
    bad = bad_options(a.target_option + [x for ab in a.ab_option for x in ab.split("+")])
    if bad:
        p.error(f"--target-option / --ab-option take KEY=VALUE, got {bad}")
    target = with_options(target, a.target_option)
    ab = [(ab_key(o), with_options(target, o.split("+"))) for o in a.ab_option]
    doc = run(a.models.split(","), target, batches=[int(b) for b in a.batch.split(",")], prompt_len=a.prompt,
              new=a.new, dtype=a.dtype, int4_models=[m for m in a.int4.split(",") if m], passes=a.passes,
              compile_baseline=not a.no_compile_baseline, repeat=a.repeat, out=a.out, tune_trials=a.tune,
              meter=meter, ab_targets=ab)
    print(json.dumps(doc, indent=1))


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
