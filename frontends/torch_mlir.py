"""torch-mlir frontend: nn.Module -> torch-mlir torch dialect -> LLMasOS Graph.

The second opinion next to the torch.export frontend: the model goes through ``torch.export``, torch-mlir's
FX importer and its torch-backend pipeline (``torch_mlir.fx.export_and_import(..., output_type="torch")``), and
the resulting ``func.func`` is walked op by op with the torch-mlir Python bindings (op table: ``mlir_ops``).

- Parameters and buffers reach MLIR as ``torch.vtensor.literal`` ops. An importer hook gives each literal a
  resource named after the tensor it holds, so the literal comes back as a graph parameter named by its
  state-dict key, with the torch tensor as data (tied weights become one parameter).
- Dynamic dims: torch names input sizes s0, s72...; the exported program says which input dim each symbol
  is and the Dim spec given to torch.export names that dim ("batch", "seq"), with torch's proven range.
  Every other symbolic size comes from the IR's own type rules and is checked against torch-mlir's
  ``torch.bind_symbolic_shape`` ops (when torch's sizes are affine; torch-mlir cannot write floor division).
  ``import_mlir`` on a module from elsewhere names symbols from the arguments' ``bind_symbolic_shape``.
- High-level ops (attention, linear, layer norm, ...) are kept whole through torch's decompositions and
  torch-mlir's pipeline (``KEEP_WHOLE``) so they map onto the IR's fused ops.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from typing import Optional

import numpy as np
import sympy
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map
from torch_mlir import fx as mlir_fx
from torch_mlir import ir as mlir_ir
from torch_mlir.extras.fx_decomp_util import get_decomposition_table
from torch_mlir.extras.fx_importer import FxImporterHooks, create_mlir_tensor_type

from llmasos.ir import Graph, TensorType, Value, sym
from llmasos.ir.opset.creation import MAX_INLINE_ELEMENTS
from llmasos.ir.torch_dtypes import torch_to_numpy
from llmasos.ir.types import dim_str, dims_equal

from .torch_export import batch_of_two, default_max_seq, tensor_spec
from .mlir_ops import (MLIR_CONVERTERS, ConvertContext, MlirImportError, UnsupportedMlirOpError, mlir_dtype,
                       parse_vtensor, register_mlir_converter)

__all__ = ["import_module", "export_to_mlir", "import_mlir", "register_mlir_converter", "MlirImportError",
           "UnsupportedMlirOpError", "KEEP_WHOLE", "MLIR_CONVERTERS"]

# torch ops kept whole: dropped from torch's decomposition table and marked legal for torch-mlir's pipeline.
KEEP_WHOLE = ("aten.scaled_dot_product_attention", "aten.linear", "aten.layer_norm", "aten.rms_norm",
              "aten.gelu", "aten.silu", "aten.softmax.int", "aten.log_softmax.int", "aten.embedding",
              "aten.matmul", "aten.addmm")
_INT64_MAX = 2 ** 63 - 1
_BLOB_PREFIX = "llmasos_literal_"


# -- export ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _decomposition_table_items():
    keep = set(KEEP_WHOLE)
    # torch-mlir's table decomposes attention to math that torch then cannot re-trace for GPT-2 (a view of a
    # non-contiguous tensor), so attention and the other fused ops stay whole.
    return tuple((k, v) for k, v in get_decomposition_table().items()
                 if str(k) not in keep and str(k).rsplit(".", 1)[0] not in keep)


def _bound_arguments(model, args, kwargs):
    fn = model.forward if hasattr(model, "forward") else model
    try:
        return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        out = {f"arg{i}": a for i, a in enumerate(args)}
        out.update(kwargs)
        return out


def _flat_tensor_inputs(bound: dict):
    """[(name, tensor)] of the tensor leaves of the inputs, in torch.export's order."""
    out = []
    for name, value in bound.items():
        leaves, _ = tree_flatten_with_path(value)
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                out.append((name + keystr(path).replace("[", "_").replace("]", "").replace("'", ""), leaf))
    return out


