"""Communication ops of partitioned graphs (llmasos/ir/sharding.py): collectives over a mesh axis and the
point-to-point send/recv of pipeline stages.

Every op names the mesh axis it communicates over (``axis``, a name in ``graph.mesh``); collectives also
carry the group size (``parts``: the type rules need it, the verifier checks it against the mesh).

    dist.all_reduce(x){axis, parts, op}          partial -> replicated: the elementwise sum (max, min) over the group
    dist.all_gather(x){axis, parts, dim}         split(dim) -> replicated: the chunks concatenated along dim
    dist.reduce_scatter(x){axis, parts, dim, op} partial -> split(dim): the sum, each rank keeping its chunk
    dist.shard(x){axis, parts, dim}              replicated -> split(dim): each rank keeps its chunk (no traffic)
    dist.send(x){axis, peer, tag}                hands x to the rank at index ``peer`` along axis; returns x
    dist.recv(){axis, peer, tag, shape, dtype}   the tensor the rank at ``peer`` sent with the same tag

``ref`` (the one-rank numpy semantics) is the identity for a group of one; anything larger needs every
rank, which ``llmasos.ir.interpreter.run_ranks`` simulates in one process with ``GROUP_SEMANTICS`` (a list
of the group's arrays in axis order -> a list of results) and a mailbox for send/recv.
"""
from __future__ import annotations

import numpy as np

from ..ops import Attr, defop
from ..sharding import contiguous
from ..types import DType, TensorType, dims_equal, normalize_axis

REDUCTIONS = ("sum", "max", "min")
COLLECTIVES = ("dist.all_reduce", "dist.all_gather", "dist.reduce_scatter", "dist.shard")
POINT_TO_POINT = ("dist.send", "dist.recv")
COMM_OPS = COLLECTIVES + POINT_TO_POINT


class NeedsAllRanks(ValueError):
    """A communication op evaluated on one rank where its group has several."""


def _one_rank(op: str, parts: int, axis: str):
    if parts != 1:
        raise NeedsAllRanks(f"{op} over mesh axis {axis!r} ({parts} ranks) needs every rank of the group: run the "
                            f"partitioned graph with llmasos.ir.interpreter.run_ranks")


def _check_parts(parts: int):
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")


def _all_reduce_infer(x: TensorType, axis, parts, op):
    _check_parts(parts)
    if x.dtype is DType.bool:
        raise ValueError("dist.all_reduce does not take bool tensors")
    return x


def _all_reduce_ref(x, axis, parts, op):
    _one_rank("dist.all_reduce", parts, axis)
    return x


def _all_gather_infer(x: TensorType, axis, parts, dim):
    _check_parts(parts)
    d = normalize_axis(dim, x.rank, "dim")
    shape = list(x.shape)
    shape[d] = shape[d] * parts
    return TensorType(tuple(shape), x.dtype)


def _all_gather_ref(x, axis, parts, dim):
    _one_rank("dist.all_gather", parts, axis)
    return x


def _reduce_scatter_infer(x: TensorType, axis, parts, dim, op):
    return _scatter_type(x, parts, dim)


def _scatter_type(x: TensorType, parts: int, dim: int) -> TensorType:
    _check_parts(parts)
    d = normalize_axis(dim, x.rank, "dim")
    shape = list(x.shape)
    n = shape[d]
    if isinstance(n, int) and n % parts:
        raise ValueError(f"dim {d} of size {n} does not split into {parts} parts")
    shape[d] = n // parts
    return TensorType(tuple(shape), x.dtype)


def _reduce_scatter_ref(x, axis, parts, dim, op):
    _one_rank("dist.reduce_scatter", parts, axis)
    return x


def _shard_ref(x, axis, parts, dim):
    _one_rank("dist.shard", parts, axis)
    return x


def _send_infer(x: TensorType, axis, peer, tag):
    if peer < 0:
        raise ValueError(f"peer must be >= 0, got {peer}")
    return x


def _send_ref(x, axis, peer, tag):
    raise NeedsAllRanks(f"dist.send to rank {peer} along {axis!r} needs the receiving rank: run the stages with "
                        f"llmasos.ir.interpreter.run_ranks")


