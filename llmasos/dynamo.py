"""``torch.compile(model, backend="llmasos")``: a TorchDynamo backend that compiles with LLMasOS.

Registered through the ``torch_dynamo_backends`` entry-point group (pyproject.toml), so torch finds it by
name once LLMasOS is installed, without importing it first::

    fast = torch.compile(model, backend="llmasos", options={"target": "cpu", "passes": "fuse"})
    with torch.no_grad():
        logits = fast(ids).logits

How a graph flows. Dynamo hands ``backend`` a torch-level FX graph whose parameters are placeholders.
AOTAutograd (``torch._dynamo.backends.common.aot_autograd``, inference only) lowers it to a functional ATen
graph with torch.export's decompositions, keeping whole the composite ops the IR has ops for (linear,
scaled_dot_product_attention, layer_norm, rms_norm, matmul, softmax ...: torch.export's own
``_override_composite_implicit_decomp``), so its nodes are the ATen overloads the converter registry
(``frontends/aten``) is keyed by. The ATen graph is split by torch.fx's ``CapabilityBasedPartitioner``
with an ``OperatorSupport`` that asks that registry; each supported partition is imported
(``frontends.fx_import.import_fx``), verified, run through the pass pipeline (default ``fuse``) and built
by TVM, and replaces its sub-module in the graph. Everything else stays torch calls (eager).

Fallback. Ops with no converter run in torch and are named in one ``FallbackWarning`` per graph; a
partition that fails to import, verify, pass or build runs in torch too, with a warning naming the
reason. ``options={"fallback": "error"}`` raises instead. Graphs that need gradients (grad mode on and a
parameter or input requiring grad) run eagerly, with a warning: the backend is inference only.

Weights. Parameters and buffers of the module (``freeze=True``, the default) become IR parameters: baked
into the compiled library once, prepared by its weight transform (layouts, merged Q/K/V), like inductor's
freezing. As there, dynamo is made to guard on their identity, so another instance of the same module class
compiles anew instead of reusing these weights; and each call checks the baked tensors' in-place version
counters, uploading them again after ``load_state_dict`` or an in-place update (an error where a pass such
as ``quantize`` derived other weights from them). ``freeze=False`` feeds them as inputs on every call.

Dynamic shapes. Dynamo's shape symbols (sizes it marked dynamic: ``dynamic=True``, ``mark_dynamic`` or
its automatic re-compile after a size changed) become IR symbols bounded by the ShapeEnv's ranges (a
whole dim 0 is named ``batch``, dim 1 ``seq``); SymInt graph inputs become IR dims read off the input
shapes, so one compiled library serves every size dynamo's guards let through. Static specialisations
(size 0/1, ``dynamic=False``) are recompiles, as for any backend.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from .frontends.aten import CONVERTERS
from .frontends.fx_import import import_fx
from .frontends.fx_common import is_tensor_op
from .frontends.torch_export import decomposition_table
from .ir.interpreter import bind_symbols
from .ir.torch_dtypes import dtype_from_torch
from .ir.types import eval_dim
from .ir.verifier import verify
from .passes import PassManager

try:  # torch.export's (private) split of its decomposition table; a torch without it decomposes composite ops
    from torch.export.exported_program import (_override_composite_implicit_decomp,
                                                _split_decomp_table_to_cia_and_python_decomp)
except ImportError:
    _override_composite_implicit_decomp = _split_decomp_table_to_cia_and_python_decomp = None
try:  # dynamo's guards (internals); without them the calling-time check in CompiledPartition rebinds weights
    from torch._dynamo.guards import GuardBuilder, install_guard
except ImportError:
    GuardBuilder = install_guard = None

__all__ = ["backend", "FallbackWarning", "OPTIONS", "CompileRecord", "records", "supported_node",
           "unsupported_reason", "CompiledPartition"]


class FallbackWarning(UserWarning):
    """Part of a graph runs eagerly in torch instead of compiled by LLMasOS."""


# option -> (default, what it takes); the order is the order error messages list them in
OPTIONS = {
    "target": (None, "a target name ('cpu', 'cuda', 'cuda:sm_90', ...), a TVM target dict or a TargetSpec; "
                     "default: the device of the graph's inputs"),
    "passes": ("fuse", "a pass pipeline string ('fuse', 'canonicalize,fuse,dce'), a list of passes, or ''/None"),
    "freeze": (True, "True: parameters and buffers are baked into the library; False: passed on every call"),
    "fallback": ("warn", "'warn': what cannot be compiled runs eagerly, with a warning; 'error': raise"),
    "min_ops": (1, "partitions with fewer tensor ops than this run eagerly (an int >= 1)"),
    "tuning_db": (None, "a MetaSchedule database directory (llmasos tune) for the kernels it holds"),
}


@dataclass
class CompileRecord:
    """What one backend call did with a graph (``records`` keeps them, newest last)."""
    partitions: int = 0                         # partitions compiled by LLMasOS
    eager_ops: dict = field(default_factory=dict)  # op -> nodes left to torch (no converter, dtype...)
    failed: list = field(default_factory=list)  # "partition: reason" for partitions that fell back
    symbols: dict = field(default_factory=dict)  # IR symbol -> (min, max), over all compiled partitions
    graphs: list = field(default_factory=list)  # the compiled IR graphs (after passes)
    seconds: float = 0.0                        # import + passes + build, all partitions
    eager: str = ""                             # why the whole graph ran eagerly ('' when it did not)


records: list = []  # CompileRecord per graph compiled, oldest first (kept small: the last 64)


def _record() -> CompileRecord:
    r = CompileRecord()
    records.append(r)
    del records[:-64]
    return r


# -- options -----------------------------------------------------------------------------------------------
@dataclass
class _Options:
    spec: Any
    passes: Any
    freeze: bool
    fallback: str
    min_ops: int
    tuning_db: Any


def _allowed() -> str:
    return "; ".join(f"{k} ({doc})" for k, (_, doc) in OPTIONS.items())


def _parse_options(options, kwargs: dict, mode, example_inputs) -> _Options:
    if mode not in (None, "default"):
        raise ValueError(f"llmasos backend: torch.compile(mode={mode!r}) is not supported; choose what to "
                         f"compile with options={{...}}. Options: {_allowed()}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"llmasos backend: options must be a dict, got {type(options).__name__}")
    given = {**(options or {}), **kwargs}
    unknown = sorted(k for k in given if k not in OPTIONS)
    if unknown:
        raise ValueError(f"llmasos backend: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}. Options: {_allowed()}")
    opts = {k: given.get(k, default) for k, (default, _) in OPTIONS.items()}

    # deferred: TVM -- torch imports this module at torch.compile(), before any graph is compiled
    from .backends.tvm.targets import resolve_target, target_for_torch_device
    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    target = opts["target"]
    try:
        if target is None:  # the inputs' device (several: the first, refused below)
            spec = target_for_torch_device(sorted(devices)[0] if devices else "cpu")
            target = spec.name
        else:
            spec = resolve_target(target)
    except (TypeError, ValueError) as e:
        raise ValueError(f"llmasos backend: option target={target!r}: {e}") from e
    if devices and devices != {spec.torch_device}:
        raise ValueError(f"llmasos backend: option target={target!r} compiles for {spec.torch_device}, but the graph's "
                         f"inputs are on {', '.join(sorted(devices))}; pass target='{sorted(devices)[0]}' or move "
                         f"the model and inputs")
    if not isinstance(opts["freeze"], bool):
        raise ValueError(f"llmasos backend: option freeze must be True or False, got {opts['freeze']!r}")
    if opts["fallback"] not in ("warn", "error"):
        raise ValueError(f"llmasos backend: option fallback must be 'warn' or 'error', got {opts['fallback']!r}")
    if not isinstance(opts["min_ops"], int) or isinstance(opts["min_ops"], bool) or opts["min_ops"] < 1:
        raise ValueError(f"llmasos backend: option min_ops must be an int >= 1, got {opts['min_ops']!r}")
    if opts["passes"]:
        try:
            PassManager(opts["passes"])  # a bad pipeline fails here, before any tracing
        except Exception as e:
            raise ValueError(f"llmasos backend: option passes={opts['passes']!r}: {e}") from e
    db = opts["tuning_db"]
    if db is not None:
        from .backends.tvm.tuning import TuningDatabase  # deferred: TVM (see _parse_options)
        db = TuningDatabase.open(db, spec)
    return _Options(spec, opts["passes"], opts["freeze"], opts["fallback"], opts["min_ops"], db)


# -- the backend ----------------------------------------------------------------------------------------------
def backend(gm, example_inputs, options: Optional[dict] = None, *, mode: Optional[str] = None, **kwargs):
    """The torch.compile backend: ``torch.compile(m, backend="llmasos", options={...})``.

    torch calls it as ``backend(gm, example_inputs, options=...)``; options may also be passed as keywords
    (``functools.partial(llmasos.dynamo.backend, target="cpu")``). See ``OPTIONS`` for what they are.
    """
    opts = _parse_options(options, kwargs, mode, example_inputs)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        _record().eager = "gradients"
        _fallback(opts, "this graph runs eagerly: the llmasos backend is inference only and gradients are "
                        "enabled (call the compiled model under torch.no_grad() or torch.inference_mode())")
        return gm.forward

    # AOTAutograd's forward inputs are the module's own parameters and buffers (when dynamo did not lift
    # them to inputs), then dynamo's inputs; real tensors, names and whether they are weights, by position
    own = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    inputs = [_Input(t, name, True, None) for name, t in own]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, x in enumerate(example_inputs):
        node = placeholders[i] if i < len(placeholders) else None
        name, weight, source = _describe(node, x)
        inputs.append(_Input(x, name, weight, source))

    def fw_compiler(fw_gm, fw_inputs):
        return _compile_aten(fw_gm, inputs, opts, _record())

    keep_whole, table = _decompositions()
    with keep_whole:
        return aot_autograd(fw_compiler=fw_compiler, decompositions=table)(gm, example_inputs)


@dataclass
class _Input:
    value: Any      # the real tensor (or int) dynamo passed
    name: str
    weight: bool    # a parameter or buffer of the module
    source: Any     # dynamo's Source for it (None for the graph module's own attributes)


def _describe(node, x) -> tuple:
    """(readable name, is a module parameter/buffer, dynamo Source) of one dynamo input."""
    src = getattr(node.meta.get("grapharg"), "source", None) if node is not None else None
    text = ""
    if src is not None:
        text = src.name() if callable(src.name) else src.name
    weight = isinstance(x, torch.nn.Parameter) or "._buffers[" in text or "._parameters[" in text
    name = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", text)
    name = re.sub(r"^L\['self'\]\.|^L\['(?:args|fn)'\]\[\d+\]\.", "", name)
    name = re.sub(r"^L\['([^']*)'\]", r"\1", name)
    name = re.sub(r"\[(\d+)\]", r"_\1", name).replace("'", "").strip(".")
    if not name and node is not None:
        name = node.name
    return name or "input", weight, src


@functools.lru_cache(maxsize=4)
def _decomposition_tables(keys: frozenset) -> tuple:
    if _split_decomp_table_to_cia_and_python_decomp is None:  # composite ops decompose
        return None, decomposition_table()
    return _split_decomp_table_to_cia_and_python_decomp(decomposition_table())


def _decompositions() -> tuple:
    """(a context keeping composite ops with a converter whole while AOTAutograd traces, the python
    decompositions): torch.export's default decompositions minus the ops with a converter, split as
    torch.export's run_decompositions splits them. Cached per set of registered converters."""
    cia, table = _decomposition_tables(frozenset(CONVERTERS))
    if cia is None:
        return contextlib.nullcontext(), table
    return _override_composite_implicit_decomp(cia), table


