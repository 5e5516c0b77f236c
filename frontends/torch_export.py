"""torch.export frontend: nn.Module / ExportedProgram -> LLMasOS Graph.

When every op of the exported (training-IR) program has a converter, it is converted as it stands: torch's
``run_decompositions`` re-traces the whole program and dominates import time on deep models. Otherwise the
program is decomposed to core ATen except the high-level ops the IR keeps whole (linear, attention, norms,
softmax, embedding, ... and every op with a registered converter) and converted from there. Each FX node is
converted by the converter registered for its op overload (see ``frontends/aten``). Input sizes stay symbolic: torch's
shape symbols are renamed after their ``torch.export.Dim`` names (``batch``, ``seq``), with the bounds torch
proved recorded in ``Graph.symbols``.
"""
from __future__ import annotations

import inspect
import operator
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
import torch.fx
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils._pytree import tree_map

from llmasos.ir import Graph, TensorType, Value, sym
from llmasos.ir.torch_dtypes import dtype_from_torch
from llmasos.ir.types import dims_equal

from .aten import CONVERTERS, ConvertContext, register_converter  # noqa: F401  (re-exported)
from .aten.context import SymbolTable
from .aten.registry import _resolve
from .errors import FrontendError, UnsupportedOpError

__all__ = ["Imported", "export", "import_exported_program", "import_module", "register_converter",
           "UnsupportedOpError", "FrontendError", "decomposition_table", "missing_converters", "KEEP_WHOLE"]

# High-level ops kept whole through decomposition (in addition to every op that has a converter).
KEEP_WHOLE = ("aten.linear.default", "aten.scaled_dot_product_attention.default", "aten.layer_norm.default",
              "aten.rms_norm.default", "aten.gelu.default", "aten.silu.default", "aten.softmax.int",
              "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
              "aten.embedding.default", "aten.matmul.default")

DEFAULT_MAX_SEQ = 2048


@dataclass
class Imported:
    graph: Graph            # inputs = user tensor inputs in order; outputs = user tensor outputs in order
    in_spec: Any            # TreeSpec of (args, kwargs), ep.call_spec.in_spec
    out_spec: Any           # TreeSpec of the model's output, ep.call_spec.out_spec
    out_leaves: list        # per flattened output leaf: index into graph.outputs, or ('const', value)
    input_names: list       # user input names, in graph.inputs order
    exported: Any           # the ExportedProgram the graph was converted from
    decomposed: bool = True  # whether that is the run_decompositions of the input (False: converted as exported)


# -- exporting ---------------------------------------------------------------------------------------------
def export(model, args=(), kwargs=None, dynamic_shapes="auto", max_batch: int = 64, max_seq: Optional[int] = None,
           strict: bool = False):
    """torch.export.export with LLMasOS's default dynamic shapes.

    ``dynamic_shapes="auto"``: dim 0 of every tensor input may be dynamic as ``batch`` (1..max_batch) and dim 1
    of inputs of rank >= 2 as ``seq`` (2..max_seq), unless the model pins them; ``max_seq`` defaults to the model config's
    maximum positions, else 2048. ``None`` exports static shapes; anything else is passed to torch as a
    dynamic_shapes spec. Example inputs must not have size 1 in a dynamic dim (torch specialises 0 and 1).
    """
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    kwargs = dict(kwargs or {})
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes must be 'auto', None or a torch.export dynamic_shapes spec, "
                             f"got {dynamic_shapes!r}")
        # named Dims keep batch=1 in range (torch.export's AUTO hints assume sizes >= 2); where the model
        # pins a dim (an MLP's features on dim 1), the next spec lets torch specialise it instead
        args, kwargs = batch_of_two(args, kwargs)
        err = None
        for seq_hint in ("named", "auto"):
            spec = auto_dynamic_shapes(model, args, kwargs, max_batch, max_seq, seq_hint=seq_hint)
            try:
                return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=strict)
            except torch._dynamo.exc.UserError as e:
                err = e
        raise err
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)


def batch_of_two(args, kwargs):
    """Example inputs with batch 1 repeated to 2: torch.export specialises an example size of 1, and under
    "auto" every dim 0 is the batch, so tracing a batch of two describes the same program."""

    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
            return x.expand(2, *x.shape[1:]).clone()
        return x

    return tree_map(grow, args), tree_map(grow, kwargs)


