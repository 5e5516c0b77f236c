"""Fused ops: what the fusion passes produce and backends lower to single kernels.

Each is defined by the unfused ops it stands for, so its reference semantics (and so the numeric check of
the passes that make it) is exactly that composition, evaluated op by op with the same dtype rules.

* ``fused.linear_act`` / ``fused.matmul_act``: a GEMM with bias and activation applied as the output tile
  is written (``act`` in ACTIVATIONS); linear takes weight [out, in], matmul weight [in, out] (GPT-2's
  Conv1D).
* ``fused.linear_glu``: Llama's MLP input, ``act(x @ Wg.T) * (x @ Wu.T)``, as one GEMM on
  ``weight = [Wg; Wu]`` whose epilogue combines each gate column with its up column.
* ``fused.add_rms_norm`` / ``fused.add_layer_norm``: a residual add and the norm of its sum, two results
  (the sum feeds the next residual add, the normed value the next layer), one pass over memory.
* ``fused.elementwise``: a tree of elementwise ops over its operands, written in ``expr`` as
  ``mul(silu(%0), %1)``; ops with attributes carry them in braces: ``gelu{approximate=tanh}(%0)``,
  ``cast{dtype=f16}(%1)``, ``clip{min=0.0, max=6.0}(%0)``.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Union

import numpy as np

from ..ops import Attr, defop, get_op
from ..types import DType, TensorType, dims_equal
from .rules import to_dtype

# activation name -> (op, attrs) it stands for; "none" is the identity
ACTIVATIONS = {"none": None, "relu": ("relu", {}), "gelu": ("gelu", {"approximate": "none"}),
               "gelu_tanh": ("gelu", {"approximate": "tanh"}), "silu": ("silu", {}), "tanh": ("tanh", {}),
               "sigmoid": ("sigmoid", {})}


def _apply_infer(op: str, attrs: dict, *types: TensorType) -> TensorType:
    d = get_op(op)
    return d.infer_types(list(types), d.complete_attrs(attrs))[0]


def _apply_ref(op: str, attrs: dict, *arrays) -> np.ndarray:
    d = get_op(op)
    attrs = d.complete_attrs(attrs)
    t = d.infer_types([TensorType(a.shape, DType.from_numpy(a.dtype)) for a in arrays], attrs)[0]
    with np.errstate(all="ignore"):
        return to_dtype(np.asarray(d.ref(*arrays, **attrs)), t.dtype)


def _act_infer(act: str, t: TensorType) -> TensorType:
    a = ACTIVATIONS[act]
    return t if a is None else _apply_infer(a[0], a[1], t)


def _act_ref(act: str, y: np.ndarray) -> np.ndarray:
    a = ACTIVATIONS[act]
    return y if a is None else _apply_ref(a[0], a[1], y)


_ACT_ATTR = {"act": Attr("str", "none", choices=tuple(ACTIVATIONS))}


def _gemm_infer(base: str):
    def infer(x, weight, bias=None, *, act):
        if base == "matmul" and (weight.rank != 2 or (bias is not None and bias.rank != 1)):
            raise ValueError(f"fused.matmul_act takes a rank-2 weight [in, out] and a rank-1 bias, got {weight}"
                             + (f", {bias}" if bias is not None else ""))
        t = _apply_infer(base, {}, x, weight, *([bias] if base == "linear" and bias is not None else []))
        if base == "matmul" and bias is not None:
            t = _apply_infer("add", {}, t, bias)
        return _act_infer(act, t)
    return infer


def _gemm_ref(base: str):
    def ref(x, weight, bias=None, *, act):
        if base == "linear":
            y = _apply_ref("linear", {}, x, weight, *([bias] if bias is not None else []))
        else:
            y = _apply_ref("matmul", {}, x, weight)
            if bias is not None:
                y = _apply_ref("add", {}, y, bias)
        return _act_ref(act, y)
    return ref


defop("fused.linear_act", ("x", "weight", "bias?"), _gemm_infer("linear"), _gemm_ref("linear"), _ACT_ATTR,
      doc="act(x @ weight.T + bias): linear with its activation as the GEMM epilogue")
defop("fused.matmul_act", ("x", "weight", "bias?"), _gemm_infer("matmul"), _gemm_ref("matmul"), _ACT_ATTR,
      doc="act(x @ weight + bias) with a rank-2 weight [in, out]: matmul with bias/activation epilogue")



def _glu_infer(x, weight, bias=None, *, act):
    t = _apply_infer("linear", {}, x, weight, *([bias] if bias is not None else []))
    n = weight.shape[0]
    if not isinstance(n, int) or n % 2:
        raise ValueError(f"fused.linear_glu needs an even number of weight rows [gate; up], got {weight}")
    half = TensorType((*t.shape[:-1], n // 2), t.dtype)
    return _apply_infer("mul", {}, _act_infer(act, half), half)


def _glu_ref(x, weight, bias=None, *, act):
    y = _apply_ref("linear", {}, x, weight, *([bias] if bias is not None else []))
    f = y.shape[-1] // 2
    return _apply_ref("mul", {}, _act_ref(act, np.ascontiguousarray(y[..., :f])), np.ascontiguousarray(y[..., f:]))


defop("fused.linear_glu", ("x", "weight", "bias?"), _glu_infer, _glu_ref, _ACT_ATTR,
      doc="act(gate) * up with [gate, up] = x @ weight.T + bias split in halves (SwiGLU: one GEMM, one kernel)")

def _add_norm_infer(norm: str):
    def infer(x, residual, *wb, eps, ndim):
        s = _apply_infer("add", {}, x, residual)
        if s != x:
            raise ValueError(f"the residual {residual} must not broadcast x {x} to a larger shape")
        return s, _apply_infer(norm, {"eps": eps, "ndim": ndim}, s, *wb)
    return infer


def _add_norm_ref(norm: str):
    def ref(x, residual, *wb, eps, ndim):
        s = _apply_ref("add", {}, x, residual)
        return s, _apply_ref(norm, {"eps": eps, "ndim": ndim}, s, *wb)
    return ref


_NORM_ATTRS = {"eps": Attr("float", 1e-5), "ndim": Attr("int", 1)}
defop("fused.add_rms_norm", ("x", "residual", "weight?"), _add_norm_infer("rms_norm"), _add_norm_ref("rms_norm"),
      _NORM_ATTRS, doc="(s, rms_norm(s)) with s = x + residual: one pass for a residual add and the next norm")
defop("fused.add_layer_norm", ("x", "residual", "weight?", "bias?"), _add_norm_infer("layer_norm"),
      _add_norm_ref("layer_norm"), _NORM_ATTRS,
      doc="(s, layer_norm(s)) with s = x + residual: one pass for a residual add and the next norm")


# -- fused.elementwise: expression text <-> tree -----------------------------------------------------

Expr = Union[int, tuple]  # operand index, or (op, attrs, (args...))

_TOKEN = re.compile(r"\s*(?:(%\d+)|([A-Za-z_][A-Za-z0-9_.]*)|(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?inf|nan)"
                    r"|(\"[^\"]*\")|([(){},=]))")


class ExprError(ValueError):
    """A malformed ``fused.elementwise`` expression; the message shows the position."""


@lru_cache(maxsize=4096)
def parse_expr(text: str) -> Expr:
    toks, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise ExprError(f"bad character at {at} in expr {text!r}")
        toks.append((m.lastindex, m.group(m.lastindex), m.start(m.lastindex)))
        pos = m.end()
    i = 0

    def peek(kind=None, val=None):
        if i >= len(toks):
            return False
        k, v, _ = toks[i]
        return (kind is None or k == kind) and (val is None or v == val)

    def take(kind=None, val=None):
        nonlocal i
        if not peek(kind, val):
            at = toks[i][2] if i < len(toks) else len(text)
            raise ExprError(f"expected {val or 'a term'} at {at} in expr {text!r}")
        i += 1
        return toks[i - 1][1]

    def value():
        if peek(3):
            s = take(3)
            return float(s) if any(c in s for c in ".eEin") else int(s)
        if peek(4):
            return take(4)[1:-1]
        word = take(2)
        if word in ("true", "false"):
            return word == "true"
        if word == "none":
            return None
        try:
            return DType.parse(word)
        except Exception:
            return word

    def term():
        if peek(1):
            return int(take(1)[1:])
        name = take(2)
        attrs = {}
        if peek(5, "{"):
            take(5, "{")
            while not peek(5, "}"):
                k = take(2)
                take(5, "=")
                attrs[k] = value()
                if not peek(5, "}"):
                    take(5, ",")
            take(5, "}")
        take(5, "(")
        args = [term()]
        while peek(5, ","):
            take(5, ",")
            args.append(term())
        take(5, ")")
        return (name, tuple(sorted(attrs.items())), tuple(args))

    out = term()
    if i != len(toks):
        raise ExprError(f"unexpected {toks[i][1]!r} at {toks[i][2]} in expr {text!r}")
    return out


def format_expr(e: Expr) -> str:
    if isinstance(e, int):
        return f"%{e}"
    name, attrs, args = e
    a = ""
    if attrs:
        a = "{" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in attrs) + "}"
    return f"{name}{a}({', '.join(format_expr(x) for x in args)})"


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, DType):
        return str(v)
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) and v not in ("true", "false", "none") \
            else f'"{v}"'
    return repr(v)


def expr_ops(e: Expr) -> list:
    """(op, attrs) of every op node in the tree, leaves first (evaluation order)."""
    if isinstance(e, int):
        return []
    out = []
    for a in e[2]:
        out += expr_ops(a)
    return out + [(e[0], dict(e[1]))]


def expr_operands(e: Expr) -> set:
    if isinstance(e, int):
        return {e}
    return set().union(*(expr_operands(a) for a in e[2]))


def eval_expr(e: Expr, leaves: list, apply):
    if isinstance(e, int):
        if e >= len(leaves):
            raise ValueError(f"expr uses %{e} but the node has {len(leaves)} operands")
        return leaves[e]
    name, attrs, args = e
    if name not in ELEMENTWISE:
        raise ValueError(f"op '{name}' in a fused.elementwise expr is not elementwise "
                         f"(known: {', '.join(sorted(ELEMENTWISE))})")
    return apply(name, dict(attrs), *(eval_expr(a, leaves, apply) for a in args))


def _ew_infer(*xs, expr):
    e = parse_expr(expr)
    missing = set(range(len(xs))) - expr_operands(e)
    if missing:
        raise ValueError(f"operand(s) {sorted(missing)} unused by expr {expr!r}")
    return eval_expr(e, list(xs), _apply_infer)


def _ew_ref(*xs, expr):
    return eval_expr(parse_expr(expr), list(xs), _apply_ref)


# the ops a fused.elementwise expr may use (and the elementwise fusion pass groups); plugins add theirs
ELEMENTWISE = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
               "logical_and", "logical_or", "logical_not", "neg", "abs", "relu", "exp", "log", "sqrt", "rsqrt",
               "reciprocal", "tanh", "sin", "cos", "erf", "sigmoid", "silu", "gelu", "clip", "cast", "where"}

defop("fused.elementwise", ("*xs",), _ew_infer, _ew_ref, {"expr": Attr("str")},
      doc="a tree of elementwise ops over the operands (expr, e.g. 'mul(silu(%0), %1)') as one kernel")


# -- the decode step's attention: RoPE + both cache appends + attention as one op ----------------------
#
# What the fuse-attention pass (passes/fuse_attention.py) makes of
#   q' = q * cos + rotate_half(q) * sin;  k' = k * cos + rotate_half(k) * sin     (the RoPE, when present)
#   kc' = kv.append(kc, k', pos);  vc' = kv.append(vc, v, pos);  o = kv.attention(q', kc', vc', pos)
# (and the paged twin), so a backend can run it as one kernel: each attention block rotates its query heads
# as it loads them, rotates the new key row, writes the new key and value rows into the cache and takes them
# from registers where the attention reaches their position. rotate_half(x) = concat(-x[..., D/2:],
# x[..., :D/2]) (Llama/NeoX). Results: (o, kc', vc'). The reference evaluates the ops it stands for in
# the same order with the same dtype rules, so the fusion is exact.

def _rope_types(q, cos, sin):
    if (cos is None) != (sin is None):
        raise ValueError("fused attention: cos and sin come together (RoPE) or not at all")
    if cos is None:
        return
    d = q.shape[3]
    if not isinstance(d, int) or d % 2:
        raise ValueError(f"fused attention: RoPE needs an even static head dim, got q {q}")
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.rank != 4 or t.dtype is not q.dtype or not all(dims_equal(t.shape[i], q.shape[i]) for i in (0, 2, 3))
                or not dims_equal(t.shape[1], 1)):
            raise ValueError(f"fused attention: {name} must be [B, 1, T, D] = [{q.shape[0]}, 1, {q.shape[2]}, "
                             f"{q.shape[3]}] of q's dtype {q.dtype}, got {t}")


def _rope_ref(x, cos, sin):
    """x * cos + rotate_half(x) * sin, op by op (the unfused graph's slices, neg, concat, muls and add)."""
    d = x.shape[3]
    hi = _apply_ref("slice", {"axis": 3, "start": d // 2, "end": d}, x)
    lo = _apply_ref("slice", {"axis": 3, "start": 0, "end": d // 2}, x)
    rot = _apply_ref("concat", {"axis": 3}, _apply_ref("neg", {}, hi), lo)
    return _apply_ref("add", {}, _apply_ref("mul", {}, x, cos), _apply_ref("mul", {}, rot, sin))


def _split_rest(paged: bool, rest: tuple) -> tuple:
    """(block_table, cos, sin) from the operands after pos (None where absent)."""
    table, rest = (rest[0], rest[1:]) if paged else (None, rest)
    if len(rest) not in (0, 2):
        raise ValueError("fused attention: cos and sin come together (RoPE) or not at all")
    return (table, *rest) if rest else (table, None, None)


_KV_OPS = {False: ("kv.append", "kv.attention"), True: ("kv.paged_append", "kv.paged_attention")}


def _append_attend(paged: bool, apply, q, k, v, k_cache, v_cache, pos, table, scale):
    """(o, kc', vc'): both appends and the attention through ``apply`` (_apply_infer on types, _apply_ref on
    arrays), as the unfused graph runs them."""
    append, attend = _KV_OPS[paged]
    extra = [table] if paged else []
    kc = apply(append, {}, k_cache, k, pos, *extra)
    vc = apply(append, {}, v_cache, v, pos, *extra)
    return apply(attend, {"scale": scale}, q, kc, vc, pos, *extra), kc, vc


def _rope_attention_infer(paged: bool):
    def infer(q, k, v, k_cache, v_cache, pos, *rest, scale):
        table, cos, sin = _split_rest(paged, rest)
        op = "fused.rope_paged_append_attention" if paged else "fused.rope_append_attention"
        if k.rank != 4 or not k.same_as(v):
            raise ValueError(f"{op}: the new keys {k} and values {v} must be one [B, Hkv, T, D] type")
        _rope_types(q, cos, sin)
        if cos is not None and not dims_equal(k.shape[2], q.shape[2]):
            raise ValueError(f"{op}: RoPE needs as many new keys as queries per row, got q {q} and k {k}")
        return _append_attend(paged, _apply_infer, q, k, v, k_cache, v_cache, pos, table, scale)
    return infer


def _rope_attention_ref(paged: bool):
    def ref(q, k, v, k_cache, v_cache, pos, *rest, scale):
        table, cos, sin = _split_rest(paged, rest)
        if cos is not None:
            q, k = _rope_ref(q, cos, sin), _rope_ref(k, cos, sin)
        return _append_attend(paged, _apply_ref, q, k, v, k_cache, v_cache, pos, table, scale)
    return ref


defop("fused.rope_append_attention", ("q", "k", "v", "k_cache", "v_cache", "pos", "cos?", "sin?"),
      _rope_attention_infer(False), _rope_attention_ref(False), {"scale": Attr("float")},
      doc="(o, kc', vc'): RoPE of q and k (when cos/sin are given), kv.append of k and v, kv.attention of q")
defop("fused.rope_paged_append_attention",
      ("q", "k", "v", "k_pool", "v_pool", "pos", "block_table", "cos?", "sin?"),
      _rope_attention_infer(True), _rope_attention_ref(True), {"scale": Attr("float")},
      doc="the paged twin of fused.rope_append_attention: kv.paged_append and kv.paged_attention")
