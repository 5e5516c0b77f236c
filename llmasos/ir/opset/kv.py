"""KV-cache ops: what a decoder's attention layer does with a static, runtime-owned cache.

The layout is the one of ``llmasos.frontends.kv_ops`` (the torch custom ops the frontend converts from):

  cache  [B, Hkv, M, D]   M, the compiled maximum sequence length, is static
  new    [B, Hkv, T, D]   the T new keys (or values) of each row
  pos    [B] i32 (or i64) the cache position of each row's first new token
  q      [B, H, T, D]     H a multiple of Hkv (grouped-query attention)

* ``kv.append(cache, new, pos)`` -> cache's type: a new cache equal to ``cache`` except
  ``out[b, :, pos[b] + t] = new[b, :, t]``. Functional in the IR (so passes and the interpreter need no
  aliasing rules); the TVM backend writes into the cache buffer in place.
* ``kv.attention(q, k_cache, v_cache, pos){scale}`` -> q's type: query t of row b sits at position
  ``pos[b] + t`` and attends cache positions ``j <= pos[b] + t`` (softmax of ``q.k * scale`` in f32, then
  the weighted sum of v in f32, cast to q's dtype). Query head h reads kv head ``h // (H / Hkv)``.
  Every query sees position 0, so no row is fully masked.

Positions past M (``pos[b] + T > M``) or negative are a caller error: the references raise naming the row;
the compiled kernels do not check (the runtime checks before a call) but never write outside the cache.

The paged cache (``llmasos.frontends.kv_ops`` describes it): a pool of blocks and a block table per row,

  pool         [NB, Hkv, BS, D]  NB (may be symbolic) blocks of BS positions; Hkv, BS, D static
  block_table  [B, MB] i32       MB static; row b's position p is pool[block_table[b, p // BS], :, p % BS]

* ``kv.paged_append(pool, new, pos, block_table)`` -> pool's type: writes ``new[b, :, t]`` at row b's position
  ``pos[b] + t``; a position whose block entry is outside [0, NB) (unallocated: -1) or past MB*BS is dropped.
* ``kv.paged_attention(q, k_pool, v_pool, pos, block_table){scale}`` -> q's type: ``kv.attention`` over each
  row's blocks laid end to end, positions in unallocated blocks not attended.

Caller errors the references raise on: a negative pos, a block id below -1 or >= NB, two writes to one slot in
one call, a query that sees no allocated position. The kernels do not check (the runtime does) but never
read or write outside the pool.
"""
from __future__ import annotations

import math

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType, dims_equal

_POS_DTYPES = (DType.i32, DType.i64)


def _check_cache(op: str, what: str, t: TensorType) -> None:
    if t.rank != 4:
        raise ValueError(f"{op}: {what} must be rank 4 [B, Hkv, M, D], got {t}")
    if not isinstance(t.shape[2], int):
        raise ValueError(f"{op}: {what} {t} needs a static length M (dim 2), got {t.shape[2]}")
    if not isinstance(t.shape[1], int):
        raise ValueError(f"{op}: {what} {t} needs a static head count Hkv (dim 1), got {t.shape[1]}")


def _check_pos(op: str, pos: TensorType, batch) -> None:
    if pos.dtype not in _POS_DTYPES:
        raise ValueError(f"{op}: pos must be i32 (or i64), got {pos}")
    if pos.rank != 1 or not dims_equal(pos.shape[0], batch):
        raise ValueError(f"{op}: pos must be [B] = [{batch}] (one start position per row), got {pos}")


def _same(op: str, a_name: str, a: TensorType, b_name: str, b: TensorType, dims: dict) -> None:
    for i, label in dims.items():
        if not dims_equal(a.shape[i], b.shape[i]):
            raise ValueError(f"{op}: {a_name} {a} and {b_name} {b} differ in {label} (dim {i}): "
                             f"{a.shape[i]} vs {b.shape[i]}")


def _append_infer(cache, new, pos):
    op = "kv.append"
    _check_cache(op, "cache", cache)
    if new.rank != 4:
        raise ValueError(f"{op}: new must be rank 4 [B, Hkv, T, D], got {new}")
    _same(op, "new", new, "cache", cache, {0: "B", 1: "Hkv", 3: "D"})
    if new.dtype is not cache.dtype:
        raise ValueError(f"{op}: new's dtype {new.dtype} must be the cache's {cache.dtype}, got {new}")
    if isinstance(new.shape[2], int) and new.shape[2] > cache.shape[2]:
        raise ValueError(f"{op}: {new.shape[2]} new tokens do not fit a cache of length M={cache.shape[2]}")
    _check_pos(op, pos, cache.shape[0])
    return cache


