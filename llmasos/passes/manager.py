"""The pass manager: runs a pipeline over a graph, with instruments.

    PassManager("dce,cse", print_after_all=True, timing=True, numeric_check=inputs).run(graph)
    PassManager("quantize{method=gptq}", calibration=batches, target="cuda").run(graph)

Every pass gets the run's ``PassContext`` (``calibration``, ``target``; or ``context=PassContext(...)``)
as ``run(graph, ctx)``.

- ``print_after_all``: ``// ----- IR after <pass> -----`` and the IR, after every pass.
- ``timing``: a table of seconds per pass (and per instrument) once the pipeline is done.
- ``verify_each``: the verifier on the input and after every pass; a broken graph names the pass. Also
  checks that no pass mutated its input graph (node, attr, name, type and output identities).
- ``numeric_check``: sample inputs (arrays, or a callable returning them, given the graph). The reference
  interpreter runs the input graph once and every pass's result; each result is compared with the one
  before it (so drift is charged to the pass that made it) within the pass's tolerance. On drift,
  ``NumericDriftError`` names the first pass that drifted and the first node (program order) whose
  value, matched by name to the graph before the pass, diverged. A lossy pass may flip a discrete value
  (argmax, a comparison, a float->int cast) whose float operands still agree within its tolerance: that
  is a near-tie, not drift. It is warned of (``NumericTieWarning``) and counted in the pass's record, and
  the values computed from it are not compared for that pass.
"""
from __future__ import annotations

import inspect
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TextIO, Union

import numpy as np

from ..ir import Graph, graph_diff, print_graph
from ..ir.interpreter import run as interpret
from ..ir.verifier import VerificationError, verify
from .base import Pass, PassContext, PassError
from .pipeline import PipelineSpec, parse_pipeline


class PassVerificationError(PassError):
    """The graph a pass returned fails the verifier."""

    def __init__(self, pass_name: str, cause: VerificationError):
        self.cause = cause
        super().__init__(pass_name, f"broke the graph: {cause}", cause.node)


class NumericDriftError(PassError):
    """A pass changed the graph's numbers past its tolerance; ``node``/``value`` say where it shows first."""

    def __init__(self, pass_name: str, message: str, node=None, value: Optional[str] = None):
        self.value = value
        super().__init__(pass_name, message, node)


class NumericTieWarning(UserWarning):
    """A lossy pass flipped a discrete value at a near-tie of operands that agree within its tolerance."""


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    tie_flips: int = 0  # discrete values a lossy pass flipped at near-ties (see the module docstring)


NumericInputs = Union[Sequence[Any], Callable[..., Sequence[Any]]]


