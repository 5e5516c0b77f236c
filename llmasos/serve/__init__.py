"""``llmasos serve``: an OpenAI-compatible server over a paged KV cache with continuous batching.

blocks.py (the block manager: free list, ref counts, prefix sharing, copy-on-write), scheduler.py
(iteration-level scheduling, chunked prefill, admission, preemption), request.py (sampling options, request
state, incremental text with stop strings), engine.py (the engine and its background thread), metrics.py
(Prometheus), server.py (FastAPI app and ``serve``), load.py (a model name or artifact to a runner).
docs/serving.md has the design.
"""
from .blocks import BlockManager, NoFreeBlocks
from .engine import Engine, EngineLoop
from .request import Request, RequestError, RequestOutput, SamplingParams
from .scheduler import Scheduler

__all__ = ["BlockManager", "NoFreeBlocks", "Engine", "EngineLoop", "Request", "RequestError", "RequestOutput",
           "SamplingParams", "Scheduler"]