def _check_positions(op: str, pos: np.ndarray, T: int, M: int) -> None:
    for b, p in enumerate(pos.tolist()):
        if p < 0 or p + T > M:
            raise ValueError(f"{op}: row {b} has pos {p}: its {T} token(s) would take positions {p}..{p + T - 1}, "
                             f"outside the cache's 0..{M - 1}")


def _append_ref(cache, new, pos):
    M, T = cache.shape[2], new.shape[2]
    _check_positions("kv.append", pos, T, M)
    out = cache.copy()
    for b, p in enumerate(pos.tolist()):
        out[b, :, p:p + T] = new[b]
    return out


def _attention_infer(q, k_cache, v_cache, pos, *, scale):
    op = "kv.attention"
    if q.rank != 4:
        raise ValueError(f"{op}: q must be rank 4 [B, H, T, D], got {q}")
    if not q.dtype.is_float:
        raise ValueError(f"{op}: q must be a float tensor, got {q}")
    _check_cache(op, "k_cache", k_cache)
    _check_cache(op, "v_cache", v_cache)
    if not k_cache.same_as(v_cache):
        raise ValueError(f"{op}: k_cache {k_cache} and v_cache {v_cache} must have one type")
    if k_cache.dtype is not q.dtype:
        raise ValueError(f"{op}: the caches' dtype {k_cache.dtype} must be q's {q.dtype}")
    _same(op, "q", q, "k_cache", k_cache, {0: "B", 3: "D"})
    h, hkv = q.shape[1], k_cache.shape[1]
    if not isinstance(h, int) or h % hkv:
        raise ValueError(f"{op}: query heads H={h} must be a multiple of the caches' kv heads Hkv={hkv} (GQA)")
    if isinstance(q.shape[2], int) and q.shape[2] > k_cache.shape[2]:
        raise ValueError(f"{op}: {q.shape[2]} queries do not fit a cache of length M={k_cache.shape[2]}")
    _check_pos(op, pos, q.shape[0])
    return q


def _attention_ref(q, k_cache, v_cache, pos, *, scale):
    B, H, T, D = q.shape
    M = k_cache.shape[2]
    _check_positions("kv.attention", pos, T, M)
    rep = H // k_cache.shape[1]
    k = np.repeat(k_cache.astype(np.float32), rep, axis=1)
    v = np.repeat(v_cache.astype(np.float32), rep, axis=1)
    logits = np.matmul(q.astype(np.float32), np.swapaxes(k, -1, -2)) * np.float32(scale)   # [B, H, T, M]
    qpos = pos.astype(np.int64)[:, None] + np.arange(T)[None, :]                            # [B, T]
    visible = np.arange(M)[None, None, :] <= qpos[:, :, None]                               # [B, T, M]
    logits = np.where(visible[:, None], logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p, v).astype(q.dtype)


# -- paged ----------------------------------------------------------------------------------------------

def _check_pool(op: str, what: str, t: TensorType) -> None:
    if t.rank != 4:
        raise ValueError(f"{op}: {what} must be rank 4 [NB, Hkv, BS, D], got {t}")
    for i, label in ((1, "head count Hkv"), (2, "block size BS"), (3, "head dim D")):
        if not isinstance(t.shape[i], int):
            raise ValueError(f"{op}: {what} {t} needs a static {label} (dim {i}), got {t.shape[i]}")


def _check_table(op: str, table: TensorType, batch) -> None:
    if table.dtype is not DType.i32 or table.rank != 2:
        raise ValueError(f"{op}: block_table must be i32 [B, MB], got {table}")
    if not dims_equal(table.shape[0], batch):
        raise ValueError(f"{op}: block_table {table} must have one row per batch row, B={batch}")
    if not isinstance(table.shape[1], int):
        raise ValueError(f"{op}: block_table {table} needs a static blocks-per-row MB (dim 1), got {table.shape[1]}")


def _paged_append_infer(pool, new, pos, block_table):
    op = "kv.paged_append"
    _check_pool(op, "pool", pool)
    if new.rank != 4:
        raise ValueError(f"{op}: new must be rank 4 [B, Hkv, T, D], got {new}")
    _same(op, "new", new, "pool", pool, {1: "Hkv", 3: "D"})
    if new.dtype is not pool.dtype:
        raise ValueError(f"{op}: new's dtype {new.dtype} must be the pool's {pool.dtype}, got {new}")
    _check_pos(op, pos, new.shape[0])
    _check_table(op, block_table, new.shape[0])
    m = block_table.shape[1] * pool.shape[2]
    if isinstance(new.shape[2], int) and new.shape[2] > m:
        raise ValueError(f"{op}: {new.shape[2]} new tokens do not fit a row of MB*BS={m} positions")
    return pool


