"""The one on-disk form of a compiled program: a directory, no pickle anywhere.

    manifest.json          {"format": "llmasos", "version": 2, "kind": "model" | "lm", ...} (below)
    module.so              the TVM-compiled library: one entry function per graph (main; prefill, decode)
    weights.safetensors    the parameters, stored once for every entry function
    graph.<entry>.llir     the IR text of each entry function (llmasos/ir's canonical text form, one graph
                           a file: ``llmasos opt graph.decode.llir`` reads it back)
    tokenizer/             when the program has a tokenizer (transformers' save_pretrained files)

manifest.json (version 2):

    format, version        "llmasos", 2
    kind                   "model" (llmasos.compile: CompiledModel) or "lm" (llmasos.compile_lm: CompiledLM)
    llmasos_version        the writer's package version (informational)
    target, target_dict    the target's name and TVM target dict
    signature              the library's entry functions, their inputs and symbol ranges, and the order of
                           the parameters they share (backends.tvm.Signature.to_json()): enough to run the
                           library with TVM's runtime alone
    entries                {name: {"ir": "graph.<name>.llir", "convention": ...}} in the library's order;
                           "convention" (model kind) maps a Python call onto the entry's inputs and its
                           outputs back onto the model's output structure: input_names, in_spec and out_spec
                           (torch pytree TreeSpecs as JSON text), out_leaves (an output index, or
                           {"const": value})
    meta                   per kind: for "lm" vocab, max_seq, cuda_graph, the DecoderConfig and the KV layout
                           (kv: "contiguous" | "paged", block_size)
    tokenizer              whether tokenizer/ is present
    files                  {relative path: {"bytes", "sha256"}} for every other file, tokenizer/ included

The manifest is checked against its schema (``check_manifest``: every field typed, unknown fields refused),
every file against the manifest (size and sha256; a file it does not list is refused), so a truncated,
corrupted or edited artifact fails with a message naming the field or file instead of crashing inside TVM
(llmasos.driver then checks the weights against the library's signature and an LM's meta against both). Reading an artifact never imports or runs anything
its data names (only module.so is loaded, as a library): the pytree node types of the output structure
must already be registered in this process, except the ModelOutput classes of transformers.modeling_outputs,
which are resolved from that one module; anything else is refused with a message saying what to import.

Older artifacts: "llmasos-artifact" v1 (llmasos.compile: graph.llir, no signature) and "llmasos-lm" v1
(llmasos.compile_lm: no IR) are read as version 2 in memory. A newer version is refused naming both.

This module knows the files and the manifest; llmasos.driver turns what it reads into a CompiledProgram.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

FORMAT = "llmasos"
VERSION = 2
KINDS = ("model", "lm")
LIBRARY, WEIGHTS, MANIFEST, TOKENIZER = "module.so", "weights.safetensors", "manifest.json", "tokenizer"
# the formats version 2 replaced, and what each holds
V1_FORMATS = {"llmasos-artifact": ("model", (LIBRARY, WEIGHTS, "graph.llir")),
              "llmasos-lm": ("lm", (LIBRARY, WEIGHTS))}
WHAT = {None: "an LLMasOS artifact", "model": "an LLMasOS artifact", "lm": "an LLMasOS LM artifact"}
NOUN = {"model": "a compiled model", "lm": "a compiled LM"}
LOADER = {"model": "llmasos.load", "lm": "llmasos.load_lm"}


class ArtifactError(RuntimeError):
    pass


def ir_file(entry: str) -> str:
    return f"graph.{entry}.llir"


@dataclass
class Contents:
    """A checked artifact directory, whatever its version, as version 2 describes it."""
    path: Path
    format: str
    version: int
    kind: str
    target: Any                       # the TVM target dict
    signature: Optional[dict]         # Signature JSON; None for v1 model artifacts (derived from the IR)
    entries: dict                     # name -> {"ir": file or None, "convention": dict or None}
    meta: dict = field(default_factory=dict)
    tokenizer: bool = False
    target_name: Optional[str] = None  # the registered target it was built for (a plugin's name, say)

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    def weights(self) -> dict:
        """{parameter name: torch tensor}."""
        from safetensors.torch import load_file  # deferred: torch
        return load_file(str(self.path / WEIGHTS))

    def ir(self, entry: str) -> Optional[str]:
        f = self.entries[entry].get("ir")
        return None if f is None else (self.path / f).read_text()

    def tokenizer_dir(self) -> Optional[Path]:
        return self.path / TOKENIZER if self.tokenizer else None


# -- writing ----------------------------------------------------------------------------------------------
def write(path, *, kind: str, target_name: str, target_dict, signature: dict, entries: dict,
          export_library: Callable[[str], Any], weights: dict, meta: Optional[dict] = None, tokenizer=None) -> Path:
    """Write an artifact directory (atomically: a ``.partial`` sibling renamed at the end).

    entries: {name: (ir text, convention dict or None)} in the library's order. export_library(file) writes
    module.so. weights: {name: CPU torch tensor}. tokenizer: anything with ``save_pretrained(dir)``."""
    from safetensors.torch import save_file  # deferred: torch

    if kind not in KINDS:
        raise ArtifactError(f"artifact kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_library(str(tmp / LIBRARY))
    save_file(weights, str(tmp / WEIGHTS))
    listed = {}
    for name, (text, convention) in entries.items():
        (tmp / ir_file(name)).write_text(text)
        listed[name] = {"ir": ir_file(name), **({"convention": convention} if convention is not None else {})}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER))
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": kind, "llmasos_version": _package_version(),
        "target": target_name, "target_dict": target_dict,
        "signature": signature, "entries": listed, "meta": dict(meta or {}),
        "tokenizer": tokenizer is not None,
        "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# -- reading ----------------------------------------------------------------------------------------------
def read(path, kind: Optional[str] = None) -> Contents:
    """Check the artifact directory ``path`` (format, version, every file's size and sha256) and describe it.
    ``kind``: the kind the caller needs ("model" or "lm"); another kind is refused naming the loader to use."""
    path = Path(path)
    what = WHAT[kind]
    manifest = _manifest(path, what)
    fmt, version = manifest.get("format"), manifest.get("version")
    if not isinstance(fmt, str):
        raise ArtifactError(f"{path / MANIFEST}: not the manifest of {what} (format {fmt!r}, expected {FORMAT!r})")
    if fmt == FORMAT:
        if not isinstance(version, int) or version < 2:
            raise ArtifactError(f"{path / MANIFEST}: format version {version!r} is not one this LLMasOS reads "
                                f"(format {FORMAT!r} starts at version 2)")
        if version > VERSION:
            raise ArtifactError(f"{path / MANIFEST}: format version {version} is newer than this LLMasOS reads "
                                f"({VERSION}); upgrade llmasos to load it")
        found = manifest.get("kind")
        if found not in KINDS:
            raise ArtifactError(f"{path / MANIFEST}: kind {found!r} is not one of {KINDS}")
    elif fmt in V1_FORMATS:
        if version != 1:
            raise ArtifactError(f"{path / MANIFEST}: format {fmt!r} version {version!r} is not supported (only 1; "
                                f"this LLMasOS writes {FORMAT!r} version {VERSION})")
        found = V1_FORMATS[fmt][0]
    else:
        raise ArtifactError(f"{path / MANIFEST}: not the manifest of {what} (format {fmt!r}, expected {FORMAT!r})")
    if kind is not None and found != kind:   # before the file checks: the wrong loader is the first thing to say
        raise ArtifactError(f"{path}: holds {NOUN[found]} (kind {found!r}), not {NOUN[kind]}; load it with "
                            f"{LOADER[found]}")
    try:
        return _read_v2(path, manifest) if fmt == FORMAT else _read_v1(path, manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path / MANIFEST}: malformed manifest ({type(e).__name__}: {e})") from None


def kind_of(path) -> Optional[str]:
    """The kind ("model", "lm") of the artifact directory ``path``, or None when it is not one. Reads only
    the manifest (no checks): for dispatching, e.g. the CLI's ``generate MODEL|ARTIFACT``."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    if m.get("format") == FORMAT:
        return m.get("kind") if m.get("kind") in KINDS else None
    return V1_FORMATS.get(m.get("format"), (None,))[0]


def _manifest(path: Path, what: str) -> dict:
    mf = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path} is not {what} directory")
    if not mf.exists():
        raise ArtifactError(f"{path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mf}: not the manifest of {what} (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def _check_files(path: Path, manifest: dict, required) -> None:
    """Every file the manifest lists (and every required one) is present with its size and sha256."""
    mf = path / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{mf}: no file list")
    for f in required:
        if f not in files:
            raise ArtifactError(f"{mf}: no entry for {f}")
    for f, info in files.items():
        p = path / f
        if not isinstance(f, str) or not _inside(path, p):
            raise ArtifactError(f"{mf}: file {f!r} lies outside the artifact")
        if not isinstance(info, dict):
            raise ArtifactError(f"{mf}: files[{f!r}] must be an object with 'bytes' and 'sha256', got "
                                f"{type(info).__name__}")
        if not p.exists():
            raise ArtifactError(f"{path}: {f} is missing")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{p}: truncated or altered ({size} bytes, manifest says {info.get('bytes')})")
        if _sha256(p) != info.get("sha256"):
            raise ArtifactError(f"{p}: corrupted (sha256 differs from the manifest)")
    # nothing unlisted is read either: the tokenizer directory is handed whole to transformers
    listed = {(path / f).resolve() for f in files} | {(path / MANIFEST).resolve()}
    for p in sorted(path.rglob("*")):
        if (p.is_file() or p.is_symlink()) and p.resolve() not in listed:
            raise ArtifactError(f"{p}: a file the manifest does not list (an artifact holds only the files its "
                                f"manifest lists, each with its sha256)")


def _read_v2(path: Path, m: dict) -> Contents:
    mf = path / MANIFEST
    check_manifest(m, str(mf))
    kind, entries = m["kind"], m.get("entries")
    if not entries:
        raise ArtifactError(f"{mf}: no entry functions")
    _check_files(path, m, [LIBRARY, WEIGHTS] + [e["ir"] for e in entries.values() if e.get("ir")])
    return Contents(path, FORMAT, m["version"], kind, m.get("target_dict"), m["signature"],
                    {n: dict(e) for n, e in entries.items()}, dict(m.get("meta") or {}), bool(m.get("tokenizer")),
                    m.get("target") if isinstance(m.get("target"), str) else None)


def _read_v1(path: Path, m: dict) -> Contents:
    kind, files = V1_FORMATS[m["format"]]
    _check_files(path, m, files)
    if kind == "model":
        convention = {k: m[k] for k in ("input_names", "in_spec", "out_spec", "out_leaves")}
        return Contents(path, m["format"], 1, kind, m.get("target_dict"), None,
                        {"main": {"ir": "graph.llir", "convention": convention}}, {}, bool(m.get("tokenizer")),
                    m.get("target") if isinstance(m.get("target"), str) else None)
    sig = m["signature"]
    entries = {n: {"ir": None} for n in (sig.get("functions") or {"main": None})}
    meta = {"vocab": m["vocab"], "max_seq": m["max_seq"], "cuda_graph": m.get("cuda_graph", False),
            "config": m.get("config")}
    return Contents(path, m["format"], 1, kind, m.get("target_dict"), sig, entries, meta, bool(m.get("tokenizer")),
                    m.get("target") if isinstance(m.get("target"), str) else None)


# -- the version-2 manifest schema: every field typed, unknown fields refused -----------------------------
_SCALAR = (str, int, float, bool, type(None))
SCHEMA_V2 = {                       # field: (required, allowed JSON types)
    "format": (True, str), "version": (True, int), "kind": (True, str), "llmasos_version": (False, (str, type(None))),
    "target": (False, (str, type(None))), "target_dict": (True, dict), "signature": (True, dict),
    "entries": (True, dict), "meta": (False, dict), "tokenizer": (False, bool), "files": (True, dict),
}
ENTRY_FIELDS = {"ir": (False, (str, type(None))), "convention": (False, dict)}
CONVENTION_FIELDS = {"input_names": (True, list), "in_spec": (True, str), "out_spec": (True, str),
                     "out_leaves": (True, list)}
FILE_FIELDS = {"bytes": (True, int), "sha256": (True, str)}
SIGNATURE_FIELDS = {"inputs": (True, list), "params": (True, list), "symbols": (True, dict), "lifted": (True, bool),
                    "functions": (False, dict)}
FUNCTION_FIELDS = {"inputs": (True, list), "symbols": (True, dict)}
TENSOR_FIELDS = {"name": (True, str), "shape": (True, list), "dtype": (True, str)}
LM_META_FIELDS = {"vocab": (True, int), "max_seq": (True, int), "cuda_graph": (False, bool),
                  "config": (False, (dict, type(None))), "kv": (False, str), "block_size": (False, (int, type(None))),
                  "parallel": (False, dict)}
PARALLEL_FIELDS = {"tp": (True, int), "pp": (True, int), "mesh": (True, dict), "rank": (True, int),
                   "world_size": (True, int)}     # one rank's part of a partitioned LM (llmasos.parallel)


def _typename(t) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true/false",
             float: "a number", type(None): "null"}
    return " or ".join(names.get(x, x.__name__) for x in (t if isinstance(t, tuple) else (t,)))


