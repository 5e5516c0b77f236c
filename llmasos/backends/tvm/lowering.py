"""The lowering table: LLMasOS op name -> function that builds the Relax expression for one node.

A lowering function is ``fn(ctx, node, args) -> relax.Expr | sequence of relax.Expr`` (one per result):
``args`` are the Relax values of ``node.inputs``; ``ctx`` (LowerContext) turns symbolic dims into TIR
expressions and emits intermediate bindings. Plugins add ops with ``register_lowering``.

Numerics follow the reference interpreter: f16/bf16 reductions, norms, softmax, attention and matmul
accumulate in f32 (as the numpy reference does), then cast back.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import sympy
from tvm import relax, te, topi
from tvm import tirx as tir

from ...ir.graph import Node, Value
from ...ir.ops import all_ops
from ...ir.types import DType, TensorType, dims_equal

R = relax.op


class LoweringError(ValueError):
    """An op that cannot be lowered to Relax (unknown op, unsupported dtype or dim expression)."""


LoweringFn = Callable[["LowerContext", Node, list], object]
LOWERINGS: dict[str, LoweringFn] = {}


def register_lowering(op_name: str, fn: Optional[LoweringFn] = None, replace: bool = False):
    """Register ``fn`` as the lowering of ``op_name``; without ``fn`` this is a decorator."""
    def add(f: LoweringFn) -> LoweringFn:
        if op_name in LOWERINGS and not replace:
            raise ValueError(f"op '{op_name}' already has a TVM lowering; pass replace=True to override it")
        LOWERINGS[op_name] = f
        return f
    return add if fn is None else add(fn)


def get_lowering(op_name: str) -> LoweringFn:
    try:
        return LOWERINGS[op_name]
    except KeyError:
        raise LoweringError(f"op '{op_name}' has no TVM lowering; add one with "
                            f"llmasos.backends.tvm.register_lowering('{op_name}', fn)") from None


def missing_lowerings() -> list[str]:
    """Registered ops that have no lowering (the test suite keeps this empty)."""
    return sorted(set(all_ops()) - set(LOWERINGS))


_TVM_DTYPES = {DType.f32: "float32", DType.f16: "float16", DType.bf16: "bfloat16", DType.f8e4m3: "float8_e4m3fn",
               DType.i64: "int64", DType.i32: "int32", DType.i8: "int8", DType.u8: "uint8", DType.i4: "int4",
               DType.u4: "uint4", DType.bool: "bool"}


def tvm_dtype(dt: DType) -> str:
    return _TVM_DTYPES[dt]


class LowerContext:
    """What a lowering function may use: the block builder, dim conversion, the node being lowered."""

    def __init__(self, bb: relax.BlockBuilder, sym_vars: dict, spec=None, params=(), graph=None,
                 functions=None, shared=None):
        self.bb = bb
        self.graph = graph        # the Graph being lowered (its users and symbol bounds), None when unknown
        # every function of the module (name -> Graph; they share the parameters) and a scratch dict shared by
        # their lowerings: a weight's layout must be the same in all of them, or LiftTransformParams (one
        # transform for all the functions) lifts none of its repackings
        self.functions = functions if functions is not None else ({graph.name: graph} if graph is not None else {})
        self.shared = shared if shared is not None else {}
        self.sym_vars = sym_vars  # symbol name -> tir.Var (int64), one per symbol for the whole graph
        self.spec = spec          # Target or None: lowerings may pick target-specific forms
        self.params = set(params)  # graph parameter Values (weights: work on them alone is done once)
        self.node: Optional[Node] = None
        self._overrides = dict(spec.lowerings()) if spec is not None else {}

    def lowering(self, op_name: str) -> LoweringFn:
        """The lowering of ``op_name`` for this build: the target's override (``Target.lowerings``), else
        the core table's."""
        fn = self._overrides.get(op_name)
        return fn if fn is not None else get_lowering(op_name)

    def is_param(self, v: Value) -> bool:
        return v in self.params

    def panel_width(self) -> Optional[int]:
        """Columns per weight panel for our CPU GEMM (``Target.panel_width``), None for other targets."""
        if self.spec is None:
            return None
        if not hasattr(self, "_panel_width"):
            self._panel_width = self.spec.panel_width()
        return self._panel_width

    # -- dims --------------------------------------------------------------------------------
    def dim(self, d) -> tir.PrimExpr:
        """An IR dim (int or sympy expression) as an int64 TIR expression."""
        if isinstance(d, (int, np.integer)):
            return tir.IntImm("int64", int(d))
        return _sympy_to_tir(sympy.sympify(d), self.sym_vars)

    def shape(self, t) -> list:
        """TIR shape of a Value or TensorType."""
        t = t.type if isinstance(t, Value) else t
        return [self.dim(d) for d in t.shape]

    # -- emitting ----------------------------------------------------------------------------
    def emit(self, expr, name: str = "lv") -> relax.Var:
        return self.bb.emit(expr, name_hint=name)

    def emit_te(self, fn: Callable, *args, name: str = "te") -> relax.Var:
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name)

    def const(self, value, dt) -> relax.Constant:
        dt = tvm_dtype(dt) if isinstance(dt, DType) else dt
        return relax.const(value, dt)

    def cast(self, x, dt):
        dt = tvm_dtype(dt) if isinstance(dt, DType) else dt
        return x if _dtype_of(x) == dt else R.astype(x, dt)


