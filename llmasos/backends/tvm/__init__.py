"""The Apache TVM backend: Graph -> Relax IRModule -> compiled library run by the Relax VM.

    from llmasos.backends.tvm import build
    exe = build(graph, "cpu")        # or "cuda", "cuda:sm_80", a TVM target dict, a Target
    outs = exe(x)                    # numpy in -> numpy out, torch in -> torch out
    exe.export_library("model.so"); Executable.load("model.so", graph, graph.param_data, "cpu")

With TVM's runtime alone (TVM_USE_RUNTIME_LIB=1) only the lowering names (lower, register_lowering, ...)
are missing: exported libraries still load and run.
"""
import os as _os

# TVM's CPU thread pool defaults to half the visible cores (it assumes two hyperthreads per core): one
# thread on a 2-vCPU machine. Use every core this process may run on, unless the user chose a count.
if "TVM_NUM_THREADS" not in _os.environ and "OMP_NUM_THREADS" not in _os.environ:
    try:
        _os.environ["TVM_NUM_THREADS"] = str(len(_os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        _os.environ["TVM_NUM_THREADS"] = str(_os.cpu_count() or 1)

# Idle workers of TVM's pool spin (300000 rounds by default) before they sleep. On a machine shared with
# other processes a spinning worker burns the time slice another thread of the same kernel needs, and
# every fork/join waits for the OS: SmolLM2 int4 decode on a busy 2-core VM ran at 0.4 tokens/s with 2
# threads (1 thread: 5.0; spin 2000: still 0.4) and at 20.8 with no spinning (issue 16, docs/llm.md).
# On an idle machine a short spin wins instead (2 threads: 1.16-1.20x llama.cpp with 30000 rounds, ~0.9-1.3x
# with none, same rounds): so unless TVM_THREAD_POOL_SPIN_COUNT is set, spin 30000 rounds when the
# 1-minute load average leaves the cores mostly free at import, else 0 (threads.spin_count says which).
IDLE_SPIN_COUNT = 30000


def _auto_spin_count() -> int:
    """IDLE_SPIN_COUNT when the 1-minute load average is under half the cores this process may use, else 0."""
    try:
        cores = len(_os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = _os.cpu_count() or 1
    try:
        load = _os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average: assume shared
        return 0
    return IDLE_SPIN_COUNT if load < 0.5 * cores else 0


if "TVM_THREAD_POOL_SPIN_COUNT" not in _os.environ:
    _os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = str(_auto_spin_count())

from .targets import (CPUTarget, CUDATarget, Target, TargetSpec, UnknownTargetError, known_targets,  # noqa: E402
                      register_target, resolve_target, target_source)
from .build import (BuildError, Executable, Signature, build, build_functions, compile_module,  # noqa: E402
                    relax_pipeline)

try:
    from .lowering import (LoweringError, LowerContext, register_lowering, get_lowering, missing_lowerings,
                           tvm_dtype)
    from .lower import lower, lower_functions
except (ImportError, AttributeError):
    import tvm.base
    if not getattr(tvm.base, "_RUNTIME_ONLY", False):
        raise  # with the compiler present this is a real error


__all__ = ["LoweringError", "LowerContext", "register_lowering", "get_lowering", "missing_lowerings", "tvm_dtype",
           "lower", "lower_functions", "Target", "CPUTarget", "CUDATarget", "TargetSpec", "UnknownTargetError",
           "register_target", "resolve_target", "known_targets", "target_source", "BuildError", "Executable",
           "Signature", "build", "build_functions", "compile_module", "relax_pipeline"]
