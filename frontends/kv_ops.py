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


# ------------------------------------------------------------------------------------------------
# The paged cache (vLLM's PagedAttention layout): a pool of fixed-size blocks shared by all rows, and a block
# table per row.
#
#   pool         [NB, Hkv, BS, D]  NB blocks of BS positions (NB symbolic in the compiled code)
#   block_table  [B, MB] int32     MB = ceil(max_seq / BS); row b's cache position p lives at
#                                  pool[block_table[b, p // BS], :, p % BS]
#   pos, new, q                    as above
#
# An entry outside [0, NB) (the runtime uses -1) is an unallocated block: appends to its positions are
# dropped (so are positions past MB * BS), and attention does not see its positions. That is how the padding
# tokens of a right-padded batch are kept out of every block but their row's own last one (the runtime sets
# a row's entries past its last real token's block to -1). A query that sees no allocated position at all is
# a caller error (the numpy reference raises; these ops give zeros). Two rows writing one slot in the same
# call is a caller error too (a shared block must be copied before it is written: copy-on-write).
#
# paged_write_ / paged_attention are the plain torch functions (the first writes the pool in place: what the
# eager TorchPagedRunner runs); kv_paged_append / kv_paged_attention are the functional custom ops that
# torch.export keeps as single nodes.

def _paged_slots(pool: torch.Tensor, pos: torch.Tensor, block_table: torch.Tensor, T: int):
    """(block [B, T] long, offset [B, T] long, ok [B, T] bool) of each new token's slot."""
    NB, _, BS, _ = pool.shape
    MB = block_table.shape[1]
    p = pos.long()[:, None] + torch.arange(T, device=pos.device)[None, :]              # [B, T]
    k = torch.div(p, BS, rounding_mode="floor")
    inside = (p >= 0) & (k < MB)
    blk = torch.gather(block_table.long(), 1, k.clamp(0, MB - 1))
    ok = inside & (blk >= 0) & (blk < NB)
    return blk.clamp(0, NB - 1), torch.remainder(p, BS), ok


def paged_write_(pool: torch.Tensor, new: torch.Tensor, pos: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Write new [B, Hkv, T, D] at each row's positions pos[b] + t of ``pool``, in place; returns pool."""
    blk, off, ok = _paged_slots(pool, pos, block_table, new.shape[2])
    vals = new.transpose(1, 2).to(pool.dtype)                                           # [B, T, Hkv, D]
    # advanced indices around a slice put their dims first: pool[blk, :, off] is [n, Hkv, D]
    pool[blk[ok], :, off[ok]] = vals[ok]
    return pool


@torch.library.custom_op("llmasos::kv_paged_append", mutates_args=())
def kv_paged_append(pool: torch.Tensor, new: torch.Tensor, pos: torch.Tensor,
                    block_table: torch.Tensor) -> torch.Tensor:
    return paged_write_(pool.clone(), new, pos, block_table)


@kv_paged_append.register_fake
def _(pool, new, pos, block_table):
    return torch.empty_like(pool)


def paged_gather(pool: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [B, Hkv, MB*BS, D], allocated [B, MB*BS] bool): each row's blocks laid end to end (an
    unallocated block reads as zeros)."""
    NB, hkv, BS, D = pool.shape
    B, MB = block_table.shape
    bt = block_table.long()
    valid = (bt >= 0) & (bt < NB)                                                        # [B, MB]
    g = pool[bt.clamp(0, NB - 1)]                                                        # [B, MB, Hkv, BS, D]
    g = torch.where(valid[:, :, None, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    cache = g.permute(0, 2, 1, 3, 4).reshape(B, hkv, MB * BS, D)
    return cache, valid.repeat_interleave(BS, dim=1)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos: torch.Tensor,
                    block_table: torch.Tensor, scale: float) -> torch.Tensor:
    """kv.paged_attention in torch: each row's blocks gathered, then kv_attention's math with unallocated
    positions masked. Only the table's first blocks that some query can see are gathered (a host read of
    max(pos): eager only, which is where this runs; export sees the custom op as one node)."""
    B, H, T, D = q.shape
    BS = k_pool.shape[2]
    if B and block_table.shape[1]:
        need = (int(pos.max()) + T + BS - 1) // BS
        block_table = block_table[:, :max(1, min(block_table.shape[1], need))]
    k, allocated = paged_gather(k_pool, block_table)
    v, _ = paged_gather(v_pool, block_table)
    rep = H // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = causal_cache_mask(pos, T, k.shape[2]) & allocated[:, None, None, :]           # [B, 1, T, M]
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)        # a query that sees nothing: zeros, not NaN
    return (p @ v.float()).to(q.dtype)


@torch.library.custom_op("llmasos::kv_paged_attention", mutates_args=())
def kv_paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos: torch.Tensor,
                       block_table: torch.Tensor, scale: float) -> torch.Tensor:
    return paged_attention(q, k_pool, v_pool, pos, block_table, scale)


@kv_paged_attention.register_fake
def _(q, k_pool, v_pool, pos, block_table, scale):
    return torch.empty_like(q)


def ragged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos: torch.Tensor,
                     block_table: torch.Tensor, scale: float) -> torch.Tensor:
    """kv.ragged_attention in torch: q [1, H, N, D] is N tokens of several sequences; token t is
    paged_attention's row t with one query (position pos[t], table row block_table[t])."""
    tok = q[0].transpose(0, 1).unsqueeze(2)                                             # [N, H, 1, D]
    return paged_attention(tok, k_pool, v_pool, pos, block_table, scale)[:, :, 0].transpose(0, 1).unsqueeze(0)


@torch.library.custom_op("llmasos::kv_ragged_attention", mutates_args=())
def kv_ragged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos: torch.Tensor,
                        block_table: torch.Tensor, scale: float) -> torch.Tensor:
    return ragged_attention(q, k_pool, v_pool, pos, block_table, scale).contiguous()


@kv_ragged_attention.register_fake
def _(q, k_pool, v_pool, pos, block_table, scale):
    return torch.empty_like(q)
