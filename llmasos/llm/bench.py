"""Decode benchmark: KV-cache generation tokens/s, ours against PyTorch on the same model, in the same run.

Used by ``bench/decode.py`` and ``llmasos bench``. For each model (a decoder preset of llmasos/llm/presets.py with
random weights, seed 0) and batch size:
  * torch eager: the static-KV-cache Decoder (mode="torch", gpt-fast style: in-place cache writes, SDPA with
    the causal cache mask), greedy, argmax on the device, no host sync per token;
  * torch.compile(mode="reduce-overhead", fullgraph=True) of the same decode step (CUDA graphs);
  * llmasos: compile_lm(same weights, batch=B static, CUDA graph on CUDA), greedy generate();
  * roofline: decode tokens/s if every step read the weights exactly once at the measured copy bandwidth:
    batch * bandwidth / weight bytes (a gathered embedding table counts only when it is also the output head).
Decode tokens/s = batch * (new - 1) / time of the decode steps (the prefill is timed separately).
Energy (when ``run(..., meter=llmasos.energy.measure)``; bench/decode.py --energy, bench/energy_gpu.py): the
torch baselines' timed generations run inside one window each (J/token = joules / tokens generated, prefill
included); ours read ``lm.last_stats.energy`` (the same window per generation, set by llmasos.energy).
Greedy agreement: per row, the length of the common prefix of our tokens and torch eager's (fp16 sums in
different orders diverge eventually; fp32 must agree), and max |logits diff| after the prefill.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback

import llmasos

from .presets import decoder_config


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def copy_bandwidth(spec) -> float:
    """Bytes/s of the target's memory (Target.measure_bandwidth: a large device-to-device copy, read +
    write, on the CPU and CUDA), nan when the target cannot tell."""
    bw = spec.measure_bandwidth()
    return float("nan") if bw is None else bw


def _sync(device):
    import torch  # deferred: torch (the CLI imports this module for every command)
    backend = getattr(torch, torch.device(device).type, None)  # torch.cuda, torch.cpu, ...
    if hasattr(backend, "synchronize"):
        backend.synchronize()


def weight_bytes(dec) -> int:
    """Bytes one decode step must read: every parameter once, except gathered tables (rows only)."""
    seen, total = set(), 0
    gathered = {id(dec.embed.weight)} if not dec.cfg.tie_embeddings else set()
    if dec.wpe is not None:
        gathered.add(id(dec.wpe.weight))
    for p in dec.parameters():
        if id(p) in seen or id(p) in gathered:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def torch_generate(model, prompt, new, step=None):
    """Greedy: (tokens [B, new], first-step logits, prefill_s, decode_s) with the torch-mode Decoder."""
    import torch  # deferred: torch (the CLI imports this module for every command)
    B, P = prompt.shape
    dev = prompt.device
    step = model if step is None else step
    t0 = time.perf_counter()
    with torch.no_grad():
        logits0 = model(prompt, torch.zeros(B, dtype=torch.int32, device=dev),
                        torch.full((B,), P - 1, dtype=torch.int64, device=dev))
        tok = logits0.argmax(-1)
        _sync(dev.type)
        t1 = time.perf_counter()
        out = [tok]
        last = torch.zeros(B, dtype=torch.int64, device=dev)
        for i in range(new - 1):
            pos = torch.full((B,), P + i, dtype=torch.int32, device=dev)
            tok = step(tok[:, None], pos, last).argmax(-1)
            out.append(tok)
        _sync(dev.type)
        t2 = time.perf_counter()
    return torch.stack(out, 1), logits0.float(), t1 - t0, t2 - t1


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed(meter, label: str, tokens: int, fn):
    """fn() inside meter(label) (an energy window factory) when given: (result, window dict or None)."""
    if meter is None:
        return fn(), None
    with meter(label) as w:
        out = fn()
    w.tokens = tokens
    return out, w.as_dict()


def _energy_cols(row: dict, key: str, windows: list) -> None:
    ws = [w for w in windows if w and "error" not in w and w.get("tokens")]
    if ws:
        jpt = _median([w["joules"] / w["tokens"] for w in ws])
        row[f"{key}_j_per_token"] = jpt
        row[f"{key}_active_j_per_token"] = _median([w["active_joules"] / w["tokens"] for w in ws])
        row[f"{key}_avg_w"] = _median([w["watts"] for w in ws])
        row[f"{key}_energy_estimated"] = any(w["estimated"] for w in ws)


def run_model(name: str, target, *, batches=(1,), prompt_len=128, new=128, dtype="f16", int4=False,
              passes="fuse", compile_baseline=True, repeat=3, bandwidth=None, tune_trials=0, int8=False,
              meter=None, ab_targets=()) -> list:
    """One JSON-able row per batch size for preset ``name`` (see the module docstring). tune_trials > 0 adds
    a ``llmasos_tuned`` variant: tune_lm with that many MetaSchedule trials per kernel (same options, a
    temporary database), then compile_lm with the database. ``ab_targets``: (key, Target) pairs, each one more
    f16 variant ``key`` compiled for that Target (the same weights and prompt: an A/B of target options)."""
    # deferred: torch, TVM and the Decoder (torch) -- the CLI imports this module for every command
    import torch

    from ..backends.tvm import resolve_target
    from .model import Decoder

    spec = resolve_target(target)
    device = spec.torch_device
    tdtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    bw = bandwidth or copy_bandwidth(spec)
    cfg = decoder_config(name)
    max_seq = prompt_len + new
    rows = []
    # drawn once, on the device (a CPU draw of 1B weights takes a minute); ours compiles a CPU copy of them
    tmodel = Decoder.random(cfg, mode="torch", seed=0, dtype=tdtype, device=device)
    wbytes = weight_bytes(tmodel)
    for B in batches:
        row = {"model": name, "batch": B, "dtype": dtype, "prompt": prompt_len, "new": new, "weight_bytes": wbytes,
               "roofline_tok_s": B * bw / wbytes}
        gen = torch.Generator(device="cpu").manual_seed(B)
        prompt = torch.randint(0, cfg.vocab, (B, prompt_len), generator=gen).to(device)
        # -- torch eager
        tmodel.setup_caches(B, max_seq, tdtype, device)
        torch_generate(tmodel, prompt, 4)
        ts, w = _timed(meter, "torch_eager", repeat * B * new,
                       lambda: [torch_generate(tmodel, prompt, new) for _ in range(repeat)])
        _energy_cols(row, "torch_eager", [w])
        ref_tokens, ref_logits0 = ts[0][0], ts[0][1]
        row["torch_eager_tok_s"] = B * (new - 1) / _median([t[3] for t in ts])
        log(f"[decode] {name} b{B} torch eager {row['torch_eager_tok_s']:.1f} tok/s")
        # -- torch.compile reduce-overhead
        if compile_baseline:
            try:
                step = torch.compile(tmodel, mode="reduce-overhead", fullgraph=True)
                t0 = time.perf_counter()
                torch_generate(tmodel, prompt, 4, step)
                torch_generate(tmodel, prompt, 4, step)
                row["torch_compile_warmup_s"] = time.perf_counter() - t0
                ts, w = _timed(meter, "torch_compile", repeat * B * new,
                               lambda: [torch_generate(tmodel, prompt, new, step) for _ in range(repeat)])
                _energy_cols(row, "torch_compile", [w])
                row["torch_compile_tok_s"] = B * (new - 1) / _median([t[3] for t in ts])
                log(f"[decode] {name} b{B} torch.compile {row['torch_compile_tok_s']:.1f} tok/s")
            except Exception as e:  # noqa: BLE001 -- a baseline failing is reported, not fatal
                row["torch_compile_error"] = f"{type(e).__name__}: {e}"[:1000]
            torch._dynamo.reset()
        # -- ours
        variants = [("llmasos", passes, False, spec)]
        variants += [(key, passes, False, s) for key, s in ab_targets]
        if tune_trials > 0:
            variants.append(("llmasos_tuned", passes, True, spec))
        if int8:
            variants.append(("llmasos_int8", "quantize{bits=8}," + passes, False, spec))
        if int4:
            variants.append(("llmasos_int4_g128", "quantize{bits=4,group=128}," + passes, False, spec))
        for key, pipe, tuned, vspec in variants:
            try:
                t0 = time.perf_counter()
                dec = tmodel.copy_as("export", "cpu")
                opts = dict(max_seq=max_seq, batch=B, passes=pipe)
                db = None
                if tuned:
                    db = tempfile.mkdtemp(prefix=f"llmasos-tune-{name}-b{B}-")
                    report = llmasos.tune_lm(dec, vspec, db, trials_per_task=tune_trials, log=log, **opts)
                    row[f"{key}_tuning"] = report.to_dict()
                    row[f"{key}_tune_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                lm = llmasos.compile_lm(dec, vspec, tuning_db=db, **opts)
                row[f"{key}_compile_s"] = time.perf_counter() - t0
                del dec
                ids = prompt.cpu().tolist()
                buf = lm._buffers_for(B)
                logits0, _ = lm.prefill(ids, buf)       # loads the kernels
                row[f"{key}_prefill_logits_max_diff"] = float(
                    (torch.from_dlpack(logits0).float().to(ref_logits0.device) - ref_logits0).abs().max())
                lm.generate(ids, 4)                     # captures the CUDA graph
                res = []
                for _ in range(repeat):
                    toks = lm.generate(ids, new)
                    res.append((toks, lm.last_stats))
                row[f"{key}_tok_s"] = _median([st.decode_tokens_per_s for _, st in res])
                row[f"{key}_prefill_s"] = _median([st.prefill_s for _, st in res])
                _energy_cols(row, key, [st.energy for _, st in res])
                ours = torch.tensor(res[0][0], device=ref_tokens.device)
                row[f"{key}_greedy_prefix_agree"] = (ours == ref_tokens).int().cumprod(1).sum(1).tolist()
                row[f"{key}_percent_roofline"] = 100 * row[f"{key}_tok_s"] / row["roofline_tok_s"]
                if "torch_compile_tok_s" in row:
                    row[f"{key}_vs_torch_compile"] = row[f"{key}_tok_s"] / row["torch_compile_tok_s"]
                row[f"{key}_vs_torch_eager"] = row[f"{key}_tok_s"] / row["torch_eager_tok_s"]
                log(f"[decode] {name} b{B} {key} {row[f'{key}_tok_s']:.1f} tok/s "
                    f"({row[f'{key}_percent_roofline']:.0f}% of roofline)")
                del lm
            except Exception as e:  # noqa: BLE001 -- one failing variant must not lose the others
                traceback.print_exc()
                row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:2000]
        rows.append(row)
        log(json.dumps(row))
    return rows


def run(models, target="cuda", **kw) -> dict:
    from ..backends.tvm import resolve_target  # deferred: TVM (the CLI imports this module for every command)
    spec = resolve_target(target)
    bw = copy_bandwidth(spec)
    doc = {"target": spec.name, "target_dict": spec.target, "copy_bandwidth_GBps": bw / 1e9, "rows": []}
    if spec.device_name():
        doc["gpu"] = spec.device_name()
    log(f"[decode] copy bandwidth {bw / 1e9:.0f} GB/s")
    out = kw.pop("out", None)
    int4 = set(kw.pop("int4_models", ()))
    int8 = set(kw.pop("int8_models", ()))
    for name in models:
        doc["rows"] += run_model(name, spec, int4=name in int4, int8=name in int8, bandwidth=bw, **kw)
        if out:
            with open(out, "w") as f:
                json.dump(doc, f, indent=1)
    return doc
