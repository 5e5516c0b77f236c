"""The sustainability report: data from recorded runs and the ledger, HTML + JSON + CSV, rendered in headless
Chromium with every plot decoded."""
import csv
import json
import re
import shutil
import subprocess

import pytest

from llmasos.energy import CounterMeter, Ledger, measure
from llmasos.energy.report import build_report, write_report


def _window(joules, tokens, seconds_work=0.01, estimated=False):
    c = {"j": 0.0}
    m = CounterMeter("cpu", lambda: c["j"], "estimated: test" if estimated else "measured: test",
                     estimated=estimated)
    with measure("run", meters=[m], idle=None, tokens=tokens) as w:
        c["j"] += joules
    return w


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "e.db")
    # two models x variants over two days, France and an explicit grid
    led.record_run(_window(3.6e5, 1000), model="smollm2", variant="f32", region="FRA", at="2026-12-01T10:00:00")
    led.record_run(_window(1.8e5, 1000), model="smollm2", variant="int8", region="FRA", at="2026-12-01T11:00:00")
    led.record_run(_window(3.6e5, 2000, estimated=True), model="smollm2", variant="int8", region=500, pue=1.2,
                   at="2026-12-02T09:00:00")
    led.record_run(_window(7.2e5, 500), model="llama-1b", variant="f16", region=500, at="2026-11-20T09:00:00")
    led.purchase("Gold Standard", "GS-7", tonnes=0.001, vintage=2024, kind="removal")
    led.retire("Gold Standard", "GS-7", tonnes=0.00005, period="2026-12-02")
    yield led
    led.close()


def test_report_data(ledger):
    doc = build_report(ledger, since="2026-12-01")
    assert doc["runs"] == 3 and doc["estimated"]
    rows = {(r["variant"], r["day"]): r for r in doc["rows"]}
    fra = rows[("f32", "2026-12-01")]
    assert fra["kwh"] == pytest.approx(0.1) and fra["joules_per_token"] == pytest.approx(360.0)
    from llmasos.energy import grid_intensity
    g = grid_intensity("FRA").g_per_kwh
    assert fra["grams"] == pytest.approx(0.1 * g)
    assert fra["g_per_1k_tokens"] == pytest.approx(0.1 * g)
    day2 = rows[("int8", "2026-12-02")]
    assert day2["grams"] == pytest.approx(0.1 * 1.2 * 500) and day2["estimated"]
    # int8 dominates f32 (same tokens/s here, half the J/token on day 1, less over the period)
    front = {p["variant"] for p in doc["variants"] if p["pareto"]}
    assert "int8" in front
    # ledger: gross per day (rounded grams), the retirement against 2026-12-02
    offs = {o["period"]: o for o in doc["offsets"]}
    assert offs["2026-12-02"]["offset_t"] == pytest.approx(5e-5)
    assert offs["2026-12-02"]["gross_t"] == pytest.approx(60e-6)
    assert doc["totals"]["net_t"] == pytest.approx(doc["totals"]["gross_t"] - 5e-5)


def test_report_files_and_headless_chromium(ledger, tmp_path):
    doc = build_report(ledger)
    paths = write_report(doc, tmp_path / "report.html")
    data = json.loads(open(paths["json"]).read())
    assert data["runs"] == 4
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"]) == 4 and {"joules_per_token", "g_per_1k_tokens", "sources"} <= set(rows[0])
    html = open(paths["html"]).read()
    assert html.count('class="plot"') == 3 and "estimated" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=10000", "--dump-dom", f"file://{paths['html']}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'data-plots-loaded="(\d+)/(\d+)"', out.stdout)
    assert m, "the page's load script did not run in Chromium"
    assert m.groups() == ("3", "3"), f"plots decoded in Chromium: {m.group(0)}"
    for pid in ("plot-pareto", "plot-emissions", "plot-offsets"):
        assert f'id="{pid}"' in out.stdout


def test_report_cli(ledger, tmp_path, capsys):
    from llmasos.cli import main
    out = tmp_path / "r" / "report.html"
    assert main(["report", "--db", str(ledger.path), "--since", "2026-12-01", "-o", str(out)]) == 0
    assert out.exists() and out.with_suffix(".json").exists() and out.with_suffix(".csv").exists()
    assert main(["report", "--db", str(ledger.path), "--since", "yesterday", "-o", str(out)]) == 2
    assert "ISO date" in capsys.readouterr().err
