"""The ``llmasos`` command line.

    llmasos compile MODEL [--target cpu] [-o OUT]    compile and save an artifact
    llmasos run ARTIFACT [--prompt TEXT | --ids 1,2]  run a saved artifact
    llmasos demo [--prompt TEXT]                     the main job: SmolLM2-135M on the CPU, checked against torch
    llmasos opt [FILE|-] -p PIPELINE [-o OUT]        run a pass pipeline over IR text (see llmasos/opt.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _add_compile_args(p):
    p.add_argument("--target", default="cpu", help="cpu/llvm, cuda, or a TVM target as JSON (default: cpu)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=None, help="default: the model's maximum positions")
    p.add_argument("--passes", default="fuse",
                   help="optimization pipeline before the backend (default: fuse; '' for none)")


def _compile(model, tok, args, example):
    import llmasos
    t0 = time.perf_counter()
    cm = llmasos.compile(model, target=_target_arg(args.target), example_inputs=(example,),
                         max_batch=args.max_batch, max_seq=args.max_seq, passes=args.passes)
    cm.tokenizer = tok
    return cm, time.perf_counter() - t0


def _target_arg(t: str):
    return json.loads(t) if t.strip().startswith("{") else t


def cmd_compile(args) -> int:
    from .zoo import load_model
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
    import torch
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
    import llmasos
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
    """Compile SmolLM2-135M for the CPU, run a prompt, check logits against PyTorch, time both."""
    import torch

    from .compiled import median_seconds
    from .zoo import load_smollm2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"[1/4] loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
          f"in {time.perf_counter() - t0:.1f} s")
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    cm, secs = _compile(model, tok, args, ids)
    print(f"[2/4] compiled for {cm.target.name} in {secs:.1f} s: {len(cm.graph.nodes)} IR nodes, "
          f"symbols {cm.graph.symbols}")
    # torch is timed first: TVM's worker threads spin for a while after each call and would steal the
    # cores from a torch run that follows, making our comparison unfairly good
    with torch.no_grad():
        theirs = median_seconds(lambda: model(ids), args.repeat)
        ref = _logits(model(ids)).float()
    got = _logits(cm(ids)).float()
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    same_top = bool((got[0, -1].argmax() == ref[0, -1].argmax()).item())
    ok = err <= 1e-4 * max(1.0, scale)
    print(f"[3/4] prompt {args.prompt!r} ({ids.shape[1]} tokens): max |logits - torch| = {err:.2e} "
          f"(output scale {scale:.1f}) -> {'MATCH' if ok else 'MISMATCH'}; next token "
          f"{tok.decode([int(got[0, -1].argmax())])!r} (torch: {tok.decode([int(ref[0, -1].argmax())])!r})")
    ours = cm.benchmark(ids, repeat=args.repeat)
    print(f"[4/4] latency for one forward pass over the prompt (median of {args.repeat}): "
          f"llmasos {ours * 1e3:.1f} ms, torch eager {theirs * 1e3:.1f} ms ({theirs / ours:.2f}x)")
    print(json.dumps({"model": "SmolLM2-135M-Instruct", "target": cm.target.name, "prompt_tokens": int(ids.shape[1]),
                      "compile_s": round(secs, 2), "max_abs_err": err, "logits_scale": scale,
                      "match": ok, "same_next_token": same_top, "llmasos_ms": round(ours * 1e3, 3),
                      "torch_eager_ms": round(theirs * 1e3, 3)}))
    if args.output:
        cm.save(args.output)
        print(f"saved {args.output}")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="llmasos", description="LLMasOS: compile PyTorch LLMs with TVM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compile", help="compile a model and save an artifact")
    p.add_argument("model", help="smollm2 | gpt2-tiny | llama-tiny | bert-tiny | a local HF model directory | "
                                 "module:factory")
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
    p = sub.add_parser("demo", help="the main job: SmolLM2-135M compiled for the CPU, checked against torch")
    p.add_argument("--prompt", default="The capital of France is Paris. The capital of Germany is")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("-o", "--output", help="also save the artifact here")
    _add_compile_args(p)
    p.set_defaults(fn=cmd_demo, max_seq=512)
    from .opt import add_parser as add_opt_parser
    add_opt_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        # a CLI user gets the message, not a traceback; LLMASOS_DEBUG=1 shows it
        import os
        if os.environ.get("LLMASOS_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
