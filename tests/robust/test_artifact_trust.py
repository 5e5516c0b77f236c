"""Issue 13, artifact trust: loading never imports or runs anything an artifact's data names (only module.so,
the compiled code by definition), every manifest field is typed and checked (our ArtifactError naming the
field, never KeyError / AttributeError), unknown fields and unlisted files are refused, and an LM manifest
is cross-checked against the library and its weights."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import llmasos
from llmasos import ArtifactError
from llmasos.llm.presets import hf_model
from tests import models

PAYLOAD_MODULE = "llmasos_robust_payload"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model artifact and a saved LM artifact (compiled once for the module)."""
    root = tmp_path_factory.mktemp("saved")
    cm = llmasos.compile(models.mlp(), "cpu", example_inputs=(torch.randn(2, 16),), max_batch=4)
    cm.save(root / "model")
    lm = llmasos.compile_lm(hf_model("llama-tiny", seed=2), "cpu", max_seq=16, max_batch=2)
    lm.save(root / "lm")
    return root, cm, lm


def _copy(saved, kind: str, tmp_path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(saved[0] / kind, dst)
    return dst


def _edit(path: Path, fn) -> None:
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


def _load(path: Path, kind: str):
    return llmasos.load(path) if kind == "model" else llmasos.load_lm(path)


# -- nothing the data names is imported or run ------------------------------------------------------------
# sympy.sympify evaluates text as Python: a dim string in the library signature ran this before the fix
SYMPIFY_ESCAPE = ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()"
                  "._module.__builtins__['open']({marker!r}, 'w')")


@pytest.mark.parametrize("kind", ["model", "lm"])
def test_a_dim_expression_in_the_signature_cannot_run_code(saved, tmp_path, kind):
    path = _copy(saved, kind, tmp_path)
    marker = tmp_path / "ran"

    def plant(m):
        fns = m["signature"]["functions"]
        first = next(iter(fns.values()))
        first["inputs"][0]["shape"][0] = SYMPIFY_ESCAPE.format(marker=str(marker))
        m["signature"]["inputs"] = first["inputs"]
    _edit(path, plant)
    with pytest.raises(ArtifactError, match=r"not a dim expression"):
        _load(path, kind)
    assert not marker.exists()


def test_a_named_module_is_never_imported(saved, tmp_path, monkeypatch):
    """A module on sys.path whose import writes a file, named in every field that names a Python thing."""
    marker = tmp_path / "imported"
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{PAYLOAD_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(site))
    leaf = {"type": None, "context": None, "children_spec": []}
    evil_spec = json.dumps([1, {"type": f"{PAYLOAD_MODULE}.Output", "context": '["x"]', "children_spec": [leaf]}])
    for field in ("in_spec", "out_spec"):
        path = _copy(saved, "model", tmp_path / field)
        _edit(path, lambda m: m["entries"]["main"]["convention"].__setitem__(field, evil_spec))
        with pytest.raises(ArtifactError, match=rf"'{PAYLOAD_MODULE}.Output', which is not a registered pytree"):
            llmasos.load(path)
    path = _copy(saved, "model", tmp_path / "dtype")
    _edit(path, lambda m: m["signature"]["params"][0].__setitem__("dtype", f"{PAYLOAD_MODULE}.f32"))
    with pytest.raises(ArtifactError, match="unknown dtype"):
        llmasos.load(path)
    path = _copy(saved, "model", tmp_path / "target")
    _edit(path, lambda m: m.__setitem__("target", f"{PAYLOAD_MODULE}:x"))
    llmasos.load(path)   # an unknown target name falls back to the saved TVM dict, importing nothing
    assert PAYLOAD_MODULE not in sys.modules and not marker.exists()


