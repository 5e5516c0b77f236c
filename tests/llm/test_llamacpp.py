"""llama-bench as the CPU baseline (llmasos/llm/llamacpp.py): finding it and reading its JSON, against a
stand-in script that prints what llama-bench prints (the real one is not built in CI)."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from llmasos.llm import llamacpp

ROWS = [{"model_type": "llama ?B Q4_1", "build_commit": "abc", "n_prompt": 128, "n_gen": 0, "avg_ts": 812.5},
        {"model_type": "llama ?B Q4_1", "build_commit": "abc", "n_prompt": 0, "n_gen": 64, "avg_ts": 121.6}]


def fake_bench(tmp_path, rc=0):
    p = tmp_path / "llama-bench"
    p.write_text(f"#!{sys.executable}\nimport sys, json\nsys.stderr.write('args ' + ' '.join(sys.argv[1:]))\n"
                 f"print('build: noise before the json')\nprint(json.dumps({ROWS!r}))\nsys.exit({rc})\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def test_find_prefers_the_given_path_then_the_environment(tmp_path, monkeypatch):
    exe = fake_bench(tmp_path)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    assert llamacpp.find_llama_bench() is None
    monkeypatch.setenv(llamacpp.ENV, str(exe))
    assert llamacpp.find_llama_bench() == str(exe)
    with pytest.raises(FileNotFoundError, match="not an executable"):
        llamacpp.find_llama_bench(str(tmp_path / "missing"))
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path))   # a directory is no executable
    with pytest.raises(FileNotFoundError, match="LLAMA|not an executable"):
        llamacpp.find_llama_bench()


def test_run_reads_decode_and_prefill(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    r = llamacpp.run_llama_bench(str(fake_bench(tmp_path)), str(gguf), threads=2, prompt=128, new=64)
    assert r["decode_tok_s"] == 121.6 and r["prefill_tok_s"] == 812.5 and r["model_type"] == "llama ?B Q4_1"
    assert "-t 2 -p 128 -n 64" in r["cmd"] and "-o json" in r["cmd"]


def test_run_reports_failure_and_missing_model(tmp_path):
    gguf = tmp_path / "m.gguf"
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        llamacpp.run_llama_bench(str(fake_bench(tmp_path)), str(gguf), threads=1)
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match=r"failed \(3\)"):
        llamacpp.run_llama_bench(str(fake_bench(tmp_path, rc=3)), str(gguf), threads=1)
