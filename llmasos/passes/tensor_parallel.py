"""``tensor-parallel{tp=N}``: Megatron-style intra-layer partitioning into an SPMD graph (llmasos/ir/sharding.py).

The pass walks the graph once, carrying each value's sharding (replicated, split(dim) or partial over the
mesh axis ``tp``), and rewrites every node by the rule its op has in ``SHARDING_RULES``:

* a GEMM (``linear``, ``fused.linear_act``, ``fused.linear_glu``, ``quant.linear``, ``quant.linear_a8``,
  ``matmul`` / ``fused.matmul_act`` on a [in, out] weight) whose input is replicated is COLUMN-split: each
  rank holds out/tp output features (weight rows, bias, quantization scales and zeros split with them; the
  glu weight [gate; up] is reordered so that each rank holds its gate rows beside its up rows). Where every
  user of the result slices the feature dim (a fused q|k|v projection), the rows are reordered segment by
  segment so that each rank's chunk is q_r | k_r | v_r and the slices become local slices;
* a GEMM whose input is split on its contraction dim is ROW-split: the weight splits along its input dim
  (quantization groups with it), the product is partial, one ``dist.all_reduce`` makes it whole, and bias
  and activation follow the all-reduce. So Q/K/V and gate/up are column-split, O and down row-split with
  one all-reduce each, and the LM head is column-split over the vocabulary and all-gathered at the output;
* a reshape that splits a feature dim into (heads, head_dim) keeps the split on the heads dim (a clear
  error when the heads -- or KV heads -- do not divide by tp; GQA groups stay whole because q heads and
  KV heads split in the same proportion); permutes, elementwise ops, norms and reductions over other dims,
  rope's slices and concats on head_dim, ``kv.append`` / ``kv.attention`` pass a split through; a KV cache
  input meeting split heads becomes a split input (each rank holds its heads' cache);
* anything else all-gathers its split operands and runs replicated (always correct, never silently wrong).

Graph outputs split by the pass are all-gathered, except KV caches (``kv.append`` results), which stay
per rank. The result's parameters hold their logical data (reordered where needed) and a sharding; the
runtime (llmasos/parallel) or ``llmasos.ir.interpreter.run_ranks`` cuts each rank's shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import numpy as np

from ..ir import Graph, Node, Value, get_op
from ..ir.graph import param_array
from ..ir.opset.collective import COLLECTIVES
from ..ir.opset.fused import ACTIVATIONS
from ..ir.sharding import Sharding, contiguous
from ..ir.types import TensorType, as_dim, dims_equal
from .base import NO_CONTEXT, Pass, PassContext, PassError, PassNotApplicable, register_pass

GEMMS = ("linear", "fused.linear_act", "fused.linear_glu", "quant.linear", "quant.linear_a8", "matmul",
         "fused.matmul_act")
ELEMENTWISE_MODULES = ("llmasos.ir.opset.elementwise",)


def _static(d) -> Optional[int]:
    d = as_dim(d)
    return d if isinstance(d, int) else None


class _Rewriter:
    def __init__(self, p: "TensorParallel", g: Graph):
        self.p, self.src, self.tp, self.axis = p, g, p.tp, p.axis
        self.g = Graph(g.name)
        self.g.symbols = dict(g.symbols)
        self.g.mesh = {**g.mesh, self.axis: self.tp}   # after pipeline-parallel: {pp: P, tp: T}
        self.m: dict = {}             # source value -> new value
        self.params: dict = {}        # (name, sharding, key) -> new param value
        self.gathered: dict = {}      # new split value -> its all-gathered replicated copy
        self.sharded: dict = {}       # (new replicated value, dim) -> dist.shard of it
        self.segments: dict = {}      # new column-split value -> {(start, end) global: (start, end) local}
        self.node: Optional[Node] = None

    # -- helpers ------------------------------------------------------------------------------------
    def err(self, msg: str):
        """What does not divide by tp: the pass cannot apply at this degree (PassNotApplicable, a PassError)."""
        return PassNotApplicable(str(self.p), msg, self.node)

    def split(self, dim: int) -> Sharding:
        return Sharding.split(dim, self.axis)

    def emit(self, op: str, inputs, attrs: dict, shardings) -> list:
        n = self.g.create_node(op, list(inputs), dict(attrs), loc=self.node.loc if self.node else None)
        for o, s in zip(n.outputs, shardings):
            o.sharding = s
        return list(n.outputs)

    def param(self, v: Value, sharding: Optional[Sharding] = None, transform: Optional[Callable] = None,
              key: str = "") -> Value:
        k = (v.name, str(sharding), key)
        if k not in self.params:
            data = param_array(self.src.param_data[v.name])
            if transform is not None:
                data = contiguous(transform(data))
            if sharding is not None and sharding.is_split and data.shape[sharding.dim] % self.tp:
                raise self.err(f"parameter %{v.name} {list(data.shape)}: dim {sharding.dim} does not divide into "
                               f"tp={self.tp}")
            local = list(data.shape)
            if sharding is not None and sharding.is_split:
                local[sharding.dim] //= self.tp
            t = TensorType(tuple(local), v.type.dtype)
            dup = any(kk[0] == v.name for kk in self.params)   # a second form of a shared weight (tied head)
            self.params[k] = self.g.add_param(v.name + ".tp" if dup else v.name, data, type=t, sharding=sharding,
                                              unique=dup)
        return self.params[k]

    def replicated(self, v: Value) -> Value:
        s = v.sharding
        if s is None:
            return v
        if s.is_partial:
            return self.all_reduce(v)
        if v not in self.gathered:
            (r,) = self.emit("dist.all_gather", [v], {"axis": self.axis, "parts": self.tp, "dim": s.dim}, [None])
            self.gathered[v] = r
        return self.gathered[v]

    def all_reduce(self, v: Value) -> Value:
        (r,) = self.emit("dist.all_reduce", [v], {"axis": self.axis, "parts": self.tp, "op": "sum"}, [None])
        return r

    def shard(self, v: Value, dim: int) -> Value:
        """A replicated value split along dim (each rank keeps its chunk: no traffic)."""
        if v.sharding is not None:
            if v.sharding == self.split(dim):
                return v
            v = self.replicated(v)
        n = _static(v.type.shape[dim])
        if n is None or n % self.tp:
            raise self.err(f"%{v.name} {v.type}: dim {dim} does not divide into tp={self.tp}")
        if v in self.g.inputs and v.num_uses == 0:     # a graph input not yet read: take it split (KV caches)
            shape = list(v.type.shape)
            shape[dim] = n // self.tp
            v.type, v.sharding = TensorType(tuple(shape), v.type.dtype), self.split(dim)
            return v
        k = (v, dim)
        if k not in self.sharded:
            (self.sharded[k],) = self.emit("dist.shard", [v], {"axis": self.axis, "parts": self.tp, "dim": dim},
                                           [self.split(dim)])
        return self.sharded[k]

    def fallback(self, n: Node, ins: list) -> list:
        return self.emit(n.op, [self.replicated(v) for v in ins], n.attrs, [None] * len(n.outputs))

    # -- the walk -----------------------------------------------------------------------------------
    def run(self) -> Graph:
        for v in self.src.inputs:
            self.m[v] = self.g.add_input(v.name, v.type)
        for n in self.src.nodes:
            self.node = n
            outs = self.rewrite(n)
            for old, new in zip(n.outputs, outs):
                self.m[old] = new
        self.node = None
        outs = []
        for v in self.src.outputs:
            nv = self.value(v)
            keep = nv.sharding is not None and nv.sharding.is_split and isinstance(v.producer, Node) \
                and v.producer.op == "kv.append"
            outs.append(nv if keep else self.replicated(nv))
        self.g.set_outputs(outs)
        return self.g

    def rewrite(self, n: Node) -> list:
        rule = SHARDING_RULES.get(n.op)
        outs = None
        if n.op in GEMMS and len(n.inputs) > 1 and all(self.is_param(w) for w in n.inputs[1:]) \
                and not self.is_param(n.inputs[0]):
            outs = self.gemm(n, self.value(n.inputs[0]))
        elif rule is not None:
            outs = rule(self, n, [self.value(v) for v in n.inputs])
        elif get_op(n.op).infer.__module__ in ELEMENTWISE_MODULES:
            outs = self.elementwise(n, [self.value(v) for v in n.inputs])
        return outs if outs is not None else self.fallback(n, [self.value(v) for v in n.inputs])

    def is_param(self, v: Value) -> bool:
        return self.src.params.get(v.name) is v

    def value(self, v: Value) -> Value:
        """The new value for a source operand (params are made on demand: replicated here)."""
        return self.param(v) if self.is_param(v) else self.m[v]

    # -- GEMMs --------------------------------------------------------------------------------------
    def gemm(self, n: Node, x: Value) -> Optional[list]:
        ws = n.inputs[1:]
        op = n.op
        xs = x.sharding
        if xs is not None and xs.is_split and xs.dim != x.type.rank - 1:
            # split on a row dim: every row is its own GEMM, the weights stay whole
            return self.emit(op, [x, *(self.param(w) for w in ws)], n.attrs, [xs])
        if xs is None:
            return self.column(n, x, ws)
        if op in ("fused.linear_glu", "quant.linear_a8"):
            return None  # nonlinear in a split input (glu) or per-token scales over all of K (a8): gather
        return self.row(n, x, ws)

    def _segments(self, n: Node, nout: int) -> list:
        users = [u.node for u in n.outputs[0].uses]
        last = n.outputs[0].type.rank - 1
        if not users or not all(u.op == "slice" and u.attrs["step"] == 1 and u.attrs["axis"] % (last + 1) == last
                                and _static(u.attrs["start"]) is not None and _static(u.attrs["end"]) is not None
                                for u in users):
            return [(0, nout)]
        cuts = sorted({0, nout, *(int(u.attrs["start"]) for u in users), *(int(u.attrs["end"]) for u in users)})
        segs = list(zip(cuts[:-1], cuts[1:]))
        for a, b in segs:
            if (b - a) % self.tp:
                raise self.err(f"the fused projection's output features [{a}:{b}] ({b - a}, e.g. the heads of q, k "
                               f"or v times head_dim) do not divide into tp={self.tp}")
        return segs

    def column(self, n: Node, x: Value, ws: list) -> list:
        op, tp = n.op, self.tp
        w = ws[0]
        wt = w.type
        if op in ("matmul", "fused.matmul_act"):
            if wt.rank != 2:
                return None
            nout = _static(wt.shape[1])
        elif op == "fused.linear_glu":
            nout = _static(wt.shape[0]) // 2
        else:
            nout = _static(wt.shape[0])
        if nout is None or nout % tp:
            raise self.err(f"{nout} output features (attention heads x head_dim, ffn or vocab) do not divide into "
                           f"tp={tp}: choose a tp that divides them")
        segs = [(0, nout)] if op == "fused.linear_glu" else self._segments(n, nout)
        perm = np.concatenate([np.arange(a + r * ((b - a) // tp), a + (r + 1) * ((b - a) // tp))
                               for r in range(tp) for a, b in segs])
        if op == "fused.linear_glu":
            k = nout // tp
            perm = np.concatenate([np.r_[np.arange(r * k, (r + 1) * k), nout + np.arange(r * k, (r + 1) * k)]
                                   for r in range(tp)])
        ident = bool(np.array_equal(perm, np.arange(len(perm))))
        key = "" if ident else "perm:" + ",".join(f"{a}-{b}" for a, b in segs) + ("glu" if op == "fused.linear_glu"
                                                                                     else "")
        dim0 = 1 if op in ("matmul", "fused.matmul_act") else 0

        def rows(a, d=0):
            return a if ident else np.take(a, perm, axis=d)

        new_ws = []
        for i, p in enumerate(ws):
            role = get_op(op).operands[i + 1].rstrip("?")
            t = p.type
            if role in ("scale", "zero") and t.rank == 2 and _static(t.shape[0]) == 1 and _static(t.shape[1]) == 1:
                new_ws.append(self.param(p))                           # one scale for the whole tensor
            elif i == 0 and dim0 == 1:
                new_ws.append(self.param(p, self.split(1), lambda a: rows(a, 1), key))
            else:
                new_ws.append(self.param(p, self.split(0), rows, key))
        out = n.outputs[0]
        (y,) = self.emit(op, [x, *new_ws], n.attrs, [self.split(out.type.rank - 1)])
        if len(segs) > 1:
            k, local = {}, 0
            for a, b in segs:
                k[(a, b)] = (local, local + (b - a) // tp)
                local += (b - a) // tp
            self.segments[y] = k
        return [y]

    def row(self, n: Node, x: Value, ws: list) -> Optional[list]:
        op = n.op
        names = [o.rstrip("?") for o in get_op(op).operands[1:]]
        roles = dict(zip(names, ws))
        bias = roles.get("bias")
        K = _static(x.type.shape[-1]) * self.tp if _static(x.type.shape[-1]) else None
        if op == "quant.linear":
            bits, group = n.attrs["bits"], n.attrs["group"]
            kl = K // self.tp
            s = roles["scale"].type
            per_tensor = _static(s.shape[0]) == 1 and _static(s.shape[1]) == 1
            if bits == 4 and kl % 2:
                return None
            if group and not per_tensor and (kl % group or (K // group) % self.tp):
                return None  # quantization groups would straddle ranks: gather instead
            sc = None if (per_tensor or not group) else self.split(1)
            new = [self.param(roles["qweight"], self.split(1)), self.param(roles["scale"], sc),
                   self.param(roles["zero"], sc)]
        elif op in ("matmul", "fused.matmul_act"):
            if roles.get("rhs", roles.get("weight")).type.rank != 2:
                return None
            new = [self.param(ws[0], self.split(0))]
        else:
            new = [self.param(roles["weight"], self.split(1))]
        base = {"linear": "linear", "fused.linear_act": "linear", "quant.linear": "quant.linear",
                "matmul": "matmul", "fused.matmul_act": "matmul"}[op]
        attrs = {k: v for k, v in n.attrs.items() if k in ("bits", "group")}
        (y,) = self.emit(base, [x, *new], attrs, [Sharding.partial(self.axis)])
        y = self.all_reduce(y)
        if bias is not None:
            (y,) = self.emit("add", [y, self.param(bias)], {}, [None])
        act = ACTIVATIONS.get(n.attrs.get("act", "none"))
        if act is not None:
            (y,) = self.emit(act[0], [y], act[1], [None])
        return [y]

    # -- elementwise --------------------------------------------------------------------------------
    def elementwise(self, n: Node, ins: list) -> Optional[list]:
        R = n.outputs[0].type.rank
        dims = {v.sharding.dim + R - v.type.rank for v in ins if v.sharding is not None and v.sharding.is_split}
        if any(v.sharding is not None and v.sharding.is_partial for v in ins):
            return None
        if not dims:
            return self.emit(n.op, ins, n.attrs, [None] * len(n.outputs))
        if len(dims) > 1:
            return None
        (D,) = dims
        new = []
        for v in ins:
            if v.sharding is not None:
                new.append(v)
                continue
            d = D - (R - v.type.rank)
            if d < 0 or _static(v.type.shape[d]) == 1:
                new.append(v)                           # broadcast along the split dim
            elif _static(v.type.shape[d]) is None or _static(v.type.shape[d]) % self.tp:
                return None
            else:
                new.append(self.shard(v, d))
        return self.emit(n.op, new, n.attrs, [self.split(D)] * len(n.outputs))


# -- rules for the other ops: fn(rewriter, node, new operands) -> new results, or None: gather and run whole --
def _passthrough(rw: _Rewriter, n: Node, ins: list, dim_map: Callable[[int], Optional[int]], attrs=None):
    """One split operand (the first), its dim mapped to the results' dim; other operands must be replicated."""
    if not ins or ins[0].sharding is None:
        return None if any(v.sharding is not None for v in ins) else rw.emit(n.op, ins, n.attrs,
                                                                              [None] * len(n.outputs))
    s = ins[0].sharding
    if s.is_partial or any(v.sharding is not None for v in ins[1:]):
        return None
    d = dim_map(s.dim)
    if d is None:
        return None
    return rw.emit(n.op, ins, n.attrs if attrs is None else attrs, [rw.split(d)] * len(n.outputs))


