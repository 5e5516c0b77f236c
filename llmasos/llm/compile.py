"""``llmasos.compile_lm``: the LM front door onto the compile driver (llmasos/driver.py).

The model is rebuilt as llmasos.llm.model.Decoder (weights mapped from a transformers causal LM by its
family's adapter, llmasos/llm/adapters/; a Decoder given directly; or a preset name with random weights),
exported twice through torch.export (prefill with a symbolic sequence length, decode with one token) and
imported; the driver then verifies both graphs, runs the same pass pipeline as ``llmasos.compile`` and builds
one library with both functions sharing one set of weights. The result is a CompiledProgram of kind "lm",
viewed as a CompiledLM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from . import presets
from ..backends.tvm.tuning import tune_functions
from ..driver import CompileError, Source, compile_program, lower, prepare
from ..frontends import torch_export
from .export import export_decoder
from .model import Decoder, as_decoder  # noqa: F401  (as_decoder: re-exported)
from .runtime import DECODE, PREFILL, RAGGED, CompiledLM


KV_LAYOUTS = ("contiguous", "paged")


def check_kv(kv, block_size) -> Optional[int]:
    """The block size a kv layout compiles with (None: contiguous), or a CompileError naming what is allowed."""
    if kv not in KV_LAYOUTS:
        raise CompileError(f"kv must be one of {KV_LAYOUTS}, got {kv!r}")
    if kv == "contiguous":
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 1024:
        raise CompileError(f"block_size must be an int in 1..1024 (positions per KV block), got {block_size!r}")
    return block_size


def _decoder(model, dtype) -> Decoder:
    """as_decoder with its refusals (an unknown family or preset, meta weights, a wrong kind) as CompileError."""
    try:
        return as_decoder(model, dtype)
    except (ValueError, TypeError) as e:
        raise CompileError(str(e)) from None


def lm_source(model, spec, *, max_seq: Optional[int], max_batch: int, batch: Optional[int], dtype,
              cuda_graph: bool = False, kv: str = "contiguous", block_size: int = 16, ragged: bool = True) -> Source:
    """The decoder's prefill and decode graphs as the driver takes them (also what tune_lm tunes, so a tuning
    database's kernels are the ones a later compile_lm looks up). kv="paged": the paged twin's graphs
    (block table and block pools, llmasos/llm/paged.py)."""
    bs = check_kv(kv, block_size)
    if not isinstance(ragged, bool):
        raise CompileError(f"ragged must be True or False, got {ragged!r}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if max_seq is not None and (not is_int(max_seq) or max_seq < 2):
        raise CompileError(f"max_seq must be None (min({DEFAULT_MAX_SEQ}, the model's positions)) or an int >= 2, "
                           f"got {max_seq!r}")
    if not is_int(max_batch) or max_batch < 1:
        raise CompileError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if batch is not None:
        if not is_int(batch) or batch < 1:
            raise CompileError(f"batch must be None or an int >= 1, got {batch!r}")
        max_batch = max(max_batch, batch)
    dec = _decoder(model, dtype)
    if max_seq is None:
        max_seq = min(DEFAULT_MAX_SEQ, dec.cfg.max_positions)
    if max_seq > dec.cfg.max_positions:
        raise CompileError(f"max_seq={max_seq} exceeds the model's {dec.cfg.max_positions} positions "
                           f"(DecoderConfig.max_positions: the position table, or a sliding window's length)")
    export_batch = batch
    if spec.symbolic_decode_batch and batch is not None and batch > 1:
        # DLight schedules a decode GEMM with a symbolic batch as a low-batch GEMV (the weights stream once
        # for all rows); a static batch > 1 gets the large-M matmul tiles, ~10x slower. The CUDA graph is
        # then captured per batch size. (So tuning, which measures static shapes only, finds no decode
        # GEMM to tune at a CUDA batch > 1: a static form would make its default the slow Matmul schedule.)
        export_batch, max_batch = None, batch
    graphs = {}
    # a paged model also gets the ragged step (an engine step of decode rows and prompt chunks, unpadded)
    for phase in (PREFILL, DECODE) + ((RAGGED,) if bs is not None and ragged else ()):
        ep = export_decoder(dec, phase, export_batch, max_batch, max_seq, bs)
        graphs[phase] = torch_export.import_exported_program(ep, name=phase).graph
    # a paged model's decode step is captured only where the target says so (option paged_cuda_graph): its
    # runner then pads the rows to GRAPH_BUCKETS and stages the inputs at fixed addresses (llm/paged.py)
    use_graph = bool(cuda_graph) and spec.graph_capture and (bs is None or spec.paged_graph_capture())
    meta = {"vocab": dec.cfg.vocab, "max_seq": max_seq, "cuda_graph": use_graph,
            "config": dataclasses.asdict(dec.cfg)}
    if bs is not None:
        meta.update(kv="paged", block_size=bs)
    return Source(graphs, cuda_graph=(DECODE,) if use_graph else (), meta=meta)


DEFAULT_MAX_SEQ = 256   # compile_lm's max_seq when none is given (capped at the model's positions)


def compile_lm(model, target: Any = "cpu", *, max_seq: Optional[int] = None, max_batch: int = 8, batch: Optional[int] = None,
               dtype=None, passes: Any = "fuse", tokenizer=None, cuda_graph: bool = True,
               tuning_db=None, kv: str = "contiguous", block_size: int = 16, ragged: bool = True) -> CompiledLM:
    """Compile ``model`` for KV-cache generation on ``target``.

    max_seq: cache positions per row (prompt + generated tokens); None: min(256, the model's positions).
    More than the model's positions is refused (CompileError). batch=None compiles for any batch up to
    max_batch; an int compiles for that batch (batch 1: static shapes, the GEMV kernels; on CUDA a larger
    batch stays symbolic up to it, which DLight schedules as low-batch GEMVs). On CUDA the decode step runs
    as a CUDA graph (one per batch size) unless cuda_graph=False. dtype: cast the weights (e.g.
    torch.float16 for GPUs). passes: the pipeline run on both graphs (default "fuse"). tuning_db: a
    directory written by ``tune_lm`` / ``llmasos tune`` with the same model options: its tuned kernels
    replace the default schedules where they measured faster (``lm.timings["tuned_kernels"]`` counts them).
    kv: "contiguous" (default: a [B, Hkv, max_seq, D] cache per layer, ``generate``) or "paged" (pools of
    ``block_size``-position blocks addressed through block tables, for a serving engine:
    ``lm.paged_runner(num_blocks)``, llmasos/llm/paged.py). ragged (paged only): also build the ragged step
    (``runner.ragged_step``: a serving step's decode rows and prompt chunks packed in one call); False saves
    its compile time, and a serving engine then runs such a step as two calls.
    """
    check_kv(kv, block_size)

    def frontend(spec) -> Source:
        return lm_source(model, spec, max_seq=max_seq, max_batch=max_batch, batch=batch, dtype=dtype,
                         cuda_graph=cuda_graph, kv=kv, block_size=block_size, ragged=ragged)
    return CompiledLM(compile_program("lm", frontend, target, passes=passes, tuning_db=tuning_db,
                                      tokenizer=tokenizer))


def tune_lm(model, target: Any = "cpu", db="llmasos.tune", *, max_seq: Optional[int] = None, max_batch: int = 8,
            batch: Optional[int] = 1, dtype=None, passes: Any = "fuse", trials_per_task: int = 64,
            ops: str = "reduce", log=None):
    """MetaSchedule-tune the kernels ``compile_lm(model, target, ...)`` with the same options builds, into
    the tuning database directory ``db`` (created or extended); returns a ``tuning.TuningReport``.
    Kernels of static shape only: with an int batch (default 1) that is the whole decode step on the CPU
    and at batch 1 on CUDA (a CUDA batch > 1 stays symbolic, see lm_source); the prefill (symbolic
    length) keeps its default schedules. Pass ``tuning_db=db`` and the same options to compile_lm."""
    plan = prepare(target, passes)
    source = lower(plan, lambda spec: lm_source(model, spec, max_seq=max_seq, max_batch=max_batch, batch=batch,
                                                dtype=dtype))
    return tune_functions(source.graphs, plan.spec, db, trials_per_task=trials_per_task, ops=ops, log=log)
