"""Low-rank factorization of linear weights: plain truncated SVD, ASVD and SVD-LLM.

All factor w [N, K] as a [N, r] @ b [r, K], splitting the singular values as sqrt(S) on each side so the
two factors have comparable ranges (they may be quantized afterwards). Factoring only pays when
r (N + K) < N K (``flops_saved``); ``rank_for`` picks r from a parameter-reduction ratio or an energy
threshold.
"""
from __future__ import annotations

import numpy as np

from .gptq import check_square, check_vector, check_weight


def _check_rank(rank, shape, fn: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{fn}: rank must be an int >= 1, got {rank!r}")
    if rank > min(shape):
        raise ValueError(f"{fn}: rank {rank} exceeds min(N, K) = {min(shape)} for weight shape {tuple(shape)}")
    return int(rank)


def _truncate(m: np.ndarray, rank: int):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = np.sqrt(s[:rank])
    return u[:, :rank] * r[None, :], r[:, None] * vt[:rank]


def svd_factor(w, rank: int):
    """Truncated SVD: (a [N, r], b [r, K]) float32 with a @ b the best rank-r approximation of w."""
    fn = "svd_factor"
    w = check_weight(w, fn)
    rank = _check_rank(rank, w.shape, fn)
    a, b = _truncate(w.astype(np.float64), rank)
    return a.astype(np.float32), b.astype(np.float32)


def rank_for(w_shape, ratio=None, energy=None, singular_values=None) -> int:
    """Rank for a weight of shape (N, K).

    ratio: fraction of the parameters removed; the largest r with r (N + K) <= (1 - ratio) N K.
    energy: the smallest r whose leading singular values keep that fraction of sum(s^2) (needs
    singular_values, all min(N, K) of them).
    """
    fn = "rank_for"
    if len(tuple(w_shape)) != 2 or min(w_shape) < 1:
        raise ValueError(f"{fn}: w_shape must be (N, K) with N, K >= 1, got {tuple(w_shape)}")
    n, k = (int(d) for d in w_shape)
    if (ratio is None) == (energy is None):
        raise ValueError(f"{fn}: give exactly one of ratio and energy")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 <= ratio < 1):
            raise ValueError(f"{fn}: ratio must be in [0, 1), got {ratio!r}")
        r = int(np.floor((1 - ratio) * n * k / (n + k) + 1e-9))
        if r < 1:
            raise ValueError(f"{fn}: ratio {ratio} leaves no rank >= 1 for shape ({n}, {k})")
        return min(r, n, k)
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0 < energy <= 1):
        raise ValueError(f"{fn}: energy must be in (0, 1], got {energy!r}")
    if singular_values is None:
        raise ValueError(f"{fn}: energy needs singular_values")
    s = np.asarray(singular_values, dtype=np.float64)
    if s.shape != (min(n, k),) or np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"{fn}: singular_values must be {min(n, k)} finite values >= 0, got shape {s.shape}")
    e = np.sort(s)[::-1] ** 2
    total = e.sum()
    if total == 0:
        return 1
    kept = np.cumsum(e) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s)))


def flops_saved(n: int, k: int, r: int) -> bool:
    """Whether a [n, r] @ [r, k] factorization costs fewer parameters / FLOPs than the [n, k] weight."""
    return r * (n + k) < n * k


def asvd_factor(w, act_abs_mean, rank: int, alpha: float = 0.5):
    """ASVD (Yuan et al. 2023): truncate the SVD of W S with S = diag(act_abs_mean^alpha), so the
    columns that meet large activations are approximated best, then b = (...) S^-1."""
    fn = "asvd_factor"
    w = check_weight(w, fn)
    rank = _check_rank(rank, w.shape, fn)
    act = check_vector(act_abs_mean, w.shape[1], fn, "act_abs_mean")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 <= alpha <= 1):
        raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha!r}")
    s = act ** alpha
    # dead channels would make S singular; the floor keeps S^-1 finite and those columns barely matter
    s = np.maximum(s, max(s.max(), 1.0) * 1e-6)
    a, b = _truncate(w.astype(np.float64) * s[None, :], rank)
    return a.astype(np.float32), (b / s[None, :]).astype(np.float32)


def whitening_factor(xtx: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor L of X^T X (+ the smallest damping lambda I, lambda = 1e-8 .. 1e-1 times the
    mean diagonal, that makes it positive definite)."""
    xtx = (xtx + xtx.T) / 2
    mean_diag = np.mean(np.diag(xtx))
    if mean_diag <= 0:
        return np.eye(len(xtx))    # no activation energy at all: whitening is meaningless, plain SVD
    try:
        return np.linalg.cholesky(xtx)
    except np.linalg.LinAlgError:
        pass
    for p in range(-8, 0):
        try:
            return np.linalg.cholesky(xtx + 10.0 ** p * mean_diag * np.eye(len(xtx)))
        except np.linalg.LinAlgError:
            continue
    raise ValueError("svdllm_factor: xtx stays non positive definite after damping 0.1 * mean diagonal")


def svdllm_factor(w, xtx, rank: int):
    """SVD-LLM (Wang et al. 2024): with X^T X = L L^T, ||X (W - W')^T||_F = ||(W - W') L||_F, so truncating
    the SVD of W L and multiplying back by L^-1 gives the rank-r W' with the smallest output error on the
    calibration rows."""
    fn = "svdllm_factor"
    w = check_weight(w, fn)
    rank = _check_rank(rank, w.shape, fn)
    h = check_square(xtx, w.shape[1], fn, "xtx")
    lower = whitening_factor(h)
    a, bl = _truncate(w.astype(np.float64) @ lower, rank)
    # b = bl L^-1  <=>  L^T b^T = bl^T
    b = np.linalg.solve(lower.T, bl.T).T
    return a.astype(np.float32), b.astype(np.float32)
