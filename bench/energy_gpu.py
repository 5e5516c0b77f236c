"""Energy per token on a GPU, read-only (issue 15): J/token of a Llama-1B-shape decoder (random weights, preset
llama-1b) at fp16, int8 and int4-g128 x batch 1/8/32, and torch eager / torch.compile(mode="reduce-overhead")
on the same model in the same run.

    python bench/energy_gpu.py [--batch 1,8,32] [--prompt 128] [--new 128] [--repeat 3] [--out energy_gpu.json]
                               [--db energy.db --region USA --pue 1.1]

How: llmasos/llm/bench.py's decode benchmark with an energy meter: every timed generation runs inside a
``llmasos.energy.measure`` window over NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``
through zeus; Volta and newer), with ``torch.cuda.synchronize`` before each counter read. Idle power is
measured once first (2 s of sleep) and reported; J/token is gross (idle included) with the active part beside
it. Nothing changes a GPU setting: the power limit is read (and printed) only.

One JSON document on stdout: a table {variant: {batch: J/token}} with tokens/s beside it, the raw rows, the
meters and their notes, idle watts, and the current power limit. --db also records each figure as a run in
the energy database (for ``llmasos report``).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"torch_eager": "torch eager {dtype}", "torch_compile": "torch.compile reduce-overhead {dtype}",
            "llmasos": "llmasos {dtype}", "llmasos_int8": "llmasos int8 (quantize{{bits=8}})",
            "llmasos_int4_g128": "llmasos int4-g128 (quantize{{bits=4,group=128}})"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--target", default="cuda")
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "bf16"), help="f32 for a CPU smoke run")
    p.add_argument("--no-compile-baseline", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--db", default=None, help="also record every figure in this energy database")
    p.add_argument("--region", default="USA", help="grid region for --db (ISO alpha-3, provider:region, g/kWh)")
    p.add_argument("--pue", type=float, default=1.0)
    a = p.parse_args(argv)

    import torch

    import llmasos.energy as energy
    from llmasos.llm.bench import run

    disc = energy.discover()
    if not any(m.name.startswith("gpu") for m in disc.meters):
        print(f"warning: no GPU energy meter ({disc.notes}); the figures will be CPU-only", file=sys.stderr)
    idle = energy.calibrate_idle(seconds=2.0)

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
    t0 = time.perf_counter()
    doc = run([a.model], a.target, batches=[int(b) for b in a.batch.split(",")], prompt_len=a.prompt, new=a.new,
              dtype=a.dtype, int4_models=[a.model], int8_models=[a.model], compile_baseline=not a.no_compile_baseline,
              repeat=a.repeat, meter=meter)
    table = {}
    for row in doc["rows"]:
        for key, what in VARIANTS.items():
            what = what.format(dtype=a.dtype)
            if f"{key}_j_per_token" in row:
                tok_s = row.get(f"{key}_tok_s")
                table.setdefault(what, {})[row["batch"]] = {
                    "j_per_token": row[f"{key}_j_per_token"],
                    "active_j_per_token": row.get(f"{key}_active_j_per_token"),
                    "avg_w": row.get(f"{key}_avg_w"), "decode_tok_s": tok_s,
                    "estimated": row.get(f"{key}_energy_estimated")}
            elif f"{key}_error" in row:
                table.setdefault(what, {})[row["batch"]] = {"error": row[f"{key}_error"][:300]}
    out = {"what": "J/token (gross, idle included; active beside it), same run, NVML energy counter, read-only",
           "gpu": doc.get("gpu"), "model": f"{a.model} shape, random weights", "prompt": a.prompt, "new": a.new,
           "repeat": a.repeat, "seconds": time.perf_counter() - t0, "idle_w": idle, "power_limit": limit,
           "meters": [{"name": m.name, "method": m.method, "estimated": m.estimated} for m in disc.meters],
           "notes": disc.notes, "table": table, "decode_rows": doc["rows"]}
    if a.db:
        led = energy.Ledger(a.db)
        for what, per_b in table.items():
            for b, r in per_b.items():
                if "j_per_token" in r and r.get("decode_tok_s"):
                    tokens = b * a.new * a.repeat
                    joules = r["j_per_token"] * tokens
                    led.record_run({"joules": joules, "seconds": tokens / r["decode_tok_s"], "tokens": tokens,
                                    "estimated": bool(r["estimated"]), "idle_joules": 0.0,
                                    "devices": {m.name: {"method": m.method} for m in disc.meters}},
                                   model=a.model, variant=f"{what} b{b}", target=a.target, region=a.region,
                                   pue=a.pue)
        led.close()
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
