"""The ``llmasos`` command line.

    llmasos compile MODEL [--target cpu] [-o OUT]    compile and save an artifact
    llmasos run ARTIFACT [--prompt TEXT | --ids 1,2]  run a saved artifact
    llmasos demo [--prompt TEXT]                     the main job: SmolLM2-135M on the CPU, checked against torch
    llmasos generate MODEL|LM_ARTIFACT --prompt TEXT  KV-cache generation (streams tokens; -o saves the compiled LM)
    llmasos bench [--target cuda] [--models ...]     decode tokens/s against torch eager / torch.compile
    llmasos tune MODEL --db DIR [--target cpu]       MetaSchedule-tune an LM's kernels; generate/demo --tuning-db DIR
    llmasos opt [FILE|-] -p PIPELINE [-o OUT]        run a pass pipeline over IR text (see llmasos/opt.py)
    llmasos ops [--missing] [--json]                 which layers (frontend, reference, lowerings, torch) know each op
    llmasos carbon --kwh 1.5 --region FRA             emissions (location/market-based, PUE, embodied), sourced
    llmasos report --since DATE -o report.html        sustainability report (+ .json, .csv) from the energy database
    llmasos offsets purchase|retire|summary|verify   the carbon-offset ledger (SQLite)
    llmasos power [--simulate] [--dry-run]            Zeus-style power-limit optimizer (real GPUs read-only)
    llmasos serve MODEL|LM_ARTIFACT [--port 8000]    OpenAI-compatible server (continuous batching, paged KV)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import llmasos

from .llm import presets
from .artifact import kind_of
from .energy import calibrate_idle, discover
from .energy.cli import add_parsers as add_energy_parsers
from .llm import Sampling, llamacpp
from .llm.bench import run as run_bench
from .opt import add_parser as add_opt_parser
from .serve.control import load_controller
from .serve.load import load_engine
from .zoo import SMOLLM2_GGUF, load_model, load_smollm2, smollm2_package_dir


def _add_compile_args(p):
    p.add_argument("--target", default="cpu", help="cpu/llvm, cuda, or a TVM target as JSON (default: cpu)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=None, help="default: the model's maximum positions")
    p.add_argument("--passes", default="fuse",
                   help="optimization pipeline before the backend (default: fuse; '' for none)")
    # (issue 16) TVM's CPU thread pool: one thread rides out a busy machine better (docs/llm.md, CPU decode)
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the compiled kernels (default: "
                                                              "every core); $TVM_NUM_THREADS also works")


def _compile(model, tok, args, example):
    t0 = time.perf_counter()
    cm = llmasos.compile(model, target=_target_arg(args.target), example_inputs=(example,),
                         max_batch=args.max_batch, max_seq=args.max_seq, passes=args.passes)
    cm.tokenizer = tok
    return cm, time.perf_counter() - t0


def _target_arg(t: str):
    return json.loads(t) if t.strip().startswith("{") else t


def cmd_compile(args) -> int:
    model, tok, example = load_model(args.model)
    cm, secs = _compile(model, tok, args, example)
    # status on stderr, so `llmasos compile M --print-ir > m.llir` writes pure IR text
    print(f"compiled {args.model} for {cm.target.name} in {secs:.1f} s "
          f"({len(cm.graph.nodes)} IR nodes, {cm.graph.param_bytes() / 2**20:.1f} MiB of parameters)", file=sys.stderr)
    if args.print_ir:
        print(cm.ir)
    if args.output:
        cm.save(args.output)
        print(f"saved {args.output}", file=sys.stderr)
    return 0


def _prompt_ids(args, tok):
    import torch  # deferred: commands that need no torch (opt, ops, --help) start without it
    if args.ids:
        return torch.tensor([[int(t) for t in args.ids.split(",")]], dtype=torch.int64)
    if tok is None:
        raise SystemExit("error: this artifact has no tokenizer; pass token ids with --ids 1,2,3")
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise SystemExit("error: the prompt must be at least 2 tokens long")
    return ids


def _logits(out):
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def cmd_run(args) -> int:
    cm = llmasos.load(args.artifact)
    ids = _prompt_ids(args, cm.tokenizer)
    out = _logits(cm(ids))
    secs = cm.benchmark(ids, repeat=args.repeat)
    print(f"input: {list(ids.shape)} tokens; output {list(out.shape)}; latency {secs * 1e3:.2f} ms (median of {args.repeat})")
    if out.dim() == 3:
        top = out[0, -1].topk(5)
        toks = [cm.tokenizer.decode([int(i)]) if cm.tokenizer else str(int(i)) for i in top.indices]
        print("next-token top 5:", ", ".join(f"{t!r} ({v:.2f})" for t, v in zip(toks, top.values.tolist())))
    return 0


def cmd_demo(args) -> int:
    """The main job: compile SmolLM2-135M for KV-cache generation on the CPU, generate a few sentences, check
    the tokens against transformers' greedy generate, and time both."""
    import torch  # deferred: commands that need no torch (opt, ops, --help) start without it

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"[1/4] loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
          f"in {time.perf_counter() - t0:.1f} s")
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    n = args.max_new_tokens
    t0 = time.perf_counter()
    lm = llmasos.compile_lm(model, _target_arg(args.target), max_seq=args.max_seq, batch=1, passes=args.passes,
                            tokenizer=tok, tuning_db=args.tuning_db)
    secs = time.perf_counter() - t0
    print(f"[2/4] compiled prefill + decode for {lm.executable.spec.name}{_tuned_note(lm)} in {secs:.1f} s "
          f"(max_seq {lm.max_seq}, KV cache {lm.cache_bytes(1) / 2**20:.1f} MiB)")
    # torch is timed first: TVM's worker threads spin for a while after each call and would steal the
    # cores from a torch run that follows, making our comparison unfairly good
    gen_kw = dict(do_sample=False, use_cache=True, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **gen_kw)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw)
        t1 = time.perf_counter()
        ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen_kw)[0, ids.shape[1]:].tolist()
        t2 = time.perf_counter()
        ref_logits = model(ids).logits[0, -1].float()
    torch_tok_s = (n - 1) / max(1e-9, (t2 - t1) - (t1 - t0))
    prompt_ids = ids[0].tolist()
    lm.generate(prompt_ids, 2)                                   # warm-up
    buf = lm._buffers_for(1)
    logits, _ = lm.prefill([prompt_ids], buf)
    err = float((torch.from_dlpack(logits)[0].float() - ref_logits).abs().max())
    scale = float(ref_logits.abs().max())
    print(f"[3/4] prompt {args.prompt!r} ({ids.shape[1]} tokens with the chat template); greedy, {n} new tokens:")
    print("      ", end="")
    got = []
    for piece in lm.stream(prompt_ids, n):
        got.append(piece)
        print(tok.decode([piece]), end="", flush=True)
    print()
    st = lm.last_stats
    agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    ok = agree >= min(32, n) and err <= 1e-3 * max(1.0, scale)
    print(f"[4/4] decode: llmasos {st.decode_tokens_per_s:.1f} tokens/s, torch eager (transformers generate, "
          f"KV cache) {torch_tok_s:.1f} tokens/s ({st.decode_tokens_per_s / torch_tok_s:.2f}x); greedy tokens equal "
          f"to torch's for the first {agree} of {n}; prefill logits max |diff| {err:.1e} (scale {scale:.1f}) -> "
          f"{'MATCH' if ok else 'MISMATCH'}")
    print(json.dumps({"model": "SmolLM2-135M-Instruct", "target": lm.executable.spec.name,
                      "prompt_tokens": int(ids.shape[1]), "new_tokens": n, "compile_s": round(secs, 2),
                      "llmasos_decode_tok_s": round(st.decode_tokens_per_s, 2),
                      "torch_eager_decode_tok_s": round(torch_tok_s, 2),
                      "llmasos_prefill_ms": round(st.prefill_s * 1e3, 2), "greedy_tokens_equal": agree,
                      "prefill_logits_max_abs_err": err, "logits_scale": scale, "match": ok}))
    _llamacpp_figure(st.decode_tokens_per_s, n)
    if args.output:
        lm.save(args.output)
        print(f"saved {args.output}")
    return 0 if ok else 1


