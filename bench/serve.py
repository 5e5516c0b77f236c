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

With --in-process (automatic where FastAPI is not installed, e.g. the GPU host) the continuous side drives
the Engine directly in this process instead of through HTTP (``run_engine``: the same closed loop, the same
metrics, labelled "engine, in-process (no HTTP)"). With a decoder preset (random weights, drawn once for
every build) the paged runner's prefill logits are checked against TorchPagedRunner (plain PyTorch) over the
same weights ("check_vs_torch").

Output lengths are exact (ignore_eos), so both sides make the same useful tokens. Bounded: --requests per
level (default: 2 x concurrency, at least 8, at most 128) and --time-limit seconds per level and side (then
no new request starts; the in-process engine aborts what still runs at 1.25x the limit, and its tokens so
far count); --budget caps the whole run (phases are shortened or skipped to fit, and a watchdog prints the
partial JSON and exits 3 at the budget). --energy adds each side's energy window (J, W, J/token gross and
above the idle power measured before the compiles; "estimated" where the meter is the CPU estimate). Prints
one JSON document (and writes it with --out).

    python bench/serve.py                                 # SmolLM2-135M on the CPU
    python bench/serve.py --concurrency 1,8 --requests 16 # quicker
    python bench/serve.py --model llama-1b --target cuda --dtype f16 --max-batch 64 --max-seq 1024 \\
        --concurrency 32,64 --prompt-len 32,512 --output-len 32,256 --torch-compile --in-process \\
        --time-limit 25 --budget 230 --out serve_gpu.json   # the GPU figure (H100/H200), <= 240 s
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _target_options import bad_options, with_options  # noqa: E402


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


# -- continuous batching in-process (no HTTP) -------------------------------------------------------------------
def run_engine(engine, reqs: list, concurrency: int, time_limit: float) -> dict:
    """The same closed loop as run_clients, driving the Engine directly in this process (no server, no HTTP,
    no client process: what a GPU host without FastAPI can run): ``concurrency`` virtual clients, each
    sending its next request as soon as its previous one ends. TTFT = the request's creation -> its first
    token, ITL = between its tokens (per token when a step gives several). Bounded: after time_limit no
    request starts, and at 1.25 x time_limit the ones still running are aborted (their tokens so far count)."""
    from llmasos.serve.request import SamplingParams
    queue, live = list(reqs), {}
    ttft, itl, tokens, done = [], [], 0, 0
    t0 = time.perf_counter()
    t_end, t_kill = t0 + time_limit, t0 + 1.25 * time_limit

    def send():
        ids, mt = queue.pop(0)
        req = engine.make_request(ids, SamplingParams(max_tokens=mt, temperature=0, ignore_eos=True))
        engine.add(req)
        live[req.request_id] = [req.arrival, None]

    for _ in range(min(concurrency, len(queue))):
        send()
    aborted = 0
    while live:
        if time.perf_counter() > t_kill:
            for rid in list(live):
                aborted += engine.abort(rid)
            break
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            k = len(o.token_ids)
            st = live.get(o.request_id)
            if st is None:
                continue
            if k:
                if st[1] is None:
                    ttft.append(now - st[0])
                else:
                    itl.extend([(now - st[1]) / k] * k)
                st[1] = now
                tokens += k
            if o.finished:
                del live[o.request_id]
                if o.finish_reason in ("stop", "length"):
                    done += 1
                if queue and now < t_end:
                    send()
    out = summary(tokens, time.perf_counter() - t0, ttft, itl, done)
    out["mode"] = "engine, in-process (no HTTP)"
    if aborted:
        out["aborted_at_limit"] = aborted
    return out


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


