"""GPT-2: LayerNorm, learned positions, GELU (tanh), biases everywhere, head tied to the embedding."""
from __future__ import annotations

from ..adapter import Adapter, register_adapter, w
from ..config import DecoderConfig


def gpt2_config(c) -> DecoderConfig:
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"DecoderConfig.from_hf: gpt2 activation_function {c.activation_function!r} is not "
                         "supported (gelu_new / gelu_pytorch_tanh)")
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
        raise ValueError("DecoderConfig.from_hf: gpt2 needs scale_attn_weights=True and "
                         "scale_attn_by_inverse_layer_idx=False")
    if c.add_cross_attention:
        raise ValueError("DecoderConfig.from_hf: gpt2 cross attention is not supported")
    return DecoderConfig(
        arch="gpt2", vocab=c.vocab_size, hidden=c.n_embd, layers=c.n_layer, heads=c.n_head,
        kv_heads=c.n_head, head_dim=c.n_embd // c.n_head, ffn=c.n_inner or 4 * c.n_embd,
        max_positions=c.n_positions, norm_eps=c.layer_norm_epsilon, tie_embeddings=True)


def gpt2_weights(cfg: DecoderConfig) -> dict:
    out = {"embed.weight": w("{p}wte.weight"), "wpe.weight": w("{p}wpe.weight"),
           "norm.weight": w("{p}ln_f.weight"), "norm.bias": w("{p}ln_f.bias")}
    for i in range(cfg.layers):
        h, o = f"{{p}}h.{i}.", f"blocks.{i}."
        # HF's Conv1D stores [in, out]; nn.Linear wants [out, in]
        for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                             ("mlp.proj", "mlp.c_proj")):
            out[f"{o}{ours}.weight"] = w(f"{h}{theirs}.weight", transpose=True)
            out[f"{o}{ours}.bias"] = w(f"{h}{theirs}.bias")
        for a, b in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{o}{b}.weight"] = w(f"{h}{a}.weight")
            out[f"{o}{b}.bias"] = w(f"{h}{a}.bias")
    return out


ADAPTER = register_adapter(Adapter("gpt2", ("gpt2",), gpt2_config, gpt2_weights, prefix="transformer.",
                                   notes="no cross attention, no scale_attn_by_inverse_layer_idx"))
