"""The energy commands of the ``llmasos`` CLI (llmasos/cli.py adds them with ``add_parsers``):

    llmasos carbon --kwh 1.5 --region FRA [--pue 1.2] [--contract KWH:G_PER_KWH:KIND:SOURCE[:YEAR]]
                   [--embodied KG:LIFE_YEARS:SOURCE[:YEAR] --seconds S] [--json]
    llmasos carbon --list [countries|cloud]
    llmasos report [--since DATE] [--until DATE] [--by day|hour] [--db FILE] -o report.html   (+ .json, .csv)
    llmasos offsets purchase|retire|summary|verify ... [--db FILE]
    llmasos power [--gpu 0 | --simulate] [--eta 0.5] [--dry-run]      (real GPUs: read-only, dry run only)

The database: --db, else LLMASOS_ENERGY_DB, else ~/.local/share/llmasos/energy.db.
"""
from __future__ import annotations

import json
import sys

from .carbon import Contract, Embodied, cloud_regions, countries, emissions
from .errors import EnergyError
from .ledger import Ledger
from .power import SimulatedGPU, optimize_power_limit, real_gpu
from .report import build_report, write_report


def _split(spec: str, what: str, n_min: int, n_max: int) -> list:
    parts = spec.split(":")
    if not n_min <= len(parts) <= n_max:
        raise EnergyError(f"{what} {spec!r}: expected {n_min}-{n_max} ':'-separated fields")
    return parts


def _num(s: str, what: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise EnergyError(f"{what} must be a number, got {s!r}") from None


def cmd_carbon(args) -> int:
    if args.list:
        if args.list == "countries":
            for k, (name, g, year) in sorted(countries().items()):
                print(f"{k}  {g:8.1f} gCO2e/kWh  {year}  {name}")
        else:
            for k, (iso, g, src) in sorted(cloud_regions().items()):
                print(f"{k:<40} {g:8.1f} gCO2e/kWh  {iso}  {src}")
        return 0
    given = [x for x in (args.joules, args.kwh) if x is not None]
    if len(given) != 1:
        raise EnergyError("give the energy as exactly one of --joules or --kwh")
    if args.region is None:
        raise EnergyError("--region is required: an ISO alpha-3 country code (FRA), provider:region "
                          "(gcp:europe-west4) or gCO2e/kWh as a number")
    j = args.joules if args.joules is not None else args.kwh * 3.6e6
    contracts = []
    for c in args.contract or []:
        p = _split(c, "--contract", 4, 5)
        contracts.append(Contract(_num(p[0], "contract kWh"), _num(p[1], "contract gCO2e/kWh"), p[2], p[3],
                                  int(p[4]) if len(p) > 4 else None))
    emb = None
    if args.embodied:
        p = _split(args.embodied, "--embodied", 3, 4)
        emb = Embodied(_num(p[0], "embodied kgCO2e"), _num(p[1], "embodied life (years)"), p[2],
                       int(p[3]) if len(p) > 3 else None, units=args.units)
    rep = emissions(j, args.region, pue=args.pue, pue_source=args.pue_source, contracts=contracts, embodied=emb,
                    seconds=args.seconds or 0.0, estimated=args.estimated,
                    energy_source="given on the command line")
    print(json.dumps(rep.as_dict(), indent=1) if args.json else rep)
    return 0


def cmd_report(args) -> int:
    led = Ledger(args.db)
    try:
        doc = build_report(led, args.since, args.until, by=args.by)
    finally:
        led.close()
    paths = write_report(doc, args.output)
    print(f"wrote {paths['html']}, {paths['json']}, {paths['csv']}: {doc['runs']} runs, "
          f"{doc['totals']['grams']:.4g} gCO2e{' (estimated)' if doc['estimated'] else ''}")
    return 0


def cmd_offsets(args) -> int:
    led = Ledger(args.db)
    try:
        if args.action == "purchase":
            pid = led.purchase(args.registry, args.serial, args.tonnes, args.vintage, args.kind, args.project)
            print(f"recorded purchase #{pid}: {args.tonnes:g} t {args.registry} {args.serial}")
        elif args.action == "retire":
            rid = led.retire(args.registry, args.serial, args.tonnes, args.period, args.beneficiary,
                             claim=args.claim, allow_over_offset=args.allow_over_offset)
            print(f"recorded retirement #{rid}: {args.tonnes:g} t of {args.registry} {args.serial} "
                  f"against {args.period}")
        elif args.action == "summary":
            print(json.dumps({"periods": led.summary(args.since, args.until), "holdings": led.holdings()}, indent=1))
        elif args.action == "verify":
            led.verify()
            print(f"{led.path}: audit chain and balances consistent ({len(led.audit_log())} audit entries)")
    finally:
        led.close()
    return 0


def cmd_power(args) -> int:
    if args.simulate:
        gpu = SimulatedGPU()
        plan = optimize_power_limit(gpu, lambda: gpu.run(args.steps), eta=args.eta, step_w=args.step,
                                    apply=args.apply)
    else:
        if args.apply:
            raise EnergyError("--apply is refused on real GPUs: llmasos treats them as read-only (shared "
                              "machines); use --dry-run, or --simulate")
        import torch  # deferred: torch (a read-only probe workload on the real GPU)
        if not torch.cuda.is_available():
            raise EnergyError("no CUDA GPU visible to torch; use --simulate")
        gpu = real_gpu(args.gpu)
        dev = torch.device("cuda", args.gpu)
        a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)

        def work() -> int:
            for _ in range(args.steps):
                a @ a
            torch.cuda.synchronize(dev)
            return args.steps
        plan = optimize_power_limit(gpu, work, eta=args.eta, step_w=args.step, dry_run=True)
    print(json.dumps(plan.as_dict(), indent=1))
    return 0


