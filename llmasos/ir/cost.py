"""The op cost table: FLOPs and bytes moved per node, keyed by op name (what pipeline-parallel balances its
stages by and the parallel planner's roofline reads).

``node_cost(node, sizes)`` -> (flops, bytes); ``sizes`` gives symbolic dims a value (default: the symbol's
upper bound, else 128). An op without an entry costs one flop per result element and its operands' and
results' bytes. Plugins add entries with ``register_cost``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .types import TensorType, eval_dim

COSTS: dict[str, Callable] = {}
DEFAULT_SYMBOL = 128


def register_cost(op: str, fn: Callable) -> None:
    """``fn(node, numel) -> flops`` where ``numel(value)`` gives a value's element count."""
    COSTS[op] = fn


def _numel_fn(sizes: dict):
    def dims(t: TensorType) -> list:
        out = []
        for d in t.shape:
            try:
                out.append(int(eval_dim(d, sizes)))
            except Exception:
                out.append(DEFAULT_SYMBOL)
        return out

    def numel(v) -> int:
        return int(np.prod(dims(v.type), dtype=np.int64)) if v.type.rank else 1
    return numel, dims


def node_cost(node, sizes: Optional[dict] = None) -> tuple[float, float]:
    numel, dims = _numel_fn(sizes or {})
    nbytes = sum(numel(v) * v.type.dtype.numpy.itemsize for v in (*node.inputs, *node.outputs))
    fn = COSTS.get(node.op)
    flops = fn(node, numel, dims) if fn is not None else sum(numel(o) for o in node.outputs)
    return float(flops), float(nbytes)


def _gemm(node, numel, dims):        # out elements x K x 2
    k = dims(node.inputs[0].type)[-1] if node.inputs[0].type.rank else 1
    return 2.0 * numel(node.outputs[0]) * k * (2 if node.op == "fused.linear_glu" else 1)


def _attention(node, numel, dims):   # q.k and p.v over every cache position
    b, h, t, d = dims(node.inputs[0].type)
    m = dims(node.inputs[1].type)[2]
    return 4.0 * b * h * t * m * d


def _sdpa(node, numel, dims):
    q, k = dims(node.inputs[0].type), dims(node.inputs[1].type)
    return 4.0 * numel(node.inputs[0]) * k[-2]


for _op in ("linear", "fused.linear_act", "fused.linear_glu", "quant.linear", "quant.linear_a8", "matmul",
            "fused.matmul_act"):
    register_cost(_op, _gemm)
register_cost("kv.attention", _attention)


def _fused_attention(node, numel, dims):   # (fused.rope_(paged_)append_attention) q.k and p.v over the cache
    b, h, t, d = dims(node.inputs[0].type)
    if node.op == "fused.rope_paged_append_attention":
        m = dims(node.inputs[3].type)[2] * dims(node.inputs[6].type)[1]   # BS x MB positions a row
    else:
        m = dims(node.inputs[3].type)[2]
    return 4.0 * b * h * t * m * d


register_cost("fused.rope_append_attention", _fused_attention)
register_cost("fused.rope_paged_append_attention", _fused_attention)
register_cost("sdpa", _sdpa)
