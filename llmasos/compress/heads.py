"""Scores for structured attention-head pruning: one score per head group (a kv head and the query heads
that share it under GQA; a single head under multi-head attention).

A group owns, in each projection that produces it, ``groups`` equal row blocks (q_proj: rep * D rows per
group; k_proj / v_proj: D rows; GPT-2's packed c_attn: D rows in each of its q, k, v thirds), and in the
output projection the matching block of input columns. The layout bookkeeping lives in
llmasos/passes/prune_heads.py; here are only the numerics, in the style of compress.prune.channel_scores.
"""
from __future__ import annotations

import numpy as np

from .gptq import check_vector, check_weight


def group_blocks(k: int, groups: int, fn: str) -> int:
    """Columns (or rows) per group of an axis of size k holding ``groups`` equal blocks."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"{fn}: groups must be an int >= 1, got {groups!r}")
    if k % groups:
        raise ValueError(f"{fn}: {k} is not a multiple of groups={groups}")
    return k // groups


def head_group_scores(w_out, groups: int, act_rms=None, w_in_rows=()) -> np.ndarray:
    """Importance of each of ``groups`` head groups: [groups] float64.

    w_out: [N, K] output projection (o_proj / c_proj as [out, in]); its K input columns are ``groups``
    equal consecutive blocks. act_rms: [K] rms of the output projection's input (the heads' outputs) or
    None. w_in_rows: [R, K_in] weights producing the heads (q, k, v projections as [out, in], or each
    segment of a packed projection), each with R a multiple of ``groups`` in group-major order.

    With activations the score is the l2 norm over the group's columns of act_rms_c * ||w_out[:, c]||:
    the per-channel score of channel_scores (the rms of each channel's contribution to the output),
    pooled over the channels that go together. Without, the product of the Frobenius norms of the group's
    input rows and output columns.
    """
    fn = "head_group_scores"
    w_out = check_weight(w_out, fn)
    k = w_out.shape[1]
    u = group_blocks(k, groups, fn)
    col_norm = np.linalg.norm(w_out.astype(np.float64), axis=0)
    if act_rms is not None:
        per_channel = check_vector(act_rms, k, fn, "act_rms") * col_norm
        return np.sqrt((per_channel.reshape(groups, u) ** 2).sum(axis=1))
    out_sq = (col_norm.reshape(groups, u) ** 2).sum(axis=1)
    in_sq = np.zeros(groups)
    for w in w_in_rows:
        w = check_weight(w, fn)
        r = group_blocks(w.shape[0], groups, fn)
        in_sq += (w.astype(np.float64).reshape(groups, r, -1) ** 2).sum(axis=(1, 2))
    if not len(w_in_rows):
        in_sq[:] = 1.0  # no input rows given: the output columns alone decide
    return np.sqrt(in_sq * out_sq)


def kept_groups(scores, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest-scoring groups in increasing order (stable: among equal scores the
    lower index is kept)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 1 <= keep <= scores.size:
        raise ValueError(f"kept_groups: keep={keep} must be in [1, {scores.size}]")
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def groups_to_keep(groups: int, ratio: float) -> int:
    """round(groups * (1 - ratio)) groups, half rounding towards removal, at least 1 (a layer keeps one head)."""
    removed = int(np.floor(groups * ratio + 0.5))
    return max(1, groups - removed)


def channel_index(groups: int, unit: int, segments: int, kept) -> np.ndarray:
    """Indices along an axis holding ``segments`` consecutive copies of ``groups`` blocks of ``unit``
    elements that survive when only the ``kept`` groups stay (e.g. GPT-2's c_attn: 3 segments q|k|v)."""
    kept = np.asarray(kept, dtype=np.int64)
    base = (np.arange(segments)[:, None] * groups + kept[None, :]) * unit          # [segments, kept]
    return (base[..., None] + np.arange(unit)).reshape(-1)
