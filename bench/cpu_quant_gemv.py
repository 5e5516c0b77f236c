"""The CPU decode GEMV of quant.linear alone: the int8-activation kernel (x86 VNNI, target option
int8_gemv) against the float-dequant one (int8_gemv=off), on SmolLM2-135M's GEMV shapes, in turns.

    python bench/cpu_quant_gemv.py [--threads 1] [--reps 200] [--rounds 5] [--variants int4-g32-asym,int8,int8-g32]

Each shape is one quant.linear [1, K] x [N, K] built through the real lowering (llmasos.backends.tvm.build)
on random weights; per round each build is timed over --reps calls (best of the round), the two kernels
alternating; the JSON has the median per-call time, the same-round speedup (float / int8), the weight
bytes each reads per call, and the per-token total over SmolLM2's 30 layers + head (x's quantization
included: it runs inside the int8 kernel; each call also pays the Relax VM's few microseconds).
One JSON document on stdout.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, N, K, count per token): q, k+v (separate), o, gate+up (one GEMM after fuse), down, head
SHAPES = [("q/o", 576, 576, 60), ("k/v", 192, 576, 60), ("gate_up", 3072, 576, 30), ("down", 576, 1536, 30),
          ("head", 49152, 576, 1)]
VARIANTS = {"int4-g32-asym": (4, 32, False), "int8": (8, 0, True), "int8-g32": (8, 32, True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="int4-g32-asym,int8,int8-g32")
    a = p.parse_args(argv)
    import numpy as np
    import torch  # noqa: F401  (before TVM: both bring an OpenMP runtime)
    from llmasos.backends.tvm import build, resolve_target
    from llmasos.backends.tvm.threads import set_cpu_threads
    from llmasos.compress.quant import quantize_rtn, storage
    from llmasos.ir import DType, Graph, TensorType

    on = resolve_target("cpu")
    off = dataclasses.replace(on, extra={"int8_gemv": "off"})
    if on.int8_gemv_lanes() is None:
        raise SystemExit("this CPU has no AVX512-VNNI / AVX-VNNI: nothing to compare (int8_gemv is off here)")
    set_cpu_threads(a.threads)
    rng = np.random.default_rng(0)
    out = {"threads": a.threads, "reps": a.reps, "rounds": a.rounds, "lanes": on.int8_gemv_lanes(),
           "target": on.target, "load_avg_1min": [round(os.getloadavg()[0], 1)], "variants": {}}
    for vname in a.variants.split(","):
        bits, group, symm = VARIANTS[vname]
        rows, tok = {}, {"int8_us": 0.0, "float_us": 0.0}
        for name, n, k, count in SHAPES:
            w = rng.standard_normal((n, k)).astype(np.float32)
            q, s, z = quantize_rtn(w, 8 if name == "head" else bits, 32 if name == "head" else group,
                                   True if name == "head" else symm)
            codes, z = storage(q, z, 8 if name == "head" else bits, True if name == "head" else symm)
            g = Graph("gemv")
            x = g.add_input("x", TensorType((1, k), DType.f32))
            ins = [x, g.add_param("q", codes), g.add_param("s", s), g.add_param("z", z)]
            g.set_outputs([g.add_node("quant.linear", ins, {"bits": 8 if name == "head" else bits,
                                                            "group": 32 if name == "head" else group})])
            exes = {"int8": build(g, on), "float": build(g, off)}
            xv = rng.standard_normal((1, k)).astype(np.float32)
            times = {kk: [] for kk in exes}
            import tvm
            xt = tvm.runtime.tensor(xv, tvm.cpu())
            # the Relax function itself on a device tensor (the checked Python call costs ~100 us more)
            calls = {kk: (lambda ex=ex: ex.raw(ex.default_function)(xt, *ex._weights)) for kk, ex in exes.items()}
            for _ in range(a.rounds):
                for kk, call in calls.items():
                    call()
                    t0 = time.perf_counter()
                    for _ in range(a.reps):
                        call()
                    times[kk].append((time.perf_counter() - t0) / a.reps * 1e6)
            ratio = statistics.median(f / i for f, i in zip(times["float"], times["int8"]))
            row = {"N": n, "K": k, "per_token": count, "weight_bytes": int(codes.nbytes + s.nbytes + z.nbytes),
                   "int8_us": round(statistics.median(times["int8"]), 2),
                   "float_us": round(statistics.median(times["float"]), 2), "speedup": round(ratio, 2)}
            rows[name] = row
            tok["int8_us"] += row["int8_us"] * count
            tok["float_us"] += row["float_us"] * count
        tok = {kk: round(v, 1) for kk, v in tok.items()}
        tok["speedup"] = round(tok["float_us"] / tok["int8_us"], 2)
        out["variants"][vname] = {"shapes": rows, "per_token_gemvs": tok}
        print(f"{vname}: {tok}", file=sys.stderr, flush=True)
    out["load_avg_1min"].append(round(os.getloadavg()[0], 1))
    set_cpu_threads(None)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
