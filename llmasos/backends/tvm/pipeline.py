"""The Relax pipeline a build runs for a Target, and the module as its schedule rules see it.

    fusion stage (Target.pipeline_stages()[0])  -> tuning records (when given) -> Target.schedule_rules()
    -> lowering stage (Target.pipeline_stages()[1])

Used by build.py (compile_module) and tuning.py (the kernels to tune are fused_module's PrimFuncs), so
both see exactly the same kernels; neither module imports the other's internals through here.

The TVM compiler is imported inside the functions: this module is imported (through build.py) where an
exported library runs with TVM's runtime alone.
"""
from __future__ import annotations

import tvm
from tvm import tirx

from .targets import Target


def schedule_rules(spec: Target) -> list:
    """The rules a build applies to every PrimFunc not already scheduled, in order (``spec.schedule_rules()``)."""
    return spec.schedule_rules()


def pipeline_stages(spec: Target) -> tuple:
    """(fusion, lowering) pass lists of the target's pipeline (``spec.pipeline_stages()``)."""
    return spec.pipeline_stages()


def pass_config(spec: Target, cuda_graph: bool = False) -> dict:
    """The PassContext config a build compiles with (``spec.pass_config(graph_capture)``)."""
    return spec.pass_config(cuda_graph)


def relax_pipeline(spec: Target, tuning_db=None):
    """The whole Relax pipeline for ``spec``: fusion, the tuning database's records (when given: a
    ``tuning.TuningDatabase``, of which this reads ``database`` and writes ``applied``), the target's
    schedule rules, lowering."""
    from tvm import relax  # deferred: the TVM compiler (module docstring)
    from tvm.s_tir import dlight as dl

    target = spec.tvm_target()
    if spec.schedule == "none" and tuning_db is not None:
        raise ValueError(f"target '{spec.name}' has schedule='none': a tuning database cannot apply")
    rules = spec.schedule_rules()
    fusion, lowering = spec.pipeline_stages()

    @tvm.transform.module_pass(opt_level=0, name="LLMasOSPipeline")
    def pipeline(mod, _ctx):
        apply_db = [relax.transform.MetaScheduleApplyDatabase()] if tuning_db is not None else []
        schedule = [dl.ApplyDefaultSchedule(*rules)] if rules else []
        with target:
            mod = tvm.transform.Sequential(fusion)(mod)
            if tuning_db is not None:
                before = _scheduled(mod)
                with tuning_db.database:
                    mod = tvm.transform.Sequential(apply_db)(mod)
                tuning_db.applied = sorted(_scheduled(mod) - before)
            return tvm.transform.Sequential(schedule + lowering)(mod)
    return pipeline


def _scheduled(mod) -> set:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)}


def prepare_module(mod, spec: Target, cuda_graph: tuple = ()) -> tuple:
    """(module, PassContext config) as the target pipeline gets them: param transforms lifted when the
    target asks, functions marked for graph capture (``cuda_graph``: their names, on targets with
    ``graph_capture``). Tuning starts from the same module, so its records match a build's."""
    from tvm import relax  # deferred: the TVM compiler (module docstring)

    n_entries = sum(1 for gv, f in mod.functions.items() if isinstance(f, relax.Function)
                    and f.attrs is not None and "num_input" in f.attrs)
    if spec.lift_params:
        # one shared weight preparation when several entries (prefill, decode) use the same weights
        mod = relax.transform.LiftTransformParams(shared_transform=n_entries > 1)(mod)
    capture = bool(cuda_graph) and spec.graph_capture
    if capture:
        mod = spec.prepare_graph_capture(mod, tuple(cuda_graph))
    return mod, spec.pass_config(capture)


def fused_module(graphs: dict, spec: Target):
    """The Relax module of ``graphs`` (name -> Graph, as build_functions takes) as the schedule rules of a
    build see it: lowered, prepared, through the fusion stage. Its PrimFuncs are the kernels a build
    schedules: what tuning measures and kernel_stats counts."""
    from .lower import lower_functions  # deferred: the TVM compiler (module docstring)

    mod, config = prepare_module(lower_functions(graphs, spec), spec)
    fusion, _ = spec.pipeline_stages()
    with tvm.transform.PassContext(opt_level=3, config=config), spec.tvm_target():
        return tvm.transform.Sequential(fusion)(mod)
