"""CUDA timing shared by the GPU check scripts in bench/ (small_m_gemm_check.py, small_m_quant_gemm_check.py,
prefill_gemm_check.py, prefill_attention_check.py).

``cuda_time(calls, repeat)``: microseconds per call from CUDA events around ``repeat`` calls, after one
warm-up call of each. ``calls`` is one callable or a list of them, called in turn: give one per copy of the
operands (``copies``) so that a decode-sized weight is read from HBM, as in a decode step where each layer's
weights are different, and not from the L2 cache left warm by the previous call (an H100 / H200 L2 holds
50-60 MiB, a whole 2048 x 2048 f16 projection several times over).
"""
from __future__ import annotations

L2_FLUSH_BYTES = 256 << 20   # operand copies cycled per timing: well over any current GPU's L2


def copies(nbytes: int, limit: int = 64) -> int:
    """How many copies of operands of ``nbytes`` make a cycle past the L2 cache (at least 1, at most ``limit``)."""
    return max(1, min(limit, -(-L2_FLUSH_BYTES // max(1, nbytes))))


def cuda_time(calls, repeat: int) -> float:
    """Microseconds per call of ``calls`` (a callable or a list of them, called round robin)."""
    import torch  # deferred: the GPU scripts import torch after parsing arguments

    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls]
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(repeat):
        calls[i % len(calls)]()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeat


def median_ms(call, repeat: int, samples: int = 3) -> float:
    """Milliseconds per call of ``call``: the median of ``samples`` CUDA-event timings of ``repeat``
    back-to-back calls, after one warm-up call."""
    import torch  # deferred: the GPU scripts import torch after parsing arguments

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(repeat):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return sorted(times)[len(times) // 2]