def _dtype_of(x) -> str:
    return str(x.ty.dtype)


def _sympy_to_tir(e: sympy.Expr, sym_vars: dict) -> tir.PrimExpr:
    def conv(x):
        if x.is_Integer:
            return tir.IntImm("int64", int(x))
        if x.is_Symbol:
            try:
                return sym_vars[x.name]
            except KeyError:
                raise LoweringError(f"symbol '{x.name}' is not bound by any graph input shape") from None
        num, den = sympy.fraction(sympy.together(x))
        if den != 1:  # dims are integers, so an exact quotient
            return tir.floordiv(conv(sympy.expand(num)), conv(den))
        if x.is_Add:
            out = conv(x.args[0])
            for a in x.args[1:]:
                out = out + conv(a)
            return out
        if x.is_Mul:
            out = conv(x.args[0])
            for a in x.args[1:]:
                out = out * conv(a)
            return out
        if x.is_Pow and x.exp.is_Integer and int(x.exp) > 0:
            b = conv(x.base)
            out = b
            for _ in range(int(x.exp) - 1):
                out = out * b
            return out
        if isinstance(x, (sympy.floor, sympy.ceiling)):
            n, d = sympy.fraction(sympy.together(x.args[0]))
            n, d = conv(sympy.expand(n)), conv(d)
            return tir.floordiv(n, d) if isinstance(x, sympy.floor) else tir.floordiv(n + d - 1, d)
        if isinstance(x, sympy.Mod):
            return tir.floormod(conv(x.args[0]), conv(x.args[1]))
        if isinstance(x, (sympy.Max, sympy.Min)):
            f = tir.max if isinstance(x, sympy.Max) else tir.min
            out = conv(x.args[0])
            for a in x.args[1:]:
                out = f(out, conv(a))
            return out
        raise LoweringError(f"dim expression {x} has no TIR form")
    return conv(e)


# ------------------------------------------------------------------------------------------------
# helpers

def acc_dtype(dt: DType) -> DType:
    """Where the reference accumulates: f32 for low-precision floats."""
    return DType.f32 if dt in (DType.f16, DType.bf16, DType.f8e4m3) else dt


def _in_f32(ctx, node, x, fn):
    """Run ``fn`` on x in f32 when x is a low-precision float, casting the result back."""
    dt = node.inputs[0].type.dtype
    acc = acc_dtype(dt)
    if acc is dt:
        return fn(x)
    return ctx.cast(ctx.emit(fn(ctx.emit(ctx.cast(x, acc)))), dt)  # emitted: fn may read the dtype


def _out_type(node: Node, i: int = 0) -> TensorType:
    return node.outputs[i].type


# ------------------------------------------------------------------------------------------------
# elementwise

def _simple(relax_fn):
    return lambda ctx, node, args: relax_fn(*args)


for _name, _fn in {"add": R.add, "sub": R.subtract, "mul": R.multiply, "maximum": R.maximum,
                   "minimum": R.minimum, "eq": R.equal, "ne": R.not_equal, "lt": R.less, "le": R.less_equal,
                   "gt": R.greater, "ge": R.greater_equal, "logical_and": R.logical_and,
                   "logical_or": R.logical_or, "logical_not": R.logical_not, "neg": R.negative, "abs": R.abs,
                   "relu": R.nn.relu, "where": R.where}.items():
    register_lowering(_name, _simple(_fn))


@register_lowering("div")
def _div(ctx, node, args):
    a, b = args
    dt = node.inputs[0].type.dtype
    acc = acc_dtype(dt)
    if acc is dt:
        return R.divide(a, b)
    return ctx.cast(ctx.emit(R.divide(ctx.cast(a, acc), ctx.cast(b, acc))), dt)


