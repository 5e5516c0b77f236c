"""Which layers of the compiler know each registered op (``llmasos ops`` prints it).

For every op of the registry (``llmasos.ir.all_ops()``):

* frontend: the ATen ops whose torch.export converter produces it. A converter is a Python function, so
  this is read off its code: the op names among its string constants, its closure (converter factories
  such as ``_binary("add")``), the frontend helpers it calls, and the ``ctx.cast`` / ``ctx.const``
  helpers. An op no converter produces is "n/a" when a pass produces it (a rewrite rule's result, or a
  name in a pass module), else missing;
* reference: the op's numpy semantics (``OpDef.ref``, what the interpreter runs);
* lowering: one entry per registered TVM target, from the lowering registry (``missing_lowerings``; a
  target sharing the table with others gets the same answer). Unknown (None) where only TVM's runtime is
  installed;
* torch: an entry in the torch executor's table (``llmasos.backends.torch_graph.TORCH_IMPLS``);
* cost: an entry of its own in the op cost table (``llmasos.ir.cost.COSTS``); an op without one is costed by
  the table's default (one flop per result element, its operands' and results' bytes), so a missing cost
  entry is shown but not counted as missing.

``ABSENT_TABLES`` names per-op tables the design calls for that do not exist yet (none now).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import types
from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import passes
from .backends.torch_graph import TORCH_IMPLS
from .frontends.aten import CONVERTERS
from .ir import all_ops
from .ir.cost import COSTS
from .passes import all_passes
from .passes.rewrite_pass import RULES_DIR

try:
    from .backends.tvm import known_targets, missing_lowerings
except ImportError:  # TVM's runtime alone: no lowering registry (an artifact-serving install)
    known_targets = missing_lowerings = None

ABSENT_TABLES: tuple = ()

# ConvertContext helpers that emit one op each (converters call them as ctx.cast(...), ctx.const(...))
_CONTEXT_HELPERS = {"cast": "cast", "const": "const"}


@dataclass(frozen=True)
class OpCoverage:
    op: str
    aten: tuple = ()                     # ATen ops whose converter produces this op
    frontend: str = "missing"            # "ok", "n/a" (only passes produce it) or "missing"
    reference: bool = False
    lowering: dict = field(default_factory=dict)  # target -> True/False, or None: unknown (no TVM compiler)
    torch: bool = False
    cost: bool = False                   # an entry of its own in ir/cost.py (else the default estimate)

    @property
    def missing(self) -> list:
        """The layers without an entry for this op: 'frontend', 'reference', 'lowering:<target>', 'torch'."""
        out = ["frontend"] if self.frontend == "missing" else []
        out += [] if self.reference else ["reference"]
        out += [f"lowering:{t}" for t, ok in self.lowering.items() if ok is False]
        return out + ([] if self.torch else ["torch"])

    def to_dict(self) -> dict:
        return {"op": self.op, "frontend": self.frontend, "aten": list(self.aten), "reference": self.reference,
                "lowering": dict(self.lowering), "torch": self.torch, "cost": self.cost, "missing": self.missing}


def op_coverage(targets: Optional[Sequence[str]] = None) -> list[OpCoverage]:
    """One ``OpCoverage`` per registered op, sorted by name; ``targets``: the TVM targets to ask about
    (default: every registered one)."""
    ops = all_ops()
    aten = _aten_by_op(set(ops))
    from_passes = _produced_by_passes(set(ops))
    lowering = _lowering_by_target(targets)
    rows = []
    for name, opdef in sorted(ops.items()):
        frontend = "ok" if aten.get(name) else ("n/a" if name in from_passes else "missing")
        rows.append(OpCoverage(
            op=name, aten=tuple(sorted(aten.get(name, ()))), frontend=frontend, reference=callable(opdef.ref),
            lowering={t: (None if missing is None else name not in missing) for t, missing in lowering.items()},
            torch=name in TORCH_IMPLS, cost=name in COSTS))
    return rows


# -- frontend -------------------------------------------------------------------------------------------------
def _aten_by_op(op_names: set) -> dict:
    out: dict = {}
    for aten_op, fn in CONVERTERS.items():
        for op in _ops_named_by(fn, op_names):
            out.setdefault(op, set()).add(aten_op)
    return out


def _ops_named_by(fn, op_names: set) -> set:
    strings, seen = set(), set()

    def code(c: types.CodeType, globs: dict):
        for k in c.co_consts:
            if isinstance(k, str):
                strings.add(k)
            elif isinstance(k, types.CodeType):
                code(k, globs)
        for n in c.co_names:
            if n in _CONTEXT_HELPERS:
                strings.add(_CONTEXT_HELPERS[n])
            helper = globs.get(n)
            if inspect.isfunction(helper) and helper.__module__.startswith("llmasos.frontends"):
                func(helper)

    def func(f):
        f = inspect.unwrap(f)
        if not inspect.isfunction(f) or f in seen:
            return
        seen.add(f)
        code(f.__code__, f.__globals__)
        for cell in f.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(v, str):
                strings.add(v)
            elif inspect.isfunction(v):
                func(v)

    func(fn)
    return strings & op_names


def _produced_by_passes(op_names: set) -> set:
    """Ops a pass may produce: the results of the shipped rewrite rules and op names in pass modules."""
    found = set()
    for rules in sorted(RULES_DIR.glob("*.rw")):
        for line in rules.read_text().splitlines():
            if "=>" in line and not line.lstrip().startswith("#"):
                result = line.split("=>", 1)[1].split(" where ", 1)[0]
                found |= set(re.findall(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)?", result))
    modules = {m.name for m in pkgutil.walk_packages(passes.__path__, passes.__name__ + ".")}
    modules |= {cls.__module__ for cls in all_passes().values()}  # plugins
    for name in sorted(modules):
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (OSError, TypeError):  # no source (a compiled plugin)
            continue
        found |= {n.value for n in ast.walk(ast.parse(source))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return found & op_names


# -- backends ---------------------------------------------------------------------------------------------------
def _lowering_by_target(targets: Optional[Sequence[str]]) -> dict:
    """target -> the set of ops it cannot lower, or None where the TVM compiler is not installed."""
    if missing_lowerings is None:
        return {t: None for t in (targets or ())}
    names = list(targets) if targets is not None else known_targets()
    unknown = [t for t in names if t not in known_targets()]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; registered: {', '.join(known_targets())}")
    # the lowering table is shared by every target today; a registry that answers per target takes it
    per_target = len(inspect.signature(missing_lowerings).parameters) > 0
    return {t: set(missing_lowerings(t) if per_target else missing_lowerings()) for t in names}


# -- text -------------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[OpCoverage], missing_only: bool = False, max_aten: int = 2) -> str:
    """A fixed-width table, one line per op; targets with identical answers share a lowering column."""
    targets = list(rows[0].lowering) if rows else []
    groups: dict = {}
    for t in targets:
        groups.setdefault(tuple(r.lowering[t] for r in rows), []).append(t)
    columns = list(groups.values())
    shown = [r for r in rows if r.missing] if missing_only else list(rows)

    def mark(ok) -> str:
        return "?" if ok is None else ("yes" if ok else "MISSING")

    def frontend(r: OpCoverage) -> str:
        if r.frontend == "n/a":
            return "n/a (passes make it)"
        if r.frontend == "missing":
            return "MISSING"
        more = f" +{len(r.aten) - max_aten}" if len(r.aten) > max_aten else ""
        return ", ".join(r.aten[:max_aten]) + more

    header = (["op", "frontend (ATen ops)", "reference"] + ["lowering:" + ",".join(ts) for ts in columns]
              + ["torch", "cost"])
    body = [[r.op, frontend(r), mark(r.reference)] + [mark(r.lowering[ts[0]]) for ts in columns]
            + [mark(r.torch), "own" if r.cost else "default"] for r in shown]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + body]
    n_missing = sum(1 for r in rows if r.missing)
    lines.append(f"{len(rows)} ops, {n_missing} missing an entry somewhere"
                 + (f"; no {', '.join(ABSENT_TABLES)} table exists yet" if ABSENT_TABLES else ""))
    return "\n".join(lines)


__all__ = ["OpCoverage", "op_coverage", "format_table", "ABSENT_TABLES"]
