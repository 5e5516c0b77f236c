"""A decode step's attention as one op: ``fuse-attention``.

    q' = rope(q, cos, sin); k' = rope(k, cos, sin)        (fused.elementwise, when the model rotates)
    kc' = kv.append(kc, k', pos); vc' = kv.append(vc, v, pos)
    o = kv.attention(q', kc', vc', pos)
 => o, kc', vc' = fused.rope_append_attention(q, k, v, kc, vc, pos, cos, sin)

and the paged twin (kv.paged_append / kv.paged_attention -> fused.rope_paged_append_attention). ``rope`` is
what fuse-elementwise makes of Llama's ``x * cos + rotate_half(x) * sin``: a fused.elementwise
``add(mul(x, cos), mul(rot, sin))`` (either order of each mul and of the add) whose ``rot`` is
``concat(neg(slice(x, D/2:D)), slice(x, 0:D/2))`` on the head-dim axis. Without it (GPT-2's learned positions,
or a rotation of another form) the appends and the attention still fuse, over the rotated values.

Only one query per row (T == 1, a decode step) fuses: prefill keeps its kernels. The fused op's reference is
the ops it replaces, evaluated in the same order (ir/opset/fused.py), so the pass is exact. A backend runs
it as one kernel where the target has one (``Target.kv_decode_append_attention``), else as the ops again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ..ir import Graph
from ..ir.opset.fused import parse_expr
from .base import NO_CONTEXT, Pass, PassContext, register_pass

# attention op -> (its append op, the fused op)
_FORMS = {"kv.attention": ("kv.append", "fused.rope_append_attention"),
          "kv.paged_attention": ("kv.paged_append", "fused.rope_paged_append_attention")}


@register_pass("fuse-attention")
@dataclass(frozen=True)
class FuseAttention(Pass):
    """RoPE + the two cache appends + attention of each decode step -> one fused op (module doc)."""

    rope: bool = True   # also absorb the RoPE of q and k (false: the appends and the attention only)

    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        if not any(n.op in _FORMS for n in graph.nodes):
            return graph
        g = graph.clone()
        changed = False
        for node in [n for n in g.nodes if n.op in _FORMS]:
            changed |= _fuse(g, node, self.rope)
        return g if changed else graph


def _fuse(g: Graph, attn, rope: bool) -> bool:
    append_op, fused_op = _FORMS[attn.op]
    paged = attn.op == "kv.paged_attention"
    q_rot, kc2, vc2, pos = attn.inputs[:4]
    table = attn.inputs[4] if paged else None
    if q_rot.type.shape[2] != 1:
        return False
    pk, pv = kc2.producer, vc2.producer
    if pk is None or pv is None or pk is pv or pk.op != append_op or pv.op != append_op:
        return False
    if pk.inputs[2] is not pos or pv.inputs[2] is not pos or (paged and (pk.inputs[3] is not table
                                                                         or pv.inputs[3] is not table)):
        return False
    order = {n: i for i, n in enumerate(g.nodes)}
    at = order[attn]
    # the fused node takes attn's place: every other reader of the appended caches must come after it
    if any(order[u] < at for v in (kc2, vc2) for u in v.users if u is not attn):
        return False
    k_rot, v = pk.inputs[1], pv.inputs[1]
    q, k, cs = q_rot, k_rot, ()
    if rope:
        rq, rk = _rope_source(q_rot, attn), _rope_source(k_rot, pk)
        if rq is not None and rk is not None and rq[1:] == rk[1:]:
            q, k, cs = rq[0], rk[0], rq[1:]
    caches = [pk.inputs[0], pv.inputs[0], pos, *([table] if paged else [])]
    with g.insert_before(attn):
        try:
            o, kc_new, vc_new = g.add_node(fused_op, [q, k, v, *caches, *cs], {"scale": attn.attrs["scale"]},
                                           loc=attn.loc, name="attn")
        except ValueError:
            if not cs:
                return False
            # a rotation whose cos/sin the op's type rule refuses (not [B, 1, T, D]): fuse without absorbing it
            q, k, cs = q_rot, k_rot, ()
            o, kc_new, vc_new = g.add_node(fused_op, [q, k, v, *caches], {"scale": attn.attrs["scale"]},
                                           loc=attn.loc, name="attn")
    g.replace_uses({attn.outputs[0]: o, kc2: kc_new, vc2: vc_new})
    g.erase_nodes([attn, pk, pv])
    if cs:   # the rotations' nodes, now read by nothing
        _erase_dead(g, [q_rot.producer, k_rot.producer])
    return True


def _erase_dead(g: Graph, nodes: list) -> None:
    """Erase ``nodes`` and their producers, transitively, where nothing reads their results any more."""
    outputs = set(g.outputs)
    while nodes:
        n = nodes.pop()
        if n is None or n.graph is not g or any(o.users or o in outputs for o in n.outputs):
            continue
        g.erase(n)
        nodes.extend(v.producer for v in n.inputs)


def _rope_source(x, only_user) -> Optional[tuple]:
    """(src, cos, sin) when ``x`` is rope(src, cos, sin) in fuse-elementwise's form and ``only_user`` is its
    only reader (else the rotation would run twice), else None."""
    n = x.producer
    if n is None or n.op != "fused.elementwise" or x.users != [only_user] or x.type.rank != 4:
        return None
    e = parse_expr(n.attrs["expr"])
    if not (e[0] == "add" and not e[1] and len(e[2]) == 2):
        return None
    muls = []
    for m in e[2]:
        if isinstance(m, int) or m[0] != "mul" or m[1] or not all(isinstance(a, int) for a in m[2]):
            return None
        muls.append([n.inputs[a] for a in m[2]])
    for plain, rotated in (muls, muls[::-1]):
        for rot, sin in (rotated, rotated[::-1]):
            src = _rotate_half_source(rot)
            if src is None or src not in plain:
                continue
            others = [v for v in plain if v is not src] or [src]
            if len(others) == 1 and sin is not rot:
                return src, others[0], sin
    return None


def _rotate_half_source(rot):
    """x when ``rot`` is concat(neg(slice(x, D/2:D)), slice(x, 0:D/2)) on the last axis of rank-4 x."""
    c = rot.producer
    if c is None or c.op != "concat" or len(c.inputs) != 2 or c.attrs["axis"] not in (3, -1):
        return None
    neg, lo = (v.producer for v in c.inputs)
    if neg is None or lo is None or neg.op != "neg" or lo.op != "slice":
        return None
    hi = neg.inputs[0].producer
    if hi is None or hi.op != "slice" or hi.inputs[0] is not lo.inputs[0]:
        return None
    x = lo.inputs[0]
    d = x.type.shape[-1] if x.type.rank == 4 else None
    if not isinstance(d, int) or d % 2:
        return None

    def is_slice(s, start, end):
        return (s.attrs["axis"] in (3, -1) and s.attrs.get("step", 1) == 1 and s.attrs["start"] == start
                and s.attrs["end"] == end)
    return x if is_slice(hi, d // 2, d) and is_slice(lo, 0, d // 2) else None
