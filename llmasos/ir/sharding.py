"""Sharding annotations: how a value of a partitioned (SPMD) graph relates to the logical, unpartitioned value.

A partitioned graph declares its device mesh (``graph.mesh``: axis name -> size, e.g. ``{"tp": 2}``;
ranks are numbered row-major over the axes in declaration order). Every value then carries one of:

* replicated (``value.sharding is None``, printed as nothing): every rank of the mesh holds the whole value;
* ``split(dim, axis)``: the ranks along ``axis`` each hold one contiguous chunk of ``dim``; the value's type
  is the LOCAL (per-rank) type, so the logical dim is ``parts`` times the local one;
* ``partial(axis)``: every rank holds a summand; the logical value is the sum over ``axis`` (what a
  row-parallel matmul leaves before its all-reduce).

The text form writes the annotation after the type: ``%x: f32[1, 32] #split(1, tp)``, ``#partial(tp)``.
Parameters of a partitioned graph keep their LOGICAL data in ``graph.param_data`` (reordered by the pass
that partitioned them so that each rank's shard is one contiguous chunk); ``local_param(graph, name,
coords)`` cuts a rank's shard. The verifier's ``sharding`` rule: a split or partial value reaches a
replicated result only through a collective (``llmasos/ir/opset/collective.py``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

KINDS = ("split", "partial")


@dataclass(frozen=True)
class Sharding:
    kind: str
    axis: str
    dim: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sharding kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.axis, str) or not self.axis:
            raise ValueError(f"a sharding names a mesh axis, got {self.axis!r}")
        if self.kind == "split" and (not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 0):
            raise ValueError(f"split sharding needs a non-negative int dim, got {self.dim!r}")
        if self.kind == "partial" and self.dim is not None:
            raise ValueError("partial sharding takes no dim")

    @staticmethod
    def split(dim: int, axis: str) -> "Sharding":
        return Sharding("split", axis, dim)

    @staticmethod
    def partial(axis: str) -> "Sharding":
        return Sharding("partial", axis)

    @property
    def is_split(self) -> bool:
        return self.kind == "split"

    @property
    def is_partial(self) -> bool:
        return self.kind == "partial"

    def __str__(self) -> str:
        return f"#split({self.dim}, {self.axis})" if self.is_split else f"#partial({self.axis})"


def describe(s: Optional[Sharding]) -> str:
    return "replicated" if s is None else str(s)[1:]


# -- the mesh ---------------------------------------------------------------------------------------------

def mesh_size(mesh: dict) -> int:
    n = 1
    for v in mesh.values():
        n *= v
    return n


def rank_coords(mesh: dict, rank: int) -> dict:
    """{axis: index} of ``rank`` (row-major over the axes in declaration order)."""
    n = mesh_size(mesh)
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is outside the mesh {mesh} of {n} ranks")
    out = {}
    for axis, size in reversed(list(mesh.items())):
        out[axis] = rank % size
        rank //= size
    return dict(reversed(list(out.items())))


def coords_rank(mesh: dict, coords: dict) -> int:
    r = 0
    for axis, size in mesh.items():
        r = r * size + coords.get(axis, 0)
    return r


def group(mesh: dict, rank: int, axis: str) -> list[int]:
    """The ranks that share every coordinate of ``rank`` but ``axis``, in axis order."""
    if axis not in mesh:
        raise ValueError(f"mesh axis {axis!r} is not in the mesh {mesh}")
    c = rank_coords(mesh, rank)
    return [coords_rank(mesh, {**c, axis: i}) for i in range(mesh[axis])]


def all_groups(mesh: dict, axis: str) -> list[list[int]]:
    """Every group along ``axis`` (each rank in exactly one)."""
    seen, out = set(), []
    for r in range(mesh_size(mesh)):
        if r not in seen:
            g = group(mesh, r, axis)
            seen.update(g)
            out.append(g)
    return out


def all_coords(mesh: dict):
    axes = list(mesh)
    for vals in itertools.product(*(range(mesh[a]) for a in axes)):
        yield dict(zip(axes, vals))


# -- shards of logical data -------------------------------------------------------------------------------

def contiguous(a):
    """``a`` as a C-contiguous numpy array, keeping a 0-d array 0-d (np.ascontiguousarray makes it 1-d)."""
    return np.require(np.asarray(a), requirements="C")


def shard_of(data, sharding: Optional[Sharding], mesh: dict, coords: dict):
    """The chunk of logical ``data`` that the rank at ``coords`` holds under ``sharding`` (partial: rank 0 of
    the axis holds the data, the others zeros, so that the sum is the data)."""
    if sharding is None:
        return data
    parts, i = mesh[sharding.axis], coords[sharding.axis]
    arr = data
    if sharding.is_partial:
        return arr if i == 0 else np.zeros_like(np.asarray(arr))
    d = sharding.dim
    n = arr.shape[d]
    if n % parts:
        raise ValueError(f"dim {d} of size {n} does not split into {parts} parts over mesh axis {sharding.axis!r}")
    k = n // parts
    index = [slice(None)] * arr.ndim
    index[d] = slice(i * k, (i + 1) * k)
    return arr[tuple(index)]


def local_param(graph, name: str, coords: dict):
    """Parameter ``name``'s data as the rank at ``coords`` holds it."""
    v = graph.params[name]
    return shard_of(graph.param_data[name], v.sharding, graph.mesh, coords)


def logical_type(t, sharding: Optional[Sharding], mesh: dict):
    """The logical (unpartitioned) type of a value whose local type is ``t``: a split dim times its parts."""
    if sharding is None or not sharding.is_split or sharding.axis not in mesh or sharding.dim >= t.rank:
        return t
    shape = list(t.shape)
    shape[sharding.dim] = shape[sharding.dim] * mesh[sharding.axis]
    return type(t)(tuple(shape), t.dtype)


def global_dim(local: int, sharding: Optional[Sharding], dim: int, mesh: dict):
    """The logical size of ``dim`` of a value whose local size is ``local``."""
    if sharding is not None and sharding.is_split and sharding.dim == dim:
        return local * mesh[sharding.axis]
    return local
