#!/usr/bin/env bash
# The GPU measurements the open issues still owe, in priority order, each bounded in time, JSON into $OUT
# (default ./gpu_suite_out). Run on a machine with one NVIDIA GPU, TVM and the repo importable:
#     bash bench/gpu_suite.sh [STEP ...]      # steps: quant attn decode energy serve prefill (default: all, in order)
# Read-only on the GPU: nothing here changes a power limit, clock or any other device setting.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_suite_out}; mkdir -p "$OUT"
steps=${*:-quant attn decode energy serve prefill}
run() {   # name seconds command...: one bounded step, its stdout as JSON, its log beside it
  local name=$1 secs=$2; shift 2
  echo "[gpu_suite] $name (<= ${secs} s): $*" >&2
  timeout "$secs" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; echo "[gpu_suite] $name rc=$?" >&2
}
for s in $steps; do
  case $s in
    # issue 17: int4 with the small-M quantized kernel, its repack lifted (docs/llm.md "Quantized prompts"):
    # batch 1 >= 2.5x our f16, batch 8 >= 1.5x; J/token below f16's
    quant) run quant 420 python bench/decode.py --models llama-1b --batch 1,8,32 --new 64 --repeat 2 --int4 llama-1b \
             --target-option small_m_quant_gemm=on --energy ;;
    # issues 12 / 17: the decode attention kernels with 4 / 8 rows a row group per iteration against the default
    # (paged and contiguous, batch 1-64 at long positions; at batch 64 the paged kernel took 170 us a layer)
    attn) for t in auto 4 8; do run attn_tile_$t 200 python bench/paged_gpu_check.py --target-option decode_attention_tile=$t; done ;;
    # issue 17: batch 8 / 32 decode against torch.compile, the quantized kernel beside
    decode) run decode 420 python bench/decode.py --models llama-1b,gpt2-124m --batch 1,8,32 --new 64 --repeat 2 \
              --ab-option small_m_quant_gemm=on --energy ;;
    # issue 15: J/token rows and the planner's pick (quantized compiles need ~210 s of the budget)
    energy) run energy 460 python bench/energy_gpu.py --time-budget 430 --target-option small_m_quant_gemm=on ;;
    # issue 12: continuous vs static at concurrency 32 / 64, the paged decode step captured and not
    serve) run serve 560 python bench/serve.py --model llama-1b --target cuda --dtype f16 --max-batch 64 --max-seq 1024 \
             --concurrency 64 --prompt-len 32,512 --output-len 32,256 --in-process --torch-compile \
             --target-option paged_cuda_graph=on --time-limit 25 --budget 520 ;;
    # issue 17: prefill of 1024 tokens against torch.compile
    prefill) run prefill 300 python bench/prefill.py --batch 1,8 --prompt 1024 --repeat 3 ;;
    *) echo "gpu_suite: unknown step '$s' (quant, attn, decode, energy, serve, prefill)" >&2; exit 2 ;;
  esac
done
