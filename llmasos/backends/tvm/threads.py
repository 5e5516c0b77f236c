"""TVM's CPU thread pool: how many threads a parallel kernel uses, and how long idle workers spin.

    from llmasos.backends.tvm.threads import set_cpu_threads, cpu_threads
    set_cpu_threads(1)          # every later kernel call of this process runs on one thread
    set_cpu_threads(None)       # back to every core this process may run on

The pool is the process's (TVM has one per process), so this applies to every compiled model in it.
Threads are not pinned to cores (TVM's "share all cores" mode): on a machine shared with other work a
pinned worker that the OS cannot move waits for its one core, and every parallel kernel waits for it.

What decides the thread count on a small, busy machine (docs/llm.md, "CPU decode"): a decode step of a
135M model is ~500 kernels of 10-100 us, ~150 of them parallel (cpu_schedule.MIN_PARALLEL_WORK keeps
the small ones serial), each a fork/join of the pool. TVM's workers spin between kernels (300000 rounds
by default), so with 2 threads on 2 cores they hold both cores between kernels as well; when another
process wants a core, a spinning worker burns the slice the other thread of the same kernel needed,
and every join waits for the OS: 0.4 tokens/s at 2 threads, 5.0 at 1, on a busy VM. So
llmasos.backends.tvm sets ``TVM_THREAD_POOL_SPIN_COUNT=0`` unless it is already set (workers sleep at
once; 20.8 tokens/s at 2 threads in the next run). llama.cpp's pool also spins (its ``--poll`` level).
On an idle machine the other side wins: a short spin (30000 rounds) made SmolLM2 int4 decode at 2 threads
1.16-1.20x llama.cpp's in the same rounds, against 0.9-1.3x (noisy) without. So when the variable is unset,
llmasos.backends.tvm spins 30000 rounds if the 1-minute load average at import is under half the cores,
else 0; ``spin_count()`` says what this process uses. Set TVM_THREAD_POOL_SPIN_COUNT to decide it yourself.
"""
from __future__ import annotations

import os
from typing import Optional

import tvm

_SHARE_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore


def available_cores() -> list:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return list(range(os.cpu_count() or 1))


def set_cpu_threads(n: Optional[int]) -> int:
    """Use ``n`` threads (None: one per available core) for every later TVM CPU kernel of this process;
    returns the count now in effect. ValueError unless n is None or an int >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be None (every core) or an int >= 1, got {n!r}")
    cores = available_cores()
    n = len(cores) if n is None else n
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, n, [str(c) for c in cores])
    return cpu_threads()


def cpu_threads() -> int:
    """The number of threads TVM's CPU pool runs parallel kernels on."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def spin_count() -> int:
    """The rounds idle pool workers of this process spin before they sleep (TVM_THREAD_POOL_SPIN_COUNT, read
    when TVM starts the pool; set at import of llmasos.backends.tvm unless given)."""
    try:
        return int(os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "300000"))
    except ValueError:
        return 300000
