"""The graph: SSA values, nodes in program order, graph inputs/outputs, and parameters stored once.

A parameter is a graph-level value whose data lives in ``Graph.param_data`` (numpy array or torch tensor);
nodes refer to the value, never to a copy of the data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from .types import DType, TensorType, as_dim

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class Value:
    """An SSA value. Compared by identity; ``name`` is unique within its graph."""

    __slots__ = ("name", "type", "producer", "index")

    def __init__(self, name: str, type: TensorType, producer: "Optional[Node]" = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    op: str
    inputs: list
    attrs: dict
    outputs: list = field(default_factory=list)
    loc: Optional[str] = None  # where it came from: module path and source line

    def __repr__(self) -> str:
        outs = ", ".join(f"%{o.name}" for o in self.outputs)
        ins = ", ".join(f"%{i.name}" for i in self.inputs)
        return f"{outs} = {self.op}({ins})" + (f" @ {self.loc}" if self.loc else "")

    def describe(self) -> str:
        """How error messages name a node: its results, op and source location."""
        outs = ", ".join(f"%{o.name}" for o in self.outputs) or "<no results>"
        return f"node {outs} = {self.op}(...)" + (f" [from {self.loc}]" if self.loc else "")


def _sanitize(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.]", "_", name)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = "v" + name
    return name


class Graph:
    def __init__(self, name: str = "main"):
        self.name = _sanitize(name)
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.param_data: dict[str, Any] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        # symbolic dim name -> (min, max); None where unbounded
        self.symbols: dict[str, tuple[Optional[int], Optional[int]]] = {}
        self._names: set[str] = set()
        self._counter = 0

    # -- naming -------------------------------------------------------------------------------
    def fresh_name(self, hint: Optional[str] = None) -> str:
        if hint:
            base = _sanitize(hint)
            if base not in self._names:
                self._names.add(base)
                return base
        while True:
            name = f"{_sanitize(hint) + '_' if hint else 'v'}{self._counter}"
            self._counter += 1
            if name not in self._names:
                self._names.add(name)
                return name

    def _claim(self, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid value name {name!r}: names are letters, digits, '_' and '.'")
        if name in self._names:
            raise ValueError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    # -- building -----------------------------------------------------------------------------
    def add_symbol(self, name: str, min: Optional[int] = None, max: Optional[int] = None) -> None:
        self.symbols[name] = (min, max)

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(_sanitize(name)), type)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, data: Any = None, type: Optional[TensorType] = None) -> Value:
        """A parameter; its type comes from ``data`` unless given (data may be attached later)."""
        if type is None:
            if data is None:
                raise ValueError(f"parameter {name!r} needs data or a type")
            type = type_of_data(data)
        v = Value(self._claim(_sanitize(name)), type)
        self.params[v.name] = v
        if data is not None:
            self.param_data[v.name] = data
        return v

    def add_node(self, op: str, inputs: Iterable[Value], attrs: Optional[dict] = None, *,
                 loc: Optional[str] = None, names: Optional[list] = None, name: Optional[str] = None):
        """Append a node, inferring its result types from the op registry.

        Returns the single result Value, or a tuple of Values for multi-result ops.
        """
        from .ops import get_op, OpError

        opdef = get_op(op, loc=loc)
        inputs = list(inputs)
        attrs = opdef.complete_attrs(attrs or {}, loc=loc)
        try:
            out_types = opdef.infer_types([v.type for v in inputs], attrs)
        except OpError:
            raise
        except Exception as e:  # shape rules raise plain errors; name the op and its origin here
            where = f" [from {loc}]" if loc else ""
            ins = ", ".join(str(v.type) for v in inputs)
            raise OpError(f"op '{op}'{where}: cannot infer result type for inputs ({ins}) "
                          f"and attrs {attrs}: {e}") from e
        node = Node(op, inputs, attrs, [], loc)
        for i, t in enumerate(out_types):
            hint = names[i] if names and i < len(names) else (name if len(out_types) == 1 else None)
            node.outputs.append(Value(self.fresh_name(hint), t, node, i))
        self.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)

    def append_node(self, node: Node) -> Node:
        """Append a node built elsewhere (the parser), claiming its result names."""
        for i, o in enumerate(node.outputs):
            self._claim(o.name)
            o.producer, o.index = node, i
        self.nodes.append(node)
        return node

    def set_outputs(self, outs: Iterable[Value]) -> None:
        self.outputs = list(outs)

    # -- queries ------------------------------------------------------------------------------
    def values(self) -> list[Value]:
        return [*self.inputs, *self.params.values(), *(o for n in self.nodes for o in n.outputs)]

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def param_bytes(self) -> int:
        return sum(int(np.prod(v.type.shape)) * v.type.dtype.bits // 8 for v in self.params.values())

    def clone(self) -> "Graph":
        """A structural copy sharing parameter data (data is immutable by convention)."""
        g = Graph(self.name)
        g.symbols = dict(self.symbols)
        vmap: dict[Value, Value] = {}
        for v in self.inputs:
            vmap[v] = g.add_input(v.name, v.type)
        for name, v in self.params.items():
            vmap[v] = g.add_param(name, self.param_data.get(name), type=v.type)
        for n in self.nodes:
            outs = [Value(o.name, o.type) for o in n.outputs]
            new = Node(n.op, [vmap[i] for i in n.inputs], dict(n.attrs), outs, n.loc)
            g.append_node(new)
            for o, no in zip(n.outputs, outs):
                vmap[o] = no
        g.outputs = [vmap[v] for v in self.outputs]
        g._counter = self._counter
        return g

    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)


def type_of_data(data: Any) -> TensorType:
    if hasattr(data, "detach"):  # torch tensor, without importing torch here
        from .torch_dtypes import dtype_from_torch
        return TensorType(tuple(data.shape), dtype_from_torch(data.dtype))
    arr = np.asarray(data)
    return TensorType(arr.shape, DType.from_numpy(arr.dtype))


def param_array(data: Any) -> np.ndarray:
    """Parameter data as a numpy array (bf16 torch tensors through ml_dtypes, without copying f32)."""
    if hasattr(data, "detach"):
        from .torch_dtypes import torch_to_numpy
        return torch_to_numpy(data)
    return np.asarray(data)


def graph_equal(a: Graph, b: Graph, check_data: bool = True) -> bool:
    return graph_diff(a, b, check_data) is None


def graph_diff(a: Graph, b: Graph, check_data: bool = True) -> Optional[str]:
    """None when the graphs are the same up to value identity, else the first difference."""
    if a.name != b.name:
        return f"names differ: {a.name} vs {b.name}"
    if a.symbols != b.symbols:
        return f"symbols differ: {a.symbols} vs {b.symbols}"

    def sig(v: Value) -> tuple:
        return (v.name, str(v.type))

    if [sig(v) for v in a.inputs] != [sig(v) for v in b.inputs]:
        return f"inputs differ: {a.inputs} vs {b.inputs}"
    if sorted(sig(v) for v in a.params.values()) != sorted(sig(v) for v in b.params.values()):
        return "params differ"
    if check_data:
        for k in a.params:
            da, db = a.param_data.get(k), b.param_data.get(k)
            if (da is None) != (db is None):
                return f"param {k}: data present in one graph only"
            if da is not None and not np.array_equal(param_array(da), param_array(db), equal_nan=True):
                return f"param {k}: data differs"
    if len(a.nodes) != len(b.nodes):
        return f"node counts differ: {len(a.nodes)} vs {len(b.nodes)}"
    for na, nb in zip(a.nodes, b.nodes):
        if (na.op != nb.op or [sig(v) for v in na.inputs] != [sig(v) for v in nb.inputs]
                or [sig(v) for v in na.outputs] != [sig(v) for v in nb.outputs] or na.loc != nb.loc
                or not attrs_equal(na.attrs, nb.attrs)):
            return f"nodes differ: {na!r} {na.attrs} vs {nb!r} {nb.attrs}"
    if [sig(v) for v in a.outputs] != [sig(v) for v in b.outputs]:
        return f"outputs differ: {a.outputs} vs {b.outputs}"
    return None


def attrs_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, bool) != isinstance(y, bool):
            return False
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            floaty = x.dtype.kind == "f" or x.dtype in (DType.bf16.numpy, DType.f8e4m3.numpy)
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y, equal_nan=floaty):
                return False
        elif isinstance(x, float) and isinstance(y, float):
            if not (x == y or (x != x and y != y)):
                return False
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y) or any(as_dim(p) != as_dim(q) if not isinstance(p, float) else p != q
                                       for p, q in zip(x, y)):
                return False
        elif type(x) is not type(y) and not (isinstance(x, int) and isinstance(y, int)):
            try:
                if as_dim(x) != as_dim(y):
                    return False
            except TypeError:
                return False
        elif x != y:
            return False
    return True
