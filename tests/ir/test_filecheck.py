"""The checker itself: right checks pass, wrong ones fail with the failing line named, malformed files are
rejected. A FileCheck that cannot fail would make every .llir test vacuous."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.ir.filecheck import FileCheckError, check_output, parse_test, run_test_file

OUT = """\
graph @m(%x: f32[4]) {
  %a: f32[4] = exp(%x)
  %b: f32[4] = tanh(%a)
  return %b
}
"""


def checks(*lines: str):
    return parse_test("// RUN: verify\n" + "\n".join(lines) + "\n").checks


def ok(*lines: str, out: str = OUT) -> None:
    check_output(out, checks(*lines))


def fails(*lines: str, out: str = OUT, match: str) -> str:
    with pytest.raises(FileCheckError, match=match) as e:
        check_output(out, checks(*lines))
    return str(e.value)


def test_check_in_order():
    ok("// CHECK: exp(%x)", "// CHECK: tanh(%a)", "// CHECK: return %b")
    ok("// CHECK: %a", "// CHECK: = exp")  # later on the same line
    msg = fails("// CHECK: tanh", "// CHECK: exp", match=r"line 3: CHECK: exp\n  not found in the output after line 3")
    assert ">   3 |   %b: f32[4] = tanh(%a)" in msg  # the output is shown, the scan start marked
    fails("// CHECK: sigmoid", match="line 2: CHECK: sigmoid")


def test_check_next():
    ok("// CHECK: exp", "// CHECK-NEXT: tanh", "// CHECK-NEXT: return")
    fails("// CHECK: exp", "// CHECK-NEXT: return", match=r"line 3: CHECK-NEXT: return\n  not found on the line after")
    fails("// CHECK: }", "// CHECK-NEXT: graph", match="CHECK-NEXT: graph")  # no line after the last


def test_check_same():
    ok("// CHECK: %a:", "// CHECK-SAME: exp(%x)")
    fails("// CHECK: %a:", "// CHECK-SAME: tanh", match="CHECK-SAME: tanh")
    fails("// CHECK: exp", "// CHECK-SAME: %a", match="CHECK-SAME: %a")  # before the match does not count


def test_check_not():
    ok("// CHECK: exp", "// CHECK-NOT: sigmoid", "// CHECK: tanh")
    ok("// CHECK: tanh", "// CHECK-NOT: exp")  # exp is before the range
    msg = fails("// CHECK: graph", "// CHECK-NOT: exp", "// CHECK: tanh", match=r"line 3: CHECK-NOT: exp\n  found at line 2")
    assert ">   2 |" in msg
    fails("// CHECK: tanh", "// CHECK-NOT: return", match="CHECK-NOT: return")  # up to the end
    fails("// CHECK-NOT: graph", "// CHECK: exp", match="CHECK-NOT: graph")  # from the start


def test_check_label_fences():
    out = "graph @f {\n  %a = exp\n}\ngraph @g {\n  %b = tanh\n}\n"
    ok("// CHECK-LABEL: @f", "// CHECK: exp", "// CHECK-LABEL: @g", "// CHECK: tanh", out=out)
    # a plain CHECK would find tanh in @g; the label stops it at @f's end
    fails("// CHECK-LABEL: @f", "// CHECK: tanh", "// CHECK-LABEL: @g", out=out,
          match="CHECK: tanh\n  not found .* before the next CHECK-LABEL")
    fails("// CHECK-LABEL: @h", out=out, match="CHECK-LABEL: @h\n  label not found")
    fails("// CHECK-LABEL: @g", "// CHECK-LABEL: @f", out=out, match="CHECK-LABEL: @f")  # labels are ordered


def test_whitespace_and_regex():
    ok("// CHECK:    %a:   f32[4]   ")  # blank runs in the pattern match blank runs, ends are trimmed
    ok("// CHECK: %a: f32[{{[0-9]+}}] = {{exp|log}}(%x)")
    ok("// CHECK: {{^}}graph @m", "// CHECK: return %b{{$}}")
    fails("// CHECK: {{^}}%a", match="CHECK: ")  # indented: ^%a is nowhere
    fails("// CHECK: f32[{{[a-z]+}}]", match=re.escape("f32[{{[a-z]+}}]"))
    assert checks("// CHECK: a.b")[0].regex.search("axb") is None  # literal parts are escaped


def test_error_lines_match_stderr_in_order(tmp_path: Path):
    f = tmp_path / "t.llir"
    f.write_text("// RUN: verify\ngraph @m(%x: f32[4]) {\n  return %y\n}\n"
                 "// CHECK-ERROR: line 3, column 10: use of undefined value %y\n// CHECK-NEXT: return %y\n")
    run_test_file(f)
    f.write_text(f.read_text().replace("column 10", "column 11"))
    with pytest.raises(FileCheckError, match=r"t.llir: line 5: CHECK-ERROR: line 3, column 11.*\n.*\n  stderr"):
        run_test_file(f)


def test_expected_error_but_success(tmp_path: Path):
    f = tmp_path / "t.llir"
    f.write_text("// RUN: verify\ngraph @m(%x: f32[4]) {\n  return %x\n}\n// CHECK-ERROR: rule\n")
    with pytest.raises(FileCheckError, match="expected 'llmasos opt -p verify' to fail .* printed:\ngraph @m"):
        run_test_file(f)


def test_unexpected_failure_shows_stderr(tmp_path: Path):
    f = tmp_path / "t.llir"
    f.write_text("// RUN: verify\ngraph @m(%x: f32[4]) {\n  return %y\n}\n// CHECK: graph\n")
    with pytest.raises(FileCheckError, match="failed with status 2 .*\n.*use of undefined value %y"):
        run_test_file(f)


def test_pipeline_runs(tmp_path: Path):
    ir = "graph @m(%x: f32[4]) {\n  %d: f32[4] = exp(%x)\n  return %x\n}\n"
    f = tmp_path / "t.llir"
    f.write_text("// RUN: verify\n" + ir + "// CHECK: %d\n")
    run_test_file(f)
    f.write_text("// RUN: dce\n" + ir + "// CHECK: %d\n")  # the pipeline ran: %d is gone
    with pytest.raises(FileCheckError, match="CHECK: %d"):
        run_test_file(f)


@pytest.mark.parametrize("text, match", [
    ("graph @m", "needs exactly one '// RUN: <pipeline>' line, found 0"),
    ("// RUN: dce\n// RUN: cse\n// CHECK: x", r"found 2 \(lines 1, 2\)"),
    ("// RUN: dce", "no CHECK lines"),
    ("// RUN: dce\n// CHECK-NXT: x", "t:2: unknown directive 'CHECK-NXT'"),
    ("// RUN: dce\n// CHEKC: x", "unknown directive 'CHEKC'"),
    ("// RUN: dce\n// CHECK x", "CHECK needs a colon"),
    ("// RUN: dce\n// CHECK:   ", "empty CHECK pattern"),
    ("// RUN: dce\n// CHECK: {{(}}", "t:2: bad regex"),
    ("// RUN: dce\n// CHECK-NEXT: x", "CHECK-NEXT has no previous match"),
    ("// RUN: dce\n// CHECK-ERROR: x\n// CHECK: y", "t:3: CHECK in a file with CHECK-ERROR"),
])
def test_malformed_files(text, match):
    with pytest.raises(FileCheckError, match=match):
        parse_test(text, "t")


def test_prose_comments_are_not_directives():
    tf = parse_test("// RUNNING this checks nothing special\n// RUN: dce\n// CHECKS below:\n// CHECK: x", "t")
    assert tf.run == "dce" and [c.kind for c in tf.checks] == ["CHECK"]


def _positive_checks(path: Path):
    return [(i, line) for i, line in enumerate(path.read_text().split("\n"))
            if re.match(r"//\s*CHECK(-NEXT|-SAME|-LABEL|-ERROR)?:", line)]


FILES = sorted(Path(__file__).parent.glob("**/*.llir"))


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_every_positive_check_of_every_file_can_fail(path: Path, tmp_path: Path):
    # Mutation test: spoil one positive check at a time; the file must then fail on exactly that line.
    lines = path.read_text().split("\n")
    spoilt = tmp_path / path.name
    for i, line in _positive_checks(path):
        spoilt.write_text("\n".join(lines[:i] + [line.rstrip() + " XYZZY"] + lines[i + 1:]))
        with pytest.raises(FileCheckError, match=f"line {i + 1}: "):
            run_test_file(spoilt)
