"""From a partitioned graph (tensor-parallel / pipeline-parallel passes) to what one rank runs.

``partition_lm_graphs(graphs, tp, pp)`` partitions an LM's prefill and decode graphs alike (the pipeline
cuts are chosen on the decode graph and pinned for the prefill, so a layer's KV cache lives on one stage
for both). ``rank_graph(graph, rank)`` cuts rank ``rank``'s program: its stage's nodes, its shard of every
parameter and cache (local types, no sharding annotations, no mesh), ``dist.shard`` turned into the static
slice this rank keeps; the collectives and send/recv stay (the backend calls the process group for them).
"""
from __future__ import annotations

from typing import Optional

from ..ir import Graph, Node
from ..ir.graph import param_array
from ..ir.interpreter import node_stages, pipeline_axis
from ..ir.sharding import contiguous, mesh_size, rank_coords, shard_of
from ..ir.verifier import verify
from ..passes import PassError, PassManager
from ..passes.pipeline_parallel import PipelineParallel
from ..passes.tensor_parallel import TensorParallel

N_FIXED_INPUTS = 3   # ids, pos, last: every rank's LM entry keeps them (llmasos/llm/runtime.py)


def mesh_of(tp: int, pp: int) -> dict:
    mesh = {}
    if pp > 1:
        mesh["pp"] = pp
    if tp > 1:
        mesh["tp"] = tp
    return mesh


def check_degrees(cfg, tp: int, pp: int) -> None:
    """Clear errors before any work: what does not divide, or more stages than layers."""
    for name, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if cfg is None:
        return
    bad = [f"{what} = {n}" for what, n in (("attention heads", cfg.heads), ("KV heads", cfg.kv_heads),
                                          ("ffn", cfg.ffn), ("vocab", cfg.vocab)) if n % tp]
    if bad:
        raise ValueError(f"tensor parallelism tp={tp} must divide the model's {', '.join(bad)} (Megatron splits "
                         f"heads, KV heads -- GQA groups whole --, the MLP and the vocabulary evenly)")
    if pp > cfg.layers:
        raise ValueError(f"pipeline parallelism pp={pp} needs at least one layer per stage; the model has "
                         f"{cfg.layers} layers")


def partition_lm_graphs(graphs: dict, tp: int, pp: int, decode: str = "decode") -> dict:
    layer_cuts = []
    if pp > 1:   # cut the decode graph by cost; the others where the same number of KV caches precede the cut
        order, chosen, free, cands = PipelineParallel(stages=pp).plan(graphs[decode])
        layer_cuts = [sum(1 for n in order[:c] if n.op == "kv.append") for c in chosen]
    out = {}
    for name, g in graphs.items():
        passes = []
        if pp > 1:
            order, _, _, cands = PipelineParallel(stages=pp).plan(g)
            idx = []
            for k in layer_cuts:
                match = [i for i, c in enumerate(cands) if sum(1 for n in order[:c] if n.op == "kv.append") == k]
                if not match:
                    raise PassError("pipeline-parallel", f"graph {name!r} has no cut after {k} KV-cache updates, as "
                                                         f"the {decode!r} graph's plan needs")
                idx.append(match[-1])
            passes.append(PipelineParallel(stages=pp, cuts=",".join(map(str, idx))))
        if tp > 1:
            passes.append(TensorParallel(tp=tp))
        out[name] = PassManager(passes).run(g) if passes else g
    return out


def rank_graph(graph: Graph, rank: int, keep_inputs: int = N_FIXED_INPUTS) -> Graph:
    mesh = dict(graph.mesh)
    if not mesh:
        return graph
    coords = rank_coords(mesh, rank)
    pp = pipeline_axis(graph)
    stages = node_stages(graph) if pp is not None else {}
    mine = [n for n in graph.nodes if pp is None or stages[n] == coords[pp]]
    kept = set(mine)
    used = {v for n in mine for v in n.inputs}
    outs = [v for v in graph.outputs if not isinstance(v.producer, Node) or v.producer in kept]
    outs += [n.outputs[0] for n in mine if n.op == "dist.send"]     # keep the sends live in any backend
    r = Graph(graph.name)
    r.symbols = dict(graph.symbols)
    m: dict = {}
    for i, v in enumerate(graph.inputs):
        if i < keep_inputs or v in used or v in outs:
            m[v] = r.add_input(v.name, v.type)
    for name, v in graph.params.items():
        if v in used or v in outs:
            data = contiguous(shard_of(param_array(graph.param_data[name]), v.sharding, mesh, coords))
            m[v] = r.add_param(name, data, type=v.type)
    for n in mine:
        attrs = dict(n.attrs)
        op = n.op
        if op == "dist.shard":
            k = int(n.outputs[0].type.shape[attrs["dim"]])
            i = coords[attrs["axis"]]
            op, attrs = "slice", {"axis": attrs["dim"], "start": i * k, "end": (i + 1) * k, "step": 1}
        new = r.create_node(op, [m[v] for v in n.inputs], attrs, loc=n.loc, names=[o.name for o in n.outputs])
        for o, no in zip(n.outputs, new.outputs):
            m[o] = no
    r.set_outputs([m[v] for v in outs])
    verify(r)
    return r


def stage_of_rank(mesh: dict, rank: int) -> tuple[int, int]:
    """(this rank's stage, number of stages)."""
    c = rank_coords(mesh, rank) if mesh else {}
    return c.get("pp", 0), mesh.get("pp", 1)


__all__ = ["check_degrees", "mesh_of", "partition_lm_graphs", "rank_graph", "stage_of_rank", "mesh_size"]
