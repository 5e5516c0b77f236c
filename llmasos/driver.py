"""The compile driver: one pipeline from named graphs to one library, shared by every front door.

    llmasos.compile(model, ...)     torch.export of one module          -> {"main": graph}
    llmasos.compile_lm(model, ...)  the decoder's prefill and decode    -> {"prefill": graph, "decode": graph}
        |  both call compile_program(kind, frontend, target, passes=..., calibration=..., tuning_db=...):
        v
    prepare(target, passes, calibration, tuning_db) -> Plan     resolve the target, open the tuning database,
                                                                parse the pipeline: fail before the slow work
    lower(plan, frontend) -> Source     frontend(spec) imports the graphs (import_s); each is verified, then
                                        the pass pipeline runs on each (passes_s)
    build_library(plan, source)         backends.tvm.build_functions: ONE library with an entry function per
                                        graph sharing one copy of the weights (build_s, tuned_kernels)
        v
    CompiledProgram                     graphs, executable, target, per-entry calling conventions, timings,
                                        tokenizer, meta; save(path) / load_program(path) (llmasos/artifact.py)

``CompiledModel`` (llmasos/compiled.py: a callable with the model's pytree calling convention) and
``CompiledLM`` (llmasos/llm/runtime.py: generation with a device-resident KV cache) are views over a
CompiledProgram of kind "model" and "lm". What a tuning run tunes is ``lower``'s output, so a tuning
database's kernels are the ones a later build with the same options looks up.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import artifact
from .artifact import ArtifactError
from .ir.graph import param_array
from .ir.parser import parse
from .ir.printer import print_graph
from .ir.torch_dtypes import dtype_from_torch, numpy_to_torch
from .ir.verifier import verify
from .passes import PassManager

MAIN = "main"   # the entry function of a one-graph program (backends.tvm.build.MAIN)


class CompileError(ValueError):
    """Options or a model that ``llmasos.compile`` / ``compile_lm`` cannot take (an argument of the wrong type or
    range, example inputs of the wrong kind, bounds the model or the device cannot hold); says what is allowed."""


class MemoryBudgetError(CompileError):
    """The compiled bounds (max_batch, max_seq) need more memory than the device has: the message gives the
    estimate and the bound to lower."""


@dataclass
class CallConvention:
    """How a Python call maps onto an entry function's inputs, and its outputs back onto the model's output
    structure (the pytree convention ``llmasos.compile`` keeps from torch.export)."""
    in_spec: Any                  # torch pytree TreeSpec of (args, kwargs)
    out_spec: Any                 # TreeSpec of the model's output
    out_leaves: list              # per output leaf: index into the graph's outputs, or ("const", value)
    input_names: list

    def to_json(self) -> dict:
        return {"input_names": list(self.input_names), "in_spec": artifact.spec_dumps(self.in_spec),
                "out_spec": artifact.spec_dumps(self.out_spec),
                "out_leaves": [leaf if isinstance(leaf, int) else {"const": leaf[1]} for leaf in self.out_leaves]}

    @staticmethod
    def from_json(d: dict, where: str) -> "CallConvention":
        leaves = [leaf if isinstance(leaf, int) else ("const", leaf["const"]) for leaf in d["out_leaves"]]
        return CallConvention(artifact.spec_loads(d["in_spec"], f"{where}: in_spec"),
                              artifact.spec_loads(d["out_spec"], f"{where}: out_spec"), leaves,
                              list(d["input_names"]))


@dataclass
class Source:
    """What a front door hands the driver: the imported graphs and what the program needs besides them."""
    graphs: dict                                    # entry name -> Graph, in the library's order
    conventions: dict = field(default_factory=dict)  # entry name -> CallConvention (callable entries)
    cuda_graph: tuple = ()                          # entries run as CUDA graphs (on CUDA targets)
    meta: dict = field(default_factory=dict)        # JSON-able, kept in the artifact (e.g. an LM's max_seq)


@dataclass
class Plan:
    """The checked options of one compilation, and its timings as they accrue."""
    spec: Any                        # backends.tvm.TargetSpec
    pipeline: Optional[PassManager]
    tuning_db: Any = None            # backends.tvm.tuning.TuningDatabase
    timings: dict = field(default_factory=dict)


@dataclass
class CompiledProgram:
    """One compiled library and everything needed to run, save and inspect it."""
    kind: str                        # "model" (llmasos.compile) or "lm" (llmasos.compile_lm)
    graphs: dict                     # entry -> Graph after the passes ({} for an LM loaded from an artifact)
    executable: Any                  # backends.tvm.Executable: the library on its device, weights uploaded
    target: Any                      # backends.tvm.TargetSpec
    conventions: dict = field(default_factory=dict)   # entry -> CallConvention
    timings: dict = field(default_factory=dict)
    tokenizer: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def entries(self) -> list:
        """The library's entry functions, in order."""
        return list(self.executable.signature.functions)

    def ir(self, entry: Optional[str] = None) -> str:
        """The IR text of ``entry`` (default: the first)."""
        name = entry or self.entries[0]
        if name not in self.graphs:
            raise ValueError(f"no IR for entry '{name}' (this program was loaded from an artifact without parsing "
                             f"its IR; it is in the artifact's {artifact.ir_file(name)})")
        return print_graph(self.graphs[name])

    def save(self, path):
        """Write the one artifact format (llmasos/artifact.py)."""
        if set(self.graphs) != set(self.entries):
            raise ArtifactError(f"this compiled {'LM' if self.kind == 'lm' else 'model'} was loaded from an "
                                f"artifact; copy that directory instead")
        exe = self.executable
        first = self.graphs[self.entries[0]]
        weights = {}
        for name in exe.signature.param_names:
            data = first.param_data[name]
            t = data if hasattr(data, "detach") else numpy_to_torch(param_array(data))
            weights[name] = t.detach().cpu().contiguous()
        entries = {n: (print_graph(self.graphs[n]), self.conventions[n].to_json() if n in self.conventions else None)
                   for n in self.entries}
        return artifact.write(path, kind=self.kind, target_name=self.target.name, target_dict=self.target.target,
                              signature=json.loads(exe.signature.to_json()), entries=entries,
                              export_library=exe.export_library, weights=weights, meta=self.meta,
                              tokenizer=self.tokenizer)


