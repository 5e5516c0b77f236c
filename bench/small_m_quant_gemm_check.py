"""The int4/int8 small-M tensor-core GEMM (cuda_gemm.small_m_quant_gemm_func) on a GPU: numerics against torch
(f32 x @ dequantized weight^T), and time against torch (cuBLAS f16 matmul of the dequantized weight) and our
f16 small-M kernel (cuda_gemm.small_m_gemm_func, automatic R), for R = 1 beside R = 2 / 4 row tiles and the
automatic choice (small_m_quant_rows), all in the same run.

    python bench/small_m_quant_gemm_check.py [--shapes 3072x2048,2048x2048,16384x2048,2048x8192,32000x2048]
                                             [--quant 4:128:sym,8:0:sym] [--rows 1,8,32,64]
                                             [--variants 1,2,4,auto] [--repeat 100] [--tol 5e-3]

Shapes are N x K (W [N, K]; defaults: Llama-1B's decode GEMMs); rows M of x; --quant bits:group:sym|asym (RTN,
llmasos.compress.quant); a variant is R (1, 2, 4), "auto" or R:warps:unroll. Per case and variant: max
|y - ref| / max |ref|, microseconds per call and the stream of codes + scale words in GB/s; torch's and our
f16 kernel's microseconds beside them. Operands are cycled through copies past the L2 cache
(bench/_cuda_timing.py), as in a decode step. One JSON document on stdout (progress on stderr); exit status 1
when any case exceeds --tol.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cuda_timing import copies, cuda_time  # noqa: E402
from small_m_gemm_check import parse_variant  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="3072x2048,2048x2048,16384x2048,2048x8192,32000x2048")
    p.add_argument("--quant", default="4:128:sym,8:0:sym")
    p.add_argument("--rows", default="1,8,32,64")
    p.add_argument("--variants", default="1,2,4,auto")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--tol", type=float, default=5e-3)
    a = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in a.variants.split(",")]
    except ValueError as e:
        p.error(str(e))

    import numpy as np
    import torch
    import tvm
    from tvm import te

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_gemm import (ROW_TILES, TILE_N, quant_repack_scales, quant_repack_words,
                                                small_m_gemm_func, small_m_gemm_supported, small_m_quant_gemm_func,
                                                small_m_quant_gemm_supported, small_m_quant_rows, small_m_rows)
    from llmasos.compress.quant import dequantize, quantize_rtn, storage, unpack_int4

    spec = resolve_target("cuda")
    doc = {"gpu": torch.cuda.get_device_name(0), "target": str(spec.target), "tol": a.tol,
           "baseline": "torch.matmul(x, W_dequantized_f16.T) (cuBLAS); our f16 small-M kernel (auto R)", "rows": []}
    failed = []

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
        r16 = small_m_rows(n, k)
        f16_fn = build(small_m_gemm_func(n, k, rows=r16)) if small_m_gemm_supported(n, k, "float16", r16) else None
        for qspec in a.quant.split(","):
            bits, group, kind = qspec.split(":")
            bits, group, sym = int(bits), int(group), kind == "sym"
            if not small_m_quant_gemm_supported(n, k, bits, group, "float16"):
                doc["rows"].append({"n": n, "k": k, "quant": qspec, "skipped": "shape not supported"})
                continue
            auto = small_m_quant_rows(n)
            kernels, built = {}, {}
            for label, r, wp, u in variants:
                rows = auto if r == "auto" else r
                if rows not in ROW_TILES or n % (TILE_N * rows):
                    continue
                try:
                    if (rows, wp, u) not in built:     # "auto" is one of the others: built once
                        built[rows, wp, u] = build(small_m_quant_gemm_func(n, k, bits, group, rows=rows, warps=wp,
                                                                           unroll=u))
                    kernels[label] = (rows, built[rows, wp, u])
                except ValueError as e:
                    print(f"{shape} {qspec} {label}: {e}", file=sys.stderr)
            q, s, z = quantize_rtn(w, bits, group, sym)
            codes, zs = storage(q, z, bits, sym)
            signed8 = bits == 8 and codes.dtype == np.int8
            groups = 1 if group == 0 else -(-k // group)
            words = run_te(lambda c: quant_repack_words(c, n, k, bits, signed8), codes)
            sz = run_te(lambda sc, ze: quant_repack_scales(sc, ze, n, groups, signed8), s, zs)
            w_deq = dequantize(unpack_int4(codes) if bits == 4 else codes, s, zs, bits, group)
            qbytes = words.nbytes + sz.nbytes
            nq = copies(qbytes)
            words_t = [tvm.runtime.tensor(words, tvm.cuda(0)) for _ in range(nq)]
            sz_t = [tvm.runtime.tensor(sz, tvm.cuda(0)) for _ in range(nq)]
            wd = torch.from_numpy(w_deq).cuda()
            whs = [wd.half() for _ in range(copies(n * k * 2))]
            whs_t = [tvm.runtime.from_dlpack(wh) for wh in whs]
            for m in (int(r) for r in a.rows.split(",")):
                x = torch.from_numpy(g.standard_normal((m, k)).astype(np.float16)).cuda()
                x_t = tvm.runtime.from_dlpack(x)
                ref = x.float() @ wd.T
                torch_us = cuda_time([lambda wh=wh: torch.matmul(x, wh.T) for wh in whs], a.repeat)
                row = {"n": n, "k": k, "quant": qspec, "m": m, "auto_rows": auto, "torch_f16_us": torch_us,
                       "variants": {}}
                if f16_fn is not None:
                    y16 = torch.empty(m, n, dtype=torch.float16, device="cuda")
                    y16_t = tvm.runtime.from_dlpack(y16)
                    f16_us = cuda_time([lambda wt=wt: f16_fn(x_t, wt, y16_t) for wt in whs_t], a.repeat)
                    row.update(our_f16_us=f16_us, our_f16_rows=r16, our_f16_GBps=n * k * 2 / f16_us / 1e3)
                for label, (rows, fn) in kernels.items():
                    y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                    y_t = tvm.runtime.from_dlpack(y)
                    fn(x_t, words_t[0], sz_t[0], y_t)
                    torch.cuda.synchronize()
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    us = cuda_time([lambda i=i: fn(x_t, words_t[i], sz_t[i], y_t) for i in range(nq)], a.repeat)
                    v = {"rows": rows, "rel_err": err, "ok": err <= a.tol, "us": us, "GBps": qbytes / us / 1e3,
                         "speedup_vs_torch_f16": torch_us / us}
                    if f16_fn is not None:
                        v["speedup_vs_our_f16"] = row["our_f16_us"] / us
                    if not err <= a.tol:
                        failed.append({"n": n, "k": k, "quant": qspec, "m": m, "variant": label, "rel_err": err})
                    row["variants"][label] = v
                if "1" in row["variants"] and "auto" in row["variants"]:
                    row["auto_vs_r1"] = row["variants"]["1"]["us"] / row["variants"]["auto"]["us"]
                print(json.dumps(row), file=sys.stderr, flush=True)
                doc["rows"].append(row)
    doc["failed"] = failed
    print(json.dumps(doc, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
