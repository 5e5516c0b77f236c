"""The Apache TVM backend: Graph -> Relax IRModule -> compiled library run by the Relax VM.

    from llmasos.backends.tvm import build
    exe = build(graph, "cpu")        # or "cuda", "cuda:sm_80", a TVM target dict, a TargetSpec
    outs = exe(x)                    # numpy in -> numpy out, torch in -> torch out
    exe.export_library("model.so"); Executable.load("model.so", graph, graph.param_data, "cpu")

With TVM's runtime alone (TVM_USE_RUNTIME_LIB=1) only the lowering names (lower, register_lowering, ...)
are missing: exported libraries still load and run.
"""
from .targets import TargetSpec, register_target, resolve_target, known_targets
from .build import BuildError, Executable, Signature, build, compile_module, relax_pipeline

try:
    from .lowering import (LoweringError, LowerContext, register_lowering, get_lowering, missing_lowerings,
                           tvm_dtype)
    from .lower import lower
except (ImportError, AttributeError):
    import tvm.base
    if not getattr(tvm.base, "_RUNTIME_ONLY", False):
        raise  # with the compiler present this is a real error


__all__ = ["LoweringError", "LowerContext", "register_lowering", "get_lowering", "missing_lowerings", "tvm_dtype",
           "lower", "TargetSpec", "register_target", "resolve_target", "known_targets", "BuildError", "Executable",
           "Signature", "build", "compile_module", "relax_pipeline"]
