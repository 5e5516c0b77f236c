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
    assert manifest["target"] == "cpu" and manifest["input_names"] == ["input_ids"]
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
