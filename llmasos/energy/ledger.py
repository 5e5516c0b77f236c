"""The carbon offsets ledger: a SQLite database (a real file; path configurable) of credit purchases,
their retirements against measured emissions, and an append-only, hash-chained audit log.

    led = Ledger("offsets.db")                      # or LLMASOS_ENERGY_DB, or ~/.local/share/llmasos/energy.db
    led.purchase("Gold Standard", "GS1-1-IN-GS1234-16-2021-1-1-100", tonnes=2.0, vintage=2021, kind="removal")
    led.record_emissions("2026-12", grams=1520.0, source="llmasos report")
    led.retire("Gold Standard", "GS1-1-...", tonnes=0.0015, period="2026-12")
    led.summary()   # per period: gross, offset, net tonnes

Rules (each refusal is a LedgerError naming what and why): a credit (registry, serial) is recorded once; a
retirement needs a recorded credit with enough unretired tonnes (no retiring more than held), a claim id
retires once (no double retirement: the same claim twice, or a credit already fully retired), and by default
no more than the period's not-yet-offset emissions. Rows of purchases, retirements and the audit log cannot
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
_PERIOD = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")

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


def _period(p: str) -> str:
    if not isinstance(p, str) or not _PERIOD.match(p):
        raise LedgerError(f"period must be 'YYYY', 'YYYY-MM' or 'YYYY-MM-DD', got {p!r}")
    return p


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
        period = _period(period)
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
        """A period's gross emissions (mg): emissions recorded for it, plus the runs of that UTC day."""
        rec = con.execute("SELECT COALESCE(SUM(mg), 0) FROM emissions WHERE period = ?", (period,)).fetchone()[0]
        runs = con.execute("SELECT COALESCE(SUM(grams), 0.0) FROM runs WHERE substr(at, 1, 10) = ?",
                           (period,)).fetchone()[0]
        return rec + round(runs * 1000)

    def retire(self, registry: str, serial: str, tonnes: float, period: str, beneficiary: str = "",
               claim: Optional[str] = None, allow_over_offset: bool = False) -> int:
        """Retire ``tonnes`` of a held credit against the emissions of ``period``. ``claim``: the retirement's
        id (the registry's retirement serial; a fresh one when not given) -- retiring a claim twice is refused."""
        period = _period(period)
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
                gross = self._gross_mg(con, period)
                done = con.execute("SELECT COALESCE(SUM(mg), 0) FROM retirements WHERE period = ?",
                                   (period,)).fetchone()[0]
                if done + g > gross:
                    raise LedgerError(f"retiring {g / MG_PER_T:g} t against period {period} would offset more than "
                                      f"its {(gross - done) / MG_PER_T:g} t of not-yet-offset emissions "
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
        """Per period (sorted): gross emissions, offsets retired against it, net (all tonnes CO2e)."""
        gross = dict(self._con.execute("SELECT period, SUM(mg) FROM emissions GROUP BY period").fetchall())
        for day, g in self._con.execute("SELECT substr(at, 1, 10), SUM(grams) FROM runs GROUP BY substr(at, 1, 10)"):
            gross[day] = gross.get(day, 0) + round(g * 1000)
        est = {p for (p,) in self._con.execute("SELECT DISTINCT period FROM emissions WHERE estimated = 1")}
        est |= {p for (p,) in self._con.execute("SELECT DISTINCT substr(at, 1, 10) FROM runs WHERE estimated = 1")}
        off = dict(self._con.execute("SELECT period, SUM(mg) FROM retirements GROUP BY period").fetchall())
        out = []
        for p in sorted(set(gross) | set(off)):
            if (since and p < since) or (until and p > until):
                continue
            g, o = gross.get(p, 0), off.get(p, 0)
            out.append({"period": p, "gross_t": g / MG_PER_T, "offset_t": o / MG_PER_T, "net_t": (g - o) / MG_PER_T,
                        "estimated": p in est})
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

