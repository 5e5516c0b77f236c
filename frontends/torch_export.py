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
import linecache
import operator
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError, GuardOnDataDependentSymNode
from torch.utils._pytree import tree_map

from llmasos.ir import Graph, Value

from .aten import CONVERTERS, ConvertContext, register_converter  # noqa: F401  (re-exported)
from .aten.context import SymbolTable
from .aten.registry import resolve_op
from .errors import FrontendError, UnsupportedOpError
from .fx_common import (GraphImporter, callable_name, inlined_hops, is_tensor, is_tensor_op, module_path, storage_key,
                        subgraph_traces)

__all__ = ["Imported", "export", "import_exported_program", "import_module", "register_converter",
           "UnsupportedOpError", "FrontendError", "decomposition_table", "missing_converters", "KEEP_WHOLE"]

# High-level ops kept whole through decomposition (in addition to every op that has a converter).
KEEP_WHOLE = ("aten.linear.default", "aten.scaled_dot_product_attention.default", "aten.layer_norm.default",
              "aten.rms_norm.default", "aten.gelu.default", "aten.silu.default", "aten.softmax.int",
              "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
              "aten.embedding.default", "aten.matmul.default")

DEFAULT_MAX_SEQ = 2048     # max_seq of a model whose config names no positions
MAX_SEQ_CAP = 4096         # the default max_seq of a model with more positions (pass max_seq for more)


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
    of inputs of rank >= 2 as ``seq`` (2..max_seq), unless the model pins them; ``max_seq`` defaults to the
    model config's maximum positions capped at 4096 (``default_max_seq``), else 2048. ``None`` exports static
    shapes; anything else is passed to torch as a dynamic_shapes spec. Example inputs must not have size 1 in a
    dynamic dim (torch specialises 0 and 1). Any failure of torch.export is raised as a FrontendError
    (``export_error``: a data-dependent branch names the model's line).
    """
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    kwargs = dict(kwargs or {})
    try:
        if isinstance(dynamic_shapes, str):
            if dynamic_shapes != "auto":
                raise ValueError(f"dynamic_shapes must be 'auto', None or a torch.export dynamic_shapes spec, "
                                 f"got {dynamic_shapes!r}")
            # named Dims keep batch=1 in range (torch.export's AUTO hints assume sizes >= 2); where the model
            # pins a dim (an MLP's features on dim 1), the next spec lets torch specialise it instead
            if max_batch > 1:
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
    except (FrontendError, ValueError) as e:
        if isinstance(e, FrontendError) or not _from_torch(e):
            raise
        raise export_error(e) from e
    except Exception as e:  # noqa: BLE001 -- whatever the model's code or torch.export raised: said as ours
        raise export_error(e) from e


def _from_torch(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "frontends/torch_export.py" not in tb.tb_frame.f_code.co_filename


def model_line(e: BaseException) -> Optional[str]:
    """``file:line (code)`` of the innermost frame of ``e``'s traceback outside torch and llmasos: the model's
    own line that raised (or that torch was running when it gave up)."""
    found = None
    for fr in traceback.extract_tb(e.__traceback__):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or "/llmasos/" in f or "/frontends/" in f or f.startswith("<"):
            continue
        found = f"{fr.filename}:{fr.lineno} ({(fr.line or linecache.getline(fr.filename, fr.lineno)).strip()})"
    return found


def export_error(e: BaseException) -> FrontendError:
    """A torch.export failure as a FrontendError saying what to change."""
    where = model_line(e)
    at = f" at {where}" if where else ""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if isinstance(e, GuardOnDataDependentSymNode):
        return FrontendError(f"the model branches on tensor values{at}: torch.export traces one program for every "
                             f"input, so Python control flow may depend on shapes but not on data; use torch.cond "
                             f"(or torch.where) there, or make the branch depend on fixed inputs")
    if isinstance(e, (torch._dynamo.exc.UserError, ConstraintViolationError)):
        return FrontendError(f"torch.export cannot keep the requested dynamic shapes{at}: {first} (compile with "
                             f"dynamic_shapes=None for static shapes, or with max_batch/max_seq covering the example "
                             f"inputs)")
    return FrontendError(f"tracing the model with torch.export failed{at}: {type(e).__name__}: {first}")


def batch_of_two(args, kwargs):
    """Example inputs with batch 1 repeated to 2: torch.export specialises an example size of 1, and under
    "auto" every dim 0 is the batch, so tracing a batch of two describes the same program."""

    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
            return x.expand(2, *x.shape[1:]).clone()
        return x

    return tree_map(grow, args), tree_map(grow, kwargs)


def default_max_seq(model) -> int:
    """min(the model config's maximum positions, MAX_SEQ_CAP), else DEFAULT_MAX_SEQ: a long-context model
    (Qwen2's 32k, Mistral's 128k positions) is compiled for 4096 unless max_seq says more."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= 2:
            return min(v, MAX_SEQ_CAP)
    return DEFAULT_MAX_SEQ


def auto_dynamic_shapes(model, args: tuple, kwargs: dict, max_batch: int = 64, max_seq: Optional[int] = None,
                        seq_hint: str = "named"):
    """The "auto" spec: batch on dim 0 and seq on dim 1 of every tensor input, keyed by forward's parameters.

    seq_hint="named" makes dim 1 ``Dim("seq")`` (export fails if the model pins it); "auto" makes it a
    ``Dim.AUTO`` hint that torch may specialise.
    """

    max_seq = max_seq if max_seq is not None else default_max_seq(model)
    batch = Dim("batch", min=1, max=max_batch) if max_batch > 1 else None     # a Dim needs min < max
    if max_seq <= 2:
        seq = None
    else:
        seq = Dim("seq", min=2, max=max_seq) if seq_hint == "named" else Dim.AUTO(min=2, max=max_seq)

    fn = model.forward if isinstance(model, torch.nn.Module) else model
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return {name: tree_map(lambda x: tensor_spec(x, batch, seq), value) for name, value in bound.arguments.items()}


def tensor_spec(x, batch, seq):
    """The "auto" dims of one input: batch on dim 0, seq on dim 1 of rank >= 2 tensors, nothing otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = {k: d for k, d in ((0, batch), (1, seq if x.dim() >= 2 else None)) if d is not None}
    return dims or None


def decomposition_table() -> dict:
    """torch's default decompositions minus the ops we convert whole."""
    table = torch.export.default_decompositions()
    keep = set(KEEP_WHOLE) | set(CONVERTERS)
    for name in keep:
        try:
            table.pop(resolve_op(name), None)
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
    traces = subgraph_traces(ep)
    ep = ep.run_decompositions(decomposition_table())
    imp = _Importer(ep, name or "main", traces).run()
    imp.decomposed = True
    return imp


def missing_converters(ep) -> list:
    """The ops of ``ep`` (sub-graphs of inlined higher-order ops included) the importer cannot convert as they
    stand, by registry key; in-place ops count as missing, since converters assume value semantics."""
    return sorted(set(_missing(ep.graph_module, inlined_hops())))


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
                and not is_tensor_op(target):
            continue  # folded into dims by GraphImporter._scalar
        is_op = isinstance(target, torch._ops.OpOverload)
        key = str(target) if is_op else callable_name(target)
        if key not in CONVERTERS or (is_op and target._schema.is_mutable):
            out.append(key)
    return out


class _Importer(GraphImporter):
    """An ExportedProgram -> Imported: its signature says which placeholders are inputs and parameters, its
    range constraints bound the symbols."""

    def __init__(self, ep, name: str, traces: Optional[dict] = None):
        super().__init__(name, traces)
        self.ep = ep

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
                if is_tensor(val):
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
                                         module_path=module_path(node),
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
        # one IR symbol per Dim: torch 2.13 loses the equality of inputs sharing a Dim whose range is [1, 2]
        # (each gets its own symbol, which then "do not broadcast"), so symbols of one Dim name are merged,
        # with the intersection of their bounds
        by_dim: dict = {}
        for s, vr in self.ep.range_constraints.items():
            if isinstance(s, sympy.Symbol):
                by_dim.setdefault(names.get(s, s), []).append((s, vr))
        mapping, taken = {}, set()
        for key, group in by_dim.items():
            vr = group[0][1]
            for _, other in group[1:]:
                vr = vr & other
            label = self._add_symbol(key if isinstance(key, str) else str(key), taken, vr)
            for s, _ in group:
                mapping[s] = label
        return SymbolTable(mapping)

    # -- parameters -------------------------------------------------------------------------------------
    def _param(self, target: str, seen: dict) -> Value:
        ep = self.ep
        if target in ep.state_dict:
            data = ep.state_dict[target]
        elif target in ep.constants:
            data = ep.constants[target]
        else:
            raise FrontendError(f"no data for parameter/buffer/constant '{target}' in the ExportedProgram")
        key = storage_key(data)
        if key in seen:  # tied weights (GPT-2's lm_head and wte): one param under its first name
            return seen[key]
        v = self.graph.add_param(target, data)
        seen[key] = v
        return v


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
def _shape_env(nodes):
    for n in nodes:
        for d in getattr(n.meta.get("val"), "shape", ()):
            se = getattr(getattr(d, "node", None), "shape_env", None)
            if se is not None:
                return se
    return None
