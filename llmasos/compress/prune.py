"""Pruning masks and one-shot pruning: magnitude, N:M, Wanda, SparseGPT, structured MLP channel scores.

Masks are boolean with True = keep. Every selection sorts with a stable sort, so ties go the same way on
every run: among equal scores the weight with the lower (flattened, or in-row) index is pruned first.
Unstructured sparsity s prunes exactly floor(s * count) weights of the layer (magnitude, SparseGPT: of each
block of columns) or of each output row (Wanda).
"""
from __future__ import annotations

import numpy as np

from .gptq import (upper_chol_of_inverse, check_block, check_square, check_vector, check_weight,
                   prepare_hessian)


def _check_sparsity(sparsity, fn: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)) \
            or not (0 <= sparsity < 1):
        raise ValueError(f"{fn}: sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_nm(n, m, k: int, fn: str) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    if n > m:
        raise ValueError(f"{fn}: n={n} must be <= m={m} (keep n of every m weights)")
    if k % m:
        raise ValueError(f"{fn}: m={m} does not divide the input size K={k}")


def _n_pruned(sparsity: float, count: int) -> int:
    # the epsilon keeps e.g. 0.3 * 10 from flooring to 2
    return int(np.floor(sparsity * count + 1e-9))


def magnitude_mask(w, sparsity: float) -> np.ndarray:
    """Unstructured per-layer mask pruning the floor(sparsity * w.size) smallest |w|."""
    fn = "magnitude_mask"
    w = check_weight(w, fn)
    sparsity = _check_sparsity(sparsity, fn)
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    keep = np.ones(w.size, dtype=bool)
    keep[order[:_n_pruned(sparsity, w.size)]] = False
    return keep.reshape(w.shape)


def nm_mask(w, n: int = 2, m: int = 4, score=None) -> np.ndarray:
    """Keep exactly n of every m consecutive weights along K, the ones with the largest |w| (or score)."""
    fn = "nm_mask"
    w = check_weight(w, fn)
    rows, k = w.shape
    _check_nm(n, m, k, fn)
    if score is None:
        score = np.abs(w)
    else:
        score = np.asarray(score, dtype=np.float64)
        if score.shape != w.shape:
            raise ValueError(f"{fn}: score must have the weight's shape {w.shape}, got {score.shape}")
    sg = score.reshape(rows, k // m, m)
    order = np.argsort(sg, axis=-1, kind="stable")      # ascending: the first m - n are pruned
    keep = np.ones(sg.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :m - n], False, axis=-1)
    return keep.reshape(rows, k)


def wanda_mask(w, act_rms, sparsity: float, n: int = 0, m: int = 0) -> np.ndarray:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j|| (act_rms, the per-channel rms, is proportional to
    the norm), pruned per output row; with n > 0 keep n of every m by that score instead."""
    fn = "wanda_mask"
    w = check_weight(w, fn)
    rows, k = w.shape
    act = check_vector(act_rms, k, fn, "act_rms")
    sparsity = _check_sparsity(sparsity, fn)
    score = np.abs(w.astype(np.float64)) * act[None, :]
    if n or m:
        return nm_mask(w, n, m, score=score)
    order = np.argsort(score, axis=1, kind="stable")
    keep = np.ones(w.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :_n_pruned(sparsity, k)], False, axis=1)
    return keep


def sparsegpt(w, hessian, sparsity: float, n: int = 0, m: int = 0, damp: float = 0.01, block: int = 128):
    """SparseGPT (Frantar & Alistarh 2023), after IST-DASLab/sparsegpt ``fasterprune``: per block of
    columns, select the mask by w^2 / [H^-1]_jj^2 (the OBS saliency; unstructured: exactly
    floor(sparsity * size) of the block; n:m: keep n of every m, chosen when each m-group starts), then
    prune column by column with the OBS update of the not-yet-processed weights.

    Returns (pruned and updated weight, same dtype as w; mask, True = keep). Dead input channels
    (H_jj == 0) come out as zero columns, as in the reference.
    """
    fn = "sparsegpt"
    w = check_weight(w, fn)
    rows, k = w.shape
    sparsity = _check_sparsity(sparsity, fn)
    nm = bool(n or m)
    if nm:
        _check_nm(n, m, k, fn)
    block = check_block(block, fn)
    if nm and block % m:
        raise ValueError(f"{fn}: block={block} must be a multiple of m={m}")
    h = check_square(hessian, k, fn, "hessian")
    W, H, _ = prepare_hessian(w, h, damp, fn)
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = upper_chol_of_inverse(H, fn)
    dinv = np.diag(U)

    keep = np.ones((rows, k), dtype=bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2]          # a view: selections land in `keep`
        if not nm:
            sal = (W1 ** 2 / dinv[None, i1:i2] ** 2).ravel()
            order = np.argsort(sal, kind="stable")
            flat = keep1.reshape(-1).copy()
            flat[order[:_n_pruned(sparsity, sal.size)]] = False
            keep1[:] = flat.reshape(keep1.shape)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                sal = W1[:, i:i + m] ** 2 / dinv[None, i1 + i:i1 + i + m] ** 2
                order = np.argsort(sal, axis=1, kind="stable")
                sub = keep1[:, i:i + m]
                np.put_along_axis(sub, order[:, :m - n], False, axis=1)
            wc = W1[:, i]
            qc = np.where(keep1[:, i], wc, 0.0)
            err = (wc - qc) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = qc
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[~keep] = 0.0
    return W.astype(w.dtype), keep


def channel_scores(w_in_rows, w_out, act_rms=None) -> np.ndarray:
    """Importance of each of the F intermediate channels of an MLP, for structured pruning.

    w_in_rows: [F, K], or [s * F, K] with s row blocks of F stacked (gate rows then up rows), the weights
    producing the channel; w_out: [N, F] (down projection); act_rms: [F] rms of the channel's activation
    (the down projection's input) or None.
    With activations the score is act_rms_f * ||w_out[:, f]||, the rms norm of the channel's contribution
    to the output (the structured analogue of Wanda's |W| * ||X||); without, the product of the norms of
    the channel's input rows and output column.
    """
    fn = "channel_scores"
    w_in = check_weight(w_in_rows, fn)
    w_out = check_weight(w_out, fn)
    f = w_out.shape[1]
    if w_in.shape[0] % f:
        raise ValueError(f"{fn}: w_in_rows has {w_in.shape[0]} rows, not a multiple of w_out's "
                         f"{f} input channels")
    out_norm = np.linalg.norm(w_out.astype(np.float64), axis=0)
    if act_rms is not None:
        return check_vector(act_rms, f, fn, "act_rms") * out_norm
    blocks = w_in.astype(np.float64).reshape(-1, f, w_in.shape[1])
    in_norm = np.sqrt((blocks ** 2).sum(axis=(0, 2)))
    return in_norm * out_norm
