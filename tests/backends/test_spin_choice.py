"""TVM's pool spin: unless TVM_THREAD_POOL_SPIN_COUNT is given, llmasos.backends.tvm spins a short while on an
idle machine and not at all on a busy one (docs/llm.md, "CPU decode"), and threads.spin_count reports it."""
import os

import llmasos.backends.tvm as bt
from llmasos.backends.tvm.threads import spin_count


def test_auto_spin_count_follows_the_load(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert bt._auto_spin_count() == bt.IDLE_SPIN_COUNT
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))      # half of 2 cores busy: shared
    assert bt._auto_spin_count() == 0

    def no_load():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", no_load)
    assert bt._auto_spin_count() == 0


def test_spin_count_reads_the_variable(monkeypatch):
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "123")
    assert spin_count() == 123
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT")
    assert spin_count() == 300000                                        # TVM's own default
