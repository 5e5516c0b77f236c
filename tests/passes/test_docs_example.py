"""docs/passes.md's example pass: the doc's code blocks match docs/examples/, and the example works."""
from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "passes.md"
FENCE = r"\n```[a-z]*\n(.*?)```"


def _blocks(marker: str) -> list[tuple[str, str]]:
    """(argument of the marker, code block right after it) for every ``<!-- marker ... -->``."""
    return re.findall(r"<!-- " + marker + r"(?:: (\S+))? -->" + FENCE, DOC.read_text(), re.S)


@pytest.fixture
def isolated_registry(registry, monkeypatch):
    """The example registers 'strength-reduce'; keep it out of the registry other tests see."""
    spec = importlib.util.spec_from_file_location("docs_example_my_pass", ROOT / "docs/examples/my_pass.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_doc_blocks_are_the_example_files_and_the_pass_is_short():
    blocks = dict(_blocks("example"))
    assert sorted(blocks) == ["docs/examples/my_pass.py", "docs/examples/my_rules.rw"]
    for path, code in blocks.items():
        assert code == (ROOT / path).read_text(), f"docs/passes.md's block for {path} is out of date"
    assert len(blocks["docs/examples/my_pass.py"].splitlines()) <= 30


def test_doc_test_block_passes(isolated_registry):
    (_, code), = _blocks("example-test")
    ns: dict = {}
    exec(compile(code, f"{DOC}:example-test", "exec"), ns)
    tests = [f for name, f in ns.items() if name.startswith("test_")]
    assert tests, "the doc's test block defines no test_ function"
    for t in tests:
        t()


def test_example_pass_numerics_and_options(isolated_registry):
    from llmasos.ir import DType, Graph, TensorType
    from llmasos.ir.interpreter import run
    from llmasos.passes import NumericDriftError, PassManager, get_pass
    from llmasos.passes.rewrite import parse_rules

    cls = get_pass("strength-reduce")
    assert cls is isolated_registry.StrengthReduce and cls().tolerance() == (1e-6, 1e-7)
    g = Graph("h")
    x = g.add_input("x", TensorType((2, 3), DType.f32))
    two = g.add_node("const", [], {"value": np.array(2.0, np.float32), "dtype": DType.f32})
    g.set_outputs([g.add_node("div", [x, two]), g.add_node("pow", [x, two])])
    xs = [np.array([[1.0, -2.5, 3e-3], [0.0, -0.0, 6.0e4]], np.float32)]
    out = PassManager("strength-reduce{max_rewrites=5},dce", numeric_check=xs).run(g)
    assert [n.op for n in out.nodes].count("mul") == 2 and "pow" not in [n.op for n in out.nodes]
    half, square = run(out, xs)
    np.testing.assert_array_equal(half, xs[0] / 2)  # x * 0.5 is x / 2 exactly
    np.testing.assert_allclose(square, xs[0] ** 2, rtol=1e-6)
    # the check can fail: a wrong "half" rule (in this test's private copy of the module) is caught
    wrong = parse_rules("rule half: div(x, 2.0) => mul(x, 0.25) where shape(x) == shape(root)")
    isolated_registry.RULES.rules[:] = list(wrong)
    with pytest.raises(NumericDriftError, match=r"pass 'strength-reduce'"):
        PassManager("strength-reduce", numeric_check=xs).run(g)


def test_example_rules_through_llmasos_opt(capsys, monkeypatch):
    from llmasos.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("""graph @m(%x: f32[3]) {
  %two: f32[] = const() {dtype = f32, value = dense<f32[] [2.0]>}
  %p: f32[3] = pow(%x, %two)
  return %p
}
"""))
    rules = ROOT / "docs" / "examples" / "my_rules.rw"
    rc = main(["opt", "-", "-p", f'rewrite{{rules="{rules}"}},dce', "--check-numerics"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "= mul(%x, %x)" in out and "pow" not in out, out
