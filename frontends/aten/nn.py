"""Matrix products and the high-level NN ops kept whole through decomposition (linear, norms, softmax,
attention), so backends can pick fused kernels for them."""
from __future__ import annotations

import torch

from llmasos.ir import DType
from llmasos.ir.torch_dtypes import dtype_to_torch

from .registry import converter


@converter("aten.linear.default")
def linear(ctx, x, weight, bias=None):
    return ctx.emit("linear", [x, weight] + ([bias] if bias is not None else []))


@converter("aten.mm.default", "aten.bmm.default")
def mm(ctx, a, b):
    return ctx.emit("matmul", [a, b])


@converter("aten.matmul.default")
def matmul(ctx, a, b):
    # torch.matmul promotes 1-d operands to matrices and drops the added dim afterwards
    squeeze = []
    if a.type.rank == 1:
        a = ctx.emit("expand_dims", [a], axis=0)
        squeeze.append(-2)
    if b.type.rank == 1:
        b = ctx.emit("expand_dims", [b], axis=1)
        squeeze.append(-1)
    y = ctx.emit("matmul", [a, b])
    if squeeze:
        y = ctx.emit("squeeze", [y], axes=[y.type.rank + s for s in squeeze])
    return y


@converter("aten.addmm.default", "aten.baddbmm.default")
def addmm(ctx, bias, a, b, beta=1, alpha=1):
    """beta * bias + alpha * (a @ b): GPT-2's Conv1D, whose weight is [in, out]."""
    dt = ctx.out_dtype
    y = ctx.emit("matmul", [a, b])
    if alpha != 1:
        y = ctx.emit("mul", [y, ctx.const(alpha, dt)])
    if beta == 0:
        return y
    if beta != 1:
        bias = ctx.emit("mul", [bias, ctx.const(beta, dt)])
    return ctx.emit("add", [y, bias])


def _ones(ctx, shape, dtype):
    return ctx.emit("full", [], shape=list(shape), value=1.0, dtype=dtype)


@converter("aten.layer_norm.default")
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    ndim = len(normalized_shape)
    if weight is None and bias is not None:  # the IR's optional operands are trailing only
        weight = _ones(ctx, x.type.shape[x.type.rank - ndim:], x.type.dtype)
    ops = [x] + [p for p in (weight, bias) if p is not None]
    return ctx.emit("layer_norm", ops, eps=float(eps), ndim=ndim)


@converter("aten.rms_norm.default")
def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    if eps is None:  # torch's default: machine epsilon of the input dtype
        eps = torch.finfo(dtype_to_torch(x.type.dtype)).eps
    ops = [x] + ([weight] if weight is not None else [])
    return ctx.emit("rms_norm", ops, eps=float(eps), ndim=len(normalized_shape))


def _softmax(op):
    def convert(ctx, x, dim, dtype_or_half_to_float=None):
        x = ctx.cast(x, ctx.out_dtype)  # softmax(x, dtype=...) computes in the requested dtype
        return ctx.emit(op, [x], axis=dim % x.type.rank if x.type.rank else 0)
    return convert


converter("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")(_softmax("softmax"))
converter("aten.log_softmax.int", "aten._log_softmax.default")(_softmax("log_softmax"))


@converter("aten.scaled_dot_product_attention.default")
def sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise ctx.error(f"attention dropout_p={dropout_p}: export the model in eval mode (model.eval())")
    ops = [q, k, v]
    if attn_mask is not None:
        if attn_mask.type.dtype is not DType.bool:
            attn_mask = ctx.cast(attn_mask, q.type.dtype)
        ops.append(attn_mask)
    return ctx.emit("sdpa", ops, is_causal=bool(is_causal), scale=None if scale is None else float(scale))


@converter("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default")
def dropout(ctx, x, p, train):
    if train and p:
        raise ctx.error(f"dropout in training mode (p={p}); export the model in eval mode (model.eval())")
    return x