# -- which nodes LLMasOS takes ----------------------------------------------------------------------------------
def supported_node(node) -> bool:
    """Whether the converter registry takes this ATen FX node: an op overload with a converter (and value
    semantics), size arithmetic, or a getitem; every tensor it makes has a dtype the IR has."""
    return node.op == "call_function" and unsupported_reason(node) is None


def unsupported_reason(node) -> Optional[str]:
    """None for a call_function node LLMasOS converts, else why not: "no converter", "in-place" or
    "dtype <torch dtype>" (a tensor of a dtype the IR lacks, float64 say)."""
    target = node.target
    val = node.meta.get("val")
    if target is operator.getitem:
        return None
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not is_tensor_op(target):
        return None  # size arithmetic, folded into IR dims
    if not isinstance(target, torch._ops.OpOverload) or str(target) not in CONVERTERS:
        return "no converter"
    if target._schema.is_mutable:
        return "in-place"
    return _dtype_problem(val)


def _dtype_problem(val) -> Optional[str]:
    for v in (val if isinstance(val, (tuple, list)) else [val]):
        if isinstance(v, torch.Tensor):
            try:
                dtype_from_torch(v.dtype)
            except (TypeError, ValueError, KeyError):
                return f"dtype {str(v.dtype).replace('torch.', '')}"
    return None


