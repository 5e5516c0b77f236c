"""DecoderConfig: the shape and options of the static-KV-cache decoder (llmasos/llm/model.py).

Plain data, no torch: a saved LM artifact records it, and ``DecoderConfig.from_hf`` maps a transformers
config through the adapter of its ``model_type`` (llmasos/llm/adapters/).
"""
from __future__ import annotations

from dataclasses import dataclass

from .adapter import adapter_for

ARCHS = ("llama", "gpt2")
MLP_ACTS = ("silu", "gelu_tanh")


PREFILL, DECODE = "prefill", "decode"     # the two entry functions of a compiled LM
RAGGED = "ragged"   # a paged LM's third: one packed step of tokens of several sequences (Decoder.ragged_twin)


def max_ragged_tokens(max_batch: int, max_seq: int) -> int:
    """The most tokens one ragged step takes: every sequence's whole length."""
    return max_batch * max_seq


@dataclass(frozen=True)
class DecoderConfig:
    arch: str               # "llama": RMSNorm, RoPE, SwiGLU, no wpe; "gpt2": LayerNorm, learned positions, GELU
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    max_positions: int
    norm_eps: float
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    qkv_bias: bool = False  # biases on the q/k/v projections of a llama-arch model (Qwen2); gpt2 has every bias
    mlp_act: str = "silu"   # a llama-arch gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU: Gemma)
    embed_scale: float = 1.0  # the embeddings are multiplied by it (Gemma: sqrt(hidden))

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"DecoderConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"DecoderConfig: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.arch == "gpt2" and (self.kv_heads != self.heads or self.heads * self.head_dim != self.hidden):
            raise ValueError("DecoderConfig: gpt2 needs kv_heads == heads and heads * head_dim == hidden")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"DecoderConfig.mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"DecoderConfig: RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def linear_bias(self) -> bool:
        """Whether every projection has a bias (GPT-2)."""
        return self.arch == "gpt2"

    @staticmethod
    def from_hf(hf_config) -> "DecoderConfig":
        """From a transformers config, through the adapter registered for its ``model_type`` (refuses what the
        Decoder does not model, naming the option)."""
        return adapter_for(hf_config, "DecoderConfig.from_hf").config(hf_config)