def _axis_of(a: int, rank: int) -> int:
    return a % rank if rank else 0


def _r_permute(rw, n, ins):
    perm = n.attrs["perm"]
    return _passthrough(rw, n, ins, lambda d: list(perm).index(d))


def _r_axis_op(rw, n, ins):       # softmax, log_softmax, cumsum, concat on another dim
    ax = _axis_of(n.attrs["axis"], ins[0].type.rank)
    if n.op == "concat":
        ss = {str(v.sharding) for v in ins}
        if len(ss) != 1 or ins[0].sharding is None or ins[0].sharding.dim == ax:
            return None if any(v.sharding is not None for v in ins) else rw.emit(n.op, ins, n.attrs, [None])
        return rw.emit(n.op, ins, n.attrs, [ins[0].sharding])
    return _passthrough(rw, n, ins, lambda d: None if d == ax else d)


def _r_split(rw, n, ins):
    ax = _axis_of(n.attrs["axis"], ins[0].type.rank)
    return _passthrough(rw, n, ins, lambda d: None if d == ax else d)


def _r_reduce(rw, n, ins):
    rank = ins[0].type.rank
    axes = {_axis_of(a, rank) for a in n.attrs["axes"]} if "axes" in n.attrs else {_axis_of(n.attrs["axis"], rank)}
    keep = n.attrs.get("keepdims", False)

    def m(d):
        if d in axes:
            return None
        return d if keep else d - sum(1 for a in axes if a < d)
    return _passthrough(rw, n, ins, m)


