"""``llmasos.compile``: torch model -> IR (torch.export frontend) -> verified -> TVM executable."""
from __future__ import annotations

import time
from typing import Any, Optional

from .compiled import CompiledModel, Signature


def compile(model, target: Any = "cpu", example_inputs: tuple = (), example_kwargs: Optional[dict] = None, *,
            dynamic_shapes: Any = "auto", max_batch: int = 64, max_seq: Optional[int] = None,
            name: Optional[str] = None, passes: Any = "fuse", calibration=None, tuning_db=None) -> CompiledModel:
    """Compile an ``nn.Module`` or ``torch.export.ExportedProgram`` for ``target``.

    dynamic_shapes="auto" makes dim 0 of every tensor input the symbol ``batch`` (1..max_batch) and dim 1 of
    inputs of rank >= 2 the symbol ``seq`` (2..max_seq, default: the model's maximum positions), so one
    compile serves every batch and sequence size in range. Pass None for static shapes, or a
    torch.export ``dynamic_shapes`` spec.

    ``passes`` is the optimization pipeline run on the imported graph before the backend builds it: a
    pipeline string (``"fuse"``, the default; ``"canonicalize,fuse,dce"``), a list of passes, or
    None/"" for none. ``calibration`` (a ``Calibration`` or a list of token-id batches) feeds the
    data-driven passes (``quantize{method=gptq}``, ``prune{method=wanda}``, ...); it is checked against the
    imported graph before any pass runs.

    ``tuning_db``: a directory of MetaSchedule records (``tuning.tune_functions({"main": cm.graph}, target,
    db)`` on a model compiled with the same options, or ``llmasos tune`` for LMs): its kernels replace the
    default schedules where they measured faster. Only static-shape kernels are tuned, so compile with
    ``dynamic_shapes=None`` to tune everything.
    """
    import torch

    from .backends.tvm import build, resolve_target
    from .frontends import torch_export
    from .ir.verifier import verify
    from .passes import PassManager

    spec = resolve_target(target)  # fail on a bad target before the slow work
    if tuning_db is not None:
        from .backends.tvm.tuning import TuningDatabase
        tuning_db = TuningDatabase.open(tuning_db, spec)  # ... and on a bad tuning database
    pipeline = PassManager(passes, calibration=calibration) if passes else None  # ... and on a bad pipeline
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    timings = {}
    t0 = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        imported = torch_export.import_exported_program(model, name=name)
    elif isinstance(model, torch.nn.Module):
        if not example_inputs and not example_kwargs:
            raise ValueError("llmasos.compile needs example_inputs (or example_kwargs) to trace an nn.Module")
        imported = torch_export.import_module(model, tuple(example_inputs), example_kwargs,
                                              dynamic_shapes=dynamic_shapes, max_batch=max_batch,
                                              max_seq=max_seq, name=name or type(model).__name__)
    else:
        raise TypeError(f"llmasos.compile takes a torch.nn.Module or torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    timings["import_s"] = time.perf_counter() - t0
    graph = imported.graph
    verify(graph)
    if pipeline is not None:
        t0 = time.perf_counter()
        graph = pipeline.run(graph)
        timings["passes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exe = build(graph, spec, tuning_db=tuning_db)
    timings["build_s"] = time.perf_counter() - t0
    sig = Signature(imported.in_spec, imported.out_spec, list(imported.out_leaves), list(imported.input_names))
    return CompiledModel(graph, exe, sig, spec, timings)


def load(path) -> CompiledModel:
    """Load a compiled artifact written by ``CompiledModel.save``."""
    from .artifact import load as _load
    return _load(path)
