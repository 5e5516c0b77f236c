"""The energy-aware planner on a real model (issue 15): sweep compression pipeline x batch for SmolLM2-135M,
return the Pareto front (tok/s vs J/token) and the least-J/token configuration meeting a latency SLO and a
perplexity budget, against the default configuration (f32, batch 1).

    python bench/energy_plan.py [--model smollm2] [--target cpu] [--pipelines f32,int8,int4-g128]
                                [--batches 1,4] [--tpot-ms 400] [--ttft-ms 2000] [--max-ppl-increase 0.01]
                                [--prompt 32] [--new 32] [--repeat 2] [--db energy.db --region FRA]
                                [--save green.llmasos] [--out plan.json]

On a CPU without RAPL every J figure is the labelled estimate (TDP x this process's CPU time); the ratios
between configurations of one run are what to read. --db records every configuration's window as a run
(``llmasos report`` then plots them). One JSON document on stdout; progress on stderr.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", default="cpu")
    p.add_argument("--pipelines", default="f32,int8,int4-g128")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--tpot-ms", type=float, default=None)
    p.add_argument("--ttft-ms", type=float, default=None)
    p.add_argument("--max-ppl-increase", type=float, default=0.01, help="fraction: 0.01 = 1%%")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--db", default=None)
    p.add_argument("--region", default="FRA")
    p.add_argument("--save", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import llmasos
    slo = {k: v for k, v in (("tpot_ms", a.tpot_ms), ("ttft_ms", a.ttft_ms)) if v is not None}
    res = llmasos.plan_energy(a.model, a.target, slo=slo, accuracy={"max_ppl_increase": a.max_ppl_increase},
                              pipelines=a.pipelines.split(","), batches=[int(b) for b in a.batches.split(",")],
                              prompt_len=a.prompt, new_tokens=a.new, repeat=a.repeat, eval_windows=a.eval_windows,
                              save=a.save, log=lambda *m: print(*m, file=sys.stderr, flush=True),
                              record=a.db and llmasos.energy.Ledger(a.db), region=a.region)
    doc = res.as_dict()
    text = json.dumps(doc, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