def _r_norm(rw, n, ins):         # layer_norm / rms_norm over the last ndim dims; weights replicated
    rank = ins[0].type.rank
    nd = n.attrs.get("ndim", 1)
    return _passthrough(rw, n, ins, lambda d: None if d >= rank - nd else d)


def _r_add_norm(rw, n, ins):     # fused.add_*_norm(x, residual, weight?, bias?) -> (sum, normed)
    rank = ins[0].type.rank
    nd = n.attrs.get("ndim", 1)
    s = ins[0].sharding
    if s is None and ins[1].sharding is None and all(v.sharding is None for v in ins[2:]):
        return rw.emit(n.op, ins, n.attrs, [None, None])
    if s is None or ins[1].sharding != s or s.is_partial or s.dim >= rank - nd or \
            any(v.sharding is not None for v in ins[2:]):
        return None
    return rw.emit(n.op, ins, n.attrs, [s, s])


def _r_expand_dims(rw, n, ins):
    ax = _axis_of(n.attrs["axis"], ins[0].type.rank + 1)
    return _passthrough(rw, n, ins, lambda d: d + 1 if d >= ax else d)


def _r_squeeze(rw, n, ins):
    axes = {_axis_of(a, ins[0].type.rank) for a in n.attrs["axes"]}
    return _passthrough(rw, n, ins, lambda d: None if d in axes else d - sum(1 for a in axes if a < d))


