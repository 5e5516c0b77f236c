"""The one compile driver and the one artifact format: both front doors give a CompiledProgram; save -> load
round trips for both kinds; artifacts of the two version-1 formats still load; newer or foreign versions are
refused; loading never imports what a manifest names; the driver layer's imports flow one way."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmasos
from llmasos import artifact
from llmasos.driver import CallConvention, CompiledProgram, Source, compile_program, lower, prepare
from llmasos.ir import parse
from llmasos.llm.presets import hf_model
from tests import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt2():
    m = models.gpt2()
    return m, llmasos.compile(m, "cpu", example_inputs=(models.token_ids(2, 8),), max_batch=4)


@pytest.fixture(scope="module")
def lm():
    return llmasos.compile_lm(hf_model("llama-tiny", seed=1), "cpu", max_seq=16, max_batch=4)


def test_both_front_doors_produce_one_compiled_program(gpt2, lm):
    _, cm = gpt2
    assert type(cm.program) is type(lm.program) is CompiledProgram
    assert (cm.program.kind, cm.program.entries) == ("model", ["main"])
    assert (lm.program.kind, lm.program.entries) == ("lm", ["prefill", "decode"])
    for p in (cm.program, lm.program):
        assert {"import_s", "passes_s", "build_s"} <= set(p.timings)
        assert set(p.graphs) == set(p.entries)
    assert isinstance(cm.program.conventions["main"], CallConvention) and lm.program.conventions == {}
    # the views read the program: one object, not copies
    assert cm.executable is cm.program.executable and lm.executable is lm.program.executable
    assert lm.program.meta["max_seq"] == lm.max_seq == 16 and lm.program.meta["config"]["arch"] == "llama"
    assert lm.program.ir("decode").startswith("graph @decode(")


def test_driver_pipeline_stages_are_the_front_doors_pipeline():
    m = models.mlp()
    calls = []

    def frontend(spec):
        calls.append(spec.name)
        from llmasos.frontends.torch_export import import_module
        return Source({"a": import_module(m, (torch.randn(2, 16),)).graph,
                       "b": import_module(m, (torch.randn(2, 16),), dynamic_shapes=None).graph})

    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        compile_program("model", frontend, "tpu")
    assert calls == []                       # options are checked before the front door runs
    p = compile_program("model", frontend, "cpu", passes="")
    assert calls == ["cpu"] and p.entries == ["a", "b"] and "passes_s" not in p.timings
    x = torch.randn(2, 16)
    torch.testing.assert_close(p.executable.call("a", x)[0], p.executable.call("b", x)[0])
    plan = prepare("cpu", "fuse")
    assert set(lower(plan, frontend).graphs) == {"a", "b"} and "passes_s" in plan.timings


def test_model_round_trip_through_the_one_format(gpt2, tmp_path):
    m, cm = gpt2
    cm.save(tmp_path / "m")
    mf = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (mf["format"], mf["version"], mf["kind"]) == ("llmasos", 2, "model")
    assert list(mf["entries"]) == ["main"] and mf["entries"]["main"]["ir"] == "graph.main.llir"
    assert set(mf["files"]) == {"module.so", "weights.safetensors", "graph.main.llir"}
    assert "pickle" not in (tmp_path / "m" / "manifest.json").read_text()
    cm2 = llmasos.load(tmp_path / "m")
    assert cm2.program.kind == "model" and cm2.ir == cm.ir
    ids = models.token_ids(3, 11, seed=4)
    assert torch.equal(cm(ids).logits, cm2(ids).logits) and type(cm2(ids)) is type(m(ids))


def test_lm_round_trip_through_the_one_format(lm, tmp_path):
    lm.save(tmp_path / "lm")
    mf = json.loads((tmp_path / "lm" / "manifest.json").read_text())
    assert (mf["format"], mf["version"], mf["kind"]) == ("llmasos", 2, "lm")
    assert list(mf["entries"]) == ["prefill", "decode"] == list(mf["signature"]["functions"])
    assert mf["meta"]["vocab"] == 128 and mf["meta"]["max_seq"] == 16
    # the IR of every entry function is in the artifact, in the one canonical text form
    for entry in ("prefill", "decode"):
        g = parse((tmp_path / "lm" / f"graph.{entry}.llir").read_text())
        assert [v.name for v in g.inputs][:3] == ["ids", "pos", "last"]
    lm2 = llmasos.load_lm(tmp_path / "lm")
    assert lm2.program.kind == "lm" and lm2.graphs == {}     # run from the signature alone: no IR parsed
    assert lm2.config == lm.config and lm2.max_batch == lm.max_batch
    assert lm2.generate([[3, 1, 4], [1, 5]], 6) == lm.generate([[3, 1, 4], [1, 5]], 6)
    with pytest.raises(llmasos.ArtifactError, match="loaded from an artifact; copy that directory instead"):
        lm2.save(tmp_path / "again")
    with pytest.raises(llmasos.ArtifactError, match=r"holds a compiled LM \(kind 'lm'\), not a compiled model; load it "
                                                     r"with llmasos.load_lm"):
        llmasos.load(tmp_path / "lm")


def test_a_model_artifact_is_refused_by_load_lm(gpt2, tmp_path):
    gpt2[1].save(tmp_path / "m")
    with pytest.raises(llmasos.ArtifactError, match=r"holds a compiled model \(kind 'model'\), not a compiled LM; "
                                                     r"load it with llmasos.load"):
        llmasos.load_lm(tmp_path / "m")
    assert artifact.kind_of(tmp_path / "m") == "model" and artifact.kind_of(tmp_path) is None


def test_tokenizer_files_are_checked_too(gpt2, tmp_path):
    class Tok:  # what save needs of a tokenizer
        def save_pretrained(self, d):
            Path(d).mkdir()
            (Path(d) / "vocab.json").write_text('{"a": 0}')
    prog = gpt2[1].program
    saved = prog.tokenizer
    try:
        prog.tokenizer = Tok()
        prog.save(tmp_path / "m")
    finally:
        prog.tokenizer = saved
    mf = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert mf["tokenizer"] and "tokenizer/vocab.json" in mf["files"]
    (tmp_path / "m" / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    with pytest.raises(llmasos.ArtifactError, match=r"tokenizer/vocab.json: corrupted"):
        llmasos.load(tmp_path / "m")


# -- version 1 -------------------------------------------------------------------------------------------
# What llmasos/artifact.py (llmasos-artifact v1) and llmasos/llm/artifact.py (llmasos-lm v1) wrote before the
# one format, kept here verbatim in what they put on disk: these writers are the old code path.
def _v1_files(path: Path, names) -> dict:
    return {f: {"bytes": (path / f).stat().st_size, "sha256": artifact._sha256(path / f)} for f in names}


def write_v1_model(cm, path: Path) -> Path:
    from safetensors.torch import save_file
    from torch.utils import _pytree as pytree

    from llmasos.ir.printer import print_graph
    from llmasos.ir.torch_dtypes import numpy_to_torch
    path.mkdir(parents=True)
    cm.executable.export_library(str(path / "module.so"))
    tensors = {}
    for name in cm.graph.params:
        data = cm.graph.param_data[name]
        t = data if hasattr(data, "detach") else numpy_to_torch(data)
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path / "weights.safetensors"))
    (path / "graph.llir").write_text(print_graph(cm.graph))
    conv = cm.convention
    manifest = {
        "format": "llmasos-artifact", "version": 1, "target": cm.target.name, "target_dict": cm.target.target,
        "input_names": list(conv.input_names), "in_spec": pytree.treespec_dumps(conv.in_spec),
        "out_spec": pytree.treespec_dumps(conv.out_spec),
        "out_leaves": [leaf if isinstance(leaf, int) else {"const": leaf[1]} for leaf in conv.out_leaves],
        "files": _v1_files(path, ("module.so", "weights.safetensors", "graph.llir")), "tokenizer": False,
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def write_v1_lm(lm, path: Path) -> Path:
    import dataclasses

    from safetensors.torch import save_file

    from llmasos.ir.graph import param_array
    from llmasos.ir.torch_dtypes import numpy_to_torch
    path.mkdir(parents=True)
    lm.executable.export_library(str(path / "module.so"))
    g = lm.graphs["prefill"]
    tensors = {}
    for name in g.params:
        data = g.param_data[name]
        t = data if hasattr(data, "detach") else numpy_to_torch(param_array(data))
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path / "weights.safetensors"))
    spec = lm.executable.spec
    manifest = {
        "format": "llmasos-lm", "version": 1, "target": spec.name, "target_dict": spec.target,
        "vocab": lm.vocab, "max_seq": lm.max_seq, "cuda_graph": lm.cuda_graph,
        "config": dataclasses.asdict(lm.config),
        "signature": json.loads(lm.executable.signature.to_json()),
        "files": _v1_files(path, ("module.so", "weights.safetensors")), "tokenizer": False,
    }
    # a v1 config had no qkv_bias field
    manifest["config"].pop("qkv_bias")
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def test_version_1_model_artifacts_still_load(gpt2, tmp_path):
    m, cm = gpt2
    old = llmasos.load(write_v1_model(cm, tmp_path / "v1"))
    assert old.program.kind == "model" and old.ir == cm.ir
    ids = models.token_ids(2, 9, seed=5)
    assert torch.equal(old(ids).logits, cm(ids).logits) and type(old(ids)) is type(m(ids))
    (tmp_path / "v1" / "graph.llir").write_text(cm.ir + "\n")
    with pytest.raises(llmasos.ArtifactError, match=r"graph.llir: truncated or altered"):
        llmasos.load(tmp_path / "v1")


def test_version_1_lm_artifacts_still_load(lm, tmp_path):
    old = llmasos.load_lm(write_v1_lm(lm, tmp_path / "v1"))
    assert old.program.kind == "lm" and old.config == lm.config
    assert old.generate([5, 6, 7], 5) == lm.generate([5, 6, 7], 5)
    with pytest.raises(llmasos.ArtifactError, match=r"not a compiled model; load it with llmasos.load_lm"):
        llmasos.load(tmp_path / "v1")


def test_other_versions_and_formats_are_refused_by_name(gpt2, tmp_path):
    path = tmp_path / "m"
    gpt2[1].save(path)
    mf = path / "manifest.json"
    good = json.loads(mf.read_text())
    for change, msg in [({"version": 3}, r"format version 3 is newer than this LLMasOS reads \(2\); upgrade llmasos"),
                        ({"version": 1}, r"format version 1 is not one this LLMasOS reads"),
                        ({"format": "onnx"}, r"not the manifest of an LLMasOS artifact \(format 'onnx', expected "
                                             r"'llmasos'\)"),
                        ({"kind": "tokenizer"}, r"kind 'tokenizer' is not one of")]:
        mf.write_text(json.dumps({**good, **change}))
        with pytest.raises(llmasos.ArtifactError, match=msg):
            llmasos.load(path)
    mf.write_text(json.dumps({**good, "format": "llmasos-artifact", "version": 2}))
    with pytest.raises(llmasos.ArtifactError, match=r"format 'llmasos-artifact' version 2 is not supported \(only 1"):
        llmasos.load(path)
    files = dict(good["files"], **{"../escape": good["files"]["module.so"]})
    mf.write_text(json.dumps({**good, "files": files}))
    with pytest.raises(llmasos.ArtifactError, match=r"file '../escape' lies outside the artifact"):
        llmasos.load(path)


# -- loading never imports or runs what an artifact names ---------------------------------------------------
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the artifact ran code")
"""


