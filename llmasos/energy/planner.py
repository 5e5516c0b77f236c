"""The energy-aware configuration planner: the greenest configuration that meets a latency SLO and an
accuracy budget, searched over the knobs that touch no device setting.

    res = llmasos.plan_energy("smollm2", "cpu", slo={"tpot_ms": 200}, accuracy={"max_ppl_increase": 0.01},
                              pipelines=["f32", "int8"], batches=[1, 4], save="green.llmasos")
    res.pareto, res.choice, res.default, res.saving      # rows: tok/s, TTFT, TPOT, J/token, perplexity

Knobs: the compression pipeline (``PIPELINES``: f32, int8, int4-g128, 2:4 -- run before "fuse" by
compile_lm), the batch size (= concurrent requests), and on CUDA the decode step's CUDA graph. For each
pipeline the model is compiled once (for the largest batch) and each batch is generated under a
``llmasos.energy.measure`` window: J/token = window joules / generated tokens (idle subtracted and reported
separately; on a machine without counters every energy figure is the labelled CPU estimate), TTFT = the
prefill, TPOT = decode time / decode steps, tok/s = generated tokens / (prefill + decode).

Accuracy: perplexity on held-out text (``llmasos.eval``: the Lee corpus, evaluation split) of the model's IR
after the same compression pipeline (the graph path of bench/accuracy.py), relative to the uncompressed
model: ``max_ppl_increase`` 0.01 = at most 1% higher. With no tokenizer (a random preset) ``windows`` gives
the token ids to score.

The Pareto front is over (tok/s up, J/token down) among configurations meeting the accuracy budget; the
choice is the least J/token among those that also meet every SLO bound. ``default`` is the first pipeline at
batch 1 (compile_lm's defaults): ``saving`` = 1 - choice J/token / default J/token.

Left out of the sweep: AWQ/GPTQ int4 (they need calibration data, which compile_lm's LM graphs do not take;
int4-g128 here is round-to-nearest) and replicas (one process measures one replica; replicas scale tok/s and
power together, leaving J/token unchanged up to the idle share).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..eval import eval_text, perplexity, token_windows
from ..llm import compile_lm, presets
from ..passes.manager import PassManager
from ..zoo import load_smollm2
from .errors import EnergyError
from .ledger import Ledger
from .window import measure

# name -> pipeline run before compile_lm's fusion ("" = none)
PIPELINES = {
    "f32": "",
    "f16": "",                       # no compression, weights cast to float16 (the GPU default)
    "int8": "quantize{bits=8}",
    "int4-g128": "quantize{bits=4,group=128,method=rtn}",
    "int4-g32-asym": "quantize{bits=4,group=32,method=rtn,sym=false}",
    "2:4": "prune{method=magnitude,n=2,m=4}",
}
# pipelines that fix the weights' dtype (the others keep plan_energy's ``dtype``)
PIPELINE_DTYPES = {"f32": "f32", "f16": "f16"}
DTYPES = ("f32", "f16", "bf16")
SLO_KEYS = ("tpot_ms", "ttft_ms")


@dataclass
class PlanResult:
    rows: list                       # one dict per configuration
    pareto: list                     # the rows on the (tok/s, J/token) front, by J/token
    choice: Optional[dict]           # least J/token meeting SLO + accuracy (None: nothing meets them)
    default: dict                    # first pipeline, batch 1
    slo: dict
    accuracy: dict
    estimated: bool                  # energy figures are estimates (no counter on this machine)
    artifact: Optional[str] = None
    notes: list = field(default_factory=list)

    @property
    def saving(self) -> Optional[float]:
        """Fraction of the default configuration's J/token the choice saves."""
        if self.choice is None or not self.default["joules_per_token"] > 0:
            return None
        return 1.0 - self.choice["joules_per_token"] / self.default["joules_per_token"]

    def as_dict(self) -> dict:
        return {"rows": self.rows, "pareto": [_key(r) for r in self.pareto],
                "choice": _key(self.choice) if self.choice else None, "default": _key(self.default),
                "saving": self.saving, "slo": self.slo, "accuracy": self.accuracy, "estimated": self.estimated,
                "artifact": self.artifact, "notes": self.notes}


