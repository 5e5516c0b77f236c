"""The reference interpreter: runs any verified graph with each op's numpy semantics.

It is the oracle of every numeric test, so it checks what it can: input types, symbol bounds, and that
each op's result has exactly the shape and dtype the type rule promised.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import sympy

from .graph import Graph, Node, Value, param_array
from .ops import get_op
from .opset.collective import GROUP_SEMANTICS, POINT_TO_POINT
from .opset.rules import to_dtype
from .sharding import all_coords, all_groups, contiguous, coords_rank, mesh_size, shard_of
from .types import TensorType, dim_str, dim_symbols, eval_dim

Inputs = Union[Sequence[Any], Mapping[str, Any]]


class InterpreterError(RuntimeError):
    pass


def bind_symbols(graph: Graph, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Symbol values from the input shapes; raises on a shape or bound mismatch, naming the input."""
    env: dict[str, int] = {}
    seen: dict[str, str] = {}
    for v, a in zip(graph.inputs, arrays):
        t = v.type
        if a.ndim != t.rank:
            raise ValueError(f"input %{v.name}: expected rank {t.rank} ({t}), got shape {list(a.shape)}")
        for i, (d, n) in enumerate(zip(t.shape, a.shape)):
            if isinstance(d, int):
                if d != n:
                    raise ValueError(f"input %{v.name}: dim {i} must be {d} ({t}), got {n}")
            elif d.is_Symbol:
                prev = env.setdefault(d.name, int(n))
                if prev != n:
                    raise ValueError(f"input %{v.name}: dim {i} is '{d.name}' ({t}), which is {prev} in "
                                     f"{seen[d.name]}, got {n}")
                seen.setdefault(d.name, f"input %{v.name} dim {i}")
    for v, a in zip(graph.inputs, arrays):  # derived dims (seq+1 ...) once every plain symbol is known
        for i, (d, n) in enumerate(zip(v.type.shape, a.shape)):
            if isinstance(d, int) or d.is_Symbol:
                continue
            unbound = sorted(dim_symbols(d) - set(env))
            if unbound:
                raise ValueError(f"input %{v.name}: dim {i} is {dim_str(d)} but {unbound} is not the whole dim of "
                                 f"any input, so its value cannot be read from the input shapes")
            if eval_dim(d, env) != n:
                raise ValueError(f"input %{v.name}: dim {i} is {dim_str(d)} = {eval_dim(d, env)} ({_t_str(v, env)}), "
                                 f"got {n}")
    for name, (lo, hi) in graph.symbols.items():
        if name in env and ((lo is not None and env[name] < lo) or (hi is not None and env[name] > hi)):
            where = _first_use(graph, name)
            raise ValueError(f"{where}'{name}' = {env[name]} is outside its declared range "
                             f"[{'-' if lo is None else lo}, {'-' if hi is None else hi}]")
    return env


def _t_str(v: Value, env: dict) -> str:
    return f"{v.type} with {', '.join(f'{k}={env[k]}' for k in sorted(v.type.symbols()))}"


def _first_use(graph: Graph, name: str) -> str:
    for v in graph.inputs:
        for i, d in enumerate(v.type.shape):
            if not isinstance(d, int) and d.is_Symbol and d.name == name:
                return f"input %{v.name}: dim {i}: "
    return ""


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return param_array(x)
    return np.asarray(x)


def evaluate_attrs(attrs: dict, env: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, (list, tuple)) and v and not isinstance(v, np.ndarray):
            out[k] = [eval_dim(d, env) if _is_sym(d) else d for d in v]
        else:
            out[k] = eval_dim(v, env) if _is_sym(v) else v
    return out


def _is_sym(v) -> bool:
    return isinstance(v, sympy.Expr)


