"""What the two FX-graph importers share (``torch_export``: ExportedProgram -> IR; ``fx_import``: a plain
ATen GraphModule -> IR): ``GraphImporter``, which converts FX nodes one at a time through the converter
registry (``frontends/aten``) into the IR graph it builds -- higher-order ops inlined, size arithmetic folded
into dims, each converter's result checked against the type torch computed -- and the helpers both use:
tensor and op tests, argument mapping, symbol names and bounds, tied-storage keys, and the source location
(module path, model-code line) of a node.
"""
from __future__ import annotations

import operator
import os
import re
from typing import Optional

import torch
import torch.fx

from llmasos.ir import Graph, TensorType, Value, sym
from llmasos.ir.torch_dtypes import dtype_from_torch
from llmasos.ir.types import dims_equal

from .aten import CONVERTERS, ConvertContext
from .errors import FrontendError, UnsupportedOpError

__all__ = ["GraphImporter", "inlined_hops", "is_tensor", "is_tensor_op", "callable_name", "map_args", "int_bound",
           "ir_ident", "storage_key", "module_path", "node_loc", "subgraph_traces"]


class GraphImporter:
    """The node-by-node conversion an importer runs after it has made the graph's inputs and parameters
    (``env``: fx.Node -> what it became) and its ``symbols`` (a SymbolTable); subclasses read their kind of
    graph (``run``)."""

    def __init__(self, name: str, traces: Optional[dict] = None):
        self.traces = traces or {}
        self.graph = Graph(name)
        self.env: dict = {}  # fx.Node -> Value | tuple of Values | dim | python constant | sub-GraphModule
        self.hops = inlined_hops()

    def _type(self, fake, what: str) -> TensorType:
        return TensorType(tuple(self.symbols.dim(d, what=f"a size of {what}") for d in fake.shape),
                          dtype_from_torch(fake.dtype))

    def _add_symbol(self, name: str, taken: set, ranges=None):
        """The IR symbol for a torch shape symbol: ``name`` made an identifier and unique among ``taken`` (which
        it joins), declared in the graph with the bounds of ``ranges`` (torch's ValueRanges; None: none)."""
        base = ir_ident(name)
        label, k = base, 1
        while label in taken:
            label, k = f"{base}_{k}", k + 1
        taken.add(label)
        self.graph.add_symbol(label, int_bound(ranges.lower) if ranges is not None else None,
                              int_bound(ranges.upper) if ranges is not None else None)
        return sym(label)

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
                and not is_tensor_op(target):
            return self._scalar(node, val)  # size arithmetic: a dim expression, not an IR node
        key = str(target) if isinstance(target, torch._ops.OpOverload) else callable_name(target)
        fn = CONVERTERS.get(key)
        if fn is None:
            raise UnsupportedOpError(key, node_name=node.name, loc=self._loc(node), module_path=module_path(node))
        ctx = ConvertContext(self.graph, self.symbols, node, self._loc(node), module_path(node))
        args = map_args(node.args, self.env)
        kwargs = map_args(node.kwargs, self.env)
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
        operands = map_args(tuple(node.args[2:]), self.env)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            raise FrontendError(f"%{node.name} = {callable_name(node.target)} passes {len(operands)} operands "
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
                out = tuple(map_args(tuple(n.args[0]), self.env))
            else:
                raise UnsupportedOpError(f"{n.op} {n.target}", node_name=n.name, loc=self._loc(n),
                                         module_path=module_path(n),
                                         reason="inside a higher-order op's sub-graph, this is not supported")
        return out

    def _loc(self, node) -> Optional[str]:
        return node_loc(node, self.traces)

    def _scalar(self, node, val):
        if isinstance(val, (torch.SymBool, bool)):
            return bool(val) if isinstance(val, bool) else None
        if isinstance(val, float):
            return val
        return self.symbols.dim(val, what=f"%{node.name} = {callable_name(node.target)}")

    def _check(self, ctx, key, out, val) -> None:
        """A converter's result must have the type torch computed: catches converter bugs at their source."""
        if val is None:
            return
        fakes = val if isinstance(val, (list, tuple)) else [val]
        outs = out if isinstance(out, (list, tuple)) else [out]
        if len(fakes) != len(outs):
            raise ctx.error(f"converter for {key} returned {len(outs)} results, torch has {len(fakes)}")
        for f, o in zip(fakes, outs):
            if not is_tensor(f):
                continue
            want = ctx.out_type() if f is val else ctx.type_of(f)
            if not isinstance(o, Value) or o.type.dtype != want.dtype or o.type.rank != want.rank or \
                    not all(a == b or dims_equal(a, b) for a, b in zip(o.type.shape, want.shape)):
                got = o.type if isinstance(o, Value) else repr(o)
                raise ctx.error(f"converter for {key} produced {got}, but torch's result is {want}")


def inlined_hops() -> tuple:
    """Higher-order ops whose sub-graph is converted in place: grad mode does not change inference."""
    return (torch.ops.higher_order.wrap_with_set_grad_enabled,)


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def is_tensor_op(target) -> bool:
    """Aten ops returning tensors; sym_size and friends return sizes and are folded into dims."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(isinstance(r.type, torch.TensorType) for r in target._schema.returns)


def callable_name(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def map_args(a, env):
    """A node's args/kwargs with each fx.Node replaced by what ``env`` maps it to (nested lists, tuples, dicts)."""
    if isinstance(a, torch.fx.Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(map_args(x, env) for x in a)
    if isinstance(a, dict):
        return {k: map_args(v, env) for k, v in a.items()}
    return a


def int_bound(b) -> Optional[int]:
    """A ShapeEnv value-range bound as an int; None when it is infinite or not a number."""
    try:
        if not b.is_finite:
            return None
        return int(b)
    except (TypeError, ValueError, AttributeError):
        return None


def ir_ident(name: str) -> str:
    """``name`` as an IR identifier (a symbol's name)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if name and (name[0].isalpha() or name[0] == "_") else f"d_{name}"


def storage_key(t):
    """What two tensors share when they are one tied weight (the same storage, offset, shape, strides, dtype)."""
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


def module_path(node) -> Optional[str]:
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


def subgraph_traces(ep) -> dict:
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
                out.setdefault((module_path(n), n.name), trace)
    return out


def node_loc(node, traces: Optional[dict] = None) -> Optional[str]:
    """'module.path (file.py:line)': the module that made the op and the model-code line that called it."""
    path = module_path(node)
    trace = node.meta.get("stack_trace")
    frame = _user_frame(trace)
    if frame is None and trace and traces:
        m = _GENERATED_RE.search(trace)
        if m and (path, m.group(1)) in traces:
            frame = _user_frame(traces[(path, m.group(1))])
    if path and frame:
        return f"{path} ({frame})"
    return path or frame
