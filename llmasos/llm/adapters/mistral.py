"""Mistral: Llama with a sliding attention window.

The Decoder attends to every cached position. With a window of w tokens (``sliding_window``; None in
Mistral v0.2+ configs) that is exact while a sequence is at most w tokens long, so the adapter caps the
model's positions at w: ``compile_lm(max_seq > w)`` is refused ("exceeds the model's w positions") rather
than computed with the wrong attention."""
from __future__ import annotations

from ..adapter import Adapter, register_adapter
from ..config import DecoderConfig
from .llama import llama_config, llama_weights


def mistral_config(c) -> DecoderConfig:
    return llama_config(c, family="mistral", window=getattr(c, "sliding_window", None))


ADAPTER = register_adapter(Adapter("mistral", ("mistral",), mistral_config, llama_weights, prefix="model.",
                                   notes="sliding window: positions capped at the window"))
