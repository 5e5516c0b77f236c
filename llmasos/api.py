"""``llmasos.compile`` / ``llmasos.load``: the front door for one module (torch.export) onto the compile
driver (llmasos/driver.py), and the loader of its artifacts."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .compiled import CompiledModel
from .driver import MAIN, CallConvention, CompileError, Source, compile_program, load_program


def compile(model, target: Any = "cpu", example_inputs: tuple = (), example_kwargs: Optional[dict] = None, *,
            dynamic_shapes: Any = "auto", max_batch: int = 64, max_seq: Optional[int] = None,
            name: Optional[str] = None, passes: Any = "fuse", calibration=None, tuning_db=None) -> CompiledModel:
    """Compile an ``nn.Module`` or ``torch.export.ExportedProgram`` for ``target``.

    dynamic_shapes="auto" makes dim 0 of every tensor input the symbol ``batch`` (1..max_batch) and dim 1 of
    inputs of rank >= 2 the symbol ``seq`` (2..max_seq; default: the model config's maximum positions capped at
    4096; more than the model's positions is refused), so one compile serves every batch and sequence size in
    range. Pass None for static shapes, or a torch.export ``dynamic_shapes`` spec.

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
    _check_bounds(max_batch, max_seq)
    if isinstance(dynamic_shapes, str) and dynamic_shapes != "auto":
        raise CompileError(f"dynamic_shapes must be 'auto', None or a torch.export dynamic_shapes spec, "
                           f"got {dynamic_shapes!r}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise CompileError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")

    def frontend(_spec) -> Source:
        # deferred: torch and the torch.export frontend (importing llmasos does not load torch)
        import torch

        from .frontends import torch_export
        if isinstance(model, torch.export.ExportedProgram):
            imported = torch_export.import_exported_program(model, name=name)
        elif isinstance(model, torch.nn.Module):
            if not example_inputs and not example_kwargs:
                raise CompileError("llmasos.compile needs example_inputs (or example_kwargs) to trace an nn.Module")
            _check_module(model, tuple(example_inputs), dict(example_kwargs or {}), dynamic_shapes, max_batch,
                          max_seq)
            imported = torch_export.import_module(model, tuple(example_inputs), example_kwargs,
                                                  dynamic_shapes=dynamic_shapes, max_batch=max_batch,
                                                  max_seq=max_seq, name=name or type(model).__name__)
        else:
            raise CompileError(f"llmasos.compile takes a torch.nn.Module or torch.export.ExportedProgram, "
                               f"got {type(model).__name__}")
        convention = CallConvention(imported.in_spec, imported.out_spec, list(imported.out_leaves),
                                    list(imported.input_names))
        return Source({MAIN: imported.graph}, {MAIN: convention})

    return CompiledModel(compile_program("model", frontend, target, passes=passes, calibration=calibration,
                                         tuning_db=tuning_db))


def _check_bounds(max_batch, max_seq) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise CompileError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if max_seq is not None and (isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 2):
        raise CompileError(f"max_seq must be None (the model's positions) or an int >= 2, got {max_seq!r}")


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def model_positions(model):
    """(config field, value) of the model's maximum positions, or None when its config does not say."""
    cfg = getattr(model, "config", None)
    for attr in POSITION_FIELDS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return attr, v
    return None


def _check_module(model, args: tuple, kwargs: dict, dynamic_shapes, max_batch: int, max_seq) -> None:
    """Example inputs of a kind torch.export takes, parameters with data, bounds the model and the examples fit.

    max_seq beyond the model's positions is refused: compiled gathers clamp an out-of-range position where
    PyTorch raises, so it would return wrong numbers. (A RoPE model may run longer: raise its
    config.max_position_embeddings, the documented opt-in, knowing the quality past training length is yours.)"""
    import torch  # deferred: torch (importing llmasos does not load it)
    from torch.utils import _pytree as pytree

    for where, value in [*((f"example_inputs[{i}]", a) for i, a in enumerate(args)),
                         *((f"example_kwargs[{k!r}]", v) for k, v in kwargs.items())]:
        leaves = pytree.tree_leaves(value)
        for leaf in leaves:
            if isinstance(leaf, np.ndarray):
                raise CompileError(f"{where} is a numpy array; example inputs are torch tensors "
                                   f"(torch.from_numpy(x))")
            if not isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))):
                raise CompileError(f"{where} holds a {type(leaf).__name__}; example inputs are torch tensors (or "
                                   f"ints, floats, bools, strings and None, which are baked into the program)")
        if isinstance(value, (list, tuple)) and leaves and not any(isinstance(x, torch.Tensor) for x in leaves):
            raise CompileError(f"{where} is a {type(value).__name__} of numbers; pass a tensor "
                               f"(torch.tensor({str(value)[:40]}))")
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if not tensors:
        raise CompileError("llmasos.compile needs at least one torch tensor among the example inputs")
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CompileError(f"the model's {n} is on the meta device (shapes without data): load or "
                               f"initialise its weights (e.g. model.to_empty(device='cpu') then load a state dict)")
    positions = model_positions(model)
    if positions is not None and max_seq is not None and max_seq > positions[1]:
        raise CompileError(f"max_seq={max_seq} exceeds the model's {positions[1]} positions "
                           f"(config.{positions[0]}): positions past them have no embedding (compiled gathers "
                           f"would clamp them to wrong numbers); pass max_seq <= {positions[1]}")
    if dynamic_shapes == "auto":
        seq_cap = max_seq if max_seq is not None else (positions[1] if positions else None)
        for t in tensors:
            if t.dim() >= 1 and t.shape[0] > max_batch:
                raise CompileError(f"an example input has batch {t.shape[0]} > max_batch={max_batch}; raise "
                                   f"max_batch or use a smaller example")
            if seq_cap is not None and t.dim() >= 2 and t.shape[1] > seq_cap:
                raise CompileError(f"an example input has length {t.shape[1]} (dim 1) > max_seq={seq_cap}; "
                                   f"raise max_seq or use a shorter example")


def load(path) -> CompiledModel:
    """Load a compiled model artifact written by ``CompiledModel.save`` (llmasos/artifact.py)."""
    return CompiledModel(load_program(path, kind="model"))