def run(graph: Graph, inputs: Inputs, *, trace: bool = False, observe=None):
    """Execute ``graph``. Returns the list of outputs, or (outputs, {value name: array}) with ``trace``.

    ``observe(node, args, results)``, when given, is called after each node with its operand and result
    arrays (calibration collects activation statistics this way without keeping every value alive).
    """
    if getattr(graph, "mesh", None):
        if observe is not None:
            raise ValueError("observe is not supported on a partitioned graph (one with a mesh)")
        outs = assemble(graph, run_ranks(graph, inputs))
        return (outs, {}) if trace else outs   # per-value traces are per rank: only the outputs compare
    if isinstance(inputs, Mapping):
        missing = [v.name for v in graph.inputs if v.name not in inputs]
        if missing:
            raise ValueError(f"missing inputs: {missing}")
        arrays = [_as_array(inputs[v.name]) for v in graph.inputs]
    else:
        if len(inputs) != len(graph.inputs):
            raise ValueError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
        arrays = [_as_array(x) for x in inputs]
    for v, a in zip(graph.inputs, arrays):
        if a.dtype != v.type.dtype.numpy:
            raise ValueError(f"input %{v.name}: expected dtype {v.type.dtype}, got {a.dtype}")
    env = bind_symbols(graph, arrays)
    vals: dict[Value, np.ndarray] = dict(zip(graph.inputs, arrays))
    for name, v in graph.params.items():
        if name not in graph.param_data:
            raise ValueError(f"parameter %{name} has no data")
        vals[v] = param_array(graph.param_data[name])
    # without trace, a value is dropped after its last use (a 30-layer model would otherwise hold every
    # activation of the forward pass at once)
    last_use: dict = {}
    if not trace:
        keep = set(graph.outputs) | set(graph.inputs) | set(graph.params.values())
        for i, node in enumerate(graph.nodes):
            for v in node.inputs:
                if v not in keep:
                    last_use[v] = i
    for i, node in enumerate(graph.nodes):
        opdef = get_op(node.op)
        args = [vals[v] for v in node.inputs]
        try:
            with np.errstate(all="ignore"):  # IEEE results (inf, nan) as torch gives them, without warnings
                res = opdef.ref(*args, **evaluate_attrs(node.attrs, env))
        except Exception as e:
            raise InterpreterError(f"{node.describe()}: reference semantics failed: {e}") from e
        res = res if isinstance(res, tuple) else (res,)
        for out, r in zip(node.outputs, res):
            vals[out] = _conform(node, out.type, np.asarray(r), env)
        if observe is not None:
            observe(node, args, [vals[o] for o in node.outputs])
        if last_use:
            for v in node.inputs:
                if last_use.get(v) == i:
                    vals.pop(v, None)
    outs = [vals[v] for v in graph.outputs]
    if trace:
        return outs, {v.name: a for v, a in vals.items()}
    return outs


def _conform(node, t: TensorType, r: np.ndarray, env: dict) -> np.ndarray:
    shape = t.concrete(env)
    if tuple(r.shape) != shape:
        raise InterpreterError(f"{node.describe()}: result shape {list(r.shape)} differs from its type {t} "
                               f"= {list(shape)}")
    return to_dtype(r, t.dtype)


# -- partitioned graphs: every rank of the mesh simulated in one process -----------------------------
# run_ranks(graph, inputs) -> per-rank outputs (inputs: the LOGICAL arrays); assemble(graph, per_rank) -> the
# logical outputs. Each rank gets its shard of every input and parameter (sharding.shard_of); nodes run in
# graph order on every rank that executes them. A collective (dist.all_reduce, all_gather, reduce_scatter,
# shard) runs once per group of its mesh axis with GROUP_SEMANTICS; dist.send puts its operand in a mailbox
# keyed by (tag, receiving rank), dist.recv takes it out. In a pipelined graph (one with send/recv) a rank
# executes only the nodes of its stage (node_stages), so a value used on the wrong stage fails here exactly
# as it would on real devices. ``run`` on a graph with a mesh is ``assemble(graph, run_ranks(graph, inputs))``.

class SimulationError(InterpreterError):
    pass


def pipeline_axis(graph: Graph) -> Optional[str]:
    """The mesh axis send/recv communicate over (the pipeline axis), or None."""
    axes = {n.attrs["axis"] for n in graph.nodes if n.op in POINT_TO_POINT}
    if len(axes) > 1:
        raise SimulationError(f"send/recv over several mesh axes {sorted(axes)}: one pipeline axis is supported")
    return next(iter(axes), None)


def node_stages(graph: Graph) -> dict:
    """node -> pipeline stage. A recv runs on the stage its matching send (same tag) names as peer; a node
    with an operand made by a staged node runs on the latest such stage; a node made from inputs, params and
    constants alone runs on the earliest stage of its users (pipeline-parallel copies such nodes into each
    stage that uses them, so they never cross a boundary), or, read by no node (a send, a returned value),
    on the stage of the last recv before it in graph order (pipeline-parallel writes the stages in order,
    each starting with its receives, and returns a free node's value from a copy made after the last) --
    or earlier, where its operands stand (tensor-parallel appends the gather of an output at the end)."""
    sends = {n.attrs["tag"]: n for n in graph.nodes if n.op == "dist.send"}
    stage: dict = {}
    sources = []
    current = 0             # the stage of the latest staged node so far
    where: dict = {}        # source node -> current at its place
    for n in graph.nodes:
        if n.op == "dist.recv":
            s = sends.get(n.attrs["tag"])
            if s is None:
                raise SimulationError(f"{n.describe()}: no dist.send has tag {n.attrs['tag']}")
            stage[n] = s.attrs["peer"]
            current = max(current, stage[n])
            continue
        ops = [stage[v.producer] for v in n.inputs if isinstance(v.producer, Node) and v.producer in stage]
        if ops:
            stage[n] = max(ops)
            current = max(current, stage[n])
        else:
            sources.append(n)
            where[n] = current
    for n in reversed(sources):
        users = [stage[u.node] for o in n.outputs for u in o.uses if u.node in stage]
        if users:
            stage[n] = min(users)
        else:   # unread; one a later pass appended (a gathered output) stays with its operands
            ops = [where[v.producer] for v in n.inputs if v.producer in where]
            stage[n] = min(where[n], max(ops)) if ops else where[n]
    return stage