def default_max_seq(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= 2:
            return v
    return DEFAULT_MAX_SEQ


def auto_dynamic_shapes(model, args: tuple, kwargs: dict, max_batch: int = 64, max_seq: Optional[int] = None,
                        seq_hint: str = "named"):
    """The "auto" spec: batch on dim 0 and seq on dim 1 of every tensor input, keyed by forward's parameters.

    seq_hint="named" makes dim 1 ``Dim("seq")`` (export fails if the model pins it); "auto" makes it a
    ``Dim.AUTO`` hint that torch may specialise.
    """

    max_seq = max_seq if max_seq is not None else default_max_seq(model)
    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("seq", min=2, max=max_seq) if seq_hint == "named" else Dim.AUTO(min=2, max=max_seq)

    fn = model.forward if isinstance(model, torch.nn.Module) else model
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return {name: tree_map(lambda x: tensor_spec(x, batch, seq), value) for name, value in bound.arguments.items()}


def tensor_spec(x, batch, seq):
    """The "auto" dims of one input: batch on dim 0, seq on dim 1 of rank >= 2 tensors, nothing otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return {0: batch, 1: seq} if x.dim() >= 2 else {0: batch}


def decomposition_table() -> dict:
    """torch's default decompositions minus the ops we convert whole."""
    table = torch.export.default_decompositions()
    keep = set(KEEP_WHOLE) | set(CONVERTERS)
    for name in keep:
        try:
            table.pop(_resolve(name), None)
        except ValueError:
            pass
    return table


def import_module(model, args=(), kwargs=None, dynamic_shapes="auto", max_batch: int = 64,
                  max_seq: Optional[int] = None, name: Optional[str] = None) -> Imported:
    """Export ``model`` (see ``export``) and import it as an LLMasOS graph named after its class."""
    ep = export(model, args, kwargs, dynamic_shapes=dynamic_shapes, max_batch=max_batch, max_seq=max_seq)
    return import_exported_program(ep, name=name or type(model).__name__)


# -- importing ---------------------------------------------------------------------------------------------
def import_exported_program(ep, name: Optional[str] = None, decompose: Optional[bool] = None) -> Imported:
    """Convert ``ep`` to an LLMasOS Graph; raises UnsupportedOpError for ops with no converter.

    ``decompose=None`` converts ``ep`` directly when every op in it has a converter (``missing_converters``
    is empty) and decomposes it first otherwise, or when the direct conversion fails; True/False force
    one path.
    """
    if decompose is None:
        decompose = bool(missing_converters(ep))
        if not decompose:
            try:
                return _Importer(ep, name or "main").run()
            except FrontendError:
                # a converter written for core ATen that trips on a pre-decomposition spelling: the
                # decomposed program gives the result (or the error) the frontend always gave
                decompose = True
    if not decompose:
        return _Importer(ep, name or "main").run()
    traces = _subgraph_traces(ep)
    ep = ep.run_decompositions(decomposition_table())
    imp = _Importer(ep, name or "main", traces).run()
    imp.decomposed = True
    return imp


def _inlined_hops() -> tuple:
    """Higher-order ops whose sub-graph is converted in place: grad mode does not change inference."""
    return (torch.ops.higher_order.wrap_with_set_grad_enabled,)


def missing_converters(ep) -> list:
    """The ops of ``ep`` (sub-graphs of inlined higher-order ops included) the importer cannot convert as they
    stand, by registry key; in-place ops count as missing, since converters assume value semantics."""
    return sorted(set(_missing(ep.graph_module, _inlined_hops())))


def _missing(gm, hops) -> list:
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if not node.users or any(u.target not in hops for u in node.users):
                out.append(f"get_attr {node.target}")
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            continue
        if target in hops:
            out += _missing(gm.get_submodule(node.args[1].target), hops)
            continue
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool)) \
                and not _is_tensor_op(target):
            continue  # folded into dims by _Importer._scalar
        is_op = isinstance(target, torch._ops.OpOverload)
        key = str(target) if is_op else _callable_name(target)
        if key not in CONVERTERS or (is_op and target._schema.is_mutable):
            out.append(key)
    return out


