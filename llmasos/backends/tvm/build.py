"""Build a Graph for a target and run it: ``build(graph, target) -> Executable``.

``Executable`` needs only TVM's runtime, so a library exported here loads where the TVM compiler is absent
(``TVM_USE_RUNTIME_LIB=1``); building needs the compiler.

The pipeline is the Target's (targets.py, pipeline.py): its fusion stage (for CUDA TVM's CUDA passes; for
the CPU TVM's cpu_generic ones after ``FastMathTransform``), its schedule rules (DLight's GPU rules after
our DecodeGEMV; our CPU rules, cpu_schedule.py), its lowering stage. Before it, ``LiftTransformParams``
moves param-only work (weight transposes, CPU weight panels) into ``main_transform_params``, which the
Executable runs once when it uploads the weights; each call then passes inputs + prepared weights to main.
The Executable asks the Target how to reach the device (runtime library, torch tensors, host memory).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import tvm
from tvm.runtime.vm import VirtualMachine  # the runtime VM alone: exported libraries run without the compiler

from ...ir.graph import Graph, param_array
from ...ir.interpreter import bind_symbols
from ...ir.torch_dtypes import dtype_from_torch
from ...ir.types import DType, TensorType, dim_str
from .pipeline import (fused_module, pass_config, pipeline_stages, prepare_module, relax_pipeline,  # noqa: F401
                       schedule_rules)
from .targets import Target, resolve_target
from .tuning import TuningDatabase

MAIN = "main"
# LiftTransformParams names the weight-preparation function after the function (one entry) or shares one
TRANSFORMS = ("main_transform_params", "transform_params")


class BuildError(RuntimeError):
    """TVM could not compile the lowered module for the target."""


@dataclass
class _Input:
    """A graph input as the runtime checks it (what interpreter.bind_symbols reads)."""
    name: str
    type: TensorType


@dataclass
class FunctionSig:
    """One entry function's runtime inputs and symbol bounds (what interpreter.bind_symbols reads)."""
    inputs: list                 # [_Input]
    symbols: dict                # name -> (min, max)


@dataclass
class Signature:
    """What running a compiled library needs besides the .so: entry functions, their inputs and symbols, and
    the parameter order they share."""
    param_names: list            # graph.params order: every function's trailing arguments before the transform
    param_types: list            # [TensorType]
    lifted: bool                 # the library has a transform-params function (read from the library at load)
    functions: dict              # name -> FunctionSig, the default function first

    @property
    def inputs(self) -> list:
        """The default function's inputs: [_Input]."""
        return next(iter(self.functions.values())).inputs

    @property
    def symbols(self) -> dict:
        """The default function's symbols: name -> (min, max)."""
        return next(iter(self.functions.values())).symbols

    @staticmethod
    def of(graph: Graph, lifted: bool) -> "Signature":
        return Signature.of_functions({MAIN: graph}, lifted)

    @staticmethod
    def of_functions(graphs: dict, lifted: bool) -> "Signature":
        fns = {n: FunctionSig([_Input(v.name, v.type) for v in g.inputs], dict(g.symbols)) for n, g in graphs.items()}
        first = next(iter(graphs.values()))
        return Signature(list(first.params), [v.type for v in first.params.values()], lifted, fns)

    def to_json(self) -> str:
        t = lambda ty: {"shape": [dim_str(d) for d in ty.shape], "dtype": str(ty.dtype)}  # noqa: E731
        fns = {n: {"inputs": [{"name": i.name, **t(i.type)} for i in f.inputs],
                   "symbols": {k: list(v) for k, v in f.symbols.items()}} for n, f in self.functions.items()}
        main = next(iter(fns.values()))
        return json.dumps({"inputs": main["inputs"],
                           "params": [{"name": n, **t(ty)} for n, ty in zip(self.param_names, self.param_types)],
                           "symbols": main["symbols"], "lifted": self.lifted, "functions": fns})

    @staticmethod
    def from_json(text: str) -> "Signature":
        d = json.loads(text)
        t = lambda e: TensorType(tuple(e["shape"]), DType.parse(e["dtype"]))  # noqa: E731
        fns = d.get("functions") or {MAIN: {"inputs": d["inputs"], "symbols": d["symbols"]}}
        fns = {n: FunctionSig([_Input(e["name"], t(e)) for e in f["inputs"]],
                              {k: tuple(v) for k, v in f["symbols"].items()}) for n, f in fns.items()}
        return Signature([e["name"] for e in d["params"]], [t(e) for e in d["params"]], d["lifted"], fns)