def _dim_names(bound: dict, spec) -> dict:
    """{flat input index: {dim: (name, min, max)}} for plain named Dims in a dynamic_shapes spec."""

    if spec is None:
        return {}
    if isinstance(spec, (list, tuple)):
        spec = dict(zip(bound, spec))
    out, i = {}, 0
    for name, value in bound.items():
        leaves, _ = tree_flatten(value)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        s = spec.get(name) if isinstance(spec, dict) else None
        # only a top-level tensor's spec is matched up; nested inputs keep torch's symbol names
        if len(tensors) == 1 and len(leaves) == 1 and s is not None:
            items = s.items() if isinstance(s, dict) else enumerate(s)
            dims = {}
            for d, dim in items:
                n = getattr(dim, "__name__", None)
                if dim is not None and isinstance(n, str) and n.isidentifier() and not hasattr(dim, "fn"):
                    dims[int(d)] = (n, getattr(dim, "min", None), getattr(dim, "max", None))
            if dims:
                out[i] = dims
        i += len(tensors)
    return out


def _replace_dims(spec, new: dict):
    """``spec`` with each Dim whose name is in ``new`` replaced by ``new[name]`` (a Dim, or None: static)."""
    if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
        return {d: new.get(getattr(v, "__name__", None), v) for d, v in spec.items()}
    if isinstance(spec, dict):
        return {k: _replace_dims(v, new) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_replace_dims(v, new) for v in spec)
    return spec


_VIOLATED_RE = re.compile(r"Constraints violated \(([^)]*)\)")
_FIX_RANGE_RE = re.compile(r"^\s*(\w+) = Dim\('(\w+)'(?:, min=(\d+))?(?:, max=(\d+))?\)\s*$", re.M)
_FIX_STATIC_RE = re.compile(r"^\s*(\w+) = (\d+)\s*$", re.M)


def _suggested_dims(message: str) -> dict:
    """torch's 'Suggested fixes' for automatic Dims: {name: narrower Dim or None (static)}."""
    m = _VIOLATED_RE.search(message)
    if not m:
        return {}
    names = {n.strip() for n in m.group(1).split(",")}
    out: dict = {}
    for n in names:
        if f"marked {n} as dynamic but your code specialized it to be a constant" in message:
            out[n] = None
    fixes = message.split("Suggested fixes:", 1)[1] if "Suggested fixes:" in message else ""
    for name, _, lo, hi in _FIX_RANGE_RE.findall(fixes):
        if name in names:
            out[name] = Dim(name, min=int(lo) if lo else None, max=int(hi) if hi else None)
    for name, _ in _FIX_STATIC_RE.findall(fixes):
        if name in names:
            out[name] = None
    return out


def _export(model, args, kwargs, spec, auto: bool):
    """torch.export.export; in "auto" mode torch's suggested fixes are taken (a feature dim becomes static,
    a range narrows to what the model supports)."""
    for _ in range(4):
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False), spec
        except torch._dynamo.exc.UserError as e:
            fixes = _suggested_dims(str(e)) if auto else {}
            if not fixes:
                raise
            spec = _replace_dims(spec, fixes)
    raise MlirImportError("torch.export kept rejecting the automatic dynamic shapes")