class _Importer:
    def __init__(self, ep, name: str, traces: Optional[dict] = None):
        self.ep = ep
        self.traces = traces or {}
        self.graph = Graph(name)
        self.env: dict = {}  # fx.Node -> Value | tuple of Values | dim | python constant | sub-GraphModule
        self.hops = _inlined_hops()

    def run(self) -> Imported:
        ep, g = self.ep, self.graph
        placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
        specs = ep.graph_signature.input_specs
        user = [n for n, s in zip(placeholders, specs) if s.kind == InputKind.USER_INPUT]
        self.symbols = self._symbol_table(user)

        input_names, seen_data = [], {}
        for node, spec in zip(placeholders, specs):
            val = node.meta.get("val")
            if spec.kind == InputKind.USER_INPUT:
                if _is_tensor(val):
                    self.env[node] = g.add_input(node.name, self._type(val, f"input {node.name}"))
                    input_names.append(self.env[node].name)
                else:  # non-tensor inputs are baked into the program by torch.export
                    self.env[node] = getattr(spec.arg, "value", val)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                self.env[node] = self._param(spec.target, seen_data)
            else:
                raise FrontendError(f"input %{node.name} of kind {spec.kind.name} ({spec.target}) is not supported")

        for node in ep.graph.nodes:
            if node.op == "call_function":
                self.env[node] = self._convert(node)
            elif node.op == "get_attr" and node.users and all(u.target in self.hops for u in node.users):
                self.env[node] = ep.graph_module.get_submodule(node.target)
            elif node.op == "get_attr":
                raise UnsupportedOpError(f"get_attr {node.target}", node_name=node.name, loc=self._loc(node),
                                         module_path=_module_path(node),
                                         reason="sub-programs (higher-order ops) are not supported")
            elif node.op == "output":
                outputs, out_leaves = self._outputs(node)
        g.set_outputs(outputs)
        self._drop_unused_params()
        return Imported(g, ep.call_spec.in_spec, ep.call_spec.out_spec, out_leaves, input_names, ep, False)

    # -- symbols ----------------------------------------------------------------------------------------
    def _symbol_table(self, user_inputs) -> SymbolTable:
        """torch symbols -> IR symbols named by their Dim names; bounds from ep.range_constraints."""
        names: dict = {}
        shape_env = _shape_env(user_inputs)
        if shape_env is not None:
            debug = getattr(shape_env, "source_name_to_debug_name", {}) or {}
            for s, sources in getattr(shape_env, "var_to_sources", {}).items():
                for src in sources:
                    n = src.name() if callable(src.name) else src.name
                    if n in debug:
                        names[s] = debug[n]
                        break
        # an ExportedProgram from elsewhere may lack Dim names: leading dims read as batch, then seq
        for node in user_inputs:
            val = node.meta.get("val")
            for i, d in enumerate(getattr(val, "shape", ())[:2]):
                e = getattr(getattr(d, "node", None), "expr", None)
                if isinstance(e, sympy.Symbol) and e not in names:
                    guess = ("batch", "seq")[i]
                    if guess not in names.values():
                        names[e] = guess
        mapping, taken = {}, set()
        for s, vr in self.ep.range_constraints.items():
            if not isinstance(s, sympy.Symbol):
                continue
            base = _ident(names.get(s, str(s)))
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            mapping[s] = sym(name)
            self.graph.add_symbol(name, _bound(vr.lower), _bound(vr.upper))
        return SymbolTable(mapping)

    def _type(self, fake, what: str) -> TensorType:
        return TensorType(tuple(self.symbols.dim(d, what=f"a size of {what}") for d in fake.shape),
                          dtype_from_torch(fake.dtype))

    # -- parameters -------------------------------------------------------------------------------------
    def _param(self, target: str, seen: dict) -> Value:
        ep = self.ep
        if target in ep.state_dict:
            data = ep.state_dict[target]
        elif target in ep.constants:
            data = ep.constants[target]
        else:
            raise FrontendError(f"no data for parameter/buffer/constant '{target}' in the ExportedProgram")
        key = _storage_key(data)
        if key in seen:  # tied weights (GPT-2's lm_head and wte): one param under its first name
            return seen[key]
        v = self.graph.add_param(target, data)
        seen[key] = v
        return v

    def _drop_unused_params(self) -> None:
        used = {v for n in self.graph.nodes for v in n.inputs} | set(self.graph.outputs)
        for name, v in list(self.graph.params.items()):
            if v not in used:
                del self.graph.params[name]
                self.graph.param_data.pop(name, None)

    # -- nodes ------------------------------------------------------------------------------------------
    def _convert(self, node):
        target = node.target
        if target is operator.getitem:
            seq, i = self.env[node.args[0]], node.args[1]
            return seq[i]
        if target in self.hops:
            return self._inline(node)
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool)) \
                and not _is_tensor_op(target):
            return self._scalar(node, val)  # size arithmetic: a dim expression, not an IR node
        key = str(target) if isinstance(target, torch._ops.OpOverload) else _callable_name(target)
        fn = CONVERTERS.get(key)
        if fn is None:
            raise UnsupportedOpError(key, node_name=node.name, loc=self._loc(node), module_path=_module_path(node))
        ctx = ConvertContext(self.graph, self.symbols, node, self._loc(node), _module_path(node))
        args = _map_args(node.args, self.env)
        kwargs = _map_args(node.kwargs, self.env)
        try:
            out = fn(ctx, *args, **kwargs)
        except FrontendError:
            raise
        except Exception as e:
            where = f" at {ctx.loc}" if ctx.loc else ""
            raise FrontendError(f"cannot convert %{node.name} = {key}{where}: {type(e).__name__}: {e}") from e
        self._check(ctx, key, out, val)
        if isinstance(out, Value) and out.producer is not None and out.producer in ctx.emitted:
            out.name = self.graph.fresh_name(node.name)  # the IR value reads like the torch node it replaces
        return out

    def _inline(self, node) -> tuple:
        """A higher-order op's sub-graph converted in place: its placeholders take the op's operands, its
        outputs are the op's results (read by getitem nodes)."""
        sub = self.env[node.args[1]]
        operands = _map_args(tuple(node.args[2:]), self.env)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            raise FrontendError(f"%{node.name} = {_callable_name(node.target)} passes {len(operands)} operands "
                                f"to a sub-graph of {len(placeholders)} inputs")
        out = ()
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                self.env[n] = operands[placeholders.index(n)]
            elif n.op == "call_function":
                self.env[n] = self._convert(n)
            elif n.op == "get_attr" and n.users and all(u.target in self.hops for u in n.users):
                self.env[n] = sub.get_submodule(n.target)
            elif n.op == "output":
                out = tuple(_map_args(tuple(n.args[0]), self.env))
            else:
                raise UnsupportedOpError(f"{n.op} {n.target}", node_name=n.name, loc=self._loc(n),
                                         module_path=_module_path(n),
                                         reason="inside a higher-order op's sub-graph, this is not supported")
        return out

    def _loc(self, node) -> Optional[str]:
        return _loc(node, self.traces)

    def _scalar(self, node, val):
        if isinstance(val, (torch.SymBool, bool)):
            return bool(val) if isinstance(val, bool) else None
        if isinstance(val, float):
            return val
        return self.symbols.dim(val, what=f"%{node.name} = {_callable_name(node.target)}")

    def _check(self, ctx, key, out, val) -> None:
        """A converter's result must have the type torch computed: catches converter bugs at their source."""
        if val is None:
            return
        fakes = val if isinstance(val, (list, tuple)) else [val]
        outs = out if isinstance(out, (list, tuple)) else [out]
        if len(fakes) != len(outs):
            raise ctx.error(f"converter for {key} returned {len(outs)} results, torch has {len(fakes)}")
        for f, o in zip(fakes, outs):
            if not _is_tensor(f):
                continue
            want = ctx.out_type() if f is val else ctx.type_of(f)
            if not isinstance(o, Value) or o.type.dtype != want.dtype or o.type.rank != want.rank or \
                    not all(a == b or dims_equal(a, b) for a, b in zip(o.type.shape, want.shape)):
                got = o.type if isinstance(o, Value) else repr(o)
                raise ctx.error(f"converter for {key} produced {got}, but torch's result is {want}")

    def _outputs(self, node):
        outputs, leaves, index = [], [], {}
        results = node.args[0]
        for spec, arg in zip(self.ep.graph_signature.output_specs, results):
            if spec.kind != OutputKind.USER_OUTPUT:
                raise FrontendError(f"output {spec.target or spec.arg} of kind {spec.kind.name} is not supported "
                                    f"(the model mutates a buffer or input in place)")
            if isinstance(spec.arg, TensorArgument):
                v = self.env[arg]
                if v not in index:
                    index[v] = len(outputs)
                    outputs.append(v)
                leaves.append(index[v])
            else:
                value = self.env[arg] if hasattr(arg, "op") else getattr(spec.arg, "value", arg)
                leaves.append(("const", value))
        return outputs, leaves


