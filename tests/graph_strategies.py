"""Hypothesis strategies for random *valid* LLMasOS graphs, and inputs the reference interpreter accepts.

    from hypothesis import given
    from tests.graph_strategies import graphs, graphs_with_inputs, random_inputs

    @given(graphs(max_nodes=8))
    def test_something(g): ...

    @given(graphs_with_inputs())
    def test_runs(case):
        g, inputs = case
        run(g, inputs)

Every node is added with ``Graph.add_node``, so the op registry's type rules decide the result types;
the builders below only pick operands and attrs the rules (and the numpy reference semantics) accept.
Graphs mix static and symbolic dims (declared symbols with every bound style, derived dims such as
``2*seq``, ``batch*seq``, ``(seq+1)//2``, ``-(-seq//2)``), multi-result splits, inline constants of
every dtype (inf, nan and -0.0 included; f8e4m3 finite), parameters
with numpy data, and source locations. Every builtin op has a builder (``OP_BUILDERS``; a test checks).

Integer tensors that index something (embedding ids, take/gather/index indices) are either constants
already in range or graph inputs; ``random_inputs`` reads each such input's uses to keep it in range.

Also here: ``dim_exprs()`` (random symbolic dims), ``symbol_values(g)``, ``builtin_ops()``.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmasos.ir import DType, Graph, TensorType, Value, all_ops, sym
from llmasos.ir.opset.creation import MAX_INLINE_ELEMENTS
from llmasos.ir.opset.fused import ACTIVATIONS
from llmasos.ir.opset.rules import broadcast_shapes
from llmasos.ir.types import as_dim, dims_equal, eval_dim

SYMBOL_NAMES = ("batch", "seq", "n", "s0")
GRAPH_NAMES = ("main", "gpt2", "g_1", "tiny.mlp")
VALUE_HINTS = ("h", "x.1", "attn.out", "_tmp", "logits")
LOCS = ("transformer.h.0.attn", "model.py:12", 'a "quoted" \\ path', "ünïcode ✓", "tab\there\nnewline", "")
PARAM_PREFIXES = ("transformer.h.0", "layers.1.mlp", "lm_head", "norm")

FLOATS = (DType.f32, DType.f16, DType.bf16)
INTS = (DType.i64, DType.i32, DType.i8, DType.u8)
# Constants only: numpy arithmetic on these is patchy, so they reach the rest of the graph via cast.
EXOTIC = (DType.f8e4m3, DType.i4, DType.u4)

FLOAT_UNARY = ("exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sin", "cos", "erf", "sigmoid", "silu")
ARITH = ("add", "sub", "mul", "maximum", "minimum", "div", "pow")
COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")
REDUCE = ("sum", "mean", "max", "min", "prod")
# what fused.elementwise exprs apply to one operand (attrs in braces, as the expr syntax writes them)
EW_UNARY = (*FLOAT_UNARY, "neg", "abs", "relu", "gelu", "gelu{approximate=tanh}", "clip{min=-1.0, max=2.0}",
            "clip{max=0.5}")


def _static_numel(shape) -> Optional[int]:
    return int(np.prod(shape, dtype=np.int64)) if all(isinstance(d, int) for d in shape) else None


class _Builder:
    """Grows one graph; every method that adds nodes returns True when it did."""

    def __init__(self, draw, g: Graph, with_params: bool):
        self.draw = draw
        self.g = g
        self.with_params = with_params
        self.pool: list[Value] = []
        self.lo: dict[str, int] = {}  # symbol -> smallest value it may take (dims are monotone in symbols)
        self.symbols: list = []
        self.extra_outputs: list[Value] = []

    # -- drawing helpers ------------------------------------------------------------------------
    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def low(self, d) -> int:
        """The least value dim ``d`` takes under the declared symbol bounds."""
        return eval_dim(d, self.lo)

    def pick(self, pred: Callable[[Value], bool], exotic: bool = False) -> Optional[Value]:
        cands = [v for v in self.pool if (exotic or v.type.dtype not in EXOTIC) and pred(v)]
        return self.choice(cands) if cands else None

    def dim(self):
        if self.symbols and self.draw(st.integers(0, 2)) == 0:
            return self.choice(self.symbols)
        return self.integer(1, 4)

    def shape(self, min_rank=0, max_rank=3):
        return tuple(self.dim() for _ in range(self.integer(min_rank, max_rank)))

    def unused(self, base: str) -> str:
        names = {v.name for v in self.g.values()}
        k = 0
        while f"{base}{k or ''}" in names:
            k += 1
        return f"{base}{k or ''}"

    # -- adding values --------------------------------------------------------------------------
    def node(self, op: str, inputs, attrs=None, *, names=None):
        loc = self.choice((None, None, *LOCS))
        name = self.choice((None, None, *VALUE_HINTS))
        out = self.g.add_node(op, inputs, attrs or {}, loc=loc, name=name, names=names)
        outs = out if isinstance(out, tuple) else (out,)
        self.pool.extend(outs)
        return out

    def input(self, shape, dtype: DType) -> Value:
        v = self.g.add_input(self.unused("in" if self.g.inputs else "x"), TensorType(shape, dtype))
        self.pool.append(v)
        return v

    def array(self, shape, dtype: DType, lo: Optional[int] = None, hi: Optional[int] = None) -> np.ndarray:
        """Random data; ints in [lo, hi) when given (indices), floats with inf/nan/-0.0 now and then."""
        shape = tuple(int(d) for d in shape)
        if dtype is DType.bool:
            return self.draw(hnp.arrays(np.bool_, shape))
        if dtype.is_int:
            info = ml_dtypes.iinfo(dtype.numpy) if dtype.is_packed else np.iinfo(dtype.numpy)
            lo = info.min if lo is None else lo
            hi = info.max + 1 if hi is None else hi
            vals = self.draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi - 1)))
            return vals.astype(dtype.numpy)
        width = 16 if dtype is DType.f16 else 32
        src = np.float16 if width == 16 else np.float32
        elements = st.floats(width=width)
        # f8e4m3 has no inf (it would turn into nan): stay within its finite range
        if dtype is DType.f8e4m3:
            elements = st.floats(-448, 448, width=32)
        vals = self.draw(hnp.arrays(src, shape, elements=elements))
        return vals.astype(dtype.numpy)

    def const(self, shape, dtype: DType, lo=None, hi=None) -> Value:
        return self.node("const", [], {"value": self.array(shape, dtype, lo, hi), "dtype": dtype})

    def param(self, shape, dtype: DType) -> Optional[Value]:
        """A parameter with random data, or an inline constant when params are off (None if too big)."""
        if not self.with_params:
            n = _static_numel(shape)
            return self.const(shape, dtype) if n is not None and n <= MAX_INLINE_ELEMENTS else None
        name = f"{self.choice(PARAM_PREFIXES)}.{self.choice(('weight', 'bias', 'scale'))}"
        data = (np.random.default_rng(self.integer(0, 2**16)).standard_normal(shape) * 0.5).astype(dtype.numpy)
        v = self.g.add_param(self.unused(name), data)
        self.pool.append(v)
        return v

    def partner(self, x: Value, dtype: Optional[DType] = None) -> Value:
        """A value of ``x``'s dtype whose shape broadcasts with ``x``'s (existing or a new constant)."""
        dtype = dtype or x.type.dtype

        def fits(v):
            if v.type.dtype is not dtype:
                return False
            try:
                broadcast_shapes(x.type.shape, v.type.shape)
            except ValueError:
                return False
            return True

        how = self.integer(0, 2)
        if how == 0:
            v = self.pick(fits)
            if v is not None:
                return v
        tail = x.type.shape[len(x.type.shape) - self.integer(0, x.type.rank):] if how == 1 else ()
        n = _static_numel(tail)
        if n is None or n > MAX_INLINE_ELEMENTS:
            tail = ()
        return self.const(tail, dtype)

    # -- builders, one or more per op -------------------------------------------------------------
    def b_float_unary(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float)
        if x is None:
            return False
        if op == "gelu":
            self.node(op, [x], {"approximate": self.choice(("none", "tanh"))})
        elif op in ("softmax", "log_softmax"):
            if x.type.rank == 0:  # numpy has no axis 0 on a 0-d array
                return False
            self.node(op, [x], {"axis": self.integer(-x.type.rank, x.type.rank - 1)})
        else:
            self.node(op, [x])
        return True

    def b_unary(self, op: str):
        x = self.pick(lambda v: (v.type.dtype is DType.bool) == (op == "logical_not"))
        if x is None:
            return False
        self.node(op, [x])
        return True

    def b_cast(self, op: str):
        x = self.pick(lambda v: True, exotic=True)
        if x is None:
            return False
        self.node("cast", [x], {"dtype": self.choice((*FLOATS, *INTS, DType.bool, DType.f8e4m3))})
        return True

    def b_binary(self, op: str):
        float_only = op in ("div", "pow")
        x = self.pick(lambda v: v.type.dtype.is_float if float_only else v.type.dtype is not DType.bool)
        if x is None:
            return False
        y = self.partner(x)
        self.node(op, [x, y] if self.flag() else [y, x])
        return True

    def b_logical(self, op: str):
        x = self.pick(lambda v: v.type.dtype is DType.bool)
        if x is None:
            return False
        self.node(op, [x, self.partner(x)])
        return True

    def b_where(self, op: str):
        x = self.pick(lambda v: v.type.dtype is not DType.bool)
        if x is None:
            return False
        y = self.partner(x)
        cond = self.node(self.choice(COMPARE), [x, self.const((), x.type.dtype)])
        self.node("where", [cond, x, y] if self.flag() else [cond, y, x])
        return True

    def b_clip(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float)
        if x is None:
            return False
        lo = self.choice((None, -1.0, 0.0, -0.5))
        hi = self.choice((None, 1.0, 0.5, 2.0))
        self.node("clip", [x], {"min": lo, "max": hi})
        return True

    def b_matmul(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float and v.type.rank >= 2)
        if x is None:
            return False
        k = x.type.shape[-1]
        if isinstance(k, int):
            lead = (1,) if self.flag() else ()
            w = self.param((*lead, k, self.integer(1, 4)), x.type.dtype)
            if w is None:
                return False
            self.node("matmul", [x, w])
        else:  # x @ x^T keeps the contraction dim symbolic
            perm = list(range(x.type.rank))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            self.node("matmul", [x, self.node("permute", [x], {"perm": perm})])
        return True

    def b_linear(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float and v.type.rank >= 1 and isinstance(v.type.shape[-1], int))
        if x is None:
            return False
        n = self.integer(1, 5)
        w = self.param((n, x.type.shape[-1]), x.type.dtype)
        if w is None:
            return False
        bias = self.param((n,), x.type.dtype) if self.flag() else None
        self.node("linear", [x, w] + ([bias] if bias is not None else []))
        return True

    def b_norm(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float and v.type.rank >= 1)
        if x is None:
            return False
        return self._norm_node(op, [x], 2 if op == "layer_norm" else 1)

    def _norm_node(self, op: str, ops: list, max_params: int) -> bool:
        """A norm over the last ndim (drawn) dims of ops[0]: with, when static, up to max_params weight/bias
        params of that shape after ``ops``."""
        x = ops[0]
        ndim = self.integer(1, x.type.rank)
        tail = x.type.shape[x.type.rank - ndim:]
        if _static_numel(tail) is not None and self.flag():
            for _ in range(self.integer(1, max_params)):
                p = self.param(tail, x.type.dtype)
                if p is None:
                    break
                ops.append(p)
        self.node(op, ops, {"eps": self.choice((1e-5, 1e-6, 0.1)), "ndim": ndim})
        return True

    def b_embedding(self, op: str):
        vocab, width = self.integer(2, 10), self.integer(1, 6)
        table = self.param((vocab, width), self.choice(FLOATS))
        if table is None:
            return False
        shape = self.shape(0, 2)
        dtype = self.choice((DType.i64, DType.i32))
        n = _static_numel(shape)
        if n is not None and n <= MAX_INLINE_ELEMENTS and self.flag():
            ids = self.const(shape, dtype, 0, vocab)
        else:
            ids = self.input(shape, dtype)
        self.node("embedding", [table, ids])
        return True

    def b_sdpa(self, op: str):
        q = self.pick(lambda v: v.type.dtype.is_float and v.type.rank in (3, 4))
        if q is None:
            return False
        heads, length = q.type.shape[-3], q.type.shape[-2]
        kv = q
        if isinstance(heads, int) and heads % 2 == 0 and self.flag():  # grouped-query attention
            kv = self.node("slice", [q], {"axis": -3, "start": 0, "end": heads // 2})
        ops = [q, kv, kv]
        if self.flag():
            mask_dtype = self.choice((DType.bool, q.type.dtype))
            if isinstance(length, int) and length * length <= MAX_INLINE_ELEMENTS:
                ops.append(self.const((length, length), mask_dtype))
            else:
                value = True if mask_dtype is DType.bool else 0.0
                ops.append(self.node("full", [], {"shape": [length, length], "value": value, "dtype": mask_dtype}))
        self.node("sdpa", ops, {"is_causal": self.flag(), "scale": self.choice((None, 0.125, 1.0))})
        return True

    def b_reduce(self, op: str):
        numeric = op in ("sum", "prod", "argmax")  # torch gives int64 for bool sums; the IR rejects bool

        def ok(v):
            dt = v.type.dtype
            return ((dt.is_float if op == "mean" else dt is not DType.bool or not numeric)
                    and (v.type.rank >= 1 or op in REDUCE))

        x = self.pick(ok)
        if x is None:
            return False
        r = x.type.rank
        if op in REDUCE:
            axes = self.draw(st.lists(st.integers(0, r - 1), unique=True, max_size=r)) if r else []
            axes = [a - r if self.flag() else a for a in axes]  # negative spellings too
            self.node(op, [x], {"axes": axes, "keepdims": self.flag()})
        elif op == "argmax":
            self.node(op, [x], {"axis": self.integer(-r, r - 1), "keepdims": self.flag()})
        else:
            self.node(op, [x], {"axis": self.integer(-r, r - 1), "dtype": self.choice((DType.f32, DType.i64))})
        return True

    def b_reshape(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        s = list(x.type.shape)
        how = self.integer(0, 3)
        if how == 0 and len(s) >= 2:  # merge two neighbours: [batch, seq] -> [batch*seq]
            i = self.integer(0, len(s) - 2)
            s[i:i + 2] = [as_dim(s[i] * s[i + 1])]
        elif how == 1:  # split a static dim into two factors
            cands = [i for i, d in enumerate(s) if isinstance(d, int) and d >= 4 and d % 2 == 0]
            if not cands:
                return False
            i = self.choice(cands)
            s[i:i + 1] = [2, s[i] // 2]
        elif how == 2:
            n = 1
            for d in s:
                n = n * d
            s = [as_dim(n)]
        else:
            s.insert(self.integer(0, len(s)), 1)
        self.node("reshape", [x], {"shape": s})
        return True

    def b_permute(self, op: str):
        x = self.pick(lambda v: True)
        if x is None:
            return False
        self.node("permute", [x], {"perm": self.draw(st.permutations(range(x.type.rank)))})
        return True

    def b_slice(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        axis = self.integer(0, x.type.rank - 1)
        d = x.type.shape[axis]
        low = self.low(d)
        start = self.integer(0, low - 1)
        if isinstance(d, int) or self.flag():
            end = self.integer(start + 1, low)  # a static end below every value d may take
        else:
            end = as_dim(d - self.integer(0, low - start - 1))
        attrs = {"axis": axis - x.type.rank if self.flag() else axis, "start": start, "end": end,
                 "step": self.integer(1, 3)}
        self.node("slice", [x], attrs)
        return True

    def b_concat(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        r = x.type.rank
        axis = self.integer(0, r - 1)

        def fits(v):
            return (v.type.dtype is x.type.dtype and v.type.rank == r
                    and all(i == axis or dims_equal(a, b) for i, (a, b) in enumerate(zip(v.type.shape, x.type.shape))))

        parts = [x] + [self.pick(fits) or x for _ in range(self.integer(1, 2))]
        self.node("concat", parts, {"axis": axis - r if self.flag() else axis})
        return True

    def b_split(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        axis = self.integer(0, x.type.rank - 1)
        d = x.type.shape[axis]
        if isinstance(d, int):
            if d < 2:
                return False
            first = self.integer(1, d - 1)
            sizes = [first, d - first]
        else:
            c, rest = d.as_coeff_Mul()
            if c.is_Integer and int(c) >= 2:  # 2*seq -> [seq, seq]
                sizes = [as_dim(rest)] * int(c)
            elif self.low(d) >= 2:
                sizes = [1, as_dim(d - 1)]
            else:
                return False
        names = [self.choice(VALUE_HINTS) for _ in sizes] if self.flag() else None
        self.node("split", [x], {"axis": axis, "sizes": sizes}, names=names)
        return True

    def b_expand_squeeze(self, op: str):
        x = self.pick(lambda v: op != "squeeze" or any(d == 1 for d in v.type.shape))
        if x is None:
            return False
        ones = [i for i, d in enumerate(x.type.shape) if d == 1]
        if op == "squeeze":
            if not ones:
                return False
            self.node("squeeze", [x], {"axes": self.draw(st.lists(st.sampled_from(ones), unique=True))})
        else:
            self.node("expand_dims", [x], {"axis": self.integer(-x.type.rank - 1, x.type.rank)})
        return True

    def b_broadcast_to(self, op: str):
        x = self.pick(lambda v: True)
        if x is None:
            return False
        shape = [self.dim() if d == 1 and self.flag() else d for d in x.type.shape]
        shape = [self.dim() for _ in range(self.integer(0, 1))] + shape
        self.node("broadcast_to", [x], {"shape": shape})
        return True

    def b_take(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        axis = self.integer(0, x.type.rank - 1)
        low = self.low(x.type.shape[axis])
        if self.flag():
            idx = self.const(tuple(self.integer(1, 3) for _ in range(self.integer(0, 2))), DType.i64, -low, low)
        else:
            idx = self.input(self.shape(0, 2), self.choice((DType.i64, DType.i32)))
        self.node("take", [x, idx], {"axis": axis})
        return True

    def b_gather(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        axis = self.integer(0, x.type.rank - 1)
        shape = list(x.type.shape)
        shape[axis] = self.integer(1, 3)
        n = _static_numel(shape)
        if n is not None and n <= MAX_INLINE_ELEMENTS:
            idx = self.const(shape, DType.i64, 0, self.low(x.type.shape[axis]))
        else:
            idx = self.input(shape, DType.i64)
        self.node("gather", [x, idx], {"axis": axis - x.type.rank if self.flag() else axis})
        return True

    def b_index(self, op: str):
        x = self.pick(lambda v: v.type.rank >= 1)
        if x is None:
            return False
        m = self.integer(1, min(2, x.type.rank))
        k = self.integer(1, 3)
        idx = []
        for i in range(m):
            low = self.low(x.type.shape[i])
            shape = (k,) if i == 0 or self.flag() else ()
            idx.append(self.const(shape, DType.i64, -low, low) if self.flag() else self.input(shape, DType.i64))
        self.node("index", [x, *idx])
        return True

    def b_const(self, op: str):
        shape = tuple(self.integer(0, 4) for _ in range(self.integer(0, 3)))
        if _static_numel(shape) > MAX_INLINE_ELEMENTS:
            shape = (MAX_INLINE_ELEMENTS,)
        v = self.const(shape, self.choice((*FLOATS, *INTS, DType.bool, *EXOTIC)))
        if _static_numel(shape) == 0:  # numpy reductions reject empty arrays: an output, not an operand
            self.pool.remove(v)
            self.extra_outputs.append(v)
        return True

    def b_arange(self, op: str):
        start = self.integer(0, 1)
        ends = [d for d in self.symbols if self.lo[d.name] > start]
        end = self.choice(ends) if ends and self.flag() else self.integer(start + 1, start + 6)
        self.node("arange", [], {"start": start, "end": end, "step": self.integer(1, 3),
                                 "dtype": self.choice((DType.i64, DType.i32, DType.f32))})
        return True

    def b_full(self, op: str):
        dtype = self.choice((*FLOATS, *INTS, DType.bool))
        if dtype is DType.bool:
            value = self.flag()
        elif dtype.is_int:
            value = self.choice((0, 1, -1, True)) if dtype is not DType.u8 else self.choice((0, 7))
        else:
            value = self.choice((0.0, -1.5, 1, float("-inf"), float("nan"), True))
        self.node("full", [], {"shape": list(self.shape(0, 3)), "value": value, "dtype": dtype})
        return True

    # -- fused ops ------------------------------------------------------------------------------
    def b_fused_gemm(self, op: str):
        linear = op in ("fused.linear_act", "fused.linear_glu")
        x = self.pick(lambda v: v.type.dtype.is_float and v.type.rank >= (1 if linear else 2)
                      and isinstance(v.type.shape[-1], int))
        if x is None:
            return False
        k, n = x.type.shape[-1], self.integer(1, 5) * (2 if op == "fused.linear_glu" else 1)
        w = self.param((n, k) if linear else (k, n), x.type.dtype)
        if w is None:
            return False
        bias = self.param((n,), x.type.dtype) if self.flag() else None
        self.node(op, [x, w] + ([bias] if bias is not None else []), {"act": self.choice(ACTIVATIONS)})
        return True

    # -- quantized GEMMs ------------------------------------------------------------------------
    def b_quant(self, op: str):
        x = self.pick(lambda v: v.type.dtype in (DType.f32, DType.f16, DType.bf16) and v.type.rank >= 1
                      and isinstance(v.type.shape[-1], int) and v.type.shape[-1] % 2 == 0)
        if x is None and op not in ("quant.dequant", "quant.embedding"):
            return False
        k = x.type.shape[-1] if x is not None and op != "quant.embedding" else 2 * self.integer(1, 4)
        n = self.integer(1, 5)
        if op == "quant.linear_a8":
            q, ws = self.param((n, k), DType.i8), self.param((n,), DType.f32)
            bias = self.param((n,), x.type.dtype) if self.flag() else None
            if q is None or ws is None:
                return False
            self.node(op, [x, q, ws] + ([bias] if bias is not None else []))
            return True
        bits = self.choice((4, 8))
        group = self.choice((0, 2)) if k % 2 == 0 else 0
        codes = self.param((n, k // 2 if bits == 4 else k), DType.u8 if bits == 4 else self.choice((DType.i8, DType.u8)))
        g = 1 if group == 0 else k // group
        scale, zero = self.param((n, g), DType.f32), self.param((n, g), DType.f32)
        if codes is None or scale is None or zero is None:
            return False
        attrs = {"bits": bits, "group": group}
        if op == "quant.dequant":
            self.node(op, [codes, scale, zero], attrs)
            return True
        if op == "quant.embedding":   # rows of the table picked by ids in range
            ids = self.const((self.integer(1, 3),), self.choice((DType.i32, DType.i64)), 0, n)
            self.node(op, [codes, scale, zero, ids], attrs)
            return True
        bias = self.param((n,), x.type.dtype) if self.flag() else None
        self.node(op, [x, codes, scale, zero] + ([bias] if bias is not None else []), attrs)
        return True

    # -- KV cache -------------------------------------------------------------------------------
    def b_kv(self, op: str):
        """Fresh caches, kept out of the pool: the TVM backend appends into a cache input in place, so a
        cache input read by anything else would see the append. pos is a constant, in range."""
        dt = self.choice(FLOATS)
        b, hkv, t, d = self.integer(1, 3), self.integer(1, 2), self.integer(1, 3), self.integer(1, 4)
        m = t + self.integer(0, 3)
        pos = self.const((b,), self.choice((DType.i32, DType.i64)), 0, m - t + 1)

        def cache(kind: str) -> Value:
            return self.g.add_input(self.unused(kind), TensorType((b, hkv, m, d), dt))

        if op == "kv.append":
            self.node(op, [cache("k_cache"), self.input((b, hkv, t, d), dt), pos])
        else:
            q = self.input((b, hkv * self.choice((1, 2)), t, d), dt)
            self.node(op, [q, cache("k_cache"), cache("v_cache"), pos], {"scale": self.choice((0.5, 1.0))})
        return True

    def b_paged(self, op: str):
        """Fresh pools (kept out of the pool of values, as in b_kv); a constant block table giving each row
        its own blocks (entries past the row's new tokens -1 now and then), pos a constant in range.
        kv.ragged_attention: rows of one token each (t = 1), its q the rows as one row of tokens [1, H, B, D],
        a later token now and then reading its predecessor's table row (one sequence)."""
        dt = self.choice(FLOATS)
        b, hkv, t, d = self.integer(1, 3), self.integer(1, 2), self.integer(1, 3), self.integer(1, 4)
        if op == "kv.ragged_attention":
            t = 1
        bs, mb = self.integer(1, 4), self.integer(1, 3)
        if mb * bs < t:
            mb = -(-t // bs)
        nb = b * mb + self.integer(0, 2)
        pos = self.array((b,), DType.i32, 0, mb * bs - t + 1)
        table = np.random.default_rng(self.integer(0, 2**16)).permutation(nb)[:b * mb].reshape(b, mb).astype(np.int32)
        if self.flag():
            for r in range(b):
                table[r, (int(pos[r]) + t - 1) // bs + 1:] = -1
        if op == "kv.ragged_attention" and b > 1 and self.flag():
            table[1] = table[0]
        table_v = self.node("const", [], {"value": table, "dtype": DType.i32})
        pos_v = self.node("const", [], {"value": pos, "dtype": DType.i32})

        def pool(kind: str) -> Value:
            return self.g.add_input(self.unused(kind), TensorType((nb, hkv, bs, d), dt))

        if op == "kv.paged_append":
            self.node(op, [pool("k_pool"), self.input((b, hkv, t, d), dt), pos_v, table_v])
        elif op == "kv.ragged_attention":
            q = self.input((1, hkv * self.choice((1, 2)), b, d), dt)
            self.node(op, [q, pool("k_pool"), pool("v_pool"), pos_v, table_v], {"scale": self.choice((0.5, 1.0))})
        else:
            q = self.input((b, hkv * self.choice((1, 2)), t, d), dt)
            self.node(op, [q, pool("k_pool"), pool("v_pool"), pos_v, table_v], {"scale": self.choice((0.5, 1.0))})
        return True

    def b_fused_attention(self, op: str):
        """fused.rope_(paged_)append_attention over fresh caches or pools (as b_kv / b_paged), one query per
        row, cos and sin (fresh inputs) half of the time."""
        dt = self.choice(FLOATS)
        b, hkv, d = self.integer(1, 3), self.integer(1, 2), 2 * self.integer(1, 2)
        rep = self.choice((1, 2))
        new = [self.input((b, hkv * rep, 1, d), dt), self.input((b, hkv, 1, d), dt), self.input((b, hkv, 1, d), dt)]
        rope = [self.input((b, 1, 1, d), dt), self.input((b, 1, 1, d), dt)] if self.flag() else []
        if op == "fused.rope_append_attention":
            m = 1 + self.integer(0, 3)
            caches = [self.g.add_input(self.unused(kind), TensorType((b, hkv, m, d), dt)) for kind in ("k_cache", "v_cache")]
            extra = [self.const((b,), self.choice((DType.i32, DType.i64)), 0, m)]
        else:
            bs, mb = self.integer(1, 4), self.integer(1, 3)
            nb = b * mb + self.integer(0, 2)
            table = np.random.default_rng(self.integer(0, 2**16)).permutation(nb)[:b * mb].reshape(b, mb).astype(np.int32)
            caches = [self.g.add_input(self.unused(kind), TensorType((nb, hkv, bs, d), dt)) for kind in ("k_pool", "v_pool")]
            extra = [self.node("const", [], {"value": self.array((b,), DType.i32, 0, mb * bs), "dtype": DType.i32}),
                     self.node("const", [], {"value": table, "dtype": DType.i32})]
        self.node(op, [*new, *caches, *extra, *rope], {"scale": self.choice((0.5, 1.0))})
        return True

    # -- communication -------------------------------------------------------------------------
    def b_dist(self, op: str):
        """A collective over a group of one (an unpartitioned graph's identity: the verifier checks groups
        only against a declared mesh). Multi-rank semantics: tests/parallel."""
        x = self.pick(lambda v: v.type.dtype in (*FLOATS, DType.i64, DType.i32) and v.type.rank >= 1)
        if x is None:
            return False
        attrs = {"axis": self.choice(("tp", "dp")), "parts": 1}
        if op in ("dist.all_gather", "dist.reduce_scatter", "dist.shard"):
            attrs["dim"] = self.integer(-x.type.rank, x.type.rank - 1)
        if op in ("dist.all_reduce", "dist.reduce_scatter") and self.flag():
            attrs["op"] = self.choice(("sum", "max", "min"))
        self.node(op, [x], attrs)
        return True

    def b_add_norm(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float and v.type.rank >= 1)
        if x is None:
            return False

        def into_x(v):  # the residual may broadcast into x but never make the sum larger than x
            if v.type.dtype is not x.type.dtype or v.type.rank > x.type.rank:
                return False
            return all(d == 1 or dims_equal(d, e) for d, e in zip(v.type.shape[::-1], x.type.shape[::-1]))

        residual = self.pick(into_x) if self.flag() else None
        if residual is None:
            tail = tuple(d if self.flag() else 1 for d in x.type.shape[x.type.rank - self.integer(0, x.type.rank):])
            n = _static_numel(tail)
            residual = self.const(tail if n is not None and n <= MAX_INLINE_ELEMENTS else (), x.type.dtype)
        return self._norm_node(op, [x, residual], 2 if op == "fused.add_layer_norm" else 1)

    def b_fused_elementwise(self, op: str):
        x = self.pick(lambda v: v.type.dtype.is_float)
        if x is None:
            return False
        operands = [x]
        for _ in range(self.integer(0, 2)):
            p = self.partner(x)
            try:
                broadcast_shapes(*(v.type.shape for v in operands), p.type.shape)
            except ValueError:  # each partner broadcasts with x, not always with the other partners
                p = self.const((), x.type.dtype)
            operands.append(p)
        dt = str(x.type.dtype)
        other = "f32" if dt != "f32" else self.choice(("f16", "bf16"))

        def tree(depth: int) -> str:
            kind = self.integer(0, 5) if depth > 0 else 0
            if kind == 0:
                return f"%{self.integer(0, len(operands) - 1)}"
            if kind == 1:
                return f"{self.choice(EW_UNARY)}({tree(depth - 1)})"
            if kind in (2, 3):
                return f"{self.choice(ARITH)}({tree(depth - 1)}, {tree(depth - 1)})"
            if kind == 4:
                a, b = tree(depth - 1), tree(depth - 1)
                return f"where({self.choice(COMPARE)}({a}, {b}), {a}, {tree(depth - 1)})"
            return f"cast{{dtype={dt}}}(cast{{dtype={other}}}({tree(depth - 1)}))"

        expr = tree(self.integer(1, 3))
        for i in range(len(operands)):  # the op refuses operands its expr leaves unused
            if re.search(rf"%{i}\b", expr) is None:
                expr = f"{self.choice(('add', 'mul', 'maximum'))}({expr}, %{i})"
        if self.flag():
            expr = f"cast{{dtype={self.choice((*FLOATS, DType.i32, DType.bool))}}}({expr})"
        self.node(op, operands, {"expr": expr})
        return True


# Each builtin op and the builder that makes it (a test checks none is missing).
OP_BUILDERS = {
    **{op: "b_float_unary" for op in (*FLOAT_UNARY, "gelu", "softmax", "log_softmax")},
    **{op: "b_unary" for op in ("neg", "abs", "relu", "logical_not")},
    **{op: "b_binary" for op in (*ARITH, *COMPARE)},
    **{op: "b_reduce" for op in (*REDUCE, "argmax", "cumsum")},
    "logical_and": "b_logical", "logical_or": "b_logical", "where": "b_where", "clip": "b_clip",
    "cast": "b_cast", "matmul": "b_matmul", "linear": "b_linear", "layer_norm": "b_norm",
    "rms_norm": "b_norm", "embedding": "b_embedding", "sdpa": "b_sdpa", "reshape": "b_reshape",
    "permute": "b_permute", "slice": "b_slice", "concat": "b_concat", "split": "b_split",
    "expand_dims": "b_expand_squeeze", "squeeze": "b_expand_squeeze", "broadcast_to": "b_broadcast_to",
    "take": "b_take", "gather": "b_gather", "index": "b_index", "const": "b_const", "arange": "b_arange",
    "full": "b_full",
    "fused.linear_act": "b_fused_gemm", "fused.matmul_act": "b_fused_gemm", "fused.linear_glu": "b_fused_gemm", "fused.add_rms_norm": "b_add_norm",
    "fused.add_layer_norm": "b_add_norm", "fused.elementwise": "b_fused_elementwise",
    "quant.linear": "b_quant", "quant.dequant": "b_quant", "quant.linear_a8": "b_quant", "quant.embedding": "b_quant",
    "kv.append": "b_kv", "kv.attention": "b_kv", "kv.paged_append": "b_paged", "kv.paged_attention": "b_paged",
    "kv.ragged_attention": "b_paged",
    "fused.rope_append_attention": "b_fused_attention", "fused.rope_paged_append_attention": "b_fused_attention",
    **{op: "b_dist" for op in ("dist.all_reduce", "dist.all_gather", "dist.reduce_scatter", "dist.shard")},
}
OPS = tuple(sorted(OP_BUILDERS))


def _declare_symbols(b: _Builder, max_symbols: int) -> None:
    names = b.draw(st.lists(st.sampled_from(SYMBOL_NAMES), unique=True, max_size=max_symbols))
    for name in names:
        lo = b.integer(1, 3)
        style = b.choice(("both", "lo", "hi", "none"))
        hi = lo + b.integer(0, 60)
        b.g.add_symbol(name, lo if style in ("both", "lo") else None, hi if style in ("both", "hi") else None)
        b.lo[name] = lo if style in ("both", "lo") else 1
        b.symbols.append(sym(name))


def _first_inputs(b: _Builder) -> None:
    # every symbol appears bare in the first input, so the interpreter can bind it from input shapes
    shape = list(b.symbols) + [b.integer(1, 4) for _ in range(b.integer(0 if b.symbols else 1, 2))]
    shape = b.draw(st.permutations(shape))
    b.input(tuple(shape), b.choice((DType.f32, DType.f32, DType.f16, DType.bf16)))
    for _ in range(b.integer(0, 2)):
        kind = b.integer(0, 3)
        if kind == 0 and b.symbols:  # a derived dim in an input type
            s = b.choice(b.symbols)
            d = as_dim(2 * s) if b.flag() else as_dim(s + 1)
            b.input((d, b.integer(1, 3)), DType.f32)
        else:
            b.input(b.shape(0, 3), b.choice((*FLOATS, DType.i64, DType.i32, DType.bool)))


@st.composite
def graphs(draw, max_nodes: int = 10, min_nodes: int = 1, with_params: bool = True, symbolic: bool = True,
           max_symbols: int = 2, ops: Optional[Iterable[str]] = None):
    """A random valid graph of about ``min_nodes``..``max_nodes`` nodes.

    ``with_params=False`` makes weights inline constants; ``symbolic=False`` keeps every dim static;
    ``ops`` limits the ops drawn (builders still add helper const/permute/slice/full/compare nodes).
    """
    chosen = OPS if ops is None else tuple(sorted(ops))
    unknown = set(chosen) - set(OP_BUILDERS)
    if unknown:
        raise ValueError(f"no builder for ops {sorted(unknown)}")
    g = Graph(draw(st.sampled_from(GRAPH_NAMES)))
    b = _Builder(draw, g, with_params)
    if symbolic:
        _declare_symbols(b, max_symbols)
    _first_inputs(b)
    target = draw(st.integers(min_nodes, max_nodes))
    attempts = 0
    while len(g.nodes) < target and attempts < 4 * target:
        attempts += 1
        op = draw(st.sampled_from(chosen))
        getattr(b, OP_BUILDERS[op])(op)
    candidates = [v for v in b.pool if v is not g.nodes[-1].outputs[0]] if g.nodes else list(b.pool)
    outs = ([g.nodes[-1].outputs[0]] if g.nodes else []) + draw(
        st.lists(st.sampled_from(candidates), unique_by=id, max_size=3) if candidates else st.just([]))
    g.set_outputs((outs or [b.pool[0]]) + b.extra_outputs)
    return g


# -- inputs for the reference interpreter -------------------------------------------------------------

def symbol_values(g: Graph, seed: int = 0) -> dict[str, int]:
    """Values for the symbols used in ``g``'s inputs, within the declared bounds (kept small)."""
    rng = np.random.default_rng(seed)
    names = sorted({s for v in g.inputs for s in v.type.symbols()})
    env = {}
    for name in names:
        lo, hi = g.symbols.get(name, (None, None))
        lo = 1 if lo is None else lo
        hi = lo + 3 if hi is None else min(hi, lo + 3)
        env[name] = int(rng.integers(lo, hi + 1))
    return env


def _index_bounds(g: Graph, env: dict) -> dict[str, int]:
    """For each integer graph input used as indices: the size of the smallest dim it indexes."""
    inputs = {id(v): v.name for v in g.inputs}
    bounds: dict[str, int] = {}

    def limit(v: Value, d) -> None:
        if id(v) in inputs:
            n = eval_dim(d, env)
            bounds[inputs[id(v)]] = min(bounds.get(inputs[id(v)], n), n)

    for node in g.nodes:
        ins = node.inputs
        if node.op == "embedding":
            limit(ins[1], ins[0].type.shape[0])
        elif node.op in ("take", "gather"):
            x = ins[0]
            limit(ins[1], x.type.shape[node.attrs["axis"] % x.type.rank])
        elif node.op == "index":
            for i, t in enumerate(ins[1:]):
                limit(t, ins[0].type.shape[i])
    return bounds


def random_inputs(g: Graph, seed: int = 0, symbols: Optional[dict] = None) -> list[np.ndarray]:
    """Arrays for ``g.inputs`` (symbols bound within their bounds, indices in range), for ``run``."""
    env = dict(symbol_values(g, seed))
    env.update(symbols or {})
    bounds = _index_bounds(g, env)
    rng = np.random.default_rng(seed + 1)
    out = []
    for v in g.inputs:
        shape = v.type.concrete(env)
        dt = v.type.dtype
        if v.name in bounds:
            a = rng.integers(0, bounds[v.name], size=shape)
        elif dt is DType.bool:
            a = rng.random(shape) < 0.5
        elif dt.is_int:
            a = rng.integers(0 if dt in (DType.u8, DType.u4) else -3, 4, size=shape)
        else:
            a = rng.standard_normal(shape)
        out.append(np.asarray(a).astype(dt.numpy))
    return out


@st.composite
def graphs_with_inputs(draw, **graph_kwargs):
    """(graph, inputs) pairs: a ``graphs(**graph_kwargs)`` graph and ``random_inputs`` for it."""
    g = draw(graphs(**graph_kwargs))
    return g, random_inputs(g, seed=draw(st.integers(0, 2**16)))


# -- dims on their own ----------------------------------------------------------------------------------

def dim_exprs(symbols=("batch", "seq"), max_leaves: int = 6):
    """Random dim expressions (ints, symbols, + - * // % min max, ceilings), normalised by ``as_dim``."""
    import sympy

    syms = [sym(s) for s in symbols]
    leaves = st.integers(0, 9) | st.sampled_from(syms)

    def extend(inner):
        pair = st.tuples(inner, inner)
        divisor = st.integers(1, 4) | st.sampled_from(syms)
        return st.one_of(
            pair.map(lambda p: p[0] + p[1]),
            pair.map(lambda p: p[0] - p[1]),
            pair.map(lambda p: p[0] * p[1]),
            st.tuples(inner, divisor).map(lambda p: sympy.floor(sympy.sympify(p[0]) / p[1])),
            st.tuples(inner, divisor).map(lambda p: sympy.ceiling(sympy.sympify(p[0]) / p[1])),
            st.tuples(inner, divisor).map(lambda p: sympy.Mod(p[0], p[1])),
            pair.map(lambda p: sympy.Min(*p)),
            pair.map(lambda p: sympy.Max(*p)),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves).map(as_dim)


def builtin_ops() -> set[str]:
    """The ops the built-in op set registers (plugins registered by other tests excluded)."""
    # send/recv need a peer rank to mean anything: tests/parallel covers them
    return {name for name, op in all_ops().items() if op.infer.__module__.startswith("llmasos.ir.opset")
            and name not in ("dist.send", "dist.recv")}
