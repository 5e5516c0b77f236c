"""``python -m llmasos`` is the ``llmasos`` script: same commands, same output, same exit codes."""
from __future__ import annotations

import subprocess
import sys

from llmasos.cli import main


def _module(*args):
    return subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, timeout=300)


def test_python_m_llmasos_runs_the_cli(capsys):
    r = _module("opt", "--list-passes")
    assert r.returncode == 0, r.stderr
    assert main(["opt", "--list-passes"]) == 0
    assert r.stdout == capsys.readouterr().out
    assert "canonicalize" in r.stdout


def test_python_m_llmasos_passes_the_exit_code_and_usage_on():
    r = _module("compile", "no-such-model")
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr
    r = _module()
    assert r.returncode == 2 and r.stderr.startswith("usage: llmasos ")
