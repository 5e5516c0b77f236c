"""AWQ (Lin et al. 2023): per-input-channel scales that protect salient weights before RTN.

Follows mit-han-lab/llm-awq ``auto_scale``: candidates s = act_abs_mean^alpha for alpha = i / grid,
i = 0 .. grid-1 (clamped at 1e-4, normalized by sqrt(max(s) * min(s))); each is scored by the output error
|| x W^T - x (Q(W diag(s)) diag(1/s))^T ||^2 on the sample rows, and the best wins. alpha = 0 is s = 1,
i.e. plain RTN, so on the sample the result is never worse than RTN. Without sample rows the score is the
weight error weighted by the activation magnitude, || (W_q - W) diag(act_abs_mean) ||^2 (a diagonal
approximation of the same loss).

The caller folds s in: the layer's weight becomes W diag(s) (then quantized), and the input is divided by
s (folded into the preceding norm's gain or linear).
"""
from __future__ import annotations

import numpy as np

from .gptq import check_bits_group, check_vector, check_weight, dequantize, rtn_quantize


def _rtn_roundtrip(w: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    return dequantize(*rtn_quantize(w, bits, group, sym), group=group)


def awq_scales(w, act_abs_mean, x_sample, bits: int, group: int, sym: bool, grid: int = 20) -> np.ndarray:
    """Best AWQ scales s [K] (float32) for w [N, K] given per-channel mean |x| [K] and sample rows [R, K]."""
    fn = "awq_scales"
    w = check_weight(w, fn)
    n, k = w.shape
    check_bits_group(bits, group, k, fn)
    act = check_vector(act_abs_mean, k, fn, "act_abs_mean")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"{fn}: grid must be an int >= 1, got {grid!r}")
    W = w.astype(np.float64)
    if x_sample is not None:
        x = np.asarray(x_sample, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0:
            raise ValueError(f"{fn}: x_sample must have shape [R, {k}] with R >= 1, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{fn}: x_sample has non-finite values")
        ref = x @ W.T

    best, best_s = np.inf, np.ones(k)
    for i in range(grid):
        s = np.maximum(act ** (i / grid), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        wq = _rtn_roundtrip(W * s, bits, group, sym) / s
        if x_sample is not None:
            loss = np.mean((x @ wq.T - ref) ** 2)
        else:
            loss = np.mean(((wq - W) * act) ** 2)
        if loss < best:
            best, best_s = loss, s
    return best_s.astype(np.float32)