# -- helpers ------------------------------------------------------------------------------------------------
def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _is_tensor_op(target) -> bool:
    """Aten ops returning tensors; sym_size and friends return sizes and are folded into dims."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(isinstance(r.type, torch.TensorType) for r in target._schema.returns)


def _callable_name(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _map_args(a, env):
    if isinstance(a, torch.fx.Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_map_args(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _map_args(v, env) for k, v in a.items()}
    return a


def _shape_env(nodes):
    for n in nodes:
        for d in getattr(n.meta.get("val"), "shape", ()):
            se = getattr(getattr(d, "node", None), "shape_env", None)
            if se is not None:
                return se
    return None


def _bound(b) -> Optional[int]:
    try:
        if not b.is_finite:
            return None
        return int(b)
    except (TypeError, ValueError, AttributeError):
        return None


def _ident(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if name and (name[0].isalpha() or name[0] == "_") else f"d_{name}"


def _storage_key(t):
    try:
        if t.numel() > 0:
            return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
    except Exception:  # tensors without storage (fake, meta)
        pass
    return ("id", id(t))


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in ')


def _torch_dir() -> str:
    return os.path.dirname(torch.__file__) + os.sep


def _user_frame(trace: Optional[str]) -> Optional[str]:
    """'file.py:line' of the innermost frame outside torch itself (the model code that made the op)."""
    if not trace:
        return None
    tdir = _torch_dir()
    frames = [(f, int(line)) for f, line in _FRAME_RE.findall(trace)
              if not f.startswith("<") and not f.startswith(tdir) and not f.startswith("torch/")]
    if not frames:
        return None
    f, line = frames[-1]
    return f"{os.path.basename(f)}:{line}"


def _module_path(node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):
        return None
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # torch sometimes writes submodules of ModuleLists as getattr(L['self'].layers, '0'); use the dotted name
    path = re.sub(r"getattr\((.*?), '([^']*)'\)", r"\1.\2", path)
    path = re.sub(r"L\['self'\]\.?|L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


_GENERATED_RE = re.compile(r'File "<eval_with_key>[^"]*", line \d+, in \w+\n\s*(\w+) = ')


def _subgraph_traces(ep) -> dict:
    """Stack traces of the nodes inside higher-order-op sub-graphs (torch.no_grad or autocast regions),
    keyed by (module path, node name). Decomposition inlines those regions and leaves their nodes pointing
    at generated code, so their locations are recovered from here."""
    out: dict = {}
    for sub_name, gm in ep.graph_module.named_modules():
        if not sub_name or not isinstance(gm, torch.fx.GraphModule):
            continue
        for n in gm.graph.nodes:
            trace = n.meta.get("stack_trace")
            if trace and _user_frame(trace):
                out.setdefault((_module_path(n), n.name), trace)
    return out


def _loc(node, traces: Optional[dict] = None) -> Optional[str]:
    """'module.path (file.py:line)': the module that made the op and the model-code line that called it."""
    path = _module_path(node)
    trace = node.meta.get("stack_trace")
    frame = _user_frame(trace)
    if frame is None and trace and traces:
        m = _GENERATED_RE.search(trace)
        if m and (path, m.group(1)) in traces:
            frame = _user_frame(traces[(path, m.group(1))])
    if path and frame:
        return f"{path} ({frame})"
    return path or frame
