"""The carbon offsets ledger: a SQLite database (a real file; path configurable) of credit purchases,
their retirements against measured emissions, and an append-only, hash-chained audit log.

    led = Ledger("offsets.db")                      # or LLMASOS_ENERGY_DB, or ~/.local/share/llmasos/energy.db
    led.purchase("Gold Standard", "GS1-1-IN-GS1234-16-2021-1-1-100", tonnes=2.0, vintage=2021, kind="removal")
    led.record_emissions("2026-12", grams=1520.0, source="llmasos report")
    led.retire("Gold Standard", "GS1-1-...", tonnes=0.0015, period="2026-12")
    led.summary(until="2026-12")   # per period: gross, offset, net tonnes

Rules (each refusal is a LedgerError naming what and why): a credit (registry, serial) is recorded once; a
retirement needs a recorded credit with enough unretired tonnes (no retiring more than held), a claim id
retires once (no double retirement: the same claim twice, or a credit already fully retired), and by default
no more than the period's not-yet-offset emissions. Periods are a year 'YYYY', a month 'YYYY-MM' or a day
'YYYY-MM-DD'; a period contains the periods inside it: the gross emissions of "2026-12" are the emissions
recorded for "2026-12" or any of its days plus the runs of its days, and a retirement against "2026-12-07"
also counts against "2026-12" and "2026" (none of them may end up offset beyond its gross). Rows of purchases, retirements and the audit log cannot
be updated or deleted (SQL triggers refuse it). Every write is one ``BEGIN IMMEDIATE`` transaction (writers
serialise; readers see the last commit, WAL), so a writer killed mid-transaction leaves the last committed
state; ``verify()`` re-checks the audit chain and the balances.

Quantities are stored as integer milligrams CO2e, so sums and comparisons are exact (and a small run's
emissions do not round to nothing).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

from .carbon import emissions as _emissions, grid_intensity
from .errors import LedgerError

MG_PER_T = 1_000_000_000
PERIOD_PATTERN = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS purchases (
  id INTEGER PRIMARY KEY, registry TEXT NOT NULL, serial TEXT NOT NULL, project TEXT NOT NULL DEFAULT '',
  mg INTEGER NOT NULL CHECK (mg > 0), vintage INTEGER NOT NULL, kind TEXT NOT NULL,
  recorded_at TEXT NOT NULL, UNIQUE (registry, serial));
CREATE TABLE IF NOT EXISTS retirements (
  id INTEGER PRIMARY KEY, purchase_id INTEGER NOT NULL REFERENCES purchases(id), claim TEXT NOT NULL UNIQUE,
  mg INTEGER NOT NULL CHECK (mg > 0), period TEXT NOT NULL, beneficiary TEXT NOT NULL DEFAULT '',
  recorded_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS emissions (
  id INTEGER PRIMARY KEY, period TEXT NOT NULL, mg INTEGER NOT NULL CHECK (mg >= 0), source TEXT NOT NULL,
  estimated INTEGER NOT NULL DEFAULT 0, recorded_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY, at TEXT NOT NULL, model TEXT NOT NULL, variant TEXT NOT NULL, target TEXT NOT NULL,
  tokens INTEGER NOT NULL CHECK (tokens >= 0), seconds REAL NOT NULL CHECK (seconds > 0),
  joules REAL NOT NULL CHECK (joules >= 0), idle_joules REAL NOT NULL, estimated INTEGER NOT NULL,
  method TEXT NOT NULL, region TEXT NOT NULL, g_per_kwh REAL NOT NULL, intensity_source TEXT NOT NULL,
  intensity_year INTEGER, pue REAL NOT NULL, grams REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY, at TEXT NOT NULL, action TEXT NOT NULL, payload TEXT NOT NULL,
  prev TEXT NOT NULL, hash TEXT NOT NULL);
"""
_APPEND_ONLY = ("purchases", "retirements", "emissions", "runs", "audit")


def default_path() -> Path:
    env = os.environ.get("LLMASOS_ENERGY_DB")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "llmasos" / "energy.db"


