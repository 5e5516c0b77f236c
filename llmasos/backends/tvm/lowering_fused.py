"""Lowerings of the fused ops (llmasos/ir/opset/fused.py), each to one kernel.

* GEMM + bias + activation: on the CPU the activation joins the panel GEMM's TE epilogue (one PrimFunc the
  Matmul schedule writes back tile by tile); elsewhere the GEMM and the activation are emitted back to
  back with nothing between them, which TVM's FuseOps turns into one kernel (matmul + injective epilogue).
* residual add + norm: one TE function with two outputs (the sum and the normed rows).
* fused.elementwise: its ops, emitted through their own lowerings as one chain of injective Relax ops with
  single uses, which FuseOps always fuses into one kernel.
"""
from __future__ import annotations

import math

from tvm import relax, te, topi
from tvm import tirx as tir

from ...ir.graph import Graph
from ...ir.opset.fused import ACTIVATIONS, parse_expr
from ...ir.types import TensorType
from .lowering import (LoweringError, acc_dtype, panel_matmul, weight_panels, pad_single_row,
                       register_lowering, tvm_dtype)


def _fast(ctx) -> bool:
    return ctx.spec is not None and ctx.spec.fast_math


def te_activation(ctx, act: str):
    """``act`` as a TE tensor -> tensor function (polynomial exp/tanh/erf on the CPU, as FastMath gives)."""
    if ACTIVATIONS[act] is None:
        return None
    fast = _fast(ctx)
    exp = topi.fast_exp if fast else topi.exp
    tanh = topi.fast_tanh if fast else topi.tanh
    erf = topi.fast_erf if fast else topi.erf

    def c(v, y):
        return tir.const(v, y.dtype)

    if act == "relu":
        return topi.nn.relu
    if act == "tanh":
        return tanh
    if act == "sigmoid":
        return lambda y: topi.divide(c(1.0, y), topi.add(c(1.0, y), exp(topi.negative(y))))
    if act == "silu":
        return lambda y: topi.divide(y, topi.add(c(1.0, y), exp(topi.negative(y))))
    if act == "gelu":
        return lambda y: topi.multiply(topi.multiply(c(0.5, y), y),
                                       topi.add(c(1.0, y), erf(topi.multiply(y, c(1 / math.sqrt(2.0), y)))))
    if act == "gelu_tanh":
        def gelu_tanh(y):
            y3 = topi.multiply(topi.multiply(y, y), y)
            inner = topi.multiply(c(math.sqrt(2.0 / math.pi), y), topi.add(y, topi.multiply(c(0.044715, y), y3)))
            return topi.multiply(topi.multiply(c(0.5, y), y), topi.add(c(1.0, y), tanh(inner)))
        return gelu_tanh
    raise LoweringError(f"activation {act!r} has no TE form")


def sub_node(op: str, inputs: list, attrs: dict):
    """A scratch node of ``op`` over values typed like ``inputs`` (to reuse an op's own lowering)."""
    g = Graph("sub")
    vals = [g.add_input(f"in{i}", v.type if hasattr(v, "type") else v) for i, v in enumerate(inputs)]
    out = g.add_node(op, vals, attrs)
    return (out[0] if isinstance(out, tuple) else out).producer


def emit_op(ctx, op: str, attrs: dict, in_types: list, args: list):
    """Lower one ``op`` node over ``args`` through its own lowering. ``in_types`` are TensorTypes or the
    original Values; a parameter among the latter stays one (so the op's lowering may repack it once)."""
    node = sub_node(op, in_types, attrs)
    ctx.params.update(s for s, v in zip(node.inputs, in_types) if hasattr(v, "type") and ctx.is_param(v))
    saved, ctx.node = ctx.node, node
    try:
        r = ctx.lowering(op)(ctx, node, args)  # a target's override of the op applies inside fused ops too
    finally:
        ctx.node = saved
    return (r if isinstance(r, relax.Var) else ctx.emit(r)), node.outputs[0].type


