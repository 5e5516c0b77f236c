"""Weight surgery: the graph edits the compression passes share (quantize, w8a8, prune, prune-channels,
prune-heads, lowrank), public so that plugin passes can make them too.

    from llmasos.passes import surgery
    g = graph.clone()
    for node in surgery.gemm_targets(g, exclude="lm_head"):     # GEMMs with a static float parameter weight
        w = surgery.weight_nk(g, node)                            # f32 [N, K], whatever the op's layout
        old = surgery.set_weight_nk(g, node, np.where(mask(w), w, 0), "pruned")   # a new param <old>.pruned
        dropped.append(old.name)
    surgery.drop_unused_params(g, dropped)                        # a weight still read elsewhere stays

GEMMs: ``GEMM_LAYOUTS`` maps each GEMM-like op to its weight layout -- ``"nk"`` (weight [N, K] = [out, in],
as ``linear``) or ``"kn"`` (weight [K, N], as ``matmul``); the activation is operand 0, the weight operand
1, an optional bias operand 2. Parameters: a parameter of a graph is a Value in ``graph.params`` under its
own name (``is_param``); new ones get a unique name from a hint (``new_param``). Nothing here writes the
data of an existing parameter: a pass points a node at a new parameter (``swap_param``) and drops the old
one once nothing reads it, so the input graph's arrays (shared by ``Graph.clone``) are never touched.

``exclude`` strings, as every compression pass's option: comma-separated substrings of a weight's
parameter name or of the module path a GEMM was traced from (its loc up to `` (file:line)``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..ir import Graph, Node, Value
from ..ir.graph import param_array
from ..ir.types import DType

# op -> weight layout: "nk" weight [N, K] (linear), "kn" weight [K, N] (matmul)
GEMM_LAYOUTS = {"linear": "nk", "fused.linear_act": "nk", "fused.linear_glu": "nk", "matmul": "kn",
                "fused.matmul_act": "kn"}

__all__ = ["GEMM_LAYOUTS", "excluded", "module_path", "node_excluded", "is_param", "gemm_targets", "weight_layout",
           "in_features", "weight_nk", "new_param", "swap_param", "set_weight_nk", "replace_node",
           "drop_unused_params", "input_groups", "scale_group", "divide_input"]


# -- exclusion lists -------------------------------------------------------------------------------------

def excluded(name: str, exclude: str) -> bool:
    """Whether ``name`` contains one of the comma-separated substrings of ``exclude`` (blanks ignored)."""
    return any(s and s in name for s in (p.strip() for p in exclude.split(",")))


def module_path(node: Node) -> str:
    """The module a node was traced from: its loc without the `` (file.py:line)`` tail ("" if none)."""
    return (node.loc or "").split(" (")[0]


def node_excluded(node: Node, exclude: str, weight: int = 1) -> bool:
    """By the name of the node's weight (operand ``weight``) or by its module path: a tied output head
    reads the embedding table (``model.embed_tokens.weight``) but its loc is ``lm_head (...)``."""
    return excluded(node.inputs[weight].name, exclude) or excluded(module_path(node), exclude)


# -- GEMMs and parameters --------------------------------------------------------------------------------

def is_param(graph: Graph, v: Value) -> bool:
    return graph.params.get(v.name) is v


def gemm_targets(graph: Graph, exclude: str) -> list:
    """GEMM nodes (program order) whose weight is a static rank-2 float parameter and whose bias, if any,
    a parameter, with a float activation, not matched by ``exclude``."""
    out = []
    for n in graph.nodes:
        if n.op not in GEMM_LAYOUTS or len(n.inputs) < 2:
            continue
        w = n.inputs[1]
        if not is_param(graph, w) or w.type.rank != 2 or not w.type.is_static:
            continue
        if not w.type.dtype.is_float or w.type.dtype is DType.f8e4m3 or not n.inputs[0].type.dtype.is_float:
            continue
        if len(n.inputs) > 2 and not is_param(graph, n.inputs[2]):
            continue  # a computed bias: rare, left alone
        if node_excluded(n, exclude):
            continue
        out.append(n)
    return out


def weight_layout(node: Node) -> str:
    """``"nk"`` or ``"kn"`` (KeyError for an op that is no GEMM)."""
    return GEMM_LAYOUTS[node.op]


def in_features(node: Node):
    """K, the contraction size, read off the weight."""
    return node.inputs[1].type.shape[1 if weight_layout(node) == "nk" else 0]


def weight_nk(graph: Graph, node: Node) -> np.ndarray:
    """The node's weight as f32 [N, K]."""
    w = param_array(graph.param_data[node.inputs[1].name]).astype(np.float32)
    return np.ascontiguousarray(w.T if weight_layout(node) == "kn" else w)


def new_param(graph: Graph, hint: str, data) -> Value:
    """A parameter named after ``hint`` (made unique), holding ``data``."""
    return graph.add_param(hint, data, unique=True)