def _llamacpp_figure(ours_tok_s: float, n: int) -> None:
    """(issue 16) When llama.cpp's llama-bench is present ($LLAMA_BENCH or PATH), its decode speed on the GGUF
    SmolLM2 ships in, same thread count, and ours relative to it; nothing when it is absent."""
    from .backends.tvm.threads import cpu_threads  # deferred: TVM (backends.tvm imports it)
    try:
        exe = llamacpp.find_llama_bench()
    except FileNotFoundError as e:
        print(f"      llama.cpp: {e}")
        return
    if exe is None:
        return
    try:
        r = llamacpp.run_llama_bench(exe, str(smollm2_package_dir() / SMOLLM2_GGUF), threads=cpu_threads(),
                                     prompt=0, new=n)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"      llama.cpp: llama-bench failed: {e}")
        return
    lc = r["decode_tok_s"]
    print(f"      llama.cpp ({r['cmd'].split()[0]} -n {n}, {r.get('model_type')}): {lc:.1f} tokens/s decode; "
          f"llmasos/llama.cpp = {ours_tok_s / lc:.2f}x (one run each, not in turns: bench/cpu_vs_llamacpp.py)")
    print(json.dumps({"llamacpp_decode_tok_s": round(lc, 2), "llmasos_vs_llamacpp": round(ours_tok_s / lc, 3)}))


