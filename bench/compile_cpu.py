"""CPU benchmark: compile time, LLMasOS latency and torch eager latency, measured in the same run.

    python bench/compile_cpu.py [--models gpt2-small,llama-135m] [--batch 1] [--seq 128] [--repeat 10]

Prints one JSON object per model and a summary list at the end. Models are random-weight presets from
llmasos/llm/presets.py with real shapes: gpt2-small (GPT-2 124M) and llama-135m (SmolLM2-135M's Llama shape).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import llmasos
import llmasos.backends.tvm  # noqa: F401  (sizes the TVM thread pool; recorded in env below)
from llmasos.compiled import median_seconds
from llmasos.llm.presets import hf_model


def bench(name: str, batch: int, seq: int, repeat: int) -> dict:
    model = hf_model(name)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    cm = llmasos.compile(model, target="cpu", example_inputs=(ids,), max_batch=max(8, batch), max_seq=max(seq, 256))
    compile_s = time.perf_counter() - t0
    # torch first: TVM's worker threads spin after each call and would steal cores from a torch run after them
    with torch.no_grad():
        torch_s = median_seconds(lambda: model(ids), repeat)
        ref = model(ids).logits
        got = cm(ids).logits
        err = (got - ref).abs().max().item()
    ours_s = median_seconds(lambda: cm(ids), repeat)
    return {
        "model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": batch, "seq": seq, "ir_nodes": len(cm.graph.nodes),
        "compile_s": round(compile_s, 2), "import_s": round(cm.timings.get("import_s", 0), 2),
        "build_s": round(cm.timings.get("build_s", 0), 2),
        "llmasos_ms": round(ours_s * 1e3, 2), "torch_eager_ms": round(torch_s * 1e3, 2),
        "speedup_vs_eager": round(torch_s / ours_s, 3), "max_abs_err": err,
        "logits_scale": ref.abs().max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2-small,llama-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS")}
    results = []
    for name in args.models.split(","):
        r = bench(name, args.batch, args.seq, args.repeat)
        r["env"] = env
        print(json.dumps(r), flush=True)
        results.append(r)
    print(json.dumps({"summary": [{k: r[k] for k in ("model", "compile_s", "llmasos_ms", "torch_eager_ms",
                                                      "speedup_vs_eager")} for r in results]}))


if __name__ == "__main__":
    main()
