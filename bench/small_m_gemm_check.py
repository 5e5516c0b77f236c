"""The small-M tensor-core GEMM (llmasos/backends/tvm/cuda_gemm.py) on a GPU: numerics against torch and time
against torch (cuBLAS) for a decode step's shapes, the one-tile kernel (R = 1) beside R = 2 / 4 row tiles
and the automatic choice (small_m_rows), all in the same run.

    python bench/small_m_gemm_check.py [--shapes 3072x2048,2048x2048,16384x2048,2048x8192,32000x2048]
                                       [--rows 1,8,32,64] [--variants 1,2,4,auto,1/n,auto/n] [--repeat 100] [--tol 5e-3]

Shapes are N x K (W [N, K]; the defaults are Llama-1B's decode GEMMs: fused QKV, O, fused gate/up, down, LM
head); rows M of x. A variant is R (1, 2, 4), "auto", or R:warps:unroll (a sweep of small_m_plan), each
with "/n" for the grid's first order (weight tiles fastest, cuda_gemm._grid_tags: matters at M > 32). Per case
and variant: max |y - ref| / max |ref| (ref = torch f32 x @ W^T of the same f16 operands), microseconds per
call, and the weight stream in GB/s (N * K * 2 bytes / time); torch.matmul(x, W.T) (f16, cuBLAS) beside
them. Weights are cycled through copies past the L2 cache (bench/_cuda_timing.py), as in a decode step.
One JSON document on stdout (progress on stderr); exit status 1 when any case exceeds --tol.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cuda_timing import copies, cuda_time  # noqa: E402


def parse_variant(text: str):
    """'auto' | 'R' | 'R:warps:unroll', optionally + '/n' (the weight tiles fastest in the grid: the first
    order) -> (label, rows or 'auto', warps, unroll, m_fastest)."""
    body, _, order = text.partition("/")
    if order not in ("", "n"):
        raise ValueError(f"--variants: '{text}': the only grid suffix is '/n' (weight tiles fastest)")
    parts = body.split(":")
    if body == "auto":
        return text, "auto", 0, 0, not order
    if len(parts) not in (1, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"--variants: '{text}' is not auto, R or R:warps:unroll (each optionally /n)")
    r, w, u = (int(parts[0]), 0, 0) if len(parts) == 1 else tuple(int(p) for p in parts)
    return text, r, w, u, not order


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="3072x2048,2048x2048,16384x2048,2048x8192,32000x2048")
    p.add_argument("--rows", default="1,8,32,64")
    p.add_argument("--variants", default="1,2,4,auto,1/n,auto/n")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--tol", type=float, default=5e-3)
    a = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in a.variants.split(",")]
    except ValueError as e:
        p.error(str(e))

    import torch
    import tvm

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_gemm import small_m_gemm_func, small_m_gemm_supported, small_m_rows

    spec = resolve_target("cuda")
    doc = {"gpu": torch.cuda.get_device_name(0), "target": str(spec.target), "tol": a.tol,
           "baseline": "torch.matmul(x, W.T) f16 (cuBLAS)", "rows": []}
    failed = []

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                           target=spec.tvm_target())["main"]

    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        auto = small_m_rows(n, k)
        kernels, built = {}, {}
        for label, r, w, u, mf in variants:
            rows = auto if r == "auto" else r
            if not small_m_gemm_supported(n, k, "float16", rows) and not (w and u):
                continue
            try:
                if (rows, w, u, mf) not in built:       # "auto" is one of the others: built once
                    built[rows, w, u, mf] = build(small_m_gemm_func(n, k, rows=rows, warps=w, unroll=u, m_fastest=mf))
                kernels[label] = (rows, built[rows, w, u, mf])
            except ValueError as e:          # an R:warps:unroll that does not divide this shape
                print(f"{shape} {label}: {e}", file=sys.stderr)
        if not kernels:
            doc["rows"].append({"n": n, "k": k, "skipped": "shape not supported"})
            continue
        g = torch.Generator(device="cpu").manual_seed(n + k)
        w0 = (torch.randn(n, k, generator=g) * 0.02).half()
        ws = [w0.cuda() for _ in range(copies(n * k * 2))]
        ws_t = [tvm.runtime.from_dlpack(w) for w in ws]
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, generator=g).half().cuda()
            ref = x.float() @ ws[0].float().T
            row = {"n": n, "k": k, "m": m, "auto_rows": auto, "variants": {}}
            torch_us = cuda_time([lambda w=w: torch.matmul(x, w.T) for w in ws], a.repeat)
            row.update(torch_us=torch_us, torch_GBps=n * k * 2 / torch_us / 1e3)
            for label, (rows, fn) in kernels.items():
                y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                x_t, y_t = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
                fn(x_t, ws_t[0], y_t)
                torch.cuda.synchronize()
                err = float((y.float() - ref).abs().max() / ref.abs().max())   # NaN (a row not written) fails
                us = cuda_time([lambda w_t=w_t: fn(x_t, w_t, y_t) for w_t in ws_t], a.repeat)
                v = {"rows": rows, "rel_err": err, "ok": err <= a.tol, "us": us, "GBps": n * k * 2 / us / 1e3,
                     "speedup_vs_torch": torch_us / us}
                if not err <= a.tol:
                    failed.append({"n": n, "k": k, "m": m, "variant": label, "rel_err": err})
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
