"""The two KV-cache operators, as torch custom ops, so ``torch.export`` keeps each as one node.

They are the torch spelling of the IR ops ``kv.append`` and ``kv.attention``: the decoder
(``llmasos.llm.model``) calls them in its "export" mode, the frontend converts them (``aten/kv.py``), the
torch executor (``llmasos.backends.torch_graph``) runs the IR ops with them. They live in the frontend
layer so that none of those imports upward; ``llmasos.llm.ops`` re-exports them. Their semantics are functional (a new cache is returned), so the
exported graph is pure; the TVM backend updates the cache in place, since nothing reads the old cache
after its append.

Layout, shared by torch, the IR and the runtime:
  cache  [B, Hkv, M, D]   M = the compiled maximum sequence length
  new    [B, Hkv, T, D]   the T new keys (or values) of each row
  pos    [B] int32        the cache position of each row's first new token; row b's tokens go to
                          positions pos[b] .. pos[b]+T-1 (rows may differ: prompts of different lengths)
  q      [B, H, T, D]     H a multiple of Hkv (grouped-query attention)
Query t of row b sits at position pos[b]+t and attends cache positions 0 .. pos[b]+t (causal). Positions
past M are a caller error: the runtime checks them before a call.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("llmasos::kv_append", mutates_args=())
def kv_append(cache: torch.Tensor, new: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = cache.clone()
    B, _, T, _ = new.shape
    idx = pos.long()[:, None] + torch.arange(T, device=pos.device)[None, :]      # [B, T]
    rows = torch.arange(B, device=pos.device)[:, None]
    # advanced indices around a slice put their dims first: the target is [B, T, Hkv, D]
    out[rows, :, idx] = new.transpose(1, 2).to(cache.dtype)
    return out


@kv_append.register_fake
def _(cache, new, pos):
    return torch.empty_like(cache)


def causal_cache_mask(pos: torch.Tensor, T: int, M: int) -> torch.Tensor:
    """[B, 1, T, M] bool: query t of row b may see cache position j <= pos[b] + t."""
    qpos = pos.long()[:, None] + torch.arange(T, device=pos.device)[None, :]     # [B, T]
    return (torch.arange(M, device=pos.device)[None, None, :] <= qpos[:, :, None])[:, None]


@torch.library.custom_op("llmasos::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 scale: float) -> torch.Tensor:
    B, H, T, D = q.shape
    rep = H // k_cache.shape[1]
    k = k_cache.repeat_interleave(rep, dim=1) if rep > 1 else k_cache
    v = v_cache.repeat_interleave(rep, dim=1) if rep > 1 else v_cache
    mask = causal_cache_mask(pos, T, k_cache.shape[2])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


@kv_attention.register_fake
def _(q, k_cache, v_cache, pos, scale):
    return torch.empty_like(q)
