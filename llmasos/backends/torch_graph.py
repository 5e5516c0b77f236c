"""Run an LLMasOS graph with torch ops: fast CPU evaluation (MKL GEMMs) and autograd (distillation).

    gm = GraphModule(graph)              # params become nn.Parameters (float ones trainable)
    logits = gm(ids)                     # torch tensors or numpy arrays in, torch tensors out
    gm.set_masks({"w": w != 0})          # pruning masks survive training
    g2 = gm.to_graph()                   # the graph again, with the (trained) parameter values

Every op's torch semantics live in ``TORCH_IMPLS`` (op name -> ``fn(*tensors, **attrs)``, attrs with symbolic
dims already evaluated), like every other per-op table of the compiler; ``register_torch_impl`` adds one.
Results are cast to the dtype the op's type rule promises and their shapes checked against it, so a wrong
entry fails loudly instead of drifting from the reference interpreter.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..frontends import kv_ops  # the torch custom ops that are kv.append / kv.attention in torch
from ..ir.graph import Graph, param_array
from ..ir.interpreter import bind_symbols, evaluate_attrs
from ..ir.ops import all_ops, get_op
from ..ir.opset.fused import ACTIVATIONS, eval_expr, parse_expr
from ..ir.opset.rules import to_dtype
from ..ir.torch_dtypes import dtype_to_torch, numpy_to_torch
from ..ir.types import DType

TORCH_IMPLS: dict[str, Callable] = {}


def register_torch_impl(op: str, fn: Optional[Callable] = None, *, replace: bool = False):
    """Register ``fn(*tensors, **attrs)`` as op's torch semantics (usable as a decorator)."""
    def add(f):
        if op in TORCH_IMPLS and not replace:
            raise ValueError(f"op '{op}' already has a torch implementation (pass replace=True)")
        TORCH_IMPLS[op] = f
        return f
    return add(fn) if fn is not None else add


def _tdt(dt: DType) -> torch.dtype:
    # packed ints are held unpacked, one per byte, as numpy (ml_dtypes) holds them
    if dt is DType.i4:
        return torch.int8
    if dt is DType.u4:
        return torch.uint8
    return dtype_to_torch(dt)


# -- elementwise ------------------------------------------------------------------------------------
_F8_MAX = 448.0

for _n, _f in {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
               "minimum": torch.minimum, "pow": torch.pow, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt,
               "le": torch.le, "gt": torch.gt, "ge": torch.ge, "logical_and": torch.logical_and,
               "logical_or": torch.logical_or, "logical_not": torch.logical_not, "neg": torch.neg,
               "abs": torch.abs, "relu": torch.relu, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
               "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "tanh": torch.tanh, "sin": torch.sin,
               "cos": torch.cos, "erf": torch.erf, "sigmoid": torch.sigmoid, "silu": F.silu,
               "where": torch.where, "div": torch.div}.items():
    register_torch_impl(_n, _f)
register_torch_impl("gelu", lambda x, approximate: F.gelu(x, approximate=approximate))


@register_torch_impl("clip")
def _clip(x, min, max):
    if not x.is_floating_point():  # the type rule only admits integral bounds here
        min, max = (None if b is None else int(b) for b in (min, max))
    if min is not None:
        x = torch.clamp(x, min=min)
    if max is not None:
        x = torch.clamp(x, max=max)  # min > max gives max everywhere, as torch.clamp and the ref do
    return x


@register_torch_impl("cast")
def _cast(x, dtype):
    if dtype is DType.f8e4m3:  # saturate like the reference (to_dtype), not overflow to nan
        x = torch.clamp(x.float(), -_F8_MAX, _F8_MAX)
    return x.to(_tdt(dtype))


# -- nn ---------------------------------------------------------------------------------------------
register_torch_impl("softmax", lambda x, axis: torch.softmax(x, axis))
register_torch_impl("log_softmax", lambda x, axis: torch.log_softmax(x, axis))


@register_torch_impl("layer_norm")
def _layer_norm(x, weight=None, bias=None, *, eps, ndim):
    return F.layer_norm(x, tuple(x.shape[x.ndim - ndim:]), weight, bias, eps)


@register_torch_impl("rms_norm")
def _rms_norm(x, weight=None, *, eps, ndim):
    dims = tuple(range(x.ndim - ndim, x.ndim))
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y if weight is None else y * weight


