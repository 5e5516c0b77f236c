"""The small-M tensor-core GEMM (llmasos/backends/tvm/cuda_gemm.py) on a GPU: numerics against an f32
reference and time against torch (cuBLAS) for a decode step's shapes, in the same run.

    python bench/small_m_gemm_check.py [--shapes 3072x2048,2048x2048,16384x2048,2048x8192,32000x2048]
                                       [--rows 1,2,8,13,32,33,64] [--repeat 50]

Shapes are N x K (W [N, K]); rows M of x. Per case: max |y - ref| / max |ref| (ref = f32 x @ W^T of the same
f16 operands), microseconds per call of ours and of torch.matmul(x, W.T) (f16, cuBLAS), and the weight
stream in GB/s (N * K * 2 bytes / time). One JSON document on stdout.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="3072x2048,2048x2048,16384x2048,2048x8192,32000x2048")
    p.add_argument("--rows", default="1,2,8,13,32,33,64")
    p.add_argument("--repeat", type=int, default=50)
    a = p.parse_args(argv)

    import torch
    import tvm

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_gemm import small_m_gemm_func, small_m_gemm_supported

    spec = resolve_target("cuda")
    dev = tvm.cuda(0)
    doc = {"gpu": torch.cuda.get_device_name(0), "target": spec.target, "rows": []}

    def cuda_time(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / a.repeat   # microseconds

    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        if not small_m_gemm_supported(n, k, "float16"):
            doc["rows"].append({"n": n, "k": k, "skipped": "shape not supported"})
            continue
        mod = tvm.IRModule({"main": small_m_gemm_func(n, k).with_attr("global_symbol", "main")})
        lib = tvm.compile(mod, target=spec.tvm_target())
        fn = lib["main"]
        g = torch.Generator(device="cpu").manual_seed(n + k)
        w = (torch.randn(n, k, generator=g) * 0.02).half().cuda()
        w_t = tvm.runtime.from_dlpack(w)
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, generator=g).half().cuda()
            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
            x_t, y_t = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
            fn(x_t, w_t, y_t)
            dev.sync()
            ref = x.float() @ w.float().T
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            ours = cuda_time(lambda: fn(x_t, w_t, y_t))
            torch_us = cuda_time(lambda: torch.matmul(x, w.T))
            row = {"n": n, "k": k, "m": m, "rel_err": err, "ours_us": ours, "torch_us": torch_us,
                   "ours_GBps": n * k * 2 / ours / 1e3, "torch_GBps": n * k * 2 / torch_us / 1e3,
                   "speedup_vs_torch": torch_us / ours}
            print(json.dumps(row), file=sys.stderr, flush=True)
            doc["rows"].append(row)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
