"""Round-to-nearest weight quantization and the packed storage every quantizer of ours shares.

Convention (RTN here, GPTQ/AWQ/SmoothQuant in their own files): a weight W [N, K] (rows = output
features) is cut along K into G = ceil(K / group) groups of ``group`` columns, the last one shorter when
``group`` does not divide K (K - (G-1) * group columns: SmolLM2's K = 576 is 4.5 groups of 128, so 4 full
groups and one of 64); ``group=0``: one group, per channel; per tensor: one scale for everything, shape
[1, 1]. Column k belongs to group k // group. Each group has a ``scale`` and a ``zero`` (f32, [N, G]) and

    W ~= (q - zero) * scale                     (broadcast over the group's columns)

* symmetric: zero = 0, q in [-2^(b-1), 2^(b-1) - 1], int8 storage;
* asymmetric: q in [0, 2^b - 1], uint8 storage, zero in [0, 2^b - 1] (may be fractional).

4-bit codes are stored two per byte (``pack_int4``): byte = low nibble (even k) | high nibble (odd k) << 4.
That storage layout is part of the IR's quant ops, so its numerics (``num_groups``, ``expand``,
``dequantize``, ``pack_int4``, ``unpack_int4``) live in ``llmasos.ir.quant_numerics``; they are re-exported
here, where the quantizers use them.
"""
from __future__ import annotations

import numpy as np

from ..ir.quant_numerics import dequantize, expand, num_groups, pack_int4, unpack_int4  # noqa: F401  (re-exported)

BITS = (4, 8)


def check_options(bits: int, group: int, k: int = None, per_tensor: bool = False) -> None:
    """ValueError unless (bits, group) is a layout we store and lower."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported: quantized weights are 4 or 8 bits")
    if group < 0:
        raise ValueError(f"group={group} must be 0 (per channel) or a positive group size")
    if per_tensor and group:
        raise ValueError(f"per_tensor quantization has one scale for the whole tensor; group={group} contradicts it")
    if k is not None and bits == 4 and k % 2:
        raise ValueError(f"bits=4 packs two codes per byte along K, which needs an even K, got {k} "
                         f"(a ragged last group is fine, an odd K is not)")


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)


def _group_reduce(ufunc, w: np.ndarray, group: int) -> np.ndarray:
    """ufunc over each group's columns of w [N, K] -> [N, G]; reduceat takes the ragged last group as is."""
    starts = np.arange(0, w.shape[1], group) if group else np.zeros(1, np.intp)
    return ufunc.reduceat(w, starts, axis=1)


def quant_params(w: np.ndarray, bits: int, group: int, sym: bool, per_tensor: bool = False):
    """(scale, zero) [N, G] (or [1, 1] per tensor) of round-to-nearest for w [N, K], f32."""
    w = np.asarray(w, np.float32)
    check_options(bits, group, w.shape[1], per_tensor)
    if per_tensor:
        w, group = w.reshape(1, -1), 0
    lo, hi = qrange(bits, sym)
    if sym:
        amax = _group_reduce(np.maximum, np.abs(w), group)
        scale = amax / hi
        zero = np.zeros_like(scale)
    else:
        wmin = np.minimum(_group_reduce(np.minimum, w, group), 0.0)
        wmax = np.maximum(_group_reduce(np.maximum, w, group), 0.0)
        scale = (wmax - wmin) / (hi - lo)
        zero = np.where(scale > 0, -wmin / np.where(scale > 0, scale, 1.0), 0.0)
    # an all-zero group gets scale 1 (its codes are all zero): no division by zero, exact reconstruction
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zero.astype(np.float32)


def quantize_with(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    """Integer codes of w for given scale/zero: clip(round(w / scale + zero)) (int8 sym, uint8 asym)."""
    w = np.asarray(w, np.float32)
    lo, hi = qrange(bits, sym)
    s, z = expand(scale, w.shape, group), expand(zero, w.shape, group)
    q = np.clip(np.rint(w / s + z), lo, hi)
    return q.astype(np.int8 if sym else np.uint8)


def quantize_rtn(w: np.ndarray, bits: int, group: int, sym: bool, per_tensor: bool = False):
    """Round-to-nearest: (q [N, K] int8/uint8 codes, scale, zero). |w - dequantize| <= scale / 2 inside
    the representable range (symmetric: always; asymmetric: always, the range covers [min, max])."""
    scale, zero = quant_params(w, bits, group, sym, per_tensor)
    return quantize_with(w, scale, zero, bits, group, sym), scale, zero


def storage(q: np.ndarray, zero: np.ndarray, bits: int, sym: bool):
    """(stored codes, stored zero) as quant.linear takes them: 8-bit codes as they are; 4-bit codes
    packed, symmetric ones offset by 8 (zero becomes 8) so that every nibble is unsigned."""
    if bits == 8:
        return q, zero
    if sym:
        return pack_int4(q.astype(np.int16) + 8), np.full_like(zero, 8.0)
    return pack_int4(q), zero