register_torch_impl("embedding", lambda weight, ids: F.embedding(ids, weight))


@register_torch_impl("sdpa")
def _sdpa(q, k, v, mask=None, *, is_causal, scale):
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:  # grouped-query attention, as np.repeat in the reference
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    if is_causal and mask is not None:  # torch takes one or the other: fold the causal mask into `mask`
        L, S = q.shape[-2], k.shape[-2]
        tri = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        mask = (mask & tri) if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


# -- linalg -----------------------------------------------------------------------------------------
register_torch_impl("matmul", torch.matmul)
register_torch_impl("linear", lambda x, weight, bias=None: F.linear(x, weight, bias))


# -- reductions -------------------------------------------------------------------------------------
def _reduce(fn):
    def run(x, axes, keepdims):
        if not axes or x.ndim == 0:  # [] reduces nothing (torch's dim=[] would reduce everything)
            return x
        return fn(x, dim=list(axes), keepdim=keepdims)
    return run


register_torch_impl("sum", _reduce(torch.sum))
register_torch_impl("mean", _reduce(torch.mean))
register_torch_impl("max", _reduce(torch.amax))
register_torch_impl("min", _reduce(torch.amin))


@register_torch_impl("prod")
def _prod(x, axes, keepdims):
    if not axes or x.ndim == 0:
        return x
    for a in sorted((a % x.ndim for a in axes), reverse=True):
        x = torch.prod(x, dim=a, keepdim=keepdims)
    return x


register_torch_impl("argmax", lambda x, axis, keepdims: torch.argmax(x, dim=axis, keepdim=keepdims)
                    if x.ndim else torch.zeros((), dtype=torch.int64, device=x.device))


@register_torch_impl("cumsum")
def _cumsum(x, axis, dtype):
    if x.ndim == 0:
        return x
    if dtype.is_int and x.is_floating_point():
        x = torch.trunc(x.float())  # converted to dtype before summing
    return torch.cumsum(x.to(torch.float32 if dtype.is_float else torch.int64), dim=axis)


# -- creation (device is passed by GraphModule) ------------------------------------------------------
register_torch_impl("arange", lambda start, end, step, dtype, device=None:
                    torch.arange(start, end, step, dtype=_tdt(dtype), device=device))
register_torch_impl("full", lambda shape, value, dtype, device=None:
                    torch.full(tuple(shape), value, dtype=_tdt(dtype), device=device))
register_torch_impl("const", lambda value, dtype, device=None: _const_tensor(value, dtype).to(device))


def _const_tensor(value: np.ndarray, dtype: DType) -> torch.Tensor:
    a = to_dtype(value, dtype)
    if dtype.is_packed:
        a = a.astype(np.int8 if dtype is DType.i4 else np.uint8)
    return numpy_to_torch(np.array(a))


_CREATION = {"arange", "full", "const"}

# -- shape ------------------------------------------------------------------------------------------
register_torch_impl("reshape", lambda x, shape: x.reshape(tuple(shape)))
register_torch_impl("permute", lambda x, perm: x.permute(*perm))
register_torch_impl("concat", lambda *xs, axis: torch.cat(xs, dim=axis))
register_torch_impl("split", lambda x, axis, sizes: tuple(torch.split(x, list(sizes), dim=axis)))
register_torch_impl("expand_dims", lambda x, axis: x.unsqueeze(axis))
register_torch_impl("squeeze", lambda x, axes: x.squeeze(tuple(axes)) if axes else x)
register_torch_impl("broadcast_to", lambda x, shape: x.expand(tuple(shape)))


@register_torch_impl("slice")
def _slice(x, axis, start, end, step):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


@register_torch_impl("take")
def _take(x, indices, axis):
    ax = axis % x.ndim
    n = x.shape[ax]
    if indices.numel() and (int(indices.min()) < -n or int(indices.max()) >= n):
        raise IndexError(f"index out of range for dim of size {n}")
    flat = torch.remainder(indices.reshape(-1), n)  # negative indices count from the end
    out = x.index_select(ax, flat)
    return out.reshape(*x.shape[:ax], *indices.shape, *x.shape[ax + 1:])


@register_torch_impl("gather")
def _gather(x, index, axis):
    ax = axis % x.ndim
    x = x[tuple(slice(None) if i == ax else slice(0, d) for i, d in enumerate(index.shape))]
    return torch.gather(x, ax, index)