class _LiteralHooks:
    """FX importer hooks: each tensor literal gets a resource named ``llmasos_literal_<n>`` we can map back."""

    def __init__(self, names: dict):
        class Hooks(FxImporterHooks):
            def resolve_literal(hook, gni, literal, info):
                return self.resolve(gni, literal)

        self.hooks = Hooks()
        self.names = names          # id(tensor) -> state-dict / constant key
        self.blobs: dict = {}       # blob name -> (key or None, tensor)
        self._attrs: dict = {}      # id(tensor) -> the resource attribute, so a tied tensor is one blob

    def resolve(self, gni, literal):
        if not isinstance(literal, torch.Tensor) or literal.numel() <= 1:
            return None  # scalars become splat DenseElementsAttr, read back directly
        attr = self._attrs.get(id(literal))
        if attr is None:
            try:
                data = torch_to_numpy(literal)
            except Exception:  # no data (fake/meta tensors): let torch-mlir try its own path
                return None
            blob = f"{_BLOB_PREFIX}{len(self.blobs)}"
            attr = mlir_ir.DenseResourceElementsAttr.get_from_buffer(data, blob, create_mlir_tensor_type(literal))
            self.blobs[blob] = (self.names.get(id(literal)), literal)
            self._attrs[id(literal)] = attr
        op = mlir_ir.Operation.create("torch.vtensor.literal", results=[gni._cc.tensor_to_vtensor_type(literal)],
                                 attributes={"value": attr})
        return op.result


def export_to_mlir(model, args=(), kwargs=None, dynamic_shapes="auto", max_batch: int = 64,
                   max_seq: Optional[int] = None):
    """Export ``model`` through torch-mlir; returns (mlir module, import info for ``import_mlir``)."""

    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    kwargs = dict(kwargs or {})
    bound = _bound_arguments(model, args, kwargs)
    auto = isinstance(dynamic_shapes, str)
    if auto:
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes must be 'auto', None or a torch.export dynamic_shapes spec, "
                             f"got {dynamic_shapes!r}")

        args, kwargs = batch_of_two(args, kwargs)  # torch specialises an example size of 1
        bound = _bound_arguments(model, args, kwargs)
        batch = Dim("batch", min=1, max=max_batch)
        seq = Dim("seq", min=2, max=max_seq if max_seq is not None else default_max_seq(model))
        dynamic_shapes = {k: tree_map(lambda x: tensor_spec(x, batch, seq), v) for k, v in bound.items()}

    ep, dynamic_shapes = _export(model, args, kwargs, dynamic_shapes, auto)
    ep = ep.run_decompositions(dict(_decomposition_table_items()))
    # torch-mlir's frozen import looks buffers up in state_dict only; non-persistent ones live in constants
    for buf in ep.graph_signature.inputs_to_buffers.values():
        if buf not in ep.state_dict and buf in ep.constants:
            ep.state_dict[buf] = ep.constants[buf]
    names: dict = {}
    for key, t in list(ep.state_dict.items()) + list(ep.constants.items()):
        if isinstance(t, torch.Tensor):
            names.setdefault(id(t), key)
    inputs = _flat_tensor_inputs(bound)
    symbols, shapes = _ep_symbols(ep, _dim_names(bound, dynamic_shapes))
    hooks = _LiteralHooks(names)
    # torch-mlir cannot write floor/ceil divisions as affine maps; without them we skip the shape cross-check
    module = mlir_fx.export_and_import(ep, output_type="torch", import_symbolic_shape_expressions=_affine_only(ep),
                                  decomposition_table={}, hooks=hooks.hooks,
                                  backend_legal_ops=list(KEEP_WHOLE))
    info = {"input_names": [n for n, _ in inputs], "input_shapes": shapes, "symbols": symbols,
            "blobs": hooks.blobs}
    return module, info


def _bound(b) -> Optional[int]:
    try:
        return int(b) if b.is_Integer else None
    except (AttributeError, TypeError, ValueError):
        return None


