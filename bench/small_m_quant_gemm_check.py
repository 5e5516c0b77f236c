"""The int4/int8 small-M tensor-core GEMM (cuda_gemm.small_m_quant_gemm_func) on a GPU: numerics against an f32
reference of the dequantized weight, and time against torch (cuBLAS f16 matmul of the dequantized weight) and
against our f16 small-M kernel (cuda_gemm.small_m_gemm_func), in the same run.

    python bench/small_m_quant_gemm_check.py [--shapes 3072x2048,2048x2048,16384x2048,2048x8192,32000x2048]
                                             [--quant 4:128:sym,4:128:asym,8:0:sym] [--rows 1,2,8,13,32,33,64]
                                             [--repeat 50] [--tol 5e-3]

Shapes are N x K (W [N, K]); rows M of x; --quant bits:group:sym|asym (RTN, llmasos.compress.quant). Per case:
max |y - ref| / max |ref| (ref = f32 x @ dequantize(codes)^T), microseconds per call of ours, of our f16 kernel
and of torch.matmul(x, W_f16.T), and the weight stream of ours in GB/s (codes + scale words / time) beside the
f16 one's (N * K * 2 bytes / time). One JSON document on stdout; exit status 1 when any case exceeds --tol.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="3072x2048,2048x2048,16384x2048,2048x8192,32000x2048")
    p.add_argument("--quant", default="4:128:sym,4:128:asym,8:0:sym")
    p.add_argument("--rows", default="1,2,8,13,32,33,64")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--tol", type=float, default=5e-3)
    a = p.parse_args(argv)

    import numpy as np
    import torch
    import tvm
    from tvm import te

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_gemm import (quant_repack_scales, quant_repack_words, small_m_gemm_func,
                                                small_m_gemm_supported, small_m_quant_gemm_func,
                                                small_m_quant_gemm_supported)
    from llmasos.compress.quant import dequantize, quantize_rtn, storage, unpack_int4

    spec = resolve_target("cuda")
    dev = tvm.cuda(0)
    doc = {"gpu": torch.cuda.get_device_name(0), "target": str(spec.target), "tol": a.tol, "rows": []}
    failed = []

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

    def run_te(fn, *arrays):   # the load-time repack, here on the CPU
        ph = [te.placeholder(x.shape, str(x.dtype), name=f"a{i}") for i, x in enumerate(arrays)]
        out = fn(*ph)
        lib = tvm.compile(te.create_prim_func([*ph, out]), target="llvm")
        res = tvm.runtime.empty([int(d) for d in out.shape], out.dtype, tvm.cpu())
        lib(*[tvm.runtime.tensor(x) for x in arrays], res)
        return res.numpy()

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                           target=spec.tvm_target())["main"]

    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = np.random.default_rng(n + k)
        w = (g.standard_normal((n, k)) * 0.02).astype(np.float32)
        f16_fn = build(small_m_gemm_func(n, k)) if small_m_gemm_supported(n, k, "float16") else None
        for qspec in a.quant.split(","):
            bits, group, kind = qspec.split(":")
            bits, group, sym = int(bits), int(group), kind == "sym"
            if not small_m_quant_gemm_supported(n, k, bits, group, "float16"):
                doc["rows"].append({"n": n, "k": k, "quant": qspec, "skipped": "shape not supported"})
                continue
            q, s, z = quantize_rtn(w, bits, group, sym)
            codes, zs = storage(q, z, bits, sym)
            signed8 = bits == 8 and codes.dtype == np.int8
            groups = 1 if group == 0 else -(-k // group)
            words = run_te(lambda c: quant_repack_words(c, n, k, bits, signed8), codes)
            sz = run_te(lambda sc, ze: quant_repack_scales(sc, ze, n, groups, signed8), s, zs)
            w_deq = dequantize(unpack_int4(codes) if bits == 4 else codes, s, zs, bits, group)
            fn = build(small_m_quant_gemm_func(n, k, bits, group))
            words_t = tvm.runtime.tensor(words, dev)
            sz_t = tvm.runtime.tensor(sz, dev)
            wd = torch.from_numpy(w_deq).cuda()
            wh = wd.half()
            wh_t = tvm.runtime.from_dlpack(wh)
            qbytes = words.nbytes + sz.nbytes
            for m in (int(r) for r in a.rows.split(",")):
                x = torch.from_numpy(g.standard_normal((m, k)).astype(np.float16)).cuda()
                y = torch.empty(m, n, dtype=torch.float16, device="cuda")
                x_t, y_t = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
                fn(x_t, words_t, sz_t, y_t)
                dev.sync()
                ref = x.float() @ wd.T
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                ours = cuda_time(lambda: fn(x_t, words_t, sz_t, y_t))
                torch_us = cuda_time(lambda: torch.matmul(x, wh.T))
                row = {"n": n, "k": k, "quant": qspec, "m": m, "rel_err": err, "ok": err <= a.tol,
                       "ours_us": ours, "torch_f16_us": torch_us, "ours_GBps": qbytes / ours / 1e3,
                       "speedup_vs_torch_f16": torch_us / ours}
                if f16_fn is not None:
                    y16 = torch.empty(m, n, dtype=torch.float16, device="cuda")
                    y16_t = tvm.runtime.from_dlpack(y16)
                    f16_us = cuda_time(lambda: f16_fn(x_t, wh_t, y16_t))
                    row.update(our_f16_us=f16_us, our_f16_GBps=n * k * 2 / f16_us / 1e3,
                               speedup_vs_our_f16=f16_us / ours)
                if err > a.tol:
                    failed.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                doc["rows"].append(row)
    doc["failed"] = len(failed)
    print(json.dumps(doc, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