register_torch_impl("index", lambda x, *indices: x[tuple(indices)])


# -- fused ------------------------------------------------------------------------------------------
def _act(name: str, y):
    a = ACTIVATIONS[name]
    return y if a is None else _apply(a[0], a[1], y)


def _apply(op: str, attrs: dict, *xs):
    return TORCH_IMPLS[op](*xs, **get_op(op).complete_attrs(attrs))


register_torch_impl("fused.linear_act", lambda x, weight, bias=None, *, act: _act(act, F.linear(x, weight, bias)))


@register_torch_impl("fused.matmul_act")
def _matmul_act(x, weight, bias=None, *, act):
    y = torch.matmul(x, weight)
    return _act(act, y if bias is None else y + bias)


@register_torch_impl("fused.linear_glu")
def _linear_glu(x, weight, bias=None, *, act):
    y = F.linear(x, weight, bias)
    gate, up = y.chunk(2, dim=-1)
    return _act(act, gate) * up


def _add_norm(norm):
    def run(x, residual, *wb, eps, ndim):
        s = x + residual
        return s, TORCH_IMPLS[norm](s, *wb, eps=eps, ndim=ndim)
    return run


register_torch_impl("fused.add_rms_norm", _add_norm("rms_norm"))
register_torch_impl("fused.add_layer_norm", _add_norm("layer_norm"))


@register_torch_impl("fused.elementwise")
def _elementwise(*xs, expr):
    return eval_expr(parse_expr(expr), list(xs), _apply)


# -- KV cache ---------------------------------------------------------------------------------------
register_torch_impl("kv.append", kv_ops.kv_append)
register_torch_impl("kv.attention", kv_ops.kv_attention)
register_torch_impl("kv.paged_append", kv_ops.kv_paged_append)
register_torch_impl("kv.paged_attention", kv_ops.kv_paged_attention)
register_torch_impl("kv.ragged_attention", kv_ops.kv_ragged_attention)


def _rope(x, cos, sin):
    d = x.shape[-1]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sin


def _rope_append_attention(paged: bool):
    """fused.rope_(paged_)append_attention: the ops it stands for (ir/opset/fused.py)."""
    append = kv_ops.kv_paged_append if paged else kv_ops.kv_append
    attention = kv_ops.kv_paged_attention if paged else kv_ops.kv_attention

    def run(q, k, v, k_cache, v_cache, pos, *rest, scale):
        extra, cs = (list(rest[:1]), rest[1:]) if paged else ([], rest)
        if cs:
            q, k = _rope(q, *cs), _rope(k, *cs)
        kc, vc = append(k_cache, k, pos, *extra), append(v_cache, v, pos, *extra)
        return attention(q, kc, vc, pos, *extra, scale), kc, vc
    return run


register_torch_impl("fused.rope_append_attention", _rope_append_attention(False))
register_torch_impl("fused.rope_paged_append_attention", _rope_append_attention(True))


# -- the module -------------------------------------------------------------------------------------
def _attr_name(name: str, taken: set) -> str:
    base = "p_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


