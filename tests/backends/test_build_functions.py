"""One library, several entry functions sharing one set of weights (an LLM's prefill and decode)."""
import numpy as np
import pytest

from llmasos.backends.tvm import build_functions, lower_functions
from llmasos.backends.tvm.lowering import LoweringError
from llmasos.ir.parser import parse

PREFILL = """
graph @prefill(%x: f32[n, 8]) {
  symbol n in [1, 64]
  param %w: f32[16, 8]
  param %b: f32[16]
  %y: f32[n, 16] = linear(%x, %w, %b)
  %z: f32[n, 16] = relu(%y)
  return %z
}
"""
DECODE = """
graph @decode(%x: f32[1, 8]) {
  param %w: f32[16, 8]
  param %b: f32[16]
  %y: f32[1, 16] = linear(%x, %w, %b)
  return %y
}
"""


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}


def test_two_entries_share_uploaded_weights(weights):
    g1, g2 = parse(PREFILL, params=weights), parse(DECODE, params=weights)
    exe = build_functions({"prefill": g1, "decode": g2}, "cpu")
    assert exe.functions == ["prefill", "decode"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    ref = x @ weights["w"].T + weights["b"]
    np.testing.assert_allclose(exe.call("prefill", x)[0], np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exe.call("decode", x[:1])[0], ref[:1], rtol=1e-5, atol=1e-5)
    assert exe(x)[0].shape == (5, 16)          # the first function is the default
    # one prepared weight list serves both entries: the raw fast path takes it as trailing arguments
    import tvm
    out = exe.raw("decode")(tvm.runtime.tensor(x[:1]), *exe.weights)
    np.testing.assert_allclose(out[0].numpy(), ref[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"function 'decode' takes 1 inputs"):
        exe.call("decode", x, x)
    with pytest.raises(ValueError, match=r"no function 'nope'; this library has prefill, decode"):
        exe.call("nope", x)
    with pytest.raises(ValueError, match=r"dim 0 must be 1"):
        exe.call("decode", x)


def test_signature_json_round_trips_every_function(weights):
    from llmasos.backends.tvm import Signature
    sig = Signature.of_functions({"prefill": parse(PREFILL, params=weights), "decode": parse(DECODE, params=weights)},
                                 lifted=True)
    back = Signature.from_json(sig.to_json())
    assert list(back.functions) == ["prefill", "decode"]
    assert back.functions["prefill"].symbols == {"n": (1, 64)}
    assert [i.name for i in back.functions["decode"].inputs] == ["x"]


def test_functions_must_share_parameters(weights):
    other = DECODE.replace("f32[16, 8]", "f32[16, 8]").replace("param %b: f32[16]\n", "")
    other = other.replace("linear(%x, %w, %b)", "linear(%x, %w)")
    with pytest.raises(LoweringError, match=r"functions 'prefill' and 'decode' must share their parameters"):
        lower_functions({"prefill": parse(PREFILL, params=weights),
                         "decode": parse(other, params={"w": weights["w"]})})
