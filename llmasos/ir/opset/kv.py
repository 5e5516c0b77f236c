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