def _plant(tmp_path, monkeypatch, name: str) -> Path:
    """A module ``name`` on sys.path whose import leaves a marker file."""
    marker = tmp_path / f"{name}.ran"
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return marker


def _with_out_spec(path: Path, out_spec: str) -> None:
    mf = path / "manifest.json"
    m = json.loads(mf.read_text())
    m["entries"]["main"]["convention"]["out_spec"] = out_spec
    mf.write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["type", "namedtuple", "enum", "defaultdict"])
def test_a_malicious_manifest_cannot_make_load_import_a_module(gpt2, tmp_path, monkeypatch, case):
    marker = _plant(tmp_path, monkeypatch, "llmasos_evil_payload")
    leaf = {"type": None, "context": None, "children_spec": []}
    node = {
        "type": {"type": "llmasos_evil_payload.Output", "context": '["logits"]', "children_spec": [leaf]},
        "namedtuple": {"type": "collections.namedtuple", "context": "llmasos_evil_payload.Output",
                       "children_spec": [leaf]},
        "enum": {"type": "builtins.dict", "children_spec": [leaf],
                 "context": json.dumps([{"__enum__": True, "fqn": "llmasos_evil_payload:Color", "name": "RED"}])},
        "defaultdict": {"type": "collections.defaultdict", "children_spec": [leaf],
                        "context": {"default_factory_module": "llmasos_evil_payload", "default_factory_name": "f",
                                    "dict_context": ["logits"]}},
    }[case]
    path = tmp_path / "m"
    gpt2[1].save(path)
    _with_out_spec(path, json.dumps([1, node]))
    msg = {"type": r"uses 'llmasos_evil_payload.Output', which is not a registered pytree node type in this "
                   r"process. Loading an artifact never imports modules it names: import the module that defines "
                   r"Output",
           "namedtuple": r"'llmasos_evil_payload.Output', which is not a registered pytree node type",
           "enum": r"has an enum in its context; loading it would import the enum's module",
           "defaultdict": r"a defaultdict whose factory is not one of the builtins list, dict.* is refused "
                          r"\(got llmasos_evil_payload.f; loading it would import 'llmasos_evil_payload'\)"}[case]
    with pytest.raises(llmasos.ArtifactError, match=msg):
        llmasos.load(path)
    assert "llmasos_evil_payload" not in sys.modules and not marker.exists()


