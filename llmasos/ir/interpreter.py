"""The reference interpreter: runs any verified graph with each op's numpy semantics.

It is the oracle of every numeric test, so it checks what it can: input types, symbol bounds, and that
each op's result has exactly the shape and dtype the type rule promised.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np
import sympy

from .graph import Graph, Value, param_array
from .ops import get_op
from .opset.rules import to_dtype
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
