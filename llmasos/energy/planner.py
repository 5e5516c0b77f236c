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
    "int8": "quantize{bits=8}",
    "int4-g128": "quantize{bits=4,group=128,method=rtn}",
    "2:4": "prune{method=magnitude,n=2,m=4}",
}
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
    return f"{row['pipeline']}/b{row['batch']}" + ("" if row.get("cuda_graph", True) else "/nograph")


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


def plan_energy(model: Any, target: Any = "cpu", slo: Optional[dict] = None, accuracy: Optional[dict] = None, *,
                pipelines: Sequence[str] = ("f32", "int8", "int4-g128"), batches: Sequence[int] = (1, 4),
                cuda_graphs: Sequence[bool] = (True,), prompt_len: int = 32, new_tokens: int = 16,
                tokenizer=None, windows: Optional[np.ndarray] = None, eval_windows: int = 2,
                eval_window: int = 128, repeat: int = 1, save: Optional[str] = None,
                record: Optional[Ledger] = None, region: Any = "USA", pue: float = 1.0, log=None) -> PlanResult:
    """Sweep compression pipeline x batch (x CUDA graph on CUDA), measure tok/s, TTFT, TPOT, J/token and
    perplexity, and return the Pareto front and the greenest configuration meeting ``slo`` and ``accuracy``
    (module docstring). ``save``: write the chosen configuration's compiled LM there (``llmasos.load_lm``).
    ``record``: a Ledger to record each configuration's measured window in (model, variant = its key, grid
    ``region`` and ``pue``), for ``llmasos report``."""
    slo, accuracy = _check_budget(slo, accuracy)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown or not pipelines:
        raise EnergyError(f"unknown pipeline(s) {unknown or list(pipelines)}; allowed: {', '.join(PIPELINES)}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise EnergyError(f"batches must be ints >= 1, got {list(batches)!r}")
    for name, v in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeat", repeat)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EnergyError(f"{name} must be an int >= 1, got {v!r}")
    say = log or (lambda *_: None)
    notes: list = []
    m, tok, label = _load(model, tokenizer)
    # held-out token ids: the evaluation split of the Lee corpus (prompts come from its end, perplexity
    # windows from its start), or the given windows
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
    ppl = _perplexities(m, chosen, windows, notes)
    base_ppl = ppl.get(pipelines[0])
    rows, lms = [], {}
    max_seq = prompt_len + new_tokens
    est = False
    for pname, pipe in chosen.items():
        for cg in cuda_graphs:
            t0 = time.perf_counter()
            passes = f"{pipe},fuse" if pipe else "fuse"
            lm = compile_lm(m, target, max_seq=max_seq, max_batch=max(batches), passes=passes,
                                    tokenizer=tok, cuda_graph=cg)
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
                       "perplexity": ppl.get(pname),
                       "ppl_increase": (ppl[pname] / base_ppl - 1) if pname in ppl and base_ppl else None}
                rows.append(row)
                if record is not None:
                    record.record_run(w, model=label, variant=_key(row), target=str(getattr(target, "name", target)),
                                      region=region, pue=pue)
                say(f"[plan] {_key(row)}: {row['tokens_per_s']:.1f} tok/s, TPOT {row['tpot_ms']:.1f} ms, "
                    f"{row['joules_per_token']:.4g} J/token{' (estimated)' if w.estimated else ''}, "
                    f"ppl {row['perplexity']}")
    ok = [r for r in rows if not any("perplexity" in w for w in meets(r, {}, accuracy))]
    front = pareto_front(ok)
    for r in rows:
        r["misses"] = meets(r, slo, accuracy)
        r["pareto"] = any(r is f for f in front)
    good = [r for r in rows if not r["misses"]]
    choice = min(good, key=lambda r: (r["joules_per_token"], -r["tokens_per_s"])) if good else None
    default = next(r for r in rows if r["pipeline"] == pipelines[0] and r["batch"] == min(batches))
    if choice is None:
        notes.append("no configuration meets the SLO and accuracy budget: " +
                     "; ".join(f"{_key(r)}: {', '.join(r['misses'])}" for r in rows))
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


__all__ = ["plan_energy", "PlanResult", "pareto_front", "PIPELINES", "meets"]
