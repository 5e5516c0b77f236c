"""Prefill benchmark: the time to run a prompt through the model (time to first token, without the tokenizer),
ours against PyTorch on the same weights, in the same run.

    python bench/prefill.py [--target cuda] [--model llama-1b] [--batch 1,8] [--prompt 128,1024] [--dtype f16]
                            [--repeat 5] [--ab] [--target-option KEY=VALUE ...] [--ab-option KEY=VALUE ...]
                            [--out FILE]

For each (batch, prompt length): torch eager (the static-KV-cache Decoder, SDPA), torch.compile (default mode,
fullgraph, static shapes: cuBLAS GEMMs and Inductor's fused kernels), and llmasos (compile_lm, its prefill
function, which writes the KV cache too); ``--ab`` also compiles ours with the target option
tensor_cores="off" (DLight's CUDA-core matmul schedule), the state before TensorCoreMatmul. Figures: median
milliseconds of ``--repeat`` timed runs after a warm-up, TFLOP/s (2 * linear parameters * tokens + causal
attention 2 * 2 * layers * heads * head_dim * tokens * (prompt + 1) / 2), percent of the GPU's dense fp16
tensor-core peak (``--peak-tflops``, 989.4 for H100/H200 SXM), and max |logits diff| of the last token against
torch eager. ``--target-option`` sets a target option (Target.extra) for every variant of ours;
each ``--ab-option KEY=VALUE`` adds a variant ``llmasos_KEY_VALUE`` compiled with that option on top (e.g.
``--ab-option prefill_gemm=on``: the hand-written prefill GEMM against TensorCoreMatmul, same run;
``--ab-option prefill_gemm=on+flash_prefill=on``: one variant with both).
Ratios are ours / baseline of time (lower is better: ``*_speedup_vs_*`` = baseline / ours).
One JSON document on stdout; progress on stderr.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _target_options import ab_key, bad_options, with_options  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="cuda")
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", default="128,1024")
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "bf16"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="shrink the preset to this many layers (0: as is)")
    p.add_argument("--ab", action="store_true", help="also ours with tensor_cores=off")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a target option (Target.extra) for every variant of ours, e.g. prefill_gemm=on; repeatable")
    p.add_argument("--ab-option", action="append", default=[], metavar="KEY=VALUE",
                   help="also ours with this target option on top (variant llmasos_KEY_VALUE); repeatable")
    p.add_argument("--no-compile-baseline", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    import llmasos
    from llmasos.backends.tvm import resolve_target
    from llmasos.llm.bench import _sync
    from llmasos.llm.model import Decoder
    from llmasos.llm.presets import decoder_config

    spec = resolve_target(a.target)
    bad = bad_options(a.target_option + [x for ab in a.ab_option for x in ab.split("+")])
    if bad:
        p.error(f"--target-option / --ab-option take KEY=VALUE, got {bad}")
    spec = with_options(spec, a.target_option)
    dev = spec.torch_device
    tdtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = decoder_config(a.model, **({"num_hidden_layers": a.layers} if a.layers else {}))
    tmodel = Decoder.random(cfg, mode="torch", seed=0, dtype=tdtype, device=dev)
    linear_params = sum(m.weight.numel() for m in tmodel.modules() if isinstance(m, torch.nn.Linear))
    heads, hd = cfg.heads, cfg.head_dim
    doc = {"target": spec.name, "target_options": dict(spec.extra), "model": a.model, "dtype": a.dtype,
           "layers": cfg.layers, "linear_params": linear_params, "peak_tflops": a.peak_tflops, "rows": []}
    if spec.device_name():
        doc["gpu"] = spec.device_name()
    batches = [int(b) for b in a.batch.split(",")]
    prompts = [int(t) for t in a.prompt.split(",")]
    max_seq = max(prompts) + 8

    def timed(fn):
        fn()
        _sync(dev)
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def flops(B, T):
        return 2 * linear_params * B * T + 2 * 2 * cfg.layers * heads * hd * B * T * (T + 1) / 2

    variants = [("llmasos", spec)]
    if a.ab:
        variants.append(("llmasos_cuda_cores", dataclasses.replace(spec, extra={**spec.extra, "tensor_cores": "off"})))
    for o in a.ab_option:   # KEY=VALUE, or KEY=VALUE+KEY2=VALUE2 for one variant with both
        variants.append((ab_key(o), with_options(spec, o.split("+"))))
    ours = {}
    for key, s in variants:   # one compile per variant: symbolic batch up to the largest asked
        t0 = time.perf_counter()
        ours[key] = llmasos.compile_lm(tmodel.copy_as("export", "cpu"), s, max_seq=max_seq, max_batch=max(batches),
                                       passes="fuse")
        doc[f"{key}_compile_s"] = time.perf_counter() - t0
        log(f"[prefill] {key} compiled in {doc[f'{key}_compile_s']:.1f} s")
    for B in batches:
        tmodel.setup_caches(B, max_seq, tdtype, dev)
        compiled = None if a.no_compile_baseline else torch.compile(tmodel, fullgraph=True)
        for T in prompts:
            row = {"batch": B, "prompt": T, "tflop": flops(B, T) / 1e12}
            gen = torch.Generator(device="cpu").manual_seed(B * 7919 + T)
            prompt = torch.randint(0, cfg.vocab, (B, T), generator=gen).to(dev)
            pos0 = torch.zeros(B, dtype=torch.int32, device=dev)
            last = torch.full((B,), T - 1, dtype=torch.int64, device=dev)
            with torch.no_grad():
                ref = tmodel(prompt, pos0, last).float()
                row["torch_eager_ms"] = 1e3 * timed(lambda: tmodel(prompt, pos0, last))
                if compiled is not None:
                    try:
                        compiled(prompt, pos0, last)
                        row["torch_compile_ms"] = 1e3 * timed(lambda: compiled(prompt, pos0, last))
                    except Exception as e:  # noqa: BLE001 -- a failing baseline is reported, not fatal
                        row["torch_compile_error"] = f"{type(e).__name__}: {e}"[:500]
            ids = prompt.cpu().tolist()
            for key, lm in ours.items():
                buf = lm._buffers_for(B)
                out, _ = lm.prefill(ids, buf)
                got = torch.from_dlpack(out).float().to(ref.device)
                row[f"{key}_logits_max_diff"] = float((got - ref).abs().max())
                row[f"{key}_argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
                row[f"{key}_ms"] = 1e3 * timed(lambda: lm.prefill(ids, buf))
            for key in [k for k in row if k.endswith("_ms")]:
                name = key[:-3]
                row[f"{name}_tflops"] = row["tflop"] / (row[key] / 1e3)
                row[f"{name}_percent_peak"] = 100 * row[f"{name}_tflops"] / a.peak_tflops
            for key, _ in variants:
                for base in ("torch_eager", "torch_compile"):
                    if f"{base}_ms" in row:
                        row[f"{key}_speedup_vs_{base}"] = row[f"{base}_ms"] / row[f"{key}_ms"]
            log(json.dumps(row))
            doc["rows"].append(row)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(doc, f, indent=1)
        del compiled
        torch._dynamo.reset()
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
