"""The compiled artifact on disk: a directory, no pickle anywhere.

    manifest.json        format version, target, input names, output structure, file sizes and sha256
    module.so            the TVM-compiled library
    weights.safetensors  parameters, stored once
    graph.llir           the IR text (input types, symbol ranges; parsed back on load)

Every file is checked against the manifest on load, so a truncated or corrupted artifact fails with a
message naming the file instead of crashing inside TVM.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

FORMAT = "llmasos-artifact"
VERSION = 1
FILES = ("module.so", "weights.safetensors", "graph.llir")


class ArtifactError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec_dumps(spec) -> str:
    from torch.utils import _pytree as pytree
    return pytree.treespec_dumps(spec)


def _spec_loads(text: str):
    import importlib

    from torch.utils import _pytree as pytree
    # a ModelOutput's pytree registration happens when its module is imported
    for name in set(_type_names(json.loads(text))):
        mod = name.rsplit(".", 1)[0]
        if mod and mod != "builtins":
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ArtifactError(f"the output structure uses {name}, whose module cannot be imported: {e}")
    return pytree.treespec_loads(text)


def _type_names(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            yield obj["type"]
        for v in obj.values():
            yield from _type_names(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _type_names(v)


def save(cm, path) -> Path:
    from safetensors.torch import save_file

    from .ir.printer import print_graph
    from .ir.torch_dtypes import numpy_to_torch

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cm.executable.export_library(str(tmp / "module.so"))
    tensors = {}
    for name in cm.graph.params:
        data = cm.graph.param_data[name]
        t = data if hasattr(data, "detach") else numpy_to_torch(data)
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "weights.safetensors"))
    (tmp / "graph.llir").write_text(print_graph(cm.graph))
    if cm.tokenizer is not None:
        cm.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    sig = cm.signature
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "target": cm.target.name,
        "target_dict": cm.target.target,
        "input_names": list(sig.input_names),
        "in_spec": _spec_dumps(sig.in_spec),
        "out_spec": _spec_dumps(sig.out_spec),
        "out_leaves": [leaf if isinstance(leaf, int) else {"const": leaf[1]} for leaf in sig.out_leaves],
        "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES},
        "tokenizer": cm.tokenizer is not None,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_manifest(path: Path, fmt: str = FORMAT, version: int = VERSION, files=FILES,
                  what: str = "an LLMasOS artifact") -> dict:
    """The manifest of the artifact directory ``path``, after checking its format, version and every file's
    size and sha256 (LM artifacts, llmasos/llm/artifact.py, pass their own format and files)."""
    mf = path / "manifest.json"
    if not path.is_dir():
        raise ArtifactError(f"{path} is not {what} directory")
    if not mf.exists():
        raise ArtifactError(f"{path}: manifest.json is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mf}: not the manifest of {what} (format {got!r}, expected {fmt!r})")
    if manifest.get("version") != version:
        raise ArtifactError(f"{mf}: format version {manifest.get('version')} is not supported (this is {version})")
    for f in files:
        info = manifest.get("files", {}).get(f)
        p = path / f
        if info is None:
            raise ArtifactError(f"{mf}: no entry for {f}")
        if not p.exists():
            raise ArtifactError(f"{path}: {f} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"{p}: truncated or altered ({size} bytes, manifest says {info['bytes']})")
        if _sha256(p) != info["sha256"]:
            raise ArtifactError(f"{p}: corrupted (sha256 differs from the manifest)")
    return manifest


def load(path):
    from safetensors.torch import load_file

    from .backends.tvm import Executable, resolve_target
    from .compiled import CompiledModel, Signature
    from .ir.parser import parse
    from .ir.verifier import verify

    path = Path(path)
    manifest = read_manifest(path)
    weights = load_file(str(path / "weights.safetensors"))
    graph = parse((path / "graph.llir").read_text(), params=weights)
    missing = set(graph.params) - set(weights)
    if missing:
        raise ArtifactError(f"{path}: weights.safetensors lacks parameters {sorted(missing)[:5]}")
    verify(graph)
    spec = resolve_target(manifest["target_dict"])
    exe = Executable.load(str(path / "module.so"), graph, weights, spec)
    leaves = [leaf if isinstance(leaf, int) else ("const", leaf["const"]) for leaf in manifest["out_leaves"]]
    sig = Signature(_spec_loads(manifest["in_spec"]), _spec_loads(manifest["out_spec"]), leaves,
                    manifest["input_names"])
    tok = None
    if manifest.get("tokenizer"):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return CompiledModel(graph, exe, sig, spec, {}, tok)
