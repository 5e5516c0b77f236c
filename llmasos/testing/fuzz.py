"""LLMasOS's own fuzz targets (Hypothesis): IR text, pipeline strings, artifact manifests, ``compile``
arguments and ``generate`` requests. Each example must end in success with correct numbers or one of the
documented error types (``DOCUMENTED``, docs/errors.md) -- never another exception, a crash or a hang.

``tests/robust/test_fuzz.py`` runs every target with the repo's Hypothesis profile (a few examples in CI);
``bench/fuzz.py --minutes N`` runs them for N minutes and prints the count of each outcome per target.

A target is ``(strategy, check)``: ``check(example, env)`` runs the example and returns "ok" or raises;
``outcome(check, example, env)`` turns a documented error into its class name and lets anything else
propagate (the fuzz failure). ``env`` is a ``FuzzEnv``: the compiled models the targets share.
"""
from __future__ import annotations

import collections
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from hypothesis import strategies as st

from ..api import compile as compile_model
from ..api import load
from ..artifact import ArtifactError
from ..backends.tvm.build import BuildError
from ..backends.tvm.lowering import LoweringError
from ..backends.tvm.targets import UnknownTargetError
from ..compiled import InputError
from ..driver import CompileError
from ..frontends.errors import FrontendError
from ..ir import parse, print_graph
from ..ir.interpreter import run
from ..ir.ops import OpError
from ..ir.parser import ParseError
from ..ir.verifier import VerificationError, verify
from ..llm import compile_lm
from ..llm.presets import hf_model
from ..llm.runtime import GenerationError
from ..passes import PassManager
from ..passes.base import PassError, PassRegistryError
from ..passes.calibration import CalibrationError
from ..passes.pipeline import PipelineError

# every error a public entry point raises on bad input (docs/errors.md); MemoryBudgetError is a CompileError
DOCUMENTED = (ParseError, VerificationError, OpError, PipelineError, PassRegistryError, PassError, CalibrationError,
              ArtifactError, CompileError, FrontendError, InputError, GenerationError, UnknownTargetError,
              LoweringError, BuildError)


class UndocumentedOutcome(AssertionError):
    """An example ended in an exception that is not one of DOCUMENTED, or in wrong numbers."""


def outcome(check: Callable, example, env) -> str:
    try:
        return check(example, env)
    except DOCUMENTED as e:
        return type(e).__name__


# -- the shared compiled models ---------------------------------------------------------------------------
@dataclass
class FuzzEnv:
    """What the targets run against, built once: a small compiled model saved as an artifact, and a compiled
    LM with its transformers twin (the greedy reference)."""
    root: Path
    model: Any = None            # torch module
    compiled: Any = None         # CompiledModel
    artifact: Path = None        # the saved model artifact (pristine copy)
    manifest: dict = field(default_factory=dict)
    hf_lm: Any = None
    lm: Any = None
    work: Path = None            # the artifact copy the manifest target edits

    @staticmethod
    def build(root=None) -> "FuzzEnv":
        root = Path(root or tempfile.mkdtemp(prefix="llmasos-fuzz-"))
        env = FuzzEnv(root)
        torch.manual_seed(0)
        env.model = SeqMLP().eval()
        env.compiled = compile_model(env.model, "cpu", example_inputs=(torch.randn(2, 4, 16),), max_batch=4,
                                       max_seq=8)
        env.artifact = root / "model"
        env.compiled.save(env.artifact)
        env.manifest = json.loads((env.artifact / "manifest.json").read_text())
        env.work = root / "work"
        shutil.copytree(env.artifact, env.work)
        env.hf_lm = hf_model("llama-tiny", seed=4, eos_token_id=None)
        env.lm = compile_lm(env.hf_lm, "cpu", max_seq=16, max_batch=2)
        return env

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _seq_mlp_class():
    class _SeqMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
    return _SeqMLP


def SeqMLP():  # noqa: N802 -- a class made on demand (torch is deferred)
    return _seq_mlp_class()()


# -- IR text ------------------------------------------------------------------------------------------------
IR_SEEDS = (
    "graph @g(%x: f32[batch, 16], %y: f32[batch, 16]) {\n  symbol batch in [1, 8]\n"
    "  %a: f32[batch, 16] = add(%x, %y)\n  %b: f32[batch, 16] = exp(%a)\n  return %b\n}\n",
    "graph @m(%x: f32[2, 3]) {\n  param %w: f32[4, 3]\n  %y: f32[2, 4] = linear(%x, %w)\n  return %y\n}\n",
    "graph @r(%x: f32[seq, 4]) {\n  symbol seq in [2, ?]\n  %a: f32[seq, 2], %b: f32[seq, 2] = split(%x) "
    "{axis = 1, sizes = [2, 2]}\n  %r: f32[seq*2] = reshape(%a) {shape = [seq*2]}\n"
    "  %c: f32[2] = const() {dtype = f32, value = dense<f32[2] [1.0, -inf]>}\n  return %r, %b, %c\n}\n",
)
IR_TOKENS = ("%x", "%y", "%q", "f32", "i64", "bf16", "[", "]", "(", ")", ",", "=", ":", "seq", "batch", "0", "-1",
             "99999999999999999999", "exp", "add", "matmul", "return", "{", "}", "//", "+", "*", "@g", "graph",
             "\n", "param", "symbol", " in ", "perm=[1, 0]", "dim=", "1e9", "\"s\"", "#", "\t", "\u00e9", "\x00")


