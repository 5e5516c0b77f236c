"""Quantized GEMMs: weights stored as integer (or fp8) codes with per-group scales, what the quantize
passes produce (llmasos/passes/quantize.py) and the TVM backend lowers with dequantization fused into the
GEMM (llmasos/backends/tvm/lowering_quant.py).

* ``quant.dequant(qweight, scale, zero){bits, group}`` -> [N, K] in scale's dtype:
  ``(code - zero) * scale``, scale/zero [N, G] (or [1, 1], one for the whole tensor) broadcast over
  groups of ``group`` columns: column k reads group k // group, G = ceil(K / group), so when ``group``
  does not divide K the last group is shorter (``group=0``: G=1, per channel). Storage of the codes:

  - ``bits=8``: i8 [N, K] (symmetric, zero = 0), u8 [N, K] (asymmetric) or f8e4m3 [N, K] (fp8
    weight-only: the code is the fp8 value);
  - ``bits=4``: u8 [N, K/2], two unsigned 4-bit codes per byte, even k in the low nibble, odd k in the
    high one. Symmetric 4-bit codes q in [-8, 7] are stored as q + 8 with zero = 8, so one formula
    serves both.
* ``quant.linear(x, qweight, scale, zero, bias?){bits, group}`` = linear(x, dequant(...), bias) computed
  in f32 (x, the f32 dequantized weight and the bias), the result in x's dtype. The weight is not rounded
  to x's dtype first: a fused dequantize-GEMV keeps it in f32 registers, and rounding would cost it two
  conversions per weight. The reference dequantizes; the backend never materializes the float weight.
* ``quant.linear_a8(x, qweight, wscale, bias?)``: W8A8 with dynamic per-token activation scales:
  s_x = max|x_row| / 127, x_q = clip(round(x / s_x), -127, 127), y = (x_q @ q^T) * s_x * wscale + bias,
  the product accumulated exactly in int32.
* ``quant.embedding(qweight, scale, zero, ids){bits, group}`` = ``embedding(dequant(...), ids)``: the rows
  picked by ids, dequantized (only those rows are ever read). The quantize pass gives a tied output head
  and its embedding table the same three parameters.
"""
from __future__ import annotations

import numpy as np

from ..ops import Attr, defop, get_op
from ..quant_numerics import act_quant, codes_of, expand
from ..types import DType, TensorType, dims_equal
from .rules import to_dtype

_ATTRS = {"bits": Attr("int", 8, choices=(4, 8)), "group": Attr("int", 0)}


def _k_of(qweight: TensorType, bits: int) -> object:
    return qweight.shape[1] * 2 if bits == 4 else qweight.shape[1]


def _check_codes(op: str, qweight: TensorType, bits: int, group: int):
    """(N, K) of a quantized weight, or ValueError naming what is wrong with its storage."""
    if qweight.rank != 2:
        raise ValueError(f"{op}: qweight must be rank 2, got {qweight}")
    if bits == 4 and qweight.dtype is not DType.u8:
        raise ValueError(f"{op}: bits=4 needs a uint8 qweight of shape [N, K/2] (two codes per byte), got {qweight}")
    if bits == 8 and qweight.dtype not in (DType.i8, DType.u8, DType.f8e4m3):
        raise ValueError(f"{op}: bits=8 needs an int8, uint8 or f8e4m3 qweight of shape [N, K], got {qweight}")
    if group < 0:
        raise ValueError(f"{op}: group={group} must be 0 (per channel) or a positive group size")
    n, k = qweight.shape[0], _k_of(qweight, bits)
    if group and not isinstance(k, int):  # G = ceil(K / group) sizes the scales: it must be a number
        raise ValueError(f"{op}: group={group} needs a static K, got K={k}")
    return n, k


