"""Energy per token on a GPU, read-only (issue 15), and the energy planner's pick there -- one run, one set of
compiles: J/token of a Llama-1B-shape decoder (random weights, preset llama-1b) for llmasos f16 / int8 /
int4-g128 x batch 1/8/32, torch eager and torch.compile(mode="reduce-overhead") of the same weights in the
same run, then the least-J/token configuration meeting a latency SLO and a perplexity budget against the
default configuration (f16, batch 1) -- the perplexity side read from a file measured on the CPU with the real
SmolLM2 weights (random weights have no meaningful perplexity).

    python bench/energy_gpu.py [--batches 1,8,32] [--pipelines f16,int8,int4-g128] [--prompt 128] [--new 64]
                               [--window-s 1.2] [--time-budget 200] [--tpot-ms 20] [--ttft-ms 200]
                               [--max-ppl-increase 0.01] [--accuracy-from bench/data/energy_accuracy_smollm2.json]
                               [--no-torch-compile] [--out energy_gpu.json] [--db energy.db --region USA --pue 1.1]

How, and why it fits a few minutes:
* every llmasos pipeline compiles ONCE, for any batch up to the largest (compile_lm batch=None: on CUDA the
  decode GEMMs stay symbolic, DLight's low-batch GEMVs), plus the default configuration's own build (f16 for
  batch 1, static shapes); these compiles run in parallel worker processes (this script with
  --compile-worker: the same seed-0 weights drawn on the GPU, compile_lm, save the artifact), while the parent
  warms torch eager and torch.compile -- one torch.compile'd step reused across the batches (a batch size it
  has not seen recompiles it once; their caches are kept per batch so the CUDA graphs stay valid);
* then, with no compile running, each configuration is measured: one warm generation (captures its CUDA
  graph, times it), then as many generations as fill --window-s inside one ``llmasos.energy.measure`` window
  over NVML's total-energy counter (zeus; torch.cuda.synchronize before each read). J/token = window joules /
  generated tokens (gross, idle included; the active part beside it); idle power measured first (2 s);
* --time-budget: a compile not finished in time is stopped, a measurement that would not fit is skipped; both
  are listed in "skipped" with the reason, nothing is silently left out.
Correctness against torch itself: per llmasos row, max |prefill logits - torch eager's| (same weights) and the
greedy-token agreement with torch eager; f16 must agree within 2% of the logits' range ("correct").
Nothing changes a GPU setting: the power limit is read (and printed) only.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _energy_common as common  # noqa: E402
from _target_options import bad_options, with_options  # noqa: E402

TORCH_DTYPES = ("f16", "f32", "bf16")
F16_REL_TOL = 0.02   # f16 prefill logits vs torch eager: max |diff| <= 2% of max |logit|


class Budget:
    """Wall-clock budget from ``start``; None = unlimited. ``skipped`` lists what did not fit and why."""

    def __init__(self, seconds, start=None):
        if seconds is not None and not seconds > 0:
            raise SystemExit(f"error: --time-budget must be > 0 seconds, got {seconds!r}")
        self.seconds = seconds
        self.start = time.perf_counter() if start is None else start
        self.skipped = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def fits(self, what: str, need_s: float) -> bool:
        """True if ``need_s`` more seconds fit; else records ``what`` as skipped and returns False."""
        left = self.left()
        if need_s <= left:
            return True
        self.skipped.append({"what": what, "why": f"time budget: {max(0.0, left):.1f} s of {self.seconds:g} s "
                                                  f"left, needs ~{need_s:.1f} s"})
        return False


def measure_plan(budget: Budget, configs: list, window_s: float) -> list:
    """The configurations (dicts with "what" and "gen_s": one generation's seconds, None if not known yet)
    that fit the budget in order, each needing ~ 2 generations + the window + 0.5 s; the rest are recorded
    as skipped. (The decision is made as the run goes; this is the same rule on estimates, for tests.)"""
    out, t = [], 0.0
    for c in configs:
        need = window_s + 2 * (c.get("gen_s") or 0.5) + 0.5
        if budget.fits(c["what"], t + need):
            out.append(c)
            t += need
    return out


# -- the compile worker -------------------------------------------------------------------------------------
def compile_worker(job: dict) -> dict:
    """Draw the preset's seed-0 weights (on the device: the same numbers as the parent's), compile one
    pipeline with compile_lm and save it. Returns its timings."""
    import torch

    import llmasos
    from llmasos.backends.tvm import resolve_target
    from llmasos.energy.planner import PIPELINES
    from llmasos.llm.model import Decoder
    from llmasos.llm.presets import decoder_config

    t0 = time.perf_counter()
    spec = resolve_target(job["target"])
    spec = with_options(spec, job.get("target_options", ()))
    tdtype = getattr(torch, {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}[job["dtype"]])
    tm = Decoder.random(decoder_config(job["model"]), mode="torch", seed=0, dtype=tdtype, device=spec.torch_device)
    dec = tm.copy_as("export", "cpu")
    del tm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pipe = PIPELINES[job["pipeline"]]
    passes = f"{pipe},fuse" if pipe else "fuse"
    t1 = time.perf_counter()
    lm = llmasos.compile_lm(dec, spec, max_seq=job["max_seq"], max_batch=job["max_batch"], batch=job["batch"],
                            passes=passes)
    t2 = time.perf_counter()
    lm.save(job["path"])
    return {"pipeline": job["pipeline"], "passes": passes, "batch": job["batch"], "max_batch": job["max_batch"],
            "draw_s": t1 - t0, "compile_s": t2 - t1, "save_s": time.perf_counter() - t2,
            "timings": {k: v for k, v in lm.timings.items() if isinstance(v, (int, float))}}


def _start_workers(jobs: list, tmp: str) -> list:
    procs = []
    for job in jobs:
        errf = open(os.path.join(tmp, f"{job['name']}.log"), "w")
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--compile-worker", json.dumps(job)],
                             stdout=subprocess.PIPE, stderr=errf, text=True)
        procs.append((job, p, errf))
    return procs


def _collect(procs: list, budget: Budget, reserve_s: float) -> dict:
    """{job name: worker result dict} -- a worker still running when only ``reserve_s`` of the budget is left
    is stopped (and listed as skipped); a failed one gives {"error": ...}."""
    out = {}
    pending = list(procs)
    while pending:
        for item in list(pending):
            job, p, errf = item
            if p.poll() is None:
                continue
            pending.remove(item)
            errf.close()
            text = p.stdout.read()
            try:
                out[job["name"]] = json.loads(text.strip().splitlines()[-1])
            except (ValueError, IndexError):
                with open(errf.name) as f:
                    tail = f.read()[-1500:]
                out[job["name"]] = {"error": f"compile worker exited {p.returncode}: {tail}"}
        if pending and budget.left() < reserve_s:
            for job, p, errf in pending:
                p.kill()
                p.wait()
                errf.close()
                out[job["name"]] = {"error": "stopped: did not finish within the time budget"}
                budget.skipped.append({"what": f"compile {job['name']}",
                                       "why": f"time budget: still compiling at {budget.elapsed():.0f} s "
                                              f"(kept {reserve_s:.0f} s for measuring)"})
            pending = []
        if pending:
            time.sleep(0.2)
    return out


# -- measuring -----------------------------------------------------------------------------------------------
def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _window_runs(meter, label, gen, once_s, window_s, tokens_per_gen, max_runs=200):
    """gen() n times in one energy window, n filling ``window_s`` at ``once_s`` per generation: (window
    dict, [results])."""
    n = int(min(max_runs, max(1, math.ceil(window_s / max(once_s, 1e-4)))))
    res = []
    with meter(label) as w:
        for _ in range(n):
            res.append(gen())
    w.tokens = n * tokens_per_gen
    return w.as_dict(), res


def _energy(row: dict, w: dict) -> None:
    if w is None or "error" in w:
        row["energy_error"] = (w or {}).get("error", "no window")
        return
    row.update({"joules": w["joules"], "j_per_token": w["joules"] / w["tokens"],
                "active_j_per_token": w["active_joules"] / w["tokens"], "avg_w": w["watts"],
                "window_s": w["seconds"], "window_tokens": w["tokens"], "estimated": w["estimated"]})


def _plan_row(row: dict) -> dict:
    """The planner's view of a measured llmasos row."""
    return {"pipeline": row["pipeline"], "batch": row["batch"], "build": row.get("build"),
            "tokens_per_s": row["tok_s"], "ttft_ms": row["ttft_ms"], "tpot_ms": row["tpot_ms"],
            "joules_per_token": row["j_per_token"], "active_joules_per_token": row["active_j_per_token"],
            "watts": row["avg_w"], "estimated": row["estimated"], "ppl_increase": row.get("ppl_increase")}


