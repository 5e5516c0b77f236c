"""Issue 13, long-context models: memory for the compiled bounds. TVM's static memory plan sized every
intermediate at the bounds (attention scores batch x heads x max_seq^2) on every call, so long-context
models compiled and then failed with std::bad_alloc on the first call. Now the bounds are estimated at
compile time (refused, naming the bound to lower, when they cannot fit), large plans are allocated per call,
and the default max_seq is min(the model's positions, 4096)."""
import pytest
import torch

import llmasos
from llmasos import MemoryBudgetError
from tests import models


def test_bounds_that_cannot_fit_are_refused_naming_max_seq():
    """Before: compiled, then `tvm.error.InternalError: std::bad_alloc` on the first call, whatever its size
    (2 x 4 x 32768^2 f32 attention scores, twice: 64 GiB)."""
    g = models.llama(max_position_embeddings=32768)    # (GPT-2 would hold a positions^2 causal-mask buffer)
    with pytest.raises(MemoryBudgetError, match=r"the compiled bounds \(batch <= 2, seq <= 32768\) need an estimated "
                                                r"\d+.\d\d GiB .*the largest tensor is %\w+: float32\[batch, 4, seq, "
                                                r"seq\], 32.00 GiB\), but the cpu device has .* GiB: lower max_seq"):
        llmasos.compile(g, "cpu", example_inputs=(models.token_ids(2, 8),), max_batch=2, max_seq=32768)


def test_the_device_budget_can_be_set(monkeypatch):
    monkeypatch.setenv("LLMASOS_MEMORY_LIMIT", str(1 << 20))
    with pytest.raises(MemoryBudgetError, match=r"but the cpu device has 0.00 GiB: lower"):
        llmasos.compile_lm("llama-tiny", "cpu", max_seq=64, max_batch=8)
    monkeypatch.setenv("LLMASOS_MEMORY_LIMIT", "lots")
    with pytest.raises(MemoryBudgetError, match=r"\$LLMASOS_MEMORY_LIMIT must be a number of bytes, got 'lots'"):
        llmasos.compile_lm("llama-tiny", "cpu", max_seq=16, max_batch=2)


def test_long_context_default_max_seq_and_per_call_allocation():
    """A 16k-position model compiles for 4096 positions by default; its attention at the bounds (2 x 4 x 4096^2
    f32, twice: 1 GiB) is over the static plan limit, so intermediates are allocated for each call's shapes."""
    g = models.llama(max_position_embeddings=16384)
    cm = llmasos.compile(g, "cpu", example_inputs=(models.token_ids(2, 8),), max_batch=2)
    assert cm.graph.symbols["seq"] == (2, 4096)
    est = cm.executable.memory
    assert est.dynamic == ("main",) and est.functions["main"].peak >= 1 << 30
    assert cm.timings["memory_estimate_bytes"] == est.total
    for b, s in [(1, 3), (2, 40)]:
        ids = models.token_ids(b, s, seed=s)
        torch.testing.assert_close(cm(ids).logits, g(ids).logits, atol=2e-5, rtol=1e-4)


def test_small_bounds_keep_the_static_plan():
    cm = llmasos.compile(models.mlp(), "cpu", example_inputs=(torch.randn(2, 16),), max_batch=8)
    assert cm.executable.memory.dynamic == ()
    assert cm.executable.memory.functions["main"].bounds == {"batch": 8}
