"""Passes and the pass registry.

A pass is a small frozen dataclass whose fields are its options, registered under a kebab-case name:

    @register_pass("dce")
    @dataclass(frozen=True)
    class DeadCodeElimination(Pass):
        exact: ClassVar[bool] = True
        def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph: ...

``run`` is pure: it never mutates its input (work on ``graph.clone()``) and returns the input graph
object itself when it changed nothing. An exact pass preserves numerics (the numeric check allows
1e-6 relative); an inexact one sets ``exact = False`` and declares ``rtol``/``atol``.

``ctx`` is the explicit ``PassContext`` of the pipeline run (``PassManager(..., calibration=, target=)``):
calibration data for data-driven passes, the target name as a hint. Options say what a pass does, the
context what the run knows. A pass whose ``run`` takes the graph only (older plugins) is still called
that way (``Pass.apply``).

Passes from other packages register through the ``llmasos.passes`` entry-point group; each entry point
names a Pass subclass (registered under the entry point's name) or a module (imported, so that its
``@register_pass`` decorators run). Plugins load on the first registry lookup.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import importlib
import inspect
import re
import typing
from importlib import metadata
from typing import Any, ClassVar, Optional

from ..ir import Graph, Node
from .calibration import Calibration

PLUGIN_GROUP = "llmasos.passes"
EXACT_RTOL = 1e-6
_NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# Modules whose import registers the passes that ship with llmasos.
BUILTIN_MODULES = ("llmasos.passes.dce", "llmasos.passes.cse", "llmasos.passes.rewrite_pass",
                   "llmasos.passes.merge_linears", "llmasos.passes.fuse_elementwise",
                   "llmasos.passes.split_heads", "llmasos.passes.fuse",
                   "llmasos.passes.quantize", "llmasos.passes.prune", "llmasos.passes.prune_heads",
                   "llmasos.passes.lowrank", "llmasos.passes.tensor_parallel", "llmasos.passes.pipeline_parallel")


class PassError(Exception):
    """A pass could not apply: names the pass and, where there is one, the node."""

    def __init__(self, pass_name: str, message: str, node: Optional[Node] = None):
        self.pass_name = pass_name
        self.node = node
        self.detail = message
        where = f"{node.describe()}: " if node is not None else ""
        super().__init__(f"pass '{pass_name}': {where}{message}")


class PassNotApplicable(PassError):
    """The pass found nothing in the graph it can apply to, and says why (lowrank with no layer that would
    get cheaper, prune-channels with no gated MLP). A pipeline stops on it like on any PassError; tests that
    run every pass on random graphs accept it, and only it."""


class PassRegistryError(ValueError):
    """A bad registration: duplicate or malformed name, or not a frozen Pass dataclass."""


class UnknownPassError(PassRegistryError, KeyError):
    def __init__(self, name: str, known):
        self.name = name
        self.suggestions = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = (f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions
                else f"; known passes: {', '.join(sorted(known)) or '(none)'}")
        super().__init__(f"unknown pass '{name}'{hint}")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may know besides the graph and its own options, handed to ``run(graph, ctx)``.

    ``calibration``: a ``Calibration`` (a list of input batches is wrapped in one) for the data-driven
    passes (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, ASVD / SVD-LLM), None when the run has none.
    ``target``: the name of the target the graph is being compiled for ("cpu", "cuda", ...) when the caller
    knows it -- a hint (a pass must stay correct for every target)."""

    calibration: Optional[Calibration] = None
    target: Optional[str] = None

    def __post_init__(self):
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            object.__setattr__(self, "calibration", Calibration(self.calibration))

    def require_calibration(self, pass_) -> Calibration:
        """The calibration data, or a PassError naming the pass that needs it."""
        if self.calibration is None:
            raise PassError(str(pass_), "needs calibration data: PassManager(..., calibration=Calibration(batches)) "
                                        "or llmasos.compile(..., calibration=batches)")
        return self.calibration


NO_CONTEXT = PassContext()