def make_plan(rows: list, incs, acc_source, slo: dict, accuracy: dict, base_pipe: str, min_batch: int):
    """The planner's choice among the measured llmasos rows (llmasos.energy.planner.select) against the default
    configuration (``base_pipe`` at the smallest batch, on its own batch-1 build when there is one), the
    perplexity increases ``incs`` ({pipeline: fraction}) measured elsewhere."""
    from llmasos.energy.planner import key, select
    if incs is None:
        return {"error": "no accuracy side: pass --accuracy-from (perplexity of random weights means nothing)"
                         + (f"; --accuracy-from {acc_source}" if acc_source else "")}
    prs = [dict(_plan_row(r), ppl_increase=incs.get(r["pipeline"])) for r in rows
           if r.get("pipeline") and "j_per_token" in r]
    cands = [r for r in prs if r["pipeline"] == base_pipe and r["batch"] == min_batch]
    dflt = next((r for r in cands if r["build"] == "batch=1"), cands[0] if cands else None)
    if dflt is None:
        return {"error": f"the default configuration ({base_pipe}, batch {min_batch}) was not measured"}
    notes = []
    front, choice, dflt = select(prs, slo, accuracy, dflt, notes)
    plan = {"slo": slo, "accuracy": accuracy, "accuracy_from": acc_source,
            "default": key(dflt), "choice": key(choice) if choice else None,
            "pareto": [key(r) for r in front], "notes": notes,
            "default_j_per_token": dflt["joules_per_token"],
            "choice_j_per_token": choice["joules_per_token"] if choice else None,
            "ratio": choice["joules_per_token"] / dflt["joules_per_token"] if choice else None,
            "saving": 1 - choice["joules_per_token"] / dflt["joules_per_token"] if choice else None,
            "target_saving": 0.30,
            "rows": [{"config": key(r), **{k: r[k] for k in ("tokens_per_s", "ttft_ms", "tpot_ms",
                                                              "joules_per_token", "ppl_increase", "misses",
                                                              "pareto")}} for r in prs]}
    if choice:
        plan["meets_target"] = plan["saving"] >= 0.30 and not choice["misses"] and not dflt["misses"]
    return plan