def _r_slice(rw, n, ins):
    x = ins[0]
    s = x.sharding
    ax = _axis_of(n.attrs["axis"], x.type.rank)
    if s is None or s.is_partial or s.dim != ax:
        return _passthrough(rw, n, ins, lambda d: d)
    seg = rw.segments.get(x, {}).get((_static(n.attrs["start"]), _static(n.attrs["end"])))
    if seg is None or n.attrs["step"] != 1:
        return None
    return rw.emit("slice", [x], {**n.attrs, "start": seg[0], "end": seg[1]}, [s])


def _r_reshape(rw, n, ins):
    x = ins[0]
    s = x.sharding
    if s is None or s.is_partial:
        return _passthrough(rw, n, ins, lambda d: d)
    tp = rw.tp
    src = [as_dim(d) for d in x.type.shape]
    src[s.dim] = as_dim(src[s.dim] * tp)                  # the logical input shape
    dst = [as_dim(d) for d in n.attrs["shape"]]
    # group the dims into runs with equal products
    i = j = 0
    while i < len(src) or j < len(dst):
        i0, j0 = i, j
        pi = pj = as_dim(1)
        if i < len(src):
            pi, i = src[i], i + 1
        if j < len(dst):
            pj, j = dst[j], j + 1
        while not dims_equal(pi, pj):
            if _static(pi) is not None and _static(pj) is not None and _static(pi) < _static(pj) and i < len(src):
                pi, i = as_dim(pi * src[i]), i + 1
            elif j < len(dst) and (_static(pi) is None or _static(pj) is None or _static(pj) < _static(pi)):
                pj, j = as_dim(pj * dst[j]), j + 1
            elif i < len(src):
                pi, i = as_dim(pi * src[i]), i + 1
            else:
                return None
        if i0 <= s.dim < i:
            if any(_static(src[k]) != 1 for k in range(i0, s.dim)):
                return None
            outs = [k for k in range(j0, j) if _static(dst[k]) != 1]
            if not outs:
                return None
            o = outs[0]
            so = _static(dst[o])
            if so is None or so % tp:
                raise rw.err(f"reshape splits the {_static(src[s.dim])} features split over tp={tp} into "
                             f"{[str(d) for d in dst[j0:j]]}: {so} (attention heads or KV heads) does not divide "
                             f"into tp={tp}. Choose a tp dividing both (GQA keeps each KV head with its query "
                             f"heads)")
            shape = list(n.attrs["shape"])
            shape[o] = so // tp
            return rw.emit("reshape", [x], {**n.attrs, "shape": shape}, [rw.split(o)])
    return None


