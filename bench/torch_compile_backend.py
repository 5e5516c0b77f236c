"""torch.compile backends side by side: LLMasOS (backend="llmasos") against inductor (the default backend) and
torch eager, in the same run, on random-weight GPT-2-small and Llama (SmolLM2-135M) shaped models.

    python bench/torch_compile_backend.py [--device cpu|cuda] [--models gpt2-small,llama-135m] [--batch 1]
                                          [--seq 128] [--dtype f32|f16|bf16] [--repeat 20] [--warmup 3]
                                          [--passes fuse] [--threads N] [--no-inductor] [--out FILE]

One forward of the whole sequence (use_cache=False) under torch.no_grad(). Per model, in this order: eager,
inductor, ours -- TVM's worker threads spin after each call and would steal cores from a torch run after
them, and each model runs in a fresh subprocess for the same reason (and so no compiled state is shared).
Latency is the median of --repeat calls after --warmup calls (CUDA: synchronized per call); the compile
time is the first call's wall time (dynamo tracing + the backend), reported separately. max_abs_err is
against eager's logits. One JSON document on stdout; progress on stderr.

--threads N gives torch (set_num_threads) and TVM (TVM_NUM_THREADS) the same N CPU threads; default: each
its own default (on a 2-core machine both use 2). On a loaded machine prefer --threads 1: a thread pool
that waits for a core another process holds stalls every GEMM (torch eager GPT-2-small, 128 tokens, on
this project's 2-core VM under load: 2.4 s with 2 threads, 0.5 s with 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def _timer(device: str):
    import torch

    def run(fn, repeat: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    return run


def _first_call(fn, device: str) -> tuple:
    import torch
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_model(name: str, a) -> dict:
    import torch

    import llmasos.dynamo as D
    from llmasos.zoo import from_preset

    device = a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, DTYPES[a.dtype])
    model = from_preset(name).to(device=device, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    timed = _timer(device)
    r = {"model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
         "device": device, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "repeat": a.repeat}

    with torch.no_grad():
        ref = model(ids).logits.float()
        _log(f"{name}: eager")
        r["eager_ms"] = round(timed(lambda: model(ids), a.repeat, a.warmup) * 1e3, 3)

        if a.inductor:
            _log(f"{name}: inductor (compiling)")
            torch._dynamo.reset()
            try:
                fast = torch.compile(model)
                out, r["inductor_compile_s"] = _first_call(lambda: fast(ids), device)
                r["inductor_max_abs_err"] = (out.logits.float() - ref).abs().max().item()
                r["inductor_ms"] = round(timed(lambda: fast(ids), a.repeat, a.warmup) * 1e3, 3)
            except Exception as e:  # noqa: BLE001 -- no C++ compiler / Triton: report it, keep going
                r["inductor_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            torch._dynamo.reset()

        _log(f"{name}: llmasos (compiling)")
        before = len(D.records)
        ours = torch.compile(model, backend="llmasos", options={"passes": a.passes})
        out, r["llmasos_compile_s"] = _first_call(lambda: ours(ids), device)
        recs = D.records[before:]
        r["llmasos_build_s"] = round(sum(x.seconds for x in recs), 2)
        r["llmasos_partitions"] = sum(x.partitions for x in recs)
        r["llmasos_eager_ops"] = {k: v for x in recs for k, v in x.eager_ops.items()}
        r["llmasos_max_abs_err"] = (out.logits.float() - ref).abs().max().item()
        r["llmasos_ms"] = round(timed(lambda: ours(ids), a.repeat, a.warmup) * 1e3, 3)

    r["logits_scale"] = ref.abs().max().item()
    for k in ("inductor_compile_s", "llmasos_compile_s"):
        if k in r:
            r[k] = round(r[k], 2)
    r["speedup_vs_eager"] = round(r["eager_ms"] / r["llmasos_ms"], 3)
    if "inductor_ms" in r:
        r["speedup_vs_inductor"] = round(r["inductor_ms"] / r["llmasos_ms"], 3)
    return r


def environment(device: str) -> dict:
    import torch

    import llmasos.backends.tvm  # noqa: F401  (sizes TVM's thread pool)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS")}
    try:
        import tvm
        env["tvm"] = tvm.__version__
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", default="gpt2-small,llama-135m", help="llmasos.zoo presets, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--passes", default="fuse")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and TVM alike (0: defaults)")
    p.add_argument("--no-inductor", dest="inductor", action="store_false", help="skip inductor (slow to compile)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: bench one model in this process
    a = p.parse_args(argv)

    if a.one:
        print(json.dumps(bench_model(a.one, a)), flush=True)
        return
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
    results = []
    for name in a.models.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, *(argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ, **({"TVM_NUM_THREADS": str(a.threads)} if a.threads else {}))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results.append({"model": name, "error": f"exit code {proc.returncode}"})
        else:
            results.append(json.loads(lines[-1]))
        _log(json.dumps(results[-1]))
    if a.threads:
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
        import torch
        torch.set_num_threads(a.threads)
    doc = {"bench": "torch_compile_backend", "env": environment(a.device), "results": results,
           "summary": [{k: r.get(k) for k in ("model", "eager_ms", "inductor_ms", "llmasos_ms", "speedup_vs_eager",
                                               "speedup_vs_inductor", "inductor_compile_s", "llmasos_compile_s")}
                       for r in results]}
    text = json.dumps(doc, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
