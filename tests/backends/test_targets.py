"""The Target API: resolving names, variants and TVM dicts, registration in code and through the
``llmasos.targets`` entry-point group, and a Target subclass whose lowering and schedule-rule overrides a
build provably uses."""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import pytest

from llmasos.backends.tvm import (CPUTarget, CUDATarget, Target, TargetSpec, UnknownTargetError, build, known_targets,
                                  lower, register_target, resolve_target, target_source, targets)
from llmasos.ir import DType, Graph, TensorType, sym
from llmasos.ir.interpreter import run
from tests.fake_dist import install_fake_dist

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the target registry (what a test registers is gone afterwards)."""
    monkeypatch.setattr(targets, "_REGISTRY", dict(targets._REGISTRY))
    monkeypatch.setattr(targets, "_SOURCES", dict(targets._SOURCES))
    monkeypatch.setattr(targets, "_load_errors", list(targets._load_errors))
    return targets


def test_builtin_targets_and_their_classes():
    assert {"cpu", "llvm", "cpu-generic", "cuda"} <= set(known_targets())
    cpu = resolve_target("cpu")
    assert type(cpu) is CPUTarget and cpu.name == "cpu" and cpu.target["kind"] == "llvm" and cpu.target["mcpu"]
    assert resolve_target("llvm").name == "cpu"                      # an alias of the same target
    assert resolve_target("cpu-generic").target["mcpu"] == "x86-64"
    cuda = resolve_target("cuda")
    assert type(cuda) is CUDATarget and cuda.device == "cuda" and cuda.graph_capture and cuda.gemm_nt
    assert cpu.host_memory and not cpu.graph_capture and cpu.panel_width() in (8, 16, 32)
    assert target_source("cpu") == "llmasos"
    assert resolve_target(cpu) is cpu


def test_unknown_target_lists_the_registered_ones():
    with pytest.raises(UnknownTargetError, match=r"unknown target 'tpu'; known targets: .*cpu, cpu-generic, cuda, "
                                                 r"llvm.*\(or 'name:arch', or a TVM target dict\)") as e:
        resolve_target("tpu")
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownTargetError, match=r"unknown target 'tpu:v5'"):
        resolve_target("tpu:v5")
    with pytest.raises(TypeError, match="a target is a name, a TVM target dict or a Target"):
        resolve_target(3)


def test_variants():
    v = resolve_target("cuda:sm_80")
    assert v.name == "cuda:sm_80" and v.target["arch"] == "sm_80" and type(v) is CUDATarget
    assert resolve_target("cpu:skylake").target["mcpu"] == "skylake"
    assert resolve_target("cpu").with_variant("znver4").target["mcpu"] == "znver4"
    with pytest.raises(ValueError, match="target 'plain' has no variants"):
        Target("plain", {"kind": "llvm"}).with_variant("x")


def test_tvm_dicts_resolve_through_the_registered_classes(registry):
    t = resolve_target({"kind": "llvm", "mcpu": "x86-64"})
    assert type(t) is CPUTarget and t.name == "cpu" and t.target == {"kind": "llvm", "mcpu": "x86-64"}
    t = resolve_target({"kind": "cuda", "arch": "sm_90a"})
    assert type(t) is CUDATarget and t.schedule == "dlight-gpu"
    with pytest.raises(UnknownTargetError, match=r"unsupported TVM target kind 'rocm' .*supported kinds: \[.*'cuda', "
                                                 r".*'llvm'.*\]"):
        resolve_target({"kind": "rocm"})

    @dataclass(frozen=True)
    class Accel(Target):
        name: str = "test-accel"
        target: dict = field(default_factory=lambda: {"kind": "test_accel"})
        tvm_kinds: ClassVar[tuple] = ("test_accel",)

    register_target("test-accel", Accel)
    t = resolve_target({"kind": "test_accel", "cores": 4})
    assert type(t) is Accel and t.target == {"kind": "test_accel", "cores": 4}
    assert target_source("test-accel") == "register_target"
    # the built-in classes come first for their kinds, whatever registers later
    register_target("test-llvm", CPUTarget(name="test-llvm"))
    assert resolve_target({"kind": "llvm"}).name == "cpu"


def test_register_target_checks(registry):
    with pytest.raises(ValueError, match=r"'cpu' is already registered \(by llmasos\); pass replace=True"):
        register_target("cpu", CPUTarget)
    with pytest.raises(ValueError, match="must be a non-empty string without ':'"):
        register_target("a:b", CPUTarget)
    with pytest.raises(TypeError, match="expected a Target, a Target subclass or a factory"):
        register_target("thing", 42)
    register_target("bad-factory", lambda: "not a target")
    with pytest.raises(TypeError, match="its factory returned 'not a target', not a Target"):
        resolve_target("bad-factory")


def test_target_spec_is_the_earlier_name():
    """TargetSpec(name, dict, device) builds the class that accepts the dict's kind; every Target is one."""
    t = TargetSpec("test-cpu", {"kind": "llvm"}, "cpu")
    assert type(t) is CPUTarget and t.name == "test-cpu" and t.schedule == "llmasos-cpu"
    assert type(TargetSpec("g", {"kind": "cuda", "arch": "sm_80"}, "cuda")) is CUDATarget
    assert isinstance(resolve_target("cpu"), TargetSpec) and issubclass(CUDATarget, TargetSpec)