def _gemm(base: str):
    def lower(ctx, node, args):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        act = node.attrs["act"]
        if weight_panels(ctx, node, 1) and (bias is None or ctx.is_param(node.inputs[2])):
            return panel_matmul(ctx, node, x, w, bias, transposed=(base == "linear"), act=te_activation(ctx, act))
        ins = list(node.inputs)
        if base == "linear":
            y, t = emit_op(ctx, "linear", {}, ins, list(args))
        else:
            y, t = emit_op(ctx, "matmul", {}, ins[:2], [x, w])
            if bias is not None:
                y, t = emit_op(ctx, "add", {}, [t, ins[2].type], [y, bias])
        if ACTIVATIONS[act] is None:
            return y
        op, attrs = ACTIVATIONS[act]
        return emit_op(ctx, op, attrs, [t], [y])[0]
    return lower


register_lowering("fused.linear_act", _gemm("linear"))
register_lowering("fused.matmul_act", _gemm("matmul"))


def _add_norm(norm: str):
    def lower(ctx, node, args):
        x_t = node.inputs[0].type
        # two kernels through the ops' own lowerings: for ndim > 1 (rare), and on targets without
        # ``fused_add_norm`` (GPUs, where DLight has no rule for a two-output function with row reductions
        # and its fallback schedule is slow: see CUDATarget)
        two = ctx.spec is not None and not ctx.spec.fused_add_norm
        if node.attrs["ndim"] != 1 or two:
            s, st = emit_op(ctx, "add", {}, [x_t, node.inputs[1].type], args[:2])
            y, _ = emit_op(ctx, norm, dict(node.attrs), [st, *[v.type for v in node.inputs[2:]]], [s, *args[2:]])
            return s, y
        dt, acc = tvm_dtype(x_t.dtype), tvm_dtype(acc_dtype(x_t.dtype))
        eps = node.attrs["eps"]
        has_w, has_b = len(args) > 2, len(args) > 3

        def f(x, r, *wb):
            s = topi.add(x, r)
            n = s.shape[-1]
            rows = s.shape[:-1]

            def a(t, *i):
                return t(*i).astype(acc)

            def norm_rows(scale_src, centred):
                def out(*i):
                    v = centred(*i) * scale_src(*i[:-1])
                    if has_w:
                        v = v * a(wb[0], i[-1])
                    if has_b:
                        v = v + a(wb[1], i[-1])
                    return v.astype(dt)
                return te.compute(s.shape, out, name=norm)

            nf = tir.Cast(acc, n)
            if norm == "rms_norm":
                k = te.reduce_axis((0, n), "k")
                ss = te.compute(rows, lambda *i: te.sum(a(s, *i, k) * a(s, *i, k), axis=k), name="sum_sq")
                inv = te.compute(rows, lambda *i: tir.rsqrt(ss(*i) / nf + tir.const(eps, acc)), name="inv_rms")
                return [s, norm_rows(inv, lambda *i: a(s, *i))]
            k1, k2 = te.reduce_axis((0, n), "k1"), te.reduce_axis((0, n), "k2")
            total = te.compute(rows, lambda *i: te.sum(a(s, *i, k1), axis=k1), name="row_sum")
            mean = te.compute(rows, lambda *i: total(*i) / nf, name="mean")
            sq = te.compute(rows, lambda *i: te.sum((a(s, *i, k2) - mean(*i)) * (a(s, *i, k2) - mean(*i)), axis=k2),
                            name="sum_sq")
            inv = te.compute(rows, lambda *i: tir.rsqrt(sq(*i) / nf + tir.const(eps, acc)), name="inv_std")
            return [s, norm_rows(inv, lambda *i: a(s, *i) - mean(*i[:-1]))]

        out = ctx.emit_te(f, *args, name=f"add_{norm}")
        return [ctx.emit(relax.TupleGetItem(out, 0), "residual"), ctx.emit(relax.TupleGetItem(out, 1), norm)]
    return lower


