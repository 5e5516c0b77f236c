"""LLMasOS: a compiler that makes large language models cheap and fast to run.

    cm = llmasos.compile(model, target="cpu", example_inputs=(ids,))
    out = cm(ids); print(cm.ir); cm.save("m.llmasos"); cm2 = llmasos.load("m.llmasos")

    lm = llmasos.compile_lm(hf_model, target="cuda", max_seq=512, tokenizer=tok)   # KV-cache generation
    print(lm.generate("The capital of France is", max_new_tokens=32))
"""
__version__ = "0.1.0"

from .api import compile, load  # noqa: E402,F401  (shadowing builtins.compile is the point of the API)
from .compiled import CompiledModel, InputError  # noqa: E402,F401
from .artifact import ArtifactError  # noqa: E402,F401
from .driver import CompiledProgram, CompileError, MemoryBudgetError  # noqa: E402,F401
from .distill import distill  # noqa: E402,F401
from .llm import CompiledLM, Sampling, compile_lm, generate, load_lm, tune_lm  # noqa: E402,F401
# energy: measurement windows (llmasos.energy.measure), carbon, offsets; instruments CompiledLM.generate's stats
from . import energy  # noqa: E402,F401
from .energy.planner import plan_energy  # noqa: E402,F401
from .parallel import launch, plan_parallel  # noqa: E402,F401  (docs/parallel.md)

__all__ = ["compile", "load", "CompiledModel", "CompiledProgram", "InputError", "ArtifactError", "CompileError",
           "MemoryBudgetError", "distill",
           "CompiledLM", "Sampling", "compile_lm", "tune_lm", "load_lm", "generate", "energy", "plan_energy",
           "launch", "plan_parallel",
           "__version__"]