class ProgramView:
    """What the views over a CompiledProgram (CompiledModel, CompiledLM) take from it as it is: its executable,
    timings and tokenizer, and saving it."""
    program: CompiledProgram

    @property
    def executable(self):
        return self.program.executable

    @property
    def timings(self) -> dict:
        return self.program.timings

    @property
    def tokenizer(self):
        return self.program.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self.program.tokenizer = tok

    def save(self, path) -> None:
        """Write the one artifact format (llmasos/artifact.py); a compiled LM's (kind "lm") loads with TVM's
        runtime alone."""
        self.program.save(path)


# -- the pipeline -----------------------------------------------------------------------------------------
def prepare(target: Any = "cpu", passes: Any = "fuse", calibration=None, tuning_db=None) -> Plan:
    """Resolve the target, open the tuning database and parse the pass pipeline: every option fails here,
    before any import or build."""
    from .backends.tvm import resolve_target  # deferred: the TVM compiler
    if passes is not None and not isinstance(passes, (str, list, tuple)):
        raise CompileError(f"passes must be a pipeline string (e.g. 'fuse'), a list of passes or None, got "
                           f"{type(passes).__name__} {passes!r}")
    try:
        spec = resolve_target(target)
    except TypeError as e:
        raise CompileError(str(e)) from None
    if tuning_db is not None:
        from .backends.tvm.tuning import TuningDatabase  # deferred: the TVM compiler (MetaSchedule)
        tuning_db = TuningDatabase.open(tuning_db, spec)
    try:
        pipeline = PassManager(passes, calibration=calibration, target=spec.name) if passes else None
    except TypeError as e:   # a list item that is not a pass (a pipeline string's errors are PipelineErrors)
        raise CompileError(f"passes: {e}") from None
    return Plan(spec, pipeline, tuning_db)