def _sampling(args):
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    """Compile (or load) an LM and generate from a prompt, streaming the text as it is made."""
    sampling = _sampling(args)
    t0 = time.perf_counter()
    if Path(args.model).is_dir() and kind_of(args.model) == "lm":
        lm = llmasos.load_lm(args.model)
        what = f"loaded {args.model}"
    else:
        model, tok, _ = load_model(args.model)
        lm = llmasos.compile_lm(model, _target_arg(args.target), max_seq=args.max_seq, max_batch=1,
                                passes=args.passes, tokenizer=tok, tuning_db=args.tuning_db)
        what = f"compiled {args.model} for {lm.executable.spec.name}" + _tuned_note(lm)
    print(f"[llmasos] {what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.output:
        lm.save(args.output)
        print(f"[llmasos] saved {args.output}", file=sys.stderr)
    if lm.tokenizer is None and not args.ids:
        raise ValueError("this model has no tokenizer; pass token ids with --ids 1,2,3")
    prompt = [int(t) for t in args.ids.split(",")] if args.ids else args.prompt
    if args.chat and lm.tokenizer is not None and not args.ids:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                  add_generation_prompt=True)
    stop = [lm.tokenizer.eos_token_id] if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None else []
    if not args.ids:
        print(args.prompt, end="", flush=True)
    for piece in lm.stream(prompt, args.max_new_tokens, sampling, stop=stop):
        print(piece if isinstance(piece, str) else f" {piece}", end="", flush=True)
    print()
    st = lm.last_stats
    print(f"[llmasos] {st.new_tokens} tokens; prefill {st.prompt_tokens} tokens in {st.prefill_s * 1e3:.1f} ms; "
          f"decode {st.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


def _tuned_note(lm) -> str:
    n = lm.timings.get("tuned_kernels")
    return "" if n is None else f" ({n} kernels from the tuning database)"


def cmd_tune(args) -> int:
    """MetaSchedule-tune the kernels `generate`/`demo` build for MODEL (batch 1, same --max-seq/--passes)."""
    dtype = None
    if args.dtype:
        import torch  # deferred: commands that need no torch (opt, ops, --help) start without it
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model)[0]   # the model exactly as `generate MODEL` loads it
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    shape = dict(max_batch=1) if args.batch == 1 else dict(batch=args.batch)  # as generate / bench compile
    report = llmasos.tune_lm(model, _target_arg(args.target), args.db, max_seq=args.max_seq, **shape, dtype=dtype,
                             passes=args.passes, trials_per_task=args.trials, ops=args.ops, log=log)
    print(report.summary(), file=sys.stderr)
    print(f"[llmasos] tuning database: {args.db} (use it with --tuning-db {args.db})", file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=1))
    return 0


