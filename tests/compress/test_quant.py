"""RTN quantization helpers (llmasos/compress/quant.py): the issue's reconstruction bound, packing, storage."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from llmasos.compress.quant import (dequantize, pack_int4, quant_params, quantize_rtn, storage, unpack_int4)

SEEDS = st.integers(0, 2 ** 32 - 1)


def _weights(data, k_multiple=1):
    n = data.draw(st.integers(1, 8), label="n")
    k = data.draw(st.integers(1, 6), label="k/multiple") * k_multiple
    rng = np.random.default_rng(data.draw(SEEDS))
    w = (rng.standard_normal((n, k)) * data.draw(st.sampled_from([1e-3, 1.0, 50.0]))).astype(np.float32)
    if data.draw(st.booleans(), label="zero row"):
        w[0] = 0.0  # an all-zero channel must reconstruct exactly (scale 1, codes 0)
    return w


@given(data=st.data())
def test_int8_per_channel_error_is_at_most_half_a_scale(data):
    """The issue's bound: per-channel int8 RTN reconstructs every weight within scale/2 of its channel."""
    w = _weights(data)
    sym = data.draw(st.booleans(), label="sym")
    q, scale, zero = quantize_rtn(w, 8, 0, sym)
    assert q.dtype == (np.int8 if sym else np.uint8)
    assert scale.shape == zero.shape == (w.shape[0], 1)
    err = np.abs(dequantize(q, scale, zero) - w)
    # scale/2 plus the f32 rounding of (q - zero) * scale itself (a few ulps of |w|)
    bound = scale / 2 * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(w)
    assert np.all(err <= bound), (err - bound).max()
    if not w[0].any():
        assert np.all(err[0] == 0)


@given(data=st.data(), bits=st.sampled_from([4, 8]), group=st.sampled_from([0, 2, 4]), sym=st.booleans())
def test_group_error_bound_and_code_ranges(data, bits, group, sym):
    w = _weights(data, k_multiple=4)
    q, scale, zero = quantize_rtn(w, bits, group, sym)
    g = 1 if group == 0 else w.shape[1] // group
    assert scale.shape == (w.shape[0], g)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert q.min() >= lo and q.max() <= hi
    if sym:
        assert np.all(zero == 0)
    s = np.repeat(scale, w.shape[1] // g, axis=1)
    err = np.abs(dequantize(q, scale, zero, bits, group) - w)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(w))


def test_per_tensor_has_one_scale():
    w = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    q, scale, zero = quantize_rtn(w, 8, 0, True, per_tensor=True)
    assert scale.shape == (1, 1) and scale[0, 0] == pytest.approx(4.0 / 127)
    np.testing.assert_array_equal(q, np.rint(w / scale[0, 0]).astype(np.int8))


@given(codes=hnp.arrays(np.uint8, st.tuples(st.integers(0, 5), st.integers(0, 4).map(lambda k: 2 * k)),
                        elements=st.integers(0, 15)))
def test_pack_unpack_round_trip(codes):
    p = pack_int4(codes)
    assert p.dtype == np.uint8 and p.shape == (codes.shape[0], codes.shape[1] // 2)
    np.testing.assert_array_equal(unpack_int4(p), codes)
    if codes.size:  # even k in the low nibble
        np.testing.assert_array_equal(p & 15, codes[:, 0::2])


def test_sym_int4_storage_offsets_by_8():
    q = np.array([[-8, 7, 0, -1]], np.int8)
    codes, zero = storage(q, np.zeros((1, 1), np.float32), 4, True)
    np.testing.assert_array_equal(codes, [[0 | (15 << 4), 8 | (7 << 4)]])
    assert zero.tolist() == [[8.0]]
    np.testing.assert_array_equal(unpack_int4(codes).astype(np.int16) - 8, q)


@pytest.mark.parametrize("args, message", [
    ((3, 0, True), "bits=3 is not supported: quantized weights are 4 or 8 bits"),
    ((4, 4, True), "bits=4 packs two codes per byte along K, which needs an even K, got 7 (a ragged last "
                   "group is fine, an odd K is not)"),
    ((8, -1, True), "group=-1 must be 0 (per channel) or a positive group size"),
])
def test_bad_options(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quant_params(np.ones((2, 8 if args[0] == 8 or args[1] < 0 else 7), np.float32), *args)


def test_per_tensor_with_groups_is_refused():
    with pytest.raises(ValueError, match="per_tensor quantization has one scale for the whole tensor; group=4"):
        quantize_rtn(np.ones((2, 8), np.float32), 8, 4, True, per_tensor=True)


def test_pack_refuses_signed_or_odd():
    with pytest.raises(ValueError, match=r"pack_int4 packs codes in \[0, 15\], got \[-1, 3\]"):
        pack_int4(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"pack_int4 needs codes \[N, K\] with an even K, got shape \[1, 3\]"):
        pack_int4(np.array([[1, 2, 3]]))


@given(data=st.data(), bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, 128]), sym=st.booleans())
def test_ragged_last_group_error_bound(data, bits, group, sym):
    """K not a multiple of the group: G = ceil(K / group) groups, the last one shorter, and still every weight
    within scale/2 of its own group's scale (the ragged group's scale comes from its own columns only)."""
    n = data.draw(st.integers(1, 6), label="n")
    full = data.draw(st.integers(0, 4), label="full groups")
    tail = data.draw(st.integers(1, group - 1).map(lambda t: t + t % 2 if bits == 4 else t), label="tail")
    k = full * group + tail
    rng = np.random.default_rng(data.draw(SEEDS))
    w = (rng.standard_normal((n, k)) * data.draw(st.sampled_from([1e-3, 1.0, 50.0]))).astype(np.float32)
    # a loud column in the full groups must not leak into the ragged group's scale
    if full:
        w[:, 0] *= 100
    q, scale, zero = quantize_rtn(w, bits, group, sym)
    g = full + 1
    assert q.shape == w.shape and scale.shape == zero.shape == (n, g)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert q.min() >= lo and q.max() <= hi
    last = w[:, full * group:]
    want = np.abs(last).max(axis=1) / hi if sym else (np.maximum(last.max(1), 0) - np.minimum(last.min(1), 0)) / (hi - lo)
    np.testing.assert_allclose(scale[:, -1], np.where(want > 0, want, 1.0), rtol=1e-6)
    s = scale[:, np.arange(k) // group]
    err = np.abs(dequantize(q, scale, zero, bits, group) - w)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(w)), (err - s / 2).max()
    if bits == 4:  # packs (K is even) and round-trips through the stored form
        codes, z = storage(q, zero, bits, sym)
        np.testing.assert_array_equal(dequantize(unpack_int4(codes), scale, z, bits, group),
                                      dequantize(q, scale, zero, bits, group))


