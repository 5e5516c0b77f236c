"""GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error compensation.

Follows IST-DASLab/gptq ``gptq.py`` (``fasterquant``): dead input channels (H_jj == 0) get H_jj = 1 and a
zero weight column; the Hessian is damped by ``damp * mean(diag H)``; the upper Cholesky factor of H^-1
drives the updates; columns are processed in blocks of ``block`` with the rest of the matrix updated lazily
once per block. Group scales are computed when a group starts, from the weights as updated so far (the
pending lazy update of the group's columns outside the current block is applied first, so a group that
straddles a block boundary sees the same values as one inside a block). With ``act_order`` columns go in
order of decreasing H_jj and the group parameters are fixed upfront on contiguous groups of the original
weight (the reference's ``static_groups``), so that ``scale``/``zero`` stay indexed by contiguous groups.
Groups need not divide K: there are G = ceil(K / group) of them, column k in group k // group, the last one
shorter (every slice below simply stops at K).

Also holds the plain round-to-nearest quantizer both GPTQ's baseline and AWQ's inner loop use.
"""
from __future__ import annotations

import numpy as np

BITS = (2, 3, 4, 8)


def check_weight(w, fn: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"{fn}: weight must be a non-empty 2-D array [N, K], got shape {w.shape}")
    # kind 'V' admits ml_dtypes' bfloat16 / float8 weights as stored in param_data
    if w.dtype.kind not in "fV":
        raise ValueError(f"{fn}: weight must be floating point, got {w.dtype}")
    if not np.all(np.isfinite(w.astype(np.float64))):
        raise ValueError(f"{fn}: weight has non-finite values")
    return w


