"""Llama (and SmolLM2, which is model_type "llama"): RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or
untied output head. ``llama_config`` and ``llama_weights`` also serve the families that are Llama with a
difference (qwen2.py, mistral.py)."""
from __future__ import annotations

from typing import Optional

from ..adapter import Adapter, register_adapter, w
from ..config import DecoderConfig


ACTS = {"silu": "silu"}     # transformers hidden_act -> DecoderConfig.mlp_act


def llama_config(c, family: str = "llama", qkv_bias: bool = False, window: Optional[int] = None,
                 acts: Optional[dict] = None, act: Optional[str] = None, embed_scale: float = 1.0) -> DecoderConfig:
    """A Llama-architecture DecoderConfig from a transformers config with Llama's field names.

    ``window``: a sliding attention window; the Decoder attends to every cached position, which equals a
    window w exactly while sequences are at most w tokens long, so the model's positions are capped at w.
    ``acts``: the MLP activations the family takes ({transformers name: DecoderConfig.mlp_act}); ``act``: the
    config's activation when it is not ``hidden_act``; ``embed_scale``: the embeddings' multiplier."""
    who = f"DecoderConfig.from_hf: {family}"
    acts = acts or ACTS
    act = act or c.hidden_act
    if act not in acts:
        raise ValueError(f"{who} hidden_act {act!r} is not supported ({', '.join(acts)})")
    if getattr(c, "mlp_bias", False) or (not qkv_bias and getattr(c, "attention_bias", False)):
        raise ValueError(f"{who} attention_bias / mlp_bias are not supported")
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling
    rope = dict(getattr(c, "rope_parameters", None) or {})
    scaling = getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type != "default":
        raise ValueError(f"DecoderConfig.from_hf: rope type {rope_type!r} is not implemented (only 'default' RoPE)")
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{who} partial_rotary_factor {partial} is not supported (RoPE on the whole head)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{who} config has no rope_theta")
    positions = c.max_position_embeddings if window is None else min(c.max_position_embeddings, int(window))
    return DecoderConfig(
        arch="llama", vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
        heads=c.num_attention_heads, kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        ffn=c.intermediate_size, max_positions=positions, norm_eps=c.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(c.tie_word_embeddings), qkv_bias=qkv_bias,
        mlp_act=acts[act], embed_scale=float(embed_scale))


def llama_weights(cfg: DecoderConfig) -> dict:
    """Decoder parameter -> transformers keys for LlamaForCausalLM-style state dicts."""
    out = {"embed.weight": w("{p}embed_tokens.weight"), "norm.weight": w("{p}norm.weight"),
           "lm_head.weight": w("lm_head.weight", fallback="{p}embed_tokens.weight")}
    for i in range(cfg.layers):
        h, o = f"{{p}}layers.{i}.", f"blocks.{i}."
        out[o + "attn.wqkv.weight"] = w(*(h + f"self_attn.{n}_proj.weight" for n in "qkv"))
        if cfg.qkv_bias:
            out[o + "attn.wqkv.bias"] = w(*(h + f"self_attn.{n}_proj.bias" for n in "qkv"))
        out[o + "attn.wo.weight"] = w(h + "self_attn.o_proj.weight")
        out[o + "mlp.w1.weight"] = w(h + "mlp.gate_proj.weight")
        out[o + "mlp.w3.weight"] = w(h + "mlp.up_proj.weight")
        out[o + "mlp.w2.weight"] = w(h + "mlp.down_proj.weight")
        out[o + "norm1.weight"] = w(h + "input_layernorm.weight")
        out[o + "norm2.weight"] = w(h + "post_attention_layernorm.weight")
    return out


ADAPTER = register_adapter(Adapter("llama", ("llama",), llama_config, llama_weights, prefix="model.",
                                   notes="default RoPE only (no llama3 / yarn scaling); no attention or MLP biases"))