def _local_inputs(graph: Graph, arrays: list, coords: dict) -> list:
    return [contiguous(shard_of(a, v.sharding, graph.mesh, coords)) for v, a in zip(graph.inputs, arrays)]


def run_ranks(graph: Graph, inputs) -> list:
    """Run every rank of ``graph.mesh``; returns, per rank (row-major), the list of its outputs (None for an
    output another pipeline stage computes). ``inputs``: the logical arrays (a list or a name mapping)."""
    if isinstance(inputs, Mapping):
        arrays = [_as_array(inputs[v.name]) for v in graph.inputs]
    else:
        if len(inputs) != len(graph.inputs):
            raise ValueError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
        arrays = [_as_array(x) for x in inputs]
    mesh = dict(graph.mesh)
    n = mesh_size(mesh)
    coords = list(all_coords(mesh)) if mesh else [{}]
    pp = pipeline_axis(graph)
    stages = node_stages(graph) if pp is not None else {}
    vals: list[dict] = []
    envs = []
    for c in coords:
        local = _local_inputs(graph, arrays, c)
        env = bind_symbols(graph, local)
        d = dict(zip(graph.inputs, local))
        for name, v in graph.params.items():
            d[v] = contiguous(shard_of(param_array(graph.param_data[name]), v.sharding, mesh, c))
        vals.append(d)
        envs.append(env)

    def runs(rank: int, node: Node) -> bool:
        return pp is None or coords[rank][pp] == stages[node]

    mailbox: dict = {}
    for node in graph.nodes:
        opdef = get_op(node.op)
        ranks = [r for r in range(n) if runs(r, node)]
        try:
            if node.op in GROUP_SEMANTICS:
                axis = node.attrs["axis"]
                groups = all_groups(mesh, axis) if axis in mesh else [[r] for r in range(n)]
                for grp in groups:
                    grp = [r for r in grp if r in ranks]
                    if not grp:
                        continue
                    attrs = evaluate_attrs(node.attrs, envs[grp[0]])
                    if len(grp) != attrs["parts"]:
                        raise SimulationError(f"{node.describe()}: group of {len(grp)} rank(s) but parts = "
                                              f"{attrs['parts']}")
                    res = GROUP_SEMANTICS[node.op]([vals[r][node.inputs[0]] for r in grp], **attrs)
                    for r, a in zip(grp, res):
                        vals[r][node.outputs[0]] = _conform(node, node.outputs[0].type, np.asarray(a), envs[r])
                continue
            for r in ranks:
                attrs = evaluate_attrs(node.attrs, envs[r])
                if node.op == "dist.send":
                    dst = coords_rank(mesh, {**coords[r], pp: attrs["peer"]})
                    mailbox[(attrs["tag"], dst)] = vals[r][node.inputs[0]]
                    vals[r][node.outputs[0]] = vals[r][node.inputs[0]]
                    continue
                if node.op == "dist.recv":
                    key = (attrs["tag"], r)
                    if key not in mailbox:
                        raise SimulationError(f"{node.describe()}: rank {r} receives tag {attrs['tag']} that no "
                                              f"rank sent before it")
                    vals[r][node.outputs[0]] = _conform(node, node.outputs[0].type, np.asarray(mailbox.pop(key)),
                                                        envs[r])
                    continue
                args = []
                for v in node.inputs:
                    if v not in vals[r]:
                        raise SimulationError(f"{node.describe()}: rank {r} (stage {stages.get(node)}) reads %{v.name}"
                                              f", which another pipeline stage computes and nothing sends")
                    args.append(vals[r][v])
                with np.errstate(all="ignore"):
                    res = opdef.ref(*args, **attrs)
                res = res if isinstance(res, tuple) else (res,)
                for out, a in zip(node.outputs, res):
                    vals[r][out] = _conform(node, out.type, np.asarray(a), envs[r])
        except SimulationError:
            raise
        except Exception as e:
            raise SimulationError(f"{node.describe()}: simulated semantics failed: {e}") from e
    return [[vals[r].get(v) for v in graph.outputs] for r in range(n)]


def assemble(graph: Graph, per_rank: Sequence[Sequence[Any]]) -> list:
    """The logical outputs from ``run_ranks``' per-rank ones: a split output concatenated over its axis, a
    replicated one taken from the first rank that has it (every rank that has it holds the same array)."""
    mesh = dict(graph.mesh)
    coords = list(all_coords(mesh)) if mesh else [{}]
    out = []
    for i, v in enumerate(graph.outputs):
        have = [r for r in range(len(per_rank)) if per_rank[r][i] is not None]
        if not have:
            raise SimulationError(f"output %{v.name} is computed on no rank")
        s = v.sharding
        if s is None:
            out.append(per_rank[have[0]][i])
            continue
        if s.is_partial:
            raise SimulationError(f"output %{v.name} is partial: all-reduce it first")
        c0 = coords[have[0]]
        chunks = [per_rank[coords_rank(mesh, {**c0, s.axis: k})][i] for k in range(mesh[s.axis])]
        out.append(np.concatenate(chunks, axis=s.dim))
    return out
