"""Functions the multi-process tests run in every rank (importable: launch spawns fresh processes)."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from llmasos.llm.model import Decoder, DecoderConfig

CONFIGS = {
    # GQA (2 query heads per KV head); every rank keeps >= 2 KV heads (a rank with one KV head trips a DLight
    # GEMV schedule assertion in the TVM build, independent of partitioning)
    "llama": DecoderConfig("llama", vocab=64, hidden=32, layers=2, heads=16, kv_heads=8, head_dim=4, ffn=48,
                           max_positions=64, norm_eps=1e-5),
    "gpt2": DecoderConfig("gpt2", vocab=64, hidden=32, layers=2, heads=4, kv_heads=4, head_dim=8, ffn=64,
                          max_positions=64, norm_eps=1e-5),
}
MAX_SEQ = 24
PROMPT = [3, 17, 5, 42, 9, 11]


def model(name: str) -> Decoder:
    return Decoder.random(CONFIGS[name], seed=7)


def generate(rank, world, name, tp, pp, new_tokens=6, save_to=None):
    """(first-step logits, greedy tokens) on this rank."""
    from llmasos.parallel import compile_parallel_lm
    torch.set_num_threads(1)
    lm = compile_parallel_lm(model(name), tp=tp, pp=pp, max_seq=MAX_SEQ, batch=1)
    buf = lm._buffers_for(1)
    logits, _ = lm.prefill([PROMPT], buf)
    first = torch.from_dlpack(logits).numpy().copy()
    toks = lm.generate(PROMPT, new_tokens)
    if save_to is not None:
        lm.save(save_to)
    return first, toks


def load_and_generate(rank, world, path, new_tokens=6):
    from llmasos.parallel import load_parallel_lm
    lm = load_parallel_lm(path)
    return lm.generate(PROMPT, new_tokens)


def die_mid_request(rank, world):
    """Rank 1 dies before the collective; rank 0 must fail with a clear error, not hang."""
    from llmasos.backends import dist as comm
    from llmasos.parallel.runtime import use_mesh
    use_mesh({"tp": world})
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)
    return comm.all_reduce(torch.ones(4), "tp", world)
