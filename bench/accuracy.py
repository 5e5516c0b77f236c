"""Accuracy benchmark: perplexity and parameter bytes of SmolLM2-135M-Instruct on the Lee corpus, uncompressed
and after each compression pass of issue 4.

    python bench/accuracy.py [--windows 16] [--calib 16] [--methods baseline,int8,...] [--threads 1]
                             [--out FILE]

Evaluation: the first ``--windows`` non-overlapping 256-token windows of ``llmasos.eval.eval_text()`` (the
first 80% of the articles). Calibration: ``--calib`` batches [1, 256] drawn (seed 0) from
``calibration_text()`` (the last 20%, never evaluated on). The model is imported to the IR once; every row
runs its pipeline on that float graph (PassManager with one shared Calibration, so the per-GEMM statistics
are collected once per distinct set of GEMMs) and scores the result with ``perplexity(graph)``: GraphModule
(torch) for float ops, the numpy reference for quant.* ops (they have no torch implementation yet) -- or,
with ``--eval tvm`` (and by default for quant.linear_a8, whose numpy reference is an int32 matmul without
BLAS), the graph compiled by the TVM CPU backend.

Prints ONE JSON document on stdout (progress on stderr); ``--out`` also writes it, after every row, so an
interrupted run keeps the rows it finished. A row whose pass module is missing, or whose pass fails, gets
``{"error": ...}`` instead of numbers.

Threads: ``--threads`` (default 1) sets OPENBLAS/OMP/MKL threads before numpy loads. On the shared 2-core
development VM, BLAS threads fighting the other tenants made GPTQ's per-column updates and Cholesky much
slower than single-threaded (see docs/compression.md for the measurement).
"""
from __future__ import annotations

