"""MetaSchedule tuning benchmark (issue 5): decode tokens/s of one model compiled without and with a tuning
database made by ``llmasos.tune_lm``, in the same run, plus the per-kernel report.

    python bench/tune.py [--model smollm2] [--target cpu] [--trials 64] [--db DIR] [--new 64] [--repeat 3]

--model: smollm2 (the real SmolLM2-135M-Instruct, converted once into ~/.cache/llmasos) or a decoder preset
(llmasos/llm/presets.py: llama-135m, llama-1b, gpt2-124m, ...: random weights). Batch 1 (every decode kernel has
a static shape, so the whole decode step is tuned; the prefill keeps its default schedules). The two builds generate greedily from
the same prompt, in turns; their tokens must agree (tuned kernels change summation orders only). An existing --db is
extended, not replaced; --trials 0 reuses it as it is. One JSON document on stdout, progress on stderr.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def decode_rates(lms, prompt, new, repeat):
    """Median decode tokens/s of each LM, measured in turns (A B, B A, ...): this VM's speed drifts by tens of
    percent over a minute, which sequential measurement would put on one side. Even so two builds with the
    same schedules have measured 14% apart here: read small differences as noise."""
    for lm in lms:
        lm.generate(prompt, 4)  # warm-up
    rates, toks = [[] for _ in lms], [None] * len(lms)
    for turn in range(repeat):
        order = range(len(lms)) if turn % 2 == 0 else reversed(range(len(lms)))  # A B, B A, ...
        for i in order:
            toks[i] = lms[i].generate(prompt, new)
            rates[i].append(lms[i].last_stats.decode_tokens_per_s)
    return [statistics.median(r) for r in rates], toks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", default="cpu")
    p.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per kernel")
    p.add_argument("--ops", default="reduce", choices=("reduce", "all"))
    p.add_argument("--db", default=None, help="tuning database directory (default: a temporary one)")
    p.add_argument("--max-seq", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="timed generations per build, in turns (median)")
    p.add_argument("--dtype", default="f32", choices=("f32", "f16"))
    a = p.parse_args(argv)

    import torch

    import llmasos
    torch.manual_seed(0)
    if a.model == "smollm2":
        from llmasos.zoo import load_smollm2
        model, tok = load_smollm2()
        prompt = tok("The history of Paris began", return_tensors="pt")["input_ids"][0].tolist()
    else:
        model, tok = a.model, None
        prompt = list(range(1, 33))
    dtype = torch.float16 if a.dtype == "f16" else None
    opts = dict(max_seq=a.max_seq, batch=1, dtype=dtype)
    db = a.db or tempfile.mkdtemp(prefix="llmasos-tune-")

    report = None
    if a.trials > 0 or not os.path.exists(os.path.join(db, "llmasos-tuning.json")):
        t0 = time.perf_counter()
        report = llmasos.tune_lm(model, a.target, db, trials_per_task=a.trials, ops=a.ops, log=log, **opts)
        log(report.summary())
        log(f"tuned in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    base = llmasos.compile_lm(model, a.target, **opts)
    log(f"compiled without tuning in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tuned = llmasos.compile_lm(model, a.target, tuning_db=db, **opts)
    log(f"compiled with {tuned.timings['tuned_kernels']} kernels from {db} in {time.perf_counter() - t0:.1f} s")
    (base_rate, tuned_rate), (base_toks, tuned_toks) = decode_rates([base, tuned], prompt, a.new, a.repeat)
    log(f"decode tokens/s: default schedules {base_rate:.1f}, tuned {tuned_rate:.1f}")
    same = next((i for i, (x, y) in enumerate(zip(base_toks, tuned_toks)) if x != y), len(base_toks))
    doc = {"model": a.model, "target": tuned.executable.spec.name, "dtype": a.dtype, "batch": 1,
           "prompt_tokens": len(prompt), "new_tokens": a.new, "trials_per_kernel": a.trials, "database": db,
           "default_decode_tok_s": round(base_rate, 2), "tuned_decode_tok_s": round(tuned_rate, 2),
           "speedup": round(tuned_rate / base_rate, 3), "kernels_from_database": tuned.timings["tuned_kernels"],
           "greedy_tokens_equal": same,
           # 0: every kernel kept its default schedule, so any speed difference is measurement noise
           "kernels_with_searched_schedule": sum(t.chosen == "tuned" for t in report.tasks) if report else None,
           "report": report.to_dict() if report else None}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
