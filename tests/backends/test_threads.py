"""TVM's CPU thread pool control (llmasos/backends/tvm/threads.py): the count takes effect, results do not
depend on it, bad counts are refused."""
from __future__ import annotations

import numpy as np
import pytest

from llmasos.backends.tvm import build
from llmasos.backends.tvm.threads import available_cores, cpu_threads, set_cpu_threads
from llmasos.ir import DType, Graph, TensorType


def test_thread_count_takes_effect_and_results_do_not_change():
    rng = np.random.default_rng(0)
    g = Graph("lin")
    x = g.add_input("x", TensorType((1, 64), DType.f32))
    w = rng.standard_normal((200, 64)).astype(np.float32)
    g.set_outputs([g.add_node("linear", [x, g.add_param("w", w)])])
    exe = build(g, "cpu")
    xv = rng.standard_normal((1, 64)).astype(np.float32)
    try:
        assert set_cpu_threads(1) == 1 == cpu_threads()
        one = exe(xv)[0]
        assert set_cpu_threads(None) == len(available_cores())
        np.testing.assert_array_equal(exe(xv)[0], one)
        np.testing.assert_allclose(one, xv @ w.T, rtol=1e-5, atol=1e-5)
    finally:
        set_cpu_threads(None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads must be None"):
        set_cpu_threads(bad)
