"""Decode GEMV kernels on the GPU, one projection at a time: numerics against the reference interpreter and
kernel time (torch.profiler, device time) against torch's F.linear (cuBLAS) on the same fp16 weight.

    python bench/gemv_check.py [--shapes llama-1b] [--kinds f16,int4-g128,int8] [--reps 50]

One JSON document: per (kind, N, K): max |ours - reference| / max |reference|, microseconds per call,
weight GB/s (weight bytes incl. scales / time), and torch's microseconds and GB/s for the fp16 weight.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"llama-1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (32000, 2048)],
          "gpt2-124m": [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768)]}


def kernel_us(fn, reps, match=None):
    """Median-free average device time per call of the kernels fn launches (all, or names with ``match``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.events():
        if e.device_type.name == "CUDA" and (match is None or match in e.name) and "Memcpy" not in e.name \
                and "Memset" not in e.name:
            total += e.device_time_total
    return total / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-1b")
    p.add_argument("--kinds", default="f16,int4-g128,int8")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from llmasos.backends.tvm import build
    from llmasos.compress.quant import quantize_rtn, storage
    from llmasos.ir import DType, Graph, TensorType
    from llmasos.ir.interpreter import run

    rows = []
    for n, k in SHAPES[a.shapes]:
        rng = np.random.default_rng(n + k)
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float16)
        xt = torch.from_numpy(x).cuda()
        wt = torch.from_numpy(w.astype(np.float16)).cuda()
        torch_us = kernel_us(lambda: torch.nn.functional.linear(xt, wt), a.reps)
        for kind in a.kinds.split(","):
            g = Graph("gemv")
            xv = g.add_input("x", TensorType((1, k), DType.f16))
            if kind == "f16":
                y = g.add_node("linear", [xv, g.add_param("w", w.astype(np.float16))])
                nbytes = n * k * 2
            else:
                bits, group = (4, int(kind.split("-g")[1])) if kind.startswith("int4") else (8, 0)
                q, s, z = quantize_rtn(w, bits, group, True, False)
                codes, z = storage(q, z, bits, True)
                y = g.add_node("quant.linear", [xv, g.add_param("q", codes), g.add_param("s", s),
                                                g.add_param("z", z)], {"bits": bits, "group": group})
                nbytes = codes.nbytes + s.nbytes + z.nbytes
            g.set_outputs([y])
            exe = build(g, "cuda")
            ref = run(g, [x])[0].astype(np.float32)
            out = exe(x)[0].astype(np.float32)
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            fn, xd = exe.raw("main"), exe._to_device(x, "x")
            us = kernel_us(lambda: fn(xd, *exe.weights), a.reps, match="linear")
            row = {"kind": kind, "N": n, "K": k, "rel_err": err, "us": us, "GBps": nbytes / us / 1e3,
                   "torch_f16_us": torch_us, "torch_f16_GBps": n * k * 2 / torch_us / 1e3}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