def check_vector(v, k: int, fn: str, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (k,):
        raise ValueError(f"{fn}: {name} must have shape ({k},) to match the weight's K, got {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{fn}: {name} must be finite and >= 0")
    return v


def check_square(h, k: int, fn: str, name: str) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.shape != (k, k):
        raise ValueError(f"{fn}: {name} must have shape ({k}, {k}) to match the weight's K, got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{fn}: {name} has non-finite values")
    return h


def check_bits_group(bits, group, k: int, fn: str) -> int:
    """Returns the group size actually used (K for per-channel); a group that does not divide K leaves a
    shorter last group."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{fn}: bits must be one of {list(BITS)}, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 0:
        raise ValueError(f"{fn}: group must be an int >= 0 (0 = per-channel), got {group!r}")
    return int(group) or k


def quant_params(x: np.ndarray, bits: int, sym: bool):
    """Per-row (scale, zero) for rows of x [N, g], as in the reference quantizer (range includes 0;
    all-zero rows get the range [-1, 1]). Scales are rounded to float32 here so that codes are chosen
    against the scale that will be stored."""
    x = x.astype(np.float64, copy=False)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(x).max(axis=1)
        amax[amax == 0] = qmax   # scale 1, as the reference's [-1, 1]-ish fallback: any positive scale works
        scale = (amax / qmax).astype(np.float32).astype(np.float64)
        return scale, np.zeros_like(scale)
    maxq = 2 ** bits - 1
    xmin, xmax = np.minimum(x.min(axis=1), 0.0), np.maximum(x.max(axis=1), 0.0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1.0, 1.0
    scale = ((xmax - xmin) / maxq).astype(np.float32).astype(np.float64)
    zero = np.clip(np.round(-xmin / scale), 0, maxq)
    return scale, zero


def quant_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    """Codes of x (any trailing shape broadcast against scale/zero)."""
    if sym:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return np.clip(np.round(x / scale), lo, hi)
    return np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)


def _code_dtype(sym: bool):
    return np.int8 if sym else np.uint8


def rtn_quantize(w, bits: int, group: int, sym: bool):
    """Round-to-nearest group quantization: (q [N,K], scale f32 [N,G], zero f32 [N,G])."""
    w = check_weight(w, "rtn_quantize")
    n, k = w.shape
    gs = check_bits_group(bits, group, k, "rtn_quantize")
    w = w.astype(np.float64)
    ng = -(-k // gs)
    scale, zero = np.zeros((n, ng)), np.zeros((n, ng))
    for g in range(ng):  # per group, so a ragged last group needs no padding that would move its range
        scale[:, g], zero[:, g] = quant_params(w[:, g * gs:(g + 1) * gs], bits, sym)
    col = np.arange(k) // gs
    q = quant_codes(w, scale[:, col], zero[:, col], bits, sym)
    return q.astype(_code_dtype(sym)), scale.astype(np.float32), zero.astype(np.float32)


def dequantize(q, scale, zero, group: int = None) -> np.ndarray:
    """(q - zero) * scale with scale/zero [N, G] applied to contiguous groups of ``group`` columns, the
    last one possibly shorter (G = ceil(K / group)). ``group=None``: K // G, which needs G to divide K --
    a ragged layout is ambiguous without its group size (K=576, G=5 could be groups of 116 .. 143)."""
    q = np.asarray(q)
    scale, zero = np.asarray(scale), np.asarray(zero)
    n, k = q.shape
    g = scale.shape[1]
    if scale.shape != (n, g) or zero.shape != (n, g):
        raise ValueError(f"dequantize: scale {scale.shape} / zero {zero.shape} do not fit codes {q.shape}")
    if group is None:
        if k % g:
            raise ValueError(f"dequantize: {g} groups do not divide K={k}; pass the group size of a ragged layout")
        group = k // g
    gs = int(group) or k
    if g != -(-k // gs):
        raise ValueError(f"dequantize: scale has {g} groups, but K={k} in groups of {gs} makes {-(-k // gs)}")
    col = np.arange(k) // gs
    return (q.astype(np.float64) - zero[:, col].astype(np.float64)) * scale[:, col].astype(np.float64)


def upper_chol_of_inverse(h: np.ndarray, fn: str) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), what the reference gets from
    cholesky(cholesky_inverse(cholesky(H)), upper=True), with one factorization: the lower Cholesky
    factor M of H with rows and columns reversed gives H = R R^T with R = rev(M) upper triangular, so
    H^-1 = R^-T R^-1 and U = R^-1 (upper, positive diagonal: the unique factor)."""
    try:
        m = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise ValueError(f"{fn}: the damped Hessian is not positive definite; increase damp "
                         f"or calibrate on more rows") from None
    u = np.linalg.inv(np.ascontiguousarray(m[::-1, ::-1]))
    return np.triu(u)


def prepare_hessian(w: np.ndarray, hessian: np.ndarray, damp: float, fn: str):
    """Shared GPTQ / SparseGPT preamble: dead channels, then damping. Returns (W f64 copy, H f64 copy)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0 <= damp < 1):
        raise ValueError(f"{fn}: damp must be in [0, 1), got {damp!r}")
    W = w.astype(np.float64).copy()
    H = hessian.copy()
    if np.any(np.diag(H) < 0):
        raise ValueError(f"{fn}: hessian has negative diagonal entries; it must be a mean of x^T x")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def check_block(block, fn: str) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"{fn}: block must be an int >= 1, got {block!r}")
    return int(block)


def gptq_quantize(w, hessian, bits: int, group: int, sym: bool, damp: float = 0.01, block: int = 128,
                  act_order: bool = False):
    """GPTQ-quantize w [N, K] given the Hessian proxy [K, K] (mean of x^T x over calibration rows).

    Returns (q [N, K] int8 codes in [-2^(b-1), 2^(b-1)-1] if sym else uint8 in [0, 2^b-1],
    scale f32 [N, G], zero f32 [N, G]) with G = ceil(K / group) (1 if group == 0);
    dequantized weight = (q - zero) * scale on contiguous groups of ``group`` columns, the last one ragged.
    """
    fn = "gptq_quantize"
    w = check_weight(w, fn)
    n, k = w.shape
    gs = check_bits_group(bits, group, k, fn)
    block = check_block(block, fn)
    h = check_square(hessian, k, fn, "hessian")
    W, H, _ = prepare_hessian(w, h, damp, fn)
    ngroups = -(-k // gs)
    scale = np.zeros((n, ngroups))
    zero = np.zeros((n, ngroups))

    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        # static groups: contiguous groups of the original weight, fixed before any update
        for g in range(ngroups):
            scale[:, g], zero[:, g] = quant_params(W[:, g * gs:(g + 1) * gs], bits, sym)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = np.arange(k)
    group_of = perm // gs

    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = upper_chol_of_inverse(H, fn)

    Q = np.zeros((n, k))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not act_order and col % gs == 0:
                cols = W1[:, i:i + gs]
                end = min(col + gs, k)   # a ragged last group stops at K
                if end > i2:   # the group runs past this block: bring those columns up to date
                    rest = W[:, i2:end] - Err1[:, :i] @ U[i1:col, i2:end]
                    cols = np.concatenate([cols, rest], axis=1)
                scale[:, g], zero[:, g] = quant_params(cols, bits, sym)
            wc = W1[:, i]
            qc = quant_codes(wc, scale[:, g], zero[:, g], bits, sym)
            err = (wc - (qc - zero[:, g]) * scale[:, g]) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err1[:, i] = err
            Q[:, col] = qc
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if act_order:
        Q = Q[:, np.argsort(perm)]
    return Q.astype(_code_dtype(sym)), scale.astype(np.float32), zero.astype(np.float32)
