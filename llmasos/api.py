"""``llmasos.compile`` / ``llmasos.load``: the front door for one module (torch.export) onto the compile
driver (llmasos/driver.py), and the loader of its artifacts."""
from __future__ import annotations

from typing import Any, Optional

from .compiled import CompiledModel
from .driver import MAIN, CallConvention, Source, compile_program, load_program


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
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)

    def frontend(_spec) -> Source:
        # deferred: torch and the torch.export frontend (importing llmasos does not load torch)
        import torch

        from .frontends import torch_export
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
        convention = CallConvention(imported.in_spec, imported.out_spec, list(imported.out_leaves),
                                    list(imported.input_names))
        return Source({MAIN: imported.graph}, {MAIN: convention})

    return CompiledModel(compile_program("model", frontend, target, passes=passes, calibration=calibration,
                                         tuning_db=tuning_db))


def load(path) -> CompiledModel:
    """Load a compiled model artifact written by ``CompiledModel.save`` (llmasos/artifact.py)."""
    return CompiledModel(load_program(path, kind="model"))