def cmd_bench(args) -> int:
    doc = run_bench(args.models.split(","), _target_arg(args.target), batches=[int(b) for b in args.batch.split(",")],
              prompt_len=args.prompt, new=args.new, dtype=args.dtype, passes=args.passes,
              int4_models=[m for m in args.int4.split(",") if m], compile_baseline=not args.no_compile_baseline,
              repeat=args.repeat, out=args.out, tune_trials=args.tune)
    print(json.dumps(doc, indent=1))
    return 0


def cmd_ops(args) -> int:
    """Per registered op: the ATen ops converted to it, its reference, a TVM lowering per target, a torch
    implementation (llmasos/op_coverage.py). Exit status 0 whatever is missing: this is a report."""
    from .op_coverage import format_table, op_coverage  # deferred: imports torch and TVM
    rows = op_coverage(args.target or None)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows if r.missing or not args.missing], indent=1))
    else:
        print(format_table(rows, missing_only=args.missing))
    return 0


# -- llmasos serve (llmasos/serve; the `serve` extra) ---------------------------------------------------------
def cmd_serve(args) -> int:
    """Load or compile MODEL with a paged KV cache and serve it over HTTP until Ctrl-C."""
    try:
        from .serve.server import Server  # deferred: the serve extra (FastAPI, uvicorn, prometheus-client)
    except ImportError as e:
        raise RuntimeError(f"llmasos serve needs the serve extra (pip install 'llmasos[serve]'): {e}") from None
    log = (lambda *a: print("[llmasos]", *a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    meters, idle = None, None
    if args.energy:     # the meters, and their idle power while nothing is loaded yet (2 s)
        meters = discover().meters
        idle = calibrate_idle(meters) if meters else None
        log("energy on /metrics: " + (", ".join(f"{m.name} ({m.method}; idle {idle[m.name]:.1f} W)" for m in meters)
                                      if meters else "no meter on this machine"))
    engine, name = load_engine(args.model, target=args.target, max_batch=args.max_batch, max_seq=args.max_seq,
                               kv_blocks=args.kv_blocks, block_size=args.block_size,
                               prefill_chunk=args.prefill_chunk, log=log)
    controller = load_controller(args.controller, engine) if args.controller else None
    if controller is not None:
        log(f"load controller: {', '.join(f'{c.name} (batch {c.max_batch})' for c in controller.controller.configs)}, "
            f"every {controller.interval_s:g} s; starting with {controller.current.name}")
    server = Server(engine, model_name=args.name or name, host=args.host, port=args.port, api_key=args.api_key,
                    max_waiting=args.max_waiting, log_level="info", energy_meters=meters, idle_watts=idle,
                    controller=controller)
    ready = (lambda url: log(f"{name} ready in {time.perf_counter() - t0:.1f} s: batch <= {engine.max_batch}, "
                             f"{engine.blocks.capacity} KV blocks of {engine.block_size}, max_seq {engine.max_seq}; "
                             f"serving on {url}/v1 (model name {args.name or name!r})"))
    try:
        server.run(ready=ready)
    except KeyboardInterrupt:       # uvicorn re-raises the Ctrl-C it shut down on
        pass
    log("stopped")
    return 0


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a paged KV cache")
    p.add_argument("model", help="an LM artifact compiled with kv='paged', smollm2, a decoder preset or a local "
                                 "HF causal-LM directory")
    p.add_argument("--target", default=None, help="cpu (default), cuda, a TVM target as JSON, or torch (eager, "
                                                  "uncompiled); an artifact: its own target unless given")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together (default 8; an artifact: the batch it was compiled for)")
    p.add_argument("--max-seq", type=int, default=512, help="positions per request: prompt + output (default 512)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks (default: max-batch full sequences)")
    p.add_argument("--block-size", type=int, default=16, help="positions per KV block (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per step (default "
                                                                  "256; a step takes at most twice it)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429 (default 256)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--name", default=None, help="the model name clients send (default: the model argument)")
    p.add_argument("--controller", default=None, metavar="FILE",
                   help="a load-controller file (JSON: measured configurations; llmasos/serve/control.py): every "
                        "interval the least-power configuration covering the load sets the max batch")
    p.add_argument("--no-energy", dest="energy", action="store_false",
                   help="leave the energy meters (and their 2 s idle calibration at start) off /metrics")
    p.set_defaults(fn=cmd_serve)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="llmasos", description="LLMasOS: compile PyTorch LLMs with TVM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compile", help="compile a model and save an artifact")
    p.add_argument("model", help=f"smollm2 | a preset ({', '.join(presets.names())}) | a local HF model "
                                 f"directory | module:factory")
    p.add_argument("-o", "--output", help="artifact directory to write (e.g. model.llmasos)")
    p.add_argument("--print-ir", action="store_true")
    _add_compile_args(p)
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("run", help="run a saved artifact")
    p.add_argument("artifact")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--ids", help="comma-separated token ids")
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="the main job: SmolLM2-135M generating on the CPU, checked against torch")
    p.add_argument("--prompt", default="Write a few sentences about Paris.")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="(unused; kept for old scripts)")
    p.add_argument("-o", "--output", help="also save the compiled LM here")
    _add_compile_args(p)
    p.add_argument("--tuning-db", default=None, help="a database from `llmasos tune` (same --max-seq)")
    p.set_defaults(fn=cmd_demo, max_seq=256)
    p = sub.add_parser("generate", help="generate text with a KV cache (compiles MODEL, or loads an LM artifact)")
    p.add_argument("model", help=f"an LM artifact directory (from -o), smollm2, a decoder preset "
                                 f"({', '.join(presets.names(decoders_only=True))}) or a local HF causal-LM directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--ids", help="comma-separated prompt token ids (models without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--target", default="cpu")
    p.add_argument("--max-seq", type=int, default=512, help="cache positions: prompt + new tokens (default 512)")
    p.add_argument("--passes", default="fuse")
    p.add_argument("-o", "--output", help="save the compiled LM here (loadable with TVM's runtime alone)")
    p.add_argument("--tuning-db", default=None, help="a database from `llmasos tune` (same --max-seq and --passes)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("tune", help="MetaSchedule-tune an LM's kernels into a database that later compiles reuse")
    p.add_argument("model", help="smollm2, a decoder preset (as generate) or a local HF causal-LM directory")
    p.add_argument("--db", required=True, help="tuning database directory (created, or extended)")
    p.add_argument("--target", default="cpu")
    p.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per kernel (default 64)")
    p.add_argument("--ops", default="reduce", choices=("reduce", "all"),
                   help="kernels with a reduction (GEMM/GEMV, norms, softmax; default) or all")
    p.add_argument("--max-seq", type=int, default=512, help="as generate's --max-seq (default 512)")
    p.add_argument("--batch", type=int, default=1, help="decode batch to tune for (default 1, as generate)")
    p.add_argument("--dtype", default=None, choices=("f32", "f16", "bf16"), help="cast the weights")
    p.add_argument("--passes", default="fuse")
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("bench", help="decode tokens/s: llmasos vs torch eager vs torch.compile (JSON)")
    p.add_argument("--target", default="cuda")
    p.add_argument("--models", default="gpt2-124m,llama-1b",
                   help=f"decoder presets ({', '.join(presets.names(decoders_only=True))})")
    p.add_argument("--batch", default="1")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "bf16"))
    p.add_argument("--int4", default="", help="models also run with quantize{bits=4,group=128}")
    p.add_argument("--passes", default="fuse")
    p.add_argument("--no-compile-baseline", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tune", type=int, default=0, help="also report a MetaSchedule-tuned build (trials per kernel)")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_bench)
    add_opt_parser(sub)
    p = sub.add_parser("ops", help="which layers know each registered op: frontend, reference, lowerings, torch")
    p.add_argument("--missing", action="store_true", help="only the ops some layer lacks")
    p.add_argument("--json", action="store_true", help="JSON: one object per op")
    p.add_argument("--target", action="append", help="TVM target(s) to ask about (default: every registered one)")
    p.set_defaults(fn=cmd_ops)
    add_energy_parsers(sub)  # carbon, report, offsets, power (llmasos/energy/cli.py)
    _add_serve_parser(sub)
    args = ap.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:  # (issue 16)
            from .backends.tvm.threads import set_cpu_threads  # deferred: TVM (backends.tvm imports it)
            set_cpu_threads(args.threads)
        return args.fn(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        # a CLI user gets the message, not a traceback; LLMASOS_DEBUG=1 shows it
        if os.environ.get("LLMASOS_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