def _op_name(node) -> str:
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _is_compute(node) -> bool:
    """A node that computes a tensor (not a getitem, not size arithmetic)."""
    return node.op == "call_function" and node.target is not operator.getitem and \
        isinstance(node.meta.get("val"), (torch.Tensor, tuple, list))


# -- compiling an ATen graph ------------------------------------------------------------------------------------
def _compile_aten(gm, inputs: list, opts: _Options, record: CompileRecord):
    """The forward graph AOTAutograd traced -> a callable: partitions compiled, the rest left to torch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants, names = _weights(gm, placeholders, inputs, opts)
    _guard_identity([inputs[i].source for i in constants])
    with unset_fake_temporarily(), torch.no_grad():
        reasons: dict = {}  # reason -> {op: count}
        unsupported = []
        for n in gm.graph.nodes:
            why = unsupported_reason(n) if n.op == "call_function" else None
            if why is not None:
                unsupported.append(n)
                ops = reasons.setdefault(why, {})
                ops[_op_name(n)] = ops.get(_op_name(n), 0) + 1
                record.eager_ops[_op_name(n)] = record.eager_ops.get(_op_name(n), 0) + 1
        if unsupported:
            what = "; ".join(f"{why}: " + ", ".join(op + (f" (x{k})" if k > 1 else "") for op, k in ops.items())
                             for why, ops in reasons.items())
            hint = " (llmasos.frontends.register_converter adds one)" if "no converter" in reasons else ""
            n = len(unsupported)
            _fallback(opts, f"{n} op{'s' if n > 1 else ''} run{'' if n > 1 else 's'} eagerly in torch, the rest "
                            f"of the graph is compiled -- {what}{hint}")
        if not unsupported:
            whole = _try_build(gm, constants, names, opts, record, "graph")
            return whole if whole is not None else gm
        return _compile_partitions(gm, placeholders, constants, names, opts, record)


def _weights(gm, placeholders, inputs: list, opts: _Options) -> tuple:
    """(placeholder index -> real tensor baked in as a parameter, placeholder index -> name)."""
    names = {i: inputs[i].name for i in range(min(len(inputs), len(placeholders)))}
    if not opts.freeze or len(placeholders) != len(inputs):
        return {}, names  # AOTAutograd regrouped the inputs (duplicates, synthetic bases): feed every one
    mutated = set()
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    for i, info in enumerate(getattr(meta, "input_info", None) or []):
        if getattr(info, "mutates_data", False) or getattr(info, "mutates_metadata", False):
            mutated.add(i)
    constants = {}
    for i, (node, inp) in enumerate(zip(placeholders, inputs)):
        fake = node.meta.get("val")
        if inp.weight and i not in mutated and isinstance(inp.value, torch.Tensor) and isinstance(fake, torch.Tensor) \
                and tuple(fake.shape) == tuple(inp.value.shape) and fake.dtype == inp.value.dtype:
            constants[i] = inp.value
    return constants, names


def _guard_identity(sources) -> None:
    """Make dynamo guard on the identity of the weights baked in: it lifts parameters to inputs without
    guards (one compiled graph serves every instance of a module class), which frozen weights would make
    wrong for the next instance. As inductor's freezing does; the calling-time check in CompiledPartition
    stays, for when this is not possible."""
    if install_guard is None:
        return
    try:
        install_guard(*(s.make_guard(GuardBuilder.ID_MATCH) for s in sources if s is not None))
    except Exception:  # noqa: BLE001 -- a torch without these internals: the runtime check rebinds instead
        pass


def _compile_partitions(gm, placeholders, constants: dict, names: dict, opts: _Options, record: CompileRecord):
    class Support(OperatorSupportBase):
        def is_node_supported(self, submodules, node) -> bool:
            return supported_node(node)

    partitioner = CapabilityBasedPartitioner(gm, Support(), allows_single_node_partition=True)
    partitions = [p for p in partitioner.propose_partitions()
                  if sum(1 for n in p.nodes if _is_compute(n)) >= opts.min_ops]
    if not partitions:
        return gm
    index = {n.name: i for i, n in enumerate(placeholders)}  # (names: fusing may rebuild the nodes)
    fused = partitioner.fuse_partitions(partitions, prefix="llmasos_")
    for node in list(fused.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith("llmasos_"):
            continue
        sub = fused.get_submodule(node.target)
        sub_constants, sub_names = {}, {}
        for j, arg in enumerate(node.args):
            op = getattr(arg, "op", None)
            i = index.get(arg.name) if op == "placeholder" else None
            if i in constants:
                sub_constants[j] = constants[i]
            elif op == "get_attr":
                sub_constants[j] = operator.attrgetter(arg.target)(fused)
            if i in names:
                sub_names[j] = names[i]
            elif op is not None:
                sub_names[j] = arg.name
        compiled = _try_build(sub, sub_constants, sub_names, opts, record, str(node.target))
        if compiled is not None:
            setattr(fused, node.target, compiled)
    return fused


def _try_build(gm, constants: dict, names: dict, opts: _Options, record: CompileRecord, label: str):
    """The compiled partition, or None (with a FallbackWarning naming why) when any step fails."""
    t0 = time.perf_counter()
    try:
        part = _build(gm, constants, names, opts, label)
    except Exception as e:  # noqa: BLE001 -- any failure leaves the partition to torch
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        record.failed.append(f"{label}: {why}")
        if opts.fallback == "error":
            raise
        n_ops = sum(1 for n in gm.graph.nodes if _is_compute(n))
        _fallback(opts, f"{label} ({n_ops} ops) runs eagerly in torch: LLMasOS could not compile it: {why}")
        return None
    finally:
        record.seconds += time.perf_counter() - t0
    record.partitions += 1
    record.graphs.append(part.graph)
    for s, b in part.graph.symbols.items():
        record.symbols[s] = b
    return part


def _build(gm, constants: dict, names: dict, opts: _Options, label: str) -> "CompiledPartition":
    from .backends.tvm import build  # deferred: TVM (see _parse_options)

    imp = import_fx(gm, constants, name=label, names=names)
    graph = imp.graph
    imported = dict(graph.param_data)
    verify(graph)
    if opts.passes:
        graph = PassManager(opts.passes).run(graph)
    exe = build(graph, opts.spec, tuning_db=opts.tuning_db)
    # weights can be rebound at call time when every parameter is still the tensor it was imported from
    # (fuse keeps them; quantize or prune derive new data from them)
    rebindable = all(graph.param_data.get(n) is imported.get(n) for n in graph.params)
    baked = {p: constants[p] for ps in imp.param_positions.values() for p in ps}
    return CompiledPartition(exe, graph, imp.input_positions, imp.outputs, imp.single, imp.param_positions,
                             rebindable, baked)


def _fallback(opts: _Options, message: str) -> None:
    if opts.fallback == "error":
        raise RuntimeError(f"llmasos backend (fallback='error'): {message}")
    warnings.warn(f"llmasos: {message}", FallbackWarning, stacklevel=2)


class CompiledPartition(torch.nn.Module):
    """A partition's TVM executable with the calling convention of the FX sub-module it replaces: all of its
    arguments in (weights baked in and SymInts read off the shapes are dropped), its outputs out.

    ``weights``: parameter name -> the argument positions it was baked from; ``baked``: position -> the
    tensor passed there at compile time. Each call checks that those arguments are the same tensor objects,
    unchanged (same in-place version counter). When not -- an in-place update such as ``load_state_dict``,
    or another module instance -- the new tensors are uploaded (and prepared) again if ``rebindable``, else
    the call raises."""

    def __init__(self, executable, graph, positions: list, outputs: list, single: bool,
                 weights: Optional[dict] = None, rebindable: bool = True, baked: Optional[dict] = None):
        super().__init__()
        self.executable = executable
        self.graph = graph
        self.positions = list(positions)
        self.outputs = list(outputs)
        self.single = single
        self.weights = dict(weights or {})
        self.rebindable = rebindable
        self._dims = any(kind == "dim" for kind, _ in outputs)
        self._baked = [(p, t, t._version) for p, t in (baked or {}).items()]

    def _check_weights(self, args) -> None:
        for p, t, version in self._baked:
            if args[p] is not t or t._version != version:
                return self._rebind(args)

    def _rebind(self, args) -> None:
        if not self.rebindable:
            raise RuntimeError(f"llmasos: the weights baked into {self.graph.name} changed (an in-place update or "
                               f"another module instance), and its passes derived new weights from them; call "
                               f"torch._dynamo.reset() and compile again, or compile with options={{'freeze': False}}")
        new = {}
        for n, ps in self.weights.items():
            if n not in self.graph.params:
                continue  # a pass dropped it (unused)
            ts = [args[p] for p in ps]
            if any(t is not ts[0] for t in ts[1:]):
                raise RuntimeError(f"llmasos: parameter {n} of {self.graph.name} was one tensor at compile time "
                                   f"and is several now (untied weights); call torch._dynamo.reset() and compile again")
            new[n] = ts[0].detach()
        self.graph.param_data.update(new)
        self.executable._weights = self.executable._upload(self.graph.param_data)  # (prepared again)
        self._baked = [(p, args[p], args[p]._version) for ps in self.weights.values() for p in ps]

    def forward(self, *args):
        if self._baked:
            self._check_weights(args)
        tensors = [args[i] for i in self.positions]
        outs = self.executable(*tensors)
        env = None
        if self._dims:
            env = bind_symbols(self.graph, tensors)
        result = []
        for kind, v in self.outputs:
            if kind == "tensor":
                result.append(outs[v])
            elif kind == "dim":
                result.append(eval_dim(v, env))
            else:
                result.append(v)
        return result[0] if self.single else tuple(result)

    def extra_repr(self) -> str:
        return f"graph={self.graph.name}, inputs={len(self.positions)}, target={self.executable.spec.name}"
