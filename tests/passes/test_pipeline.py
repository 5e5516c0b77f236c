"""Pipeline strings and the pass registry: parsing, option checking, located errors, plugins."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import pytest

from llmasos.passes import (Pass, PassRegistryError, PipelineError, UnknownPassError, all_passes, format_pipeline,
                            get_pass, parse_pipeline, pass_source, register_pass)
from llmasos.passes import base
from llmasos.passes.cse import CommonSubexpressionElimination
from llmasos.passes.dce import DeadCodeElimination
from tests.fake_dist import install_fake_dist


@pytest.fixture
def toyquant(registry):
    @register_pass("toyquant")
    @dataclass(frozen=True)
    class Quantize(Pass):
        exact: ClassVar[bool] = False
        rtol: ClassVar[float] = 1e-2
        bits: int = 8
        group: int = 128
        scale: float = 1.0
        symmetric: bool = False
        mode: str = "per-channel"
        tag: Optional[str] = None

        def run(self, graph):
            return graph
    return Quantize


@pytest.fixture
def needs_opt(registry):
    @register_pass("needs-opt")
    @dataclass(frozen=True)
    class NeedsOpt(Pass):
        level: int

        def run(self, graph):
            return graph
    return NeedsOpt


def test_plain_names_and_spaces():
    assert parse_pipeline("dce,cse") == [DeadCodeElimination(), CommonSubexpressionElimination()]
    assert parse_pipeline("  dce , cse{ } ") == [DeadCodeElimination(), CommonSubexpressionElimination()]
    assert parse_pipeline("") == [] and parse_pipeline("   ") == []


def test_options_of_every_type(toyquant):
    p, d = parse_pipeline('toyquant{bits=4,group=128, scale=0.5,symmetric=true,mode=per-tensor,tag="a, b}"},dce')
    assert p == toyquant(bits=4, group=128, scale=0.5, symmetric=True, mode="per-tensor", tag="a, b}")
    assert d == DeadCodeElimination()
    assert parse_pipeline("toyquant{scale=2}")[0].scale == 2.0  # an int literal is a fine float
    assert parse_pipeline("toyquant{scale=-1e-3}")[0].scale == -1e-3
    assert parse_pipeline("toyquant{mode=inf}")[0].mode == "inf"  # bare words stay words for str options
    assert parse_pipeline("toyquant{tag=none}")[0].tag is None
    assert parse_pipeline(r'toyquant{mode="say \"hi\""}')[0].mode == 'say "hi"'
    assert parse_pipeline("toyquant{}")[0] == toyquant()


def test_format_round_trips(toyquant):
    ps = parse_pipeline('toyquant{bits=4,mode="a b",symmetric=true},cse,toyquant')
    text = format_pipeline(ps)
    assert text == 'toyquant{bits=4,symmetric=true,mode="a b"},cse,toyquant'
    assert parse_pipeline(text) == ps


def test_python_lists():
    d, c = DeadCodeElimination(), CommonSubexpressionElimination()
    assert parse_pipeline([d, "cse", CommonSubexpressionElimination]) == [d, c, c]
    assert parse_pipeline(["dce,cse"]) == [d, c]
    assert parse_pipeline(d) == [d]
    with pytest.raises(TypeError, match=r"pipeline item 1 is 3: expected a Pass"):
        parse_pipeline(["dce", 3])


def _err(text: str) -> PipelineError:
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    return e.value


@pytest.mark.parametrize("text, column, msg", [
    ("dce,,cse", 5, "expected a pass name, found ','"),
    (",dce", 1, "expected a pass name, found ','"),
    ("dce,", 5, "expected a pass name, found the end of the pipeline"),
    ("dce cse", 5, "expected ',' between passes, found 'c'"),
    ("dce;cse", 4, "expected ',' between passes, found ';'"),
    ("dce,cs", 5, "unknown pass 'cs'; did you mean 'cse'?"),
    ("dce,zzzzzz", 5, "unknown pass 'zzzzzz'; known passes: canonicalize, cse, dce, fuse, "),
    ("dce{x=1}", 5, "pass 'dce' has no option 'x' (its options: none)"),
])
def test_errors_point_at_the_character(text, column, msg):
    e = _err(text)
    assert e.column == column
    assert msg in str(e)
    if "known passes:" in msg:  # every registered pass is listed, sorted
        from llmasos.passes import all_passes
        assert str(e).split("\n")[0].endswith("known passes: " + ", ".join(sorted(all_passes())))
    lines = str(e).split("\n")
    assert lines[0].startswith(f"pipeline: column {column}: ")
    assert lines[1] == "  " + text
    assert lines[2] == "  " + " " * (column - 1) + "^"


@pytest.mark.parametrize("text, column, msg", [
    ("toyquant{bitz=4}", 10, "pass 'toyquant' has no option 'bitz' (its options: bits, group, scale, "
                             "symmetric, mode, tag)"),
    ("toyquant{bits=four}", 15, "option 'bits' of pass 'toyquant' takes int, got four"),
    ("toyquant{bits=4.5}", 15, "option 'bits' of pass 'toyquant' takes int, got 4.5"),
    ("toyquant{bits=true}", 15, "option 'bits' of pass 'toyquant' takes int, got true"),
    ("toyquant{symmetric=1}", 20, "option 'symmetric' of pass 'toyquant' takes bool, got 1"),
    ("toyquant{mode=3}", 15, "option 'mode' of pass 'toyquant' takes str, got 3"),
    ("toyquant{bits=4,bits=5}", 17, "option 'bits' of pass 'toyquant' is given twice"),
    ("toyquant{bits 4}", 15, "expected '=' after option 'bits', found '4'"),
    ("toyquant{bits=4", 16, "expected ',' or '}' in the options of 'toyquant', found the end of the pipeline"),
    ("toyquant{bits=4;group=2}", 16, "expected ',' or '}' in the options of 'toyquant', found ';'"),
    ("toyquant{bits=}", 15, "expected a value (number, true/false, word or \"string\"), found '}'"),
    ('toyquant{mode="abc}', 15, "unterminated string"),
    ("toyquant{=4}", 10, "expected an option name, found '='"),
])
def test_option_errors(toyquant, text, column, msg):
    e = _err(text)
    assert (e.column, e.msg) == (column, msg)


def test_required_option(needs_opt):
    assert parse_pipeline("needs-opt{level=2}")[0].level == 2
    e = _err("dce,needs-opt")
    assert (e.column, e.msg) == (5, "pass 'needs-opt' needs option(s) level")


def test_options_checked_when_built_in_python(toyquant):
    with pytest.raises(TypeError, match=r"pass 'toyquant': option 'bits' takes int, got '4'"):
        toyquant(bits="4")
    with pytest.raises(TypeError, match=r"option 'tag' takes str or none, got 3"):
        toyquant(tag=3)


# -- registry ------------------------------------------------------------------------------------------

def test_builtins_registered():
    ps = all_passes()
    assert ps["dce"] is DeadCodeElimination and ps["cse"] is CommonSubexpressionElimination
    assert DeadCodeElimination.exact and CommonSubexpressionElimination.exact
    assert pass_source("dce") == "llmasos.passes.dce.DeadCodeElimination"


def test_unknown_pass_suggests_close_names():
    with pytest.raises(UnknownPassError, match=r"unknown pass 'dec'; did you mean 'dce'\?") as e:
        get_pass("dec")
    assert e.value.suggestions == ["dce"]


def test_bad_registrations(registry):
    with pytest.raises(PassRegistryError, match=r"duplicate pass name 'dce': registered by "
                                                r"llmasos.passes.dce.DeadCodeElimination and again by .*Again"):
        @register_pass("dce")
        @dataclass(frozen=True)
        class Again(Pass):
            pass
    with pytest.raises(PassRegistryError, match=r"pass name 'My_Pass' .* must be kebab-case"):
        register_pass("My_Pass")(DeadCodeElimination)
    with pytest.raises(PassRegistryError, match=r"pass 'loose' .*Loose must be a @dataclass\(frozen=True\)"):
        @register_pass("loose")
        @dataclass
        class Loose(Pass):
            pass
    with pytest.raises(PassRegistryError, match=r"pass 'vague' .*: an inexact pass must declare rtol and/or atol"):
        @register_pass("vague")
        @dataclass(frozen=True)
        class Vague(Pass):
            exact: ClassVar[bool] = False
    with pytest.raises(PassRegistryError, match=r"pass 'listy' .*: option 'xs' has type list"):
        @register_pass("listy")
        @dataclass(frozen=True)
        class Listy(Pass):
            xs: list = None
    with pytest.raises(PassRegistryError, match=r"is not a subclass of llmasos.passes.Pass"):
        register_pass("plain")(dataclass(frozen=True)(type("Plain", (), {})))
    assert not {"loose", "vague", "listy", "plain"} & set(all_passes())


# -- plugins through the llmasos.passes entry-point group ------------------------------------------------

def _fake_dist(tmp_path, monkeypatch, dist: str, module: str, code: str, entry_points: dict) -> None:
    install_fake_dist(tmp_path, monkeypatch, "llmasos.passes", dist, module, code, entry_points)
    monkeypatch.setattr(base, "_loaded", False)  # plugins load again on the next lookup
    monkeypatch.setattr(base, "_load_error", None)


PLUGIN = """
    from dataclasses import dataclass
    from typing import ClassVar
    from llmasos.passes import Pass, register_pass

    @dataclass(frozen=True)
    class Strip(Pass):
        level: int = 1
        def run(self, graph):
            return graph

    @register_pass("decorated-pass")
    @dataclass(frozen=True)
    class Decorated(Pass):
        def run(self, graph):
            return graph
