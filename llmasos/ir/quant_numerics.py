"""The numerics of quantized weights that the IR's quant ops define (llmasos/ir/opset/quant.py): group
layout, 4-bit packing, dequantization and W8A8's dynamic activation quantization.

They live in the IR because the reference semantics of ``quant.dequant`` / ``quant.linear`` /
``quant.linear_a8`` are made of them; the quantizers (``llmasos.compress``: RTN, GPTQ, AWQ, SmoothQuant)
produce weights in this layout and re-export these functions, the lowering (llmasos/backends/tvm/
lowering_quant.py) and the torch executor compute the same thing.

Layout: a weight W [N, K] is cut along K into G = ceil(K / group) groups of ``group`` columns, the last one
shorter when ``group`` does not divide K; ``group=0``: one group (per channel); per tensor: scale/zero of
shape [1, 1]. Column k reads group k // group, and W ~= (q - zero) * scale. 4-bit codes are stored two per
byte: byte = low nibble (even k) | high nibble (odd k) << 4.
"""
from __future__ import annotations

import numpy as np


def num_groups(k: int, group: int) -> int:
    """G = ceil(K / group): the last group is ragged when group does not divide K."""
    return 1 if group == 0 else -(-k // group)


def expand(p: np.ndarray, shape: tuple, group: int) -> np.ndarray:
    """A per-group [N|1, G|1] array broadcast to the weight's [N, K]: column k takes group k // group
    (G = ceil(K / group), so a ragged last group reads the last column of p)."""
    n, k = shape
    p = np.asarray(p, np.float32)
    g = p.shape[1]
    if g == 1:
        return np.broadcast_to(p, (n, k))
    if g != num_groups(k, group):
        raise ValueError(f"per-group parameters of shape {list(p.shape)} do not fit K={k} with group={group}: "
                         f"expected G = ceil(K / group) = {num_groups(k, group)} columns")
    return np.broadcast_to(p[:, np.arange(k) // group], (n, k))


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int = 8, group: int = 0) -> np.ndarray:
    """(q - zero) * scale as f32 [N, K]; q are integer codes [N, K] (not packed)."""
    q = np.asarray(q)
    return ((q.astype(np.float32) - expand(zero, q.shape, group)) * expand(scale, q.shape, group)).astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] from 4-bit codes [N, K] in [0, 15]: even k in the low nibble, odd k in the high one."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4 needs codes [N, K] with an even K, got shape {list(q.shape)}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"pack_int4 packs codes in [0, 15], got [{q.min()}, {q.max()}]; "
                         "offset symmetric codes by 8 first")
    q = q.astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """uint8 [N, K] codes in [0, 15] from packed bytes [N, K/2] (inverse of pack_int4)."""
    p = np.asarray(p, np.uint8)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.uint8)
    out[:, 0::2] = p & 15
    out[:, 1::2] = p >> 4
    return out


def codes_of(qweight: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, K] as f32: unpacks 4-bit nibbles, reads fp8 values."""
    if bits == 4:
        return unpack_int4(qweight).astype(np.float32)
    return np.asarray(qweight).astype(np.float32)


def act_quant(x: np.ndarray):
    """(x_q int8 [..., K], s_x f32 [..., 1]): dynamic per-token symmetric int8 quantization.

    A zero row gets s_x = 0 and codes 0 (the division is by 1 there)."""
    xf = np.asarray(x).astype(np.float32)
    s = (np.abs(xf).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(xf / np.where(s > 0, s, np.float32(1))), -127, 127).astype(np.int8)
    return q, s