def lower(plan: Plan, frontend: Callable[[Any], Source]) -> Source:
    """``frontend(spec)`` -> Source (timed as import_s), every graph verified, then the pass pipeline run on
    each (passes_s). Returns the Source with the optimised graphs."""
    t0 = time.perf_counter()
    source = frontend(plan.spec)
    if not source.graphs:
        raise ValueError("the front door produced no graphs")
    for g in source.graphs.values():
        verify(g)
    plan.timings["import_s"] = time.perf_counter() - t0
    if plan.pipeline is not None:
        t0 = time.perf_counter()
        source.graphs = {name: plan.pipeline.run(g) for name, g in source.graphs.items()}
        plan.timings["passes_s"] = time.perf_counter() - t0
    return source


def build_library(plan: Plan, source: Source):
    """One library with an entry function per graph, weights uploaded once (backends.tvm.Executable)."""
    from .backends.tvm import build_functions  # deferred: the TVM compiler
    from .backends.tvm.memory import MemoryBudgetError as _Budget
    t0 = time.perf_counter()
    try:
        exe = build_functions(source.graphs, plan.spec, cuda_graph=source.cuda_graph, tuning_db=plan.tuning_db)
    except _Budget as e:
        raise MemoryBudgetError(str(e)) from None
    if exe.memory is not None:
        plan.timings["memory_estimate_bytes"] = exe.memory.total
    plan.timings["build_s"] = time.perf_counter() - t0
    if exe.tuned_kernels is not None:
        plan.timings["tuned_kernels"] = len(exe.tuned_kernels)
    return exe


def compile_program(kind: str, frontend: Callable[[Any], Source], target: Any = "cpu", *, passes: Any = "fuse",
                    calibration=None, tuning_db=None, tokenizer=None) -> CompiledProgram:
    """prepare -> lower -> build_library: the one compile pipeline of every front door."""
    if kind not in artifact.KINDS:
        raise ValueError(f"kind must be one of {artifact.KINDS}, got {kind!r}")
    plan = prepare(target, passes, calibration, tuning_db)
    source = lower(plan, frontend)
    exe = build_library(plan, source)
    return CompiledProgram(kind, source.graphs, exe, plan.spec, source.conventions, plan.timings, tokenizer,
                           source.meta)


# -- loading ----------------------------------------------------------------------------------------------
def saved_target(c) -> Any:
    """The Target an artifact was built for: its registered target by name, with the saved TVM dict (a plugin
    that shares a TVM kind with a built-in target reloads as itself), else the first registered target
    accepting the dict's kind. A manifest naming a registered target with a dict of a kind that target does
    not take, or a dict no registered target takes, is refused: ArtifactError naming the field (an unknown
    target passed by the caller, ``target=``, stays UnknownTargetError)."""
    # deferred: TVM (its runtime suffices here)
    from .backends.tvm import UnknownTargetError, known_targets, resolve_target
    where = f"{c.path / artifact.MANIFEST}: " if getattr(c, "path", None) is not None else "artifact manifest: "
    name = (c.target_name or "").partition(":")[0]
    if name in known_targets():
        spec = resolve_target(name)
        if c.target is None:
            return spec
        if spec.accepts(c.target):
            return spec.with_target(c.target)
        raise ArtifactError(f"{where}target_dict: kind {c.target.get('kind')!r} is not one target '{name}' (the "
                            f"manifest's 'target') builds for ({', '.join(sorted(spec.tvm_kinds))}): the manifest "
                            f"is inconsistent; re-save the artifact, or pass target= to load it for another target")
    try:
        return resolve_target(c.target)
    except (UnknownTargetError, TypeError) as e:
        raise ArtifactError(f"{where}target_dict: the saved target {c.target_name!r} is not registered here and "
                            f"{e}; install the plugin that provides it, or pass target= to load it for another "
                            f"target") from None


