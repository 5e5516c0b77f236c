"""The energy-aware planner on a real model (issue 15): sweep compression pipeline x batch for SmolLM2-135M,
return the Pareto front (tok/s vs J/token) and the least-J/token configuration meeting a latency SLO and a
perplexity budget, against the default configuration (the first pipeline, batch 1).

    python bench/energy_plan.py [--model smollm2] [--target cpu] [--pipelines f32,int8,int4-g128]
                                [--batches 1,4] [--tpot-ms 400] [--ttft-ms 2000] [--max-ppl-increase 0.01]
                                [--prompt 32] [--new 32] [--repeat 2] [--db energy.db --region FRA]
                                [--save green.llmasos] [--out plan.json]
    # the accuracy side alone, for a GPU run of the shape (bench/energy_gpu.py --accuracy-from):
    python bench/energy_plan.py --accuracy-only --pipelines f32,f16,int8,int4-g128,int4-g32-asym \\
                                --dtypes f32,f16 --eval-windows 8 --out bench/data/energy_accuracy_smollm2.json
    # a random-weight shape with the accuracy measured on SmolLM2 (one compile per pipeline, in sequence;
    # bench/energy_gpu.py does the same sweep with its compiles in parallel):
    python bench/energy_plan.py --model llama-1b --target cuda --dtype f16 --pipelines f16,int8,int4-g128 \\
                                --batches 1,8,32 --tpot-ms 50 --accuracy-from bench/data/energy_accuracy_smollm2.json

On a CPU without RAPL every J figure is the labelled estimate (TDP x this process's CPU time); the ratios
between configurations of one run are what to read. --db records every configuration's window as a run
(``llmasos report`` then plots them). One JSON document on stdout; progress on stderr.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _energy_common as common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", default="cpu")
    p.add_argument("--dtype", default=None, choices=("f32", "f16", "bf16"),
                   help="weights of every pipeline but f32/f16 (default: the model's)")
    common.add_sweep_args(p, "f32,int8,int4-g128", "1,4")
    common.add_budget_args(p)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-window", type=int, default=128)
    p.add_argument("--accuracy-only", action="store_true",
                   help="measure only the perplexity of each pipeline x --dtypes (no compile, no energy)")
    p.add_argument("--dtypes", default="f32,f16", help="with --accuracy-only: weight dtypes to measure")
    common.add_db_args(p, "FRA")
    p.add_argument("--save", default=None)
    a = p.parse_args(argv)
    import llmasos
    from llmasos.energy.planner import measure_accuracy
    pipelines = a.pipelines.split(",")
    if a.accuracy_only:
        doc = measure_accuracy(a.model, pipelines, a.dtypes.split(","), eval_windows=a.eval_windows,
                               eval_window=a.eval_window, log=common.log)
        doc["command"] = "python bench/energy_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
        return common.emit(doc, a.out)
    slo, accuracy = common.budget(a)
    incs, source = common.accuracy_from(a, a.dtype or "f32")
    res = llmasos.plan_energy(a.model, a.target, slo=slo, accuracy=accuracy, pipelines=pipelines,
                              batches=common.int_list(a.batches, "--batches"), prompt_len=a.prompt,
                              new_tokens=a.new, repeat=a.repeat, eval_windows=a.eval_windows,
                              eval_window=a.eval_window, save=a.save, log=common.log,
                              record=a.db and llmasos.energy.Ledger(a.db), region=a.region, pue=a.pue,
                              dtype=a.dtype, ppl_increase=incs, ppl_source=source or "given")
    common.emit(res.as_dict(), a.out)


if __name__ == "__main__":
    main()
