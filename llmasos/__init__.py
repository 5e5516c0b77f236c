"""LLMasOS: a compiler that makes large language models cheap and fast to run.

    cm = llmasos.compile(model, target="cpu", example_inputs=(ids,))
    out = cm(ids); print(cm.ir); cm.save("m.llmasos"); cm2 = llmasos.load("m.llmasos")
"""
__version__ = "0.1.0"

from .api import compile, load  # noqa: E402,F401  (shadowing builtins.compile is the point of the API)
from .compiled import CompiledModel, InputError  # noqa: E402,F401
from .artifact import ArtifactError  # noqa: E402,F401
from .distill import distill  # noqa: E402,F401

__all__ = ["compile", "load", "CompiledModel", "InputError", "ArtifactError", "distill", "__version__"]
