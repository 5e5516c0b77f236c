"""``pipeline-parallel{stages=N}``: cut the graph into N pipeline stages balanced by the op cost table.

The nodes are taken in topological order (networkx over the def-use graph); a cut between two positions
must cross the fewest live values (in a transformer: between layers, or between attention and MLP, where
only the residual stream is live), and among those places the N - 1 cuts minimise the costliest stage, each node costing
max(FLOPs / peak, bytes / bandwidth) from ``llmasos.ir.cost`` (a roofline; the ratio is a machine balance
``flops_per_byte``, default 100: an H100 runs ~1000 TFLOP/s over ~3.3 TB/s... so memory-bound decode GEMVs
and compute-bound prefill GEMMs are weighed as the device would).

Nodes made from inputs, parameters and constants alone (rope tables, position ids, masks) are copied into
every stage that uses them instead of crossing a boundary. A value made on stage s and used on stage t
becomes ``dist.send{axis=pp, peer=t, tag}`` at the end of s and ``dist.recv{axis=pp, peer=s, tag}`` at the
start of t. Each graph output stays on the stage that makes it (the LM head's logits on the last; each
layer's KV cache on its layer's stage). ``cuts="3,7"`` pins the cut places (indices into the candidate
places, ``llmasos.passes.pipeline_parallel.cut_candidates``): the prefill and decode graphs of one model
are cut alike that way. ``micro_batches=M`` (prefill of a batch): every stage runs its part on M slices of
the batch rows in order, receiving and sending per slice, so stage s works on micro-batch m while stage s+1
works on m-1 (GPipe's forward); a shape attr leading with the batch takes the slice's rows, an op along the
batch axis is refused, and the outputs are the slices concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import networkx as nx
import numpy as np

from ..ir import Graph, Node, Value
from ..ir.cost import node_cost
from ..ir.types import eval_dim
from .tensor_parallel import GEMMS
from .base import NO_CONTEXT, Pass, PassContext, PassError, PassNotApplicable, register_pass


HEAVY = ("kv.append", "kv.attention", "fused.rope_append_attention", "sdpa", *GEMMS)


def _free_nodes(graph: Graph) -> set:
    """Nodes made from inputs, params, constants and other such nodes alone (copied into each stage that
    reads them). A GEMM or attention is never free (it is the work being balanced), nor is a kv.append (its
    cache lives on its layer's stage)."""
    free: set = set()
    for n in graph.nodes:
        if n.op.startswith("dist.") or n.op in HEAVY:
            continue
        if all(not isinstance(v.producer, Node) or v.producer in free for v in n.inputs):
            free.add(n)
    return free


def _bytes(v: Value, sizes: dict) -> int:
    n = 1
    for d in v.type.shape:
        try:
            n *= int(eval_dim(d, sizes))
        except Exception:
            n *= 128
    return n * v.type.dtype.numpy.itemsize


def cut_candidates(graph: Graph, sizes: Optional[dict] = None) -> tuple[list, list, set]:
    """(order, candidate cut positions, free nodes): ``order`` the staged nodes in topological order; a
    position k cuts before order[k]; candidates are the interior positions crossing the fewest bytes."""
    sizes = sizes or {}
    dg = nx.DiGraph()
    for n in graph.nodes:
        dg.add_node(n)
        for v in n.inputs:
            if isinstance(v.producer, Node):
                dg.add_edge(v.producer, n)
    index = {n: i for i, n in enumerate(graph.nodes)}
    free = _free_nodes(graph)
    order = [n for n in nx.lexicographical_topological_sort(dg, key=lambda n: index[n]) if n not in free]
    pos = {n: i for i, n in enumerate(order)}
    # live bytes across each position: a value made at i and last read at j > i crosses positions i+1..j
    # (the fewest live values first: prefill and decode then cut at the same places, between layers)
    delta = np.zeros(len(order) + 2)
    count = np.zeros(len(order) + 2)
    for n in order:
        i = pos[n]
        for o in n.outputs:
            last = max([pos[u.node] for u in o.uses if u.node in pos] + [i])
            if last > i:
                b = _bytes(o, sizes)
                delta[i + 1] += b
                delta[last + 1] -= b
                count[i + 1] += 1
                count[last + 1] -= 1
    live = np.cumsum(delta)[: len(order) + 1]
    nlive = np.cumsum(count)[: len(order) + 1]
    interior = list(range(1, len(order)))
    if not interior:
        return order, [], free
    fewest = min(nlive[k] for k in interior)
    cands = [k for k in interior if nlive[k] <= fewest]
    del live
    # of a run of adjacent equal places keep the last (after the residual add, not between two free ops)
    cands = [k for k in cands if k + 1 not in cands]
    return order, cands, free


def _balance(costs: np.ndarray, cands: list, stages: int) -> list:
    """The stages-1 cut positions among cands minimising the largest stage cost (dynamic programming)."""
    pre = np.concatenate([[0.0], np.cumsum(costs)])
    pts = [0] + list(cands) + [len(costs)]
    INF = float("inf")
    # best[s][j]: the best max-cost with s stages covering [0, pts[j])
    best = [[INF] * len(pts) for _ in range(stages + 1)]
    arg = [[-1] * len(pts) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(1, len(pts)):
            for i in range(j):
                if best[s - 1][i] == INF:
                    continue
                c = max(best[s - 1][i], pre[pts[j]] - pre[pts[i]])
                if c < best[s][j]:
                    best[s][j], arg[s][j] = c, i
    cuts, j = [], len(pts) - 1
    for s in range(stages, 0, -1):
        i = arg[s][j]
        if s > 1:
            cuts.append(pts[i])
        j = i
    return sorted(cuts)


@register_pass("pipeline-parallel")
@dataclass(frozen=True)
class PipelineParallel(Pass):
    """Pipeline stages over mesh axis ``axis`` (see the module doc)."""

    stages: int = 2
    axis: str = "pp"
    cuts: str = ""                 # "" balanced by cost; else comma-separated candidate indices
    flops_per_byte: float = 100.0
    micro_batches: int = 1         # > 1: each stage runs the batch in this many slices of rows, in order
    exact: ClassVar[bool] = True

    def _batch(self, graph: Graph) -> int:
        """The static batch every input leads with (micro-batching slices it)."""
        B = graph.inputs[0].type.shape[0] if graph.inputs and graph.inputs[0].type.rank else None
        if not isinstance(B, int) or any(not v.type.rank or v.type.shape[0] != B for v in graph.inputs):
            raise PassError(str(self), f"micro_batches={self.micro_batches} needs every input to lead with one "
                                       f"static batch dim; inputs: {[str(v.type) for v in graph.inputs]}")
        if B % self.micro_batches:
            raise PassError(str(self), f"batch {B} does not split into micro_batches={self.micro_batches}")
        return B

    def _micro_attrs(self, n: Node, attrs: dict, B: int, k: int) -> dict:
        """A node's attrs on one micro-batch: a shape leading with the batch takes the micro-batch's rows;
        an op along the batch axis mixes rows and is refused."""
        rank = n.inputs[0].type.rank if n.inputs else len(attrs.get("shape", ()))
        batched = bool(n.inputs) and rank > 0 and n.inputs[0].type.shape[0] == B
        if not batched:
            rank = 0                       # a table (rope, embedding): its axis 0 is not the batch
        elif n.op == "expand_dims":
            rank += 1
        if "axis" in attrs and rank and attrs["axis"] % rank == 0:
            raise PassError(str(self), f"micro_batches: {n.op} along axis 0 mixes batch rows", n)
        if "axes" in attrs and rank and any(a % rank == 0 for a in attrs["axes"]):
            raise PassError(str(self), f"micro_batches: {n.op} over axis 0 mixes batch rows", n)
        if "shape" in attrs and attrs["shape"] and attrs["shape"][0] == B:
            attrs["shape"] = [k, *attrs["shape"][1:]]
        return attrs

    def __post_init__(self):
        if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 1:
            raise PassError("pipeline-parallel", f"stages must be an int >= 1, got {self.stages!r}")

    def plan(self, graph: Graph, sizes: Optional[dict] = None) -> tuple[list, list, set, list]:
        """(order, cut positions, free nodes, candidate positions)."""
        order, cands, free = cut_candidates(graph, sizes)
        if len(cands) < self.stages - 1:
            raise PassNotApplicable(str(self), f"{self.stages} stages need {self.stages - 1} cut(s), but the graph has "
                                       f"only {len(cands)} place(s) to cut (about one per layer): use at most "
                                       f"{len(cands) + 1} stages")
        if self.cuts:
            try:
                idx = [int(c) for c in self.cuts.split(",")]
            except ValueError:
                raise PassError(str(self), f"cuts must be comma-separated ints, got {self.cuts!r}") from None
            if len(idx) != self.stages - 1 or sorted(set(idx)) != idx or not all(0 <= i < len(cands) for i in idx):
                raise PassError(str(self), f"cuts={self.cuts!r}: need {self.stages - 1} increasing indices into "
                                           f"the {len(cands)} cut places")
            return order, [cands[i] for i in idx], free, cands
        sizes = sizes or {}
        costs = np.array([max(f, b * self.flops_per_byte) for f, b in (node_cost(n, sizes) for n in order)])
        return order, _balance(costs, cands, self.stages), free, cands

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        if self.stages == 1:
            return graph
        if graph.mesh:
            raise PassNotApplicable(str(self), f"the graph is already partitioned (mesh {graph.mesh}): run "
                                       f"pipeline-parallel before tensor-parallel")
        order, cuts, free, _ = self.plan(graph)
        stage_of = {}
        for i, n in enumerate(order):
            stage_of[n] = sum(1 for c in cuts if c <= i)
        M = self.micro_batches
        B = self._batch(graph) if M > 1 else None
        k = B // M if M > 1 else None
        g = Graph(graph.name)
        g.symbols = dict(graph.symbols)
        g.mesh = {self.axis: self.stages}
        m: dict = {}
        for v in graph.inputs:
            m[v] = g.add_input(v.name, v.type)
        for name, v in graph.params.items():
            m[v] = g.add_param(name, graph.param_data.get(name), type=v.type)
        local: dict = {}           # (source value, stage, micro-batch) -> value usable there
        copies: dict = {}          # (free node, stage, micro-batch) -> its copy's outputs
        sliced: dict = {}          # (input, stage, micro-batch) -> its rows of that micro-batch
        pending: dict = {}         # (source value, reader stage, micro-batch) -> (tag, sender stage)
        tag = [0]

        def emit(n: Node, ins: list, names=None) -> list:
            attrs = dict(n.attrs)
            if M > 1:
                attrs = self._micro_attrs(n, attrs, B, k)
            try:
                return g.create_node(n.op, ins, attrs, loc=n.loc, names=names).outputs
            except Exception as e:
                raise PassError(str(self), f"micro_batches={M}: this op does not keep the batch rows apart "
                                           f"({type(e).__name__}: {e})", n) from None

        def get(v: Value, s: int, mb: int) -> Value:
            if not isinstance(v.producer, Node):
                if M == 1 or v not in m or v.name in graph.params:
                    return m[v]
                key = (v, s, mb)
                if key not in sliced:
                    sliced[key] = g.add_node("slice", [m[v]], {"axis": 0, "start": mb * k, "end": (mb + 1) * k})
                return sliced[key]
            if v.producer in free:
                key = (v.producer, s, mb)
                if key not in copies:
                    n = v.producer
                    copies[key] = emit(n, [get(i, s, mb) for i in n.inputs])
                return copies[key][v.index]
            return local[(v, s, mb)]

        by_stage = [[n for n in order if stage_of[n] == s] for s in range(self.stages)]
        # each output stays on the stage that makes it; one made from inputs and constants alone, on the last
        out_stage = [self.stages - 1 if v.producer in free else stage_of.get(v.producer)
                     for v in graph.outputs]
        result: list = [None] * len(graph.outputs)
        for s in range(self.stages):
            for mb in range(M):
                # this micro-batch's receives, then its work, then its sends: stage s works on micro-batch
                # mb while stage s+1 works on mb-1
                for key in [key for key in pending if key[1] == s and key[2] == mb]:
                    o = key[0]
                    tg, src = pending.pop(key)
                    shape = list(o.type.shape) if M == 1 else [k, *o.type.shape[1:]]
                    r = g.create_node("dist.recv", [], {"axis": self.axis, "peer": src, "tag": tg,
                                                        "shape": shape, "dtype": o.type.dtype})
                    local[(o, s, mb)] = r.outputs[0]
                for n in by_stage[s]:
                    outs = emit(n, [get(i, s, mb) for i in n.inputs],
                                names=[o.name for o in n.outputs] if M == 1 else None)
                    for o, no in zip(n.outputs, outs):
                        local[(o, s, mb)] = no
                for n in by_stage[s]:
                    for o in n.outputs:
                        for t in sorted({stage_of[u.node] for u in o.uses if u.node in stage_of} - {s}):
                            if t < s:
                                raise PassError(str(self), f"%{o.name} is read on stage {t} before it is made on {s}")
                            tag[0] += 1
                            g.create_node("dist.send", [local[(o, s, mb)]], {"axis": self.axis, "peer": t,
                                                                             "tag": tag[0]})
                            pending[(o, t, mb)] = (tag[0], s)
            # this stage's outputs, joined over the micro-batches right after its work, so the graph lists
            # each stage's nodes together (node_stages places an unread node by where it stands)
            for i, v in enumerate(graph.outputs):
                if isinstance(v.producer, Node) and out_stage[i] == s:
                    parts = [get(v, s, mb) for mb in range(M)]
                    result[i] = parts[0] if M == 1 else g.add_node("concat", parts, {"axis": 0})
        g.set_outputs([m[v] if not isinstance(v.producer, Node) else result[i] for i, v in enumerate(graph.outputs)])
        return g
