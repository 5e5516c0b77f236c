"""Fusion benchmark: kernel launches and latency of GPT-2- and Llama-shaped models, without passes and after a
fusion pipeline, against torch eager, measured in the same run.

    python bench/fusion.py [--models gpt2-small,llama-135m] [--seq 32,128] [--pipeline fuse] [--repeat 10]
                           [--target cpu|cuda]

Models are random-weight presets from llmasos/llm/presets.py (batch 1). Each model is imported once; the "unfused"
variant builds that graph as is, "fused" builds PassManager(pipeline).run(graph); the graph has a symbolic
seq, so one build per variant serves every --seq. Prints one JSON document on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from llmasos.backends.tvm import build  # (importing it sizes TVM's thread pool to every core)
from llmasos.backends.tvm.kernels import kernel_stats
from llmasos.frontends.torch_export import import_module
from llmasos.passes.base import PassError
from llmasos.passes.pipeline import PipelineError
from llmasos.passes.manager import PassManager
from llmasos.llm.presets import hf_model

REL_TOL = 1e-3  # max |logits - torch| / max |torch logits|


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def build_variant(graph, pipeline, target: str) -> tuple:
    t0 = time.perf_counter()
    if pipeline is not None:
        graph = PassManager(pipeline).run(graph)
    pass_s = time.perf_counter() - t0
    stats = kernel_stats(graph, target)
    t0 = time.perf_counter()
    exe = build(graph, target)
    compile_s = time.perf_counter() - t0
    return exe, {"kernels": stats["kernels"], "gemm_kernels": stats["gemm"],
                 "transform_params_kernels": stats["transform_params_kernels"],
                 "compile_s": round(compile_s, 2), "pass_s": round(pass_s, 3), "ir_nodes": len(graph.nodes),
                 "by_name": dict(stats["by_name"].most_common())}


def check(exe, ids, ref, device: str) -> dict:
    got = exe(ids)[0]  # the presets' only graph output is the logits
    _sync(device)
    if tuple(got.shape) != tuple(ref.shape):
        raise RuntimeError(f"compiled logits have shape {tuple(got.shape)}, torch's {tuple(ref.shape)}")
    err = (got.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"max_abs_err": err, "logits_scale": scale, "ok": bool(err < REL_TOL * scale)}


def interleaved_medians(fns: dict, repeat: int, warmup: int = 2) -> dict:
    """(median, min) seconds of each fn, timed in alternating rounds: on a shared 2-core VM the speed drifts by 2x
    over a minute, and back-to-back blocks would charge that drift to whichever variant ran first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (sorted(t)[len(t) // 2], min(t)) for k, t in times.items()}


def bench_model(name: str, seqs: list, pipeline: str, target: str, repeat: int) -> list:
    device = "cuda" if target.split(":")[0] == "cuda" else "cpu"
    # the graph is imported from a CPU copy (same seed, same weights), so its parameter data is host memory
    # whatever the target; build() uploads it
    cpu_model = hf_model(name)
    model = cpu_model if device == "cpu" else hf_model(name).to(device)
    gen = torch.Generator().manual_seed(0)
    cpu_ids = {s: torch.randint(0, model.config.vocab_size, (1, s), generator=gen) for s in seqs}
    ids = {s: x.to(device) for s, x in cpu_ids.items()}
    # torch first, every length: TVM's worker threads spin after each call and would steal cores from a
    # torch run after them
    eager, refs = {}, {}
    with torch.no_grad():
        for s in seqs:
            def call(x=ids[s]):
                model(x)
                _sync(device)
            eager[s] = interleaved_medians({"torch": call}, repeat)["torch"]
            refs[s] = model(ids[s]).logits.float()
    # one import with a symbolic seq (as llmasos.compile does) serves every length: one build per variant
    t0 = time.perf_counter()
    graph = import_module(cpu_model, (cpu_ids[seqs[0]],), max_batch=8, max_seq=max(*seqs, 256), name=name).graph
    import_s = time.perf_counter() - t0
    exes, info = {}, {}
    for variant, pipe in (("unfused", None), ("fused", pipeline)):
        exes[variant], info[variant] = build_variant(graph, pipe, target)
    runs = {s: {} for s in seqs}
    for s in seqs:
        def caller(exe, x=ids[s]):
            def call():
                exe(x)
                _sync(device)
            return call
        lat = interleaved_medians({v: caller(e) for v, e in exes.items()}, repeat)
        for v, e in exes.items():
            runs[s][v] = {**info[v], "latency_ms": round(lat[v][0] * 1e3, 3),
                          "latency_min_ms": round(lat[v][1] * 1e3, 3), **check(e, ids[s], refs[s], device)}
    out = []
    for s in seqs:
        u, f = runs[s]["unfused"], runs[s]["fused"]
        out.append({"model": name, "seq": s, "torch_eager_ms": round(eager[s][0] * 1e3, 3),
                    "torch_eager_min_ms": round(eager[s][1] * 1e3, 3),
                    "import_s": round(import_s, 2), "variants": runs[s],
                    "kernel_reduction": round(u["kernels"] / f["kernels"], 3) if f["kernels"] else None,
                    "speedup": round(u["latency_ms"] / f["latency_ms"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2-small,llama-135m")
    ap.add_argument("--seq", default="128", help="prompt lengths, comma separated (e.g. 32,128)")
    ap.add_argument("--pipeline", default="fuse", help="the pass pipeline of the fused variant")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--target", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    try:
        PassManager(args.pipeline)  # an unknown pass fails here, before minutes of importing and compiling
    except (PipelineError, PassError) as e:
        sys.exit(f"bench/fusion.py: --pipeline {args.pipeline!r}: {e}")
    if args.target.split(":")[0] == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/fusion.py: --target cuda needs a CUDA build of torch and a visible GPU")
    seqs = [int(s) for s in args.seq.split(",")]
    models = []
    for name in args.models.split(","):
        models.extend(bench_model(name, seqs, args.pipeline, args.target, args.repeat))
        print(f"[fusion] {name} done", file=sys.stderr, flush=True)
    doc = {"machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "target": args.target, "pipeline": args.pipeline,
                       "gpu": torch.cuda.get_device_name(0) if args.target.startswith("cuda") else None},
           "threads": {"torch": torch.get_num_threads(), "tvm": os.environ.get("TVM_NUM_THREADS")},
           "repeat": args.repeat, "models": models}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