def compile_module(mod, spec: Target, cuda_graph: tuple = (), tuning_db=None):
    """Relax IRModule -> TVM executable for ``spec`` (lifting param transforms when the target asks).

    ``cuda_graph``: names of functions to run as captured device graphs (on targets with
    ``graph_capture``: CUDA graphs). Every argument of such a function is then treated as fixed storage, so
    the caller must pass the same buffers on every call (updating their contents in place): TVM's
    RewriteCUDAGraph captures only kernels whose operands are function parameters past ``num_input`` or
    statically planned memory.

    ``tuning_db``: a directory written by ``llmasos tune`` (or a ``tuning.TuningDatabase``): its best
    schedules replace the default ones for the kernels it holds.
    """
    if tuning_db is not None:
        tuning_db = TuningDatabase.open(tuning_db, spec)
    mod, config = prepare_module(mod, spec, cuda_graph)
    try:
        with tvm.transform.PassContext(opt_level=3, config=config):
            return tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=relax_pipeline(spec, tuning_db))
    except Exception as e:
        raise BuildError(f"TVM failed to build for target '{spec.name}' {spec.target}: "
                         f"{type(e).__name__}: {e}") from e


def build_functions(graphs: dict, target: Any = "cpu", cuda_graph: tuple = (), tuning_db=None) -> "Executable":
    """One library with an entry function per graph (same parameters, uploaded once), e.g. ``prefill``
    and ``decode``; call them with ``exe.call(name, *inputs)``. See compile_module for ``cuda_graph`` and
    ``tuning_db``."""
    from . import memory  # deferred: the TVM compiler (this module loads with its runtime alone)
    from .lower import lower_functions

    spec = resolve_target(target)
    if tuning_db is not None:
        tuning_db = TuningDatabase.open(tuning_db, spec)  # a bad database fails before the slow work
    t0 = time.perf_counter()
    mod = lower_functions(graphs, spec)
    first = next(iter(graphs.values()))
    # memory for the compiled bounds (backends/tvm/memory.py): refuse what cannot fit, and allocate the
    # intermediates of functions whose static plan would be large for each call's actual shapes
    est = memory.estimate(mod, sum(_type_bytes(v.type) for v in first.params.values()))
    memory.check_fits(est, spec)
    mod = memory.dynamic_allocation(mod, est, keep_static=tuple(cuda_graph) if spec.graph_capture else ())
    ex = compile_module(mod, spec, cuda_graph=tuple(cuda_graph), tuning_db=tuning_db)
    del mod  # the executable is all we keep
    missing = [n for n in first.params if n not in first.param_data]
    if missing:
        raise ValueError(f"parameters {missing} have no data; attach it before building")
    exe = Executable(ex, spec, Signature.of_functions(graphs, spec.lift_params and bool(first.params)),
                     first.param_data)
    exe.build_seconds = time.perf_counter() - t0
    exe.memory = est
    if tuning_db is not None:
        exe.tuned_kernels = list(tuning_db.applied)
        if not exe.tuned_kernels:
            warnings.warn(f"tuning database {tuning_db.path} holds none of this library's kernels (tuned for "
                          f"other shapes or options?): every kernel has its default schedule", stacklevel=2)
    return exe


def _type_bytes(t) -> int:
    if not t.is_static:
        return 0
    n = 1
    for d in t.shape:
        n *= d
    return (n * t.dtype.bits + 7) // 8


