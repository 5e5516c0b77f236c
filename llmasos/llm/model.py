"""A gpt-fast-style static-KV-cache decoder (Llama family, GPT-2; transformers models of the registered families,
llmasos/llm/adapters/, map onto it): what we trace, and the torch baseline.

Two modes share one module tree and one set of weights:

* ``mode="export"``: ``forward(ids, pos, last, *caches) -> (logits, *new_caches)``. The caches go in and
  come out as tensors, and the cache update and attention are the custom ops of ``llmasos.llm.ops``, so
  ``torch.export`` keeps each as one node the frontend turns into ``kv.append`` / ``kv.attention``.
* ``mode="torch"``: ``forward(ids, pos, last) -> logits``. The caches are buffers made by
  ``setup_caches`` and written in place, attention is ``F.scaled_dot_product_attention`` with the causal
  cache mask: the eager / ``torch.compile(mode="reduce-overhead")`` baseline we race.

Shapes: ids [B, T] int64; pos [B] int32, the cache position of each row's first token in ids; last [B]
int64, the index in ``ids`` whose logits are returned (prefill of right-padded prompts: len - 1; decode:
T = 1, last = 0). Caches [B, Hkv, M, D] in the model dtype, ordered k_0, v_0, k_1, v_1, ...

Export mode with ``paged=True`` (``paged_twin()``): ``forward(ids, pos, last, block_table, *pools)`` with
block_table [B, MB] int32 and pools [NB, Hkv, BS, D] (the paged layout of ``llmasos.frontends.kv_ops``);
attention goes through ``kv_paged_append`` / ``kv_paged_attention``.

The ragged paged twin (``ragged_twin()``): the same arguments for one engine step that mixes sequences of
any lengths without padding -- ids [1, N] (the step's N tokens, packed), pos [N] (each token's position),
last [S] int64 (the index in ids of each sequence's token whose logits are returned), block_table [N, MB]
(each token's sequence's table row) -- returning logits [S, vocab]. Each token is appended as a row of one
(``kv_paged_append``) and attends through ``kv_ragged_attention`` (its sequence's positions up to its own,
including those other tokens of the step just appended).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# importing llmasos.llm.ops also registers torch.ops.llmasos.kv_append / kv_attention
from llmasos.llm.ops import causal_cache_mask, paged_attention, paged_write_, ragged_attention

from . import presets
from .adapter import adapter_for
from .config import ARCHS, DecoderConfig  # noqa: F401  (re-exported: the Decoder's config)

MODES = ("export", "torch")


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] f32, HF's convention (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        # one fused q|k|v projection (gpt-fast's wqkv; GPT-2's c_attn): one GEMV per layer for q, k and v
        self.wqkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim,
                              bias=cfg.linear_bias or cfg.qkv_bias)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=cfg.linear_bias)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # torch mode only: setup_caches fills these
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def qkv(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]):
        c = self.cfg
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        qd, kd = c.heads * c.head_dim, c.kv_heads * c.head_dim
        # slices, not split_with_sizes: the frontend converts aten.slice
        q = qkv[..., :qd].reshape(B, T, c.heads, c.head_dim).transpose(1, 2)
        k = qkv[..., qd:qd + kd].reshape(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = qkv[..., qd + kd:].reshape(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope                                              # [B, 1, T, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, T, self.cfg.heads * self.cfg.head_dim))

    def forward_export(self, x, pos, rope, k_cache, v_cache, block_table=None, inplace=False, ragged=False):
        q, k, v = self.qkv(x, rope)
        if ragged:          # q, k, v [1, heads, N, D]: token t is a row of one at pos[t], table row t
            k, v = k.transpose(0, 2), v.transpose(0, 2)                                  # [N, Hkv, 1, D]
            if inplace:
                paged_write_(k_cache, k, pos, block_table)
                paged_write_(v_cache, v, pos, block_table)
                return self.out(ragged_attention(q, k_cache, v_cache, pos, block_table, self.scale)), k_cache, v_cache
            k_cache = torch.ops.llmasos.kv_paged_append(k_cache, k, pos, block_table)
            v_cache = torch.ops.llmasos.kv_paged_append(v_cache, v, pos, block_table)
            o = torch.ops.llmasos.kv_ragged_attention(q, k_cache, v_cache, pos, block_table, self.scale)
            return self.out(o), k_cache, v_cache
        if block_table is not None and inplace:     # paged, eager (TorchPagedRunner): write the pools in place
            paged_write_(k_cache, k, pos, block_table)
            paged_write_(v_cache, v, pos, block_table)
            return self.out(paged_attention(q, k_cache, v_cache, pos, block_table, self.scale)), k_cache, v_cache
        if block_table is not None:      # paged: the caches are the layer's k and v block pools
            k_cache = torch.ops.llmasos.kv_paged_append(k_cache, k, pos, block_table)
            v_cache = torch.ops.llmasos.kv_paged_append(v_cache, v, pos, block_table)
            o = torch.ops.llmasos.kv_paged_attention(q, k_cache, v_cache, pos, block_table, self.scale)
            return self.out(o), k_cache, v_cache
        k_cache = torch.ops.llmasos.kv_append(k_cache, k, pos)
        v_cache = torch.ops.llmasos.kv_append(v_cache, v, pos)
        o = torch.ops.llmasos.kv_attention(q, k_cache, v_cache, pos, self.scale)
        return self.out(o), k_cache, v_cache

    def forward_torch(self, x, rope, rows, idx, mask):
        """rows [B, 1], idx [B, T]: the cache slots of the new tokens; mask [B, 1, T, M]: built once per step."""
        q, k, v = self.qkv(x, rope)
        B = q.shape[0]
        kc, vc = self.k_cache[:B], self.v_cache[:B]
        # advanced indices around a slice put their dims first: the target is [B, T, Hkv, D]
        kc[rows, :, idx] = k.transpose(1, 2)
        vc[rows, :, idx] = v.transpose(1, 2)
        gqa = self.cfg.heads != self.cfg.kv_heads
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return self.out(o)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.llama = cfg.arch == "llama"
        self.act = cfg.mlp_act
        if self.llama:
            self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)   # gate
            self.w3 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)   # up
            self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)   # down
        else:
            self.fc = nn.Linear(cfg.hidden, cfg.ffn)
            self.proj = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x):
        if self.llama:
            g = self.w1(x)
            g = F.gelu(g, approximate="tanh") if self.act == "gelu_tanh" else F.silu(g)   # GeGLU (Gemma) or SwiGLU
            return self.w2(g * self.w3(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Norm(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.rms = cfg.arch == "llama"
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(cfg.hidden))

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, mode: str = "export", paged: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Decoder mode must be one of {MODES}, got {mode!r}")
        if paged and mode != "export":
            raise ValueError(f"Decoder: paged caches are for mode='export', got mode={mode!r}")
        self.cfg, self.mode = cfg, mode
        # export mode with a paged cache: forward(ids, pos, last, block_table, *pools) (set it on a copy of
        # the weights with paged_twin)
        self.paged = paged
        self.paged_inplace = False      # paged and eager: the pools are written in place (TorchPagedRunner)
        self.ragged = False             # paged, one packed row of tokens of several sequences (ragged_twin)
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._make_rope()

    def _make_rope(self, device=None):
        if self.cfg.arch != "llama":
            return
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_positions, self.cfg.rope_theta)
        # f32 and not persistent: recomputed, never loaded, and cast to the model dtype after the gather
        if device is not None:
            cos, sin = cos.to(device), sin.to(device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # -- caches -------------------------------------------------------------------------------------------
    def cache_shapes(self, batch: int, max_seq: int) -> list[tuple[int, int, int, int]]:
        c = self.cfg
        return [(batch, c.kv_heads, max_seq, c.head_dim)] * (2 * c.layers)

    def new_caches(self, batch: int, max_seq: int, dtype=None, device=None) -> list[torch.Tensor]:
        dtype = dtype or self.dtype
        device = device or self.embed.weight.device
        return [torch.zeros(s, dtype=dtype, device=device) for s in self.cache_shapes(batch, max_seq)]

    def pool_shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, int, int, int]]:
        """Paged caches: every layer's k and v pool [num_blocks, Hkv, block_size, D] (k_0, v_0, k_1, ...)."""
        c = self.cfg
        return [(num_blocks, c.kv_heads, block_size, c.head_dim)] * (2 * c.layers)

    def new_pools(self, num_blocks: int, block_size: int, dtype=None, device=None) -> list[torch.Tensor]:
        dtype = dtype or self.dtype
        device = device or self.embed.weight.device
        # zeroed: masked positions get probability 0, and 0 * NaN garbage would be NaN
        return [torch.zeros(s, dtype=dtype, device=device) for s in self.pool_shapes(num_blocks, block_size)]

    def paged_twin(self, inplace: bool = False) -> "Decoder":
        """An export-mode Decoder with paged caches sharing these weights (the modules are shared, not copied).
        inplace: its forward writes the pools it is given in place (eager use; not for export)."""
        if self.mode != "export":
            raise ValueError(f"Decoder.paged_twin needs an export-mode Decoder, got mode={self.mode!r}")
        twin = copy.copy(self)      # a new __dict__, the same parameter and module dicts
        twin.paged, twin.paged_inplace, twin.ragged = True, bool(inplace), False
        return twin

    def ragged_twin(self, inplace: bool = False) -> "Decoder":
        """The paged twin taking one ragged step (module doc): ids [1, N], pos [N], last [S], block_table
        [N, MB], pools -> logits [S, vocab], pools."""
        twin = self.paged_twin(inplace)
        twin.ragged = True
        return twin

    def setup_caches(self, max_batch: int, max_seq: int, dtype=None, device=None) -> None:
        """Torch mode: (re)allocate every layer's k/v cache buffers [max_batch, Hkv, max_seq, D], zeroed."""
        if self.mode != "torch":
            raise RuntimeError("Decoder.setup_caches is for mode='torch'; export mode takes caches as inputs")
        if max_seq > self.cfg.max_positions:
            raise ValueError(f"Decoder.setup_caches: max_seq {max_seq} > max_positions {self.cfg.max_positions}")
        caches = self.new_caches(max_batch, max_seq, dtype, device)
        for i, blk in enumerate(self.blocks):
            blk.attn.register_buffer("k_cache", caches[2 * i], persistent=False)
            blk.attn.register_buffer("v_cache", caches[2 * i + 1], persistent=False)

    # -- forward ------------------------------------------------------------------------------------------
    def _embed(self, ids, pos):
        T = ids.shape[1]
        if self.ragged:     # one packed row: every token's own position
            positions = pos.long()[None, :]                                              # [1, N]
        else:
            positions = pos.long()[:, None] + torch.arange(T, device=ids.device)[None, :]   # [B, T]
        if self.paged:
            # a padding token of a batched prefill chunk may sit past the last position (its append is dropped,
            # its logits unread): clamp it into the tables
            positions = positions.clamp(max=self.cfg.max_positions - 1)
        x = self.embed(ids)
        if self.cfg.embed_scale != 1.0:   # Gemma: sqrt(hidden), in the activation dtype as transformers rounds it
            x = x * float(torch.tensor(self.cfg.embed_scale, dtype=x.dtype))
        if self.wpe is not None:
            return x + self.wpe(positions), None
        # embedding() on the f32 tables is the gather; HF casts cos/sin to the activation dtype too
        cos = F.embedding(positions, self.rope_cos).to(x.dtype)[:, None]               # [B, 1, T, D]
        sin = F.embedding(positions, self.rope_sin).to(x.dtype)[:, None]
        return x, (cos, sin)

    def _logits(self, x, last):
        # only each row's `last` token reaches the final norm and the vocab projection
        if self.ragged:     # x [1, N, hidden]: the S sequences' last tokens
            idx = last.long().reshape(1, -1, 1).expand(1, -1, x.shape[-1])
            h = torch.gather(x, 1, idx).squeeze(0)                                      # [S, hidden]
            return self.lm_head(self.norm(h))
        idx = last.long().reshape(-1, 1, 1).expand(-1, 1, x.shape[-1])
        h = torch.gather(x, 1, idx).squeeze(1)                                          # [B, hidden]
        return self.lm_head(self.norm(h))

    def forward(self, ids, pos, last, *caches):
        x, rope = self._embed(ids, pos)
        if self.mode == "torch":
            if caches:
                raise TypeError("Decoder(mode='torch').forward(ids, pos, last) takes no caches: they are buffers")
            first = self.blocks[0].attn.k_cache
            if first is None:
                raise RuntimeError("Decoder(mode='torch'): call setup_caches(max_batch, max_seq, ...) before forward")
            B, T = ids.shape
            # shared by every layer: eager mode would otherwise rebuild them once per layer
            rows = torch.arange(B, device=ids.device)[:, None]
            idx = pos.long()[:, None] + torch.arange(T, device=ids.device)[None, :]
            mask = causal_cache_mask(pos, T, first.shape[2])
            for blk in self.blocks:
                x = x + blk.attn.forward_torch(blk.norm1(x), rope, rows, idx, mask)
                x = x + blk.mlp(blk.norm2(x))
            return self._logits(x, last)
        table = None
        if self.paged:
            if not caches:
                raise TypeError("Decoder(paged=True).forward(ids, pos, last, block_table, *pools): no block table")
            table, caches = caches[0], caches[1:]
        if len(caches) != 2 * self.cfg.layers:
            what = "pools" if self.paged else "caches"
            raise TypeError(f"Decoder(mode='export').forward takes {2 * self.cfg.layers} {what} "
                            f"(k_0, v_0, ...), got {len(caches)}")
        new = []
        for i, blk in enumerate(self.blocks):
            a, kc, vc = blk.attn.forward_export(blk.norm1(x), pos, rope, caches[2 * i], caches[2 * i + 1], table,
                                                self.paged_inplace, self.ragged)
            x = x + a
            x = x + blk.mlp(blk.norm2(x))
            new += [kc, vc]
        return (self._logits(x, last), *new)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: DecoderConfig, mode: str = "export", seed: int = 0, dtype=torch.float32,
               device=None) -> "Decoder":
        """Random weights, normal(0, 0.02), made directly on ``device`` (no HF model, no CPU init pass)."""
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            m = cls(cfg, mode)
        m = m.to_empty(device=device).to(dtype)
        if cfg.tie_embeddings:      # to_empty gives each module its own new tensor, untying them
            m.lm_head.weight = m.embed.weight
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        m._make_rope(device)     # to_empty left the non-persistent tables uninitialised
        return m.eval()

    def copy_as(self, mode: str, device="cpu") -> "Decoder":
        """A copy of these weights as a Decoder of ``mode`` on ``device`` (e.g. the export-mode twin of a
        torch-mode model drawn on the GPU: the same numbers without a second, slow CPU draw)."""
        with torch.device("meta"):
            m = type(self)(self.cfg, mode)
        m = m.to_empty(device=device).to(self.dtype)
        if self.cfg.tie_embeddings:
            m.lm_head.weight = m.embed.weight
        with torch.no_grad():
            for (name, p), (_, q) in zip(m.named_parameters(), self.named_parameters()):
                p.copy_(q)
        m._make_rope(device)
        return m.eval()

    @classmethod
    def from_hf(cls, hf_model, mode: str = "export", dtype=None) -> "Decoder":
        """Copy the weights of a transformers causal LM of a registered family (llmasos/llm/adapters/: Llama,
        GPT-2, Qwen2, Mistral), through its adapter's config and weight-name maps."""
        adapter = adapter_for(hf_model.config, "Decoder.from_hf")
        cfg = adapter.config(hf_model.config)
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        prefix = adapter.prefix if any(k.startswith(adapter.prefix) for k in sd) else ""
        m = cls(cfg, mode)
        ours_keys = set(m.state_dict())
        needed = ours_keys - ({"lm_head.weight"} if cfg.tie_embeddings else set())   # a tied head is the embedding
        wmap = adapter.weights(cfg)
        missing, extra = needed - set(wmap), set(wmap) - ours_keys
        if missing or extra:
            raise ValueError(f"Decoder.from_hf: {adapter.name} weight map mismatch; missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        ours = {name: _gather(sd, wmap[name], prefix, adapter.name) for name in needed}
        m.load_state_dict(ours, strict=False)
        dtype = dtype or next(hf_model.parameters()).dtype
        return m.to(dtype=dtype, device=next(hf_model.parameters()).device).eval()


def _gather(sd: dict, src, prefix: str, family: str) -> torch.Tensor:
    """One Decoder parameter from the transformers state dict, as the adapter's W says."""
    keys = [n.format(p=prefix) for n in src.names]
    if src.fallback is not None and keys[0] not in sd:
        keys = [src.fallback.format(p=prefix)]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"Decoder.from_hf: the {family} state dict has no {missing[0]!r}")
    t = sd[keys[0]] if len(keys) == 1 else torch.cat([sd[k] for k in keys], 0)
    t = t.t().contiguous() if src.transpose else t
    if src.rows is not None:
        t = t[src.rows[0]:src.rows[1]].contiguous()
    return t + src.offset if src.offset else t


def as_decoder(model, dtype=None, device=None) -> Decoder:
    """An export-mode Decoder for ``model``: a Decoder, a transformers causal LM of a registered family, or the
    name of a decoder preset (random weights: for benchmarks)."""
    if isinstance(model, str):
        if model not in presets.names(decoders_only=True):
            raise ValueError(f"unknown model {model!r}: pass a Decoder, a transformers causal LM or one of the "
                             f"presets {', '.join(presets.names(decoders_only=True))}")
        return Decoder.random(presets.decoder_config(model), mode="export", dtype=dtype or torch.float32,
                              device=device)
    if isinstance(model, Decoder):
        if model.mode != "export":
            m = Decoder(model.cfg, "export")
            m.load_state_dict(model.state_dict(), strict=False)
            model = m.to(dtype=model.dtype, device=model.embed.weight.device).eval()
        return model.to(dtype=dtype) if dtype is not None else model
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ValueError(f"the model's {meta} is on the meta device (shapes without data): load its weights")
        return Decoder.from_hf(model, mode="export", dtype=dtype)
    raise TypeError(f"compile_lm takes a llmasos Decoder, a transformers causal LM (Llama, GPT-2, Qwen2, Mistral...) "
                    f"or a preset name, got {type(model).__name__}")
