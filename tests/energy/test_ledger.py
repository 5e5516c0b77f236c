"""The offsets ledger: refusals, append-only audit, concurrent writers, a writer killed mid-transaction."""
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmasos.energy import Ledger, LedgerError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def led(tmp_path):
    led = Ledger(tmp_path / "offsets.db")
    yield led
    led.close()


def test_purchase_retire_and_summary(led):
    led.purchase("Gold Standard", "GS-1", tonnes=2.0, vintage=2021, kind="removal", project="GS1234")
    led.record_emissions("2026-12", grams=1_500_000, source="test")
    led.retire("Gold Standard", "GS-1", tonnes=1.2, period="2026-12", claim="R-1")
    s = led.summary()
    assert s == [{"period": "2026-12", "gross_t": 1.5, "offset_t": 1.2, "net_t": pytest.approx(0.3),
                  "estimated": False}]
    h = led.holdings()[0]
    assert (h["tonnes"], h["retired_t"], h["held_t"]) == (2.0, 1.2, pytest.approx(0.8))
    led.verify()
    assert [e["action"] for e in led.audit_log()] == ["purchase", "emissions", "retire"]


def test_refusals(led):
    led.purchase("Verra", "VCS-9", tonnes=1.0, vintage=2020, kind="avoidance")
    led.record_emissions("2026", grams=5_000_000, source="test")
    with pytest.raises(LedgerError, match="already recorded"):
        led.purchase("Verra", "VCS-9", tonnes=1.0, vintage=2020, kind="avoidance")
    led.retire("Verra", "VCS-9", tonnes=0.4, period="2026", claim="C-1")
    with pytest.raises(LedgerError, match="double retirement refused: claim"):
        led.retire("Verra", "VCS-9", tonnes=0.1, period="2026", claim="C-1")
    with pytest.raises(LedgerError, match=r"only 0.6 t"):
        led.retire("Verra", "VCS-9", tonnes=0.7, period="2026")
    led.retire("Verra", "VCS-9", tonnes=0.6, period="2026")
    with pytest.raises(LedgerError, match="already fully retired"):
        led.retire("Verra", "VCS-9", tonnes=0.1, period="2026")
    with pytest.raises(LedgerError, match="no such credit"):
        led.retire("Verra", "nope", tonnes=0.1, period="2026")
    # retiring more than the period's emissions is refused unless asked for
    led.purchase("Verra", "VCS-10", tonnes=10.0, vintage=2022, kind="avoidance")
    with pytest.raises(LedgerError, match="offset more than"):
        led.retire("Verra", "VCS-10", tonnes=5.0, period="2026")
    for bad in (dict(tonnes=-1), dict(tonnes=0), dict(period="Dec 2026")):
        kw = {"tonnes": 0.1, "period": "2026", **bad}
        with pytest.raises(LedgerError):
            led.retire("Verra", "VCS-10", **kw)
    assert sum(h["retired_t"] for h in led.holdings()) == pytest.approx(1.0)
    led.verify()