def load_program(path, target: Any = None, kind: Optional[str] = None) -> CompiledProgram:
    """A CompiledProgram from an artifact directory (any version llmasos/artifact.py reads).

    ``kind``: the kind the caller needs (another is refused naming its loader). ``target`` overrides the
    saved one (e.g. another CUDA arch). A model's IR is parsed (its view checks calls against the graph's
    inputs and prints it); an LM runs from the library's signature alone, with TVM's runtime only."""
    from .backends.tvm import Executable, Signature, resolve_target  # deferred: TVM (its runtime suffices here)

    c = artifact.read(path, kind)
    where = c.path / artifact.MANIFEST
    try:
        conventions = {n: CallConvention.from_json(e["convention"], f"{where}: entry '{n}'")
                       for n, e in c.entries.items() if e.get("convention") is not None}
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{where}: malformed calling convention ({type(e).__name__}: {e})") from None
    spec = resolve_target(target) if target is not None else saved_target(c)
    try:
        weights = c.weights()
    except Exception as e:  # noqa: BLE001 -- safetensors' own errors: the file is the artifact's fault
        raise ArtifactError(f"{c.path / artifact.WEIGHTS}: unreadable ({type(e).__name__}: {e})") from None
    graphs = {}
    if c.kind == "model":
        for name in c.entries:
            ir = c.entries[name].get("ir")
            if not isinstance(ir, str) or not ir.endswith(".llir"):
                raise ArtifactError(f"{where}: entry '{name}' names no IR file (graph.<entry>.llir), got {ir!r}")
            try:
                g = parse(c.ir(name), params=weights)
                verify(g)
            except (OSError, UnicodeDecodeError) as e:
                raise ArtifactError(f"{c.path / ir}: unreadable IR ({type(e).__name__}: {e})") from None
            except ValueError as e:   # ParseError, VerificationError
                raise ArtifactError(f"{c.path / (c.entries[name].get('ir') or '?')}: {e}") from None
            missing = set(g.params) - set(weights)
            if missing:
                raise ArtifactError(f"{c.path}: {artifact.WEIGHTS} lacks parameters {sorted(missing)[:5]}")
            graphs[name] = g
            if name not in conventions:
                raise ArtifactError(f"{where}: entry '{name}' of a compiled model has no calling convention")
            _check_convention(conventions.get(name), g, f"{where}: entry '{name}'")
    if c.signature is not None:
        try:
            sig = Signature.from_json(json.dumps(c.signature))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed library signature ({type(e).__name__}: {e})") from None
    else:  # a v1 model artifact: the library's signature is its graph's
        sig = Signature.of_functions(graphs, lifted=False)
    if graphs:   # the signature the runtime checks calls against is the IR's (the IR files are checksummed)
        _check_signature(sig, Signature.of_functions(graphs, sig.lifted), where)
    _check_weights(sig, weights, c.path)
    if c.kind == "lm":
        _check_lm(c.meta, sig, weights, where)
    spec.ensure_runtime()   # e.g. with TVM's runtime alone, CUDA's device API before the library loads
    import tvm  # deferred: TVM
    exe = Executable(tvm.runtime.load_module(str(c.library)), spec, sig, weights)
    tok = None
    if c.tokenizer:
        import transformers  # deferred: transformers (optional)
        tok = transformers.AutoTokenizer.from_pretrained(str(c.tokenizer_dir()), trust_remote_code=False)
    meta = dict(c.meta, artifact=str(c.path))
    return CompiledProgram(c.kind, graphs, exe, spec, conventions, {}, tok, meta)


def _check_convention(conv, g, where: str) -> None:
    """A saved calling convention fits its graph: one name per input, output indices in range."""
    if conv is None:
        return
    if len(conv.input_names) != len(g.inputs):
        raise ArtifactError(f"{where}: {len(conv.input_names)} input names for a graph of {len(g.inputs)} inputs")
    leaves = getattr(conv.out_spec, "num_leaves", len(conv.out_leaves))
    if leaves != len(conv.out_leaves):
        raise ArtifactError(f"{where}: out_spec holds {leaves} output(s) but out_leaves lists {len(conv.out_leaves)}")
    for leaf in conv.out_leaves:
        if isinstance(leaf, int) and not 0 <= leaf < len(g.outputs):
            raise ArtifactError(f"{where}: output leaf {leaf} is outside the graph's {len(g.outputs)} outputs")


def _check_signature(sig, expect, where) -> None:
    def form(s):
        return ([(n, str(t)) for n, t in zip(s.param_names, s.param_types)],
                {f: ([(i.name, str(i.type)) for i in fs.inputs], {k: tuple(v) for k, v in fs.symbols.items()})
                 for f, fs in s.functions.items()})
    got, want = form(sig), form(expect)
    if got != want:
        what = "parameters" if got[0] != want[0] else next(
            f"function '{f}'" for f in want[1] if got[1].get(f) != want[1][f])
        raise ArtifactError(f"{where}: the library signature's {what} differ from the entry functions' IR")