def build(graph: Graph, target: Any = "cpu", tuning_db=None) -> "Executable":
    """Lower, compile and load ``graph`` (the library's one function, ``main``); its parameter data is
    uploaded to the device once here."""
    return build_functions({MAIN: graph}, target, tuning_db=tuning_db)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class Executable:
    """A compiled graph on one device, with its weights resident there. Call it with the graph inputs."""

    def __init__(self, lib, spec: Target, signature: Signature, params: Mapping[str, Any]):
        self.spec = spec
        self.signature = signature
        self.param_names = list(signature.param_names)
        self.build_seconds: Optional[float] = None
        self.memory = None    # memory.MemoryEstimate of a build (None when loaded from an artifact)
        self.tuned_kernels: Optional[list] = None   # kernels a tuning database scheduled (None: none used)
        self._lib = lib
        spec.ensure_runtime()
        self._dev = spec.tvm_device()
        if not self._dev.exist:
            raise RuntimeError(f"target '{spec.name}' needs a {spec.device} device, and none is present")
        # a tvm.compile result with modules that are source until compiled (C, CUDA) is linked here, with
        # the target's compiler options
        runnable = lib.jit(**spec.export_options()) if isinstance(lib, tvm.runtime.Executable) else lib
        self._runnable = runnable
        self._vm = VirtualMachine(runnable, self._dev)
        self._entries = {}
        for name in signature.functions:
            if not self._vm.module.implements_function(name):
                raise ValueError(f"the library has no function '{name}' (its signature names "
                                 f"{', '.join(signature.functions)})")
            self._entries[name] = self._vm[name]
        self.default_function = next(iter(signature.functions))
        # the library itself says whether weights go through a transform-params function first
        self._transform = next((t for t in TRANSFORMS if self._vm.module.implements_function(t)), None)
        signature.lifted = self._transform is not None
        self._weights = self._upload(params)

    # -- weights ---------------------------------------------------------------------------------
    def _upload(self, params: Mapping[str, Any]) -> list:
        sig = self.signature
        missing = [n for n in sig.param_names if n not in params]
        if missing:
            raise ValueError(f"missing data for parameters {missing}")
        arrays = []
        for name, ty in zip(sig.param_names, sig.param_types):
            a = self._to_device(params[name], f"parameter %{name}")
            if tuple(a.shape) != tuple(ty.shape) or str(a.dtype) != str(ty.dtype.numpy):
                raise ValueError(f"parameter %{name}: expected {ty}, got shape {list(a.shape)} dtype {a.dtype}")
            arrays.append(a)
        if not sig.lifted:
            return arrays
        out = self._vm[self._transform](arrays)
        return list(out)

    @property
    def weights(self) -> list:
        """The prepared weights on the device: every entry function's trailing arguments."""
        return self._weights

    @property
    def functions(self) -> list:
        return list(self._entries)

    def raw(self, name: str):
        """The VM function ``name``, to be called as ``fn(*device_inputs, *exe.weights)`` -- no checks, no
        conversions: the fast path of a decode loop."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"no function '{name}'; this library has {', '.join(self._entries)}") from None

    def private_function(self, name: str):
        """``raw(name)`` of a VM of its own over the same compiled code: its CUDA graphs (captured per
        function and shape by the VM, holding the addresses of the first call's arguments) belong to the
        caller alone -- what a runner with its own fixed buffers needs (llm/paged.py)."""
        if name not in self._entries:
            raise ValueError(f"no function '{name}'; this library has {', '.join(self._entries)}")
        return VirtualMachine(self._runnable, self._dev)[name]

    # -- calls -----------------------------------------------------------------------------------
    def _to_device(self, x, what: str):
        if isinstance(x, tvm.runtime.Tensor):
            return x if self.spec.on_device(x) else x.copyto(self._dev)
        if _is_torch(x):
            t = x.detach()
            if not self.spec.on_device(t):
                t = t.to(self.spec.torch_device)
            if t.dtype == torch.bool or not t.is_contiguous():
                t = t.contiguous()
            try:
                return tvm.runtime.from_dlpack(t)
            except Exception:  # noqa: BLE001 -- unaligned storage: copy instead of sharing
                return tvm.runtime.tensor(param_array(t), self._dev)
        a = param_array(x)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would also turn 0-d into 1-d)
            a = a.copy(order="C")
        return tvm.runtime.tensor(a, self._dev)

    def __call__(self, *inputs) -> list:
        return self.call(self.default_function, *inputs)

    def call(self, name: str, *inputs) -> list:
        """Run entry function ``name`` on host or device inputs (checked) and return its outputs."""
        fn = self.raw(name)
        sig = self.signature.functions[name]
        if len(inputs) != len(sig.inputs):
            raise ValueError(f"{self._what(name)} takes {len(sig.inputs)} inputs "
                             f"({', '.join('%' + i.name for i in sig.inputs)}), got {len(inputs)}")
        for spec_in, x in zip(sig.inputs, inputs):
            try:
                dt = _dtype_of(x)
            except TypeError as e:
                raise ValueError(f"input %{spec_in.name}: expected dtype {spec_in.type.dtype}, got {e}") from None
            if dt is not spec_in.type.dtype:
                raise ValueError(f"input %{spec_in.name}: expected dtype {spec_in.type.dtype}, got {dt}")
        bind_symbols(sig, inputs)  # shapes, symbol consistency and compiled symbol bounds
        as_torch = any(_is_torch(x) for x in inputs)
        args = [self._to_device(x, f"input %{i.name}") for i, x in zip(sig.inputs, inputs)]
        outs = fn(*args, *self._weights)
        return [self._from_device(o, as_torch) for o in outs]

    def _what(self, name: str) -> str:
        return "the graph" if len(self._entries) == 1 else f"function '{name}'"

    def _from_device(self, t, as_torch: bool):
        if as_torch:
            return torch.from_dlpack(t)
        if self.spec.host_memory and str(t.dtype) in _NP_DLPACK:
            return np.from_dlpack(t)
        return t.numpy()

    def cuda_source(self) -> str:
        """The CUDA C the library's kernels were generated as ('' for a library with no CUDA module)."""
        return cuda_source(self._lib)

    def source(self) -> str:
        """The code the target generated for the library's kernels (``Target.source_kind`` modules: CUDA C,
        LLVM IR, C ...; '' when the target names none or the library was loaded from a file)."""
        return generated_source(self._lib, self.spec.source_kind) if self.spec.source_kind else ""

    # -- export / load ---------------------------------------------------------------------------
    def export_library(self, path: str) -> str:
        """Write the compiled module (a shared library); ``signature.to_json()`` describes its arguments."""
        self._lib.export_library(str(path), **self.spec.export_options())
        return str(path)

    @classmethod
    def load(cls, lib_path: str, graph_or_param_info: Union[Graph, Signature, str, dict],
             params: Mapping[str, Any], target: Any = "cpu") -> "Executable":
        """Load an exported library. ``graph_or_param_info``: the Graph it was built from, its Signature,
        or ``Signature.to_json()`` text / parsed dict."""
        spec = resolve_target(target)
        info = graph_or_param_info
        if isinstance(info, Graph):
            lib, sig = tvm.runtime.load_module(str(lib_path)), Signature.of(info, lifted=False)
        elif isinstance(info, Signature):
            lib, sig = tvm.runtime.load_module(str(lib_path)), info
        elif isinstance(info, (str, dict)):
            lib = tvm.runtime.load_module(str(lib_path))
            sig = Signature.from_json(info if isinstance(info, str) else json.dumps(info))
        else:
            raise TypeError(f"graph_or_param_info must be a Graph, a Signature or its JSON, "
                            f"got {type(info).__name__}")
        return cls(lib, spec, sig, params)

    def __repr__(self) -> str:
        return (f"Executable(target={self.spec.name!r}, inputs={[i.name for i in self.signature.inputs]}, "
                f"params={len(self.param_names)})")


# numpy's dtype names are TVM's for every LLMasOS dtype (ml_dtypes: bfloat16, float8_e4m3fn, int4)
_NP_DLPACK = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def generated_source(lib, kind: str) -> str:
    """The source of a ``tvm.compile`` result's modules of runtime kind ``kind`` ("cuda", "c", "llvm")."""
    def modules(m):
        yield m
        for i in m.imports:
            yield from modules(i)
    return "".join(m.inspect_source() for m in modules(lib.mod) if m.kind == kind)


def cuda_source(lib) -> str:
    """The CUDA C of a ``tvm.compile`` result's kernels ('' when it has no CUDA module): no GPU needed."""
    return generated_source(lib, "cuda")


def _dtype_of(x) -> DType:
    if _is_torch(x):
        return dtype_from_torch(x.dtype)
    if isinstance(x, tvm.runtime.Tensor):
        return DType.from_numpy(np.dtype(str(x.dtype)) if str(x.dtype) != "bfloat16" else DType.bf16.numpy)
    return DType.from_numpy(np.asarray(x).dtype)