def _check_scales(op: str, n, k, group: int, scale: TensorType, zero: TensorType) -> None:
    g = 1 if group == 0 else -(-k // group)  # ceil: a ragged last group has its own scale column
    if not scale.dtype.is_float or scale.dtype is DType.f8e4m3:
        raise ValueError(f"{op}: scale must be f32, f16 or bf16, got {scale}")
    if zero.dtype is not scale.dtype:
        raise ValueError(f"{op}: zero must have scale's dtype {scale.dtype}, got {zero}")
    per_tensor = scale.rank == 2 and scale.shape[0] == 1 and scale.shape[1] == 1
    if not per_tensor and (scale.rank != 2 or not dims_equal(scale.shape[0], n) or not dims_equal(scale.shape[1], g)):
        raise ValueError(f"{op}: scale must be [N, G] = [{n}, {g}] (K={k}, group={group}, G = ceil(K / group)) "
                         f"or [1, 1], got {scale}")
    if zero.shape != scale.shape:
        raise ValueError(f"{op}: zero must have scale's shape {list(scale.shape)}, got {zero}")


def _dequant_infer(qweight, scale, zero, *, bits, group):
    n, k = _check_codes("quant.dequant", qweight, bits, group)
    _check_scales("quant.dequant", n, k, group, scale, zero)
    return TensorType((n, k), scale.dtype)


def _dequant_ref(qweight, scale, zero, *, bits, group):
    q = codes_of(qweight, bits)
    s, z = np.asarray(scale, np.float32), np.asarray(zero, np.float32)
    w = (q - expand(z, q.shape, group)) * expand(s, q.shape, group)
    return to_dtype(w.astype(np.float32), DType.from_numpy(np.asarray(scale).dtype))


defop("quant.dequant", ("qweight", "scale", "zero"), _dequant_infer, _dequant_ref, _ATTRS,
      doc="(code - zero) * scale per group: the float weight [N, K] of a quantized one")


def _linear_infer(x, qweight, scale, zero, bias=None, *, bits, group):
    n, k = _check_codes("quant.linear", qweight, bits, group)
    _check_scales("quant.linear", n, k, group, scale, zero)
    if not x.dtype.is_float or x.dtype is DType.f8e4m3:
        raise ValueError(f"quant.linear: x must be f32, f16 or bf16, got {x}")
    if x.rank < 1 or not dims_equal(x.shape[-1], k):
        raise ValueError(f"quant.linear: input features {x.shape[-1] if x.rank else '?'} != weight K={k}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], n) or bias.dtype is not x.dtype):
        raise ValueError(f"quant.linear: bias must be [{n}] of x's dtype {x.dtype}, got {bias}")
    return TensorType((*x.shape[:-1], n), x.dtype)


def _linear_ref(x, qweight, scale, zero, bias=None, *, bits, group):
    w = _dequant_ref(qweight, scale, zero, bits=bits, group=group).astype(np.float32)
    y = get_op("linear").ref(x.astype(np.float32), w, None if bias is None else bias.astype(np.float32))
    return to_dtype(y, DType.from_numpy(x.dtype))


defop("quant.linear", ("x", "qweight", "scale", "zero", "bias?"), _linear_infer, _linear_ref, _ATTRS,
      doc="linear(x, dequant(qweight, scale, zero), bias) computed in f32, the result in x's dtype; the "
          "weight stays packed")


def _a8_infer(x, qweight, wscale, bias=None):
    if qweight.rank != 2 or qweight.dtype is not DType.i8:
        raise ValueError(f"quant.linear_a8: qweight must be int8 [N, K], got {qweight}")
    n, k = qweight.shape
    if x.dtype not in (DType.f32, DType.f16, DType.bf16):
        raise ValueError(f"quant.linear_a8: x must be f32, f16 or bf16, got {x}")
    if x.rank < 1 or not dims_equal(x.shape[-1], k):
        raise ValueError(f"quant.linear_a8: input features {x.shape[-1] if x.rank else '?'} != weight K={k}")
    if wscale.rank != 1 or not dims_equal(wscale.shape[0], n) or wscale.dtype is not DType.f32:
        raise ValueError(f"quant.linear_a8: wscale must be f32 [{n}], got {wscale}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], n) or bias.dtype is not x.dtype):
        raise ValueError(f"quant.linear_a8: bias must be [{n}] of x's dtype {x.dtype}, got {bias}")
    return TensorType((*x.shape[:-1], n), x.dtype)


def _a8_ref(x, qweight, wscale, bias=None):
    xq, s = act_quant(x)
    acc = np.matmul(xq.astype(np.int32), np.asarray(qweight).astype(np.int32).T)  # exact: |acc| < 2^31
    y = acc.astype(np.float32) * s * np.asarray(wscale, np.float32)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float32)
    return to_dtype(y, DType.from_numpy(np.asarray(x).dtype))


defop("quant.linear_a8", ("x", "qweight", "wscale", "bias?"), _a8_infer, _a8_ref,
      doc="W8A8: per-token int8 activations times int8 weights, int32 accumulation, rescaled by s_x * wscale")


def _qembed_infer(qweight, scale, zero, ids, *, bits, group):
    n, k = _check_codes("quant.embedding", qweight, bits, group)
    _check_scales("quant.embedding", n, k, group, scale, zero)
    if not ids.dtype.is_int:
        raise ValueError(f"quant.embedding: ids must be integers, got {ids.dtype}")
    return TensorType((*ids.shape, k), scale.dtype)


def _qembed_ref(qweight, scale, zero, ids, *, bits, group):
    n = np.asarray(qweight).shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"quant.embedding ids out of range [0, {n})")
    return _dequant_ref(qweight, scale, zero, bits=bits, group=group)[ids]


defop("quant.embedding", ("qweight", "scale", "zero", "ids"), _qembed_infer, _qembed_ref, _ATTRS,
      doc="rows of dequant(qweight, scale, zero) picked by `ids`: a quantized embedding table (the same "
          "storage as quant.linear's weight, so a tied head and embedding share one copy)")
