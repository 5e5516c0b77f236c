"""Neural-network ops kept whole so backends can pick fused kernels: softmax, norms, attention, embedding."""
from __future__ import annotations

import math

import numpy as np

from ..ops import Attr, defop
from ..types import DType, TensorType, dims_equal, normalize_axis
from .rules import broadcast_shapes, require_float, same_dtype


def _softmax_infer(x, axis):
    require_float(x)
    normalize_axis(axis, x.rank)
    return x


def _softmax_ref(x, axis):
    x = x.astype(np.float32)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):  # an all -inf row is nan, as in torch.softmax
        e = np.exp(x - np.where(np.isfinite(m), m, 0))
        return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax_ref(x, axis):
    x = x.astype(np.float32)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = x - m
        return s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))


defop("softmax", ("x",), _softmax_infer, _softmax_ref, {"axis": Attr("int", -1)})
defop("log_softmax", ("x",), _softmax_infer, _log_softmax_ref, {"axis": Attr("int", -1)})


def _norm_infer(x, weight=None, bias=None, *, eps, ndim):
    require_float(x)
    if not 1 <= ndim <= x.rank:
        raise ValueError(f"ndim {ndim} must be in [1, rank {x.rank}]")
    tail = x.shape[x.rank - ndim:]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            if p.rank != ndim or not all(dims_equal(a, b) for a, b in zip(p.shape, tail)):
                raise ValueError(f"{name} {p} must have the normalised shape [{', '.join(map(str, tail))}]")
            same_dtype(x, p)
    return x


def _layer_norm_ref(x, weight=None, bias=None, *, eps, ndim):
    x = x.astype(np.float32)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(np.float32)
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y


def _rms_norm_ref(x, weight=None, *, eps, ndim):
    x = x.astype(np.float32)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    return y if weight is None else y * weight.astype(np.float32)


_NORM_ATTRS = {"eps": Attr("float", 1e-5), "ndim": Attr("int", 1)}
defop("layer_norm", ("x", "weight?", "bias?"), _norm_infer, _layer_norm_ref, _NORM_ATTRS,
      doc="layer normalisation over the last `ndim` dims")
defop("rms_norm", ("x", "weight?"), lambda x, weight=None, **a: _norm_infer(x, weight, **a), _rms_norm_ref,
      _NORM_ATTRS, doc="RMS normalisation over the last `ndim` dims (Llama)")


def _embedding_infer(weight, ids):
    if weight.rank != 2:
        raise ValueError(f"embedding table must be rank 2, got {weight}")
    if not ids.dtype.is_int:
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    return TensorType((*ids.shape, weight.shape[1]), weight.dtype)


def _embedding_ref(weight, ids):
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise IndexError(f"embedding ids out of range [0, {weight.shape[0]})")
    return weight[ids]


defop("embedding", ("weight", "ids"), _embedding_infer, _embedding_ref, doc="rows of `weight` picked by `ids`")


def _sdpa_infer(q, k, v, mask=None, *, is_causal, scale):
    dt = same_dtype(q, k, v)
    require_float(q)
    if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
        raise ValueError(f"q, k, v must have one rank >= 3 ([..., heads, seq, dim]), got {q}, {k}, {v}")
    if not dims_equal(q.shape[-1], k.shape[-1]):
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if not dims_equal(k.shape[-2], v.shape[-2]):
        raise ValueError(f"k and v lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    hq, hk = q.shape[-3], k.shape[-3]
    if not dims_equal(hq, hk):
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hk} (GQA)")
    batch = broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    out = TensorType((*batch, hq, q.shape[-2], v.shape[-1]), dt)
    if mask is not None:
        if mask.dtype is not DType.bool and mask.dtype != dt:
            raise ValueError(f"mask must be bool or {dt}, got {mask.dtype}")
        logits = (*out.shape[:-1], k.shape[-2])
        b = broadcast_shapes(mask.shape, logits)
        if len(b) != len(logits) or not all(dims_equal(p, q) for p, q in zip(b, logits)):
            raise ValueError(f"mask {mask} must broadcast to the attention logits "
                             f"[{', '.join(map(str, logits))}]")
    return out


def _sdpa_ref(q, k, v, mask=None, *, is_causal, scale):
    q, k, v = (t.astype(np.float32) for t in (q, k, v))
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = np.matmul(q, np.swapaxes(k, -1, -2)) * s
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        logits = np.where(np.tril(np.ones((L, S), bool)), logits, -np.inf)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf) if mask.dtype == np.bool_ else logits + mask.astype(np.float32)
    p = _softmax_ref(logits, -1)
    # a query that may attend to nothing gets zeros, not nan (torch's sdpa uses a "safe" softmax)
    p = np.where(np.all(logits == -np.inf, axis=-1, keepdims=True), np.float32(0), p)
    return np.matmul(p, v)


defop("sdpa", ("q", "k", "v", "mask?"), _sdpa_infer, _sdpa_ref,
      {"is_causal": Attr("bool", False), "scale": Attr("float", None, optional=True)},
      doc="scaled dot-product attention softmax(q k^T * scale + mask) v; fewer kv heads than q heads is GQA; "
          "a bool mask keeps True positions, a float mask is added (both broadcast to [..., heads, L, S]); "
          "is_causal masks top-left aligned; a query row with every key masked gives zeros, as torch does")