def _key(row: dict) -> str:
    return (f"{row['pipeline']}/b{row['batch']}" + ("" if row.get("cuda_graph", True) else "/nograph")
            + (f"/{row['build']}" if row.get("build") else ""))


key = _key


def check_budget(slo, accuracy) -> tuple:
    """(slo, accuracy) validated (unknown keys, non-positive bounds are EnergyErrors)."""
    return _check_budget(slo, accuracy)


def pareto_front(rows: Sequence[dict], x: str = "tokens_per_s", y: str = "joules_per_token") -> list:
    """Rows not dominated in (x up, y down), sorted by y."""
    out = []
    for r in rows:
        dominated = any(q[x] >= r[x] and q[y] <= r[y] and (q[x] > r[x] or q[y] < r[y]) for q in rows)
        if not dominated:
            out.append(r)
    return sorted(out, key=lambda r: (r[y], -r[x]))


def meets(row: dict, slo: dict, accuracy: dict) -> list:
    """Why ``row`` misses its budget ([] when it meets every bound)."""
    why = []
    for k in SLO_KEYS:
        if k in slo and not row[k] <= slo[k]:
            why.append(f"{k} {row[k]:.1f} > {slo[k]:g}")
    m = accuracy.get("max_ppl_increase")
    if m is not None:
        inc = row.get("ppl_increase")
        if inc is None or not inc <= m:
            why.append(f"perplexity +{100 * inc:.2f}% > {100 * m:g}%" if inc is not None else "perplexity unknown")
    return why


def select(rows: list, slo: dict, accuracy: dict, default: tuple, notes: Optional[list] = None) -> tuple:
    """(Pareto front, choice, default row) of measured ``rows`` (dicts with pipeline, batch, tokens_per_s,
    joules_per_token, tpot_ms, ttft_ms, ppl_increase): marks each row's ``misses`` and ``pareto``; the front
    is over the rows within the accuracy budget, the choice the least J/token meeting every bound (None if
    none does, with the reasons appended to ``notes``); ``default``: (pipeline, batch) of the default row, or
    that row itself."""
    slo, accuracy = _check_budget(slo, accuracy)
    ok = [r for r in rows if not any("perplexity" in w for w in meets(r, {}, accuracy))]
    front = pareto_front(ok)
    for r in rows:
        r["misses"] = meets(r, slo, accuracy)
        r["pareto"] = any(r is f for f in front)
    good = [r for r in rows if not r["misses"]]
    choice = min(good, key=lambda r: (r["joules_per_token"], -r["tokens_per_s"])) if good else None
    if isinstance(default, dict):
        dflt = next((r for r in rows if r is default), None)
        want = _key(default)
    else:
        dflt = next((r for r in rows if (r["pipeline"], r["batch"]) == tuple(default)), None)
        want = f"{default[0]}/b{default[1]}"
    if dflt is None:
        raise EnergyError(f"the default configuration {want} is not among the measured rows "
                          f"({', '.join(_key(r) for r in rows) or 'none'})")
    if choice is None and notes is not None:
        notes.append("no configuration meets the SLO and accuracy budget: " +
                     "; ".join(f"{_key(r)}: {', '.join(r['misses'])}" for r in rows))
    return front, choice, dflt