def test_plain_output_structures_read_back_as_written():
    from collections import OrderedDict, defaultdict

    from torch.utils import _pytree as pytree
    for tree in [((1, 2), {"a": 3}), [1, {"b": (2,)}], OrderedDict(x=1), defaultdict(list, {"k": 1})]:
        spec = pytree.tree_structure(tree)
        assert artifact.spec_loads(artifact.spec_dumps(spec), "test") == spec


LOAD_IN_A_FRESH_PROCESS = r"""
import sys, torch, llmasos
assert "transformers.models.gpt2.modeling_gpt2" not in sys.modules
cm = llmasos.load(sys.argv[1])
print(type(cm(torch.tensor([[1, 2, 3]]))).__name__)
"""


def test_transformers_model_outputs_load_in_a_fresh_process(gpt2, tmp_path):
    """ModelOutput classes register themselves when their module is imported; transformers.modeling_outputs is
    the one module loading imports on an artifact's behalf."""
    gpt2[1].save(tmp_path / "m")
    out = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "m")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "CausalLMOutputWithCrossAttentions"


# -- imports flow one way -----------------------------------------------------------------------------------
LOWER = ("llmasos.ir", "llmasos.passes", "llmasos.backends", "llmasos.compress", "llmasos.frontends")
DRIVER_LAYER = ("llmasos.driver", "llmasos.artifact", "llmasos.api", "llmasos.compiled", "llmasos.llm.presets",
                "llmasos.zoo", "llmasos.cli", "llmasos.llm")
