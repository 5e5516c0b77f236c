"""Calibration data for data-driven passes (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, ASVD / SVD-LLM).

    calib = Calibration([ids0, ids1, ...])                   # a few batches of token ids [batch, seq]
    g2 = PassManager("quantize{bits=4,method=gptq}", calibration=calib).run(g)
    cm = llmasos.compile(model, ..., passes="prune{method=wanda}", calibration=calib)

A pass gets it from its explicit context -- ``ctx.require_calibration(self)`` in ``run(graph, ctx)``
(``PassContext``, llmasos/passes/base.py) -- and per-GEMM input statistics with ``calib.gemm_stats(graph)``: the graph (as the pass received it -- after earlier passes of the pipeline)
runs on the reference interpreter over every batch, and each GEMM-like node's input rows are accumulated
into ``GemmStats`` (X^T X for the second-order methods, per-channel |x| mean/max and mean square for the
activation-aware ones). Results are cached per graph, so several passes over one graph run it once.

Bad calibration data (wrong dtype, rank, a size outside the graph's symbol bounds, token ids outside the
vocabulary) is a ``CalibrationError`` raised before any pass does work.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from ..ir import Graph, Node, Value
from ..ir.interpreter import bind_symbols, run

# op -> (index of the activation operand, index of the weight operand, weight layout)
# layout "nk": weight [out, in] (linear); "kn": weight [in, out] (matmul)
GEMM_OPS = {"linear": (0, 1, "nk"), "fused.linear_act": (0, 1, "nk"), "fused.linear_glu": (0, 1, "nk"),
            "matmul": (0, 1, "kn"), "fused.matmul_act": (0, 1, "kn")}


class CalibrationError(ValueError):
    """Calibration data that does not fit the graph (or is missing for a pass that needs it)."""


@dataclass
class GemmStats:
    """Statistics of one GEMM's input rows x (the last axis is the contraction axis K)."""
    rows: int = 0
    xtx: Optional[np.ndarray] = None      # [K, K] float64: sum of x^T x over all rows (Hessian / 2 of GPTQ)
    abs_sum: Optional[np.ndarray] = None  # [K] float64: sum of |x|
    abs_max: Optional[np.ndarray] = None  # [K] float64
    sq_sum: Optional[np.ndarray] = None   # [K] float64: sum of x^2

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if self.xtx is None:
            k = x.shape[1]
            self.xtx, self.abs_sum, self.sq_sum = np.zeros((k, k)), np.zeros(k), np.zeros(k)
            self.abs_max = np.zeros(k)
        self.rows += x.shape[0]
        self.xtx += x.T @ x
        ax = np.abs(x)
        self.abs_sum += ax.sum(0)
        self.abs_max = np.maximum(self.abs_max, ax.max(0))
        self.sq_sum += (x * x).sum(0)

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    @property
    def rms(self) -> np.ndarray:
        """Per-channel root mean square: Wanda's ||X_j||_2 up to the constant sqrt(rows)."""
        return np.sqrt(self.sq_sum / max(self.rows, 1))

    @property
    def hessian(self) -> np.ndarray:
        """The mean of x^T x (GPTQ's H up to the factor 2)."""
        return self.xtx / max(self.rows, 1)


@dataclass
class Calibration:
    """A few batches of graph inputs (usually token ids [batch, seq]); each batch is one forward pass."""
    batches: Sequence
    progress: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.batches, np.ndarray) or not isinstance(self.batches, Iterable):
            raise CalibrationError("calibration data is a list of batches (arrays of token ids [batch, seq]), "
                                   f"got {type(self.batches).__name__}")
        self.batches = [tuple(_np(x) for x in (b if isinstance(b, (tuple, list)) else (b,))) for b in self.batches]
        if not self.batches:
            raise CalibrationError("calibration data has no batches")

    @property
    def tokens(self) -> int:
        return int(sum(b[0].size for b in self.batches))

    def check(self, graph: Graph) -> None:
        """Raise CalibrationError unless every batch is a valid input of ``graph`` (before any work)."""
        for i, b in enumerate(self.batches):
            where = f"calibration batch {i}"
            if len(b) != len(graph.inputs):
                raise CalibrationError(f"{where}: the graph takes {len(graph.inputs)} input(s) "
                                       f"({', '.join('%' + v.name for v in graph.inputs)}), the batch has {len(b)}")
            for v, a in zip(graph.inputs, b):
                if a.dtype != v.type.dtype.numpy:
                    raise CalibrationError(f"{where}: input %{v.name} must have dtype {v.type.dtype}, got {a.dtype}")
                if a.ndim != v.type.rank:
                    raise CalibrationError(f"{where}: input %{v.name} must have rank {v.type.rank} "
                                           f"({v.type}), got shape {list(a.shape)}")
            try:
                bind_symbols(graph, list(b))
            except ValueError as e:
                raise CalibrationError(f"{where}: {e}") from None
            for v, a in zip(graph.inputs, b):
                vocab = _vocab(graph, v)
                if vocab is not None and a.size and (a.min() < 0 or a.max() >= vocab):
                    raise CalibrationError(f"{where}: input %{v.name} has token ids in [{a.min()}, {a.max()}], "
                                           f"outside the vocabulary [0, {vocab})")

    def gemm_stats(self, graph: Graph, nodes: Optional[Iterable[Node]] = None) -> dict[str, GemmStats]:
        """Input statistics of every GEMM-like node of ``graph`` (or of ``nodes``), keyed by the name of the
        node's first result."""
        want = [n for n in (graph.nodes if nodes is None else nodes) if n.op in GEMM_OPS]
        names = {n: n.outputs[0].name for n in want}  # nodes hash by identity
        key = tuple(names.values())
        hit = self._cache.get("last")
        if hit is not None and hit[0] is graph and hit[1] == key:
            return hit[2]
        self.check(graph)
        stats = {name: GemmStats() for name in key}

        def observe(node, args, _results):
            name = names.get(node)
            if name is not None:
                stats[name].add(args[GEMM_OPS[node.op][0]])

        for i in self._progress(range(len(self.batches)), f"calibrating {graph.name}"):
            run(graph, list(self.batches[i]), observe=observe)
        self._cache = {"last": (graph, key, stats)}  # one graph at a time: stats are large (K x K per GEMM)
        return stats

    def _progress(self, it, what: str) -> Iterator:
        items = list(it)
        show = self.progress and len(items) > 1 and sys.stderr.isatty()
        t0 = time.perf_counter()
        for i, x in enumerate(items):
            yield x
            if show:
                sys.stderr.write(f"\r{what}: batch {i + 1}/{len(items)} ({time.perf_counter() - t0:.0f} s)")
                sys.stderr.flush()
        if show:
            sys.stderr.write("\n")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _vocab(graph: Graph, v: Value) -> Optional[int]:
    """The vocabulary size when ``v`` feeds an embedding as its ids (token ids must index the table)."""
    for n in graph.nodes:
        if n.op == "embedding" and n.inputs[1] is v:
            d = n.inputs[0].type.shape[0]
            return d if isinstance(d, int) else None
    return None