class GraphModule(torch.nn.Module):
    """An ``nn.Module`` executing ``graph`` node by node with ``TORCH_IMPLS``.

    Parameters are ``nn.Parameter``s named by a sanitized form of the graph's param name
    (``param_attr[graph name]``); float ones require grad when ``trainable``. A trainable module copies the
    parameter data, so training never changes the graph it came from; a frozen one shares it.
    ``forward`` returns the output tensor (a tuple when the graph has several outputs).

    An op without a torch implementation is refused (NotImplementedError naming it) unless
    ``reference_fallback``: then it runs its numpy reference semantics, with no gradient through it (fine
    for evaluating e.g. quantized graphs, whose codes are not trained anyway).
    """

    def __init__(self, graph: Graph, trainable: bool = True, reference_fallback: bool = False):
        super().__init__()
        missing = sorted({n.op for n in graph.nodes if n.op not in TORCH_IMPLS})
        self._fallback = {op: _reference_impl(op) for op in missing} if reference_fallback else {}
        if missing and not reference_fallback:
            first = next(n for n in graph.nodes if n.op == missing[0])
            raise NotImplementedError(
                f"no torch implementation for op(s) {missing} (first: {first.describe()}); "
                f"add one with llmasos.torch_graph.register_torch_impl")
        self.graph = graph
        self.trainable = trainable
        self.param_attr: dict[str, str] = {}
        taken: set = set()
        for name, v in graph.params.items():
            if name not in graph.param_data:
                raise ValueError(f"parameter %{name} has no data")
            data = graph.param_data[name]
            if isinstance(data, torch.Tensor):
                t = data.detach()
            else:
                a = param_array(data)
                if v.type.dtype.is_packed:
                    a = a.astype(np.int8 if v.type.dtype is DType.i4 else np.uint8)
                t = numpy_to_torch(np.array(a, copy=trainable))
            if trainable:
                t = t.clone()
            grad = trainable and v.type.dtype.is_float
            attr = _attr_name(name, taken)
            self.register_parameter(attr, torch.nn.Parameter(t, requires_grad=grad))
            self.param_attr[name] = attr
        self._masks: dict[str, torch.Tensor] = {}
        self._env_cache: dict = {}
        self._consts: dict = {}
        self._out_dtypes = [[_tdt(o.type.dtype) for o in n.outputs] for n in graph.nodes]
        keep = set(graph.outputs) | set(graph.inputs) | set(graph.params.values())
        self._last_use: dict = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs:
                if v not in keep:
                    self._last_use[v] = i
        self._dead_after = [[] for _ in graph.nodes]
        for v, i in self._last_use.items():
            self._dead_after[i].append(v)

    # -- parameters ----------------------------------------------------------------------------
    def param(self, name: str) -> torch.nn.Parameter:
        """The nn.Parameter holding the graph parameter ``name``."""
        if name not in self.param_attr:
            raise KeyError(f"graph has no parameter %{name}")
        return getattr(self, self.param_attr[name])

    def set_masks(self, masks: dict) -> None:
        """Pruning masks {graph param name: bool tensor of its shape}; False entries stay zero.

        The mask is applied in ``forward`` (so gradients of pruned weights are zero and no optimizer can
        revive them in the output), and ``apply_masks_()`` zeroes the stored weights too (``distill`` calls it
        after every optimizer step, so state_dicts and ``to_graph`` hold exact zeros).
        """
        new = {}
        for name, m in masks.items():
            p = self.param(name)
            m = torch.as_tensor(m)
            if m.dtype != torch.bool:
                raise TypeError(f"mask for %{name} must be bool, got {m.dtype}")
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask for %{name} has shape {list(m.shape)}, parameter is {list(p.shape)}")
            new[name] = m.to(p.device)
        self._masks.update(new)
        self.apply_masks_()

    @property
    def masks(self) -> dict:
        return dict(self._masks)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        for name, m in self._masks.items():
            p = self.param(name)
            p.mul_(m.to(p.device))

    def to_graph(self) -> Graph:
        """A copy of the graph whose float parameters hold this module's current (masked) values."""
        g = self.graph.clone()
        for name, v in self.graph.params.items():
            if not v.type.dtype.is_float:
                continue  # untouched by training; keeps its stored form (packed ints stay ml_dtypes)
            t = self.param(name).detach()
            if name in self._masks:
                t = t * self._masks[name].to(t.device)
            g.param_data[name] = param_array(t.cpu().clone())
        return g

    # -- execution -----------------------------------------------------------------------------
    def _node_info(self, env: dict):
        key = tuple(sorted(env.items()))
        info = self._env_cache.get(key)
        if info is None:
            info = [(evaluate_attrs(n.attrs, env), [o.type.concrete(env) for o in n.outputs])
                    for n in self.graph.nodes]
            if len(self._env_cache) > 64:
                self._env_cache.clear()
            self._env_cache[key] = info
        return info

    def forward(self, *inputs):
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise ValueError(f"graph takes {len(g.inputs)} inputs ({', '.join('%' + v.name for v in g.inputs)}), "
                             f"got {len(inputs)}")
        dev = next((p.device for p in self.parameters()), None)
        xs = []
        for v, x in zip(g.inputs, inputs):
            x = x if isinstance(x, torch.Tensor) else numpy_to_torch(np.asarray(x))
            want = _tdt(v.type.dtype)
            if x.dtype != want:
                raise ValueError(f"input %{v.name}: expected dtype {v.type.dtype}, got {x.dtype}")
            xs.append(x.to(dev) if dev is not None else x)
        dev = dev if dev is not None else (xs[0].device if xs else torch.device("cpu"))
        env = bind_symbols(g, xs)
        info = self._node_info(env)
        vals = dict(zip(g.inputs, xs))
        for name, v in g.params.items():
            p = self.param(name)
            vals[v] = p * self._masks[name] if name in self._masks else p
        for i, node in enumerate(g.nodes):
            attrs, shapes = info[i]
            args = [vals[v] for v in node.inputs]
            fn = TORCH_IMPLS.get(node.op) or self._fallback[node.op]
            try:
                if node.op in _CREATION:
                    res = fn(*args, **attrs, device=dev)
                else:
                    res = fn(*args, **attrs)
            except Exception as e:
                raise RuntimeError(f"{node.describe()}: torch implementation failed: {e}") from e
            res = res if isinstance(res, tuple) else (res,)
            for out, r, dt, shape in zip(node.outputs, res, self._out_dtypes[i], shapes):
                if r.dtype != dt:
                    r = r.to(dt)
                if tuple(r.shape) != shape:
                    raise RuntimeError(f"{node.describe()}: torch result shape {list(r.shape)} differs from its "
                                       f"type {out.type} = {list(shape)}")
                vals[out] = r
            for v in self._dead_after[i]:
                vals.pop(v, None)
        outs = [vals[v] for v in g.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _reference_impl(op: str) -> Callable:
    ref = get_op(op).ref

    def run(*xs, **attrs):
        dev = next((x.device for x in xs), None)
        res = ref(*(param_array(x) for x in xs), **attrs)
        res = res if isinstance(res, tuple) else (res,)
        out = tuple(numpy_to_torch(np.array(r)).to(dev) for r in res)
        return out if len(out) > 1 else out[0]
    return run


def unsupported_ops() -> list[str]:
    """Registered IR ops without a torch implementation (GraphModule refuses graphs that use them)."""
    return sorted(set(all_ops()) - set(TORCH_IMPLS))


__all__ = ["GraphModule", "TORCH_IMPLS", "register_torch_impl", "unsupported_ops"]


# -- quantized GEMMs (llmasos/ir/opset/quant.py): dequantize in torch, then one float GEMM ---------------
def _q_codes(q, bits: int):
    if bits == 4:  # two codes per byte: low nibble = even k, high nibble = odd k
        q = q.to(torch.uint8)
        return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], q.shape[1] * 2).float()
    return q.float()