def _fields(obj, schema: dict, where: str, extra_ok: bool = False) -> None:
    """``obj`` is a JSON object with the schema's fields, each of its type; unknown fields refused."""
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: must be {_typename(dict)}, got {type(obj).__name__}")
    for k, (required, types) in schema.items():
        if k not in obj:
            if required:
                raise ArtifactError(f"{where}: field {k!r} is missing")
            continue
        v = obj[k]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in
                                           (types if isinstance(types, tuple) else (types,)))
        if not ok:
            raise ArtifactError(f"{where}: field {k!r} must be {_typename(types)}, got {type(v).__name__} "
                                f"{json.dumps(v)[:60]}")
    unknown = sorted(set(obj) - set(schema))
    if unknown and not extra_ok:
        raise ArtifactError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (this LLMasOS reads "
                            f"{', '.join(schema)}; an artifact from a newer writer may need a newer llmasos)")


def _tensor_list(items: list, where: str) -> None:
    for i, e in enumerate(items):
        _fields(e, TENSOR_FIELDS, f"{where}[{i}]")
        for d in e["shape"]:
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
                raise ArtifactError(f"{where}[{i}]: shape entries are non-negative integers or dim expressions, "
                                    f"got {json.dumps(d)[:60]}")


def _symbols(syms: dict, where: str) -> None:
    for k, v in syms.items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in v) and 0 <= v[0] <= v[1]):
            raise ArtifactError(f"{where}: symbol {k!r} must have bounds [min, max] with 0 <= min <= max, got "
                                f"{json.dumps(v)[:60]}")