register_lowering("fused.add_rms_norm", _add_norm("rms_norm"))
register_lowering("fused.add_layer_norm", _add_norm("layer_norm"))


@register_lowering("fused.elementwise")
def _elementwise(ctx, node, args):
    def build(e):
        if isinstance(e, int):
            return args[e], node.inputs[e].type
        op, attrs, sub = e
        built = [build(a) for a in sub]
        return emit_op(ctx, op, dict(attrs), [t for _, t in built], [v for v, _ in built])
    return build(parse_expr(node.attrs["expr"]))[0]


@register_lowering("fused.linear_glu")
def _linear_glu(ctx, node, args):
    """One GEMM over paired weight panels: panel p holds gate columns [p*NR, (p+1)*NR) and the same up
    columns side by side, so the epilogue finds a gate value and its up value in the same register tile
    and writes act(gate) * up straight away (half the GEMM's columns ever reach memory)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    act = te_activation(ctx, node.attrs["act"])
    nr = ctx.panel_width()
    n2, k = node.inputs[1].type.shape
    f = n2 // 2
    if (nr is None or not weight_panels(ctx, node, 1) or f % nr or act is None
            or (bias is not None and not ctx.is_param(node.inputs[2]))):
        # generic: the GEMM, then act(gate) * up through the ops' own lowerings (TVM fuses the tail)
        y, t = emit_op(ctx, "linear", {}, list(node.inputs), list(args))
        lead = t.shape[:-1]
        half = [*lead, f]
        gate, gt = emit_op(ctx, "slice", {"axis": -1, "start": 0, "end": f}, [t], [y])
        up, _ = emit_op(ctx, "slice", {"axis": -1, "start": f, "end": n2}, [t], [y])
        if ACTIVATIONS[node.attrs["act"]] is not None:
            op, attrs = ACTIVATIONS[node.attrs["act"]]
            gate, gt = emit_op(ctx, op, attrs, [gt], [gate])
        return emit_op(ctx, "mul", {}, [gt, TensorType(tuple(half), t.dtype)], [gate, up])[0]
    R = relax.op
    p = f // nr
    # [2F, K] -> [2, P, NR, K] -> [P, K, 2, NR]: gate then up columns of panel p. The GEMM's J axes are
    # (p, half, c); cpu_schedule.Matmul makes one register tile span a whole panel (both halves), so the
    # epilogue reads a gate value and its up value from the same tile
    panels = ctx.emit(R.permute_dims(R.reshape(w, [2, p, nr, k]), [1, 3, 0, 2]), "glu_panels")  # param-only
    if bias is not None:
        bias = ctx.emit(R.permute_dims(R.reshape(bias, [2, p, nr]), [1, 0, 2]), "glu_bias")

    def gemm(x, wp, *b):
        r = te.reduce_axis((0, k), name="k")
        y = te.compute([*x.shape[:-1], p, 2, nr],
                       lambda *i: te.sum(x(*i[:-3], r) * wp[i[-3], r, i[-2], i[-1]], axis=r), name="panel_matmul")
        if b:
            y = te.compute(y.shape, lambda *i: y(*i) + b[0][i[-3], i[-2], i[-1]], name="bias_add")
        g = act(y)
        return te.compute([*x.shape[:-1], p, nr], lambda *i: g(*i[:-1], 0, i[-1]) * y(*i[:-1], 1, i[-1]),
                          name="glu")
    x, one_row = pad_single_row(ctx, node, x)
    out = ctx.emit_te(gemm, x, panels, *([bias] if bias is not None else []), name="panel_glu")
    lead = ctx.shape(node.inputs[0])[:-1]
    if one_row:
        out = ctx.emit(R.strided_slice(out, [0], [0], [1], assume_inbound=True))
    return R.reshape(out, [*lead, f])