def _r_embedding(rw, n, ins):    # embedding(weight, ids): rows of ids split -> rows of the result split
    w, ids = ins
    if w.sharding is not None or ids.sharding is None or ids.sharding.is_partial:
        return None if (w.sharding is not None or ids.sharding is not None) else \
            rw.emit(n.op, ins, n.attrs, [None])
    return rw.emit(n.op, ins, n.attrs, [ids.sharding])


def _r_kv_append(rw, n, ins):    # kv.append(cache, new, pos): the cache follows new's split (its heads)
    cache, new, pos = ins
    if new.sharding is None and cache.sharding is None:
        return rw.emit(n.op, ins, n.attrs, [None])
    if new.sharding is None or new.sharding.is_partial or pos.sharding is not None or new.sharding.dim == 2:
        return None
    d = new.sharding.dim
    return rw.emit(n.op, [rw.shard(cache, d), new, pos], n.attrs, [new.sharding])


def _r_kv_attention(rw, n, ins):  # q [B, H, T, D] and the caches split on heads: GQA groups stay whole
    q, kc, vc, pos = ins
    if all(v.sharding is None for v in ins):
        return rw.emit(n.op, ins, n.attrs, [None])
    s = q.sharding
    if s is None or s.is_partial or s.dim not in (0, 1) or pos.sharding is not None:
        return None
    return rw.emit(n.op, [q, rw.shard(kc, s.dim), rw.shard(vc, s.dim), pos], n.attrs, [s])


