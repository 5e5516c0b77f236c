"""CPU bench: SmolLM2-135M tensor-parallel over TP processes (gloo) vs TP=1, same machine, same run.

    python bench/parallel.py [--tokens 16] [--model smollm2|llama-tiny] [--tp 3]

SmolLM2-135M has 9 attention heads and 3 KV heads: TP=2 does not divide them (Megatron splits heads), so
its bench runs TP=3 over 3 processes (one KV head per rank); the tiny Llama test config runs TP=2.

Prints JSON: per-token decode time for TP=1 (baseline) and TP=2, the overhead ratio, and whether the
greedy tokens and first logits agree. On a 2-core CPU expect no speed-up: the point is correctness and the
cost of two all-reduces per layer per token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1789]


def _model(name):
    if name == "smollm2":
        from llmasos import zoo
        return zoo.load_smollm2(verbose=False)[0]
    from tests.parallel.workers import model
    return model("llama")


def work(rank, world, name, tp, tokens):
    import numpy as np
    import torch
    from llmasos.parallel import compile_parallel_lm
    torch.set_num_threads(1)
    lm = compile_parallel_lm(_model(name), tp=tp, max_seq=64, batch=1)
    buf = lm._buffers_for(1)
    first = torch.from_dlpack(lm.prefill([PROMPT], buf)[0]).numpy().copy()
    lm.generate(PROMPT, 2)                                      # warm up
    t0 = time.perf_counter()
    toks = lm.generate(PROMPT, tokens)
    dt = time.perf_counter() - t0
    return {"tokens": toks, "s_per_token": dt / tokens, "first": first.tolist()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tp", type=int, default=None, help="default: 3 for smollm2, 2 otherwise")
    a = ap.parse_args()
    import numpy as np
    from llmasos.parallel import launch
    one = launch(work, 1, a.model, 1, a.tokens, timeout_s=3000)[0]
    tp = a.tp or (3 if a.model == "smollm2" else 2)
    two = launch(work, tp, a.model, tp, a.tokens, timeout_s=3000)
    diff = max(float(np.abs(np.array(r["first"]) - np.array(one["first"])).max()) for r in two)
    print(json.dumps({"model": a.model, "device": "cpu (2 shared cores: noisy)", "new_tokens": a.tokens,
                      "baseline_tp1_ms_per_token": one["s_per_token"] * 1e3,
                      "tp": tp, "tp_ms_per_token": max(r["s_per_token"] for r in two) * 1e3,
                      "tp_over_tp1_time_ratio": max(r["s_per_token"] for r in two) / one["s_per_token"],
                      "same_greedy_tokens": all(r["tokens"] == one["tokens"] for r in two),
                      "max_abs_logit_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