@register_lowering("pow")
def _pow(ctx, node, args):
    a, b = args
    dt = node.inputs[0].type.dtype
    e = _scalar_const(node.inputs[1])
    if dt.is_float and e in (1.0, 2.0, 3.0) and node.outputs[0].type.same_as(node.inputs[0].type):
        # x**3 (GPT-2's gelu) as multiplies: TVM's power calls powf per element and blocks vectorisation
        y = a
        for _ in range(int(e) - 1):
            y = ctx.emit(R.multiply(y, a))
        return y
    if dt.is_float:
        acc = acc_dtype(dt)
        return ctx.cast(ctx.emit(R.power(ctx.cast(a, acc), ctx.cast(b, acc))), dt)
    # integer power: TIR has no integer pow intrinsic, so go through exact repeated squaring in te
    def ipow(x, y):
        def body(*idx):
            xi = x(*_bidx(idx, x.shape, len(idx)))
            yi = y(*_bidx(idx, y.shape, len(idx)))
            return _int_pow(xi, yi, x.dtype)
        return te.compute(_bshape(x.shape, y.shape), body, name="ipow")
    return ctx.emit_te(ipow, a, b, name="ipow")


def _scalar_const(v: Value):
    """The value of a one-element constant (a `const` or `full` node), else None."""
    p = v.producer
    if p is None:
        return None
    if p.op == "const" and np.asarray(p.attrs["value"]).size == 1:
        return float(np.asarray(p.attrs["value"]).reshape(()))
    if p.op == "full":
        return float(p.attrs["value"])
    return None


def _int_pow(x, y, dtype):
    # exponents of LLMasOS graphs are small non-negative ints (torch refuses negative integer powers);
    # 6 squaring steps cover exponents below 64, which already overflow any base > 1 in 64 bits
    result = tir.const(1, dtype)
    base = x
    e = y
    for _ in range(6):
        result = tir.Select(tir.floormod(e, 2) == 1, result * base, result)
        base = base * base
        e = tir.floordiv(e, 2)
    return result


