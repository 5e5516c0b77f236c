"""bench/serve.py end to end on a tiny preset (slow: it compiles two builds): the JSON carries both
continuous sides of --ragged ab, the static side, each side's energy (--energy), and the numerics check of the
padded and the ragged calls against TorchPagedRunner."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_ragged_ab_on_a_tiny_model(tmp_path):
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--model", "llama-tiny", "--concurrency", "2",
                    "--requests", "4", "--in-process", "--ragged", "ab", "--max-seq", "48", "--max-batch", "4",
                    "--prompt-len", "4,20", "--output-len", "2,8", "--time-limit", "60", "--energy", "--out", str(out)],
                   check=True, capture_output=True, timeout=600, cwd=ROOT)
    doc = json.loads(out.read_text())
    assert doc["ragged"] == "ab"
    check = doc["check_vs_torch"]
    assert check["max_abs_logits_diff"] < 1e-3 and check["ragged_max_abs_logits_diff"] < 1e-3, check
    assert not check["argmax_differs_rows"] and not check["ragged_argmax_differs_rows"]
    (row,) = doc["levels"]
    for side in ("continuous", "continuous_two_calls", "static"):
        assert row[side]["requests"] == 4 and row[side]["output_tokens"] > 0, side
    assert row["continuous"]["output_tokens"] == row["continuous_two_calls"]["output_tokens"]
    assert row["ragged_speedup"] > 0 and doc["kv_blocks_used_at_end"] == 0
    # --energy: every side's window, its J/token over its own tokens, the CPU estimate labelled
    assert set(doc["energy_idle_w"]) == set(doc["energy_meters"]) and doc["energy_meters"]
    for side in ("continuous", "continuous_two_calls", "static"):
        e = row[side]["energy"]
        assert e["joules"] >= e["active_joules"] >= 0 and e["j_per_token"] is not None
        assert abs(e["j_per_token"] * row[side]["output_tokens"] - e["joules"]) <= 1e-3 + 1e-3 * e["joules"]
        assert e["estimated"] == any("estimated" in m for m in doc["energy_meters"].values())