@st.composite
def ir_texts(draw):
    text = draw(st.sampled_from(IR_SEEDS))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "dup", "char"]))
        if kind == "insert":
            text = text[:i] + draw(st.sampled_from(IR_TOKENS)) + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif kind == "dup":
            j = min(len(text), i + draw(st.integers(1, 30)))
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(st.characters(codec="utf-8")) + text[i + 1:]
    return text


def check_ir(text: str, env=None) -> str:
    g = parse(text)
    verify(g)
    printed = print_graph(g)
    if print_graph(parse(printed)) != printed:
        raise UndocumentedOutcome(f"printing is not a fixed point for:\n{text}")
    return "ok"


# -- pipeline strings ----------------------------------------------------------------------------------------
PIPE_ITEMS = ("dce", "cse", "canonicalize", "fuse", "fuse-elementwise", "quantize", "prune", "nope", "fuse{",
              "quantize{bits=4}", "quantize{bits=\"x\"}", "prune{sparsity=2}", "fuse{a=1}", "{}", "dce{}",
              "rewrite{rules=\"x\"}", "quantize{method=gptq}", "=", "\"", "cse{x=}", "dce}", "")
PIPE_SEPS = (",", " , ", ",,", " ", "")


@st.composite
def pipelines(draw):
    items = draw(st.lists(st.sampled_from(PIPE_ITEMS), min_size=1, max_size=4))
    seps = draw(st.lists(st.sampled_from(PIPE_SEPS), min_size=len(items), max_size=len(items)))
    text = "".join(i + s for i, s in zip(items, seps))
    return draw(st.one_of(st.just(text), st.text(max_size=20), st.just(items)))


def check_pipeline(spec, env=None) -> str:
    pm = PassManager(spec)
    g = parse(IR_SEEDS[0])
    xs = [np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32) for _ in range(2)]
    want = run(g, xs)
    out = pm.run(g)
    verify(out)
    got = run(out, xs)
    lossless = all(p.exact for p in pm.passes)
    for a, b in zip(want, got):
        if lossless and not np.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise UndocumentedOutcome(f"pipeline {spec!r} changed the numbers")
    return "ok"


# -- artifact manifests -----------------------------------------------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(max_size=4), c, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def manifest_edits(draw):
    """A list of (path, action, value) edits of the saved manifest (path into the JSON tree)."""
    return draw(st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["delete", "set", "add", "mutate"]),
                                   JSON_VALUES), min_size=1, max_size=3))


def _apply(manifest: dict, edits) -> dict:
    m = copy.deepcopy(manifest)
    for pick, action, value in edits:
        paths = [p for p in _paths(m) if p]
        if not paths:
            break
        path = paths[pick % len(paths)]
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if action == "delete":
            del parent[key]
        elif action == "set":
            parent[key] = value
        elif action == "add" and isinstance(parent, dict):
            parent[f"extra{pick % 7}"] = value
        elif action == "mutate" and isinstance(parent[key], str) and parent[key]:
            s = parent[key]
            i = pick % len(s)
            parent[key] = s[:i] + (str(value)[:3] or "x") + s[i + 1:]
        elif action == "mutate" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] = parent[key] + (pick % 5) - 2
    return m


def check_manifest(edits, env: FuzzEnv) -> str:
    m = _apply(env.manifest, edits)
    (env.work / "manifest.json").write_text(json.dumps(m))
    cm = load(env.work)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    got = cm(x)
    if not torch.equal(got, env.compiled(x)):
        raise UndocumentedOutcome(f"an edited manifest loaded and computed other numbers: {edits}")
    return "ok"


# -- compile arguments --------------------------------------------------------------------------------------
@st.composite
def compile_args(draw):
    return {
        "max_batch": draw(st.sampled_from([4, 2, 1, 0, -1, True, 2.5, None, "4"])),
        "max_seq": draw(st.sampled_from([None, 8, 3, 2, 1, 0, 10 ** 9, "8", 8.0])),
        "passes": draw(st.sampled_from(["fuse", "", None, "dce,cse", 123, "nope", ["dce"], "quantize"])),
        "example": draw(st.sampled_from(["tensor", "batch1", "numpy", "none", "list", "int", "meta", "long"])),
        "dynamic_shapes": draw(st.sampled_from(["auto", "auto", None, "bogus"])),
        "target": draw(st.sampled_from(["cpu", "cpu", "cpu", "tpu", 7])),
    }


