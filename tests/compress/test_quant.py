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
    ((8, 3, True), "group=3 does not divide the 8 input features"),
    ((8, -1, True), "group=-1 must be 0 (per channel) or a positive group size"),
])
def test_bad_options(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quant_params(np.ones((2, 8), np.float32), *args)


def test_per_tensor_with_groups_is_refused():
    with pytest.raises(ValueError, match="per_tensor quantization has one scale for the whole tensor; group=4"):
        quantize_rtn(np.ones((2, 8), np.float32), 8, 4, True, per_tensor=True)


def test_pack_refuses_signed_or_odd():
    with pytest.raises(ValueError, match=r"pack_int4 packs codes in \[0, 15\], got \[-1, 3\]"):
        pack_int4(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"pack_int4 needs codes \[N, K\] with an even K, got shape \[1, 3\]"):
        pack_int4(np.array([[1, 2, 3]]))
