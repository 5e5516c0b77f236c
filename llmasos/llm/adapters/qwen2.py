"""Qwen2: Llama with biases on the q, k and v projections (none on o_proj or the MLP).

Sliding-window layers (``use_sliding_window`` with some ``layer_types`` "sliding_attention") cap the
model's positions at the window, where full attention and the window agree (see llama.llama_config)."""
from __future__ import annotations

from ..adapter import Adapter, register_adapter
from ..config import DecoderConfig
from .llama import llama_config, llama_weights


def qwen2_config(c) -> DecoderConfig:
    window = None
    if getattr(c, "use_sliding_window", False) and getattr(c, "sliding_window", None):
        types = getattr(c, "layer_types", None)
        if types is None or "sliding_attention" in types:
            window = c.sliding_window
    return llama_config(c, family="qwen2", qkv_bias=True, window=window)


ADAPTER = register_adapter(Adapter("qwen2", ("qwen2",), qwen2_config, llama_weights, prefix="model.",
                                   notes="sliding-window layers: positions capped at the window"))