def connect(path: Union[str, Path, None] = None) -> sqlite3.Connection:
    """A connection to the energy database (autocommit: callers open their own transactions)."""
    p = Path(path) if path is not None else default_path()
    if p.exists() and p.is_dir():
        raise LedgerError(f"energy database path {p} is a directory; give a file path")
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), timeout=60, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA foreign_keys=ON")
    con.execute("PRAGMA busy_timeout=60000")
    return con


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _mg(tonnes, what: str) -> int:
    if isinstance(tonnes, bool) or not isinstance(tonnes, (int, float)) or not tonnes > 0 or tonnes == float("inf"):
        raise LedgerError(f"{what} must be a positive number of tonnes CO2e, got {tonnes!r}")
    g = round(tonnes * MG_PER_T)
    if g < 1:
        raise LedgerError(f"{what} of {tonnes!r} t is below the ledger's resolution of 1 milligram")
    return g


def check_period(p: str, what: str = "period") -> str:
    """A period: a year 'YYYY', a month 'YYYY-MM' or a day 'YYYY-MM-DD' (a real calendar date). A period
    contains the periods its string prefixes: '2026' holds '2026-12', which holds '2026-12-07'."""
    if not isinstance(p, str) or not PERIOD_PATTERN.match(p):
        raise LedgerError(f"{what} must be 'YYYY', 'YYYY-MM' or 'YYYY-MM-DD', got {p!r}")
    y, m, d = (p.split("-") + ["01", "01"])[:3]
    try:
        _dt.date(int(y), int(m), int(d))
    except ValueError:
        raise LedgerError(f"{what} {p!r} is not a calendar {('year', 'month', 'day')[p.count('-')]}: "
                          f"months are 01-12, days exist in their month") from None
    return p


def _ancestors(p: str) -> list:
    """The period and the periods that contain it, largest first: '2026-12-07' -> 2026, 2026-12, 2026-12-07."""
    return [p[:n] for n in (4, 7, 10) if n <= len(p)]


def _span(p: str) -> tuple:
    """A (valid) period's first and last day."""
    y = int(p[:4])
    if len(p) == 4:
        return _dt.date(y, 1, 1), _dt.date(y, 12, 31)
    m = int(p[5:7])
    if len(p) == 7:
        nxt = _dt.date(y + (m == 12), m % 12 + 1, 1)
        return _dt.date(y, m, 1), nxt - _dt.timedelta(days=1)
    d = _dt.date(y, m, int(p[8:10]))
    return d, d


def _within(p: str, since: Optional[str], until: Optional[str]) -> bool:
    """Whether period ``p`` lies inside [since, until] (periods, inclusive: until '2026-12' includes its days;
    the year '2026' is not inside since '2026-12')."""
    first, last = _span(p)
    return (since is None or first >= _span(since)[0]) and (until is None or last <= _span(until)[1])


