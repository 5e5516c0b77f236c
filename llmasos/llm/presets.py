"""The model presets: random-weight models by name, for tests, benchmarks and the command line.

Each preset is one transformers config (``model_type`` + keyword arguments; nothing is downloaded), so
the same name serves both front doors:

* ``hf_model(name)``: the transformers model with random weights (``llmasos.compile``, ``llmasos compile``);
* ``decoder_config(name)``: the llmasos Decoder's config, mapped from that same transformers config by the
  family's adapter (``compile_lm(name)``, ``llmasos bench``, bench/decode.py draw Decoder weights directly).

Every name (aliases included) appears once; ``names()`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .adapter import adapter_for
from .config import DecoderConfig


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str                  # transformers model_type: config class, model class and adapter
    config: dict = field(default_factory=dict)   # transformers config keyword arguments
    causal_lm: bool = True           # an *ForCausalLM model (False: the bare base model, e.g. BERT's encoder)
    aliases: tuple = ()
    about: str = ""


PRESETS: tuple = (
    Preset("gpt2-tiny", "gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)),
    Preset("gpt2-124m", "gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
           aliases=("gpt2-small",), about="GPT-2 124M's shape"),
    Preset("llama-tiny", "llama", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                       max_position_embeddings=64)),
    Preset("llama-135m", "llama", dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                       max_position_embeddings=2048, tie_word_embeddings=True,
                                       rms_norm_eps=1e-5, rope_theta=100000.0),
           about="SmolLM2-135M's shape and constants"),
    Preset("llama-1b", "llama", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=8192, vocab_size=32000,
                                     max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                                     tie_word_embeddings=False),
           about="a Llama-1B shape (TinyLlama-like)"),
    Preset("qwen2-tiny", "qwen2", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                       max_position_embeddings=64)),
    Preset("mistral-tiny", "mistral", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                           vocab_size=128, max_position_embeddings=64, sliding_window=32),
           about="sliding window 32: compile_lm takes max_seq <= 32"),
    Preset("phi3-tiny", "phi3", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           about="fused qkv and gate|up projections"),
    Preset("gemma-tiny", "gemma", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128,
                                       max_position_embeddings=64),
           about="GeGLU, sqrt(hidden) embedding scale, 1 + weight RMSNorm"),
    Preset("bert-tiny", "bert", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, max_position_embeddings=64),
           causal_lm=False, about="an encoder: llmasos.compile only"),
)


def _index(presets) -> dict:
    out = {}
    for p in presets:
        for n in (p.name, *p.aliases):
            if n in out:
                raise ValueError(f"preset name {n!r} is defined twice ({out[n].name} and {p.name})")
            out[n] = p
    return out


_BY_NAME = _index(PRESETS)


def names(decoders_only: bool = False) -> list:
    """Every preset name and alias (``decoders_only``: those ``compile_lm`` takes)."""
    return sorted(n for n, p in _BY_NAME.items() if not decoders_only or is_decoder(n))


def get(name: str) -> Preset:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(names())}") from None


def is_decoder(name: str) -> bool:
    """Whether ``compile_lm`` can take the preset: a causal LM of a family with an adapter."""
    p = get(name)
    if not p.causal_lm:
        return False
    try:
        adapter_for(p.model_type)
    except ValueError:
        return False
    return True


def hf_config(name: str, **overrides):
    """The preset's transformers config (``use_cache=False`` for causal LMs: torch.export of the module)."""
    import transformers  # deferred: transformers is heavy and optional (the `llm` / `dev` extras)
    p = get(name)
    kw = {**p.config, **overrides}
    if p.causal_lm:
        kw.setdefault("use_cache", False)
    return transformers.AutoConfig.for_model(p.model_type, **kw)


def hf_model(name: str, seed: int = 0, **overrides):
    """The preset as a transformers model with random weights (torch seeded with ``seed``), in eval mode."""
    import torch  # deferred: torch and transformers are heavy
    import transformers
    cfg = hf_config(name, **overrides)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if get(name).causal_lm else transformers.AutoModel
    return auto.from_config(cfg).eval()


def decoder_config(name: str, **overrides) -> DecoderConfig:
    """The llmasos Decoder config of a decoder preset: its transformers config mapped by the family's adapter
    (``overrides`` are transformers config fields)."""
    p = get(name)
    if not is_decoder(name):
        raise ValueError(f"preset {name!r} ({p.model_type}) is not a decoder-only causal LM; compile_lm takes "
                         f"{', '.join(names(decoders_only=True))}")
    return DecoderConfig.from_hf(hf_config(name, **overrides))
