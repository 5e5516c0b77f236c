"""bench/small_m_gemm_check.py, small_m_quant_gemm_check.py and prefill_attention_check.py, GPU checks, run end
to end on the CPU (tests/backends/_mock_cuda_bench.py: torch.cuda faked, the kernels interpreted by
llmasos.backends.tvm.simt) so a GPU session is not spent on a script error: every variant is built, run, compared
with torch and reported. Slow (a minute of interpreted kernels)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "backends", "_mock_cuda_bench.py"),
                          os.path.join(ROOT, "bench", script), *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_small_m_gemm_check_runs_every_variant():
    doc = _run("small_m_gemm_check.py", "--shapes", "128x1024", "--rows", "1,40", "--repeat", "1")
    assert doc["failed"] == [] and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert set(row["variants"]) == {"1", "2", "4", "auto"} and row["auto_rows"] == 1
        assert all(v["ok"] and v["rel_err"] < 2e-3 for v in row["variants"].values())


def test_small_m_quant_gemm_check_runs_every_variant():
    doc = _run("small_m_quant_gemm_check.py", "--shapes", "64x1024", "--quant", "4:128:sym,8:0:asym",
               "--rows", "3", "--variants", "1,4,auto", "--repeat", "1")
    assert doc["failed"] == [] and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert set(row["variants"]) == {"1", "4", "auto"} and "our_f16_us" in row
        assert all(v["ok"] for v in row["variants"].values())


def test_prefill_attention_check_runs_every_case():
    doc = _run("prefill_attention_check.py", "--heads", "4:2", "--head-dim", "16", "--batch", "1", "--prompt", "24",
               "--max-seq", "512", "--repeat", "1")
    assert doc["ok"] and len(doc["rows"]) == 3 and doc["rows"][-1]["paged"]
    # every variant that covers head dim 16 (8 warps need D % 32: skipped and said so), in every row
    assert doc["kernels"] == ["mma", "mma_s2", "cuda_cores"] and doc["skipped_kernels"] == ["mma_w8", "mma_w8_s2"]
    assert all(r[f"{k}_all_written"] and r[f"{k}_max_abs_err"] < 2e-3 for r in doc["rows"] for k in doc["kernels"])
    assert doc["rows"][0]["sdpa_max_abs_err"] < 2e-3
