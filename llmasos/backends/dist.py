"""Communication at run time: the process groups of a partitioned program's mesh axes and the collectives
the ``dist.*`` ops mean, on torch tensors over torch.distributed (gloo on CPU, NCCL on GPU).

The parallel runtime (llmasos/parallel/runtime.py) calls ``set_groups({axis: Group})`` once per process;
the torch executor (``TORCH_IMPLS``) and the TVM packed functions (``install_tvm_funcs``: what
``llmasos/backends/tvm/lowering_dist.py`` lowers each op to, ``llmasos.dist.<op>.<axis>``) both call the
functions here. A group of one rank is the identity, so a rank-local program with no groups set runs
single-process. Every blocking call runs under the process group's timeout: a dead peer is an error
naming the op and axis, never a hang.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..ir.opset.collective import packed_name
from ..ir.torch_dtypes import dtype_to_torch


class CommError(RuntimeError):
    """A collective that failed: a peer died or timed out, or no group is set for its axis."""


@dataclass
class Group:
    axis: str
    pg: Any                 # the torch.distributed ProcessGroup (None: a group of one)
    ranks: list             # global ranks of the group, in axis order
    index: int              # this process's index along the axis

    @property
    def size(self) -> int:
        return len(self.ranks)


GROUPS: dict[str, Group] = {}
_PENDING: list = []          # in-flight isends (their tensors are held until they complete)


def set_groups(groups: dict) -> None:
    GROUPS.clear()
    GROUPS.update(groups)


def group(axis: str, parts: int) -> Optional[Group]:
    """The group of ``axis``, None for a group of one; raises when ``parts`` disagrees with it."""
    g = GROUPS.get(axis)
    if g is None:
        if parts == 1:
            return None
        raise CommError(f"a collective over mesh axis {axis!r} with {parts} ranks, but this process has no group "
                        f"for {axis!r}: run it under llmasos.parallel (llmasos.launch), one process per rank")
    if g.size != parts:
        raise CommError(f"a collective over {axis!r} expects {parts} ranks, the group has {g.size}")
    return g


def call(what: str, axis: str, fn):
    import torch.distributed as dist  # deferred: torch.distributed (only a distributed run needs it)
    try:
        return fn(dist)
    except Exception as e:     # gloo/NCCL raise RuntimeError on a dead or timed-out peer
        raise CommError(f"{what} over mesh axis {axis!r} failed (a peer rank died or timed out?): "
                        f"{type(e).__name__}: {e}") from e


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(x: torch.Tensor, axis: str, parts: int, op: str = "sum") -> torch.Tensor:
    g = group(axis, parts)
    if g is None:
        return x
    out = x.clone()
    call("dist.all_reduce", axis, lambda d: d.all_reduce(out, getattr(d.ReduceOp, _OPS[op]), group=g.pg))
    return out


def all_gather(x: torch.Tensor, axis: str, parts: int, dim: int) -> torch.Tensor:
    g = group(axis, parts)
    if g is None:
        return x
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(g.size)]
    call("dist.all_gather", axis, lambda d: d.all_gather(chunks, x, group=g.pg))
    return torch.cat(chunks, dim=dim)


def reduce_scatter(x: torch.Tensor, axis: str, parts: int, dim: int, op: str = "sum") -> torch.Tensor:
    g = group(axis, parts)
    if g is None:
        return x
    full = all_reduce(x, axis, parts, op)         # gloo has no reduce_scatter: reduce, keep our chunk
    return full.chunk(g.size, dim=dim)[g.index].contiguous()


def shard(x: torch.Tensor, axis: str, parts: int, dim: int) -> torch.Tensor:
    g = group(axis, parts)
    return x if g is None else x.chunk(g.size, dim=dim)[g.index].contiguous()


def send(x: torch.Tensor, axis: str, peer: int, tag: int) -> torch.Tensor:
    g = GROUPS.get(axis)
    if g is None:
        raise CommError(f"dist.send over {axis!r}: this process has no group for it (run under llmasos.launch)")
    buf = x.detach().clone().contiguous()
    _PENDING[:] = [(w, t) for w, t in _PENDING if not w.is_completed()]
    w = call("dist.send", axis, lambda d: d.isend(buf, g.ranks[peer], tag=tag))
    _PENDING.append((w, buf))
    return x


def recv(shape, dtype: torch.dtype, axis: str, peer: int, tag: int, device=None) -> torch.Tensor:
    g = GROUPS.get(axis)
    if g is None:
        raise CommError(f"dist.recv over {axis!r}: this process has no group for it (run under llmasos.launch)")
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device)
    call("dist.recv", axis, lambda d: d.recv(out, g.ranks[peer], tag=tag))
    return out


def wait_sends() -> None:
    for w, _ in _PENDING:
        call("dist.send", "?", lambda d: w.wait())
    _PENDING.clear()


# -- the torch executor's entries (llmasos/backends/torch_graph.py registers them) ------------------------
def _recv_impl(axis, peer, tag, shape, dtype):
    return recv(shape, dtype_to_torch(dtype), axis, peer, tag)


TORCH_FUNCS = {
    "dist.all_reduce": lambda x, axis, parts, op: all_reduce(x, axis, parts, op),
    "dist.all_gather": lambda x, axis, parts, dim: all_gather(x, axis, parts, dim),
    "dist.reduce_scatter": lambda x, axis, parts, dim, op: reduce_scatter(x, axis, parts, dim, op),
    "dist.shard": lambda x, axis, parts, dim: shard(x, axis, parts, dim),
    "dist.send": lambda x, axis, peer, tag: send(x, axis, peer, tag),
    "dist.recv": _recv_impl,
}


# -- TVM packed functions ------------------------------------------------------------------------------
def install_tvm_funcs(axes) -> None:
    """Register the packed functions for ``axes`` in this process (DPS: the last argument is the output)."""
    import tvm_ffi  # deferred: TVM's FFI (only a process running a partitioned TVM module needs it)

    def T(a):
        return torch.from_dlpack(a)

    for axis in axes:
        for red in _OPS:
            tvm_ffi.register_global_func(packed_name("dist.all_reduce", axis, red), override=True)(
                lambda x, parts, out, axis=axis, red=red: T(out).copy_(all_reduce(T(x), axis, int(parts), red)))
            tvm_ffi.register_global_func(packed_name("dist.reduce_scatter", axis, red), override=True)(
                lambda x, parts, dim, out, axis=axis, red=red:
                T(out).copy_(reduce_scatter(T(x), axis, int(parts), int(dim), red)))
        tvm_ffi.register_global_func(packed_name("dist.all_gather", axis), override=True)(
            lambda x, parts, dim, out, axis=axis: T(out).copy_(all_gather(T(x), axis, int(parts), int(dim))))
        tvm_ffi.register_global_func(packed_name("dist.shard", axis), override=True)(
            lambda x, parts, dim, out, axis=axis: T(out).copy_(shard(T(x), axis, int(parts), int(dim))))
        tvm_ffi.register_global_func(packed_name("dist.send", axis), override=True)(
            lambda x, peer, tag, out, axis=axis: T(out).copy_(send(T(x), axis, int(peer), int(tag))))

        def _recv(peer, tag, out, axis=axis):
            o = T(out)
            o.copy_(recv(o.shape, o.dtype, axis, int(peer), int(tag), o.device))
        tvm_ffi.register_global_func(packed_name("dist.recv", axis), override=True)(_recv)
