"""Argument handling shared by bench/energy_gpu.py and bench/energy_plan.py (issue 15): the sweep (pipelines,
batches), the budget (latency SLO, perplexity budget, or perplexity increases measured elsewhere), the energy
database, and writing the JSON document."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the accuracy file committed for GPU runs: SmolLM2-135M on the CPU (bench/energy_plan.py --accuracy-only)
ACCURACY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "energy_accuracy_smollm2.json")


def int_list(text: str, what: str) -> list:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated ints, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise SystemExit(f"error: {what} must be ints >= 1, got {text!r}")
    return out


def add_sweep_args(p, pipelines: str, batches: str) -> None:
    p.add_argument("--pipelines", default=pipelines, help="compression pipelines (llmasos.energy.planner.PIPELINES)")
    p.add_argument("--batches", "--batch", dest="batches", default=batches, help="batch sizes, e.g. 1,8,32")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=32, help="tokens generated per row")


def add_budget_args(p, max_ppl_increase: float = 0.01) -> None:
    p.add_argument("--tpot-ms", type=float, default=None, help="SLO: time per output token (ms)")
    p.add_argument("--ttft-ms", type=float, default=None, help="SLO: time to first token (ms)")
    p.add_argument("--max-ppl-increase", type=float, default=max_ppl_increase, help="fraction: 0.01 = 1%%")
    p.add_argument("--accuracy-from", default=None, metavar="JSON",
                   help="perplexity increases measured elsewhere (bench/energy_plan.py --accuracy-only, or a "
                        "plan's JSON) instead of measuring them here")


def add_db_args(p, region: str) -> None:
    p.add_argument("--db", default=None, help="also record every measured configuration in this energy database")
    p.add_argument("--region", default=region, help="grid region for --db (ISO alpha-3, provider:region, g/kWh)")
    p.add_argument("--pue", type=float, default=1.0)
    p.add_argument("--out", default=None, help="also write the JSON document here")


def budget(a) -> tuple:
    """(slo, accuracy) dicts from the parsed budget arguments."""
    slo = {k: v for k, v in (("tpot_ms", a.tpot_ms), ("ttft_ms", a.ttft_ms)) if v is not None}
    return slo, {"max_ppl_increase": a.max_ppl_increase}


def accuracy_from(a, dtype: str):
    """(ppl_increase dict, source) from --accuracy-from (weights ``dtype``'s table), or (None, None)."""
    if not a.accuracy_from:
        return None, None
    from llmasos.energy.planner import load_accuracy
    return load_accuracy(a.accuracy_from, dtype)


def emit(doc: dict, out=None) -> None:
    """The one JSON document: to --out (if given) and stdout."""
    text = json.dumps(doc, indent=1, default=str)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)


def log(*m) -> None:
    print(*m, file=sys.stderr, flush=True)