def _ep_symbols(ep, dim_names: dict):
    """({torch symbol: (IR name, min, max)}, [user tensor input shapes over IR symbols]) of ``ep``."""

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n, spec in zip(placeholders, ep.graph_signature.input_specs)
            if spec.kind == InputKind.USER_INPUT]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    named: dict = {}
    for i, val in enumerate(vals):
        for d, size in enumerate(val.shape):
            e = size.node.expr if isinstance(size, torch.SymInt) else None
            user = dim_names.get(i, {}).get(d)
            if isinstance(e, sympy.Symbol) and e not in named and user and user[0] not in named.values():
                named[e] = user[0]
    symbols, taken = {}, set(named.values())
    for s, vr in ep.range_constraints.items():
        if not isinstance(s, sympy.Symbol):
            continue
        name = named.get(s)
        if name is None:  # a dim torch named itself (no Dim name given for it)
            name, k = str(s), 1
            while name in taken:
                name, k = f"{s}_{k}", k + 1
            taken.add(name)
        symbols[str(s)] = (name, _bound(vr.lower), _bound(vr.upper))
    ir = {s: sym(symbols[str(s)][0]) for s in ep.range_constraints if str(s) in symbols}
    shapes = []
    for val in vals:
        shape = []
        for size in val.shape:
            if isinstance(size, torch.SymInt):
                e = size.node.expr
                shape.append(int(e) if e.is_Integer else e.xreplace(ir))
            else:
                shape.append(int(size))
        shapes.append(tuple(shape))
    return symbols, shapes


_AFFINE_TYPES = (sympy.Symbol, sympy.Integer, sympy.Add, sympy.Mul, sympy.Pow, sympy.Mod)


def _affine_only(ep) -> bool:
    """Whether every symbolic size in ``ep`` is an expression torch-mlir can write as an affine map."""
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        for t in (val if isinstance(val, (list, tuple)) else [val]):
            if isinstance(t, torch.Tensor):
                for size in t.shape:
                    if isinstance(size, torch.SymInt) and not all(
                            isinstance(a, _AFFINE_TYPES) for a in sympy.preorder_traversal(size.node.expr)):
                        return False
    return True


# -- walking the MLIR ------------------------------------------------------------------------------------------
_FRAME_RE = re.compile(r'"([^"]+)":(\d+)(?::\d+)?')
_BLOB_RE = re.compile(r"dense_resource<([^>]+)>")


@functools.lru_cache(maxsize=None)
def _torch_dir() -> str:
    return os.path.dirname(torch.__file__) + os.sep


def _loc(op) -> Optional[str]:
    """'file.py:line' of the innermost frame outside torch (callsite locs list the innermost first)."""
    text = str(op.location)
    frames = _FRAME_RE.findall(text)
    for f, line in frames:
        if not f.startswith(_torch_dir()) and not f.startswith("torch/") and not f.startswith("<"):
            return f"{os.path.basename(f)}:{line}"
    return None


def _op_text(op) -> str:
    text = str(op).split(" loc(")[0].strip()
    return text if len(text) < 300 else text[:300] + "..."


def _affine_to_sympy(expr_text: str, symbols: list):
    """An affine expression of bind_symbolic_shape ('s1', 's0 + 1', 's0 * 64') over ``symbols``; None if
    it cannot be read."""
    if expr_text.lstrip("-").isdigit():
        return int(expr_text)
    m = re.fullmatch(r"s(\d+)", expr_text)
    if m:
        return symbols[int(m.group(1))]
    return _parse_affine(expr_text, tuple(symbols))


@functools.lru_cache(maxsize=4096)
def _parse_affine(text: str, symbols: tuple):
    if "ceildiv" in text or any(s is None for s in symbols):
        return None
    text = text.replace("floordiv", "//").replace("mod", "%")
    try:
        e = sympy.sympify(text, locals={f"s{i}": s for i, s in enumerate(symbols)})
    except (sympy.SympifyError, SyntaxError, TypeError):
        return None
    return int(e) if e.is_Integer else e


