"""The graph: SSA values with use-lists, nodes in program (topological) order, graph inputs/outputs, and
parameters stored once.

A parameter is a graph-level value whose data lives in ``Graph.param_data`` (numpy array or torch tensor);
nodes refer to the value, never to a copy of the data.

Use-lists. ``v.uses`` is a tuple of ``Use(node, index)``: one per operand slot, of a node that is in a
graph, that reads ``v`` (graph outputs are not uses: ``graph.outputs`` lists them). The data structures
keep them, so no builder or pass has to:

- ``node.inputs`` is an ``Operands`` list: assigning it (``node.inputs = [...]``) or editing it in place
  (``node.inputs[1] = w``, ``append``, ...) moves the uses of the operands it drops and gains;
- ``graph.nodes`` is a ``NodeList``: a node entering it (``add_node``, ``append_node``, ``graph.nodes =
  [...]``, any list edit) registers the uses of its operands and becomes ``node.graph``; a node leaving it
  unregisters them. A node belongs to one graph at a time.

``verify`` checks the lists against the operands (rule ``use-list``), so a list made stale behind these
structures' back (private fields) is caught.

Mutation API, in the spirit of torch.fx and xDSL's rewriter:

    with g.insert_before(node):                       # or insert_after(node) / insert_at_end()
        y = g.add_node("mul", [x, s])                  # the one builder: attrs checked, types inferred
    g.replace_all_uses_with(node.outputs[0], y)        # node operands and graph outputs
    g.erase(node)                                      # refused while a result is still used

plus ``replace_uses({old: new, ...})`` (simultaneous), ``replace_node``, ``erase_nodes``, ``dead_nodes``,
``sort_topologically``, ``remove_param``, ``Node.retype`` and ``clone(mapping=...)``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from .ops import OpError, get_op
from .printer import print_graph
from .sharding import Sharding
from .torch_dtypes import dtype_from_torch, torch_to_numpy
from .types import DType, TensorType, as_dim

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ABSENT = object()  # an operand slot that does not exist (before an append / after a pop)


class GraphMutationError(ValueError):
    """A refused mutation: erasing a node whose results are still used, a node of another graph, ..."""


class Use(NamedTuple):
    """One operand slot reading a value: ``node.inputs[index]``."""
    node: "Node"
    index: int


class Value:
    """An SSA value. Compared by identity; ``name`` is unique within its graph."""

    __slots__ = ("name", "type", "producer", "index", "_uses", "sharding")

    def __init__(self, name: str, type: TensorType, producer: "Optional[Node]" = None, index: int = 0,
                 sharding: "Optional[Sharding]" = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index
        self._uses: dict[Use, None] = {}  # insertion-ordered set
        # None: replicated (or an unpartitioned graph); else split/partial over a mesh axis (ir/sharding.py)
        self.sharding = sharding

    @property
    def uses(self) -> tuple:
        """Every operand slot of an in-graph node that reads this value (``Use(node, index)``)."""
        return tuple(self._uses)

    @property
    def users(self) -> list:
        """The distinct nodes reading this value."""
        return list(dict.fromkeys(u.node for u in self._uses))

    @property
    def num_uses(self) -> int:
        return len(self._uses)

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}" + (f" {self.sharding}" if self.sharding is not None else "")


def _add_use(v, node: "Node", i: int) -> None:
    uses = getattr(v, "_uses", None)  # a broken graph may hold a non-Value operand: the verifier names it
    if uses is not None:
        uses[Use(node, i)] = None


def _drop_use(v, node: "Node", i: int) -> None:
    uses = getattr(v, "_uses", None)
    if uses is not None:
        uses.pop(Use(node, i), None)


class Operands(list):
    """A node's operand list: every edit keeps the operands' use-lists right while the node is in a graph."""

    __slots__ = ("_node",)

    def __init__(self, node: "Optional[Node]", values: Iterable = ()):
        super().__init__(values)
        self._node = node

    def _edit(self, fn, *args):
        node = self._node
        if node is None or node._graph is None:
            return fn(self, *args)
        old = list(self)
        try:
            return fn(self, *args)
        finally:
            node._relink(old)

    def __setitem__(self, i, v):
        return self._edit(list.__setitem__, i, list(v) if isinstance(i, slice) else v)

    def __delitem__(self, i):
        return self._edit(list.__delitem__, i)

    def __iadd__(self, values):
        self._edit(list.extend, list(values))
        return self

    def __imul__(self, n):
        self._edit(list.__imul__, n)
        return self

    def append(self, v):
        return self._edit(list.append, v)

    def extend(self, values):
        return self._edit(list.extend, list(values))

    def insert(self, i, v):
        return self._edit(list.insert, i, v)

    def pop(self, i=-1):
        return self._edit(list.pop, i)

    def remove(self, v):
        return self._edit(list.remove, v)

    def clear(self):
        return self._edit(list.clear)

    def sort(self, *, key=None, reverse=False):
        return self._edit(lambda s: list.sort(s, key=key, reverse=reverse))

    def reverse(self):
        return self._edit(list.reverse)

    def copy(self) -> list:
        return list(self)


class Node:
    """One op application: ``outputs = op(*inputs){attrs}``. In at most one graph (``node.graph``)."""

    def __init__(self, op: str, inputs: Iterable = (), attrs: Optional[dict] = None, outputs: Optional[list] = None,
                 loc: Optional[str] = None):
        self.op = op
        self.attrs = attrs if attrs is not None else {}
        self.outputs = outputs if outputs is not None else []
        self.loc = loc  # where it came from: module path and source line
        self._graph: Optional[Graph] = None
        self._inputs = Operands(self, inputs)

    @property
    def inputs(self) -> Operands:
        return self._inputs

    @inputs.setter
    def inputs(self, values: Iterable) -> None:
        old, new = self._inputs, Operands(self, values)
        old._node = None  # the old list object is a plain list from now on
        self._inputs = new
        if self._graph is not None:
            self._relink(old)

    @property
    def graph(self) -> "Optional[Graph]":
        """The graph whose node list holds this node (None while it is in none)."""
        return self._graph

    def _relink(self, old: list) -> None:
        """Move use registrations from the operand slots ``old`` had to the ones the node has now."""
        new = self._inputs
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else _ABSENT
            b = new[i] if i < len(new) else _ABSENT
            if a is b:
                continue
            if a is not _ABSENT:
                _drop_use(a, self, i)
            if b is not _ABSENT:
                _add_use(b, self, i)

    def retype(self) -> tuple:
        """Re-run the op's type rule over the current operand types and attrs; the results take the types
        (after a pass changed an operand's shape). Returns them."""
        types = get_op(self.op).infer_types([v.type for v in self._inputs], self.attrs)
        if len(types) != len(self.outputs):
            raise OpError(f"{self.describe()}: op '{self.op}' now infers {len(types)} result(s) for "
                          f"{len(self.outputs)} declared")
        for o, t in zip(self.outputs, types):
            o.type = t
        return types

    def __repr__(self) -> str:
        outs = ", ".join(f"%{o.name}" for o in self.outputs)
        ins = ", ".join(f"%{i.name}" for i in self._inputs)
        return f"{outs} = {self.op}({ins})" + (f" @ {self.loc}" if self.loc else "")

    def describe(self) -> str:
        """How error messages name a node: its results, op and source location."""
        outs = ", ".join(f"%{o.name}" for o in self.outputs) or "<no results>"
        return f"node {outs} = {self.op}(...)" + (f" [from {self.loc}]" if self.loc else "")


class NodeList(list):
    """A graph's nodes in program order: a node entering the list registers its operand uses (and the graph
    as ``node.graph``), a node leaving it unregisters them. Reordering changes no uses."""

    __slots__ = ("_graph",)

    def __init__(self, graph: "Graph", nodes: Iterable = ()):
        super().__init__()
        self._graph = graph
        self.extend(nodes)

    def _entering(self, nodes: list) -> list:
        g = self._graph
        for n in nodes:
            if not isinstance(n, Node):
                raise TypeError(f"graph @{g.name}: the node list holds Nodes, got {n!r}")
            if n._graph is not None and n._graph is not g:
                raise GraphMutationError(f"{n.describe()} is in graph @{n._graph.name}; a node is in one graph "
                                         f"at a time (erase it there first, or clone)")
        return nodes

    def _settle(self, gone: list, came: list) -> None:
        g = self._graph
        if len(gone) == 1 and not came:
            if not list.__contains__(self, gone[0]):  # still there: the node was listed twice
                g._detach(gone[0])
        elif gone:
            present = set(self)
            for n in gone:
                if n not in present:
                    g._detach(n)
        for n in came:
            g._attach(n)

    def append(self, node):
        self._entering([node])
        list.append(self, node)
        self._graph._attach(node)

    def insert(self, i, node):
        self._entering([node])
        list.insert(self, i, node)
        self._graph._attach(node)

    def extend(self, nodes):
        nodes = self._entering(list(nodes))
        list.extend(self, nodes)
        for n in nodes:
            self._graph._attach(n)

    def __iadd__(self, nodes):
        self.extend(nodes)
        return self

    def __imul__(self, n):
        if n > 1 and len(self):
            raise GraphMutationError(f"graph @{self._graph.name}: a node list cannot repeat its nodes")
        if n <= 0:
            self.clear()
        return self

    def pop(self, i=-1):
        n = list.pop(self, i)
        self._settle([n], [])
        return n

    def remove(self, node):
        list.remove(self, node)
        self._settle([node], [])

    def clear(self):
        gone = list(self)
        list.clear(self)
        for n in gone:
            self._graph._detach(n)

    def __delitem__(self, i):
        gone = list.__getitem__(self, i)
        list.__delitem__(self, i)
        self._settle(gone if isinstance(i, slice) else [gone], [])

    def __setitem__(self, i, v):
        if isinstance(i, slice):
            came = self._entering(list(v))
            gone = list.__getitem__(self, i)
            list.__setitem__(self, i, came)
            old, new = set(gone), set(came)
            self._settle([n for n in gone if n not in new], [n for n in came if n not in old])
        else:
            self._entering([v])
            gone = list.__getitem__(self, i)
            list.__setitem__(self, i, v)
            if gone is not v:
                self._settle([gone], [v])

    def copy(self) -> list:
        return list(self)


class InsertPoint:
    """Where ``Graph.add_node`` / ``append_node`` put new nodes: before ``anchor``, after it (each new node
    after the one before), or at the end of the node list (``anchor`` None). ``inserted`` lists the nodes
    placed through this point, in order."""

    __slots__ = ("graph", "anchor", "after", "inserted", "_hint")

    def __init__(self, graph: "Graph", anchor: "Optional[Node]" = None, after: bool = False):
        if anchor is not None and anchor._graph is not graph:
            raise GraphMutationError(f"insertion point: {anchor.describe()} is not in graph @{graph.name}")
        self.graph, self.anchor, self.after = graph, anchor, after
        self.inserted: list = []
        self._hint: Optional[int] = None  # the anchor's last known position (inserting in a row is O(1))

    def index(self) -> int:
        """The position the next node takes in ``graph.nodes``."""
        nodes = self.graph._nodes
        if self.anchor is None:
            return len(nodes)
        h = self._hint
        if h is None or h >= len(nodes) or list.__getitem__(nodes, h) is not self.anchor:
            if self.anchor._graph is not self.graph:
                raise GraphMutationError(f"insertion point: its anchor {self.anchor.describe()} has left "
                                         f"graph @{self.graph.name}")
            h = nodes.index(self.anchor)
        self._hint = h
        return h + 1 if self.after else h

    def insert(self, node: Node) -> Node:
        i = self.index()
        self.graph._nodes.insert(i, node)
        self.inserted.append(node)
        if self.anchor is not None:
            if self.after:
                self.anchor, self._hint = node, i
            else:
                self._hint = i + 1
        return node

    def __repr__(self) -> str:
        if self.anchor is None:
            return f"InsertPoint(end of @{self.graph.name})"
        return f"InsertPoint({'after' if self.after else 'before'} {self.anchor.describe()})"


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
        self._nodes = NodeList(self)
        self.outputs: list[Value] = []
        # symbolic dim name -> (min, max); None where unbounded
        self.symbols: dict[str, tuple[Optional[int], Optional[int]]] = {}
        # a partitioned graph's device mesh: axis name -> size, ranks row-major (ir/sharding.py); {} otherwise
        self.mesh: dict[str, int] = {}
        self._names: set[str] = set()
        self._counter = 0
        self._cursor = InsertPoint(self)

    @property
    def nodes(self) -> NodeList:
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: Iterable[Node]) -> None:
        self._nodes[:] = list(nodes)

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

    def add_input(self, name: str, type: TensorType, sharding: Optional[Sharding] = None) -> Value:
        v = Value(self._claim(_sanitize(name)), type, sharding=sharding)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, data: Any = None, type: Optional[TensorType] = None, *,
                  unique: bool = False, sharding: Optional[Sharding] = None) -> Value:
        """A parameter; its type comes from ``data`` unless given (data may be attached later). With
        ``unique`` a taken name gets a suffix (``w.scale`` -> ``w.scale_0``) instead of an error."""
        if type is None:
            if data is None:
                raise ValueError(f"parameter {name!r} needs data or a type")
            type = type_of_data(data)
        v = Value(self.fresh_name(name) if unique else self._claim(_sanitize(name)), type, sharding=sharding)
        self.params[v.name] = v
        if data is not None:
            self.param_data[v.name] = data
        return v

    def create_node(self, op: str, inputs: Iterable[Value] = (), attrs: Optional[dict] = None, *,
                    loc: Optional[str] = None, names: Optional[list] = None, name: Optional[str] = None) -> Node:
        """The one node builder: a node of ``op`` at the insertion point, its attrs completed with defaults and
        checked, its result types from the op's type rule, its results named after ``names`` (or ``name`` for
        a single result; made unique)."""
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
        return self._cursor.insert(node)

    def add_node(self, op: str, inputs: Iterable[Value] = (), attrs: Optional[dict] = None, *,
                 loc: Optional[str] = None, names: Optional[list] = None, name: Optional[str] = None):
        """``create_node``, returning the single result Value, or a tuple of Values for multi-result ops."""
        node = self.create_node(op, inputs, attrs, loc=loc, names=names, name=name)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)

    def append_node(self, node: Node) -> Node:
        """Place a node built elsewhere (the parser) at the insertion point, claiming its result names."""
        for i, o in enumerate(node.outputs):
            self._claim(o.name)
            o.producer, o.index = node, i
        return self._cursor.insert(node)

    def set_outputs(self, outs: Iterable[Value]) -> None:
        self.outputs = list(outs)

    # -- insertion points ---------------------------------------------------------------------
    @property
    def insert_point(self) -> InsertPoint:
        """Where ``add_node`` / ``append_node`` put the next node (the end of the list by default)."""
        return self._cursor

    def insert_before(self, node: Node):
        """``with g.insert_before(n) as ip:`` new nodes go before ``n``, in the order they are made."""
        return self._insert_at(InsertPoint(self, node))

    def insert_after(self, node: Node):
        """``with g.insert_after(n) as ip:`` new nodes go right after ``n``, in the order they are made."""
        return self._insert_at(InsertPoint(self, node, after=True))

    def insert_at_end(self):
        return self._insert_at(InsertPoint(self))

    @contextlib.contextmanager
    def _insert_at(self, ip: InsertPoint) -> Iterator[InsertPoint]:
        saved, self._cursor = self._cursor, ip
        try:
            yield ip
        finally:
            self._cursor = saved

    def _attach(self, node: Node) -> None:
        if node._graph is self:
            return
        node._graph = self
        for i, v in enumerate(node._inputs):
            _add_use(v, node, i)

    def _detach(self, node: Node) -> None:
        if node._graph is not self:
            return
        for i, v in enumerate(node._inputs):
            _drop_use(v, node, i)
        node._graph = None

    # -- rewriting ----------------------------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Value, *, where: Optional[Callable[[Node], bool]] = None,
                              outputs: bool = True) -> int:
        """Every operand of this graph's nodes reading ``old`` (only those of nodes ``where`` accepts, when
        given) reads ``new`` instead, and so does every graph output (``outputs``). Types are not checked
        (the verifier does). Returns the number of operand slots and outputs changed."""
        return self.replace_uses({old: new}, where=where, outputs=outputs)

    def replace_uses(self, mapping: Mapping[Value, Value], *, where: Optional[Callable[[Node], bool]] = None,
                     outputs: bool = True) -> int:
        """``replace_all_uses_with`` for several values at once, simultaneously: ``{a: b, b: a}`` swaps.
        Refused (before any change) where a node would read its own result."""
        slots = []
        for old, new in mapping.items():
            if new is old:
                continue
            for u in old._uses:
                if u.node._graph is self and (where is None or where(u.node)):
                    if u.node is getattr(new, "producer", None):
                        raise GraphMutationError(
                            f"replacing %{old.name} by %{new.name} would make {u.node.describe()} read its own "
                            f"result (operand {u.index}); leave that node out (where=...)")
                    slots.append((u, new))
        for u, new in slots:
            u.node._inputs[u.index] = new
        n = len(slots)
        if outputs:
            for i, v in enumerate(self.outputs):
                new = mapping.get(v, v) if isinstance(v, Value) else v
                if new is not v:
                    self.outputs[i] = new
                    n += 1
        return n

    def replace_node(self, node: Node, values) -> None:
        """Result i of ``node`` is replaced by ``values[i]`` everywhere (a single Value for a one-result
        node), then ``node`` is erased. The replacement must already be in the graph, before the users."""
        values = (values,) if isinstance(values, Value) else tuple(values)
        if len(values) != len(node.outputs):
            raise GraphMutationError(f"cannot replace {node.describe()}: it has {len(node.outputs)} result(s), "
                                     f"got {len(values)} replacement(s)")
        self.replace_uses(dict(zip(node.outputs, values)))
        self.erase(node)

    def _refuse_used(self, node: Node, erasing) -> None:
        if node._graph is not self:
            raise GraphMutationError(f"cannot erase {node.describe()}: it is not in graph @{self.name}")
        for o in node.outputs:
            live = [u for u in o._uses if u.node not in erasing]
            if live:
                more = f" and {len(live) - 1} more use(s)" if len(live) > 1 else ""
                raise GraphMutationError(
                    f"cannot erase {node.describe()}: its result %{o.name} is still used by "
                    f"{live[0].node.describe()} (operand {live[0].index}){more}; redirect the uses first "
                    f"(Graph.replace_all_uses_with)")
            if any(v is o for v in self.outputs):
                raise GraphMutationError(f"cannot erase {node.describe()}: its result %{o.name} is a graph output")

    def erase(self, node: Node) -> None:
        """Remove ``node``; refused (GraphMutationError) while any of its results is used or is an output."""
        self._refuse_used(node, ())
        self._nodes.remove(node)

    def erase_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove several nodes at once (one pass over the list); their results may be used among them
        only."""
        doomed = list(dict.fromkeys(nodes))
        gone = set(doomed)
        for n in doomed:
            self._refuse_used(n, gone)
        if doomed:
            for n in doomed:
                self._detach(n)
            list.__setitem__(self._nodes, slice(None), [n for n in self._nodes if n not in gone])

    def dead_nodes(self) -> list:
        """Nodes none of whose results reaches a graph output, in program order (a dist.send is never dead:
        its effect is the message)."""
        outs = {v for v in self.outputs if isinstance(v, Value)}
        dead: set = set()
        for n in reversed(self._nodes):  # users come after their producers
            if n.op != "dist.send" and all(o not in outs and all(u.node in dead for u in o._uses) for o in n.outputs):
                dead.add(n)
        return [n for n in self._nodes if n in dead]

    def sort_topologically(self) -> bool:
        """Reorder the nodes so that every producer comes before its users, keeping the present order
        wherever it already is (stable). Returns whether anything moved; a cycle is a GraphMutationError."""
        nodes = list(self._nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        done: set = set()
        entered: set = set()
        out = []
        for n in nodes:
            stack = [(n, False)]
            while stack:
                cur, ready = stack.pop()
                if cur in done:
                    continue
                if ready:
                    done.add(cur)
                    out.append(cur)
                    continue
                if cur in entered:
                    raise GraphMutationError(f"graph @{self.name}: {cur.describe()} depends on itself (a cycle)")
                entered.add(cur)
                stack.append((cur, True))
                deps = [v.producer for v in cur.inputs
                        if getattr(v, "producer", None) in pos and v.producer not in done]
                for d in sorted(deps, key=lambda d: -pos[d]):
                    stack.append((d, False))
        if all(a is b for a, b in zip(out, nodes)):
            return False
        self.nodes = out
        return True

    def remove_param(self, name: str) -> None:
        """Drop parameter ``name`` and its data; refused while anything uses it."""
        v = self.params[name]
        if v._uses:
            u = next(iter(v._uses))
            raise GraphMutationError(f"cannot remove param %{name}: it is used by {u.node.describe()} "
                                     f"(operand {u.index})")
        if any(o is v for o in self.outputs):
            raise GraphMutationError(f"cannot remove param %{name}: it is a graph output")
        del self.params[name]
        self.param_data.pop(name, None)

    # -- queries ------------------------------------------------------------------------------
    def values(self) -> list[Value]:
        return [*self.inputs, *self.params.values(), *(o for n in self._nodes for o in n.outputs)]

    def users(self) -> dict[Value, list[Node]]:
        """A snapshot: value -> the nodes using it, in program order (a node once per operand reading it).
        ``v.uses`` is the live form."""
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self._nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def param_bytes(self) -> int:
        return sum(int(np.prod(v.type.shape)) * v.type.dtype.bits // 8 for v in self.params.values())

    def clone(self, *, mapping: Optional[dict] = None) -> "Graph":
        """A structural copy sharing parameter data (data is immutable by convention). ``mapping``, when
        given, receives every Value and Node of this graph -> its copy."""
        g = Graph(self.name)
        g.symbols = dict(self.symbols)
        g.mesh = dict(self.mesh)
        vmap: dict = {} if mapping is None else mapping
        for v in self.inputs:
            vmap[v] = g.add_input(v.name, v.type, v.sharding)
        for name, v in self.params.items():
            vmap[v] = g.add_param(name, self.param_data.get(name), type=v.type, sharding=v.sharding)
        for n in self._nodes:
            outs = [Value(o.name, o.type, sharding=o.sharding) for o in n.outputs]
            new = Node(n.op, [vmap[i] for i in n.inputs], dict(n.attrs), outs, n.loc)
            g.append_node(new)
            if mapping is not None:
                mapping[n] = new
            for o, no in zip(n.outputs, outs):
                vmap[o] = no
        g.outputs = [vmap[v] for v in self.outputs]
        g._counter = self._counter
        return g

    def __str__(self) -> str:
        return print_graph(self)


def type_of_data(data: Any) -> TensorType:
    if hasattr(data, "detach"):  # a torch tensor (torch_dtypes imports torch only for one)
        return TensorType(tuple(data.shape), dtype_from_torch(data.dtype))
    arr = np.asarray(data)
    return TensorType(arr.shape, DType.from_numpy(arr.dtype))


def param_array(data: Any) -> np.ndarray:
    """Parameter data as a numpy array (bf16 torch tensors through ml_dtypes, without copying f32)."""
    if hasattr(data, "detach"):
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
    if list(a.mesh.items()) != list(b.mesh.items()):
        return f"meshes differ: {a.mesh} vs {b.mesh}"

    def sig(v: Value) -> tuple:
        return (v.name, str(v.type), str(v.sharding))

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