def _recv_infer(axis, peer, tag, shape, dtype):
    if peer < 0:
        raise ValueError(f"peer must be >= 0, got {peer}")
    return TensorType(tuple(shape), dtype)


def _recv_ref(axis, peer, tag, shape, dtype):
    raise NeedsAllRanks(f"dist.recv from rank {peer} along {axis!r} needs the sending rank: run the stages with "
                        f"llmasos.ir.interpreter.run_ranks")


_REDUCE = {"sum": lambda xs: _acc_sum(xs), "max": lambda xs: np.maximum.reduce(xs),
           "min": lambda xs: np.minimum.reduce(xs)}


def _acc_sum(xs):
    out = np.zeros_like(xs[0])
    for x in xs:  # in rank order: the sum NCCL/gloo's ring would form differs only by rounding
        out = out + x
    return out


def _reduce(arrays, op):
    return _REDUCE[op]([np.asarray(a) for a in arrays]).astype(np.asarray(arrays[0]).dtype)


def _group_all_reduce(arrays, axis, parts, op):
    r = _reduce(arrays, op)
    return [r.copy() for _ in arrays]


def _group_all_gather(arrays, axis, parts, dim):
    r = np.concatenate([np.asarray(a) for a in arrays], axis=dim)
    return [r.copy() for _ in arrays]


def _group_reduce_scatter(arrays, axis, parts, dim, op):
    r = _reduce(arrays, op)
    return [contiguous(c) for c in np.split(r, parts, axis=dim)]


def _group_shard(arrays, axis, parts, dim):
    return [contiguous(np.split(np.asarray(a), parts, axis=dim)[i]) for i, a in enumerate(arrays)]


# op name -> fn(list of the group's operand arrays in axis order, **attrs) -> list of results in that order
GROUP_SEMANTICS = {"dist.all_reduce": _group_all_reduce, "dist.all_gather": _group_all_gather,
                   "dist.reduce_scatter": _group_reduce_scatter, "dist.shard": _group_shard}

_AXIS = {"axis": Attr("str"), "parts": Attr("int")}
defop("dist.all_reduce", ("x",), _all_reduce_infer, _all_reduce_ref,
      {**_AXIS, "op": Attr("str", "sum", choices=REDUCTIONS)},
      doc="partial -> replicated: reduce x over the ranks of mesh axis `axis` (`parts` of them)")
defop("dist.all_gather", ("x",), _all_gather_infer, _all_gather_ref, {**_AXIS, "dim": Attr("int")},
      doc="split(dim) -> replicated: concatenate the group's chunks along dim")
defop("dist.reduce_scatter", ("x",), _reduce_scatter_infer, _reduce_scatter_ref,
      {**_AXIS, "dim": Attr("int"), "op": Attr("str", "sum", choices=REDUCTIONS)},
      doc="partial -> split(dim): reduce over the group, each rank keeping its chunk of dim")
defop("dist.shard", ("x",), lambda x, axis, parts, dim: _scatter_type(x, parts, dim),
      _shard_ref, {**_AXIS, "dim": Attr("int")},
      doc="replicated -> split(dim): each rank keeps its own chunk of dim (no communication)")
defop("dist.send", ("x",), _send_infer, _send_ref,
      {"axis": Attr("str"), "peer": Attr("int"), "tag": Attr("int", 0)},
      doc="hand x to the rank at index `peer` along mesh axis `axis`; returns x (keep it live: a stage output)")
defop("dist.recv", (), _recv_infer, _recv_ref,
      {"axis": Attr("str"), "peer": Attr("int"), "tag": Attr("int", 0), "shape": Attr("dims"),
       "dtype": Attr("dtype")},
      doc="the tensor the rank at index `peer` along `axis` sent with the same tag")


def runtime_symbol(op: str, axis: str, reduce=None) -> str:
    """The global function a backend calls for a communication op in a distributed run:
    ``llmasos.dist.all_reduce.sum.tp`` (llmasos/backends/dist.py registers them)."""
    return ".".join(["llmasos", op, *([reduce] if reduce else []), axis])


packed_name = runtime_symbol


def same_type(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and a.rank == b.rank and all(dims_equal(x, y) for x, y in zip(a.shape, b.shape))