class _Importer:
    def __init__(self, module, info: dict, name: str):
        self.module, self.info = module, info
        self.graph = Graph(name)
        self.env: dict = {}
        self.params_by_key: dict = {}
        self.symbols: dict = {}    # torch symbol name -> IR sympy symbol
        self.sym_values: dict = {}  # MLIR value of a torch.symbolic_int -> torch symbol name

    def run(self) -> Graph:
        func = self._main_func()
        block = func.regions[0].blocks[0]
        ops = list(block.operations)
        self._collect_symbolic_ints(ops)
        if "symbols" in self.info:
            for tname, (name, lo, hi) in self.info["symbols"].items():
                self.symbols[tname] = sym(name)
                self.graph.add_symbol(name, lo, hi)
        else:
            self._bind_symbols(block, ops)
        self._add_inputs(block, ops)
        live = self._live(ops)
        for op in ops:
            name = op.operation.name
            if name == "func.return":
                self._outputs(op)
            elif name == "torch.bind_symbolic_shape":
                self._check_bind(op)
            elif op in live:
                self._convert(op)
        self._drop_unused_params()
        return self.graph

    def _main_func(self):
        funcs = [op for op in self.module.body.operations if op.operation.name == "func.func"]
        if len(funcs) != 1:
            raise MlirImportError(f"expected one func.func in the torch-mlir module, found {len(funcs)}")
        return funcs[0]

    # -- symbols and inputs -----------------------------------------------------------------------------
    def _binds(self, ops):
        for op in ops:
            if op.operation.name == "torch.bind_symbolic_shape":
                o = op.operation
                exprs = [str(e) for e in o.attributes["shape_expressions"].value.results]
                yield o.operands[0], [self.sym_values.get(v) for v in list(o.operands)[1:]], exprs

    def _collect_symbolic_ints(self, ops):
        self.ranges = {}
        for op in ops:
            if op.operation.name == "torch.symbolic_int":
                a = op.operation.attributes
                tname = a["symbol_name"].value
                self.sym_values[op.result] = tname
                self.ranges[tname] = (int(a["min_val"].value), int(a["max_val"].value))

    def _bind_symbols(self, block, ops):
        """Name torch's symbols from the args' bind_symbolic_shape ops and ``info['dim_names']``."""
        ranges = self.ranges
        args = list(block.arguments)
        dim_names = self.info.get("dim_names", {})
        bounds = {}
        for value, syms, exprs in self._binds(ops):
            if value not in args:
                continue
            i = args.index(value)
            for d, e in enumerate(exprs):
                m = re.fullmatch(r"s(\d+)", e)
                if not m or syms[int(m.group(1))] is None:
                    continue
                tname = syms[int(m.group(1))]
                if tname in self.symbols:
                    continue
                user = dim_names.get(i, {}).get(d)
                if user is not None and user[0] not in {s.name for s in self.symbols.values()}:
                    self.symbols[tname] = sym(user[0])
                    bounds[user[0]] = (user[1], user[2])
        for tname, (lo, hi) in ranges.items():
            if tname not in self.symbols:  # a dim torch named itself (no Dim name given)
                self.symbols[tname] = sym(tname)
            name = self.symbols[tname].name
            ulo, uhi = bounds.get(name, (None, None))
            lo = ulo if ulo is not None else lo
            hi = uhi if uhi is not None else (None if hi >= _INT64_MAX - 1 else hi)
            self.graph.add_symbol(name, lo, hi)

    def _symbolic_shapes(self, ops, values) -> dict:
        out = {}
        for value, syms, exprs in self._binds(ops):
            if value not in values:
                continue
            ir_syms = [self.symbols.get(s) if s else None for s in syms]
            out[value] = [_affine_to_sympy(e, ir_syms) for e in exprs]
        return out

    def _add_inputs(self, block, ops):
        names = self.info.get("input_names") or []
        args = list(block.arguments)
        if names and len(names) != len(args):
            raise MlirImportError(f"the torch-mlir function takes {len(args)} inputs but the model has "
                                  f"{len(names)} tensor inputs ({', '.join(names)})")
        known = self.info.get("input_shapes")
        shapes = self._symbolic_shapes(ops, args) if known is None else dict(zip(args, known))
        for i, a in enumerate(args):
            t = parse_vtensor(str(a.type))
            if t is None:
                raise MlirImportError(f"input {i} has type {a.type}; only tensor inputs are supported")
            dims, dt = t
            sym_dims = shapes.get(a)
            if sym_dims is not None and (len(sym_dims) != len(dims) or any(
                    d is not None and d != s for d, s in zip(dims, sym_dims))):
                raise MlirImportError(f"input {i}: torch-mlir's type {a.type} disagrees with the exported "
                                      f"shape {list(sym_dims)}")
            shape = []
            for d, size in enumerate(dims):
                if size is None:
                    expr = sym_dims[d] if sym_dims else None
                    if expr is None:
                        raise MlirImportError(f"input {i} dim {d} is dynamic but torch-mlir did not bind it "
                                              f"to a symbol")
                    size = expr
                shape.append(size)
            self.env[a] = self.graph.add_input(names[i] if names else f"input{i}",
                                               TensorType(tuple(shape), mlir_dtype(dt)))

    # -- liveness -----------------------------------------------------------------------------------------
    def _live(self, ops) -> set:
        live_values, live_ops = set(), set()
        for op in reversed(ops):
            o = op.operation
            if o.name == "func.return" or any(r in live_values for r in o.results):
                if o.name != "func.return":
                    live_ops.add(op)
                live_values.update(o.operands)
        return live_ops

    # -- conversion ----------------------------------------------------------------------------------------
    def _convert(self, op):
        o = op.operation
        name = o.name
        if name in ("torch.symbolic_int",):
            self.env[o.result] = self.symbols[self.sym_values[o.result]]
            return
        if name == "torch.constant.none":
            self.env[o.result] = None
            return
        if name.startswith("torch.constant."):
            self.env[o.result] = o.attributes["value"].value
            return
        loc = _loc(o)
        if name == "torch.vtensor.literal":
            self.env[o.result] = self._literal(o, loc)
            return
        fn = MLIR_CONVERTERS.get(name)
        if fn is None:
            raise UnsupportedMlirOpError(name, loc or str(o.location), _op_text(o))
        operands = []
        for v in o.operands:
            if v not in self.env:
                raise MlirImportError(f"{name} at {loc}: operand {v.get_name()} was not converted")
            operands.append(self.env[v])
        cx = ConvertContext(self.graph, o, name, loc)
        try:
            out = fn(cx, *operands)
            results = list(o.results)
            if len(results) == 1:
                out = (out,)
            elif not isinstance(out, tuple) or len(out) != len(results):
                raise cx.error(f"converter returned {out!r} for {len(results)} results")
            for r, v in zip(results, out):
                self._check_type(cx, r, v)
                self.env[r] = v
        except UnsupportedMlirOpError:
            raise
        except MlirImportError as e:
            if str(e).startswith(name):
                raise
            raise cx.error(f"{e}\n  {_op_text(o)}") from e
        except Exception as e:
            raise cx.error(f"{type(e).__name__}: {e}\n  {_op_text(o)}") from e

    def _check_type(self, cx, r, v):
        t = parse_vtensor(str(r.type))
        if t is None:
            return
        if not isinstance(v, Value):
            raise cx.error(f"converter returned {type(v).__name__} for a tensor result")
        dims, dt = t
        ok = v.type.dtype is mlir_dtype(dt) and v.type.rank == len(dims) and all(
            d is None or (isinstance(s, int) and s == d) for s, d in zip(v.type.shape, dims))
        if not ok:
            raise cx.error(f"converted to {v.type} but torch-mlir says {r.type}\n  {_op_text(cx.op)}")

    def _check_bind(self, op):
        o = op.operation
        v = self.env.get(o.operands[0])
        if not isinstance(v, Value):
            return
        syms = [self.symbols.get(self.sym_values.get(s)) for s in list(o.operands)[1:]]
        exprs = [_affine_to_sympy(str(e), syms) for e in o.attributes["shape_expressions"].value.results]
        for d, (have, want) in enumerate(zip(v.type.shape, exprs)):
            if want is not None and have != want and not dims_equal(have, want):
                raise MlirImportError(
                    f"symbolic shape mismatch at {_loc(o)}: %{v.name} is {v.type} but torch says dim {d} is "
                    f"{dim_str(want)} ({', '.join(map(str, exprs))})")

    def _literal(self, o, loc):
        attr = o.attributes["value"]
        t = parse_vtensor(str(o.results[0].type))
        m = _BLOB_RE.match(str(attr))
        if m:
            blob = m.group(1)
            if blob not in self.info["blobs"]:
                raise MlirImportError(f"literal at {loc} refers to resource {blob}, whose data the importer "
                                      f"does not hold")
            key, tensor = self.info["blobs"][blob]
            return self._param(key, tensor, blob)
        dtype = mlir_dtype(t[1])
        arr = np.asarray(attr)
        arr = np.broadcast_to(arr, t[0]) if arr.shape != t[0] else arr
        if arr.size <= MAX_INLINE_ELEMENTS:
            return self.graph.add_node("const", [], {"value": np.array(arr).astype(dtype.numpy), "dtype": dtype},
                                       loc=loc, name="const")
        return self._add_param("const", np.ascontiguousarray(arr).astype(dtype.numpy))

    def _param(self, key, tensor, blob):
        k = key or blob
        if k not in self.params_by_key:
            self.params_by_key[k] = self._add_param(key or "const", tensor.detach())
        return self.params_by_key[k]

    def _add_param(self, base, data):
        name, n = base, 0
        while True:
            try:
                return self.graph.add_param(name, data)
            except ValueError as e:  # the name is taken
                if "defined twice" not in str(e):
                    raise
                n += 1
                name = f"{base}_{n}"

    def _outputs(self, op):
        outs = []
        for i, v in enumerate(op.operation.operands):
            if parse_vtensor(str(v.type)) is None:
                continue  # non-tensor outputs are baked into the program
            val = self.env.get(v)
            if not isinstance(val, Value):
                raise MlirImportError(f"output {i} was not converted to a tensor")
            outs.append(val)
        self.graph.set_outputs(outs)

    def _drop_unused_params(self):
        used = {v for n in self.graph.nodes for v in n.inputs} | set(self.graph.outputs)
        for name, v in list(self.graph.params.items()):
            if v not in used:
                del self.graph.params[name]
                self.graph.param_data.pop(name, None)