def add_parsers(sub) -> None:
    """Add carbon, report, offsets and power to the ``llmasos`` subcommands."""
    p = sub.add_parser("carbon", help="emissions of an amount of energy: location/market-based, PUE, embodied")
    p.add_argument("--joules", type=float)
    p.add_argument("--kwh", type=float)
    p.add_argument("--region", help="ISO alpha-3 country (FRA), provider:region (gcp:europe-west4) or gCO2e/kWh")
    p.add_argument("--pue", type=float, default=1.0)
    p.add_argument("--pue-source", default=None, help="where the PUE comes from (printed with it)")
    p.add_argument("--contract", action="append", metavar="KWH:G_PER_KWH:KIND:SOURCE[:YEAR]",
                   help="a market instrument (REC, PPA, supplier factor) for the market-based figure; repeatable")
    p.add_argument("--embodied", metavar="KG:LIFE_YEARS:SOURCE[:YEAR]",
                   help="hardware manufacturing emissions per unit, amortised over its life (needs --seconds)")
    p.add_argument("--units", type=int, default=1, help="hardware units for --embodied (default 1)")
    p.add_argument("--seconds", type=float, default=None, help="duration the energy was used over")
    p.add_argument("--estimated", action="store_true", help="the energy is an estimate (labels every line)")
    p.add_argument("--list", choices=("countries", "cloud"), help="list codecarbon's grid intensities")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_carbon)
    p = sub.add_parser("report", help="sustainability report (HTML + JSON + CSV) from the energy database")
    p.add_argument("--since", default=None, help="YYYY, YYYY-MM, YYYY-MM-DD or ISO time (inclusive)")
    p.add_argument("--until", default=None, help="YYYY, YYYY-MM, YYYY-MM-DD (inclusive: a month includes its days) or ISO time "
                   "(exclusive)")
    p.add_argument("--by", default="day", choices=("day", "hour"))
    p.add_argument("--db", default=None, help="energy database (default: LLMASOS_ENERGY_DB or ~/.local/share)")
    p.add_argument("-o", "--output", default="report.html", help="report.html; .json and .csv go beside it")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("offsets", help="carbon-offset ledger: purchase, retire, summary, verify")
    p.add_argument("action", choices=("purchase", "retire", "summary", "verify"))
    p.add_argument("--db", default=None)
    p.add_argument("--registry")
    p.add_argument("--serial")
    p.add_argument("--project", default="")
    p.add_argument("--tonnes", type=float)
    p.add_argument("--vintage", type=int)
    p.add_argument("--kind", default="avoidance", help="removal, avoidance, REC, ...")
    p.add_argument("--period", help="YYYY, YYYY-MM or YYYY-MM-DD (retire)")
    p.add_argument("--beneficiary", default="")
    p.add_argument("--claim", default=None, help="the registry's retirement id (a claim retires once)")
    p.add_argument("--allow-over-offset", action="store_true")
    p.add_argument("--since", default=None, help="summary: first period, YYYY, YYYY-MM or YYYY-MM-DD (inclusive)")
    p.add_argument("--until", default=None, help="summary: last period (inclusive: a month includes its days)")
    p.set_defaults(fn=_offsets_checked)
    p = sub.add_parser("power", help="Zeus-style power-limit optimizer (real GPUs: read-only dry run)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", type=int, default=0)
    g.add_argument("--simulate", action="store_true", help="a simulated H100-class GPU (settings are simulated)")
    p.add_argument("--eta", type=float, default=0.5, help="energy weight in [0, 1] (Zeus's eta_knob)")
    p.add_argument("--step", type=float, default=25.0, help="power-limit step in W")
    p.add_argument("--steps", type=int, default=200, help="work per measurement")
    p.add_argument("--dry-run", action="store_true", help="(the only mode on a real GPU)")
    p.add_argument("--apply", action="store_true", help="set the best limit (simulated devices only)")
    p.set_defaults(fn=cmd_power)


_REQUIRED = {"purchase": ("registry", "serial", "tonnes", "vintage"), "retire": ("registry", "serial", "tonnes",
                                                                               "period")}


def _offsets_checked(args) -> int:
    missing = [f"--{k}" for k in _REQUIRED.get(args.action, ()) if getattr(args, k) is None]
    if missing:
        raise EnergyError(f"offsets {args.action} needs {', '.join(missing)}")
    return cmd_offsets(args)


__all__ = ["add_parsers"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `llmasos carbon|report|offsets|power`")
