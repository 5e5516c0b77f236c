"""Converters of the KV-cache torch custom ops (``llmasos.frontends.kv_ops``) to the IR's ``kv.append`` /
``kv.attention``. Having converters also keeps the ops whole through torch's decompositions (the frontend
keeps every op with a converter), though custom ops have no decomposition to begin with."""
from __future__ import annotations

from .. import kv_ops  # noqa: F401  (registers torch.ops.llmasos before the converters name them)

from .registry import converter


@converter("llmasos.kv_append.default")
def kv_append(ctx, cache, new, pos):
    return ctx.emit("kv.append", [cache, new, pos])


@converter("llmasos.kv_attention.default")
def kv_attention(ctx, q, k_cache, v_cache, pos, scale):
    return ctx.emit("kv.attention", [q, k_cache, v_cache, pos], scale=float(scale))