# -- the llmasos.targets entry-point group ---------------------------------------------------------------

def _fake_dist(tmp_path, monkeypatch, dist: str, module: str, code: str, entry_points: dict) -> None:
    install_fake_dist(tmp_path, monkeypatch, "llmasos.targets", dist, module, code, entry_points)
    monkeypatch.setattr(targets, "_loaded", False)  # plugins load again on the next lookup


PLUGIN = """
    from dataclasses import dataclass, field
    from typing import ClassVar
    from llmasos.backends.tvm import Target, register_target

    @dataclass(frozen=True)
    class Board(Target):
        name: str = "board"
        target: dict = field(default_factory=lambda: {"kind": "llvm", "mcpu": "cortex-a72",
                                                      "mtriple": "aarch64-linux-gnu"})
        tvm_kinds: ClassVar[tuple] = ("llvm",)
        variant_key: ClassVar[str] = "mcpu"

    def board_b():
        return Board(name="board-b", extra={"flavour": "b"})

    register_target("board-from-module", Board(name="board-from-module"))
"""


def test_entry_point_targets_load_at_the_first_lookup(registry, tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "llmasos_fakeboard", "llmasos_fakeboard_mod", PLUGIN,
               {"board": "llmasos_fakeboard_mod:Board", "board-b": "llmasos_fakeboard_mod:board_b",
                "more": "llmasos_fakeboard_mod"})
    assert "llmasos_fakeboard_mod" not in sys.modules        # nothing imported before a lookup
    b = resolve_target("board:cortex-a53")
    assert type(b).__name__ == "Board" and b.target["mcpu"] == "cortex-a53" and b.name == "board:cortex-a53"
    assert resolve_target("board-b").extra == {"flavour": "b"}
    assert resolve_target("board-from-module").name == "board-from-module"
    assert target_source("board") == ("entry point 'board = llmasos_fakeboard_mod:Board' of distribution "
                                      "llmasos_fakeboard")
    assert {"board", "board-b", "board-from-module", "cpu"} <= set(known_targets())
    # an llvm dict still resolves to the built-in CPU target
    assert type(resolve_target({"kind": "llvm"})) is CPUTarget


def test_a_broken_plugin_is_reported_without_hiding_the_others(registry, tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "llmasos_badboard", "llmasos_badboard_mod", "raise ImportError('no sdk')\n",
               {"bad": "llmasos_badboard_mod:Thing"})
    with pytest.warns(UserWarning, match=r"cannot load target plugin entry point 'bad = llmasos_badboard_mod:Thing' "
                                         r"of distribution llmasos_badboard: ImportError: no sdk"):
        assert type(resolve_target("cpu")) is CPUTarget
    with pytest.raises(UnknownTargetError, match=r"unknown target 'bad'.*\n  \(cannot load target plugin .*no sdk\)"):
        resolve_target("bad")


# -- a Target subclass whose overrides a build uses -----------------------------------------------------

