"""Plain ATen FX GraphModule -> LLMasOS Graph (what torch.compile's backends receive after AOTAutograd).

``torch_export`` imports an ExportedProgram, whose signature says which placeholders are parameters and
whose range constraints bound the shape symbols. A GraphModule traced by AOTAutograd (or ``make_fx``) has
none of that: every placeholder is an argument, sizes may be SymInt placeholders, and symbols live in the
fake tensors' ShapeEnv. ``import_fx`` takes what the signature would have said as arguments:

    imp = import_fx(gm, constants={1: weight}, names={0: "input_ids", 1: "wte.weight"})
    imp.graph                 # tensor placeholders not in ``constants`` are graph inputs, in order
    imp.input_positions       # the placeholder index of each graph input
    imp.outputs               # per FX output: ("tensor", graph output index) | ("dim", IR dim) | ("const", v)
    imp.param_positions       # {"wte.weight": [1]}: which placeholders each parameter was made from

Nodes are converted by the same converter registry (``frontends/aten``) as torch.export's graphs, one FX
node at a time; placeholders and nodes need ``meta["val"]`` (fake tensors / SymInts), as AOTAutograd and
``make_fx`` leave them. Symbols: a symbol that is the whole of dim 0 of a tensor input is named ``batch``
and of dim 1 ``seq`` (the first input that has them, as torch_export names unnamed dims), others keep
torch's name; bounds come from the ShapeEnv's value ranges (an unbounded maximum stays unbounded).
SymInt placeholders become IR dims, not graph inputs: their value is read off the input shapes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import sympy
import torch
import torch.fx

from llmasos.ir import Graph, Value

from .aten.context import SymbolTable
from .errors import FrontendError, UnsupportedOpError
from .fx_common import GraphImporter, is_tensor, map_args, module_path, storage_key

__all__ = ["FxImported", "import_fx", "node_symbols"]


@dataclass
class FxImported:
    graph: Graph
    input_positions: list             # placeholder index of each graph input, in graph.inputs order
    outputs: list                     # per FX output: ("tensor", i) | ("dim", IR dim) | ("const", value)
    single: bool                      # the FX graph returns one value rather than a tuple of them
    symbols: dict = field(default_factory=dict)  # torch sympy symbol -> IR symbol
    param_positions: dict = field(default_factory=dict)  # parameter name -> the placeholder indices it holds


def import_fx(gm, constants: Optional[Mapping[int, Any]] = None, *, name: str = "main",
              names: Optional[Mapping[int, str]] = None) -> FxImported:
    """Convert the ATen FX graph ``gm`` to an LLMasOS Graph; raises UnsupportedOpError for an op with no
    converter and FrontendError for anything else it cannot express.

    ``constants``: placeholder index -> tensor: those placeholders become parameters holding the tensor
    (tied tensors -- one storage under two indices -- become one parameter). ``names``: placeholder index ->
    a readable name for its input or parameter (default: the placeholder's name).
    """
    return _FxImporter(gm, dict(constants or {}), name, dict(names or {})).run()


def node_symbols(vals) -> set:
    """The torch shape symbols free in fake tensors' sizes and SymInts (``vals`` an iterable of them)."""
    out: set = set()
    for v in vals:
        dims = [v] if isinstance(v, (torch.SymInt, torch.SymFloat)) else list(getattr(v, "shape", ()))
        for d in dims:
            e = getattr(getattr(d, "node", None), "expr", None)
            if e is not None:
                out |= set(e.free_symbols)
    return out


class _FxImporter(GraphImporter):
    def __init__(self, gm, constants: dict, name: str, names: dict):
        super().__init__(name)
        self.gm = gm
        self.constants = constants
        self.names = names

    def run(self) -> FxImported:
        g = self.graph
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for n in placeholders:
            if "val" not in n.meta:
                raise FrontendError(f"placeholder %{n.name} has no meta['val']: import_fx needs a graph traced "
                                    f"with fake tensors (AOTAutograd, make_fx)")
        self.symbols = self._symbol_table(placeholders)
        seen_data: dict = {}
        positions, param_positions = [], {}
        for i, node in enumerate(placeholders):
            val = node.meta["val"]
            label = self.names.get(i, node.name)
            if i in self.constants:
                self.env[node] = self._constant(label, self.constants[i], val, seen_data)
                param_positions.setdefault(self.env[node].name, []).append(i)
            elif is_tensor(val):
                self.env[node] = g.add_input(label, self._type(val, f"input {label}"))
                positions.append(i)
            elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                self.env[node] = self._scalar(node, val)
            else:  # a python int / float / bool / None the trace specialised on
                self.env[node] = val

        outputs, leaves, single = [], [], False
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                self.env[node] = self._convert(node)
            elif node.op == "get_attr":
                self.env[node] = self._get_attr(node, seen_data)
            elif node.op == "output":
                outputs, leaves, single = self._fx_outputs(node)
            elif node.op != "placeholder":
                raise UnsupportedOpError(f"{node.op} {node.target}", node_name=node.name, loc=self._loc(node),
                                         module_path=module_path(node),
                                         reason="only call_function nodes of an ATen graph are converted")
        g.set_outputs(outputs)
        self._drop_unused_params()
        param_positions = {k: v for k, v in param_positions.items() if k in g.params}
        return FxImported(g, positions, leaves, single, dict(self.symbols.mapping), param_positions)

    # -- symbols ----------------------------------------------------------------------------------------
    def _symbol_table(self, placeholders) -> SymbolTable:
        # a symbol that is a whole dim of a constant is that constant's size (make_fx traces weights with
        # symbolic sizes too): it is fixed, not an IR symbol
        fixed: dict = {}
        for i, data in self.constants.items():
            val = placeholders[i].meta["val"] if i < len(placeholders) else None
            for d, n in zip(getattr(val, "shape", ()), getattr(data, "shape", ())):
                e = getattr(getattr(d, "node", None), "expr", None)
                if isinstance(e, sympy.Symbol):
                    fixed[e] = sympy.Integer(int(n))
        vals = [n.meta["val"] for i, n in enumerate(placeholders) if i not in self.constants]
        free = node_symbols(vals) - set(fixed)
        names: dict = {}
        for v in vals:  # batch / seq for the leading whole dims, as torch_export guesses unnamed Dims
            if not isinstance(v, torch.Tensor):
                continue
            for k, d in enumerate(v.shape[:2]):
                e = getattr(getattr(d, "node", None), "expr", None)
                if e in free and e not in names and ("batch", "seq")[k] not in names.values():
                    names[e] = ("batch", "seq")[k]
        ranges = _value_ranges(vals)
        mapping, taken = dict(fixed), set()
        for s in sorted(free, key=str):
            mapping[s] = self._add_symbol(names.get(s, str(s)), taken, ranges.get(s))
        return SymbolTable(mapping)

    # -- parameters -------------------------------------------------------------------------------------
    def _constant(self, label: str, data, val, seen: dict) -> Value:
        if not isinstance(data, torch.Tensor):
            raise FrontendError(f"constant for placeholder {label} must be a tensor, got {type(data).__name__}")
        if is_tensor(val) and (val.dtype != data.dtype or val.dim() != data.dim() or
                                any(self.symbols.dim(d) != n for d, n in zip(val.shape, data.shape))):
            raise FrontendError(f"constant for placeholder {label} is {data.dtype}{list(data.shape)}, but the "
                                f"graph traced it as {val.dtype}{list(val.shape)}")
        data = data.detach()
        key = storage_key(data)
        if key in seen:  # tied weights: one parameter under its first name
            return seen[key]
        v = self.graph.add_param(label, data)
        seen[key] = v
        return v

    def _get_attr(self, node, seen: dict):
        obj = operator.attrgetter(node.target)(self.gm)
        if isinstance(obj, torch.fx.GraphModule) and node.users and all(u.target in self.hops for u in node.users):
            return obj
        if isinstance(obj, torch.Tensor):
            return self._constant(node.target, obj, node.meta.get("val"), seen)
        raise UnsupportedOpError(f"get_attr {node.target}", node_name=node.name, loc=self._loc(node),
                                 module_path=module_path(node),
                                 reason=f"a {type(obj).__name__} attribute, not a tensor")

    # -- outputs ----------------------------------------------------------------------------------------
    def _fx_outputs(self, node):
        result = node.args[0]
        single = not isinstance(result, (tuple, list))
        items = [result] if single else list(result)
        outputs, leaves, index = [], [], {}
        for item in items:
            value = self.env[item] if isinstance(item, torch.fx.Node) else map_args(item, self.env)
            if isinstance(value, Value):
                if value not in index:
                    index[value] = len(outputs)
                    outputs.append(value)
                leaves.append(("tensor", index[value]))
            elif isinstance(value, sympy.Expr) and not value.is_Number:
                leaves.append(("dim", value))
            elif isinstance(value, sympy.Expr):
                leaves.append(("const", int(value) if value.is_Integer else float(value)))
            elif isinstance(value, (tuple, list)) and any(isinstance(x, Value) for x in value):
                raise FrontendError(f"output {item} is a sequence of tensors; return them one by one")
            else:
                leaves.append(("const", value))
        return outputs, leaves, single


def _value_ranges(vals) -> dict:
    """torch symbol -> ValueRanges from the ShapeEnv of the first symbolic value in ``vals``."""
    for v in vals:
        dims = [v] if isinstance(v, (torch.SymInt, torch.SymFloat)) else list(getattr(v, "shape", ()))
        for d in dims:
            env = getattr(getattr(d, "node", None), "shape_env", None)
            if env is not None:
                return dict(getattr(env, "var_to_range", {}) or {})
    return {}