def _paged_check(op: str, nb: int, pos: np.ndarray, table: np.ndarray) -> None:
    for b, p in enumerate(pos.tolist()):
        if p < 0:
            raise ValueError(f"{op}: row {b} has a negative pos {p}")
    bad = (table < -1) | (table >= nb)
    if bad.any():
        b, k = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{op}: block_table[{b}, {k}] = {table[b, k]} is not a block of the pool's 0..{nb - 1} "
                         f"(or -1: unallocated)")


def _paged_slots(pos, table, nb, bs, T):
    """[(b, t, block, offset)] of the new tokens that land in an allocated block."""
    mb = table.shape[1]
    out = []
    for b, p0 in enumerate(pos.tolist()):
        for t in range(T):
            p = p0 + t
            if p // bs < mb and 0 <= table[b, p // bs] < nb:
                out.append((b, t, int(table[b, p // bs]), p % bs))
    return out


def _paged_append_ref(pool, new, pos, block_table):
    op = "kv.paged_append"
    nb, _, bs, _ = pool.shape
    _paged_check(op, nb, pos, block_table)
    out = pool.copy()
    seen = {}
    for b, t, blk, off in _paged_slots(pos, block_table, nb, bs, new.shape[2]):
        if (blk, off) in seen:
            raise ValueError(f"{op}: rows {seen[blk, off]} and {b} both write block {blk} slot {off} "
                             f"(a shared block must be copied before it is written)")
        seen[blk, off] = b
        out[blk, :, off] = new[b, :, t]
    return out


def paged_gather_ref(pool: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cache [B, Hkv, MB*BS, D], allocated [B, MB*BS] bool): each row's blocks end to end, unallocated as 0."""
    nb, hkv, bs, d = pool.shape
    b_, mb = table.shape
    valid = (table >= 0) & (table < nb)
    g = pool[np.clip(table, 0, nb - 1)] * valid[:, :, None, None, None].astype(pool.dtype)   # [B, MB, Hkv, BS, D]
    return g.transpose(0, 2, 1, 3, 4).reshape(b_, hkv, mb * bs, d), np.repeat(valid, bs, axis=1)


def _paged_attention_infer(q, k_pool, v_pool, pos, block_table, *, scale):
    return _paged_attention_types("kv.paged_attention", q, k_pool, v_pool, pos, block_table)


def _paged_attention_types(op: str, q, k_pool, v_pool, pos, block_table):
    if q.rank != 4:
        raise ValueError(f"{op}: q must be rank 4 [B, H, T, D], got {q}")
    if not q.dtype.is_float:
        raise ValueError(f"{op}: q must be a float tensor, got {q}")
    _check_pool(op, "k_pool", k_pool)
    _check_pool(op, "v_pool", v_pool)
    if not k_pool.same_as(v_pool):
        raise ValueError(f"{op}: k_pool {k_pool} and v_pool {v_pool} must have one type")
    if k_pool.dtype is not q.dtype:
        raise ValueError(f"{op}: the pools' dtype {k_pool.dtype} must be q's {q.dtype}")
    _same(op, "q", q, "k_pool", k_pool, {3: "D"})
    h, hkv = q.shape[1], k_pool.shape[1]
    if not isinstance(h, int) or h % hkv:
        raise ValueError(f"{op}: query heads H={h} must be a multiple of the pools' kv heads Hkv={hkv} (GQA)")
    _check_pos(op, pos, q.shape[0])
    _check_table(op, block_table, q.shape[0])
    m = block_table.shape[1] * k_pool.shape[2]
    if isinstance(q.shape[2], int) and q.shape[2] > m:
        raise ValueError(f"{op}: {q.shape[2]} queries do not fit a row of MB*BS={m} positions")
    return q


def _paged_attention_ref(q, k_pool, v_pool, pos, block_table, *, scale):
    return _paged_attention_math("kv.paged_attention", q, k_pool, v_pool, pos, block_table, scale)


def _paged_attention_math(op: str, q, k_pool, v_pool, pos, block_table, scale):
    B, H, T, D = q.shape
    _paged_check(op, k_pool.shape[0], pos, block_table)
    k, allocated = paged_gather_ref(k_pool, block_table)
    v, _ = paged_gather_ref(v_pool, block_table)
    M = k.shape[2]
    rep = H // k.shape[1]
    k = np.repeat(k.astype(np.float32), rep, axis=1)
    v = np.repeat(v.astype(np.float32), rep, axis=1)
    logits = np.matmul(q.astype(np.float32), np.swapaxes(k, -1, -2)) * np.float32(scale)   # [B, H, T, M]
    qpos = pos.astype(np.int64)[:, None] + np.arange(T)[None, :]                            # [B, T]
    visible = (np.arange(M)[None, None, :] <= qpos[:, :, None]) & allocated[:, None, :]     # [B, T, M]
    blind = ~visible.any(-1)
    if blind.any():
        b, t = (int(i) for i in np.argwhere(blind)[0])
        raise ValueError(f"{op}: row {b}'s query {t} (position {qpos[b, t]}) sees no allocated cache position: "
                         f"block_table[{b}, 0] = {block_table[b, 0]}")
    logits = np.where(visible[:, None], logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p, v).astype(q.dtype)


def _ragged_attention_infer(q, k_pool, v_pool, pos, block_table, *, scale):
    op = "kv.ragged_attention"
    if q.rank != 4 or not dims_equal(q.shape[0], 1):
        raise ValueError(f"{op}: q must be [1, H, N, D] (the step's N tokens as one row), got {q}")
    # token t is kv.paged_attention's row t with one query: the same checks on the token-major view
    tok = TensorType((q.shape[2], q.shape[1], 1, q.shape[3]), q.dtype)
    _paged_attention_types(op, tok, k_pool, v_pool, pos, block_table)
    return q


def _ragged_attention_ref(q, k_pool, v_pool, pos, block_table, *, scale):
    tok = np.ascontiguousarray(q[0].transpose(1, 0, 2)[:, :, None])          # [N, H, 1, D]
    o = _paged_attention_math("kv.ragged_attention", tok, k_pool, v_pool, pos, block_table, scale)
    return np.ascontiguousarray(o[:, :, 0].transpose(1, 0, 2)[None])          # [1, H, N, D]


def default_scale(head_dim: int) -> float:
    """The usual softmax scale 1/sqrt(D), for builders that do not read it from a model."""
    return 1.0 / math.sqrt(head_dim)


defop("kv.append", ("cache", "new", "pos"), _append_infer, _append_ref,
      doc="a copy of cache [B, Hkv, M, D] with new [B, Hkv, T, D] written at positions pos[b] .. pos[b]+T-1 "
          "of each row b (pos [B] int); the TVM backend updates the cache buffer in place")
defop("kv.attention", ("q", "k_cache", "v_cache", "pos"), _attention_infer, _attention_ref,
      {"scale": Attr("float")},
      doc="attention of q [B, H, T, D] over the caches [B, Hkv, M, D]: query t of row b attends cache "
          "positions j <= pos[b] + t; softmax(q k^T * scale) v in f32; H a multiple of Hkv (GQA)")
defop("kv.paged_append", ("pool", "new", "pos", "block_table"), _paged_append_infer, _paged_append_ref,
      doc="a copy of pool [NB, Hkv, BS, D] with new [B, Hkv, T, D] written at row b's positions pos[b]+t, "
          "position p at pool[block_table[b, p // BS], :, p % BS]; unallocated entries (-1) drop the write; "
          "the TVM backend updates the pool in place")
defop("kv.paged_attention", ("q", "k_pool", "v_pool", "pos", "block_table"), _paged_attention_infer,
      _paged_attention_ref, {"scale": Attr("float")},
      doc="kv.attention of q [B, H, T, D] over each row's blocks of the pools [NB, Hkv, BS, D] (block_table "
          "[B, MB] i32); positions in unallocated blocks (-1) are not attended")
defop("kv.ragged_attention", ("q", "k_pool", "v_pool", "pos", "block_table"), _ragged_attention_infer,
      _ragged_attention_ref, {"scale": Attr("float")},
      doc="attention of a ragged step's tokens, q [1, H, N, D] (tokens of several sequences packed in one row): "
          "token t attends positions j <= pos[t] (pos [N]) of its sequence through its own table row "
          "block_table[t] ([N, MB] i32), as kv.paged_attention's row t with one query would; unlike a batch of "
          "such rows it may read what other tokens of the same call appended (their sequence's earlier "
          "positions), so it is never fused with those appends")