def _q_expand(p, n: int, k: int, group: int):
    """[N|1, G|1] -> [N, K], column k reading group k // group (G = ceil(K / group): a ragged last group)."""
    p = p.float()
    if p.shape[1] == 1:
        return p.expand(n, k)
    return p[:, torch.arange(k, device=p.device) // group].expand(n, k)


@register_torch_impl("quant.dequant")
def _q_dequant(qweight, scale, zero, *, bits, group):
    q = _q_codes(qweight, bits)
    n, k = q.shape
    return ((q - _q_expand(zero, n, k, group)) * _q_expand(scale, n, k, group)).to(scale.dtype)


@register_torch_impl("quant.linear")
def _q_linear(x, qweight, scale, zero, bias=None, *, bits, group):
    w = _q_dequant(qweight, scale, zero, bits=bits, group=group).to(x.dtype)
    return F.linear(x, w, bias)


@register_torch_impl("quant.embedding")
def _q_embedding(qweight, scale, zero, ids, *, bits, group):
    return F.embedding(ids, _q_dequant(qweight, scale, zero, bits=bits, group=group))


@register_torch_impl("quant.linear_a8")
def _q_linear_a8(x, qweight, wscale, bias=None):
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(xf / torch.where(s > 0, s, torch.ones_like(s))), -127, 127)
    # integer products summed in f64: exact like the reference's int32 accumulation (|acc| < 2^31 < 2^53)
    acc = torch.matmul(xq.double(), qweight.double().t())
    y = acc.float() * s * wscale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# the communication ops (llmasos/backends/dist.py: torch.distributed underneath, the identity for a group of one)
from . import dist as _dist  # noqa: E402
for _op, _fn in _dist.TORCH_FUNCS.items():
    register_torch_impl(_op, _fn)