def check_manifest(m: dict, where: str) -> None:
    """The version-2 schema (SCHEMA_V2 and the nested field tables): every field present and typed, no field
    this version does not define. Raises ArtifactError naming the field."""
    _fields(m, SCHEMA_V2, where)
    for f, info in m["files"].items():
        _fields(info, FILE_FIELDS, f"{where}: files[{f!r}]")
    for name, e in m["entries"].items():
        _fields(e, ENTRY_FIELDS, f"{where}: entries[{name!r}]")
        if "convention" in e:
            c = e["convention"]
            _fields(c, CONVENTION_FIELDS, f"{where}: entries[{name!r}].convention")
            if not all(isinstance(n, str) for n in c["input_names"]):
                raise ArtifactError(f"{where}: entries[{name!r}].convention.input_names must be strings")
            for leaf in c["out_leaves"]:
                ok = (isinstance(leaf, int) and not isinstance(leaf, bool) and leaf >= 0) or (
                    isinstance(leaf, dict) and set(leaf) == {"const"} and isinstance(leaf["const"], _SCALAR))
                if not ok:
                    raise ArtifactError(f"{where}: entries[{name!r}].convention.out_leaves: each is an output "
                                        f"index or {{\"const\": a scalar}}, got {json.dumps(leaf)[:60]}")
    sig, sw = m["signature"], f"{where}: signature"
    _fields(sig, SIGNATURE_FIELDS, sw)
    _tensor_list(sig["inputs"], f"{sw}.inputs")
    _tensor_list(sig["params"], f"{sw}.params")
    _symbols(sig["symbols"], f"{sw}.symbols")
    for name, fn in (sig.get("functions") or {}).items():
        _fields(fn, FUNCTION_FIELDS, f"{sw}.functions[{name!r}]")
        _tensor_list(fn["inputs"], f"{sw}.functions[{name!r}].inputs")
        _symbols(fn["symbols"], f"{sw}.functions[{name!r}].symbols")
    if sig.get("functions") and list(sig["functions"]) != list(m["entries"]):
        raise ArtifactError(f"{where}: entries {list(m['entries'])} differ from the library's functions "
                            f"{list(sig['functions'])}")
    if not isinstance(m["target_dict"].get("kind"), str):
        raise ArtifactError(f"{where}: target_dict must name a TVM target kind ('kind': 'llvm', 'cuda', ...)")
    if m["kind"] == "lm":
        meta = m.get("meta", {})
        _fields(meta, LM_META_FIELDS, f"{where}: meta")
        if "parallel" in meta:
            par = meta["parallel"]
            _fields(par, PARALLEL_FIELDS, f"{where}: meta.parallel")
            if not 0 <= par["rank"] < par["world_size"] or par["tp"] * par["pp"] != par["world_size"]:
                raise ArtifactError(f"{where}: meta.parallel: rank {par['rank']} of world {par['world_size']} with "
                                    f"tp={par['tp']} x pp={par['pp']} is not a rank of that mesh")
        kv = meta.get("kv", "contiguous")
        if kv not in ("contiguous", "paged"):
            raise ArtifactError(f"{where}: meta: kv must be 'contiguous' or 'paged', got {json.dumps(kv)[:60]}")
        bs = meta.get("block_size")
        if kv == "paged" and (not isinstance(bs, int) or isinstance(bs, bool) or not 1 <= bs <= 1024):
            raise ArtifactError(f"{where}: meta: a paged LM's block_size must be an int in 1..1024, got "
                                f"{json.dumps(bs)[:60]}")