def _check_weights(sig, weights: dict, path) -> None:
    """Every parameter the library takes is in weights.safetensors with the signature's shape and dtype."""
    for name, ty in zip(sig.param_names, sig.param_types):
        t = weights.get(name)
        if t is None:
            raise ArtifactError(f"{path}: {artifact.WEIGHTS} lacks parameter {name!r} the library takes")
        try:
            dt = dtype_from_torch(t.dtype)
        except TypeError:
            dt = None
        if dt is not ty.dtype or tuple(t.shape) != tuple(ty.shape):
            raise ArtifactError(f"{path}: parameter {name!r} is {str(t.dtype).replace('torch.', '')}"
                                f"{list(t.shape)} in {artifact.WEIGHTS}, but the library takes {ty}")


def _check_lm(meta: dict, sig, weights: dict, where) -> None:
    """An LM manifest's meta agrees with the library: the caches hold max_seq positions, the embedding has
    vocab rows, and the saved DecoderConfig says the same."""
    fns = sig.functions
    paged = meta.get("kv", "contiguous") == "paged"
    # a paged LM may have the ragged step too (one saved before it existed has not)
    if not {"prefill", "decode"} <= set(fns) <= {"prefill", "decode", *(("ragged",) if paged else ())}:
        allowed = "prefill and decode" + (" (and ragged)" if paged else "")
        raise ArtifactError(f"{where}: an LM library has the functions {allowed}, this one {list(fns)}")
    vocab, max_seq = meta["vocab"], meta["max_seq"]
    if paged:
        # ids, pos, last, block_table [batch, max_blocks], then the pools [blocks, kv_heads, block_size, head_dim]
        inputs = fns["decode"].inputs
        pools, bs = inputs[4:], meta["block_size"]
        if len(inputs) < 4 or not pools or any(len(i.type.shape) != 4 for i in pools):
            raise ArtifactError(f"{where}: the decode function takes no paged KV pools "
                                f"[blocks, kv_heads, block_size, head_dim] after ids, pos, last and the block table")
        table = inputs[3].type.shape
        if pools[0].type.shape[2] != bs or len(table) != 2 or not isinstance(table[1], int) or table[1] * bs < max_seq:
            raise ArtifactError(f"{where}: meta.block_size {bs} and max_seq {max_seq} disagree with the library's "
                                f"pools {list(pools[0].type.shape)} and block table {list(table)}")
    else:
        caches = fns["decode"].inputs[3:]
        if not caches or any(len(i.type.shape) != 4 for i in caches):
            raise ArtifactError(f"{where}: the decode function takes no KV caches [batch, heads, positions, "
                                f"head_dim]")
        if caches[0].type.shape[2] != max_seq:
            raise ArtifactError(f"{where}: meta.max_seq is {max_seq} but the library's caches hold "
                                f"{caches[0].type.shape[2]} positions")
    embed = weights.get("embed.weight")
    if embed is not None and embed.shape[0] != vocab:
        raise ArtifactError(f"{where}: meta.vocab is {vocab} but the embedding has {embed.shape[0]} rows")
    cfg = meta.get("config")
    if cfg is not None:   # (CompiledLM builds the DecoderConfig from it, refusing unknown fields)
        if not isinstance(cfg.get("vocab"), int) or not isinstance(cfg.get("max_positions"), int):
            raise ArtifactError(f"{where}: meta.config lacks the integers vocab and max_positions")
        if cfg["vocab"] != vocab:
            raise ArtifactError(f"{where}: meta.vocab {vocab} differs from meta.config.vocab {cfg['vocab']}")
        if max_seq > cfg["max_positions"]:
            raise ArtifactError(f"{where}: meta.max_seq {max_seq} exceeds the model's positions "
                                f"{cfg['max_positions']}")


__all__ = ["CallConvention", "CompileError", "MemoryBudgetError", "CompiledProgram", "Plan", "Source", "prepare",
           "lower", "build_library", "compile_program", "load_program", "MAIN"]