"""


def test_plugin_class_and_module_entry_points(registry, tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "llmasos_fakeplug", "llmasos_fakeplug_mod", PLUGIN,
               {"strip-all": "llmasos_fakeplug_mod:Strip", "more": "llmasos_fakeplug_mod"})
    (p,) = parse_pipeline("strip-all{level=3}")
    assert type(p).__name__ == "Strip" and p.level == 3 and type(p).name == "strip-all"
    assert pass_source("strip-all") == ("entry point 'strip-all = llmasos_fakeplug_mod:Strip' of distribution "
                                        "llmasos_fakeplug")
    assert "decorated-pass" in all_passes()
    assert "dce" in all_passes()


def test_plugin_duplicate_names_both_sources(registry, tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "llmasos_dupplug", "llmasos_dupplug_mod", PLUGIN,
               {"dce": "llmasos_dupplug_mod:Strip"})
    with pytest.raises(PassRegistryError, match=r"duplicate pass name 'dce': registered by "
                                                r"llmasos.passes.dce.DeadCodeElimination and again by entry point "
                                                r"'dce = llmasos_dupplug_mod:Strip' of distribution llmasos_dupplug"):
        get_pass("cse")


def test_plugin_that_fails_to_import(registry, tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "llmasos_badplug", "llmasos_badplug_mod", "raise ImportError('no gpu')\n",
               {"bad": "llmasos_badplug_mod"})
    with pytest.raises(PassRegistryError, match=r"cannot load pass plugin entry point 'bad = llmasos_badplug_mod' "
                                                r"of distribution llmasos_badplug: ImportError: no gpu"):
        all_passes()
    with pytest.raises(PassRegistryError, match=r"cannot load pass plugin"):  # every lookup, not just the first
        get_pass("dce")
