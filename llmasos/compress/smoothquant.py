"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha); the input is divided by s and the weight's columns
multiplied by it, which leaves X W^T unchanged and balances the two ranges. As in the reference
(mit-han-lab/smoothquant ``smooth_ln_fcs``), the weight range is clamped at 1e-5 before the power and the
result at 1e-5, so dead channels never give a zero or infinite scale.
"""
from __future__ import annotations

import numpy as np

from .gptq import check_vector, check_weight

_FLOOR = 1e-5


def smooth_scales(act_abs_max, w, alpha: float = 0.5) -> np.ndarray:
    """Per-input-channel smoothing scales s [K] (float32) for w [N, K] (rows of all linears sharing the
    input may be stacked) and the calibration max |x| per channel [K]."""
    fn = "smooth_scales"
    w = check_weight(w, fn)
    act = check_vector(act_abs_max, w.shape[1], fn, "act_abs_max")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 <= alpha <= 1):
        raise ValueError(f"{fn}: alpha must be in [0, 1], got {alpha!r}")
    wmax = np.maximum(np.abs(w.astype(np.float64)).max(axis=0), _FLOOR)
    s = np.maximum(act ** alpha / wmax ** (1 - alpha), _FLOOR)
    return s.astype(np.float32)
