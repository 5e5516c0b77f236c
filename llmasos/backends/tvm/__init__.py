"""The Apache TVM backend: Graph -> Relax IRModule -> compiled library run by the Relax VM.

    from llmasos.backends.tvm import build
    exe = build(graph, "cpu")        # or "cuda", "cuda:sm_80", a TVM target dict, a TargetSpec
    outs = exe(x)                    # numpy in -> numpy out, torch in -> torch out
    exe.export_library("model.so"); Executable.load("model.so", graph, graph.param_data, "cpu")
"""
from .lowering import LoweringError, LowerContext, register_lowering, get_lowering, missing_lowerings, tvm_dtype
from .lower import lower
from .targets import TargetSpec, register_target, resolve_target, known_targets
from .build import BuildError, Executable, Signature, build, compile_module, relax_pipeline

__all__ = ["LoweringError", "LowerContext", "register_lowering", "get_lowering", "missing_lowerings", "tvm_dtype",
           "lower", "TargetSpec", "register_target", "resolve_target", "known_targets", "BuildError", "Executable",
           "Signature", "build", "compile_module", "relax_pipeline"]
