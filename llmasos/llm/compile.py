"""``llmasos.compile_lm``: a decoder-only LM -> prefill + decode functions sharing weights -> CompiledLM.

The model is rebuilt as llmasos.llm.model.Decoder (weights copied from transformers' Llama / GPT-2, or a
Decoder given directly), exported twice through torch.export (prefill with a symbolic sequence length,
decode with one token), imported into the IR, optimised by the same pass pipeline as ``llmasos.compile``,
and built into one library.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from .runtime import DECODE, PREFILL, CompiledLM


def as_decoder(model, dtype=None, device=None):
    """An export-mode Decoder for ``model``: a Decoder, a transformers causal LM of a registered family, or the
    name of a decoder preset (random weights: for benchmarks)."""
    import torch

    from .. import presets
    from .model import Decoder

    if isinstance(model, str):
        if model not in presets.names(decoders_only=True):
            raise ValueError(f"unknown model {model!r}: pass a Decoder, a transformers causal LM or one of the "
                             f"presets {', '.join(presets.names(decoders_only=True))}")
        return Decoder.random(presets.decoder_config(model), mode="export", dtype=dtype or torch.float32,
                              device=device)
    if isinstance(model, Decoder):
        if model.mode != "export":
            m = Decoder(model.cfg, "export")
            m.load_state_dict(model.state_dict(), strict=False)
            model = m.to(dtype=model.dtype, device=model.embed.weight.device).eval()
        return model.to(dtype=dtype) if dtype is not None else model
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return Decoder.from_hf(model, mode="export", dtype=dtype)
    raise TypeError(f"compile_lm takes a llmasos Decoder, a transformers causal LM (Llama, GPT-2, Qwen2, Mistral...) "
                    f"or a preset name, got {type(model).__name__}")


def lm_graphs(model, spec, *, max_seq: int, max_batch: int, batch: Optional[int], dtype, passes, timings: dict):
    """(decoder, {"prefill": graph, "decode": graph}, max_batch) as compile_lm builds them: also what
    tune_lm tunes, so a tuning database's kernels are the ones a later compile_lm looks up."""
    from ..frontends import torch_export
    from ..ir.verifier import verify
    from ..passes import PassManager
    from .export import export_decoder

    pipeline = PassManager(passes) if passes else None
    if not isinstance(max_seq, int) or max_seq < 2:
        raise ValueError(f"max_seq must be an int >= 2, got {max_seq!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if batch is not None:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be None or an int >= 1, got {batch!r}")
        max_batch = max(max_batch, batch)
    t0 = time.perf_counter()
    dec = as_decoder(model, dtype)
    if max_seq > dec.cfg.max_positions:
        raise ValueError(f"max_seq {max_seq} exceeds the model's {dec.cfg.max_positions} positions")
    graphs = {}
    export_batch = batch
    if spec.device == "cuda" and batch is not None and batch > 1:
        # DLight schedules a decode GEMM with a symbolic batch as a low-batch GEMV (the weights stream once
        # for all rows); a static batch > 1 gets the large-M matmul tiles, ~10x slower. The CUDA graph is
        # then captured per batch size. (So tuning, which measures static shapes only, finds no decode
        # GEMM to tune at a CUDA batch > 1: a static form would make its default the slow Matmul schedule.)
        export_batch, max_batch = None, batch
    for phase in (PREFILL, DECODE):
        ep = export_decoder(dec, phase, export_batch, max_batch, max_seq)
        graphs[phase] = torch_export.import_exported_program(ep, name=phase).graph
        verify(graphs[phase])
    timings["import_s"] = time.perf_counter() - t0
    if pipeline is not None:
        t0 = time.perf_counter()
        graphs = {k: pipeline.run(g) for k, g in graphs.items()}
        timings["passes_s"] = time.perf_counter() - t0
    return dec, graphs, max_batch


def compile_lm(model, target: Any = "cpu", *, max_seq: int = 256, max_batch: int = 8, batch: Optional[int] = None,
               dtype=None, passes: Any = "fuse", tokenizer=None, cuda_graph: bool = True,
               tuning_db=None) -> CompiledLM:
    """Compile ``model`` for KV-cache generation on ``target``.

    max_seq: cache positions per row (prompt + generated tokens). batch=None compiles for any batch up to
    max_batch; an int compiles for that batch (batch 1: static shapes, the GEMV kernels; on CUDA a larger
    batch stays symbolic up to it, which DLight schedules as low-batch GEMVs). On CUDA the decode step runs
    as a CUDA graph (one per batch size) unless cuda_graph=False. dtype: cast the weights (e.g.
    torch.float16 for GPUs). passes: the pipeline run on both graphs (default "fuse"). tuning_db: a
    directory written by ``tune_lm`` / ``llmasos tune`` with the same model options: its tuned kernels
    replace the default schedules where they measured faster (``lm.timings["tuned_kernels"]`` counts them).
    """
    from ..backends.tvm import build_functions, resolve_target

    spec = resolve_target(target)
    if tuning_db is not None:
        from ..backends.tvm.tuning import TuningDatabase
        tuning_db = TuningDatabase.open(tuning_db, spec)  # a bad database fails before the slow work
    timings = {}
    dec, graphs, max_batch = lm_graphs(model, spec, max_seq=max_seq, max_batch=max_batch, batch=batch,
                                       dtype=dtype, passes=passes, timings=timings)
    t0 = time.perf_counter()
    use_graph = bool(cuda_graph) and spec.device == "cuda"
    exe = build_functions(graphs, spec, cuda_graph=(DECODE,) if use_graph else (), tuning_db=tuning_db)
    timings["build_s"] = time.perf_counter() - t0
    if exe.tuned_kernels is not None:
        timings["tuned_kernels"] = len(exe.tuned_kernels)
    return CompiledLM(exe, vocab=dec.cfg.vocab, max_seq=max_seq, config=dec.cfg, tokenizer=tokenizer,
                      graphs=graphs, cuda_graph=use_graph, timings=timings)


def tune_lm(model, target: Any = "cpu", db="llmasos.tune", *, max_seq: int = 256, max_batch: int = 8,
            batch: Optional[int] = 1, dtype=None, passes: Any = "fuse", trials_per_task: int = 64,
            ops: str = "reduce", log=None):
    """MetaSchedule-tune the kernels ``compile_lm(model, target, ...)`` with the same options builds, into
    the tuning database directory ``db`` (created or extended); returns a ``tuning.TuningReport``.
    Kernels of static shape only: with an int batch (default 1) that is the whole decode step on the CPU
    and at batch 1 on CUDA (a CUDA batch > 1 stays symbolic, see lm_graphs); the prefill (symbolic
    length) keeps its default schedules. Pass ``tuning_db=db`` and the same options to compile_lm."""
    from ..backends.tvm import resolve_target
    from ..backends.tvm.tuning import tune_functions

    spec = resolve_target(target)
    _, graphs, _ = lm_graphs(model, spec, max_seq=max_seq, max_batch=max_batch, batch=batch, dtype=dtype,
                             passes=passes, timings={})
    return tune_functions(graphs, spec, db, trials_per_task=trials_per_task, ops=ops, log=log)
