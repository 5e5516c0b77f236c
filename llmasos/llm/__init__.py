"""LLM inference: a static-KV-cache decoder, its prefill/decode compilation and generation."""

from . import adapters  # noqa: F401  (registers the built-in model families: llama, gpt2, qwen2, mistral)
from ..driver import load_program
from .paged import PagedRunner, TorchPagedRunner, paged_generate
from .runtime import CompiledLM, GenerationError, GenerationStats
from .sampling import Sampling


def compile_lm(model, target="cpu", **kwargs) -> CompiledLM:
    """See llmasos.llm.compile.compile_lm."""
    from .compile import compile_lm as _compile_lm  # deferred: torch (the Decoder, torch.export)
    return _compile_lm(model, target, **kwargs)


def tune_lm(model, target="cpu", db="llmasos.tune", **kwargs):
    """See llmasos.llm.compile.tune_lm."""
    from .compile import tune_lm as _tune_lm  # deferred: torch (the Decoder, torch.export)
    return _tune_lm(model, target, db, **kwargs)


def load_lm(path, target=None) -> CompiledLM:
    """Load a CompiledLM saved with ``CompiledLM.save`` (needs only TVM's runtime; ``target`` overrides the
    saved one, e.g. another CUDA arch)."""
    return CompiledLM(load_program(path, target, kind="lm"))


def generate(model, prompts, max_new_tokens: int = 32, **kwargs):
    """``model.generate(...)`` for a CompiledLM or a saved LM artifact path."""
    lm = model if isinstance(model, CompiledLM) else load_lm(model)
    return lm.generate(prompts, max_new_tokens, **kwargs)


__all__ = ["CompiledLM", "GenerationError", "GenerationStats", "PagedRunner", "Sampling", "TorchPagedRunner",
           "paged_generate", "compile_lm", "tune_lm", "load_lm", "generate"]
