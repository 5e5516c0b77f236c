"""Distillation benchmark: how much of the perplexity a compressed SmolLM2-135M-Instruct lost does
``llmasos.distill`` win back?

    python bench/distill.py [--students sparsegpt-2:4,prune-heads-25] [--steps 40] [--windows 8] [--calib 8]
                            [--seq 128] [--batch 4] [--lr 1e-4] [--threads 1] [--out FILE]

For each student row: the float model imported to the IR is compressed by the row's pass pipeline
(calibrated on ``--calib`` batches [1, 256] of ``calibration_text()``), then trained for ``--steps`` steps
against the float HF model as teacher (``llmasos.distill``: alpha=0.5 hard labels + KL at T=2, AdamW) on
``--seq``-token windows of ``calibration_text()`` (the last 20% of the Lee articles, never evaluated on).
A 2:4-pruned student stays 2:4 (distill's automatic masks); a head-pruned one has fewer heads to train.
Perplexity is measured on the first ``--windows`` 256-token windows of ``eval_text()`` -- the same windows
as bench/accuracy.py -- before compression (the float graph), after compression, and after distillation.

Prints ONE JSON document on stdout (progress on stderr); ``--out`` also writes it after every row.
"""
from __future__ import annotations

import argparse
import os
import sys

# row name -> pipeline
STUDENTS = {
    "sparsegpt-2:4": "prune{method=sparsegpt,n=2,m=4}",
    "prune-heads-25": "prune-heads{ratio=0.25}",
    "wanda-2:4": "prune{method=wanda,n=2,m=4}",
}
WINDOW = 256


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", default="sparsegpt-2:4,prune-heads-25",
                   help=f"comma-separated rows (default sparsegpt-2:4,prune-heads-25); rows: {', '.join(STUDENTS)}")
    p.add_argument("--steps", type=int, default=40, help="distillation steps per student (default 40)")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 256 tokens (default 8)")
    p.add_argument("--calib", type=int, default=8, help="calibration batches of 256 tokens for the passes (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per distillation window (default 128, at most 256)")
    p.add_argument("--batch", type=int, default=4, help="distillation batch size (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss (default 0.5)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP / torch threads (default 1)")
    p.add_argument("--out", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    for name in ("steps", "windows", "calib", "batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 2 <= a.seq <= WINDOW:
        p.error(f"--seq must be in [2, {WINDOW}] (the graph is imported for sequences up to {WINDOW})")
    a.students = [s.strip() for s in a.students.split(",") if s.strip()]
    bad = [s for s in a.students if s not in STUDENTS]
    if bad or not a.students:
        p.error(f"unknown --students {bad or a.students}; rows are: {', '.join(STUDENTS)}")
    return a


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / torch load: their thread pools are sized at import
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402


def log(msg: str) -> None:
    print(f"[distill-bench] {msg}", file=sys.stderr, flush=True)


def main(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import llmasos.passes.prune  # noqa: F401 -- registers prune (until BUILTIN_MODULES has it everywhere)
    import llmasos.passes.prune_heads  # noqa: F401 -- registers prune-heads
    from llmasos.distill import distill
    from llmasos.eval import (calibration_batches, calibration_text, eval_text, model_bytes, perplexity,
                              token_windows)
    from llmasos.frontends.torch_export import import_module
    from llmasos.passes.calibration import Calibration
    from llmasos.passes.manager import PassManager
    from llmasos.passes.prune_heads import head_counts
    from llmasos.zoo import load_smollm2

    t0 = time.perf_counter()
    teacher, tok = load_smollm2(verbose=False)
    windows = token_windows(tok, eval_text(), window=WINDOW, max_windows=args.windows)
    calib = Calibration(calibration_batches(tok, n=args.calib, seq=WINDOW, seed=0), progress=False)
    train = token_windows(tok, calibration_text(), window=args.seq)
    graph = import_module(teacher, (torch.from_numpy(windows[:1]),), max_batch=8, max_seq=WINDOW,
                          name="smollm2").graph
    log(f"loaded and imported in {time.perf_counter() - t0:.1f} s; {len(windows)} eval windows, "
        f"{len(train)} training windows of {args.seq} tokens")
    t = time.perf_counter()
    base_ppl = perplexity(graph, windows)
    base_bytes = model_bytes(graph)
    log(f"float model: ppl {base_ppl:.3f} ({time.perf_counter() - t:.1f} s)")
    doc = {"model": "SmolLM2-135M-Instruct (llmasos.zoo.load_smollm2, f32)",
           "teacher": "the float HF model (nn.Module)",
           "eval": f"perplexity on the first {len(windows)} x {WINDOW}-token windows of eval_text()",
           "train_data": f"{len(train)} windows of {args.seq} tokens of calibration_text() (cycled)",
           "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "alpha": args.alpha,
           "temperature": args.temperature, "calib_batches": args.calib, "threads": args.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "ppl_float": round(base_ppl, 4), "model_bytes_float": base_bytes, "rows": []}

    def emit():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)

    for name in args.students:
        pipeline = STUDENTS[name]
        row = {"name": name, "pipeline": pipeline}
        doc["rows"].append(row)
        log(f"{name}: {pipeline} ...")
        t = time.perf_counter()
        g = PassManager(pipeline, calibration=calib).run(graph)
        row["pass_seconds"] = round(time.perf_counter() - t, 1)
        row["heads"] = sorted({q for q, _ in head_counts(g)})
        row["model_bytes"] = model_bytes(g)
        t = time.perf_counter()
        row["ppl_compressed"] = round(perplexity(g, windows), 4)
        row["eval_seconds"] = round(time.perf_counter() - t, 1)
        log(f"{name}: compressed ppl {row['ppl_compressed']}; distilling {args.steps} steps ...")
        emit()
        res = distill(teacher, g, train, alpha=args.alpha, temperature=args.temperature, steps=args.steps,
                      lr=args.lr, batch_size=args.batch, log_every=5, progress=True)
        row["distill_seconds"] = round(res.seconds, 1)
        row["masked_params"] = len(res.masks)
        row["loss_first5"] = round(sum(res.losses[:5]) / len(res.losses[:5]), 4)
        row["loss_last5"] = round(sum(res.losses[-5:]) / len(res.losses[-5:]), 4)
        row["ppl_distilled"] = round(perplexity(res.student, windows), 4)
        lost = row["ppl_compressed"] - base_ppl
        row["recovered_pct"] = round(100 * (row["ppl_compressed"] - row["ppl_distilled"]) / lost, 1) if lost > 0 else None
        log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "pipeline")))
        emit()
        del g, res
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    emit()
    return doc


if __name__ == "__main__":
    print(json.dumps(main(ARGS), indent=1))