# llmasos.llm.ops' KV custom ops are moving into llmasos.frontends (issue 11); until then the frontend imports them
KNOWN_UPWARD: set = set()


def _import_graph() -> dict:
    """llmasos module -> the llmasos modules it imports anywhere in its text (function-local imports too)."""
    import ast
    mods = {}
    for base, pkg in ((ROOT / "llmasos", "llmasos"), (ROOT / "frontends", "llmasos.frontends")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            init = parts[-1] == "__init__"
            mods[".".join([pkg] + (parts[:-1] if init else parts))] = (f, init)
    graph = {}
    for name, (f, init) in mods.items():
        pkg = name if init else name.rsplit(".", 1)[0]
        out = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - n.level + 1] if n.level else []
                mod = ".".join(base + ([n.module] if n.module else []))
                out |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in n.names}
        graph[name] = {m for m in out if m in mods and m != name}
    return graph


def _cycles(graph: dict) -> list:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_driver_layer_imports_flow_one_way_without_cycles():
    graph = _import_graph()
    upward = {(m, d) for m, deps in graph.items() if m.startswith(LOWER)
              for d in deps if d.startswith(DRIVER_LAYER)}
    assert upward - KNOWN_UPWARD == set(), "lower layers import the driver layer"
    assert [c for c in _cycles(graph) if any(m.startswith(DRIVER_LAYER) for m in c)] == []
    assert not (ROOT / "llmasos" / "llm" / "artifact.py").exists()   # one artifact module


def test_an_artifact_reloads_as_the_target_it_was_saved_for(tmp_path):
    """A plugin target sharing a TVM kind with a built-in one (here a CPUTarget subclass) comes back as
    itself, by its saved name, not as the built-in class its TVM dict alone would resolve to."""
    import dataclasses

    import torch

    from llmasos.backends.tvm import register_target, resolve_target
    from llmasos.backends.tvm.targets import CPUTarget, _REGISTRY

    class MyCPU(CPUTarget):
        pass

    cpu = resolve_target("cpu")
    register_target("my-cpu", MyCPU(**{f.name: getattr(cpu, f.name) for f in dataclasses.fields(cpu)} | {"name": "my-cpu"}))
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
        x = torch.randn(2, 8)
        cm = llmasos.compile(model, "my-cpu", example_inputs=(x,), dynamic_shapes=None)
        cm.save(tmp_path / "m")
        back = llmasos.load(tmp_path / "m")
        assert type(back.target) is MyCPU and back.target.name == "my-cpu"
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
    finally:
        _REGISTRY.pop("my-cpu", None)
    # once the name is gone, the TVM dict still finds a target that runs it
    assert type(llmasos.load(tmp_path / "m").target) is CPUTarget