class _Recorder:
    """A DLight-style rule that schedules the functions made of the test's ``neg`` blocks alone (a split of
    their loop) and records the blocks of every function it was offered and of the ones it scheduled."""

    def __init__(self, seen: list, scheduled: list):
        self.seen, self.scheduled = seen, scheduled

    def is_target_available(self, target) -> bool:
        return True

    def apply(self, func, target, tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import get_root_block
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        names = [sch.get(b).name_hint for b in blocks]
        self.seen.append(names)
        if names != ["test_neg_block"]:
            return None
        sch.split(sch.fuse(*sch.get_loops(blocks[0])), [None, 4])
        self.scheduled.append(names)
        return sch


def _test_neg(ctx, node, args):
    from tvm import te
    return ctx.emit_te(lambda x: te.compute(x.shape, lambda *i: -x(*i), name="test_neg_block"), args[0], name="test_neg")


@dataclass(frozen=True)
class TracingCPU(CPUTarget):
    """The CPU target with ``neg`` lowered by the test and a recording rule first; the lists are shared
    across dataclasses.replace, so a test reads what its builds did."""
    name: str = "test-tracing"
    seen: list = field(default_factory=list, compare=False)
    scheduled: list = field(default_factory=list, compare=False)
    runtimes: list = field(default_factory=list, compare=False)

    def lowerings(self):
        return {"neg": _test_neg}

    def schedule_rules(self):
        return [_Recorder(self.seen, self.scheduled), *super().schedule_rules()]

    def ensure_runtime(self):
        self.runtimes.append(self.name)


def test_custom_target_overrides_a_lowering_and_a_schedule_rule(registry):
    register_target("test-tracing", TracingCPU)
    t = resolve_target("test-tracing")
    g = Graph("g")
    g.add_symbol("n", 1, 64)
    x = g.add_input("x", TensorType((sym("n"), 8), DType.f32))
    y = g.add_node("neg", [x])
    # inside a fused op too: fused.elementwise lowers its ops through the target's table
    z = g.add_node("fused.elementwise", [x, y], {"expr": "add(neg(%0), %1)"})
    g.set_outputs([y, z])
    main = lower(g, t)["main"].script()
    assert main.count("R.call_tir(test_neg") == 2, main        # both negations lowered by the test's fn ...
    assert "R.negative" not in main                      # ... not by the core's
    exe = build(g, t)
    assert t.scheduled == [["test_neg_block"]], t.seen          # the standalone negation, by the test's rule
    assert ["test_neg_block", "T_add"] in t.seen                    # the fused one was offered, and left alone
    assert t.seen and t.runtimes == ["test-tracing"]                    # the Executable asked the target
    xs = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    for o, r in zip(exe(xs), run(g, [xs])):
        np.testing.assert_allclose(o, r, rtol=1e-6)
    # the core target lowers the same graph with the core's table
    core = lower(g, resolve_target("cpu"))["main"].script()
    assert "test_neg" not in core and core.count("R.negative") == 2


# -- the core asks targets instead of comparing device names --------------------------------------------

def test_no_core_file_compares_device_names():
    pattern = re.compile(r'== "cuda"|device == |!= "cuda"|device != ')
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in sorted((ROOT / "llmasos").rglob("*.py")) if p.name != "targets.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_build_and_tuning_do_not_import_each_other_cyclically():
    def imports(mod: str) -> set:
        tree = ast.parse((ROOT / "llmasos/backends/tvm" / f"{mod}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert "build" not in imports("tuning") and "build" not in imports("pipeline")
    assert "tuning" not in imports("pipeline")


def test_a_misspelt_option_is_refused_not_ignored():
    import dataclasses as dc
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['flash_prefil'\]; CUDATarget takes .*flash_prefill"):
        dc.replace(resolve_target("cuda:sm_90a"), extra={"flash_prefil": "on"})
    with pytest.raises(ValueError, match="CPUTarget takes"):       # a CUDA option on the CPU target
        dc.replace(resolve_target("cpu"), extra={"prefill_gemm": "on"})
    assert dc.replace(resolve_target("cpu"), extra={"int8_gemv": "off"}).extra == {"int8_gemv": "off"}
    with pytest.raises(ValueError, match="extra must be a dict"):
        dc.replace(resolve_target("cpu"), extra=[("int8_gemv", "off")])
