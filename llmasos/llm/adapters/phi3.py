"""Phi-3: Llama with fused projections -- one qkv_proj ([q; k; v] rows, our wqkv as it is) and one gate_up_proj
([gate; up] rows, split into our w1 and w3) -- and a sliding window (``sliding_window``) that caps the
model's positions, as for Mistral. LongRoPE (the 128k variants' rope_scaling) and a partial rotary factor are
refused by llama_config."""
from __future__ import annotations

from ..adapter import Adapter, register_adapter, w
from ..config import DecoderConfig
from .llama import llama_config


def phi3_config(c) -> DecoderConfig:
    return llama_config(c, family="phi3", window=getattr(c, "sliding_window", None))


def phi3_weights(cfg: DecoderConfig) -> dict:
    out = {"embed.weight": w("{p}embed_tokens.weight"), "norm.weight": w("{p}norm.weight"),
           "lm_head.weight": w("lm_head.weight", fallback="{p}embed_tokens.weight")}
    f = cfg.ffn
    for i in range(cfg.layers):
        h, o = f"{{p}}layers.{i}.", f"blocks.{i}."
        out[o + "attn.wqkv.weight"] = w(h + "self_attn.qkv_proj.weight")
        out[o + "attn.wo.weight"] = w(h + "self_attn.o_proj.weight")
        out[o + "mlp.w1.weight"] = w(h + "mlp.gate_up_proj.weight", rows=(0, f))        # gate
        out[o + "mlp.w3.weight"] = w(h + "mlp.gate_up_proj.weight", rows=(f, 2 * f))    # up
        out[o + "mlp.w2.weight"] = w(h + "mlp.down_proj.weight")
        out[o + "norm1.weight"] = w(h + "input_layernorm.weight")
        out[o + "norm2.weight"] = w(h + "post_attention_layernorm.weight")
    return out


ADAPTER = register_adapter(Adapter("phi3", ("phi3",), phi3_config, phi3_weights, prefix="model.",
                                   notes="default RoPE only (no LongRoPE); sliding window: positions capped at it"))
