"""Load generator for ``llmasos serve``: continuous batching over the paged KV cache vs static-batch generate.

For each concurrency level (default 1, 8, 32, 64) the same workload -- a fixed-seed list of requests with
mixed prompt and output lengths -- runs

* through the server (llmasos/serve on an ephemeral 127.0.0.1 port, the model compiled with kv="paged"):
  ``concurrency`` async httpx clients in a separate process (streaming, with the ``return_token_ids``
  extension to count tokens) each send their next request as soon as the previous one ends; TTFT = send ->
  first streamed token, ITL = between streamed tokens;
* through static-batch ``CompiledLM.generate`` (the contiguous-cache build of the same model): requests in
  arrival order in batches of ``concurrency`` (at most --max-batch); a batch runs until its longest request
  is done (every row gets max(max_tokens) of the batch; only each request's own max_tokens count as output);
  TTFT = batch start -> the row's first token, ITL = between the row's tokens (on_token callbacks);
* with --torch-compile (GPU): the same static batches through the torch-mode Decoder under
  torch.compile(mode="reduce-overhead") (prompts left-padded to the longest; throughput only).

Output lengths are exact (ignore_eos), so both sides make the same useful tokens. Bounded: --requests per
level (default: 2 x concurrency, at least 8, at most 128) and --time-limit seconds per level (then no new
request starts; what finished is reported). Prints one JSON document (and writes it with --out).

    python bench/serve.py                                 # SmolLM2-135M on the CPU
    python bench/serve.py --concurrency 1,8 --requests 16 # quicker
    python bench/serve.py --model llama-1b --target cuda --dtype f16 --max-batch 64 --concurrency 1,8,32,64 \\
        --prompt-len 32,512 --output-len 32,256 --torch-compile --out serve_h200.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def log(*a):
    print("[bench/serve]", *a, file=sys.stderr, flush=True)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(tokens: int, wall: float, ttft: list, itl: list, n: int) -> dict:
    r = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731  ms
    return {"requests": n, "output_tokens": tokens, "wall_s": round(wall, 3),
            "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
            "ttft_ms_p50": r(pct(ttft, 50)), "ttft_ms_p99": r(pct(ttft, 99)),
            "itl_ms_p50": r(pct(itl, 50)), "itl_ms_p99": r(pct(itl, 99))}


def workload(n: int, seed: int, vocab: int, prompt_len, output_len, max_seq: int) -> list:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = rng.randint(*prompt_len)
        o = min(rng.randint(*output_len), max_seq - p)
        # ids from the middle of the vocabulary: no special tokens
        reqs.append(([rng.randrange(min(1000, vocab // 4), vocab) for _ in range(p)], o))
    return reqs


# -- continuous batching through the server ------------------------------------------------------------------
# The clients run in a process of their own (``--client``), so their work competes with the server only for
# cores, as a real client on this machine would; httpx with a plain SSE line parser keeps them light.
async def run_clients(url: str, reqs: list, concurrency: int, time_limit: float) -> dict:
    import httpx
    ttft, itl, tokens, done, errors = [], [], 0, 0, []
    queue = list(reqs)
    t_end = time.perf_counter() + time_limit

    async def worker(client):
        nonlocal tokens, done
        while queue and time.perf_counter() < t_end:
            ids, mt = queue.pop(0)
            body = {"model": "bench", "prompt": ids, "max_tokens": mt, "temperature": 0, "stream": True,
                    "ignore_eos": True, "return_token_ids": True}
            t0 = time.perf_counter()
            last, n = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append((r.status_code, (await r.aread())[:200].decode()))
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    k = len(json.loads(line[6:])["choices"][0].get("token_ids", ()))
                    if not k:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append((now - last) / k)
                    last, n = now, n + k
            tokens += n
            done += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    out = summary(tokens, time.perf_counter() - t0, ttft, itl, done)
    if errors:
        out["errors"] = errors[:5]
    return out


def run_server(url: str, reqs: list, concurrency: int, time_limit: float) -> dict:
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(reqs, f)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", url, "--workload", f.name,
                            "--concurrency", str(concurrency), "--time-limit", str(time_limit)],
                           capture_output=True, text=True, timeout=time_limit + 600)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise RuntimeError(f"the client process failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


# -- static batches through CompiledLM.generate ---------------------------------------------------------------
def run_static(lm, reqs: list, batch: int, time_limit: float) -> dict:
    ttft, itl, tokens, done = [], [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        if time.perf_counter() - t0 > time_limit:
            break
        chunk = reqs[i:i + batch]
        mt = max(o for _, o in chunk)
        tb = time.perf_counter()
        last = [None] * len(chunk)

        def on_token(row, tok):
            now = time.perf_counter()
            if last[row] is None:
                ttft.append(now - tb)
            elif len_out[row] < chunk[row][1]:
                itl.append(now - last[row])
            last[row] = now
            len_out[row] += 1

        len_out = [0] * len(chunk)
        lm.generate([ids for ids, _ in chunk], mt, on_token=on_token)
        tokens += sum(o for _, o in chunk)
        done += len(chunk)
    return summary(tokens, time.perf_counter() - t0, ttft, itl, done)


def run_torch_compile(dec_cfg, dtype, device, reqs: list, batch: int, max_seq: int, time_limit: float) -> dict:
    """Static batches of exactly ``batch`` rows (a short last batch is filled with copies of its first
    request, which do not count) through the torch-mode Decoder: eager prefill of the prompts left-padded to
    the batch's longest, then torch.compile(mode="reduce-overhead") decode steps (one shape: CUDA graphs)."""
    import torch
    from llmasos.llm.bench import torch_generate
    from llmasos.llm.model import Decoder
    tmodel = Decoder.random(dec_cfg, mode="torch", seed=0, dtype=dtype, device=device)
    tmodel.setup_caches(batch, max_seq, dtype, device)
    step = torch.compile(tmodel, mode="reduce-overhead", fullgraph=True)
    warm = torch.tensor([reqs[0][0]] * batch, device=device)
    torch_generate(tmodel, warm, 4, step)          # compile and capture outside the timing
    torch_generate(tmodel, warm, 4, step)
    tokens, done = 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        if time.perf_counter() - t0 > time_limit:
            break
        chunk = reqs[i:i + batch]
        rows = chunk + [chunk[0]] * (batch - len(chunk))
        P, mt = max(len(p) for p, _ in rows), max(o for _, o in chunk)
        mt = min(mt, max_seq - P)
        prompt = torch.tensor([[0] * (P - len(p)) + p for p, _ in rows], device=device)
        torch_generate(tmodel, prompt, mt, step)
        tokens += sum(min(o, mt) for _, o in chunk)
        done += len(chunk)
    return summary(tokens, time.perf_counter() - t0, [], [], done)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, a decoder preset (random weights) or a HF dir")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--dtype", default=None, choices=(None, "f32", "f16", "bf16"))
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2 x concurrency, 8..128)")
    ap.add_argument("--prompt-len", default="8,96", help="min,max prompt tokens (default 8,96)")
    ap.add_argument("--output-len", default="8,64", help="min,max output tokens (default 8,64)")
    ap.add_argument("--max-batch", type=int, default=32, help="compiled batch bound of both builds (default 32)")
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--kv-blocks", type=int, default=None, help="default: max-batch full sequences")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per step (the step budget is twice it)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per level and side (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-static", action="store_true", help="skip the static-batch generate baseline")
    ap.add_argument("--torch-compile", action="store_true", help="also the torch.compile static-batch baseline")
    ap.add_argument("--out", default=None)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)      # internal: the client process
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        with open(args.workload) as f:
            reqs = [(ids, mt) for ids, mt in json.load(f)]
        print(json.dumps(asyncio.run(run_clients(args.client, reqs, int(args.concurrency), args.time_limit))))
        return 0

    import torch
    import llmasos
    from llmasos.llm import presets
    from llmasos.serve import Engine
    from llmasos.serve.load import default_kv_blocks
    from llmasos.serve.server import Server
    from llmasos.zoo import load_model

    levels = [int(c) for c in args.concurrency.split(",")]
    plen = tuple(int(x) for x in args.prompt_len.split(","))
    olen = tuple(int(x) for x in args.output_len.split(","))
    if plen[1] + olen[0] > args.max_seq:
        raise SystemExit(f"--prompt-len max {plen[1]} + --output-len min {olen[0]} exceed --max-seq {args.max_seq}")
    dtype = {None: None, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tok = None
    if args.model in presets.names(decoders_only=True):
        model = args.model                  # compile_lm draws random weights (Decoder.random) for a preset name
        dec_cfg = presets.decoder_config(args.model)
        vocab = dec_cfg.vocab
    else:
        model, tok, _ = load_model(args.model)
        vocab, dec_cfg = model.config.vocab_size, None
    doc = {"bench": "serve", "model": args.model, "target": str(args.target), "dtype": args.dtype or "f32",
           "max_batch": args.max_batch, "max_seq": args.max_seq, "block_size": args.block_size,
           "prompt_len": list(plen), "output_len": list(olen), "seed": args.seed, "cpu_count": os.cpu_count(),
           "load_avg": os.getloadavg()[0], "levels": []}
    t = time.perf_counter()
    plm = llmasos.compile_lm(model, args.target, max_seq=args.max_seq, max_batch=args.max_batch, dtype=dtype,
                             kv="paged", block_size=args.block_size, tokenizer=tok)
    doc["compile_paged_s"] = round(time.perf_counter() - t, 1)
    log(f"compiled paged in {doc['compile_paged_s']} s")
    blocks = args.kv_blocks or default_kv_blocks(args.max_batch, args.max_seq, args.block_size)
    engine = Engine(plm.paged_runner(blocks), tok, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk)
    doc["kv_blocks"] = blocks
    slm = None
    if not args.no_static:
        t = time.perf_counter()
        slm = llmasos.compile_lm(model, args.target, max_seq=args.max_seq, max_batch=args.max_batch, dtype=dtype,
                                 tokenizer=tok)
        doc["compile_static_s"] = round(time.perf_counter() - t, 1)
        log(f"compiled static in {doc['compile_static_s']} s")
    with Server(engine, model_name="bench", port=0).start() as server:
        # warm-up: one short request of each kind (first calls allocate)
        warm = workload(2, 99, vocab, plen, (4, 4), args.max_seq)
        run_server(server.url, warm, 2, 60)
        if slm is not None:
            slm.generate([ids for ids, _ in warm], 4)
        for c in levels:
            n = args.requests or max(8, min(128, 2 * c))
            reqs = workload(n, args.seed + c, vocab, plen, olen, args.max_seq)
            row = {"concurrency": c, "requests": n}
            pre0 = engine.scheduler.num_preemptions
            row["continuous"] = run_server(server.url, reqs, c, args.time_limit)
            row["continuous"]["preemptions"] = engine.scheduler.num_preemptions - pre0
            log(f"c={c} continuous {row['continuous']}")
            if slm is not None:
                row["static"] = run_static(slm, reqs, min(c, args.max_batch), args.time_limit)
                log(f"c={c} static     {row['static']}")
                a, b = row["continuous"]["throughput_tok_s"], row["static"]["throughput_tok_s"]
                row["speedup_vs_static"] = round(a / b, 3) if a and b else None
            if args.torch_compile and dec_cfg is not None:
                try:
                    row["torch_compile_static"] = run_torch_compile(
                        dec_cfg, dtype or torch.float32, plm.executable.spec.torch_device, reqs,
                        min(c, args.max_batch), args.max_seq, args.time_limit)
                    a, b = row["continuous"]["throughput_tok_s"], row["torch_compile_static"]["throughput_tok_s"]
                    row["speedup_vs_torch_compile"] = round(a / b, 3) if a and b else None
                except Exception as e:  # noqa: BLE001  a failing baseline is reported, not fatal
                    row["torch_compile_error"] = f"{type(e).__name__}: {e}"[:500]
            doc["levels"].append(row)
        doc["kv_blocks_used_at_end"] = engine.blocks.num_used
    doc["load_avg_end"] = os.getloadavg()[0]
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