class Pass:
    """Base of every pass. Subclasses are frozen dataclasses; ``name`` is set by ``register_pass``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    rtol: ClassVar[float] = 0.0  # for inexact passes; exact ones are held to EXACT_RTOL
    atol: ClassVar[float] = 0.0

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run()")

    def apply(self, graph: Graph, ctx: Optional[PassContext] = None) -> Graph:
        """``run(graph, ctx)``, or ``run(graph)`` for a pass written without the context parameter."""
        ctx = NO_CONTEXT if ctx is None else ctx
        return self.run(graph, ctx) if _takes_context(type(self)) else self.run(graph)

    def __call__(self, graph: Graph, ctx: Optional[PassContext] = None) -> Graph:
        return self.apply(graph, ctx)

    def __post_init__(self):
        # Fields are options; a pass built in Python gets the same type checks as one from a pipeline.
        for f, kind in option_types(type(self)).items():
            v = getattr(self, f)
            if not fits_kind(v, kind):
                raise TypeError(f"pass '{self.pass_name}': option '{f}' takes {kind_name(kind)}, got {v!r}")

    @property
    def pass_name(self) -> str:
        return type(self).name or type(self).__name__

    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol) the numeric check holds this pass to."""
        return (EXACT_RTOL, 0.0) if self.exact else (self.rtol, self.atol)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        """The pipeline form: the name and every option that differs from its default."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is dataclasses.MISSING or v != f.default:
                opts.append(f"{f.name}={_format_value(v)}")
        return self.pass_name + (f"{{{','.join(opts)}}}" if opts else "")


@functools.lru_cache(maxsize=None)
def _takes_context(cls: type) -> bool:
    params = list(inspect.signature(cls.run).parameters.values())[1:]  # after self
    return any(p.kind is p.VAR_POSITIONAL for p in params) or \
        sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", v) and v not in ("true", "false"):
            return v
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def option_types(cls: type) -> dict[str, Any]:
    """Field name -> declared type (int, float, bool, str, or Optional of one) for a pass class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def unwrap_optional(kind):
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return kind, False


def fits_kind(v: Any, kind) -> bool:
    kind, optional = unwrap_optional(kind)
    if v is None:
        return optional
    if kind is Any:
        return True
    if kind is bool:
        return isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if typing.get_origin(kind) is typing.Literal:
        return v in typing.get_args(kind)
    return isinstance(v, kind) if isinstance(kind, type) else True


def kind_name(kind) -> str:
    kind, optional = unwrap_optional(kind)
    if typing.get_origin(kind) is typing.Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    else:
        name = getattr(kind, "__name__", str(kind))
    return name + (" or none" if optional else "")


# -- the registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}
_SOURCES: dict[str, str] = {}  # name -> where it was registered from, for duplicate errors
_loaded = False
_load_error: Optional[Exception] = None  # a broken plugin fails every lookup, not just the first
_loading_from: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("llmasos_pass_plugin", default=None)


def register_pass(name: str):
    """Class decorator: register a frozen Pass dataclass under kebab-case ``name``."""
    def deco(cls: type) -> type:
        _register(name, cls, _loading_from.get() or f"{cls.__module__}.{cls.__qualname__}")
        return cls
    return deco


def _register(name: str, cls: type, source: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PassRegistryError(f"pass name {name!r} ({source}) must be kebab-case: lowercase words joined by '-'")
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PassRegistryError(f"pass '{name}' ({source}): {cls!r} is not a subclass of llmasos.passes.Pass")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__dataclass_fields__" not in cls.__dict__:
        raise PassRegistryError(f"pass '{name}' ({source}): {cls.__qualname__} must be a @dataclass(frozen=True)")
    if not cls.exact and cls.rtol == 0.0 and cls.atol == 0.0:
        raise PassRegistryError(f"pass '{name}' ({source}): an inexact pass must declare rtol and/or atol")
    for f, kind in option_types(cls).items():
        base_kind, _ = unwrap_optional(kind)
        if base_kind not in (int, float, bool, str, Any) and typing.get_origin(base_kind) is not typing.Literal:
            raise PassRegistryError(f"pass '{name}' ({source}): option '{f}' has type {kind_name(kind)}; "
                                    f"options are int, float, bool, str, a Literal or Optional of one")
    if name in _REGISTRY:
        raise PassRegistryError(f"duplicate pass name '{name}': registered by {_SOURCES[name]} and again by {source}")
    cls.name = name
    _REGISTRY[name] = cls
    _SOURCES[name] = source


def _ensure_loaded() -> None:
    global _loaded, _load_error
    if _loaded:
        if _load_error is not None:
            raise _load_error
        return
    _loaded = True  # first: plugin modules call register_pass, which must not recurse into loading
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    try:
        _load_plugins()
    except PassRegistryError as e:
        _load_error = e
        raise


def _load_plugins() -> None:
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        dist = getattr(ep, "dist", None)
        source = (f"entry point '{ep.name} = {ep.value}'"
                  + (f" of distribution {dist.metadata['Name']}" if dist is not None else ""))
        token = _loading_from.set(source)
        try:
            try:
                obj = ep.load()
            except PassRegistryError:
                raise
            except Exception as e:
                raise PassRegistryError(f"cannot load pass plugin {source}: {type(e).__name__}: {e}") from e
            if isinstance(obj, type):
                if obj in _REGISTRY.values():
                    continue  # its module registered it with @register_pass
                _register(ep.name, obj, source)
            elif not hasattr(obj, "__path__") and not hasattr(obj, "__file__"):
                raise PassRegistryError(f"pass plugin {source} is neither a Pass subclass nor a module: {obj!r}")
        finally:
            _loading_from.reset(token)


def get_pass(name: str) -> type:
    """The pass class registered under ``name``; unknown names raise with the closest known names."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPassError(name, _REGISTRY) from None


def all_passes() -> dict[str, type]:
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def pass_source(name: str) -> str:
    get_pass(name)
    return _SOURCES[name]