class Ledger:
    def __init__(self, path: Union[str, Path, None] = None):
        self.path = Path(path) if path is not None else default_path()
        self._con = connect(self.path)
        self._hook: Optional[Callable[[str], None]] = None    # tests: called inside a write transaction
        with self._write("open"):
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._con.execute(stmt)
            for t in _APPEND_ONLY:
                for op in ("UPDATE", "DELETE"):
                    self._con.execute(f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t} "
                                      f"BEGIN SELECT RAISE(ABORT, '{t} is append-only: {op} refused'); END")

    def close(self) -> None:
        self._con.close()

    # -- transactions --------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, led: "Ledger", what: str):
            self.led, self.what = led, what

        def __enter__(self):
            self.led._con.execute("BEGIN IMMEDIATE")
            return self.led._con

        def __exit__(self, et, ev, tb):
            con = self.led._con
            if et is None:
                con.execute("COMMIT")
            else:
                con.execute("ROLLBACK")
            return False

    def _write(self, what: str) -> "_Tx":
        return Ledger._Tx(self, what)

    def _audit(self, con, action: str, payload: dict) -> None:
        row = con.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        prev = row[0] if row else "genesis"
        at = _now()
        body = json.dumps(payload, sort_keys=True)
        h = hashlib.sha256(f"{prev}|{at}|{action}|{body}".encode()).hexdigest()
        if self._hook is not None:
            self._hook(action)
        con.execute("INSERT INTO audit (at, action, payload, prev, hash) VALUES (?, ?, ?, ?, ?)",
                    (at, action, body, prev, h))

    # -- writes --------------------------------------------------------------------------------------
    def purchase(self, registry: str, serial: str, tonnes: float, vintage: int, kind: str,
                 project: str = "") -> int:
        """Record a credit bought: registry, serial (or project id), tonnes CO2e, vintage year, type
        (e.g. "removal", "avoidance", "REC"). Returns its id."""
        for name, v in (("registry", registry), ("serial", serial), ("kind", kind)):
            if not isinstance(v, str) or not v.strip():
                raise LedgerError(f"purchase: {name} must be a non-empty string, got {v!r}")
        if isinstance(vintage, bool) or not isinstance(vintage, int) or not 1990 <= vintage <= 2100:
            raise LedgerError(f"purchase: vintage must be a year (int), got {vintage!r}")
        g = _mg(tonnes, "purchase tonnes")
        with self._write("purchase") as con:
            if con.execute("SELECT 1 FROM purchases WHERE registry = ? AND serial = ?", (registry, serial)).fetchone():
                raise LedgerError(f"credit {registry} {serial} is already recorded: a serial is bought once")
            cur = con.execute("INSERT INTO purchases (registry, serial, project, mg, vintage, kind, recorded_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", (registry, serial, project, g, vintage, kind, _now()))
            pid = cur.lastrowid
            self._audit(con, "purchase", {"id": pid, "registry": registry, "serial": serial, "project": project,
                                          "mg": g, "vintage": vintage, "kind": kind})
        return pid

    def record_emissions(self, period: str, grams: float, source: str, estimated: bool = False) -> int:
        """Add measured (or estimated) gross emissions to a period."""
        period = check_period(period)
        if isinstance(grams, bool) or not isinstance(grams, (int, float)) or not 0 <= grams < float("inf"):
            raise LedgerError(f"emissions must be a finite number of grams >= 0, got {grams!r}")
        if not isinstance(source, str) or not source.strip():
            raise LedgerError("emissions need a source (what measured them)")
        g = round(grams * 1000)
        with self._write("emissions") as con:
            cur = con.execute("INSERT INTO emissions (period, mg, source, estimated, recorded_at) VALUES "
                              "(?, ?, ?, ?, ?)", (period, g, source, int(bool(estimated)), _now()))
            self._audit(con, "emissions", {"id": cur.lastrowid, "period": period, "mg": g, "source": source,
                                           "estimated": bool(estimated)})
        return cur.lastrowid

    def record_run(self, window, *, model: str, variant: str = "default", target: str = "cpu",
                   region="USA", pue: float = 1.0, at: Optional[str] = None) -> int:
        """Record a measured window (a closed ``measure()`` window, or its ``as_dict()``) of ``model`` /
        ``variant`` run in ``region`` (see carbon.grid_intensity) with ``pue``; its location-based emissions
        count towards the gross emissions of its UTC day (summed per day, then rounded to the milligram, so
        sub-milligram runs add up). ``at``: when it ran (ISO 8601, UTC;
        default now, or the window's start)."""
        d = window.as_dict() if hasattr(window, "as_dict") else dict(window)
        for k in ("joules", "seconds", "estimated"):
            if k not in d:
                raise LedgerError(f"record_run needs a measurement window (with {k!r}); got keys {sorted(d)}")
        if not d["seconds"] > 0:
            raise LedgerError(f"record_run: the window lasted {d['seconds']!r} s; a run must take time")
        for name, v in (("model", model), ("variant", variant), ("target", target)):
            if not isinstance(v, str) or not v.strip():
                raise LedgerError(f"record_run: {name} must be a non-empty string, got {v!r}")
        if at is None:
            started = getattr(window, "started_at", None)
            when = (_dt.datetime.fromtimestamp(started, _dt.timezone.utc) if started else
                    _dt.datetime.now(_dt.timezone.utc))
        else:
            try:
                when = _dt.datetime.fromisoformat(at)
            except (TypeError, ValueError):
                raise LedgerError(f"record_run: at must be an ISO 8601 time, got {at!r}") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=_dt.timezone.utc)
            when = when.astimezone(_dt.timezone.utc)
        inten = grid_intensity(region)
        rep = _emissions(float(d["joules"]), inten, pue=pue, estimated=bool(d["estimated"]))
        stamp = when.isoformat(timespec="microseconds")
        tokens = int(d.get("tokens") or 0)
        method = "; ".join(sorted({v.get("method", "") for v in d.get("devices", {}).values()})) or "none"
        with self._write("run") as con:
            cur = con.execute(
                "INSERT INTO runs (at, model, variant, target, tokens, seconds, joules, idle_joules, estimated, "
                "method, region, g_per_kwh, intensity_source, intensity_year, pue, grams) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stamp, model, variant, target, tokens, float(d["seconds"]), float(d["joules"]),
                 float(d.get("idle_joules") or 0.0), int(bool(d["estimated"])), method, inten.region,
                 inten.g_per_kwh, inten.source, inten.year, float(pue), rep.location_g))
            self._audit(con, "run", {"id": cur.lastrowid, "at": stamp, "model": model, "variant": variant,
                                     "joules": float(d["joules"]), "tokens": tokens, "grams": rep.location_g})
        return cur.lastrowid

    def runs(self, since: Optional[str] = None, until: Optional[str] = None) -> list:
        """The recorded runs (dicts), oldest first, with ``at`` in [since, until] (ISO dates or times)."""
        cols = ("id", "at", "model", "variant", "target", "tokens", "seconds", "joules", "idle_joules", "estimated",
                "method", "region", "g_per_kwh", "intensity_source", "intensity_year", "pue", "grams")
        q, args = f"SELECT {', '.join(cols)} FROM runs WHERE 1=1", []
        if since:
            q, args = q + " AND at >= ?", args + [since]
        if until:
            q, args = q + " AND at < ?", args + [until + ("~" if len(until) <= 10 else "")]
        out = [dict(zip(cols, r)) for r in self._con.execute(q + " ORDER BY at, id", args)]
        for r in out:
            r["estimated"] = bool(r["estimated"])
        return out

    @staticmethod
    def _gross_mg(con, period: str) -> int:
        """A period's gross emissions (mg): the emissions recorded for it or for a period inside it, plus the
        runs inside it, each UTC day's runs rounded to the milligram (as ``summary`` books them)."""
        n = len(period)
        rec = con.execute("SELECT COALESCE(SUM(mg), 0) FROM emissions WHERE substr(period, 1, ?) = ?",
                          (n, period)).fetchone()[0]
        days = con.execute("SELECT SUM(grams) FROM runs WHERE substr(at, 1, ?) = ? GROUP BY substr(at, 1, 10)",
                           (n, period)).fetchall()
        return rec + sum(round(g * 1000) for (g,) in days)

    @staticmethod
    def _retired_mg(con, period: str) -> int:
        """The milligrams retired against ``period`` or a period inside it."""
        return con.execute("SELECT COALESCE(SUM(mg), 0) FROM retirements WHERE substr(period, 1, ?) = ?",
                           (len(period), period)).fetchone()[0]

    def retire(self, registry: str, serial: str, tonnes: float, period: str, beneficiary: str = "",
               claim: Optional[str] = None, allow_over_offset: bool = False) -> int:
        """Retire ``tonnes`` of a held credit against the emissions of ``period``. ``claim``: the retirement's
        id (the registry's retirement serial; a fresh one when not given) -- retiring a claim twice is refused."""
        period = check_period(period)
        g = _mg(tonnes, "retired tonnes")
        claim = claim or f"llmasos-{uuid.uuid4()}"
        with self._write("retire") as con:
            row = con.execute("SELECT id, mg FROM purchases WHERE registry = ? AND serial = ?",
                              (registry, serial)).fetchone()
            if row is None:
                raise LedgerError(f"cannot retire {registry} {serial}: no such credit was purchased")
            pid, held = row
            if con.execute("SELECT 1 FROM retirements WHERE claim = ?", (claim,)).fetchone():
                raise LedgerError(f"double retirement refused: claim {claim!r} was already retired")
            retired = con.execute("SELECT COALESCE(SUM(mg), 0) FROM retirements WHERE purchase_id = ?",
                                  (pid,)).fetchone()[0]
            if retired >= held:
                raise LedgerError(f"double retirement refused: credit {registry} {serial} is already fully retired "
                                  f"({held / MG_PER_T:g} t)")
            if retired + g > held:
                raise LedgerError(f"cannot retire {g / MG_PER_T:g} t of {registry} {serial}: only "
                                  f"{(held - retired) / MG_PER_T:g} t of its {held / MG_PER_T:g} t remain unretired")
            if not allow_over_offset:
                # the retirement offsets the period and every period containing it (its month, its year):
                # none of them may end up offset beyond its gross emissions
                for p in reversed(_ancestors(period)):
                    gross, done = self._gross_mg(con, p), self._retired_mg(con, p)
                    if done + g > gross:
                        within = "" if p == period else f" (which contains {period})"
                        raise LedgerError(f"retiring {g / MG_PER_T:g} t against period {period} would offset more "
                                          f"than period {p}{within} has of not-yet-offset emissions: "
                                          f"{max(gross - done, 0) / MG_PER_T:g} t "
                                          f"(pass allow_over_offset=True to retire anyway)")
            cur = con.execute("INSERT INTO retirements (purchase_id, claim, mg, period, beneficiary, recorded_at) "
                              "VALUES (?, ?, ?, ?, ?, ?)", (pid, claim, g, period, beneficiary, _now()))
            self._audit(con, "retire", {"id": cur.lastrowid, "purchase_id": pid, "claim": claim, "mg": g,
                                        "period": period, "beneficiary": beneficiary})
        return cur.lastrowid

    # -- reads ---------------------------------------------------------------------------------------
    def holdings(self) -> list:
        """[{registry, serial, vintage, kind, tonnes, retired_t, held_t}] per credit."""
        rows = self._con.execute(
            "SELECT p.registry, p.serial, p.vintage, p.kind, p.mg, COALESCE(SUM(r.mg), 0) FROM purchases p "
            "LEFT JOIN retirements r ON r.purchase_id = p.id GROUP BY p.id ORDER BY p.id").fetchall()
        return [{"registry": a, "serial": b, "vintage": v, "kind": k, "tonnes": g / MG_PER_T,
                 "retired_t": r / MG_PER_T, "held_t": (g - r) / MG_PER_T} for a, b, v, k, g, r in rows]

    def summary(self, since: Optional[str] = None, until: Optional[str] = None) -> list:
        """Per period (sorted) that has emissions, runs or retirements booked to it: its gross emissions,
        the offsets retired against it, net (all tonnes CO2e). A period's figures include the periods inside
        it (a month row counts its days' runs and the retirements against its days), so rows of nested
        periods overlap. ``since``/``until``: periods (inclusive; '2026-12' includes its days); a row is kept
        when its period lies inside [since, until] (so the rows' outermost periods do not overlap and their
        figures add up to the window's totals)."""
        since = None if since is None else check_period(since, "since")
        until = None if until is None else check_period(until, "until")
        if since and until and _span(since)[0] > _span(until)[1]:
            raise LedgerError(f"since {since!r} is after until {until!r}")
        periods = {p for (p,) in self._con.execute("SELECT DISTINCT period FROM emissions")}
        periods |= {p for (p,) in self._con.execute("SELECT DISTINCT substr(at, 1, 10) FROM runs")}
        periods |= {p for (p,) in self._con.execute("SELECT DISTINCT period FROM retirements")}
        est_rec = [p for (p,) in self._con.execute("SELECT DISTINCT period FROM emissions WHERE estimated = 1")]
        est_rec += [p for (p,) in self._con.execute("SELECT DISTINCT substr(at, 1, 10) FROM runs "
                                                    "WHERE estimated = 1")]
        out = []
        for p in sorted(periods):
            if not _within(p, since, until):
                continue
            g, o = self._gross_mg(self._con, p), self._retired_mg(self._con, p)
            est = {q for q in est_rec if q.startswith(p)}
            out.append({"period": p, "gross_t": g / MG_PER_T, "offset_t": o / MG_PER_T, "net_t": (g - o) / MG_PER_T,
                        "estimated": bool(est)})
        return out

    def audit_log(self) -> list:
        return [{"id": i, "at": at, "action": a, "payload": json.loads(p), "hash": h}
                for i, at, a, p, h in self._con.execute("SELECT id, at, action, payload, hash FROM audit ORDER BY id")]

    def verify(self) -> None:
        """Re-check the audit hash chain and that every purchase/retirement/emission row has its audit entry;
        raises LedgerError on the first inconsistency."""
        prev = "genesis"
        seen = {"purchase": set(), "retire": set(), "emissions": set(), "run": set()}
        for i, at, action, body, p, h in self._con.execute("SELECT id, at, action, payload, prev, hash FROM audit "
                                                            "ORDER BY id"):
            if p != prev or hashlib.sha256(f"{p}|{at}|{action}|{body}".encode()).hexdigest() != h:
                raise LedgerError(f"audit log entry {i} ({action}) breaks the hash chain")
            prev = h
            seen.setdefault(action, set()).add(json.loads(body)["id"])
        for table, action in (("purchases", "purchase"), ("retirements", "retire"), ("emissions", "emissions"),
                              ("runs", "run")):
            ids = {r[0] for r in self._con.execute(f"SELECT id FROM {table}")}
            if ids != seen[action]:
                raise LedgerError(f"{table} rows {sorted(ids ^ seen[action])} have no matching audit entry")
        for h in self.holdings():
            if h["held_t"] < 0:
                raise LedgerError(f"credit {h['registry']} {h['serial']} is over-retired")

