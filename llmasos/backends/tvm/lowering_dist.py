"""Lowerings of the communication ops: each is a destination-passing call of the packed function
``llmasos.dist.<op>[.<reduce>].<axis>`` that llmasos/backends/dist.py registers in a process of a
distributed run (torch.distributed underneath), so the collective runs inside the compiled module's call."""
from __future__ import annotations

from tvm import relax

from ...ir.opset.collective import packed_name
from .lowering import register_lowering, tvm_dtype


def _out(ctx, v):
    return relax.TensorType(ctx.shape(v), tvm_dtype(v.type.dtype))


def _call(ctx, node, name, args, ints):
    if node.attrs.get("parts") == 1:
        return args[0]          # a group of one: the identity (no runtime function needed)
    call = relax.call_dps_packed(name, relax.Tuple([*args, *(relax.prim_value(int(i)) for i in ints)]),
                                 out_ty=_out(ctx, node.outputs[0]))
    return ctx.emit(call, node.op.replace(".", "_"))


@register_lowering("dist.all_reduce")
def _all_reduce(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"], a["op"]), args, [a["parts"]])


@register_lowering("dist.reduce_scatter")
def _reduce_scatter(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"], a["op"]), args, [a["parts"], a["dim"] % node.inputs[0].type.rank])


@register_lowering("dist.all_gather")
def _all_gather(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"]), args, [a["parts"], a["dim"] % node.inputs[0].type.rank])


@register_lowering("dist.shard")
def _shard(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"]), args, [a["parts"], a["dim"] % node.inputs[0].type.rank])


@register_lowering("dist.send")
def _send(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"]), args, [a["peer"], a["tag"]])


@register_lowering("dist.recv")
def _recv(ctx, node, args):
    a = node.attrs
    return _call(ctx, node, packed_name(node.op, a["axis"]), [], [a["peer"], a["tag"]])