def replan(path: str, a) -> dict:
    """--replan: the plan of an earlier run's JSON (its measured rows) with this run's budget and accuracy file,
    on any machine (no GPU: nothing is measured)."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise SystemExit(f"error: --replan {path}: not a bench/energy_gpu.py result (no 'rows' list)")
    dtype = doc.get("dtype", a.dtype)
    slo, accuracy = common.budget(a)
    incs, source = common.accuracy_from(a, dtype)
    pipes = {r["pipeline"] for r in doc["rows"] if r.get("pipeline")}
    base = {"f16": "f16", "f32": "f32"}.get(dtype) or sorted(pipes)[0]
    batches = [r["batch"] for r in doc["rows"] if r.get("pipeline") == base]
    doc["plan"] = make_plan(doc["rows"], incs, source, slo, accuracy, base, min(batches) if batches else 1)
    doc["replanned"] = {"from": path, "command": " ".join(sys.argv)}
    return doc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--target", default="cuda")
    p.add_argument("--dtype", default="f16", choices=TORCH_DTYPES, help="weights (f32 for a CPU smoke run)")
    common.add_sweep_args(p, "f16,int8,int4-g128", "1,8,32")
    p.set_defaults(prompt=128, new=64)
    common.add_budget_args(p)
    p.set_defaults(tpot_ms=20.0, ttft_ms=200.0, accuracy_from=common.ACCURACY_FILE)
    p.add_argument("--window-s", type=float, default=1.2, help="seconds of generation per energy window")
    p.add_argument("--time-budget", type=float, default=200.0, help="seconds for the whole run (0: none)")
    p.add_argument("--no-torch-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-static-default", action="store_true",
                   help="measure the default (f16, batch 1) on the shared build instead of its own batch-1 build")
    p.add_argument("--replan", default=None, metavar="JSON",
                   help="no measuring: recompute the plan of an earlier run's JSON with this budget/accuracy file")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the llmasos target for every compile (e.g. small_m_quant_gemm=on)")
    p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    common.add_db_args(p, "USA")
    a = p.parse_args(argv)
    if a.compile_worker is not None:          # a child: compile one pipeline, print its timings as JSON
        print(json.dumps(compile_worker(json.loads(a.compile_worker))), flush=True)
        return None
    if a.replan:
        doc = replan(a.replan, a)
        common.emit(doc, a.out)
        return doc
    bad_opts = bad_options(a.target_option)
    if bad_opts:
        raise SystemExit(f"error: --target-option takes KEY=VALUE, got {bad_opts}")
    budget = Budget(a.time_budget or None)
    log = common.log

    from llmasos.energy.planner import PIPELINES
    batches = sorted(set(common.int_list(a.batches, "--batches")))
    pipelines = [x for x in a.pipelines.split(",") if x]
    bad = [x for x in pipelines if x not in PIPELINES]
    if bad or not pipelines:
        raise SystemExit(f"error: unknown pipeline(s) {bad or pipelines}; allowed: {', '.join(PIPELINES)}")
    from llmasos.energy.planner import PIPELINE_DTYPES
    odd = [x for x in pipelines if PIPELINE_DTYPES.get(x, a.dtype) != a.dtype]
    if odd:
        raise SystemExit(f"error: pipeline(s) {odd} name their own weight dtype, not --dtype {a.dtype}: "
                         f"leave them out or pass --dtype {PIPELINE_DTYPES[odd[0]]}")
    if a.window_s <= 0 or a.prompt < 1 or a.new < 2:
        raise SystemExit("error: --window-s must be > 0, --prompt >= 1 and --new >= 2")
    from llmasos.energy import EnergyError
    from llmasos.energy.planner import check_budget
    try:
        slo, accuracy = check_budget(*common.budget(a))
    except EnergyError as e:
        raise SystemExit(f"error: {e}") from None
    base_pipe = {"f16": "f16", "f32": "f32"}.get(a.dtype, pipelines[0])
    try:
        incs, acc_source = common.accuracy_from(a, a.dtype)
    except EnergyError as e:        # the measurements are worth having anyway; the plan says why it is missing
        incs, acc_source = None, f"unreadable: {e}"
        common.log(f"warning: --accuracy-from: {e}; measuring without a plan (--replan can add it later)")
    if incs is not None:
        # the uncompressed pipeline in this dtype is named after it ("f16"); on f32 weights that is "f32"
        missing = [x for x in pipelines if x not in incs]
        if missing:
            raise SystemExit(f"error: --accuracy-from {a.accuracy_from} has no perplexity increase for "
                             f"{', '.join(missing)} ({a.dtype} weights; it has {', '.join(sorted(incs))})")

    import torch

    import llmasos
    import llmasos.energy as energy
    from llmasos.backends.tvm import resolve_target
    from llmasos.llm.bench import torch_generate, weight_bytes
    from llmasos.llm.model import Decoder
    from llmasos.llm.presets import decoder_config

    spec = resolve_target(a.target)
    device = spec.torch_device
    tdtype = getattr(torch, {"f16": "float16", "f32": "float32", "bf16": "bfloat16"}[a.dtype])
    cfg = decoder_config(a.model)
    max_seq, max_b = a.prompt + a.new, max(batches)

    disc = energy.discover()
    if not any(m.name.startswith("gpu") for m in disc.meters):
        log(f"warning: no GPU energy meter ({disc.notes}); the figures will be CPU-only")
    idle = energy.calibrate_idle(seconds=2.0 if spec.name == "cuda" else 0.2)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def meter(label):
        return energy.measure(label, idle="cached", sync=sync)

    limit = None
    try:
        from llmasos.energy.power import real_gpu
        g = real_gpu(0)
        limit = {"current_w": g.get_power_management_limit() / 1000,
                 "range_w": [x / 1000 for x in g.get_power_management_limit_constraints()]}
    except Exception as e:  # noqa: BLE001 -- informational only
        limit = {"error": f"{type(e).__name__}: {e}"}

    # -- phase A: the llmasos compiles in parallel workers; torch warms up meanwhile
    tmp = tempfile.mkdtemp(prefix="llmasos-energy-gpu-")
    jobs = [{"name": x, "pipeline": x, "batch": None, "max_batch": max_b} for x in pipelines]
    static_default = (not a.no_static_default and 1 in batches and max_b > 1 and base_pipe in pipelines)
    if static_default:
        jobs.insert(0, {"name": f"{base_pipe}-b1", "pipeline": base_pipe, "batch": 1, "max_batch": 1})
    for j in jobs:
        j.update(model=a.model, target=a.target, dtype=a.dtype, max_seq=max_seq, target_options=a.target_option,
                 path=os.path.join(tmp, j["name"] + ".llmasos"))
    t0 = time.perf_counter()
    procs = _start_workers(jobs, tmp)
    log(f"[energy-gpu] {len(jobs)} compile workers started: {', '.join(j['name'] for j in jobs)}")

    tmodel = Decoder.random(cfg, mode="torch", seed=0, dtype=tdtype, device=device)
    wbytes = weight_bytes(tmodel)
    prompts, refs, caches = {}, {}, {}
    step = None
    compile_error = None
    if not a.no_torch_compile:
        try:
            step = torch.compile(tmodel, mode="reduce-overhead", fullgraph=True)
        except Exception as e:  # noqa: BLE001 -- a missing/broken torch.compile is reported, not fatal
            compile_error = f"{type(e).__name__}: {e}"[:500]
    warm = {}
    for B in batches:
        gen = torch.Generator(device="cpu").manual_seed(B)
        prompts[B] = torch.randint(0, cfg.vocab, (B, a.prompt), generator=gen).to(device)
        tmodel.setup_caches(B, max_seq, tdtype, device)
        caches[B] = [(blk.attn.k_cache, blk.attn.v_cache) for blk in tmodel.blocks]
        toks, logits0, _, _ = torch_generate(tmodel, prompts[B], a.new)           # the reference (and a warm-up)
        refs[B] = (toks, logits0)
        if step is not None and compile_error is None and budget.left() > 60:
            try:
                tc = time.perf_counter()
                torch_generate(tmodel, prompts[B], 4, step)
                torch_generate(tmodel, prompts[B], 4, step)
                warm[B] = time.perf_counter() - tc
                log(f"[energy-gpu] torch.compile b{B} warm in {warm[B]:.1f} s")
            except Exception as e:  # noqa: BLE001
                compile_error = f"{type(e).__name__}: {e}"[:500]
        elif step is not None and compile_error is None:
            budget.skipped.append({"what": f"torch.compile b{B}", "why": "time budget: < 60 s left for its "
                                                                         "compile"})
    # keep ~ what measuring needs: (configs) x (window + warm-up)
    # keep what measuring the llmasos rows needs (loads + windows); the torch rows come after them and are
    # skipped first when time runs out
    n_cfg = len(batches) * len(pipelines) + (1 if static_default else 0)
    reserve = n_cfg * (a.window_s + 1.0) + 4 * len(jobs) + 5
    built = _collect(procs, budget, reserve)
    compile_wall = time.perf_counter() - t0
    log(f"[energy-gpu] compiles done in {compile_wall:.0f} s: " +
        ", ".join(f"{k} {v.get('compile_s', float('nan')):.0f} s" if "error" not in v else f"{k} FAILED"
                  for k, v in built.items()))

    def set_caches(B):
        for blk, (k, v) in zip(tmodel.blocks, caches[B]):
            blk.attn.register_buffer("k_cache", k, persistent=False)
            blk.attn.register_buffer("v_cache", v, persistent=False)

    # -- phase B: measure, nothing compiling
    rows = []

    def snapshot():
        _finish(a, spec, disc, idle, limit, wbytes, compile_error, built, compile_wall, rows, budget, incs,
                acc_source, slo, accuracy, base_pipe, batches, final=False)

    def torch_row(variant, B, fn):
        row = {"variant": variant, "batch": B}
        once = fn()                                  # warm (re-records a CUDA graph if needed) and time it
        gen_s = once[2] + once[3]
        if not budget.fits(f"{variant} b{B}", a.window_s + gen_s + 0.5):
            return
        w, res = _window_runs(meter, f"{variant} b{B}", fn, gen_s, a.window_s, B * a.new)
        _energy(row, w)
        row["tok_s"] = B * a.new / _median([r[2] + r[3] for r in res])
        row["decode_tok_s"] = B * (a.new - 1) / _median([r[3] for r in res])
        row["ttft_ms"] = 1e3 * _median([r[2] for r in res])
        row["tpot_ms"] = 1e3 * _median([r[3] for r in res]) / (a.new - 1)
        row["runs"] = len(res)
        rows.append(row)
        snapshot()
        log(f"[energy-gpu] {variant} b{B}: {row.get('j_per_token', float('nan')):.4g} J/token, "
            f"{row['decode_tok_s']:.0f} decode tok/s")

    # llmasos first (the plan's rows; the default configuration's build first), then the torch baselines
    for job in jobs:
        res = built.get(job["name"], {"error": "not built"})
        label = f"llmasos {job['pipeline']}" + (" (batch-1 build)" if job["batch"] == 1 else "")
        if "error" in res:
            rows.append({"variant": label, "error": res["error"][-1500:]})
            continue
        if not budget.fits(f"load {job['name']}", 5 + a.window_s):
            continue
        tl = time.perf_counter()
        try:
            lm = llmasos.load_lm(job["path"])
        except Exception as e:  # noqa: BLE001 -- reported, the other builds still measured
            rows.append({"variant": label, "error": f"loading the artifact: {type(e).__name__}: {e}"[:1500]})
            continue
        load_s = time.perf_counter() - tl
        for B in ([1] if job["batch"] == 1 else batches):
            row = {"variant": label, "pipeline": job["pipeline"], "batch": B, "passes": res["passes"],
                   "build": "batch=1" if job["batch"] == 1 else f"batch<={max_b}", "compile_s": res["compile_s"],
                   "load_s": load_s}
            ids = prompts[B].cpu().tolist()
            try:
                logits0, _ = lm.prefill(ids, lm._buffers_for(B))
                ref_toks, ref_logits = refs[B]
                diff = float((torch.from_dlpack(logits0).float().to(ref_logits.device) - ref_logits).abs().max())
                row["prefill_logits_max_diff"] = diff
                row["prefill_logits_rel_diff"] = diff / max(float(ref_logits.abs().max()), 1e-9)
                if job["pipeline"] in ("f16", "f32"):
                    row["correct"] = row["prefill_logits_rel_diff"] <= F16_REL_TOL
                lm.generate(ids, 4)                                 # captures the CUDA graph
                tg = time.perf_counter()
                toks = lm.generate(ids, a.new)
                gen_s = time.perf_counter() - tg
                ours = torch.tensor(toks, device=ref_toks.device)
                row["greedy_prefix_agree"] = (ours == ref_toks).int().cumprod(1).sum(1).tolist()
                if not budget.fits(f"{label} b{B}", a.window_s + gen_s + 0.5):
                    continue

                def gen():
                    lm.generate(ids, a.new)
                    return lm.last_stats
                w, stats = _window_runs(meter, f"{label} b{B}", gen, gen_s, a.window_s, B * a.new)
                _energy(row, w)
                row["tok_s"] = B * a.new / _median([st.prefill_s + st.decode_s for st in stats])
                row["decode_tok_s"] = _median([st.decode_tokens_per_s for st in stats])
                row["ttft_ms"] = 1e3 * _median([st.prefill_s for st in stats])
                row["tpot_ms"] = 1e3 * _median([st.decode_s / max(1, st.steps) for st in stats])
                row["runs"] = len(stats)
                rows.append(row)
                snapshot()
                log(f"[energy-gpu] {label} b{B}: {row.get('j_per_token', float('nan')):.4g} J/token, "
                    f"{row['decode_tok_s']:.0f} decode tok/s, logits diff {diff:.3g}")
            except Exception as e:  # noqa: BLE001 -- one failing configuration must not lose the others
                row["error"] = f"{type(e).__name__}: {e}"[:1500]
                rows.append(row)
        del lm
    shutil.rmtree(tmp, ignore_errors=True)        # the artifacts (GBs for Llama-1B) are no longer needed

    for B in batches:
        set_caches(B)
        torch_row(f"torch eager {a.dtype}", B, lambda: torch_generate(tmodel, prompts[B], a.new))
    if step is not None and compile_error is None:
        for B in batches:
            if B not in warm:
                continue
            set_caches(B)
            try:
                torch_row(f"torch.compile reduce-overhead {a.dtype}", B,
                          lambda: torch_generate(tmodel, prompts[B], a.new, step))
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": f"torch.compile reduce-overhead {a.dtype}", "batch": B,
                             "error": f"{type(e).__name__}: {e}"[:500]})

    return _finish(a, spec, disc, idle, limit, wbytes, compile_error, built, compile_wall, rows, budget, incs,
                   acc_source, slo, accuracy, base_pipe, batches, final=True)


def _finish(a, spec, disc, idle, limit, wbytes, compile_error, built, compile_wall, rows, budget, incs,
            acc_source, slo, accuracy, base_pipe, batches, final):
    """The JSON document; ``final``: print it (and record --db); else only write --out (a snapshot after each
    row, so a run killed from outside still leaves what it measured)."""
    import llmasos.energy as energy
    table = {}
    for r in rows:
        if "batch" in r and "j_per_token" in r:
            table.setdefault(r["variant"], {})[r["batch"]] = {
                k: r.get(k) for k in ("j_per_token", "active_j_per_token", "avg_w", "decode_tok_s", "tok_s",
                                      "tpot_ms", "ttft_ms", "estimated")}
    plan = make_plan(rows, incs, acc_source, slo, accuracy, base_pipe, min(batches))
    out = {"what": "J/token (gross, idle included; active beside it), same run, NVML energy counter, read-only",
           "gpu": spec.device_name(), "target": spec.name, "target_options": a.target_option, "model": f"{a.model} shape, random weights (seed 0)",
           "dtype": a.dtype, "weight_bytes": wbytes, "prompt": a.prompt, "new": a.new, "window_s": a.window_s,
           "idle_w": idle, "power_limit": limit,
           "meters": [{"name": m.name, "method": m.method, "estimated": m.estimated} for m in disc.meters],
           "notes": disc.notes, "torch_compile_error": compile_error,
           "compiles": {k: {kk: v.get(kk) for kk in ("compile_s", "draw_s", "save_s", "error")}
                        for k, v in built.items()},
           "compile_wall_s": compile_wall, "table": table, "plan": plan, "rows": rows,
           "correct": all(r.get("correct", True) for r in rows) and any("correct" in r for r in rows),
           "skipped": budget.skipped, "time_budget_s": budget.seconds, "seconds": budget.elapsed()}
    if not final:
        if a.out:
            out["partial"] = "a snapshot: the run had not finished when this was written"
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1, default=str)
        return out
    if a.db:
        led = energy.Ledger(a.db)
        for r in rows:
            if "joules" in r:
                led.record_run({"joules": r["joules"], "seconds": r["window_s"], "tokens": r["window_tokens"],
                                "estimated": bool(r["estimated"]), "idle_joules": 0.0,
                                "devices": {m.name: {"method": m.method} for m in disc.meters}},
                               model=a.model, variant=f"{r['variant']} b{r['batch']}", target=a.target,
                               region=a.region, pue=a.pue)
        led.close()
    common.emit(out, a.out)
    return out


if __name__ == "__main__":
    main()