def _r_fused_attention(rw, n, ins):   # fused.rope_(paged_)append_attention: kv.append's and kv.attention's rules
    q, k, v, kc, vc, pos = ins[:6]     # at once -- q, the new rows and the caches split on heads; pos, the block
    rest = ins[6:]                     # table, cos and sin replicated
    if all(x.sharding is None for x in ins):
        return rw.emit(n.op, ins, n.attrs, [None, None, None])
    s = q.sharding
    dims = (1,) if n.op == "fused.rope_paged_append_attention" else (0, 1)   # a pool has no batch dim
    if (s is None or s.is_partial or s.dim not in dims or k.sharding != s or v.sharding != s
            or any(x.sharding is not None for x in (pos, *rest))):
        return None
    kc, vc = rw.shard(kc, s.dim), rw.shard(vc, s.dim)
    return rw.emit(n.op, [q, k, v, kc, vc, pos, *rest], n.attrs, [s, kc.sharding, vc.sharding])


def _r_sdpa(rw, n, ins):
    q = ins[0]
    s = q.sharding
    if all(v.sharding is None for v in ins):
        return rw.emit(n.op, ins, n.attrs, [None])
    if s is None or s.is_partial or s.dim >= q.type.rank - 2:
        return None
    new = [q, rw.shard(ins[1], s.dim), rw.shard(ins[2], s.dim)]
    if len(ins) > 3:
        m = ins[3]
        d = s.dim - (q.type.rank - m.type.rank)
        new.append(m if m.sharding is not None or d < 0 or _static(m.type.shape[d]) == 1 else rw.shard(m, d))
        if m.sharding is not None and m.sharding != rw.split(d):
            return None
    return rw.emit(n.op, new, n.attrs, [s])


