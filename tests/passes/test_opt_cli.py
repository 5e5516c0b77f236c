"""``llmasos opt``: IR text in, pipeline, IR text out; located errors on stderr with exit status 2."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from llmasos.cli import main
from llmasos.ir import parse, print_graph

IR = """\
// a graph with a dead node and a duplicate
graph @m(%x: f32[batch, 3]) {
  symbol batch in [1, 8]
  param %w: f32[3]
  param %unused: f32[5]
  %a: f32[batch, 3] = exp(%x)
  %b: f32[batch, 3] = exp(%x)
  %c: f32[batch, 3] = add(%a, %b)
  %d: f32[batch, 3] = tanh(%c)
  %e: f32[batch, 3] = mul(%c, %w)
  return %e
}
"""

OPTIMIZED = """\
graph @m(%x: f32[batch, 3]) {
  symbol batch in [1, 8]
  param %w: f32[3]
  %a: f32[batch, 3] = exp(%x)
  %c: f32[batch, 3] = add(%a, %a)
  %e: f32[batch, 3] = mul(%c, %w)
  return %e
}
"""


def opt(capsys, monkeypatch, *argv, stdin: str = IR) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["opt", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_file_in_ir_out(capsys, monkeypatch, tmp_path):
    f = tmp_path / "m.llir"
    f.write_text(IR)
    assert opt(capsys, monkeypatch, str(f), "-p", "dce,cse") == (0, OPTIMIZED, "")


def test_stdin_and_output_file(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out.llir"
    assert opt(capsys, monkeypatch, "-", "-p", "cse,dce", "-o", str(out)) == (0, "", "")
    assert out.read_text() == OPTIMIZED
    assert opt(capsys, monkeypatch, "--pipeline", "cse,dce") == (0, OPTIMIZED, "")  # FILE defaults to stdin


def test_empty_pipeline_round_trips(capsys, monkeypatch):
    rc, out, _ = opt(capsys, monkeypatch)
    assert rc == 0 and out == print_graph(parse(IR)) + "\n"


def test_print_after_all_and_timing_go_to_stderr(capsys, monkeypatch):
    rc, out, err = opt(capsys, monkeypatch, "-p", "dce,cse", "--print-after-all", "--timing")
    assert rc == 0 and out == OPTIMIZED
    after_dce, rest = err.split("// ----- IR after dce -----\n")[1].split("// ----- IR after cse -----\n")
    assert "%b: f32[batch, 3] = exp(%x)" in after_dce and "%d:" not in after_dce
    after_cse, timing = rest.split("// ----- pass timing -----\n")
    assert after_cse == OPTIMIZED
    rows = [line.split() for line in timing.splitlines()]
    assert rows[1][2:] == ["yes", "5->4", "dce"] and rows[2][2:] == ["yes", "4->3", "cse"]
    assert rows[-1][2] == "total"


def test_check_numerics(capsys, monkeypatch):
    rc, out, err = opt(capsys, monkeypatch, "-p", "dce,cse", "--check-numerics", "--timing")
    assert rc == 0 and out == OPTIMIZED
    assert "(numeric check)" in err


def test_list_passes(capsys, monkeypatch):
    rc, out, _ = opt(capsys, monkeypatch, "--list-passes")
    assert rc == 0
    assert "cse" in out.split() and "dce" in out.split() and "llmasos.passes.dce.DeadCodeElimination" in out


@pytest.mark.parametrize("argv, stdin, expected", [
    (["-p", "dce,,cse"], IR, "llmasos opt: error: pipeline: column 5: expected a pass name, found ','\n"
                             "  dce,,cse\n      ^\n"),
    (["-p", "dce,csx"], IR, "llmasos opt: error: pipeline: column 5: unknown pass 'csx'; did you mean 'cse'?\n"
                             "  dce,csx\n      ^\n"),
    (["-p", "dce{level=2}"], IR, "llmasos opt: error: pipeline: column 5: pass 'dce' has no option 'level' "
                                 "(its options: none)\n  dce{level=2}\n      ^\n"),
    (["-p", "dce"], "graph @m(%x: f32[2]) {\n  %y: f32[2] = exq(%x)\n  return %y\n}\n",
     "llmasos opt: error: <stdin>: line 2, column 16: unknown op 'exq'; did you mean"),
    (["-p", "dce"], "graph @m(%x: f32[2]) {\n  %y: f32[3] = exp(%x)\n  return %y\n}\n",
     "llmasos opt: error: pass '<input>': node %y = exp(...): the input graph fails verification before any pass"),
    (["missing.llir", "-p", "dce"], "", "llmasos opt: error: cannot read missing.llir: No such file or directory\n"),
])
def test_errors_exit_2_with_a_message(capsys, monkeypatch, tmp_path, argv, stdin, expected):
    monkeypatch.chdir(tmp_path)
    rc, out, err = opt(capsys, monkeypatch, *argv, stdin=stdin)
    assert (rc, out) == (2, "")
    assert err.startswith(expected), err
    assert "Traceback" not in err


def test_no_verify_each_lets_a_bad_input_through(capsys, monkeypatch):
    bad = "graph @m(%x: f32[2]) {\n  %y: f32[3] = exp(%x)\n  return %y\n}\n"
    rc, out, _ = opt(capsys, monkeypatch, "-p", "dce", "--no-verify-each", stdin=bad)
    assert rc == 0 and "%y: f32[3] = exp(%x)" in out


def test_the_installed_command_reads_a_pipe():
    """The real entry point, through a process boundary: stdin, stdout, stderr and the exit status."""
    code = "import sys; from llmasos.cli import main; sys.exit(main())"
    ok = subprocess.run([sys.executable, "-c", code, "opt", "-", "-p", "dce,cse"], input=IR, text=True,
                        capture_output=True, timeout=120)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, OPTIMIZED, "")
    bad = subprocess.run([sys.executable, "-c", code, "opt", "-p", "dce,,cse"], input=IR, text=True,
                         capture_output=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "llmasos opt: error: pipeline: column 5: expected a pass name, found ','\n  dce,,cse\n      ^\n"


def test_check_numerics_reports_drift(capsys, monkeypatch, registry):
    from dataclasses import dataclass

    from llmasos.passes import Pass, register_pass

    @register_pass("add-to-sub")
    @dataclass(frozen=True)
    class AddToSub(Pass):
        def run(self, graph):
            g = graph.clone()
            next(n for n in g.nodes if n.op == "add").op = "sub"
            return g

    rc, out, err = opt(capsys, monkeypatch, "-p", "dce,cse,add-to-sub", "--check-numerics")
    assert (rc, out) == (2, "")
    assert err.startswith("llmasos opt: error: pass 'add-to-sub': node %c = sub(...): numeric drift past the "
                          "pass's tolerance (exact: rtol 1e-06): first diverging value %c: "), err
    rc, out, _ = opt(capsys, monkeypatch, "-p", "dce,cse,add-to-sub")  # unchecked, it goes through
    assert rc == 0 and "%c: f32[batch, 3] = sub(%a, %a)" in out
