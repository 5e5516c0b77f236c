"""GPU bench: Llama-8B-shape fp16 batch-1 decode, TP=2 over 2 GPUs (NCCL) vs TP=1, same run.

    python bench/parallel_gpu.py --tokens 64            # needs 2 GPUs (H100/H200); random weights

Prints JSON: decode tok/s at TP=1 (baseline, rank 0 alone on GPU 0) and TP=2, the speed-up (target >= 1.6x:
memory-bound decode halves the bytes per GPU) and whether greedy tokens agree.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(arch="llama", vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
             max_positions=8192, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False)


def work(rank, world, tp, tokens):
    import torch
    torch.cuda.set_device(0)          # launch(pin_cuda_device=True): this rank's GPU
    from llmasos.llm.model import Decoder, DecoderConfig
    from llmasos.parallel import compile_parallel_lm
    dec = Decoder.random(DecoderConfig(**SHAPE), dtype=torch.float16, device="cuda")
    lm = compile_parallel_lm(dec, tp=tp, target="cuda", max_seq=512, batch=1, dtype=torch.float16)
    prompt = list(range(1, 33))
    lm.generate(prompt, 4)
    t0 = time.perf_counter()
    toks = lm.generate(prompt, tokens)
    torch.cuda.synchronize()
    return {"tokens": toks, "tok_s": tokens / (time.perf_counter() - t0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    from llmasos.parallel import launch
    one = launch(work, 1, 1, a.tokens, backend="nccl", timeout_s=3600, comm_timeout_s=600, pin_cuda_device=True)[0]
    two = launch(work, 2, 2, a.tokens, backend="nccl", timeout_s=3600, comm_timeout_s=600, pin_cuda_device=True)
    print(json.dumps({"shape": "llama-8b fp16 batch 1", "baseline_tp1_tok_s": one["tok_s"],
                      "tp2_tok_s": min(r["tok_s"] for r in two),
                      "speedup": min(r["tok_s"] for r in two) / one["tok_s"], "target": 1.6,
                      "same_greedy_tokens": all(r["tokens"] == one["tokens"] for r in two)}, indent=1))


if __name__ == "__main__":
    main()