def check_compile(a: dict, env: FuzzEnv) -> str:
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    example = {"tensor": x, "batch1": x[:1], "numpy": x.numpy(), "none": None, "list": x.tolist(),
               "int": torch.zeros(2, 4, 16, dtype=torch.int64), "meta": x.to("meta"),
               "long": torch.randn(2, 12, 16)}[a["example"]]
    cm = compile_model(env.model, a["target"], example_inputs=(example,), max_batch=a["max_batch"],
                         max_seq=a["max_seq"], passes=a["passes"], dynamic_shapes=a["dynamic_shapes"])
    if isinstance(example, torch.Tensor) and example.dtype.is_floating_point and not example.is_meta:
        got, want = cm(example), env.model(example)
        # a lossy pass (quantize, prune) is held to the tolerance it declares
        lossy = [p for p in (PassManager(a["passes"]).passes if a["passes"] else []) if not p.exact]
        rtol, atol = max([1e-4, *(p.rtol for p in lossy)]), max([1e-5, *(p.atol for p in lossy)])
        if not np.allclose(got.detach().numpy(), want.detach().numpy(), rtol=rtol, atol=atol):
            raise UndocumentedOutcome(f"compiled with {a} and computed other numbers")
    return "ok"


# -- generate requests ---------------------------------------------------------------------------------------
IDS = st.integers(-3, 140)


@st.composite
def generate_requests(draw):
    if draw(st.booleans()):    # a valid request: half the examples check the numbers
        one = st.lists(st.integers(0, 127), min_size=1, max_size=6)
        return {"prompts": draw(st.one_of(one, st.lists(one, min_size=1, max_size=2))),
                "max_new_tokens": draw(st.integers(1, 8)), "stop": draw(st.sampled_from([(), None, [3]])),
                "sampling": draw(st.sampled_from([None, None, {"temperature": 0.7, "top_k": 5}]))}
    one = st.lists(IDS, min_size=0, max_size=6)
    prompts = draw(st.one_of(one, st.lists(one, min_size=0, max_size=3), st.lists(st.floats(0, 5), max_size=3),
                             st.text(max_size=5), st.none(), st.integers(), st.lists(st.booleans(), max_size=3)))
    return {"prompts": prompts,
            "max_new_tokens": draw(st.sampled_from([1, 2, 5, 0, -1, True, 2.0, None, 20])),
            "stop": draw(st.sampled_from([(), None, [3], [2.5], "x", 7, [None]])),
            "sampling": draw(st.sampled_from([None, None, {"temperature": 0.7, "top_k": 5}, {"temperature": -1},
                                              {"bogus": 1}, 3, "greedy"]))}


def check_generate(r: dict, env: FuzzEnv) -> str:
    out = env.lm.generate(r["prompts"], r["max_new_tokens"], sampling=r["sampling"], stop=r["stop"])
    rows = out if out and isinstance(out[0], list) else [out]
    prompts = r["prompts"] if rows is out else [r["prompts"]]
    for row in rows:
        if not 1 <= len(row) <= r["max_new_tokens"] or not all(0 <= t < env.lm.vocab for t in row):
            raise UndocumentedOutcome(f"generate({r}) returned {out}")
    if r["sampling"] is None and not r["stop"]:
        cfg = copy.deepcopy(env.hf_lm.generation_config)
        cfg.eos_token_id, cfg.pad_token_id = None, 0
        cfg.max_new_tokens, cfg.do_sample, cfg.use_cache = r["max_new_tokens"], False, True
        for p, row in zip(prompts, rows):   # greedy: transformers' tokens
            ids = torch.tensor([p])   # (an explicit mask: transformers would read id 0 as padding)
            want = env.hf_lm.generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=cfg)[0, len(p):].tolist()
            if row != want:
                raise UndocumentedOutcome(f"generate({r}) gave {row}, transformers {want}")
    return "ok"


TARGETS = {
    "ir_text": (ir_texts(), check_ir),
    "pipeline": (pipelines(), check_pipeline),
    "manifest": (manifest_edits(), check_manifest),
    "compile": (compile_args(), check_compile),
    "generate": (generate_requests(), check_generate),
}


class Counts:
    """outcome counts per target: {target: Counter(outcome name)}."""

    def __init__(self):
        self.by_target: dict = collections.defaultdict(collections.Counter)

    def add(self, target: str, name: str) -> None:
        self.by_target[target][name] += 1

    def to_json(self) -> dict:
        return {t: dict(sorted(c.items())) for t, c in self.by_target.items()}
