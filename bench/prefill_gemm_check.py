"""The prefill tensor-core GEMM (llmasos/backends/tvm/cuda_gemm.py: prefill_gemm_func, cp.async pipeline +
ldmatrix + mma.sync) on a GPU: numerics and time against torch.matmul (cuBLAS) and against the kernel our
prefill runs without it (DLight's MatmulTensorization through cuda_schedule.TensorCoreMatmul, fused with the
f16 cast as the build fuses it), for the Llama-1B prefill GEMM shapes, all in the same run.

    python bench/prefill_gemm_check.py [--shapes 3072x2048,2048x2048,512x2048,16384x2048,2048x8192,32000x2048]
                                       [--rows 128,1024,8192] [--repeat 20] [--variants 2x4,2x2,2x4:k64:f,...]
                                       [--dlight-shapes 3072x2048,2048x8192 | all | none] [--out FILE]

Shapes are N x K (W [N, K], x [M, K], y = x W^T). Per case: max |y - ref| / max |ref| (ref = f32 product of
the same f16 operands) for ours (``ours``: the first ``--variants`` entry; ``ours_<variant>``: each other),
DLight's and torch's, median milliseconds of ``--repeat`` back-to-back calls
(CUDA events, 3 samples), TFLOP/s (2 M N K / time) and ours / torch, ours / DLight speedups. The kernel is
also checked at a ragged M (rows past M must stay untouched). The DLight baseline is compiled for
``--dlight-shapes`` only (its schedule + build takes ~10-30 s a shape; the whole-prefill A/B is
``bench/prefill.py --ab-option prefill_gemm=on``). One JSON document on stdout, rows on stderr.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _cuda_timing import median_ms  # noqa: E402

SHAPES = "3072x2048,2048x2048,512x2048,16384x2048,2048x8192,32000x2048"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def dlight_kernel(spec, n, k):
    """The compiled fused ``(x [1, seq, K], w [N, K], y [1, seq, N])`` f16 kernel our prefill builds without
    prefill_gemm (matmul_nt in f32 + the cast), scheduled by TensorCoreMatmul."""
    import numpy as np
    import tvm

    from llmasos.backends.tvm.build import pipeline_stages, prepare_module
    from llmasos.backends.tvm.cuda_schedule import TensorCoreMatmul
    from llmasos.backends.tvm.lower import lower
    from llmasos.ir import DType, Graph, TensorType, sym
    g = Graph("g")
    g.add_symbol("seq", 2, 1 << 16)
    x = g.add_input("x", TensorType((1, sym("seq"), k), DType.f16))
    w = np.zeros((n, k), np.float16)
    g.set_outputs([g.add_node("linear", [x, g.add_param("w", w)])])
    off = dataclasses.replace(spec, extra={**spec.extra, "prefill_gemm": "off"})
    mod, config = prepare_module(lower(g, off), off)
    fusion, _ = pipeline_stages(off)
    with tvm.transform.PassContext(opt_level=3, config=config), off.tvm_target():
        mod = tvm.transform.Sequential(fusion)(mod)
    func = next(f for gv, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "linear" in gv.name_hint)
    sch = TensorCoreMatmul().apply(func, off.tvm_target(), False)
    if sch is None:
        raise RuntimeError("TensorCoreMatmul declined the kernel")
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=off.tvm_target())
    return lib["main"]


VARIANTS = "2x4,2x2,2x4:f,2x4:k64,2x4:k64:f,2x2:k64:f,2x4:k64:s4:f"


def parse_variant(text: str) -> dict:
    """'WMxWN[:k64][:sN][:f]' -> prefill_gemm_func keyword arguments (warps, bk, stages, frag_pipeline)."""
    head, *mods = text.split(":")
    kw = {"bk": 32, "stages": 3, "frag_pipeline": False}
    if head not in ("2x4", "2x2"):
        raise ValueError(f"--variants: '{text}' must start with a warp grid, 2x4 or 2x2")
    kw["warps"] = tuple(int(v) for v in head.split("x"))
    for m in mods:
        if m == "f":
            kw["frag_pipeline"] = True
        elif m in ("k32", "k64"):
            kw["bk"] = int(m[1:])
        elif m in ("s2", "s3", "s4"):
            kw["stages"] = int(m[1:])
        else:
            raise ValueError(f"--variants: '{text}': unknown modifier '{m}' (k32 | k64, s2 | s3 | s4, f)")
    return kw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rows", default="128,1024,8192")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--variants", default=VARIANTS,
                   help="kernel variants to time, the first reported as 'ours': a warp grid WMxWN (2x4 | 2x2) with "
                        "':k64' (BK 64), ':sN' (N stages), ':f' (fragment pipelining) -- the target options "
                        "prefill_gemm_warps / _bk / _stages / _frags")
    p.add_argument("--dlight-shapes", default="3072x2048,2048x8192",
                   help="shapes to also time DLight's TensorCoreMatmul kernel for ('all', 'none' or a list)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        variants = [(v, parse_variant(v)) for v in a.variants.split(",")]
    except ValueError as e:
        p.error(str(e))

    import torch
    import tvm

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_gemm import prefill_gemm_func, prefill_gemm_supported, prefill_tile

    spec = resolve_target("cuda")
    doc = {"gpu": torch.cuda.get_device_name(0), "target": spec.target, "rows": []}
    t_start = time.perf_counter()

    def cuda_ms(fn):
        return median_ms(fn, a.repeat)

    def rel(y, ref):
        return float((y.float() - ref).abs().max() / ref.abs().max())

    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        if not prefill_gemm_supported(n, k, "float16"):
            doc["rows"].append({"n": n, "k": k, "skipped": "shape not supported"})
            continue
        t0 = time.perf_counter()
        fns = {}
        for i, (label, kw) in enumerate(variants):
            if not prefill_gemm_supported(n, k, "float16", kw["bk"]):
                continue
            func = prefill_gemm_func(n, k, **kw)
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm_target())
            fns["ours" if i == 0 else "ours_" + label.replace(":", "_")] = lib["main"]
        ours_fn = fns["ours"]
        compile_s = time.perf_counter() - t0
        dl = None
        if a.dlight_shapes == "all" or shape in a.dlight_shapes.split(","):
            t0 = time.perf_counter()
            try:
                dl = dlight_kernel(spec, n, k)
            except Exception as e:  # noqa: BLE001 -- a failing baseline is reported, not fatal
                doc.setdefault("dlight_errors", {})[shape] = f"{type(e).__name__}: {e}"[:400]
            dlight_compile_s = time.perf_counter() - t0
        g = torch.Generator(device="cpu").manual_seed(n + k)
        w = (torch.randn(n, k, generator=g) * 0.02).half().cuda()
        w_t = tvm.runtime.from_dlpack(w)
        # a ragged M: rows past M stay untouched (the guard), and M below one block tile
        for m in (77, 1000):
            x = torch.randn(m, k, generator=g).half().cuda()
            for key, fn in fns.items():
                y = torch.full((m + 128, n), 3.0, dtype=torch.float16, device="cuda")
                fn(tvm.runtime.from_dlpack(x), w_t, tvm.runtime.from_dlpack(y[:m]))
                torch.cuda.synchronize()
                doc["rows"].append({"n": n, "k": k, "m": m, "check": "ragged", "variant": key,
                                    "rel_err": rel(y[:m], x.float() @ w.float().T),
                                    "rows_past_m_untouched": bool((y[m:] == 3.0).all())})
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k, generator=g).half().cuda()
            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
            x_t, y_t = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
            ours_fn(x_t, w_t, y_t)
            torch.cuda.synchronize()
            ref = x.float() @ w.float().T
            flop = 2 * m * n * k
            row = {"n": n, "k": k, "m": m, "tile": list(prefill_tile(n)), "ours_compile_s": compile_s,
                   "ours_rel_err": rel(y, ref), "torch_rel_err": rel(torch.matmul(x, w.T), ref)}
            row["ours_ms"] = cuda_ms(lambda: ours_fn(x_t, w_t, y_t))
            for key, fn in fns.items():
                if key != "ours":
                    y3 = torch.empty(m, n, dtype=torch.float16, device="cuda")
                    y3_t = tvm.runtime.from_dlpack(y3)
                    fn(x_t, w_t, y3_t)
                    torch.cuda.synchronize()
                    row[f"{key}_rel_err"] = rel(y3, ref)
                    row[f"{key}_ms"] = cuda_ms(lambda: fn(x_t, w_t, y3_t))
            row["torch_ms"] = cuda_ms(lambda: torch.matmul(x, w.T))
            if dl is not None:
                y2 = torch.empty(1, m, n, dtype=torch.float16, device="cuda")
                args = (tvm.runtime.from_dlpack(x.view(1, m, k)), w_t, tvm.runtime.from_dlpack(y2))
                dl(*args)
                torch.cuda.synchronize()
                row["dlight_rel_err"] = rel(y2.view(m, n), ref)
                row["dlight_ms"] = cuda_ms(lambda: dl(*args))
                row["dlight_compile_s"] = dlight_compile_s
            for key in [kk for kk in row if kk.endswith("_ms")]:
                row[key[:-3] + "_tflops"] = flop / (row[key] / 1e3) / 1e12
            row["ours_speedup_vs_torch"] = row["torch_ms"] / row["ours_ms"]
            if "dlight_ms" in row:
                row["ours_speedup_vs_dlight"] = row["dlight_ms"] / row["ours_ms"]
            log(json.dumps(row))
            doc["rows"].append(row)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(doc, f, indent=1)
    doc["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