def test_append_only(led):
    led.purchase("GS", "A", tonnes=1.0, vintage=2021, kind="removal")
    for sql in ("UPDATE purchases SET mg = 5", "DELETE FROM purchases", "DELETE FROM audit",
                "UPDATE audit SET action = 'x'"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            led._con.execute(sql)
    led.verify()


def _retire_worker(path, n, out):
    led = Ledger(path)
    ok = 0
    for _ in range(n):
        try:
            led.retire("GS", "POOL", tonnes=0.15, period="2026", allow_over_offset=True)
            ok += 1
        except LedgerError:
            pass
    led.close()
    out.put(ok)


def test_concurrent_writers_never_over_retire(tmp_path):
    path = tmp_path / "c.db"
    led = Ledger(path)
    led.purchase("GS", "POOL", tonnes=1.0, vintage=2021, kind="removal")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_retire_worker, args=(path, 2, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ok = sum(q.get(timeout=5) for _ in procs)
    assert ok == 6                               # 6 x 0.15 = 0.9 t; a 7th would exceed the 1 t held
    assert led.holdings()[0]["retired_t"] == pytest.approx(0.9)
    led.verify()
    led.close()


def test_a_killed_writer_leaves_the_ledger_consistent(tmp_path):
    path = tmp_path / "k.db"
    marker = tmp_path / "inside"
    led = Ledger(path)
    led.purchase("GS", "K", tonnes=1.0, vintage=2021, kind="removal")
    led.record_emissions("2026", grams=1_000_000, source="test")
    led.close()
    child = textwrap.dedent(f"""
        import time
        from llmasos.energy import Ledger
        led = Ledger({str(path)!r})
        def hang(action):
            if action == "retire":      # inside the transaction: the retirement row is written, its audit not
                open({str(marker)!r}, "w").close()
                time.sleep(120)
        led._hook = hang
        led.retire("GS", "K", tonnes=0.5, period="2026", claim="KILLED")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert p.poll() is None, "the writer died before reaching its transaction"
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    led = Ledger(path)
    assert led.holdings()[0]["retired_t"] == 0.0              # the killed transaction left nothing
    led.verify()
    led.retire("GS", "K", tonnes=0.5, period="2026", claim="KILLED")   # and the database is writable again
    assert led.holdings()[0]["retired_t"] == 0.5
    led.verify()
    led.close()


def test_small_runs_do_not_round_to_nothing(led):
    # emissions are booked in integer milligrams: sub-gram runs count (integer grams would book 0 g)
    for _ in range(3):
        led.record_emissions("2026-12-07", grams=0.0004, source="tiny run")
    assert led.summary()[0]["gross_t"] == pytest.approx(0.0, abs=1e-12)   # 0.4 mg rounds to 0 mg ...
    for _ in range(5):
        led.record_emissions("2026-12-08", grams=0.0016, source="small run")
    assert led.summary()[1]["gross_t"] == pytest.approx(5 * 2e-9)          # ... 1.6 mg books 2 mg each
    led.record_emissions("2026-12-09", grams=1.234, source="run")
    assert led.summary()[2]["gross_t"] == pytest.approx(1.234e-6)


def test_runs_count_towards_their_day(led):
    # 5 runs of 0.4 mg on one day: each alone would round to 0 mg, together they book 2 mg
    for i in range(5):
        led.record_run({"joules": 0.4e-3 / 500 * 3.6e6, "seconds": 1.0, "tokens": 10, "estimated": True},
                       model="m", variant="v", region=500, at=f"2026-12-07T10:0{i}:00")
    s = led.summary()
    assert s == [{"period": "2026-12-07", "gross_t": pytest.approx(2e-9), "offset_t": 0.0,
                  "net_t": pytest.approx(2e-9), "estimated": True}]
    assert sum(r["grams"] for r in led.runs()) == pytest.approx(2e-3)
    led.purchase("GS", "R", tonnes=1e-6, vintage=2024, kind="removal")
    led.retire("GS", "R", tonnes=2e-9, period="2026-12-07")                 # exactly the day's gross
    with pytest.raises(LedgerError, match="offset more than"):
        led.retire("GS", "R", tonnes=1e-9, period="2026-12-07")
    led.verify()


def _run(led, grams, at):
    # a window whose location-based emissions at an explicit 500 gCO2e/kWh are exactly ``grams``
    led.record_run({"joules": grams / 500 * 3.6e6, "seconds": 1.0, "tokens": 10, "estimated": False},
                   model="m", region=500, at=at)


def test_month_and_year_periods_hold_their_days(led):
    _run(led, 2.0, "2026-12-07T10:00:00")
    _run(led, 3.0, "2026-12-08T23:59:59")
    led.record_emissions("2026-12-15", grams=1.0, source="test")
    led.record_emissions("2026-11", grams=10.0, source="test")        # another month: not December's
    led.record_emissions("2027-01-01", grams=7.0, source="test")      # nor is the next year's first day
    led.purchase("GS", "M", tonnes=1.0, vintage=2024, kind="removal")
    # December's gross is its days' runs and emissions: 2 + 3 + 1 g = 6e-6 t, all retirable at once
    with pytest.raises(LedgerError, match=r"period 2026-12 .*6e-06 t"):
        led.retire("GS", "M", tonnes=6.001e-6, period="2026-12")
    led.retire("GS", "M", tonnes=6e-6, period="2026-12")
    # the month is fully offset, so its days (inside it) are too, although each day alone has emissions left
    with pytest.raises(LedgerError, match=r"period 2026-12 \(which contains 2026-12-07\)"):
        led.retire("GS", "M", tonnes=1e-6, period="2026-12-07")
    # the year holds November's 10 g as well: 10 g of it are left
    led.retire("GS", "M", tonnes=10e-6, period="2026")
    with pytest.raises(LedgerError, match="offset more than period 2026 "):
        led.retire("GS", "M", tonnes=1e-9, period="2026")
    s = {r["period"]: r for r in led.summary(until="2026-12")}
    assert sorted(s) == ["2026", "2026-11", "2026-12", "2026-12-07", "2026-12-08", "2026-12-15"]
    assert (s["2026-12"]["gross_t"], s["2026-12"]["offset_t"], s["2026-12"]["net_t"]) == (6e-6, 6e-6, 0.0)
    assert (s["2026"]["gross_t"], s["2026"]["offset_t"], s["2026"]["net_t"]) == (16e-6, 16e-6, 0.0)
    assert (s["2026-12-07"]["gross_t"], s["2026-12-07"]["offset_t"]) == (2e-6, 0.0)
    # a month includes its days at both ends; the year is not inside December, the next year not before it
    assert [r["period"] for r in led.summary(since="2026-12", until="2026-12")] == \
        ["2026-12", "2026-12-07", "2026-12-08", "2026-12-15"]
    assert [r["period"] for r in led.summary(since="2026-12-08", until="2026-12-15")] == ["2026-12-08", "2026-12-15"]
    assert [r["period"] for r in led.summary(since="2027")] == ["2027-01-01"]
    assert led.summary(until="2026-10") == []
    # the report totals the outermost periods only (the year holds the months, which hold the days)
    from llmasos.energy.report import build_report
    doc = build_report(led, since="2026", until="2026")
    assert doc["runs"] == 2
    assert (doc["totals"]["gross_t"], doc["totals"]["offset_t"]) == (pytest.approx(16e-6), pytest.approx(16e-6))
    doc = build_report(led, since="2026-12", until="2026-12")
    assert (doc["totals"]["gross_t"], doc["totals"]["offset_t"]) == (pytest.approx(6e-6), pytest.approx(6e-6))
    led.verify()


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "2026-02-30", "2026-1", "26-12", "2026/12", "", 202612])
def test_malformed_periods_are_refused(led, bad):
    led.purchase("GS", "P", tonnes=1.0, vintage=2024, kind="removal")
    with pytest.raises(LedgerError, match="period"):
        led.retire("GS", "P", tonnes=1e-6, period=bad, allow_over_offset=True)
    with pytest.raises(LedgerError, match="period"):
        led.record_emissions(bad, grams=1.0, source="test")
    with pytest.raises(LedgerError, match="until"):
        led.summary(until=bad)
    with pytest.raises(LedgerError, match="since"):
        led.summary(since=bad)


def test_summary_refuses_an_empty_window(led):
    with pytest.raises(LedgerError, match="after until"):
        led.summary(since="2027", until="2026-12")