import argparse
import os
import sys


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens (default 16)")
    p.add_argument("--calib", type=int, default=16, help="calibration batches of 256 tokens (default 16)")
    p.add_argument("--methods", default="all", help="comma-separated row names (default: all)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP / torch threads (default 1)")
    p.add_argument("--eval", choices=("auto", "torch", "tvm"), default="auto",
                   help="how graphs are scored: torch = perplexity(graph) (GraphModule, numpy reference for "
                        "ops without a torch impl); tvm = llmasos.backends.tvm.build(graph, 'cpu'); auto "
                        "(default) = tvm for graphs with an op in TVM_OPS, else torch")
    p.add_argument("--out", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    if a.windows < 1 or a.calib < 1 or a.threads < 1:
        p.error("--windows, --calib and --threads must be >= 1")
    return a


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / torch load: their thread pools are sized at import
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

WINDOW = 256
# ops whose numpy reference is too slow to score a 135M model with: quant.linear_a8's reference is an
# int32 matmul, which numpy runs without BLAS (minutes per window batch)
TVM_OPS = {"quant.linear_a8"}
# row name -> (pipeline, module registering its pass)
ROWS = {
    "baseline": (None, None),
    "int8": ("quantize{bits=8}", "llmasos.passes.quantize"),
    "w8a8": ("w8a8", "llmasos.passes.quantize"),
    "w8a8-smooth": ("w8a8{smooth=true}", "llmasos.passes.quantize"),
    # issue 4's int4 rows: group 128, which leaves SmolLM2's K=576 a ragged last group of 64 columns
    "int4-g128-rtn": ("quantize{bits=4,group=128,method=rtn}", "llmasos.passes.quantize"),
    "int4-g128-gptq": ("quantize{bits=4,group=128,method=gptq}", "llmasos.passes.quantize"),
    "int4-g128-awq": ("quantize{bits=4,group=128,method=awq}", "llmasos.passes.quantize"),
    "int4-g128-asym-rtn": ("quantize{bits=4,group=128,sym=false,method=rtn}", "llmasos.passes.quantize"),
    "int4-g128-asym-gptq": ("quantize{bits=4,group=128,sym=false,method=gptq}", "llmasos.passes.quantize"),
    "int4-g128-asym-awq": ("quantize{bits=4,group=128,sym=false,method=awq}", "llmasos.passes.quantize"),
    # group 64 divides every SmolLM2 K: the int4 rows of the earlier tables, kept comparable
    "int4-g64-rtn": ("quantize{bits=4,group=64,method=rtn}", "llmasos.passes.quantize"),
    "int4-g64-gptq": ("quantize{bits=4,group=64,method=gptq}", "llmasos.passes.quantize"),
    "int4-g64-awq": ("quantize{bits=4,group=64,method=awq}", "llmasos.passes.quantize"),
    # SmolLM2 ships as GGUF Q4_1 (asymmetric 4-bit, blocks of 32): its float weights already lie on such a
    # grid, so this row shows how much of int4's loss is a grid mismatch rather than lost information
    "int4-g32-asym-rtn": ("quantize{bits=4,group=32,sym=false,method=rtn}", "llmasos.passes.quantize"),
    "magnitude-50": ("prune{method=magnitude,sparsity=0.5}", "llmasos.passes.prune"),
    "wanda-50": ("prune{method=wanda,sparsity=0.5}", "llmasos.passes.prune"),
    "sparsegpt-50": ("prune{method=sparsegpt,sparsity=0.5}", "llmasos.passes.prune"),
    "magnitude-2:4": ("prune{method=magnitude,n=2,m=4}", "llmasos.passes.prune"),
    "sparsegpt-2:4": ("prune{method=sparsegpt,n=2,m=4}", "llmasos.passes.prune"),
    "svd-0.2": ("lowrank{method=svd,ratio=0.2}", "llmasos.passes.lowrank"),
    "asvd-0.2": ("lowrank{method=asvd,ratio=0.2}", "llmasos.passes.lowrank"),
    "svdllm-0.2": ("lowrank{method=svdllm,ratio=0.2}", "llmasos.passes.lowrank"),
}


def log(msg: str) -> None:
    print(f"[accuracy] {msg}", file=sys.stderr, flush=True)


def pick_methods(spec: str) -> list:
    if spec == "all":
        return list(ROWS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad or not names:
        raise SystemExit(f"unknown --methods {bad or spec!r}; rows are: {', '.join(ROWS)}")
    return names


def main(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from llmasos.eval import calibration_batches, eval_text, model_bytes, perplexity, token_windows
    from llmasos.frontends.torch_export import import_module
    from llmasos.passes.calibration import Calibration
    from llmasos.passes.manager import PassManager
    from llmasos.zoo import load_smollm2

    methods = pick_methods(args.methods)
    t0 = time.perf_counter()
    model, tok = load_smollm2(verbose=False)
    windows = token_windows(tok, eval_text(), window=WINDOW, max_windows=args.windows)
    calib_ids = calibration_batches(tok, n=args.calib, seq=WINDOW, seed=0)
    graph = import_module(model, (torch.from_numpy(windows[:1]),), max_batch=8, max_seq=WINDOW,
                          name="smollm2").graph
    del model
    log(f"model loaded and imported in {time.perf_counter() - t0:.1f} s; {len(windows)} eval windows, "
        f"{len(calib_ids)} calibration batches of {WINDOW} tokens")
    calib = Calibration(calib_ids, progress=False)

    modules = {}
    for mod in sorted({m for _, m in ROWS.values() if m}):
        try:
            importlib.import_module(mod)
            modules[mod] = None
        except Exception as e:  # a pass still being written: its rows report the error
            modules[mod] = f"{type(e).__name__}: {e}"
    notes = []

    doc = {"model": "SmolLM2-135M-Instruct (llmasos.zoo.load_smollm2, f32)",
           "corpus": "Lee background corpus (gensim), eval_text(): first 80% of the articles",
           "eval_windows": len(windows), "window": WINDOW, "eval_tokens_predicted": int(len(windows) * (WINDOW - 1)),
           "calib_batches": len(calib_ids), "calib_tokens": calib.tokens, "threads": args.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           "evaluator": "per row: torch = perplexity(graph) through GraphModule (numpy reference for quant.linear "
                        "/ quant.dequant); tvm-cpu = perplexity(llmasos.backends.tvm.build(graph, 'cpu'))",
           "notes": notes, "rows": []}
    base_ppl = base_bytes = None
    if "baseline" not in methods:  # deltas are always against the float model
        methods = ["baseline"] + methods
    for name in methods:
        pipeline, mod = ROWS[name]
        row = {"name": name, "pipeline": pipeline}
        log(f"{name}: {pipeline or '(no passes)'} ...")
        if mod and modules[mod]:
            row["error"] = f"{mod} is not importable: {modules[mod]}"
        else:
            try:
                t = time.perf_counter()
                g = PassManager(pipeline, calibration=calib).run(graph) if pipeline else graph
                row["pass_seconds"] = round(time.perf_counter() - t, 2)
                use_tvm = args.eval == "tvm" or (args.eval == "auto" and any(n.op in TVM_OPS for n in g.nodes))
                row["evaluator"] = "tvm-cpu" if use_tvm else "torch"
                scored = g
                if use_tvm:
                    from llmasos.backends.tvm import build
                    t = time.perf_counter()
                    scored = build(g, "cpu")
                    row["build_seconds"] = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                ppl = perplexity(scored, windows, batch=8)
                row["eval_seconds"] = round(time.perf_counter() - t, 2)
                nbytes = model_bytes(g)
                if base_ppl is None:
                    base_ppl, base_bytes = ppl, nbytes
                row.update(ppl=round(ppl, 4), ppl_delta_pct=round(100 * (ppl / base_ppl - 1), 2),
                           model_bytes=nbytes, bytes_ratio=round(nbytes / base_bytes, 4))
                del g, scored
            except Exception as e:
                if name == "baseline":  # every other row is measured against it
                    raise
                row["error"] = f"{type(e).__name__}: {e}"
        log(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "pipeline")))
        doc["rows"].append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    print(json.dumps(main(ARGS), indent=1))
