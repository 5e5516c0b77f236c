"""The sustainability report: energy and emissions per model / variant / day, J/token and gCO2e per 1k tokens,
offsets against emissions, a throughput vs J/token Pareto front and emissions over time.

    doc = build_report(Ledger(db), since="2026-12-01")         # a JSON-able dict
    write_report(doc, "report.html")                           # + report.json + report.csv beside it

The data are the runs recorded in the energy database (``Ledger.record_run``: measured windows, with the
grid intensity, its source and year, and the PUE used at the time) and the ledger's emissions, purchases and
retirements. Plots are matplotlib figures embedded in the HTML as PNG data URIs (one self-contained file);
every estimated figure is marked "estimated".
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Optional

from .errors import EnergyError
from .ledger import PERIOD_PATTERN, Ledger, check_period
from .planner import pareto_front

J_PER_KWH = 3.6e6
BUCKETS = {"day": 10, "hour": 13}      # ISO timestamp prefix length per bucket


def _check_date(s: Optional[str], what: str) -> Optional[str]:
    if s is None:
        return None
    if isinstance(s, str) and PERIOD_PATTERN.match(s):
        return check_period(s, f"--{what}")     # a year or month (or day): a calendar period, checked
    try:
        _dt.datetime.fromisoformat(s)
    except (TypeError, ValueError):
        raise EnergyError(f"--{what} must be an ISO date or period (YYYY, YYYY-MM, YYYY-MM-DD) or time, "
                          f"got {s!r}") from None
    return s


def build_report(ledger: Ledger, since: Optional[str] = None, until: Optional[str] = None,
                 by: str = "day") -> dict:
    """The report's data (see the module docstring): groups per model/variant/``by`` (day or hour)."""
    since, until = _check_date(since, "since"), _check_date(until, "until")
    if by not in BUCKETS:
        raise EnergyError(f"by must be one of {', '.join(BUCKETS)}, got {by!r}")
    n = BUCKETS[by]
    runs = ledger.runs(since, until)
    groups: dict = {}
    for r in runs:
        key = (r["model"], r["variant"], r["at"][:n])
        g = groups.setdefault(key, {"model": r["model"], "variant": r["variant"], by: r["at"][:n], "runs": 0,
                                    "tokens": 0, "seconds": 0.0, "joules": 0.0, "idle_joules": 0.0, "grams": 0.0,
                                    "estimated": False, "sources": set()})
        g["runs"] += 1
        g["tokens"] += r["tokens"]
        g["seconds"] += r["seconds"]
        g["joules"] += r["joules"]
        g["idle_joules"] += r["idle_joules"]
        g["grams"] += r["grams"]
        g["estimated"] = g["estimated"] or r["estimated"]
        g["sources"].add(f"{r['region']}: {r['g_per_kwh']:g} gCO2e/kWh, PUE {r['pue']:g} [{r['intensity_source']}, "
                         f"{r['intensity_year'] if r['intensity_year'] is not None else 'year not stated'}]")
    rows = []
    for g in groups.values():
        g["kwh"] = g["joules"] / J_PER_KWH
        g["joules_per_token"] = g["joules"] / g["tokens"] if g["tokens"] else None
        g["g_per_1k_tokens"] = 1000 * g["grams"] / g["tokens"] if g["tokens"] else None
        g["tokens_per_s"] = g["tokens"] / g["seconds"] if g["seconds"] else None
        g["sources"] = sorted(g["sources"])
        rows.append(g)
    rows.sort(key=lambda g: (g[by], g["model"], g["variant"]))
    # throughput vs J/token: one point per model/variant over the whole period
    per_var: dict = {}
    for r in runs:
        v = per_var.setdefault((r["model"], r["variant"]), {"model": r["model"], "variant": r["variant"],
                                                            "tokens": 0, "seconds": 0.0, "joules": 0.0,
                                                            "estimated": False})
        v["tokens"] += r["tokens"]
        v["seconds"] += r["seconds"]
        v["joules"] += r["joules"]
        v["estimated"] = v["estimated"] or r["estimated"]
    points = [dict(v, tokens_per_s=v["tokens"] / v["seconds"], joules_per_token=v["joules"] / v["tokens"])
              for v in per_var.values() if v["tokens"]]
    front = pareto_front(points)
    for p in points:
        p["pareto"] = any(p is f for f in front)
    timeline: dict = {}
    for r in runs:
        timeline[r["at"][:n]] = timeline.get(r["at"][:n], 0.0) + r["grams"]
    offsets = ledger.summary(since[:10] if since else None, until[:10] if until else None)
    # a row's figures include its sub-periods' ('2026-12' holds '2026-12-07'): total the outermost rows only
    outer = [o for o in offsets
             if not any(q["period"] != o["period"] and o["period"].startswith(q["period"]) for q in offsets)]
    gross = sum(o["gross_t"] for o in outer)
    off = sum(o["offset_t"] for o in outer)
    return {"generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "database": str(ledger.path), "since": since, "until": until, "by": by,
            "estimated": any(r["estimated"] for r in runs), "runs": len(runs),
            "totals": {"tokens": sum(r["tokens"] for r in runs), "joules": sum(r["joules"] for r in runs),
                       "kwh": sum(r["joules"] for r in runs) / J_PER_KWH, "grams": sum(r["grams"] for r in runs),
                       "gross_t": gross, "offset_t": off, "net_t": gross - off},
            "rows": rows, "variants": points, "timeline": [{by: k, "grams": v} for k, v in sorted(timeline.items())],
            "offsets": offsets, "holdings": ledger.holdings(),
            "methods": sorted({r["method"] for r in runs})}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(doc: dict) -> dict:
    """{plot id: PNG data URI}: the Pareto front, emissions over time, offsets vs emissions."""
    try:
        import matplotlib  # deferred: matplotlib (optional extra)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: matplotlib
    except ImportError:
        raise EnergyError("the report's plots need matplotlib: pip install 'llmasos[energy]'") from None
    est = " (estimated)" if doc["estimated"] else ""
    out = {}
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    pts = doc["variants"]
    if pts:
        xs = [p["tokens_per_s"] for p in pts]
        ys = [p["joules_per_token"] for p in pts]
        ax.scatter(xs, ys, c=["tab:green" if p["pareto"] else "tab:gray" for p in pts], zorder=3)
        front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["tokens_per_s"])
        ax.plot([p["tokens_per_s"] for p in front], [p["joules_per_token"] for p in front], "g--", zorder=2,
                label="Pareto front")
        for p in pts:
            ax.annotate(f"{p['model']}/{p['variant']}", (p["tokens_per_s"], p["joules_per_token"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.legend()
        # figures spanning orders of magnitude (several models) read better on log axes
        if max(xs) > 20 * min(xs) > 0:
            ax.set_xscale("log")
        if max(ys) > 20 * min(ys) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("throughput (tokens/s)")
    ax.set_ylabel(f"energy per token (J){est}")
    ax.set_title("Throughput vs J/token")
    ax.grid(alpha=0.3)
    out["pareto"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    tl = doc["timeline"]
    by = doc["by"]
    if tl:
        ax.bar(range(len(tl)), [t["grams"] for t in tl], color="tab:orange")
        ax.set_xticks(range(len(tl)), [t[by] for t in tl], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"gCO2e (location-based){est}")
    ax.set_title(f"Emissions per {by}")
    ax.grid(alpha=0.3, axis="y")
    out["emissions"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    offs = doc["offsets"]
    if offs:
        xs = range(len(offs))
        ax.bar([x - 0.2 for x in xs], [1e6 * o["gross_t"] for o in offs], 0.4, label="gross", color="tab:red")
        ax.bar([x + 0.2 for x in xs], [1e6 * o["offset_t"] for o in offs], 0.4, label="offset (retired)",
               color="tab:green")
        ax.set_xticks(list(xs), [o["period"] for o in offs], rotation=30, ha="right", fontsize=7)
        ax.legend()
    ax.set_ylabel("gCO2e")
    ax.set_title("Offsets vs emissions per period")
    ax.grid(alpha=0.3, axis="y")
    out["offsets"] = _png(fig)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


CSV_COLUMNS = ("model", "variant", "bucket", "runs", "tokens", "seconds", "joules", "idle_joules", "kwh", "grams",
               "joules_per_token", "g_per_1k_tokens", "tokens_per_s", "estimated", "sources")


def to_html(doc: dict, images: dict) -> str:
    by = doc["by"]
    est = doc["estimated"]
    t = doc["totals"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r[k])}</td>" for k in ("model", "variant", by, "runs", "tokens", "joules",
                                                             "kwh", "grams", "joules_per_token", "g_per_1k_tokens",
                                                             "tokens_per_s"))
        + f"<td>{'estimated' if r['estimated'] else 'measured'}</td><td class=src>{_fmt('; '.join(r['sources']))}"
          f"</td></tr>" for r in doc["rows"])
    offs = "".join(f"<tr><td>{_fmt(o['period'])}</td><td>{_fmt(1e6 * o['gross_t'])}</td>"
                   f"<td>{_fmt(1e6 * o['offset_t'])}</td><td>{_fmt(1e6 * o['net_t'])}</td>"
                   f"<td>{'estimated' if o['estimated'] else ''}</td></tr>" for o in doc["offsets"])
    holds = "".join(f"<tr><td>{_fmt(h['registry'])}</td><td>{_fmt(h['serial'])}</td><td>{h['vintage']}</td>"
                    f"<td>{_fmt(h['kind'])}</td><td>{_fmt(h['tonnes'])}</td><td>{_fmt(h['retired_t'])}</td>"
                    f"<td>{_fmt(h['held_t'])}</td></tr>" for h in doc["holdings"])
    imgs = "".join(f'<figure><img class="plot" id="plot-{k}" alt="{k}" src="{v}"></figure>' for k, v in images.items())
    banner = ('<p class=est><b>estimated</b>: some energy figures are estimates (TDP x CPU utilisation, no energy '
              'counter); see the method column and docs/energy.md.</p>' if est else "")
    methods = "".join(f"<li>{_fmt(m)}</li>" for m in doc["methods"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LLMasOS sustainability report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}td.src{{font-size:10px;color:#555}}.est{{background:#fff3cd;padding:.5em}}
figure{{display:inline-block;margin:.5em;width:47%}}img.plot{{width:100%}}</style></head>
<body>
<h1>LLMasOS sustainability report</h1>
<p>Period: {_fmt(doc['since'] or 'all')} to {_fmt(doc['until'] or 'now')}; {doc['runs']} recorded runs; database
{_fmt(doc['database'])}; generated {_fmt(doc['generated_at'])}.</p>
{banner}
<h2>Totals</h2>
<p>{_fmt(t['tokens'])} tokens, {_fmt(t['joules'])} J ({_fmt(t['kwh'])} kWh){' (estimated)' if est else ''},
{_fmt(t['grams'])} gCO2e location-based. Ledger: gross {_fmt(1e6 * t['gross_t'])} g, offset
{_fmt(1e6 * t['offset_t'])} g, net {_fmt(1e6 * t['net_t'])} g.</p>
<h2>Plots</h2>
{imgs}
<h2>Energy and emissions per model / variant / {by}</h2>
<table><tr><th>model</th><th>variant</th><th>{by}</th><th>runs</th><th>tokens</th><th>J</th><th>kWh</th>
<th>gCO2e</th><th>J/token</th><th>gCO2e/1k tokens</th><th>tokens/s</th><th>energy</th>
<th>grid intensity source</th></tr>
{rows}</table>
<h2>Offsets vs emissions (ledger)</h2>
<table><tr><th>period</th><th>gross gCO2e</th><th>offset gCO2e</th><th>net gCO2e</th><th></th></tr>{offs}</table>
<h3>Credits held</h3>
<table><tr><th>registry</th><th>serial</th><th>vintage</th><th>type</th><th>t</th><th>retired t</th><th>held t</th></tr>
{holds}</table>
<h2>How the figures were obtained</h2><ul>{methods}</ul>
<p>Emissions = energy x PUE x grid intensity (location-based, GHG Protocol scope 2); each row names its
intensity source and year. See docs/energy.md.</p>
<script>/* for checks in a headless browser: how many plots decoded */
window.addEventListener("load", () => {{ const im = [...document.querySelectorAll("img.plot")];
  document.body.dataset.plotsLoaded = im.filter(x => x.complete && x.naturalWidth > 0).length + "/" + im.length; }});
</script>
</body></html>
"""


def write_report(doc: dict, out) -> dict:
    """Write ``out`` (.html) and the .json and .csv beside it; returns {kind: path}."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise EnergyError(f"the report path must end in .html (the .json and .csv go beside it), got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = plots(doc)
    paths = {"html": out, "json": out.with_suffix(".json"), "csv": out.with_suffix(".csv")}
    paths["html"].write_text(to_html(doc, images), encoding="utf-8")
    paths["json"].write_text(json.dumps(doc, indent=1), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in doc["rows"]:
            w.writerow([r["model"], r["variant"], r[doc["by"]]] +
                       [("; ".join(r[k]) if k == "sources" else r[k]) for k in CSV_COLUMNS[3:]])
    return {k: str(v) for k, v in paths.items()}


__all__ = ["build_report", "write_report", "plots", "to_html"]
