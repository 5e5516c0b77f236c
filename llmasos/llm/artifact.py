"""A CompiledLM on disk, loadable with TVM's runtime alone (no compiler, no IR parsing, no torch.export).

    manifest.json        format, target, vocab, max_seq, decoder config, the library's signature (entry
                         functions, inputs, parameter order), file sizes and sha256
    module.so            the compiled prefill + decode library
    weights.safetensors  parameters, stored once
    tokenizer/           when the model has one
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..artifact import ArtifactError, _sha256
from ..artifact import read_manifest as _read_manifest

FORMAT = "llmasos-lm"
VERSION = 1
FILES = ("module.so", "weights.safetensors")


def save(lm, path) -> Path:
    from safetensors.torch import save_file

    from ..ir.graph import param_array
    from ..ir.torch_dtypes import numpy_to_torch

    if not lm.graphs:
        raise ArtifactError("this CompiledLM was loaded from an artifact; copy that directory instead")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.executable.export_library(str(tmp / "module.so"))
    g = lm.graphs["prefill"]
    tensors = {}
    for name in g.params:
        data = g.param_data[name]
        t = data if hasattr(data, "detach") else numpy_to_torch(param_array(data))
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "weights.safetensors"))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    spec = lm.executable.spec
    manifest = {
        "format": FORMAT, "version": VERSION, "target": spec.name, "target_dict": spec.target,
        "vocab": lm.vocab, "max_seq": lm.max_seq, "cuda_graph": lm.cuda_graph,
        "config": dataclasses.asdict(lm.config) if lm.config is not None else None,
        "signature": json.loads(lm.executable.signature.to_json()),
        "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES},
        "tokenizer": lm.tokenizer is not None,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_manifest(path: Path) -> dict:
    return _read_manifest(path, FORMAT, VERSION, FILES, "an LLMasOS LM artifact")


def is_lm_artifact(path) -> bool:
    mf = Path(path) / "manifest.json"
    try:
        return json.loads(mf.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load(path, target=None):
    """Load a saved CompiledLM (``target`` overrides the saved one, e.g. another CUDA arch)."""
    import tvm
    from safetensors.torch import load_file

    from ..backends.tvm import Executable, Signature, resolve_target
    from .runtime import CompiledLM

    path = Path(path)
    manifest = read_manifest(path)
    spec = resolve_target(target if target is not None else manifest["target_dict"])
    sig = Signature.from_json(json.dumps(manifest["signature"]))
    weights = load_file(str(path / "weights.safetensors"))
    _ensure_runtime(spec)
    lib = tvm.runtime.load_module(str(path / "module.so"))
    exe = Executable(lib, spec, sig, weights)
    cfg = None
    if manifest.get("config"):
        from .model import DecoderConfig
        cfg = DecoderConfig(**manifest["config"])
    tok = None
    if manifest.get("tokenizer"):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return CompiledLM(exe, vocab=manifest["vocab"], max_seq=manifest["max_seq"], config=cfg, tokenizer=tok,
                      cuda_graph=manifest.get("cuda_graph", False), meta={"artifact": str(path)})


def _ensure_runtime(spec) -> None:
    from ..backends.tvm.build import _ensure_device_api
    _ensure_device_api(spec.device)