def _package_version() -> Optional[str]:
    try:
        return metadata.version("llmasos")
    except metadata.PackageNotFoundError:
        return None


def _inside(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- pytree specs: written by torch, read without importing what they name ---------------------------------
# the one module a spec may name that is imported on its behalf: transformers' ModelOutput classes register
# themselves as pytree nodes when their module is imported, and this module is fixed, not taken from the data
MODEL_OUTPUTS = "transformers.modeling_outputs"
SAFE_FACTORIES = ("list", "dict", "set", "tuple", "int", "float", "str", "bool")   # a defaultdict's, from builtins


def spec_dumps(spec) -> str:
    from torch.utils import _pytree as pytree  # deferred: torch
    return pytree.treespec_dumps(spec)


def spec_loads(text: str, where: str):
    """A torch pytree TreeSpec from ``treespec_dumps`` text, refusing anything whose loading would import or
    run code the text names: node types must be registered already (or be a ModelOutput of
    transformers.modeling_outputs), contexts must be plain JSON (torch would import an enum's module), and a
    defaultdict's factory must be a builtin (torch would import its module)."""
    from torch.utils import _pytree as pytree  # deferred: torch

    try:
        protocol, schema = json.loads(text)
    except (ValueError, TypeError):
        raise ArtifactError(f"{where}: not a serialized pytree spec") from None
    if protocol != 1:
        raise ArtifactError(f"{where}: pytree spec protocol {protocol!r} is not supported (1)")
    _check_spec_node(schema, where, pytree)
    try:
        return pytree.treespec_loads(text)
    except Exception as e:  # noqa: BLE001 -- any malformed spec is the artifact's fault
        raise ArtifactError(f"{where}: cannot read the pytree spec: {type(e).__name__}: {e}") from None


def _check_spec_node(node, where: str, pytree) -> None:
    if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        raise ArtifactError(f"{where}: malformed pytree spec node {str(node)[:80]}")
    name, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        raise ArtifactError(f"{where}: malformed pytree spec node {str(node)[:80]}")
    if name is None:  # a leaf
        if context is not None or children:
            raise ArtifactError(f"{where}: malformed pytree leaf {str(node)[:80]}")
        return
    typ = _registered_type(name, where, pytree)
    custom = pytree.SUPPORTED_SERIALIZED_TYPES[typ].from_dumpable_context
    if name == "collections.namedtuple":
        if not isinstance(context, str):
            raise ArtifactError(f"{where}: malformed namedtuple context {context!r}")
        _registered_type(context, where, pytree)
    elif name == "collections.defaultdict":
        ctx = context if isinstance(context, dict) else {}
        module, factory = ctx.get("default_factory_module"), ctx.get("default_factory_name")
        if module != "builtins" or factory not in SAFE_FACTORIES:
            raise ArtifactError(f"{where}: a defaultdict whose factory is not one of the builtins "
                                f"{', '.join(SAFE_FACTORIES)} is refused (got {module}.{factory}; loading it would "
                                f"import {module!r})")
    elif custom is not None:
        raise ArtifactError(f"{where}: pytree node type {name!r} has its own context deserializer, which reading an "
                            f"artifact does not run")
    else:
        try:
            ctx = json.loads(context) if isinstance(context, str) else context
        except ValueError:
            raise ArtifactError(f"{where}: malformed context of pytree node {name!r}") from None
        if _has_enum(ctx):
            raise ArtifactError(f"{where}: pytree node {name!r} has an enum in its context; loading it would import "
                                f"the enum's module, which reading an artifact never does")
    for child in children:
        _check_spec_node(child, where, pytree)


def _registered_type(name, where: str, pytree):
    table = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE
    if not isinstance(name, str) or name == "NO_SERIALIZED_TYPE_NAME_FOUND":
        raise ArtifactError(f"{where}: malformed pytree node type {name!r}")
    if name not in table and name.startswith(MODEL_OUTPUTS + ".") and "." not in name[len(MODEL_OUTPUTS) + 1:]:
        try:
            import transformers.modeling_outputs  # noqa: F401 -- deferred: transformers; a fixed module (see above)
        except ImportError:
            pass
    if name not in table:
        raise ArtifactError(f"{where}: the output structure uses {name!r}, which is not a registered pytree node "
                            f"type in this process. Loading an artifact never imports modules it names: import the "
                            f"module that defines {name.rsplit('.', 1)[-1]} (registering it) before loading")
    return table[name]


def _has_enum(obj) -> bool:
    if isinstance(obj, dict):
        return "__enum__" in obj or any(_has_enum(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_enum(v) for v in obj)
    return False
