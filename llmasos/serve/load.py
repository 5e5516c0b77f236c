"""A model argument of ``llmasos serve`` to an Engine: a paged runner, the tokenizer and the served name.

    MODEL_OR_ARTIFACT   an LM artifact directory compiled with kv="paged" (``CompiledLM.save``), or a model
                        as ``llmasos generate`` takes it: smollm2, a decoder preset, a local HF causal-LM dir
    target              cpu (default for a model) / cuda / a TVM target as JSON: compile_lm(kv="paged");
                        "torch": the eager TorchPagedRunner (no compilation; for checks and quick tries);
                        for an artifact, None loads it for the target it was compiled for
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .. import llm
from ..artifact import kind_of
from ..llm.paged import DEFAULT_BLOCK_SIZE
from ..zoo import load_model
from .engine import Engine
from .scheduler import cdiv

DEFAULT_MAX_BATCH = 8


def default_kv_blocks(max_batch: int, max_seq: int, block_size: int) -> int:
    """Enough blocks for max_batch sequences of max_seq positions (no preemption at full length)."""
    return max_batch * cdiv(max_seq, block_size)


def _target(t: Any):
    return json.loads(t) if isinstance(t, str) and t.strip().startswith("{") else t


def load_runner(spec: str, *, target: Any = None, max_batch: Optional[int] = None, max_seq: Optional[int] = 512,
                kv_blocks: Optional[int] = None, block_size: int = DEFAULT_BLOCK_SIZE, log=None):
    """(runner, tokenizer or None, model name) for a ``llmasos serve`` model argument. ``max_batch``: None is
    the artifact's compiled batch, or DEFAULT_MAX_BATCH for a model compiled here; for an artifact it may not
    exceed the batch it was compiled for (ValueError)."""
    log = log or (lambda *a: None)
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if kv_blocks is not None and (not isinstance(kv_blocks, int) or kv_blocks < 1):
        raise ValueError(f"kv_blocks must be an int >= 1, got {kv_blocks!r}")
    path = Path(spec)
    if path.is_dir() and kind_of(path) == "lm":
        if target == "torch":
            raise ValueError(f"{spec} is a compiled LM artifact; --target torch runs an uncompiled model "
                             f"(pass a model name or a HF directory)")
        lm = llm.load_lm(str(path), None if target is None else _target(target))     # None: the saved target
        if not hasattr(lm, "paged_runner") or getattr(lm, "block_size", None) is None:
            raise ValueError(f"{spec} was compiled with a contiguous KV cache; serving needs kv='paged' "
                             f"(llmasos.compile_lm(model, kv='paged', max_batch=N) then .save)")
        if max_batch is not None and lm.max_batch is not None and max_batch > lm.max_batch:
            raise ValueError(f"--max-batch {max_batch} exceeds the batch {lm.max_batch} the artifact {spec} was "
                             f"compiled for: pass --max-batch <= {lm.max_batch} (or leave it out), or recompile "
                             f"with compile_lm(..., max_batch={max_batch})")
        blocks = kv_blocks or default_kv_blocks(max_batch or lm.max_batch, lm.max_seq, lm.block_size)
        return lm.paged_runner(blocks), lm.tokenizer, path.name
    max_batch = max_batch or DEFAULT_MAX_BATCH
    model, tok, _ = load_model(spec)
    target = "cpu" if target is None else target
    name = path.name if path.is_dir() else spec
    if target == "torch":
        blocks = kv_blocks or default_kv_blocks(max_batch, max_seq or 512, block_size)
        return llm.TorchPagedRunner(model, blocks, block_size, max_seq=max_seq, max_batch=max_batch), tok, name
    log(f"compiling {spec} for {target} (paged KV cache, batch <= {max_batch}, max_seq {max_seq}) ...")
    lm = llm.compile_lm(model, _target(target), max_seq=max_seq, max_batch=max_batch, kv="paged",
                        block_size=block_size, tokenizer=tok)
    blocks = kv_blocks or default_kv_blocks(max_batch, lm.max_seq, block_size)
    return lm.paged_runner(blocks), tok, name


def load_engine(spec: str, *, target: Any = None, max_batch: Optional[int] = None, max_seq: Optional[int] = 512,
                kv_blocks: Optional[int] = None, block_size: int = DEFAULT_BLOCK_SIZE, prefill_chunk: int = 256,
                log=None) -> tuple[Engine, str]:
    runner, tok, name = load_runner(spec, target=target, max_batch=max_batch, max_seq=max_seq, kv_blocks=kv_blocks,
                                    block_size=block_size, log=log)
    compiled = getattr(runner, "max_batch", None)
    if max_batch is not None and compiled is not None and max_batch > compiled:
        raise ValueError(f"max_batch {max_batch} exceeds the runner's compiled batch {compiled} ({spec})")
    return Engine(runner, tok, max_batch=max_batch or compiled, prefill_chunk=prefill_chunk), name
