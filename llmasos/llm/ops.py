"""The KV-cache torch custom ops, re-exported from ``llmasos.frontends.kv_ops`` (their home since the frontend
and the torch executor, which sit below ``llmasos.llm``, need them too). Importing this module registers
``torch.ops.llmasos.kv_append`` / ``kv_attention``; new code imports ``llmasos.frontends.kv_ops``."""
from ..frontends.kv_ops import (causal_cache_mask, kv_append, kv_attention, kv_paged_append,  # noqa: F401
                                kv_paged_attention, kv_ragged_attention, paged_attention, paged_gather,
                                paged_write_, ragged_attention)  # (re-exported)

__all__ = ["causal_cache_mask", "kv_append", "kv_attention", "kv_paged_append", "kv_paged_attention",
           "kv_ragged_attention", "paged_attention", "paged_gather", "paged_write_", "ragged_attention"]