def swap_param(graph: Graph, node: Node, index: int, data, suffix: str) -> Value:
    """Point operand ``index`` of ``node`` at a new parameter ``<old name>.<suffix>`` holding ``data``.
    Returns the old operand (to drop with ``drop_unused_params`` once the pass is done)."""
    old = node.inputs[index]
    node.inputs[index] = new_param(graph, f"{old.name}.{suffix}", data)
    return old


def set_weight_nk(graph: Graph, node: Node, w_nk: np.ndarray, suffix: str) -> Value:
    """``swap_param`` for the weight, given as [N, K]: stored in the node's layout and the old dtype."""
    old = node.inputs[1]
    w = w_nk.T if weight_layout(node) == "kn" else w_nk
    return swap_param(graph, node, 1, np.ascontiguousarray(w).astype(old.type.dtype.numpy), suffix)


def replace_node(graph: Graph, node: Node, build: Callable[[Graph], Value]) -> Value:
    """Replace single-result ``node`` by what ``build(graph)`` makes: its nodes go where ``node`` was, its
    result takes every use (and graph output) of ``node``'s, and ``node`` is erased. Returns that result."""
    with graph.insert_before(node):
        new = build(graph)
    graph.replace_node(node, new)
    return new


def drop_unused_params(graph: Graph, names: Iterable[str]) -> list:
    """Remove the parameters among ``names`` that nothing reads any more (nor returns); the names removed."""
    gone = []
    for name in dict.fromkeys(names):
        v = graph.params.get(name)
        if v is not None and not v.uses and not any(o is v for o in graph.outputs):
            graph.remove_param(name)
            gone.append(name)
    return gone


# -- activation-aware scaling (AWQ, SmoothQuant) -------------------------------------------------------------

def input_groups(nodes: Iterable[Node]) -> list:
    """GEMM nodes grouped by their activation input (q/k/v, gate/up), in first-seen order: one AWQ /
    SmoothQuant scale each, since the activation they share can be divided by only one s."""
    groups: dict = {}
    for n in nodes:
        groups.setdefault(n.inputs[0], []).append(n)
    return list(groups.values())


# norm op -> (result index that is the normed value, operand indices of its per-channel weight and bias)
_NORMS = {"rms_norm": (0, (1,)), "layer_norm": (0, (1, 2)), "fused.add_rms_norm": (1, (2,)),
          "fused.add_layer_norm": (1, (2, 3))}


def scale_group(graph: Graph, group: list, ws: list, s: np.ndarray, weights: dict) -> None:
    """Multiply the input channels of each GEMM of ``group`` (weights ``ws``, [N, K]) by ``s`` into
    ``weights`` (keyed by the node's first result name) and divide their shared input by ``s``."""
    for n, w in zip(group, ws):
        weights[n.outputs[0].name] = w * s[None, :]
    divide_input(graph, group, s)


def divide_input(graph: Graph, group: list, s: np.ndarray) -> None:
    """Make the group's shared input x become x / s (its weights were multiplied by s).

    Folded into the norm that produced x when that norm has a parameter weight (and bias) along K and
    nothing but this group reads x: the norm's weight and bias become new parameters divided by s (the
    model then costs nothing extra). Otherwise one ``mul(x, 1/s)`` feeds every GEMM of the group."""
    x = group[0].inputs[0]
    p = x.producer
    members = set(group)
    only_group = all(u in members for u in x.users) and not any(o is x for o in graph.outputs)
    k = x.type.shape[-1]

    def scaled(v: Value) -> np.ndarray:
        return (param_array(graph.param_data[v.name]).astype(np.float32) / s).astype(v.type.dtype.numpy)

    if only_group and p is not None and p.op == "mul":
        # an unfused norm ends in mul(normed, weight): the weight is a [K] parameter
        for i, v in enumerate(p.inputs):
            if is_param(graph, v) and v.type.shape == (k,) and p.inputs[1 - i].type.shape[-1] == k:
                p.inputs[i] = new_param(graph, f"{v.name}.smoothed", scaled(v))
                return
    if only_group and p is not None and p.op in _NORMS and x.index == _NORMS[p.op][0] \
            and p.attrs.get("ndim", 1) == 1:
        idx = [i for i in _NORMS[p.op][1] if i < len(p.inputs)]
        if idx and all(is_param(graph, p.inputs[i]) and p.inputs[i].type.rank == 1 for i in idx):
            for i in idx:
                p.inputs[i] = new_param(graph, f"{p.inputs[i].name}.smoothed", scaled(p.inputs[i]))
            return
    inv = new_param(graph, f"{group[0].inputs[1].name}.act_inv_scale", (1.0 / s).astype(x.type.dtype.numpy))
    with graph.insert_before(min(group, key=graph.nodes.index)):
        y = graph.add_node("mul", [x, inv], loc=group[0].loc)
    for n in group:
        n.inputs[0] = y