def _bshape(*shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        d = None
        for s in shapes:
            j = len(s) - rank + i
            if j >= 0 and not (isinstance(s[j], tir.IntImm) and s[j].value == 1):
                d = s[j]
        out.append(d if d is not None else tir.IntImm("int64", 1))
    return out


def _bidx(idx, shape, rank):
    """Index into a broadcast operand of `shape` from output indices `idx` (numpy rules)."""
    off = rank - len(shape)
    return [0 if isinstance(d, tir.IntImm) and d.value == 1 else idx[off + j] for j, d in enumerate(shape)]


def _float_unary(relax_fn):
    return lambda ctx, node, args: _in_f32(ctx, node, args[0], relax_fn)


for _name, _fn in {"exp": R.exp, "log": R.log, "sqrt": R.sqrt, "rsqrt": R.rsqrt, "tanh": R.tanh, "sin": R.sin,
                   "cos": R.cos, "erf": R.erf}.items():
    register_lowering(_name, _float_unary(_fn))


def _sigmoid_of(x):
    # through exp, so the CPU pipeline's fast (vectorised) exp serves sigmoid and silu too
    one = relax.const(1.0, _dtype_of(x))
    return R.divide(one, R.add(one, R.exp(R.negative(x))))


register_lowering("sigmoid", lambda ctx, node, args: _in_f32(ctx, node, args[0], _sigmoid_of))
register_lowering("silu", lambda ctx, node, args: _in_f32(
    ctx, node, args[0], lambda x: R.divide(x, R.add(relax.const(1.0, _dtype_of(x)), R.exp(R.negative(x))))))


@register_lowering("reciprocal")
def _reciprocal(ctx, node, args):
    return _in_f32(ctx, node, args[0], lambda x: R.divide(relax.const(1.0, _dtype_of(x)), x))


@register_lowering("gelu")
def _gelu(ctx, node, args):
    if node.attrs["approximate"] != "tanh":
        return _in_f32(ctx, node, args[0], R.nn.gelu)

    def gelu_tanh(x):
        # x*x*x rather than TVM's power(x, 3), which calls powf per element and blocks vectorisation
        c = relax.const(math.sqrt(2.0 / math.pi), "float32")
        x3 = ctx.emit(R.multiply(R.multiply(x, x), x))
        inner = ctx.emit(R.multiply(c, R.add(x, R.multiply(relax.const(0.044715, "float32"), x3))))
        half_x = ctx.emit(R.multiply(relax.const(0.5, "float32"), x))
        return R.multiply(half_x, R.add(relax.const(1.0, "float32"), R.tanh(inner)))
    return _in_f32(ctx, node, args[0], gelu_tanh)


@register_lowering("clip")
def _clip(ctx, node, args):
    x = args[0]
    dt = node.inputs[0].type.dtype
    lo, hi = node.attrs["min"], node.attrs["max"]
    if not dt.is_float:  # the reference clips in float then truncates: same as clipping to trunc(bounds)
        lo = None if lo is None else math.trunc(lo)
        hi = None if hi is None else math.trunc(hi)
    if lo is not None:
        x = ctx.emit(R.maximum(x, ctx.const(lo, dt)))
    if hi is not None:
        x = R.minimum(x, ctx.const(hi, dt))
    return x


@register_lowering("cast")
def _cast(ctx, node, args):
    x = args[0]
    src, dst = node.inputs[0].type.dtype, node.attrs["dtype"]
    if dst is DType.bool and src is not DType.bool:
        return R.not_equal(x, ctx.const(0, src))
    return ctx.cast(x, dst)


# ------------------------------------------------------------------------------------------------
# linear algebra

@register_lowering("matmul")
def _matmul(ctx, node, args):
    a, b = args
    dt = node.inputs[0].type.dtype
    if node.inputs[1].type.rank == 2 and weight_panels(ctx, node, 1):
        return panel_matmul(ctx, node, a, b, None, transposed=False)
    acc = acc_dtype(dt)
    if acc is dt:
        return R.matmul(a, b)
    return ctx.cast(ctx.emit(R.matmul(a, b, out_dtype=tvm_dtype(acc))), dt)


@register_lowering("linear")
def _linear(ctx, node, args):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if weight_panels(ctx, node, 1) and (bias is None or ctx.is_param(node.inputs[2])):
        return panel_matmul(ctx, node, x, w, bias, transposed=True)
    dt = node.inputs[0].type.dtype
    acc = acc_dtype(dt)
    if ctx.spec is not None and ctx.spec.gemm_nt and w.ty.ndim == 2:
        return _nt_linear(ctx, node, x, w, bias, dt, acc)
    wt = ctx.emit(R.permute_dims(w, [1, 0]), "wT")  # a param-only expression: LiftTransformParams hoists it
    y = R.matmul(x, wt, out_dtype=tvm_dtype(acc) if acc is not dt else None)
    if bias is not None:
        y = R.add(ctx.emit(y), ctx.cast(bias, acc))
    return y if acc is dt else ctx.cast(ctx.emit(y), dt)


def _nt_linear(ctx, node, x, w, bias, dt, acc):
    """Targets with ``gemm_nt`` (GPUs): x @ W^T reading W [N, K] as stored. Each output reduces over a contiguous weight row, the layout
    DLight's GEMV rule (decode: one row of x) reads at full bandwidth; a transposed copy made at load would
    turn every decode GEMV into a strided, outer-reduction one. Bias and cast stay separate ops, which
    TVM's FuseOps folds into the GEMM kernel's epilogue."""
    y = _small_m_linear(ctx, node, x, w, dt)
    if y is None:
        y = _prefill_linear(ctx, node, x, w, dt)
    if y is not None:
        if bias is not None:
            y = ctx.emit(R.add(y, ctx.cast(bias, dt)))
        return y
    n, k = (ctx.dim(d) for d in node.inputs[1].type.shape)
    acc_t = tvm_dtype(acc)

    def f(xt, wt):
        r = te.reduce_axis((0, k), name="k")
        return te.compute((*xt.shape[:-1], n), lambda *i: te.sum(
            xt(*i[:-1], r).astype(acc_t) * wt[i[-1], r].astype(acc_t), axis=r), name="matmul_nt")
    y = ctx.emit_te(f, x, w, name="linear_nt")
    if bias is not None:
        y = ctx.emit(R.add(y, ctx.cast(bias, acc)))
    return y if acc is dt else ctx.cast(y, dt)


def _small_m_linear(ctx, node, x, w, dt):
    """A decode step's GEMM at a symbolic batch (x [batch, K] or [batch, 1, K], W a static [N, K]) through
    the target's hand-written small-M kernel (``Target.small_m_gemm``: tensor cores on CUDA), or None. The
    kernel writes ``dt`` itself (f32 accumulation inside); a bias is added after it."""
    xt, wt = node.inputs[0].type, node.inputs[1].type
    lead = xt.shape[:-1]
    if (ctx.spec is None or not wt.is_static or not lead or isinstance(lead[0], int)
            or any(d != 1 for d in lead[1:]) or not isinstance(xt.shape[-1], int)):
        return None
    n, k = (int(d) for d in wt.shape)
    kernel = ctx.spec.small_m_gemm(n, k, tvm_dtype(dt))
    if kernel is None:
        return None
    name, func = kernel
    rows = ctx.dim(lead[0])
    x2 = ctx.emit(R.reshape(x, [rows, k])) if len(lead) > 1 else x
    gv = ctx.bb.add_func(func, name)
    y = ctx.emit(relax.call_tir(gv, [x2, w], relax.TensorType([rows, n], tvm_dtype(dt))), "small_m_gemm")
    return ctx.emit(R.reshape(y, [*ctx.shape(xt)[:-1], n])) if len(lead) > 1 else y


def _prefill_linear(ctx, node, x, w, dt):
    """A prefill GEMM (x [..., K] whose rows are symbolic and not a decode step's [batch, 1...]: the prompt's
    tokens, [1, seq, K] or [batch, seq, K]; a rank-2 symbolic [M, K] is left to the small-M kernel, since it
    cannot be told from a decode batch; W a static [N, K]) through the target's hand-written
    large-M kernel (``Target.prefill_gemm``: tensor cores, cp.async pipeline on CUDA), or None. x is viewed as
    [rows, K]; the kernel writes ``dt`` (f32 accumulation inside); a bias is added after it."""
    xt, wt = node.inputs[0].type, node.inputs[1].type
    lead = xt.shape[:-1]
    if (ctx.spec is None or not wt.is_static or not lead or all(isinstance(d, int) for d in lead)
            or not isinstance(xt.shape[-1], int)):
        return None
    if not isinstance(lead[0], int) and all(d == 1 for d in lead[1:]):
        return None        # a decode step's [batch, 1, K]: the small-M kernel's (or the generic lowering's)
    n, k = (int(d) for d in wt.shape)
    kernel = ctx.spec.prefill_gemm(n, k, tvm_dtype(dt))
    if kernel is None:
        return None
    return rows_gemm(ctx, xt, x, w, n, k, dt, kernel)


def rows_gemm(ctx, xt, x, w, n: int, k: int, dt, kernel=None):
    """y [..., N] = x [..., K] @ w [N, K]^T (``xt``: x's TensorType, rank >= 2) with x viewed as [rows, K]:
    through ``kernel`` ((name, PrimFunc) of (x [M, K], w [N, K]) -> y [M, N] ``dt``: the target's prefill
    GEMM), else a Relax matmul accumulating in f32."""
    shape = ctx.shape(xt)
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    flat = len(shape) > 2
    x2 = ctx.emit(R.reshape(x, [rows, k])) if flat else x
    if kernel is not None:
        name, func = kernel
        gv = ctx.bb.add_func(func, name)
        y = ctx.emit(relax.call_tir(gv, [x2, w], relax.TensorType([rows, n], tvm_dtype(dt))), "prefill_gemm")
    else:
        y = ctx.emit(R.astype(R.matmul(x2, R.permute_dims(w, [1, 0]), out_dtype="float32"), tvm_dtype(dt)))
    return ctx.emit(R.reshape(y, [*shape[:-1], n])) if flat else y


PANEL_ROWS = 4  # cpu_schedule.Matmul's register-tile height (MR)


def pad_single_row(ctx, node, x):
    """A decode step's GEMM has one static row, and the CPU Matmul rule needs a row loop to tile (DLight's
    iterator analysis finds no I axis when every row extent is 1, and the fallback GEMV rule streamed
    SmolLM2's head at 2 GB/s instead of 15). Give it PANEL_ROWS rows, the first the real one: the extra FMAs
    are free in a memory-bound GEMV. Returns (x as [PANEL_ROWS, K] or unchanged, whether it was padded);
    the caller keeps row 0 of the result."""
    lead = node.inputs[0].type.shape[:-1]
    if not lead or not all(isinstance(d, int) and d == 1 for d in lead):
        return x, False
    k = ctx.dim(node.inputs[0].type.shape[-1])
    dt = tvm_dtype(node.inputs[0].type.dtype)
    row = ctx.emit(R.reshape(x, [1, k]))
    return ctx.emit(R.concat([row, R.zeros([PANEL_ROWS - 1, k], dt)], axis=0), "rows_padded"), True


def weight_panels(ctx, node, i) -> bool:
    """Whether this matmul's weight (operand i) is repacked into column panels for the CPU GEMM."""
    w = node.inputs[i].type
    return (ctx.panel_width() is not None and ctx.is_param(node.inputs[i]) and w.is_static
            and w.dtype is DType.f32 and node.inputs[0].type.dtype is DType.f32)


def panel_matmul(ctx, node, x, w, bias, transposed: bool, act=None):
    """x @ W (+ bias) with W repacked once, at load, into NR-column panels [ceil(N/NR), K, NR].

    Each register tile of the CPU GEMM (cpu_schedule.Matmul) then streams one contiguous panel instead of
    NR-float pieces of K rows N floats apart; N is zero-padded to whole panels (GPT-2's 50257-word head)
    and the padding sliced off the result. ``act`` (a TE tensor -> tensor function) is applied in the same
    epilogue as the bias, before the reshape to [..., N] -- a reshape between GEMM and activation would
    keep TVM's FuseOps from fusing them.
    """
    nr = ctx.panel_width()
    if transposed:  # linear: W [N, K]
        n, k = node.inputs[1].type.shape
    else:           # matmul: W [K, N]
        k, n = node.inputs[1].type.shape
    n_pad = -(-n // nr) * nr
    if n_pad != n:
        zeros = R.zeros([n_pad - n, k] if transposed else [k, n_pad - n], "float32")
        w = ctx.emit(R.concat([w, zeros], axis=0 if transposed else 1), "w_padded")
        if bias is not None:
            bias = ctx.emit(R.concat([bias, R.zeros([n_pad - n], "float32")], axis=0), "bias_padded")
    if transposed:
        panels = R.permute_dims(R.reshape(w, [n_pad // nr, nr, k]), [0, 2, 1])
    else:
        panels = R.permute_dims(R.reshape(w, [k, n_pad // nr, nr]), [1, 0, 2])
    panels = ctx.emit(panels, "w_panels")  # param-only: hoisted into main_transform_params

    def gemm(x, wp, *b):
        r = te.reduce_axis((0, k), name="k")
        y = te.compute([*x.shape[:-1], n_pad // nr, nr],
                       lambda *i: te.sum(x(*i[:-2], r) * wp[i[-2], r, i[-1]], axis=r), name="panel_matmul")
        if b:
            y = te.compute(y.shape, lambda *i: y(*i) + b[0][i[-2] * nr + i[-1]], name="bias_add")
        if act is not None:
            y = act(y)
        return y
    x, one_row = pad_single_row(ctx, node, x)
    y = ctx.emit_te(gemm, x, panels, *([bias] if bias is not None else []), name="panel_matmul")
    lead = ctx.shape(node.inputs[0])[:-1]
    if one_row:
        y = ctx.emit(R.strided_slice(y, [0], [0], [1], assume_inbound=True))
    y = ctx.emit(R.reshape(y, [*lead, n_pad]))
    if n_pad != n:
        y = R.strided_slice(y, [len(lead)], [0], [n], assume_inbound=True)
    return y


# ------------------------------------------------------------------------------------------------
# nn

@register_lowering("softmax")
def _softmax(ctx, node, args):
    return _in_f32(ctx, node, args[0], lambda x: R.nn.softmax(x, node.attrs["axis"]))


@register_lowering("log_softmax")
def _log_softmax(ctx, node, args):
    return _in_f32(ctx, node, args[0], lambda x: R.nn.log_softmax(x, node.attrs["axis"]))


def _norm_axes(node):
    r = node.inputs[0].type.rank
    return list(range(r - node.attrs["ndim"], r))


def _tail_shape(ctx, node):
    t = node.inputs[0].type
    return [ctx.dim(d) for d in t.shape[t.rank - node.attrs["ndim"]:]]


def _norm_in_acc(ctx, node, args, norm: str):
    """A 16-bit norm as ONE kernel: topi's norm over the inputs cast to f32 inside the same PrimFunc, the
    result cast back -- the casts are then the reduction's prologue and epilogue (the same schedule as
    the f32 norm's), where R.astype + R.nn.<norm> left the cast of x a kernel of its own (FuseOps does not
    fuse it into the norm): two launches a norm, 32 of a Llama-1B decode step's ~230 on a GPU."""
    dt, acc = tvm_dtype(node.inputs[0].type.dtype), tvm_dtype(acc_dtype(node.inputs[0].type.dtype))
    axes, eps, n_in = _norm_axes(node), node.attrs["eps"], len(args)

    def f(x, *wb):
        xa = topi.cast(x, acc)
        tail = [x.shape[a] for a in axes]
        w = topi.cast(wb[0], acc) if n_in > 1 else topi.full(tail, acc, 1.0)
        if norm == "rms_norm":
            y = topi.nn.rms_norm(xa, w, axes, eps)
        else:
            b = topi.cast(wb[1], acc) if n_in > 2 else topi.full(tail, acc, 0.0)
            y = topi.nn.layer_norm(xa, w, b, axes, eps)
        return topi.cast(y, dt)
    return ctx.emit_te(f, *args, name=f"{norm}_in_f32")


@register_lowering("layer_norm")
def _layer_norm(ctx, node, args):
    dt = node.inputs[0].type.dtype
    acc = acc_dtype(dt)
    if acc is not dt:
        return _norm_in_acc(ctx, node, args, "layer_norm")
    tail = _tail_shape(ctx, node)
    w = ctx.cast(args[1], acc) if len(args) > 1 else R.ones(tail, tvm_dtype(acc))
    b = ctx.cast(args[2], acc) if len(args) > 2 else R.zeros(tail, tvm_dtype(acc))
    return R.nn.layer_norm(args[0], ctx.emit(w), ctx.emit(b), _norm_axes(node), node.attrs["eps"])


@register_lowering("rms_norm")
def _rms_norm(ctx, node, args):
    dt = node.inputs[0].type.dtype
    acc = acc_dtype(dt)
    if acc is not dt:
        return _norm_in_acc(ctx, node, args, "rms_norm")
    w = ctx.cast(args[1], acc) if len(args) > 1 else R.ones(_tail_shape(ctx, node), tvm_dtype(acc))
    return R.nn.rms_norm(args[0], ctx.emit(w), _norm_axes(node), node.attrs["eps"])


@register_lowering("embedding")
def _embedding(ctx, node, args):
    weight, ids = args
    # out-of-range ids are a caller error; clipping keeps a bad id from reading outside the table
    return R.take(weight, ids, axis=0, mode="clip")


@register_lowering("sdpa")
def _sdpa(ctx, node, args):
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else None
    qt, kt, vt = (i.type for i in node.inputs[:3])
    dt = qt.dtype
    f32 = DType.f32
    q, k, v = (ctx.cast(t, f32) for t in (q, k, v))
    hq, hk = qt.shape[-3], kt.shape[-3]
    rep = 1 if dims_equal(hq, hk) else hq // hk
    L, S, D, Dv = qt.shape[-2], kt.shape[-2], qt.shape[-1], vt.shape[-1]
    out_t = _out_type(node)
    batch = [ctx.dim(d) for d in out_t.shape[:-3]]
    qbatch = [ctx.dim(d) for d in qt.shape[:-3]]
    if rep > 1:
        # grouped-query attention without copying k/v: the `rep` query heads of one kv head are stacked
        # along the sequence axis, [.., hk*rep, L, D] -> [.., hk, rep*L, D] (contiguous, a free reshape)
        q = ctx.emit(R.reshape(q, [*qbatch, ctx.dim(hk), ctx.dim(rep * L), ctx.dim(D)]), "q_grouped")
    kT = ctx.emit(R.permute_dims(k, [*range(kt.rank - 2), kt.rank - 1, kt.rank - 2]), "kT")
    logits = ctx.emit(R.matmul(q, kT), "logits")
    if rep > 1:
        logits = ctx.emit(R.reshape(logits, [*batch, ctx.dim(hq), ctx.dim(L), ctx.dim(S)]), "logits")
    scale = node.attrs["scale"]
    scale = 1.0 / math.sqrt(int(D)) if scale is None else scale
    logits = ctx.emit(R.multiply(logits, relax.const(scale, "float32")), "scaled")
    neg_inf = relax.const(float("-inf"), "float32")
    if node.attrs["is_causal"]:
        logits = ctx.emit_te(_causal_mask, logits, name="causal_mask")
    if mask is not None:
        if node.inputs[3].type.dtype is DType.bool:
            logits = ctx.emit(R.where(mask, logits, neg_inf), "masked")
        else:
            logits = ctx.emit(R.add(logits, ctx.cast(mask, f32)), "masked")
    probs = ctx.emit(R.nn.softmax(logits, -1), "probs")
    if rep > 1:
        probs = ctx.emit(R.reshape(probs, [*batch, ctx.dim(hk), ctx.dim(rep * L), ctx.dim(S)]), "probs_grouped")
    out = ctx.emit(R.matmul(probs, v), "attn")
    if rep > 1:
        out = ctx.emit(R.reshape(out, [*batch, ctx.dim(hq), ctx.dim(L), ctx.dim(Dv)]), "attn")
    return ctx.cast(out, dt)


def _causal_mask(logits):
    """Top-left aligned causal mask: query i sees keys j <= i."""
    neg_inf = tir.const(float("-inf"), logits.dtype)
    r = len(logits.shape)
    return te.compute(logits.shape, lambda *i: tir.Select(i[r - 1] <= i[r - 2], logits(*i), neg_inf),
                      name="causal_mask")


# ------------------------------------------------------------------------------------------------
# reductions

def _reduction(relax_fn, acc_float: bool):
    def lower(ctx, node, args):
        axes = node.attrs["axes"]
        if not axes or node.inputs[0].type.rank == 0:  # nothing to reduce: the identity
            return args[0]
        dt = node.inputs[0].type.dtype
        x = args[0]
        if acc_float and acc_dtype(dt) is not dt:
            return ctx.cast(ctx.emit(relax_fn(ctx.cast(x, DType.f32), axes, node.attrs["keepdims"])), dt)
        return relax_fn(x, axes, node.attrs["keepdims"])
    return lower


for _name, _fn, _acc in (("sum", R.sum, True), ("mean", R.mean, True), ("prod", R.prod, True),
                         ("max", R.max, False), ("min", R.min, False)):
    register_lowering(_name, _reduction(_fn, _acc))


@register_lowering("argmax")
def _argmax(ctx, node, args):
    if node.inputs[0].type.rank == 0:
        return R.zeros([], "int64")
    return ctx.cast(ctx.emit(R.argmax(args[0], node.attrs["axis"], node.attrs["keepdims"])), DType.i64)


@register_lowering("cumsum")
def _cumsum(ctx, node, args):
    dst = node.attrs["dtype"]
    acc = DType.f32 if dst.is_float else DType.i64
    if node.inputs[0].type.rank == 0:
        return ctx.cast(args[0], dst)
    y = R.cumsum(ctx.cast(args[0], acc), node.attrs["axis"], tvm_dtype(acc))
    return y if acc is dst else ctx.cast(ctx.emit(y), dst)


# ------------------------------------------------------------------------------------------------
# shape

@register_lowering("reshape")
def _reshape(ctx, node, args):
    return R.reshape(args[0], [ctx.dim(d) for d in node.attrs["shape"]])


@register_lowering("permute")
def _permute(ctx, node, args):
    return R.permute_dims(args[0], list(node.attrs["perm"]))


@register_lowering("slice")
def _slice(ctx, node, args):
    a = node.attrs
    return R.strided_slice(args[0], [a["axis"] % node.inputs[0].type.rank], [ctx.dim(a["start"])],
                           [ctx.dim(a["end"])], [a["step"]], assume_inbound=True)


@register_lowering("concat")
def _concat(ctx, node, args):
    return args[0] if len(args) == 1 else R.concat(list(args), node.attrs["axis"])


@register_lowering("split")
def _split(ctx, node, args):
    t = node.inputs[0].type
    axis = node.attrs["axis"] % t.rank
    outs, start = [], sympy.Integer(0)
    for s in node.attrs["sizes"]:
        end = start + s
        outs.append(R.strided_slice(args[0], [axis], [ctx.dim(start)], [ctx.dim(end)], assume_inbound=True))
        start = end
    return outs


@register_lowering("expand_dims")
def _expand_dims(ctx, node, args):
    return R.expand_dims(args[0], node.attrs["axis"])


@register_lowering("squeeze")
def _squeeze(ctx, node, args):
    return R.squeeze(args[0], list(node.attrs["axes"])) if node.attrs["axes"] else args[0]


@register_lowering("broadcast_to")
def _broadcast_to(ctx, node, args):
    return R.broadcast_to(args[0], [ctx.dim(d) for d in node.attrs["shape"]])


@register_lowering("take")
def _take(ctx, node, args):
    # "wrap" gives numpy's negative indices (-n..-1) and keeps bad indices inside the tensor
    return R.take(args[0], args[1], axis=node.attrs["axis"] % node.inputs[0].type.rank, mode="wrap")


def _norm_index(i, n):
    """A numpy-style index (negative counts from the end) clamped into [0, n)."""
    i = i.astype("int64")
    i = tir.Select(i < 0, i + n, i)
    return tir.max(tir.min(i, n - 1), tir.IntImm("int64", 0))


@register_lowering("gather")
def _gather(ctx, node, args):
    axis = node.attrs["axis"] % node.inputs[0].type.rank

    def gather(x, index):
        def body(*i):
            src = list(i)
            src[axis] = _norm_index(index(*i), x.shape[axis])
            return x(*src)
        return te.compute(index.shape, body, name="gather")
    return ctx.emit_te(gather, args[0], args[1], name="gather")


@register_lowering("index")
def _index(ctx, node, args):
    k = len(args) - 1
    x_rank = node.inputs[0].type.rank

    def index(x, *idx):
        b = _bshape(*(t.shape for t in idx))
        nb = len(b)

        def body(*i):
            lead = [_norm_index(t(*_bidx(i[:nb], t.shape, nb)), x.shape[d]) for d, t in enumerate(idx)]
            return x(*lead, *i[nb:])
        return te.compute([*b, *x.shape[k:x_rank]], body, name="index")
    return ctx.emit_te(index, *args, name="index")


# ------------------------------------------------------------------------------------------------
# creation

@register_lowering("const")
def _const(ctx, node, args):
    dt = node.attrs["dtype"]
    if dt.is_packed:
        raise LoweringError(f"inline constants of packed dtype {dt} are not supported by the TVM backend")
    value = np.asarray(node.attrs["value"]).astype(dt.numpy)
    return relax.const(value, tvm_dtype(dt))


@register_lowering("arange")
def _arange(ctx, node, args):
    a = node.attrs
    return R.arange(ctx.dim(a["start"]), ctx.dim(a["end"]), a["step"], tvm_dtype(a["dtype"]))


@register_lowering("full")
def _full(ctx, node, args):
    dt = node.attrs["dtype"]
    v = node.attrs["value"]
    value = np.asarray(v).astype(dt.numpy) if not (dt is DType.bool) else np.asarray(bool(v))
    return R.full([ctx.dim(d) for d in node.attrs["shape"]], relax.const(value, tvm_dtype(dt)), tvm_dtype(dt))