def _r_matmul(rw, n, ins):       # two activations: batch dims split alike, or M of lhs / N of rhs
    a, b = ins
    if a.sharding is None and b.sharding is None:
        return rw.emit(n.op, ins, n.attrs, [None])
    R = n.outputs[0].type.rank
    if (a.sharding is not None and a.sharding.is_partial) or (b.sharding is not None and b.sharding.is_partial):
        return None
    if a.type.rank < 2 or b.type.rank < 2:
        return None
    da = None if a.sharding is None else a.sharding.dim + R - a.type.rank
    db = None if b.sharding is None else b.sharding.dim + R - b.type.rank
    if da is not None and da == R - 1:
        return None                                      # K split: would be partial; gather instead
    if db is not None and db == R - 2:
        return None
    if da is not None and da == R - 2 and b.sharding is None:
        return rw.emit(n.op, ins, n.attrs, [rw.split(R - 2)])
    if db is not None and db == R - 1 and a.sharding is None:
        return rw.emit(n.op, ins, n.attrs, [rw.split(R - 1)])
    if da is not None and da < R - 2 and (db is None or db == da):
        other = b if db is not None else (b if b.type.rank - (R - da) < 0 or
                                          _static(b.type.shape[da - R + b.type.rank]) == 1
                                          else rw.shard(b, da - R + b.type.rank))
        return rw.emit(n.op, [a, other], n.attrs, [rw.split(da)])
    return None


SHARDING_RULES: dict = {
    "permute": _r_permute, "softmax": _r_axis_op, "log_softmax": _r_axis_op, "cumsum": _r_axis_op,
    "concat": _r_axis_op, "split": _r_split, "sum": _r_reduce, "mean": _r_reduce, "max": _r_reduce,
    "min": _r_reduce, "prod": _r_reduce, "argmax": _r_reduce, "layer_norm": _r_norm, "rms_norm": _r_norm,
    "fused.add_rms_norm": _r_add_norm, "fused.add_layer_norm": _r_add_norm, "expand_dims": _r_expand_dims,
    "squeeze": _r_squeeze, "slice": _r_slice, "reshape": _r_reshape, "embedding": _r_embedding,
    "kv.append": _r_kv_append, "kv.attention": _r_kv_attention, "sdpa": _r_sdpa, "matmul": _r_matmul,
    "fused.rope_append_attention": _r_fused_attention, "fused.rope_paged_append_attention": _r_fused_attention,
    "fused.elementwise": lambda rw, n, ins: rw.elementwise(n, ins),
}


def register_sharding_rule(op: str, fn: Callable) -> None:
    """How tensor-parallel carries a split through ``op`` (plugins: ops of their own)."""
    SHARDING_RULES[op] = fn


@register_pass("tensor-parallel")
@dataclass(frozen=True)
class TensorParallel(Pass):
    """Megatron tensor parallelism over ``tp`` ranks (mesh axis ``axis``); see the module doc."""

    tp: int = 2
    axis: str = "tp"
    exact: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-5   # the all-reduce sums the same products in another order
    atol: ClassVar[float] = 1e-5

    def __post_init__(self):
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise PassError("tensor-parallel", f"tp must be an int >= 1, got {self.tp!r}")

    def run(self, graph: Graph, ctx: PassContext = NO_CONTEXT) -> Graph:
        if self.tp == 1:
            return graph
        if self.axis in graph.mesh:
            raise PassNotApplicable(str(self), f"the graph is already partitioned over {self.axis!r} (mesh {graph.mesh})")
        for n in graph.nodes:
            if n.op in COLLECTIVES:
                raise PassNotApplicable(str(self), "the graph already has collectives (tensor-parallel runs once)", n)
        return _Rewriter(self, graph).run()