# -- the schema: every field typed, unknown ones refused -----------------------------------------------------
def _del(*keys):
    def f(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return f


def _set(value, *keys):
    def f(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return f


SCHEMA_CASES = [
    ("model", _del("files"), r"field 'files' is missing"),
    ("model", _set([], "files"), r"field 'files' must be an object, got list"),
    ("model", _set(["module.so"], "files", "module.so"), r"files\['module.so'\]: must be an object, got list"),
    ("model", _del("files", "module.so", "sha256"), r"files\['module.so'\]: field 'sha256' is missing"),
    ("model", _set("12", "files", "module.so", "bytes"), r"field 'bytes' must be an integer, got str"),
    ("model", _del("signature"), r"field 'signature' is missing"),
    ("model", _set(True, "version"), r"format version True is not one this LLMasOS reads"),
    ("model", _set({"x": 1}, "signature", "params"), r"signature: field 'params' must be a list, got dict"),
    ("model", _set([1, 2], "entries", "main"), r"entries\['main'\]: must be an object, got list"),
    ("model", _set([["x"]], "entries", "main", "convention", "out_leaves"), r"out_leaves: each is an output index"),
    ("model", _set([7], "entries", "main", "convention", "out_leaves"), r"output leaf 7 is outside the graph's 1"),
    ("model", _set([], "entries", "main", "convention", "out_leaves"), r"out_spec holds 1 output\(s\) but out_leaves"),
    ("model", _del("entries", "main", "ir"), r"entry 'main' names no IR file"),
    ("model", _del("entries", "main", "convention"), r"entry 'main' of a compiled model has no calling convention"),
    ("model", _set(["llmasos"], "format"), r"not the manifest of an LLMasOS artifact"),
    ("model", _set("yes", "tokenizer"), r"field 'tokenizer' must be true/false, got str"),
    ("model", _set({}, "target_dict"), r"target_dict must name a TVM target kind"),
    ("model", _set("quantum", "target_dict", "kind"),
     r"target_dict: kind 'quantum' is not one target 'cpu' \(the manifest's 'target'\) builds for \(llvm\)"),
    ("model", _set("cuda", "target_dict", "kind"), r"target_dict: kind 'cuda' is not one target 'cpu'"),
    ("model", lambda m: m.update(target="gizmo", target_dict={"kind": "quantum"}),
     r"target_dict: the saved target 'gizmo' is not registered here and unsupported TVM target kind 'quantum'"),
    ("model", _set(1, "evil"), r"unknown field\(s\) 'evil'"),
    ("model", _set(1, "entries", "main", "evil"), r"entries\['main'\]: unknown field\(s\) 'evil'"),
    ("lm", _set("128", "meta", "vocab"), r"meta: field 'vocab' must be an integer, got str"),
    ("lm", _del("meta", "max_seq"), r"meta: field 'max_seq' is missing"),
    ("lm", _set([1, 2], "meta", "config"), r"meta: field 'config' must be an object or null, got list"),
    ("lm", _set(1, "meta", "config", "evil"), r"meta.config is not a DecoderConfig"),
    ("lm", _set(-3, "signature", "functions", "decode", "symbols", "batch"), r"symbol 'batch' must have bounds"),
]


@pytest.mark.parametrize("kind,edit,msg", SCHEMA_CASES, ids=[c[2][:40] for c in SCHEMA_CASES])
def test_malformed_manifest_fields_are_named(saved, tmp_path, kind, edit, msg):
    path = _copy(saved, kind, tmp_path)
    _edit(path, edit)
    with pytest.raises(ArtifactError, match=msg):
        _load(path, kind)


def test_a_bad_saved_target_is_the_artifacts_fault_a_bad_argument_the_callers(saved, tmp_path):
    """An altered target_dict is an ArtifactError (above); an unknown target passed to load_lm stays an
    UnknownTargetError, and target= loads an artifact whose saved target is refused."""
    from llmasos.backends.tvm import UnknownTargetError
    with pytest.raises(UnknownTargetError, match=r"unknown target 'tpu'"):
        llmasos.load_lm(saved[0] / "lm", target="tpu")
    path = _copy(saved, "lm", tmp_path)
    _edit(path, _set("quantum", "target_dict", "kind"))
    with pytest.raises(ArtifactError, match=r"target_dict: kind 'quantum'"):
        llmasos.load_lm(path)
    assert llmasos.load_lm(path, target="cpu").generate([3, 4, 5], 4) == saved[2].generate([3, 4, 5], 4)


def test_unlisted_files_are_refused(saved, tmp_path):
    path = _copy(saved, "lm", tmp_path)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer_config.json: a file the manifest does not list"):
        llmasos.load_lm(path)


# -- an LM manifest is checked against the library -----------------------------------------------------------
def test_load_lm_refuses_a_vocab_the_library_does_not_have(saved, tmp_path):
    """Before: vocab edited upward was trusted, and ids past the real table generated garbage."""
    path = _copy(saved, "lm", tmp_path)

    def grow(m):
        m["meta"]["vocab"] = 4096
        m["meta"]["config"]["vocab"] = 4096
    _edit(path, grow)
    with pytest.raises(ArtifactError, match=r"meta.vocab is 4096 but the embedding has 128 rows"):
        llmasos.load_lm(path)
    path = _copy(saved, "lm", tmp_path / "seq")
    _edit(path, _set(64, "meta", "max_seq"))
    with pytest.raises(ArtifactError, match=r"meta.max_seq is 64 but the library's caches hold 16 positions"):
        llmasos.load_lm(path)


def test_weights_must_match_the_signature(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmasos.artifact import _sha256
    path = _copy(saved, "lm", tmp_path)      # (a model artifact's IR check catches it earlier)
    w = load_file(str(path / "weights.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name][..., :1].contiguous()
    save_file(w, str(path / "weights.safetensors"))

    def relist(m):     # a consistent manifest: the file checks pass, the signature check must not
        f = path / "weights.safetensors"
        m["files"]["weights.safetensors"] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    _edit(path, relist)
    with pytest.raises(ArtifactError, match=rf"parameter '{name}' is float32\[64, 1\] in weights.safetensors, "
                                             r"but the library takes f32\[64, 64\]"):
        llmasos.load_lm(path)


def test_round_trip_still_loads(saved, tmp_path):
    _, cm, lm = saved
    x = torch.randn(3, 16)
    assert torch.equal(llmasos.load(saved[0] / "model")(x), cm(x))
    assert llmasos.load_lm(saved[0] / "lm").generate([3, 4, 5], 4) == lm.generate([3, 4, 5], 4)
