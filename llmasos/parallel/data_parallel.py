"""Data parallelism: replicas of a compiled LM as Ray actors behind one entry point.

    dp = DataParallelLM("model.llmasos", replicas=2)            # a saved LM artifact (llmasos.compile_lm(...).save)
    outs = dp.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)  # requests spread over the replicas
    dp.shutdown()

Each replica is a Ray actor that loads the artifact (TVM's runtime only) and serves one request at a time;
a request goes to the live replica with the fewest outstanding requests. A replica that dies (its process
killed, its node lost) has its in-flight requests retried on the others -- no request is lost while one
replica lives; when none does, ``ReplicaError`` says so. Ray runs locally unless ``address`` is given (or
``ray.init`` was called already).
"""
from __future__ import annotations

import os
from collections import deque
from typing import Optional, Sequence

from ..llm import load_lm


class ReplicaError(RuntimeError):
    """No live replica can serve the remaining requests."""


def _replica_class():
    import ray  # deferred: Ray (the distributed extra)

    @ray.remote(num_cpus=1, max_restarts=0)
    class Replica:
        def __init__(self, path: str, target=None):
            os.environ.setdefault("TVM_NUM_THREADS", "1")
            self.lm = load_lm(path, target)

        def generate(self, prompt, max_new_tokens, kwargs):
            return self.lm.generate(prompt, max_new_tokens, **kwargs)

        def pid(self) -> int:
            return os.getpid()
    return Replica


class DataParallelLM:
    def __init__(self, path, replicas: int = 2, *, target=None, address: Optional[str] = None,
                 num_cpus: Optional[int] = None, request_timeout_s: float = 300.0):
        import ray  # deferred: Ray
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        Replica = _replica_class()
        self.actors = [Replica.remote(str(path), target) for _ in range(replicas)]
        self.alive = [True] * replicas
        self.outstanding = [0] * replicas
        self.served = [0] * replicas          # requests each replica completed
        self.retried = 0                      # requests moved off a dead replica
        self.timeout = request_timeout_s
        ray.get([a.pid.remote() for a in self.actors], timeout=request_timeout_s)   # every replica loaded

    def _pick(self) -> int:
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise ReplicaError("every replica has died; no replica left to serve the remaining requests")
        return min(live, key=lambda i: (self.outstanding[i], self.served[i]))

    def generate(self, prompts: Sequence, max_new_tokens: int = 32, max_in_flight: int = 1, on_done=None,
                 **kwargs) -> list:
        """Generate for each prompt (token-id lists, or strings with a tokenizer in the artifact); returns the
        outputs in order. ``max_in_flight`` requests per replica at a time; ``on_done(index, replica)`` is
        called as each request completes."""
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ValueError(f"DataParallelLM.generate: max_in_flight (requests per replica at a time) must be "
                             f"an int >= 1, got {max_in_flight!r}")
        import ray  # deferred: Ray (the distributed extra)
        from ray.exceptions import GetTimeoutError, RayActorError  # deferred: Ray (the distributed extra)
        pending = deque(enumerate(prompts))
        out: list = [None] * len(prompts)
        done = [False] * len(prompts)
        inflight: dict = {}
        while pending or inflight:
            while pending and any(ok and self.outstanding[i] < max_in_flight for i, ok in enumerate(self.alive)):
                idx, p = pending.popleft()
                r = self._pick()
                ref = self.actors[r].generate.remote(p, max_new_tokens, kwargs)
                inflight[ref] = (idx, r)
                self.outstanding[r] += 1
            if not inflight:
                self._pick()          # raises when none is alive
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.timeout)
            if not ready:
                raise ReplicaError(f"no replica answered within {self.timeout} s ({len(inflight)} request(s) in flight)")
            for ref in ready:
                idx, r = inflight.pop(ref)
                self.outstanding[r] -= 1
                try:
                    out[idx] = ray.get(ref)
                    done[idx] = True
                    self.served[r] += 1
                    if on_done is not None:
                        on_done(idx, r)
                except (RayActorError, GetTimeoutError):
                    self.alive[r] = False                 # retried on another replica
                    self.retried += 1
                    pending.appendleft((idx, prompts[idx]))
        assert all(done)
        return out

    def kill_replica(self, i: int) -> None:
        """Kill replica ``i``'s process (what a lost node does; tests use it)."""
        import ray  # deferred: Ray
        ray.kill(self.actors[i], no_restart=True)

    def shutdown(self) -> None:
        import ray  # deferred: Ray
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []


__all__ = ["DataParallelLM", "ReplicaError"]
