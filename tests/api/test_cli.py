"""The llmasos command line: compile -> artifact -> run, and clean errors."""
import json

import pytest

from llmasos.cli import main


def test_compile_then_run(tmp_path, capsys):
    out = tmp_path / "tiny.llmasos"
    assert main(["compile", "llama-tiny", "-o", str(out), "--max-batch", "2", "--print-ir"]) == 0
    captured = capsys.readouterr()
    assert "compiled llama-tiny for cpu" in captured.err and f"saved {out}" in captured.err
    assert captured.out.startswith("graph @LlamaForCausalLM(%input_ids: i64[batch, seq])")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["kind"]) == ("llmasos", 2, "model")
    assert manifest["target"] == "cpu" and manifest["entries"]["main"]["convention"]["input_names"] == ["input_ids"]
    assert main(["run", str(out), "--ids", "1,2,3,4,5", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "input: [1, 5] tokens; output [1, 5, 128]" in text
    assert "next-token top 5:" in text


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["compile", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["compile", "llama-tiny", "--target", "tpu"]) == 2
    assert "unknown target 'tpu'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.llmasos"), "--ids", "1,2"]) == 2
    assert "not an LLMasOS artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run"])


def test_tune_then_generate_with_the_database(tmp_path, capsys):
    db = tmp_path / "tiny.tune"
    assert main(["tune", "llama-tiny", "--db", str(db), "--trials", "0", "--max-seq", "32"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON report alone
    n = len(report["tasks"])
    assert n > 0 and all(t["chosen"] == "default" for t in report["tasks"])
    assert f"use it with --tuning-db {db}" in captured.err
    assert main(["generate", "llama-tiny", "--ids", "1,2,3", "-n", "4", "--max-seq", "32",
                 "--tuning-db", str(db)]) == 0
    assert f"({n} kernels from the tuning database)" in capsys.readouterr().err
    assert main(["generate", "llama-tiny", "--ids", "1,2,3", "--tuning-db", str(tmp_path / "none")]) == 2
    assert "is not a tuning database" in capsys.readouterr().err
