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


@converter("llmasos.kv_paged_append.default")
def kv_paged_append(ctx, pool, new, pos, block_table):
    return ctx.emit("kv.paged_append", [pool, new, pos, block_table])


@converter("llmasos.kv_paged_attention.default")
def kv_paged_attention(ctx, q, k_pool, v_pool, pos, block_table, scale):
    return ctx.emit("kv.paged_attention", [q, k_pool, v_pool, pos, block_table], scale=float(scale))


@converter("llmasos.kv_ragged_attention.default")
def kv_ragged_attention(ctx, q, k_pool, v_pool, pos, block_table, scale):
    return ctx.emit("kv.ragged_attention", [q, k_pool, v_pool, pos, block_table], scale=float(scale))