class PassManager:
    def __init__(self, passes: PipelineSpec, print_after_all: bool = False, timing: bool = False,
                 verify_each: bool = True, numeric_check: Optional[NumericInputs] = None, out: TextIO = None,
                 calibration=None, *, target: Optional[str] = None, context: Optional[PassContext] = None):
        self.passes: list[Pass] = parse_pipeline(passes)
        if context is not None and (calibration is not None or target is not None):
            raise TypeError("PassManager takes calibration=/target= or context=, not both")
        # every pass receives it: run(graph, ctx)
        self.context = context if context is not None else PassContext(calibration, target)
        self.print_after_all = print_after_all
        self.timing = timing
        self.verify_each = verify_each
        self.numeric_check = numeric_check
        self.out = out if out is not None else sys.stderr
        self.records: list[PassRecord] = []
        self.instrument_seconds: dict[str, float] = {}

    @property
    def calibration(self):
        return self.context.calibration

    def run(self, graph: Graph) -> Graph:
        if self.calibration is not None:
            self.calibration.check(graph)  # bad calibration data fails before any pass runs
        self.records = []
        self.instrument_seconds = {"verify": 0.0, "numeric check": 0.0}
        if self.verify_each:
            with self._timed("verify"):
                try:
                    verify(graph)
                except VerificationError as e:
                    raise PassError("<input>", f"the input graph fails verification before any pass: {e}",
                                    e.node) from None
        baseline = None
        if self.numeric_check is not None:
            with self._timed("numeric check"):
                inputs = self._inputs(graph)
                baseline = self._trace("<input>", graph, inputs)
        for p in self.passes:
            name = str(p)
            snapshot = _fingerprint(graph) if self.verify_each else None
            t0 = time.perf_counter()
            try:
                result = p.apply(graph, self.context)
            except PassError:
                raise
            except Exception as e:  # a crash inside a pass still says which pass
                raise PassError(name, f"failed: {type(e).__name__}: {e}") from e
            secs = time.perf_counter() - t0
            if not isinstance(result, Graph):
                raise PassError(name, f"run() returned {type(result).__name__}, not a Graph")
            if snapshot is not None and _fingerprint(graph) != snapshot:
                raise PassError(name, "mutated its input graph; a pass works on graph.clone() and returns that")
            changed = result is not graph and (
                graph_diff(graph, result, check_data=False) is not None
                or any(result.param_data.get(k) is not d for k, d in graph.param_data.items()))
            self.records.append(PassRecord(name, secs, changed, len(graph.nodes), len(result.nodes)))
            if self.verify_each and changed:
                with self._timed("verify"):
                    try:
                        verify(result)
                    except VerificationError as e:
                        raise PassVerificationError(name, e) from None
            if baseline is not None and changed:
                with self._timed("numeric check"):
                    after = self._trace(name, result, inputs)
                    self.records[-1].tie_flips = self._compare(p, name, graph, baseline, result, after)
                    baseline = after
            if self.print_after_all:
                print(f"// ----- IR after {name} -----", file=self.out)
                print(print_graph(result), file=self.out)
            graph = result
        if self.timing:
            print(self.timing_report(), file=self.out)
        return graph

    # -- instruments --------------------------------------------------------------------------------
    def _timed(self, what: str):
        mgr = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                mgr.instrument_seconds[what] += time.perf_counter() - self.t0
        return _T()

    def timing_report(self) -> str:
        rows = [("seconds", "changed", "nodes", "pass")]
        for r in self.records:
            nodes = f"{r.nodes_before}->{r.nodes_after}" if r.nodes_before != r.nodes_after else str(r.nodes_after)
            rows.append((f"{r.seconds:.6f}", "yes" if r.changed else "no", nodes, r.name))
        for what, secs in self.instrument_seconds.items():
            if secs:
                rows.append((f"{secs:.6f}", "", "", f"({what})"))
        total = sum(r.seconds for r in self.records) + sum(self.instrument_seconds.values())
        rows.append((f"{total:.6f}", "", "", "total"))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["// ----- pass timing -----"]
        lines += [f"// {r[0]:>{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
        return "\n".join(lines)

    def _inputs(self, graph: Graph) -> list:
        src = self.numeric_check
        if callable(src):
            takes_graph = len(inspect.signature(src).parameters) > 0
            src = src(graph) if takes_graph else src()
        return [np.asarray(a) if not hasattr(a, "detach") else a for a in src]

    def _trace(self, name: str, graph: Graph, inputs) -> tuple[list, dict]:
        try:
            return interpret(graph, inputs, trace=True)
        except Exception as e:
            what = "the input graph" if name == "<input>" else "the graph after this pass"
            raise PassError(name, f"numeric check: the reference interpreter cannot run {what}: "
                                  f"{type(e).__name__}: {e}") from e

    def _compare(self, p: Pass, name: str, before_g: Graph, before: tuple, after_g: Graph, after: tuple) -> int:
        """Raises on drift; returns how many discrete values flipped at near-ties (lossy passes only)."""
        rtol, atol = p.tolerance()
        outs_before, vals_before = before
        outs_after, vals_after = after
        if len(outs_before) != len(outs_after):
            raise NumericDriftError(name, f"changed the number of graph outputs from {len(outs_before)} to "
                                          f"{len(outs_after)}")
        bad_outputs = [i for i, (a, b) in enumerate(zip(outs_before, outs_after)) if _diff(a, b, rtol, atol)]
        if not bad_outputs:
            return 0
        tol = f"exact: rtol {rtol:g}" if p.exact else f"tolerance rtol {rtol:g}, atol {atol:g}"
        producers_before = {o.name: n for n in before_g.nodes for o in n.outputs}
        flipped: list[str] = []   # discrete values flipped at a near-tie
        skipped: set[str] = set()  # those and every value computed from them: not compared
        for node in after_g.nodes:  # program order: the first diverging value is where the error enters
            downstream = any(v.name in skipped for v in node.inputs)
            for o in node.outputs:
                if downstream:
                    skipped.add(o.name)
                    continue
                if o.name not in vals_before:
                    continue
                d = _diff(vals_before[o.name], vals_after[o.name], rtol, atol)
                if not d:
                    continue
                if not p.exact and self._near_tie(node, producers_before.get(o.name), o.name, vals_before,
                                                  vals_after, rtol, atol):
                    flipped.append(o.name)
                    skipped.add(o.name)
                    continue
                raise NumericDriftError(
                    name, f"numeric drift past the pass's tolerance ({tol}): first diverging value "
                          f"%{o.name}: {d}", node, o.name)
        bad_outputs = [i for i in bad_outputs if after_g.outputs[i].name not in skipped]
        if bad_outputs:
            i = bad_outputs[0]
            v = after_g.outputs[i]
            d = _diff(outs_before[i], outs_after[i], rtol, atol)
            raise NumericDriftError(name, f"numeric drift past the pass's tolerance ({tol}) at graph output {i} "
                                          f"%{v.name} (no value with the same name diverged first): {d}",
                                    v.producer, v.name)
        warnings.warn(NumericTieWarning(
            f"pass '{name}': {len(flipped)} discrete value(s) flipped at near-ties of operands that agree within "
            f"its tolerance ({tol}): {', '.join('%' + k for k in sorted(flipped))}; the values computed from them "
            f"were not compared"), stacklevel=4)
        return len(flipped)

    @staticmethod
    def _near_tie(node, before_node, out: str, vals_before: dict, vals_after: dict, rtol: float,
                  atol: float) -> bool:
        """A discrete ``out`` that differs only because float operands, equal within tolerance, sit at a tie."""
        if before_node is None or before_node.op != node.op or len(before_node.inputs) != len(node.inputs):
            return False
        if np.asarray(vals_after[out]).dtype.kind not in "biu":
            return False  # a float value past tolerance is drift, whatever made it
        pairs = [(vals_before.get(b.name), vals_after.get(a.name)) for b, a in zip(before_node.inputs, node.inputs)]
        if any(x is None or y is None for x, y in pairs):
            return False
        if not any(np.asarray(x).dtype.kind == "f" for x, _ in pairs):
            return False  # integer operands equal bit for bit would give the same result
        return all(_diff(x, y, rtol, atol) is None for x, y in pairs)


def _fingerprint(g: Graph) -> tuple:
    """Cheap identity-level snapshot: catches a pass that edits its input's nodes, attrs, names or types."""
    return (tuple(id(v) for v in g.inputs), tuple((k, id(v), id(g.param_data.get(k))) for k, v in g.params.items()),
            tuple((id(n), n.op, tuple(map(id, n.inputs)), tuple((id(o), o.name, id(o.type)) for o in n.outputs),
                   tuple((k, id(v)) for k, v in n.attrs.items())) for n in g.nodes),
            tuple(map(id, g.outputs)), tuple(g.symbols.items()))


def _diff(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> Optional[str]:
    """None when ``b`` matches ``a`` within tolerance, else a description of the worst element."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype changed: {a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}"
    if a.dtype.kind in "biu" or a.dtype == np.bool_:
        bad = a != b
        if not bad.any():
            return None
        idx = np.unravel_index(np.argmax(bad), a.shape)
        return f"{int(bad.sum())} of {a.size} elements differ; at {tuple(int(i) for i in idx)}: {a[idx]} -> {b[idx]}"
    x, y = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(all="ignore"):
        close = np.isclose(y, x, rtol=rtol, atol=atol, equal_nan=True)
        if close.all():
            return None
        err = np.where(close, 0.0, np.abs(x - y))
        err = np.where(np.isnan(err), np.inf, err)
    idx = np.unravel_index(np.argmax(err), a.shape)
    return (f"{int((~close).sum())} of {a.size} elements past tolerance; worst at {tuple(int(i) for i in idx)}: "
            f"{x[idx]!r} before, {y[idx]!r} after")
