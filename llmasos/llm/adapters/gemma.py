"""Gemma (1): Llama with a GeGLU MLP (tanh GELU), embeddings scaled by sqrt(hidden) and RMSNorm weights stored
as an offset from one (transformers scales by 1 + weight: the map adds the one). The head is tied to the
embedding. Gemma-2's soft-capping, sliding layers and extra norms are not modelled: model_type "gemma2" has
no adapter and is refused."""
from __future__ import annotations

import math

from ..adapter import Adapter, register_adapter, w
from ..config import DecoderConfig
from .llama import llama_config, llama_weights

GEMMA_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def gemma_config(c) -> DecoderConfig:
    act = getattr(c, "hidden_activation", None) or c.hidden_act
    return llama_config(c, family="gemma", acts=GEMMA_ACTS, act=act, embed_scale=math.sqrt(c.hidden_size))


def gemma_weights(cfg: DecoderConfig) -> dict:
    out = llama_weights(cfg)
    for k, src in out.items():
        if k == "norm.weight" or k.endswith(("norm1.weight", "norm2.weight")):
            out[k] = w(*src.names, offset=1.0)
    return out


ADAPTER = register_adapter(Adapter("gemma", ("gemma",), gemma_config, gemma_weights, prefix="model.",
                                   notes="Gemma 1 only (no soft-capping); default RoPE"))