def run_torch_compile(dec, dtype, device, reqs: list, batch: int, max_seq: int, time_limit: float) -> dict:
    """Static batches of exactly ``batch`` rows (a short last batch is filled with copies of its first
    request, which do not count) through the torch-mode Decoder (the served model's weights): eager prefill
    of the prompts left-padded to the batch's longest, then torch.compile(mode="reduce-overhead") decode
    steps (one shape: CUDA graphs). Compilation and capture are outside the timing (``compile_s``)."""
    import torch
    from llmasos.llm.bench import torch_generate
    t_c = time.perf_counter()
    tmodel = dec.copy_as("torch", device)
    tmodel.setup_caches(batch, max_seq, dtype, device)
    step = torch.compile(tmodel, mode="reduce-overhead", fullgraph=True)
    warm = torch.tensor([reqs[0][0]] * batch, device=device)
    torch_generate(tmodel, warm, 4, step)          # compile and capture outside the timing
    torch_generate(tmodel, warm, 4, step)
    compile_s = time.perf_counter() - t_c
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
    out = summary(tokens, time.perf_counter() - t0, [], [], done)
    out["compile_s"] = round(compile_s, 1)
    del step, tmodel
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def check_vs_torch(runner, dec, device, reqs: list, n: int = 4) -> dict:
    """The paged runner's prefill logits for the first n workload prompts against TorchPagedRunner (plain
    PyTorch, eager) over the same weights: max |diff| and the rows whose argmax differs; the same for the
    prompts as one ragged call where the runner has it."""
    import numpy as np
    from llmasos.llm import TorchPagedRunner
    prompts = [ids for ids, _ in reqs[:n]]
    B, T, MB = len(prompts), max(len(p) for p in prompts), runner.max_blocks_per_seq
    need = -(-T // runner.block_size)
    if B * need > runner.num_blocks:
        return {"skipped": "the pool is too small for the check"}
    ref = TorchPagedRunner(dec.copy_as("export", device), B * need, runner.block_size, max_seq=runner.max_seq, max_batch=B, device=device)
    ids = np.zeros((B, T), np.int32)
    table = np.full((B, MB), -1, np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        table[b, :need] = np.arange(b * need, (b + 1) * need)
    last = np.array([len(p) - 1 for p in prompts], np.int32)
    pos = np.zeros(B, np.int32)
    ours = runner.step(ids, pos, last, table)
    theirs = ref.step(ids, pos, last, table)
    del ref
    out = {"rows": B, "max_abs_logits_diff": float(np.abs(ours - theirs).max()),
           "logit_scale": float(np.abs(theirs).max()),
           "argmax_differs_rows": [int(b) for b in np.flatnonzero(ours.argmax(-1) != theirs.argmax(-1))]}
    if getattr(runner, "ragged", False):
        # the same prompts as one ragged call (rewriting the same positions with the same values)
        rag = runner.ragged_step(np.concatenate(prompts), last + 1, pos, table)
        out["ragged_max_abs_logits_diff"] = float(np.abs(rag - theirs).max())
        out["ragged_argmax_differs_rows"] = [int(b) for b in np.flatnonzero(rag.argmax(-1) != theirs.argmax(-1))]
    return out


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
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: a phase that would start with less than it needs left is "
                         "skipped (said in the JSON), and at the budget a watchdog prints what was measured and "
                         "exits 3 -- the run never hangs (default: none)")
    ap.add_argument("--in-process", action="store_true",
                    help="drive the engine in this process (no HTTP server; automatic when FastAPI is missing)")
    ap.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a target option (Target.extra) for both builds, e.g. flash_prefill=on (repeatable)")
    ap.add_argument("--ragged", default="on", choices=("on", "off", "ab"),
                    help="steps with prompt chunks as one packed (ragged) call: on (default), off (two calls, the "
                         "chunks padded), ab (each level's continuous side both ways, off first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-static", action="store_true", help="skip the static-batch generate baseline")
    ap.add_argument("--torch-compile", action="store_true", help="also the torch.compile static-batch baseline")
    ap.add_argument("--energy", action="store_true",
                    help="also J/token of every side (llmasos.energy windows: NVML on GPUs, RAPL or the labelled "
                         "CPU estimate; idle power measured before the compiles and subtracted beside the gross)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)      # internal: the client process
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        with open(args.workload) as f:
            reqs = [(ids, mt) for ids, mt in json.load(f)]
        print(json.dumps(asyncio.run(run_clients(args.client, reqs, int(args.concurrency), args.time_limit))))
        return 0

    T0 = time.perf_counter()
    levels = [int(c) for c in args.concurrency.split(",")]
    plen = tuple(int(x) for x in args.prompt_len.split(","))
    olen = tuple(int(x) for x in args.output_len.split(","))
    if plen[1] + olen[0] > args.max_seq:
        raise SystemExit(f"--prompt-len max {plen[1]} + --output-len min {olen[0]} exceed --max-seq {args.max_seq}")
    doc = {"bench": "serve", "model": args.model, "target": str(args.target), "dtype": args.dtype or "f32",
           "max_batch": args.max_batch, "max_seq": args.max_seq, "block_size": args.block_size,
           "prompt_len": list(plen), "output_len": list(olen), "seed": args.seed, "cpu_count": os.cpu_count(),
           "load_avg": os.getloadavg()[0], "budget_s": args.budget, "levels": [], "skipped": []}
    printed = threading.Lock()
    if args.energy:     # idle power first, with nothing compiled or loaded yet
        import llmasos.energy as energy
        doc["energy_idle_w"] = energy.calibrate_idle()
        doc["energy_meters"] = {m.name: m.method for m in energy.discover().meters}

    def metered(label: str, fn) -> dict:
        """fn() -> a side's summary; with --energy its energy window beside it (J, J/token gross and above idle)."""
        if not args.energy:
            return fn()
        sync = None
        if str(args.target).startswith("cuda"):
            import torch
            sync = torch.cuda.synchronize
        with energy.measure(label, idle="cached", sync=sync) as w:
            out = fn()
        w.tokens = out["output_tokens"]
        out["energy"] = {"joules": round(w.joules, 3), "active_joules": round(w.active_joules, 3),
                         "watts": round(w.watts, 2), "estimated": w.estimated,
                         "j_per_token": round(w.joules_per_token, 5) if w.tokens else None,
                         "active_j_per_token": round(w.active_joules_per_token, 5) if w.tokens else None}
        return out

    def finish(code: int = 0) -> int:
        if not printed.acquire(blocking=False):
            return code
        doc["wall_s"] = round(time.perf_counter() - T0, 1)
        doc["load_avg_end"] = os.getloadavg()[0]
        for _ in range(20):        # the watchdog may print while the main thread is adding a row
            try:
                text = json.dumps(doc, indent=1)
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            text = json.dumps({"bench": "serve", "error": "could not serialize the results"})
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return code

    if args.budget:
        def watchdog():
            doc["aborted"] = f"the --budget of {args.budget} s ran out (partial results)"
            finish()
            os._exit(3)
        dog = threading.Timer(args.budget, watchdog)
        dog.daemon = True
        dog.start()

    def left() -> float:
        return float("inf") if not args.budget else args.budget - (time.perf_counter() - T0)

    def limit(share: float = 1.0) -> float:
        """A phase's time limit: --time-limit, or less when the budget is short (a share of what is left)."""
        return max(1.0, min(args.time_limit, share * left()))

    import torch
    import llmasos
    from llmasos.llm import presets
    from llmasos.serve import Engine
    from llmasos.serve.load import default_kv_blocks
    from llmasos.zoo import load_model

    in_process = args.in_process
    if not in_process:
        try:
            from llmasos.serve.server import Server
        except ImportError as e:
            log(f"no HTTP server here ({e}): driving the engine in-process")
            in_process = True
    doc["mode"] = "engine, in-process (no HTTP)" if in_process else "HTTP server (streaming clients in a separate process)"
    dtype = {None: None, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tok = None
    dec = dec_cfg = None
    if args.model in presets.names(decoders_only=True):
        from llmasos.llm.model import Decoder
        dec_cfg = presets.decoder_config(args.model)
        vocab = dec_cfg.vocab
        t = time.perf_counter()
        dec = Decoder.random(dec_cfg, mode="export", seed=0, dtype=dtype or torch.float32)   # one draw, both builds
        doc["random_weights_s"] = round(time.perf_counter() - t, 1)
        model = dec
    else:
        model, tok, _ = load_model(args.model)
        vocab = model.config.vocab_size
    target = args.target
    if args.target_option:
        from llmasos.backends.tvm import resolve_target  # deferred: TVM, as this script's other imports
        bad = bad_options(args.target_option)
        if bad:
            raise SystemExit(f"--target-option takes KEY=VALUE, got {bad}")
        target = with_options(resolve_target(args.target), args.target_option)
        doc["target_options"] = dict(target.extra)
    t = time.perf_counter()
    plm = llmasos.compile_lm(model, target, max_seq=args.max_seq, max_batch=args.max_batch, dtype=dtype,
                             kv="paged", block_size=args.block_size, tokenizer=tok)
    doc["compile_paged_s"] = round(time.perf_counter() - t, 1)
    log(f"compiled paged in {doc['compile_paged_s']} s")
    blocks = args.kv_blocks or default_kv_blocks(args.max_batch, args.max_seq, args.block_size)
    engine = Engine(plm.paged_runner(blocks), tok, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    ragged=args.ragged != "off")
    doc["ragged"] = args.ragged
    doc["kv_blocks"] = blocks
    workloads = {c: workload(args.requests or max(8, min(128, 2 * c)), args.seed + c, vocab, plen, olen, args.max_seq)
                 for c in levels}
    device = plm.executable.spec.torch_device
    if dec is not None:
        try:
            doc["check_vs_torch"] = check_vs_torch(engine.runner, dec, device, workloads[levels[0]])
            log(f"check vs torch: {doc['check_vs_torch']}")
        except Exception as e:  # noqa: BLE001  reported, not fatal
            doc["check_vs_torch"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    slm = None
    if not args.no_static:
        t = time.perf_counter()
        slm = llmasos.compile_lm(model, target, max_seq=args.max_seq, max_batch=args.max_batch, dtype=dtype,
                                 tokenizer=tok)
        doc["compile_static_s"] = round(time.perf_counter() - t, 1)
        log(f"compiled static in {doc['compile_static_s']} s")

    warm = workload(2, 99, vocab, plen, (4, 4), args.max_seq)

    def levels_run(cont):
        for i, c in enumerate(levels):
            reqs = workloads[c]
            row = {"concurrency": c, "requests": len(reqs)}
            doc["levels"].append(row)
            # what is left is shared by the levels still to run, and each level's sides
            sides = (2 if slm is not None else 1) + (args.ragged == "ab")
            share = 1.0 / ((len(levels) - i) * sides + (1 if args.torch_compile else 0))
            if left() < 10:
                doc["skipped"].append(f"concurrency {c}: no budget left")
                continue
            def continuous(key: str, ragged: bool) -> None:
                # every continuous run starts from a cold prefix cache: an earlier run of the same prompts (the
                # A/B) would otherwise find their blocks computed (the engine is idle between runs)
                engine.ragged = ragged
                engine.blocks.drop_cache()
                pre0 = engine.scheduler.num_preemptions
                row[key] = metered(f"{key} c={c}", lambda: cont(reqs, c, limit(share)))
                row[key]["preemptions"] = engine.scheduler.num_preemptions - pre0
                log(f"c={c} {key} {row[key]}")

            if args.ragged == "ab":     # the same level with two calls a mixed step (chunks padded), first
                continuous("continuous_two_calls", False)
            continuous("continuous", args.ragged != "off")
            if args.ragged == "ab":
                a, b = row["continuous"]["throughput_tok_s"], row["continuous_two_calls"]["throughput_tok_s"]
                row["ragged_speedup"] = round(a / b, 3) if a and b else None
            if slm is not None:
                # a first call of a batch size allocates its caches (and captures its CUDA graph): not timed
                slm.generate([reqs[0][0]] * min(c, args.max_batch), 2)
                row["static"] = metered(f"static c={c}", lambda: run_static(slm, reqs, min(c, args.max_batch),
                                                                             limit(share * 2)))
                log(f"c={c} static     {row['static']}")
                a, b = row["continuous"]["throughput_tok_s"], row["static"]["throughput_tok_s"]
                row["speedup_vs_static"] = round(a / b, 3) if a and b else None

    if in_process:
        run_engine(engine, warm, 2, 60)
        if slm is not None:
            slm.generate([ids for ids, _ in warm], 4)
        levels_run(lambda reqs, c, tl: run_engine(engine, reqs, c, tl))
    else:
        with Server(engine, model_name="bench", port=0).start() as server:
            # warm-up: one short request of each kind (first calls allocate)
            run_server(server.url, warm, 2, 60)
            if slm is not None:
                slm.generate([ids for ids, _ in warm], 4)
            levels_run(lambda reqs, c, tl: run_server(server.url, reqs, c, tl))
    doc["kv_blocks_used_at_end"] = engine.blocks.num_used

    if args.torch_compile and dec_cfg is not None:
        # last: its compilation (and a CUDA-graph capture per batch size) takes the longest and the budget
        # may not allow it; the highest concurrency first (the target is at 64)
        del slm
        for row in sorted(doc["levels"], key=lambda r: -r["concurrency"]):
            c = row["concurrency"]
            if "continuous" not in row:
                continue
            if left() < 60:
                doc["skipped"].append(f"torch.compile at concurrency {c}: less than 60 s of budget left")
                continue
            try:
                row["torch_compile_static"] = metered(f"torch.compile c={c}", lambda: run_torch_compile(
                    dec, dtype or torch.float32, device, workloads[c], min(c, args.max_batch), args.max_seq,
                    limit(0.5)))
                a, b = row["continuous"]["throughput_tok_s"], row["torch_compile_static"]["throughput_tok_s"]
                row["speedup_vs_torch_compile"] = round(a / b, 3) if a and b else None
            except Exception as e:  # noqa: BLE001  a failing baseline is reported, not fatal
                row["torch_compile_error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"c={c} torch.compile {row.get('torch_compile_static') or row.get('torch_compile_error')}")
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