def import_mlir(module, info: Optional[dict] = None, name: str = "main") -> Graph:
    """Convert a torch-dialect MLIR module (one func.func) into a Graph.

    ``info`` comes from ``export_to_mlir`` (input names, Dim names, literal data); without it inputs are
    named input0.., symbols keep torch's names, and only inline (non-resource) literals can be read.
    """
    return _Importer(module, info or {"blobs": {}}, name).run()


def import_module(model, args=(), kwargs=None, dynamic_shapes="auto", max_batch: int = 64,
                  max_seq: Optional[int] = None, name: Optional[str] = None) -> Graph:
    """Import ``model`` called on ``args``/``kwargs`` through torch-mlir as an LLMasOS Graph.

    ``dynamic_shapes="auto"``: dim 0 of every tensor input is ``Dim("batch", min=1, max=max_batch)``, dim 1 of
    inputs of rank >= 2 is ``Dim("seq", min=2, max=max_seq)`` (``max_seq``: the model config's max positions,
    else 2048); a Dim torch proves constant (e.g. an MLP's feature dim) is made static. ``None`` imports static
    shapes; anything else is passed to torch.export as its dynamic_shapes spec. Under "auto" a batch-1 example
    is traced as batch 2; an example seq of 1 makes seq static (torch specialises sizes 0 and 1).
    """
    module, info = export_to_mlir(model, args, kwargs, dynamic_shapes, max_batch, max_seq)
    return import_mlir(module, info, name or type(model).__name__)
