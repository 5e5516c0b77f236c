"""Runs a bench/ GPU check script on the CPU (test_small_m_bench_scripts.py): torch.cuda faked (tensors stay on
the CPU, events time nothing), and the TVM CUDA kernels the script builds run through llmasos.backends.tvm.simt.

    python tests/backends/_mock_cuda_bench.py bench/small_m_gemm_check.py [its arguments]
"""
import os
import runpy
import sys

import torch
import tvm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import _cuda_timing  # noqa: E402

from llmasos.backends.tvm import simt  # noqa: E402

FAKE_GPU = "fake-cuda"


class _Event:
    def __init__(self, **kw):
        pass

    def record(self):
        pass

    def elapsed_time(self, other):
        return 1.0


def _cpu(fn):
    return lambda *a, device=None, **kw: fn(*a, **kw)


def _tensor(arr, dev=None, _orig=tvm.runtime.tensor):
    if dev == FAKE_GPU:
        return arr          # a numpy array stands for the device tensor
    return _orig(arr) if dev is None else _orig(arr, dev)


def _compile(mod, target=None, _orig=tvm.compile):
    if str(target) == "llvm":           # the scripts' load-time repacks: real CPU builds
        return _orig(mod, target=target)
    func = mod["main"]
    return {"main": lambda *args: simt.run(func, *[a.numpy() if isinstance(a, torch.Tensor) else a for a in args])}


_cuda_timing.L2_FLUSH_BYTES = 1     # one copy of each operand: every call is an interpreted kernel
torch.cuda.Event = _Event
torch.cuda.synchronize = lambda: None
torch.cuda.get_device_name = lambda i=0: "cpu (mock)"
torch.Tensor.cuda = lambda self: self
torch.full, torch.empty = _cpu(torch.full), _cpu(torch.empty)
tvm.runtime.from_dlpack = lambda t: t
tvm.runtime.tensor = _tensor
tvm.cuda = lambda i=0: FAKE_GPU
tvm.compile = _compile

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