def test_scale_columns_must_be_ceil_k_over_group():
    q = np.zeros((2, 576), np.int8)
    with pytest.raises(ValueError, match=r"per-group parameters of shape \[2, 4\] do not fit K=576 with group=128: "
                                         r"expected G = ceil\(K / group\) = 5 columns"):
        dequantize(q, np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32), 4, 128)


@pytest.fixture(scope="module")
def correlated_calibration():
    """w [16, 576] and 2048 calibration rows with correlated channels of log-normal size (an LLM's
    activations have both: outlier channels and a far-from-diagonal x^T x)."""
    rng = np.random.default_rng(0)
    n, k, r = 16, 576, 2048
    w = rng.standard_normal((n, k)).astype(np.float32)
    mix = np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((r, k)) @ mix) * np.exp(rng.standard_normal(k))
    return w, x, x.T @ x / r


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_and_awq_beat_rtn_at_k576_group128(correlated_calibration, sym):
    """K=576 at group 128 (a ragged last group of 64): both calibrated methods lower the calibration-weighted
    error tr((W - Wq) H (W - Wq)^T) below round-to-nearest's. Measured: GPTQ ~0.6x, AWQ ~0.7x of RTN."""
    from llmasos.compress import awq, gptq
    w, x, h = correlated_calibration

    def err(wq):
        d = (w - wq).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", d, h, d))

    e_rtn = err(gptq.dequantize(*gptq.rtn_quantize(w, 4, 128, sym), group=128))
    q, s, z = gptq.gptq_quantize(w, h, 4, 128, sym)
    assert s.shape == z.shape == (16, 5)
    e_gptq = err(gptq.dequantize(q, s, z, group=128))
    a = awq.awq_scales(w, np.abs(x).mean(axis=0), None, 4, 128, sym)
    e_awq = err(gptq.dequantize(*gptq.rtn_quantize(w * a, 4, 128, sym), group=128) / a)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    assert e_awq < 0.9 * e_rtn, (e_awq, e_rtn)
    # the quantize pass's own RTN (llmasos.compress.quant) is the same baseline
    qq, qs, qz = quantize_rtn(w, 4, 128, sym)
    assert err(dequantize(qq, qs, qz, 4, 128)) == pytest.approx(e_rtn, rel=0.02 if sym else 0.1)


def test_gptq_dequantize_needs_the_group_of_a_ragged_layout():
    from llmasos.compress import gptq
    q, s, z = gptq.rtn_quantize(np.ones((2, 576), np.float32), 4, 128, True)
    with pytest.raises(ValueError, match="dequantize: 5 groups do not divide K=576; pass the group size of a "
                                         "ragged layout"):
        gptq.dequantize(q, s, z)
    with pytest.raises(ValueError, match="dequantize: scale has 5 groups, but K=576 in groups of 64 makes 9"):
        gptq.dequantize(q, s, z, group=64)
    np.testing.assert_allclose(gptq.dequantize(q, s, z, group=128), 1.0, rtol=1e-6)


def test_quant_linear_type_rule_wants_ceil_k_over_group_scales():
    from llmasos.ir import DType, TensorType
    from llmasos.ir.ops import get_op
    op = get_op("quant.linear")
    x, q = TensorType((3, 576), DType.f32), TensorType((40, 288), DType.u8)  # int4: K = 2 * 288
    s5 = TensorType((40, 5), DType.f32)
    assert op.infer_types([x, q, s5, s5], {"bits": 4, "group": 128}) == (TensorType((3, 40), DType.f32),)
    s4 = TensorType((40, 4), DType.f32)
    with pytest.raises(ValueError, match=r"quant.linear: scale must be \[N, G\] = \[40, 5\] \(K=576, group=128, "
                                         r"G = ceil\(K / group\)\) or \[1, 1\], got"):
        op.infer_types([x, q, s4, s4], {"bits": 4, "group": 128})