def load_accuracy(path, dtype: str = "f32") -> tuple:
    """({pipeline: perplexity increase (fraction)}, description) from a file measured elsewhere, for planning
    where perplexity cannot be measured (random weights on a GPU). Accepted forms (JSON):

    * ``bench/energy_plan.py --accuracy-only`` output: ``{"ppl_increase": {dtype: {pipeline: frac}}, ...}``
      -- the table of the weights' ``dtype`` is taken ("f16" for a float16 GPU run);
    * a flat ``{"ppl_increase": {pipeline: frac}}``;
    * a plan (``bench/energy_plan.py`` / ``PlanResult.as_dict()``): its rows' ``ppl_increase``.
    """
    try:
        with open(os.fspath(path)) as f:
            doc = json.load(f)
    except OSError as e:
        raise EnergyError(f"accuracy file {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise EnergyError(f"accuracy file {path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise EnergyError(f"accuracy file {path}: expected a JSON object, got {type(doc).__name__}")
    what = f"{path}"
    if isinstance(doc.get("ppl_increase"), dict):
        table = doc["ppl_increase"]
        if table and all(isinstance(v, dict) for v in table.values()):
            if dtype not in table:
                raise EnergyError(f"accuracy file {path} has perplexity increases for weights in "
                                  f"{', '.join(sorted(table))}, not {dtype!r}")
            table, what = table[dtype], f"{path} ({dtype} weights)"
    elif isinstance(doc.get("rows"), list):
        table = {}
        for r in doc["rows"]:
            if isinstance(r, dict) and "pipeline" in r and r.get("ppl_increase") is not None:
                table[r["pipeline"]] = r["ppl_increase"]
    else:
        raise EnergyError(f"accuracy file {path}: no 'ppl_increase' table and no plan 'rows' in it "
                          f"(keys: {', '.join(sorted(doc)) or 'none'})")
    out = {}
    for k, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise EnergyError(f"accuracy file {path}: perplexity increase of {k!r} must be a number, got {v!r}")
        out[str(k)] = float(v)
    if not out:
        raise EnergyError(f"accuracy file {path}: no perplexity increases in it")
    if doc.get("model"):
        what += f", measured on {doc['model']}"
    return out, what


def _check_budget(slo, accuracy) -> tuple:
    slo = dict(slo or {})
    accuracy = dict(accuracy or {})
    for k, v in slo.items():
        if k not in SLO_KEYS:
            raise EnergyError(f"unknown SLO key {k!r}; allowed: {', '.join(SLO_KEYS)} (milliseconds)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise EnergyError(f"SLO {k} must be a number of milliseconds > 0, got {v!r}")
    for k, v in accuracy.items():
        if k != "max_ppl_increase":
            raise EnergyError(f"unknown accuracy key {k!r}; allowed: max_ppl_increase (a fraction: 0.01 = 1%)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise EnergyError(f"max_ppl_increase must be a fraction >= 0 (0.01 = 1%), got {v!r}")
    return slo, accuracy


def _load(model, tokenizer):
    """(torch model, tokenizer, label): "smollm2" (llmasos.zoo), a decoder preset name (random weights, its
    Hugging Face model: llmasos.llm.presets.hf_model), or a model as given."""
    if isinstance(model, str):
        if model.lower() in ("smollm2", "smollm2-135m"):
            m, tok = load_smollm2(verbose=False)
            return m, tokenizer or tok, "SmolLM2-135M-Instruct"
        if model not in presets.names(decoders_only=True):
            raise EnergyError(f"plan_energy: model {model!r} is neither 'smollm2' nor a decoder preset "
                              f"({', '.join(presets.names(decoders_only=True))})")
        return presets.hf_model(model).eval(), tokenizer, f"{model} (random weights)"
    return model, tokenizer, type(model).__name__


def _perplexities(model, pipelines: dict, windows: np.ndarray, notes: list) -> dict:
    """{name: perplexity of the model's IR after the pipeline} (the graph path of bench/accuracy.py:
    GraphModule, the numpy reference for quantized ops)."""
    import torch  # deferred: torch

    from ..frontends.torch_export import import_module  # deferred: torch (torch.export)
    t0 = time.perf_counter()
    graph = import_module(model, (torch.from_numpy(windows[:1]),), max_batch=8, max_seq=windows.shape[1],
                          name="plan").graph
    out = {}
    for name, pipe in pipelines.items():
        g = PassManager(pipe).run(graph) if pipe else graph
        out[name] = perplexity(g, windows, batch=8)
    notes.append(f"perplexity: {len(windows)} held-out windows of {windows.shape[1]} tokens on the IR after each "
                 f"pipeline ({time.perf_counter() - t0:.0f} s)")
    return out


def _torch_dtype(name: Optional[str]):
    if name is None:
        return None
    import torch  # deferred: torch
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def measure_accuracy(model: Any = "smollm2", pipelines: Sequence[str] = ("f32", "int8", "int4-g128"),
                     dtypes: Sequence[str] = ("f32", "f16"), *, tokenizer=None, eval_windows: int = 8,
                     eval_window: int = 128, log=None) -> dict:
    """Perplexity of each pipeline on held-out text (the Lee corpus evaluation split, the graph path of
    bench/accuracy.py) for weights in each of ``dtypes``, and its increase over the uncompressed f32 model:
    the accuracy side of a plan measured where the real weights are (the CPU), for ``load_accuracy`` on a
    machine that runs only the shape. "f32"/"f16" in ``pipelines`` mean "no compression" in that dtype."""
    import torch  # deferred: torch

    from ..frontends.torch_export import import_module  # deferred: torch (torch.export)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown or not pipelines:
        raise EnergyError(f"unknown pipeline(s) {unknown or list(pipelines)}; allowed: {', '.join(PIPELINES)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise EnergyError(f"dtypes must be among {', '.join(DTYPES)}, got {list(dtypes)}")
    say = log or (lambda *_: None)
    m, tok, label = _load(model, tokenizer)
    if tok is None:
        raise EnergyError(f"measure_accuracy needs real text: {label} has no tokenizer")
    windows = token_windows(tok, eval_text(), window=eval_window)[:eval_windows]
    t_all = time.perf_counter()
    ppl: dict = {}
    for dt in dtypes:
        mm = m if dt == "f32" else copy.deepcopy(m).to(_torch_dtype(dt))   # the given model stays as it is
        graph = import_module(mm, (torch.from_numpy(windows[:1]),), max_batch=8, max_seq=windows.shape[1],
                              name="acc").graph
        ppl[dt] = {}
        for p in pipelines:
            if PIPELINE_DTYPES.get(p, dt) != dt:
                continue                                     # "f32" among f16 weights: not a thing
            t0 = time.perf_counter()
            g = PassManager(PIPELINES[p]).run(graph) if PIPELINES[p] else graph
            ppl[dt][p] = perplexity(g, windows, batch=8)
            say(f"[accuracy] {dt} {p}: perplexity {ppl[dt][p]:.4f} ({time.perf_counter() - t0:.0f} s)")
    base = ppl.get("f32", {}).get("f32")
    if base is None:
        raise EnergyError("measure_accuracy needs the f32 model as its reference: include 'f32' in both "
                          "pipelines and dtypes")
    return {"what": "perplexity on held-out text per weights dtype and compression pipeline; ppl_increase = "
                    "perplexity / perplexity(f32, no compression) - 1",
            "model": label, "text": "Lee corpus evaluation split (gensim lee_background.cor, llmasos.eval)",
            "windows": int(len(windows)), "window": int(windows.shape[1]),
            "predicted_tokens": int(len(windows) * (windows.shape[1] - 1)),
            "method": "the model's IR after each pipeline, run by GraphModule (bench/accuracy.py's graph path)",
            "pipelines": {p: PIPELINES[p] for p in pipelines}, "reference": "f32/f32",
            "perplexity": ppl,
            "ppl_increase": {dt: {p: v / base - 1 for p, v in t.items()} for dt, t in ppl.items()},
            "seconds": time.perf_counter() - t_all}


def plan_energy(model: Any, target: Any = "cpu", slo: Optional[dict] = None, accuracy: Optional[dict] = None, *,
                pipelines: Sequence[str] = ("f32", "int8", "int4-g128"), batches: Sequence[int] = (1, 4),
                cuda_graphs: Sequence[bool] = (True,), prompt_len: int = 32, new_tokens: int = 16,
                tokenizer=None, windows: Optional[np.ndarray] = None, eval_windows: int = 2,
                eval_window: int = 128, repeat: int = 1, save: Optional[str] = None,
                record: Optional[Ledger] = None, region: Any = "USA", pue: float = 1.0, log=None,
                dtype: Optional[str] = None, ppl_increase: Optional[dict] = None,
                ppl_source: str = "given") -> PlanResult:
    """Sweep compression pipeline x batch (x CUDA graph on CUDA), measure tok/s, TTFT, TPOT, J/token and
    perplexity, and return the Pareto front and the greenest configuration meeting ``slo`` and ``accuracy``
    (module docstring). ``save``: write the chosen configuration's compiled LM there (``llmasos.load_lm``).
    ``record``: a Ledger to record each configuration's measured window in (model, variant = its key, grid
    ``region`` and ``pue``), for ``llmasos report``. ``dtype`` ("f32", "f16", "bf16"): cast the weights of
    every pipeline but "f32"/"f16" (which fix their own) -- None keeps the model's. ``ppl_increase``:
    {pipeline: perplexity increase} measured elsewhere (``load_accuracy``; ``ppl_source`` says where), used
    instead of measuring perplexity here -- for random-weight shapes on a GPU."""
    slo, accuracy = _check_budget(slo, accuracy)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown or not pipelines:
        raise EnergyError(f"unknown pipeline(s) {unknown or list(pipelines)}; allowed: {', '.join(PIPELINES)}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise EnergyError(f"batches must be ints >= 1, got {list(batches)!r}")
    for name, v in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeat", repeat)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EnergyError(f"{name} must be an int >= 1, got {v!r}")
    if dtype is not None and dtype not in DTYPES:
        raise EnergyError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    if ppl_increase is not None:
        missing = [p for p in pipelines if p not in ppl_increase]
        if missing:
            raise EnergyError(f"ppl_increase ({ppl_source}) has no figure for pipeline(s) {', '.join(missing)}; "
                              f"it has {', '.join(sorted(ppl_increase)) or 'none'}")
    say = log or (lambda *_: None)
    notes: list = []
    m, tok, label = _load(model, tokenizer)
    # held-out token ids: the evaluation split of the Lee corpus (prompts come from its end, perplexity
    # windows from its start), or the given windows; with the accuracy given and no tokenizer, random
    # prompt ids (a random-weight shape: its text means nothing)
    if windows is None and tok is None and ppl_increase is not None:
        cfg = getattr(m, "config", None)
        vocab = int(cfg.vocab_size if cfg is not None else m.cfg.vocab)
        windows = np.random.default_rng(0).integers(0, vocab, (1, max(2, 8 * prompt_len)))
    if windows is None:
        if tok is None:
            raise EnergyError("plan_energy needs a tokenizer (for held-out text) or explicit token-id windows")
        allw = token_windows(tok, eval_text(), window=eval_window)
        windows = allw[:eval_windows]
        prompt_pool = allw[-1]
    else:
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise EnergyError(f"windows must be token ids [W, S>=2], got shape {list(windows.shape)}")
        prompt_pool = windows.reshape(-1)
    if len(prompt_pool) < prompt_len:
        raise EnergyError(f"prompt_len {prompt_len} exceeds the {len(prompt_pool)} held-out tokens available")
    chosen = {p: PIPELINES[p] for p in pipelines}
    if ppl_increase is None:
        # measured here on the model's own (uncast) IR: right only for pipelines that keep its f32 weights
        cast = [p for p in pipelines if PIPELINE_DTYPES.get(p, dtype or "f32") != "f32"]
        if cast:
            raise EnergyError(f"plan_energy measures perplexity on the f32 model, but pipeline(s) {cast} run "
                              f"{', '.join(sorted({PIPELINE_DTYPES.get(p, dtype or 'f32') for p in cast}))} "
                              f"weights: pass ppl_increase= (e.g. from measure_accuracy(..., dtypes=[...]))")
        ppl = _perplexities(m, chosen, windows, notes)
        base_ppl = ppl.get(pipelines[0])
        incs = {p: (ppl[p] / base_ppl - 1) if p in ppl and base_ppl else None for p in pipelines}
    else:
        ppl, incs = {}, {p: float(ppl_increase[p]) for p in pipelines}
        notes.append(f"perplexity increases not measured here: taken from {ppl_source}")
    rows, lms = [], {}
    max_seq = prompt_len + new_tokens
    est = False
    for pname, pipe in chosen.items():
        for cg in cuda_graphs:
            t0 = time.perf_counter()
            passes = f"{pipe},fuse" if pipe else "fuse"
            wdt = PIPELINE_DTYPES.get(pname, dtype)
            lm = compile_lm(m, target, max_seq=max_seq, max_batch=max(batches), passes=passes, tokenizer=tok,
                            cuda_graph=cg, dtype=_torch_dtype(wdt))
            say(f"[plan] {pname}{'' if cg else ' (no CUDA graph)'}: compiled in {time.perf_counter() - t0:.1f} s")
            lms[(pname, cg)] = lm
            for b in batches:
                prompts = [prompt_pool[i * 7 % max(1, len(prompt_pool) - prompt_len):][:prompt_len].tolist()
                           for i in range(b)]
                lm.generate(prompts, 2)                               # warm: loads kernels, captures graphs
                best = None
                for _ in range(repeat):
                    with measure(f"plan {pname} b{b}") as w:
                        lm.generate(prompts, new_tokens)
                    st = lm.last_stats
                    w.tokens = st.new_tokens
                    if best is None or w.joules < best[0].joules:
                        best = (w, st)
                w, st = best
                est = est or w.estimated
                row = {"pipeline": pname, "passes": passes, "batch": b, "cuda_graph": cg,
                       "tokens": st.new_tokens, "seconds": st.prefill_s + st.decode_s,
                       "tokens_per_s": st.new_tokens / (st.prefill_s + st.decode_s),
                       "ttft_ms": 1e3 * st.prefill_s,
                       "tpot_ms": 1e3 * st.decode_s / max(1, st.steps),
                       "joules": w.joules, "joules_per_token": w.joules_per_token,
                       "active_joules_per_token": w.active_joules_per_token, "idle_joules": w.idle_joules,
                       "watts": w.watts, "estimated": w.estimated,
                       "perplexity": ppl.get(pname), "ppl_increase": incs[pname]}
                rows.append(row)
                if record is not None:
                    record.record_run(w, model=label, variant=_key(row), target=str(getattr(target, "name", target)),
                                      region=region, pue=pue)
                say(f"[plan] {_key(row)}: {row['tokens_per_s']:.1f} tok/s, TPOT {row['tpot_ms']:.1f} ms, "
                    f"{row['joules_per_token']:.4g} J/token{' (estimated)' if w.estimated else ''}, "
                    f"ppl {row['perplexity']}")
    front, choice, default = select(rows, slo, accuracy, default=(pipelines[0], min(batches)), notes=notes)
    res = PlanResult(rows, front, choice, default, slo, accuracy, est, notes=notes)
    if est:
        notes.append("energy figures are estimated (no energy counter on this machine): TDP x CPU utilisation")
    notes.append(f"model {label}, target {getattr(target, 'name', target)}, prompt {prompt_len} + "
                 f"{new_tokens} new tokens, best of {repeat}")
    if save and choice is not None:
        lm = lms[(choice["pipeline"], choice["cuda_graph"])]
        lm.save(save)
        res.artifact = str(save)
        notes.append(f"saved {_key(choice)} to {save} (compiled for batch <= {max(batches)})")
    return res


__all__ = ["plan_energy", "PlanResult", "pareto_front", "PIPELINES", "meets", "select", "key", "check_budget", "load_accuracy",
           "measure_accuracy"]
