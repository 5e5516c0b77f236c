"""The IR verifier: every structural and typing invariant a graph must hold before a pass or backend sees it.

Graphs are built by the frontend, the parser, passes and by hand (``Node(...)``, ``append_node``, direct
list edits), so nothing here trusts the builders. Each broken invariant has a rule id (kebab-case) that
tests and tools can match on:

  bad-symbol-bounds     a symbol's (min, max) are not ints/None, are negative, or min > max
  undeclared-symbol     a dim (of a value or a dim attr) uses a symbol absent from graph.symbols
  duplicate-definition  a value name (or the Value itself) is defined twice
  param-data            a parameter's data does not have its declared shape/dtype
  producer-link         a node result whose producer/index do not point back at that node and slot
  undefined-value       an operand that is not an input, parameter or earlier result (use before def)
  unknown-op            the op is not registered (close matches are suggested)
  arity                 wrong number of operands for the op
  attr-unknown          an attribute the op does not take
  attr-missing          a required attribute is absent
  attr-kind             an attribute of the wrong kind, or outside its choices
  operand-type          the op's type rule rejects the operand types (and attrs)
  result-count          the node has a different number of results than the op produces
  result-type           a declared result type differs from the inferred one
  no-outputs            the graph has no outputs
  output-undefined      a graph output is not a value defined in the graph
  mesh                  a mesh axis of size < 1; a sharding over an axis the graph does not declare or a dim
                        the value lacks; in a graph that declares a mesh, a communication op whose group size
                        (``parts``) or peer does not fit it (an undeclared axis has size 1). A graph without a
                        mesh is one rank's program (llmasos/parallel): its groups are the runtime's
  sharding              a split or partial value reaching a replicated result other than through a collective,
                        a partial value read by anything but dist.all_reduce / reduce_scatter / send, a
                        collective whose operand or result sharding is not the one it converts, a partial output
  use-list              a value's use-list disagrees with the operands of the graph's nodes (a node in the
                        list that is not attached to the graph, an operand not listed, a listed use that is
                        not an operand of a node of this graph); checked last, in one pass over the operands
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .graph import Graph, Node, Use, Value, type_of_data
from .ops import REQUIRED, OpError, normalize_attr, get_op
from .opset.collective import COMM_OPS
from .sharding import describe, logical_type
from .types import TensorType, dim_symbols

RULES = ("bad-symbol-bounds", "undeclared-symbol", "duplicate-definition", "param-data", "producer-link",
         "undefined-value", "unknown-op", "arity", "attr-unknown", "attr-missing", "attr-kind", "operand-type",
         "result-count", "result-type", "no-outputs", "output-undefined", "mesh", "sharding", "use-list")


class VerificationError(ValueError):
    """One broken invariant: ``rule`` is its id, ``node`` the offending Node (None for graph-level rules)."""

    def __init__(self, rule: str, node: Optional[Node], message: str, where: Optional[str] = None):
        self.rule = rule
        self.node = node
        self.detail = message
        subject = node.describe() if node is not None else (where or "graph")
        super().__init__(f"verify: {subject}: rule '{rule}': {message}")


def verify(graph: Graph, collect: bool = False):
    """Raise the first VerificationError in ``graph``; with ``collect=True`` return them all instead."""
    problems = _Checker(graph, stop_early=not collect).run()
    if collect:
        return problems
    if problems:
        raise problems[0]
    return None


class _Stop(Exception):
    pass


class _Checker:
    def __init__(self, graph: Graph, stop_early: bool):
        self.g = graph
        self.stop_early = stop_early
        self.problems: list[VerificationError] = []
        self.defined: dict[Value, None] = {}  # in definition order; Values hash by identity, as the interpreter keys them
        self.names: dict[str, str] = {}  # value name -> where it was defined
        self.later: dict[Value, Node] = {}  # every node result -> its node, to tell "later" from "never"

    def report(self, rule: str, node: Optional[Node], message: str, where: Optional[str] = None) -> None:
        self.problems.append(VerificationError(rule, node, message, where))
        if self.stop_early:
            raise _Stop

    def run(self) -> list[VerificationError]:
        try:
            self.check_symbols()
            for v in self.g.inputs:
                name = getattr(v, "name", v)
                self.define(v, f"input %{name}", None, f"graph input %{name}")
            for name, v in self.g.params.items():
                self.define(v, f"param %{v.name}", None, f"param %{name}")
                self.check_param(name, v)
            for n in self.g.nodes:
                for o in n.outputs:
                    if isinstance(o, Value):
                        self.later.setdefault(o, n)
            for n in self.g.nodes:
                self.check_node(n)
            self.check_outputs()
            self.check_sharding()
            self.check_uses()
        except _Stop:
            pass
        return self.problems

    # -- symbols -----------------------------------------------------------------------------------
    def check_symbols(self) -> None:
        for name, bounds in self.g.symbols.items():
            where = f"symbol '{name}'"
            if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
                self.report("bad-symbol-bounds", None, f"bounds must be a (min, max) pair, got {bounds!r}", where)
                continue
            lo, hi = bounds
            if any(b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer))) for b in bounds):
                self.report("bad-symbol-bounds", None, f"bounds must be ints or None, got ({lo!r}, {hi!r})", where)
            elif any(b is not None and b < 0 for b in (lo, hi)):
                self.report("bad-symbol-bounds", None, f"a dim size cannot be negative: ({lo}, {hi})", where)
            elif lo is not None and hi is not None and lo > hi:
                self.report("bad-symbol-bounds", None, f"min {lo} > max {hi}", where)

    def check_type_symbols(self, t: TensorType, node: Optional[Node], what: str, where: Optional[str]) -> None:
        missing = sorted(set(t.symbols()) - set(self.g.symbols))
        if missing:
            self.report("undeclared-symbol", node, f"{what} has type {t} using symbol(s) {missing} that are not "
                        f"declared in graph.symbols (declared: {sorted(self.g.symbols) or 'none'})", where)

    # -- definitions -------------------------------------------------------------------------------
    def define(self, v, what: str, node: Optional[Node], where: Optional[str]) -> None:
        if not isinstance(v, Value):
            self.report("undefined-value", node, f"{what} is not a Value: {v!r}", where)
            return
        head = f"{what}: " if node is not None else ""  # graph-level subjects already name the value
        if v in self.defined:
            self.report("duplicate-definition", node, f"{head}this Value is already defined as "
                        f"{self.names.get(v.name, '?')}", where)
        elif v.name in self.names:
            self.report("duplicate-definition", node, f"{head}value name %{v.name} is already defined as "
                        f"{self.names[v.name]}", where)
        self.defined[v] = None
        self.names.setdefault(v.name, what + (f" of {node.describe()}" if node is not None else ""))
        if isinstance(v.type, TensorType):
            self.check_type_symbols(v.type, node, f"%{v.name}", where)

    def check_param(self, name: str, v: Value) -> None:
        if name not in self.g.param_data:
            return
        data = self.g.param_data[name]
        where = f"param %{name}"
        want = logical_type(v.type, v.sharding, getattr(self.g, "mesh", {}))  # sharded: the logical data
        try:
            got = type_of_data(data)
        except TypeError as e:
            if want.dtype.is_packed and self._packed_fits(data, want):
                return
            self.report("param-data", None, f"declared {want} but its data has no IR type: {e}", where)
            return
        if want.dtype.is_packed and got.dtype is not want.dtype and self._packed_fits(data, want):
            return
        if not (got.rank == want.rank and got.dtype is want.dtype
                and all(isinstance(d, int) and d == g for d, g in zip(want.shape, got.shape))):
            self.report("param-data", None, f"declared {want} but its data is {got}", where)

    @staticmethod
    def _packed_fits(data, want: TensorType) -> bool:
        """Packed i4/u4 data: unpacked ml_dtypes with the declared shape, or raw bytes two values per byte."""
        arr = np.asarray(data) if not hasattr(data, "detach") else None
        if arr is None or not want.is_static:
            return False
        if arr.dtype == want.dtype.numpy:
            return tuple(arr.shape) == want.shape
        n = int(np.prod(want.shape))
        return arr.dtype in (np.uint8, np.int8) and arr.size == (n * want.dtype.bits + 7) // 8

    # -- nodes -------------------------------------------------------------------------------------
    def check_node(self, n: Node) -> None:
        for i, o in enumerate(n.outputs):
            if isinstance(o, Value) and (o.producer is not n or o.index != i):
                prod = o.producer.describe() if isinstance(o.producer, Node) else repr(o.producer)
                self.report("producer-link", n, f"result {i} %{o.name} has producer {prod} and index {o.index}, "
                            f"not this node and index {i}")
        for i, v in enumerate(n.inputs):
            if not isinstance(v, Value):
                self.report("undefined-value", n, f"operand {i} is not a Value: {v!r}")
            elif v not in self.defined:
                self.report("undefined-value", n, self._undefined_why(v, i))
        self.check_op(n)
        for o in n.outputs:
            self.define(o, f"result %{getattr(o, 'name', o)}", n, None)

    def _undefined_why(self, v: Value, i: int) -> str:
        head = f"operand {i} %{v.name}"
        later = self.later.get(v)
        if later is not None:
            return f"{head} is used before its definition by {later.describe()} (SSA values must dominate uses)"
        if v.name in self.names:
            return (f"{head} is not a value of this graph: it is a different Value object from the "
                    f"{self.names[v.name]} of the same name")
        return f"{head} is not defined: not a graph input, a parameter or the result of an earlier node"

    def check_op(self, n: Node) -> None:
        try:
            opdef = get_op(n.op)
        except OpError as e:
            self.report("unknown-op", n, str(e))
            return
        ok = True
        problem = opdef.arity_error(len(n.inputs))
        if problem:
            self.report("arity", n, f"op '{n.op}' {problem}")
            ok = False
        attrs = {}
        for k in n.attrs:
            if k not in opdef.attrs:
                self.report("attr-unknown", n, f"op '{n.op}' has no attribute '{k}'; it takes "
                            f"{sorted(opdef.attrs) or 'none'}")
                ok = False
        for k, spec in opdef.attrs.items():
            if k in n.attrs:
                value = n.attrs[k]
            elif spec.default is not REQUIRED:
                value = spec.default
            else:
                self.report("attr-missing", n, f"op '{n.op}' requires attribute '{k}' ({spec.kind})")
                ok = False
                continue
            problem = spec.check(value)
            if problem:
                self.report("attr-kind", n, f"op '{n.op}' attribute '{k}' {problem}")
                ok = False
                continue
            attrs[k] = value = normalize_attr(spec.kind, value)
            if spec.kind in ("dim", "dims") and value is not None:
                used = set()
                for d in (value if spec.kind == "dims" else [value]):
                    used |= dim_symbols(d)
                missing = sorted(used - set(self.g.symbols))
                if missing:
                    self.report("undeclared-symbol", n, f"attribute '{k}' = {value} uses symbol(s) {missing} "
                                f"that are not declared in graph.symbols (declared: {sorted(self.g.symbols) or 'none'})")
        if not ok or not all(isinstance(v, Value) for v in n.inputs):
            return
        types = [v.type for v in n.inputs]
        try:
            out = opdef.infer(*types, **attrs)
            inferred = (out,) if isinstance(out, TensorType) else tuple(out)
        except Exception as e:  # type rules raise plain ValueErrors
            shown = ", ".join(str(t) for t in types)
            self.report("operand-type", n, f"op '{n.op}' rejects operand types ({shown})"
                        + (f" with attrs {_show_attrs(attrs)}" if attrs else "") + f": {e}")
            return
        if len(inferred) != len(n.outputs):
            self.report("result-count", n, f"op '{n.op}' produces {len(inferred)} result(s) here, "
                        f"the node declares {len(n.outputs)}")
            return
        for i, (o, t) in enumerate(zip(n.outputs, inferred)):
            declared = getattr(o, "type", None)
            if not isinstance(declared, TensorType) or not declared.same_as(t):
                self.report("result-type", n, f"result {i} %{getattr(o, 'name', o)}: declared {declared} "
                            f"but op '{n.op}' infers {t}")

    # -- outputs -----------------------------------------------------------------------------------
    def check_outputs(self) -> None:
        if not self.g.outputs:
            self.report("no-outputs", None, "the graph has no outputs", f"graph '{self.g.name}'")
        for i, v in enumerate(self.g.outputs):
            if not isinstance(v, Value) or v not in self.defined:
                name = f"%{v.name}" if isinstance(v, Value) else repr(v)
                self.report("output-undefined", None, f"output {i} {name} is not defined in the graph "
                            f"(not an input, a parameter or a node result of this graph)", f"graph '{self.g.name}'")


    # -- sharding ----------------------------------------------------------------------------------
    def check_sharding(self) -> None:
        g = self.g
        mesh = getattr(g, "mesh", {})
        for axis, size in mesh.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                self.report("mesh", None, f"mesh axis {axis!r} has size {size!r}; sizes are ints >= 1",
                            f"graph '{g.name}'")
        for v in self.defined:
            s = getattr(v, "sharding", None)
            if s is None:
                continue
            node = v.producer if isinstance(v.producer, Node) else None
            where = None if node is not None else f"%{v.name}"
            if mesh.get(s.axis, 1) == 1 and s.axis not in mesh:
                self.report("mesh", node, f"%{v.name} is {describe(s)} over mesh axis {s.axis!r}, which the graph "
                            f"does not declare (mesh: {mesh or 'none'})", where)
            elif s.is_split and isinstance(v.type, TensorType) and s.dim >= v.type.rank:
                self.report("mesh", node, f"%{v.name} is split on dim {s.dim} but has rank {v.type.rank}", where)
        for n in g.nodes:
            if n.op in COMM_OPS:
                self._check_comm(n, mesh)
                continue
            ins = [(i, v) for i, v in enumerate(n.inputs) if getattr(v, "sharding", None) is not None]
            for i, v in ins:
                if v.sharding.is_partial:
                    self.report("sharding", n, f"operand {i} %{v.name} is partial over {v.sharding.axis!r} (each rank "
                                f"holds a summand): reduce it first (dist.all_reduce or dist.reduce_scatter)")
            if ins:
                i, v = ins[0]
                for o in n.outputs:
                    if getattr(o, "sharding", None) is None:
                        self.report("sharding", n, f"operand {i} %{v.name} is {describe(v.sharding)} but result "
                                    f"%{o.name} is replicated: a sharded value reaches a replicated use only through a "
                                    f"collective (dist.all_gather for split, dist.all_reduce for partial)")
        for i, v in enumerate(g.outputs):
            s = getattr(v, "sharding", None)
            if s is not None and s.is_partial:
                self.report("sharding", None, f"output {i} %{v.name} is partial over {s.axis!r}: all-reduce it "
                            f"before it leaves the graph", f"graph '{g.name}'")

    def _check_comm(self, n: Node, mesh: dict) -> None:
        if not mesh:
            return  # a rank-local program (llmasos.parallel): its groups are the runtime's, not the graph's
        a = n.attrs
        axis = a.get("axis")
        size = mesh.get(axis, 1)
        if "parts" in a and a["parts"] != size:
            self.report("mesh", n, f"{n.op} has parts = {a['parts']} but mesh axis {axis!r} has {size} rank(s)")
            return
        if "peer" in a and not 0 <= a["peer"] < size:
            self.report("mesh", n, f"{n.op} names peer {a['peer']} but mesh axis {axis!r} has {size} rank(s)")
            return
        if n.op in ("dist.send", "dist.recv") or not n.inputs or not n.outputs:
            return
        x, y = n.inputs[0], n.outputs[0]
        sx, sy = getattr(x, "sharding", None), getattr(y, "sharding", None)
        if size == 1 and sx is None and sy is None:
            return  # a group of one: the identity
        want = {"dist.all_reduce": (("partial", None), None),
                "dist.all_gather": (("split", a.get("dim")), None),
                "dist.reduce_scatter": (("partial", None), ("split", a.get("dim"))),
                "dist.shard": (None, ("split", a.get("dim")))}[n.op]
        rank = x.type.rank if isinstance(x.type, TensorType) else 0

        def norm(d):
            return None if d is None else (d % rank if rank else 0)

        def matches(s, spec):
            if spec is None:
                return s is None
            return s is not None and s.kind == spec[0] and s.axis == axis and s.dim == norm(spec[1])

        def show(spec):
            if spec is None:
                return "replicated"
            return f"split({norm(spec[1])}, {axis})" if spec[0] == "split" else f"partial({axis})"
        if not matches(sx, want[0]):
            self.report("sharding", n, f"{n.op} over {axis!r} takes a {show(want[0])} operand, got %{x.name} "
                        f"{describe(sx)}")
        elif not matches(sy, want[1]):
            self.report("sharding", n, f"{n.op} over {axis!r} makes a {show(want[1])} result, but %{y.name} is "
                        f"declared {describe(sy)}")

    # -- use-lists ---------------------------------------------------------------------------------
    def check_uses(self) -> None:
        """Each operand slot of each node is in its value's use-list, and each use listed by a value of this
        graph is such a slot: O(operands)."""
        g = self.g
        for n in g.nodes:
            if not isinstance(n, Node):
                continue
            if n.graph is not g:
                where = "no graph" if n.graph is None else f"graph @{n.graph.name}"
                self.report("use-list", n, f"the node is in this graph's node list but attached to {where}, so "
                            f"its operands do not list it as a user")
                continue
            for i, v in enumerate(n.inputs):
                if isinstance(v, Value) and Use(n, i) not in v._uses:
                    self.report("use-list", n, f"operand {i} %{v.name} does not list this node as a user "
                                f"(a stale use-list)")
        for v in self.defined:
            for u in v._uses:
                node = u.node
                if node.graph is not g:
                    where = "is in no graph" if node.graph is None else f"is in graph @{node.graph.name}"
                    self.report("use-list", node, f"%{v.name} (of graph @{g.name}) lists this node, which {where}, "
                                f"as a user (operand {u.index})")
                elif u.index >= len(node.inputs) or node.inputs[u.index] is not v:
                    self.report("use-list", node, f"%{v.name} lists operand {u.index} of this node as a use, but the "
                                f"node does not read it there (a stale use-list)")


def _show_attrs(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in attrs.items() if not isinstance(v, np.ndarray)) + "}"
