"""The reference interpreter against torch, op by op, plus its input checks and symbolic attrs.

Every registered op must have a case here (test_every_op_has_a_torch_test). Each case runs a one-node graph
through `interpreter.run` and compares with the torch function the frontend maps onto the op, on inputs
drawn by Hypothesis (shapes, broadcasting, dtypes) with values from a drawn seed.

Tolerance: |got - want| <= tol * max(1, |want|) elementwise, tol = 1e-5 for f32 and one unit in the last
place for f16 (2^-10) / bf16 (2^-7): both sides compute in f32 and round once, so they may differ by one
rounding. nan must match nan, infinities must match exactly. Ints and bools must be equal.
"""
from __future__ import annotations

import math
import functools
import re

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from llmasos.ir import DType, Graph, TensorType, all_ops, sym
from llmasos.ir import interpreter
from llmasos.ir.torch_dtypes import dtype_to_torch, numpy_to_torch, torch_to_numpy
from llmasos.ir.verifier import verify
from tests.graph_strategies import graphs_with_inputs

TESTED: set[str] = set()


def covers(*ops):
    """Marks the decorated test as the torch comparison for ``ops``."""
    TESTED.update(ops)
    return lambda test: test


TOL = {DType.f32: 1e-5, DType.f16: 2.0 ** -10, DType.bf16: 2.0 ** -7, DType.f8e4m3: 2.0 ** -3}
FLOATS = st.sampled_from([DType.f32, DType.f16, DType.bf16])
INTS = st.sampled_from([DType.i32, DType.i64])
SEEDS = st.integers(0, 2 ** 32 - 1)


# -- helpers -------------------------------------------------------------------------------------
def rand(rng, shape, dtype: DType, lo=-3.0, hi=3.0, special=False) -> np.ndarray:
    shape = tuple(shape)
    if dtype is DType.bool:
        return rng.random(shape) < 0.5
    if dtype.is_int:
        return rng.integers(int(lo), int(hi) + 1, shape).astype(dtype.numpy)
    a = rng.uniform(lo, hi, shape).astype(np.float32)
    if special and a.size:
        pick = rng.random(shape) < 0.2
        a = np.where(pick, rng.choice(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32), shape), a)
    return a.astype(dtype.numpy)


def run_op(op: str, inputs: list, attrs: dict | None = None) -> list:
    """Run one node of `op` over static inputs (the graph verifies first)."""
    g = Graph(op)
    vals = [g.add_input(f"in{i}", TensorType(a.shape, DType.from_numpy(a.dtype))) for i, a in enumerate(inputs)]
    out = g.add_node(op, vals, attrs or {})
    g.set_outputs(list(out) if isinstance(out, tuple) else [out])
    verify(g)
    return interpreter.run(g, inputs)


def T(a: np.ndarray) -> torch.Tensor:
    # numpy_to_torch goes through np.ascontiguousarray, which turns a 0-d array into shape (1,)
    return numpy_to_torch(a.reshape(-1)).reshape(a.shape)


def check(got: np.ndarray, want, tol: float | None = None, what: str = "", extra=0.0) -> None:
    want = torch_to_numpy(want) if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != torch {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != torch {want.dtype}"
    dt = DType.from_numpy(got.dtype)
    if not dt.is_float:
        assert np.array_equal(got, want), f"{what}: {got} != torch {want}"
        return
    g, w = got.astype(np.float64), want.astype(np.float64)
    tol = TOL[dt] if tol is None else tol
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: nan positions differ:\n{g}\nvs torch\n{w}"
    inf = np.isinf(w) | np.isinf(g)
    assert np.array_equal(g[inf], w[inf]), f"{what}: infinities differ: {g[inf]} vs torch {w[inf]}"
    fin = np.isfinite(w) & np.isfinite(g)
    err = np.abs(g[fin] - w[fin])
    # extra: a per-element absolute term for results whose rounding scales with their operands, not with
    # the result (a product of two dot products, either of which may cancel)
    bound = tol * np.maximum(1.0, np.abs(w[fin])) + np.broadcast_to(extra, w.shape)[fin]
    assert np.all(err <= bound), (f"{what}: max error {err.max()} over tolerance {tol} * max(1, |ref|) "
                                  f"(worst at ref {w[fin][np.argmax(err - bound)]})")


# -- elementwise ---------------------------------------------------------------------------------
UNARY_FLOAT = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
               "reciprocal": torch.reciprocal, "tanh": torch.tanh, "sin": torch.sin, "cos": torch.cos,
               "erf": torch.erf, "sigmoid": torch.sigmoid, "silu": F.silu}
UNARY_NUMERIC = {"neg": torch.neg, "abs": torch.abs, "relu": torch.relu}


@covers(*UNARY_FLOAT, *UNARY_NUMERIC)
@pytest.mark.parametrize("op", [*UNARY_FLOAT, *UNARY_NUMERIC])
@given(data=st.data())
def test_unary(op, data):
    numeric = op in UNARY_NUMERIC
    dt = data.draw(st.one_of(FLOATS, INTS) if numeric else FLOATS, label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), label="shape")
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, dt, special=data.draw(st.booleans()) and dt.is_float)
    fn = {**UNARY_FLOAT, **UNARY_NUMERIC}[op]
    (got,) = run_op(op, [x])
    check(got, fn(T(x)), what=op)


@covers("gelu")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@given(data=st.data())
def test_gelu(approximate, data):
    # no inf inputs: torch's gelu(+-inf) is nan while the function's limits are +inf and 0
    dt = data.draw(FLOATS)
    x = rand(np.random.default_rng(data.draw(SEEDS)), data.draw(hnp.array_shapes(max_dims=3)), dt, -6, 6)
    (got,) = run_op("gelu", [x], {"approximate": approximate})
    check(got, F.gelu(T(x), approximate=approximate))


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
          "minimum": torch.minimum, "div": torch.div, "pow": torch.pow}
COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


@covers(*BINARY, *COMPARE)
@pytest.mark.parametrize("op", [*BINARY, *COMPARE])
@given(data=st.data())
def test_binary_broadcasting(op, data):
    ints_ok = op not in ("div",)
    dt = data.draw(st.one_of(FLOATS, INTS) if ints_ok else FLOATS, label="dtype")
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=0,
                                                         max_side=4), label="shapes").input_shapes
    rng = np.random.default_rng(data.draw(SEEDS))
    special = dt.is_float and data.draw(st.booleans())
    lo, hi = (0, 4) if op == "pow" and dt.is_int else (-3, 3)  # torch and numpy refuse negative int powers
    a, b = (rand(rng, s, dt, lo, hi, special) for s in shapes)
    if op in COMPARE and dt.is_float:  # ties matter for comparisons
        a, b = (np.round(v.astype(np.float32) * 2).astype(dt.numpy) / 2 for v in (a, b))
    (got,) = run_op(op, [a, b])
    fn = {**BINARY, **COMPARE}[op]
    check(got, fn(T(a), T(b)), what=op)


@covers("logical_and", "logical_or", "logical_not")
@pytest.mark.parametrize("op", ["logical_and", "logical_or", "logical_not"])
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3), seed=SEEDS)
def test_logical(op, shapes, seed):
    rng = np.random.default_rng(seed)
    a, b = (rand(rng, s, DType.bool) for s in shapes.input_shapes)
    if op == "logical_not":
        (got,) = run_op(op, [a])
        check(got, torch.logical_not(T(a)))
    else:
        (got,) = run_op(op, [a, b])
        check(got, getattr(torch, op)(T(a), T(b)))


@covers("where")
@given(data=st.data())
def test_where(data):
    dt = data.draw(st.one_of(FLOATS, INTS))
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3)).input_shapes
    rng = np.random.default_rng(data.draw(SEEDS))
    c, a, b = rand(rng, shapes[0], DType.bool), rand(rng, shapes[1], dt), rand(rng, shapes[2], dt)
    (got,) = run_op("where", [c, a, b])
    check(got, torch.where(T(c), T(a), T(b)))


@covers("clip")
@given(data=st.data())
def test_clip(data):
    dt = data.draw(st.one_of(FLOATS, INTS))
    x = rand(np.random.default_rng(data.draw(SEEDS)), data.draw(hnp.array_shapes(max_dims=3)), dt,
             special=dt.is_float)
    bound = st.none() | (st.integers(-3, 3) if dt.is_int else st.floats(-3, 3, width=16))
    lo, hi = data.draw(bound), data.draw(bound)  # lo > hi is allowed: everything becomes hi
    (got,) = run_op("clip", [x], {"min": lo, "max": hi})
    want = T(x) if lo is None and hi is None else torch.clamp(T(x), lo, hi)
    check(got, want)


CASTS = [(DType.f32, DType.i32), (DType.f32, DType.i64), (DType.f32, DType.i8), (DType.f16, DType.i64),
         (DType.bf16, DType.i32), (DType.f32, DType.f16), (DType.f32, DType.bf16), (DType.f16, DType.f32),
         (DType.bf16, DType.f16), (DType.f32, DType.bool), (DType.i64, DType.bool), (DType.bool, DType.f32),
         (DType.i64, DType.f32), (DType.i32, DType.i64), (DType.i64, DType.i8), (DType.f32, DType.f8e4m3),
         (DType.f32, DType.u8)]


@covers("cast")
@pytest.mark.parametrize("src,dst", CASTS, ids=[f"{a}->{b}" for a, b in CASTS])
@given(shape=hnp.array_shapes(max_dims=3), seed=SEEDS)
def test_cast(src, dst, shape, seed):
    rng = np.random.default_rng(seed)
    if dst is DType.f8e4m3:  # beyond +-448 saturates (and so do the infinities) in torch
        x = rand(rng, shape, src, -1000, 1000, special=True)
    elif dst is DType.u8:
        x = rand(rng, shape, src, 0, 255)  # negative floats to u8 are undefined in C and torch
    elif src.is_float and dst.is_int:
        x = rand(rng, shape, src, -100, 100)  # fractions of both signs: truncation toward zero
    elif src.is_float:
        x = rand(rng, shape, src, -1e4, 1e4, special=True)
    else:
        x = rand(rng, shape, src, -300, 300)  # i64 -> i8 wraps
    if src.is_float and dst is DType.bool:
        x[..., :1] = 0
    (got,) = run_op("cast", [x], {"dtype": dst})
    check(got, T(x).to(dtype_to_torch(dst)), tol=0.0, what=f"{src}->{dst}")


# -- reductions ----------------------------------------------------------------------------------
def torch_reduce(op, x: torch.Tensor, axes, keepdims):
    if not axes:  # [] reduces nothing in the IR; torch's dim=[] would reduce everything
        return x
    if op == "prod":  # torch.prod takes one dim at a time
        for a in sorted((a % x.ndim for a in axes), reverse=True):
            x = torch.prod(x, a, keepdim=keepdims)
        return x
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}[op]
    return fn(x, dim=list(axes), keepdim=keepdims)


@covers("sum", "mean", "max", "min", "prod")
@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "prod"])
@given(data=st.data())
def test_reduce(op, data):
    dt = data.draw(FLOATS if op == "mean" else st.one_of(FLOATS, INTS))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(0, rank - 1), unique=True))
    axes = [a - rank if data.draw(st.booleans()) else a for a in axes]
    keepdims = data.draw(st.booleans())
    lo, hi = (-1.5, 1.5) if op == "prod" else (-3, 3)
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, dt, lo, hi, special=data.draw(st.booleans()))
    (got,) = run_op(op, [x], {"axes": axes, "keepdims": keepdims})
    want = torch_reduce(op, T(x), axes, keepdims)
    # torch sums/products of ints widen to i64; the IR keeps the dtype (wrapping, like a cast back)
    check(got, want.to(dtype_to_torch(dt)), what=f"{op} {axes}")


def test_bf16_sum_accumulates_in_f32():
    x = np.ones(1000, DType.bf16.numpy)  # a bf16 accumulator saturates at 256
    (got,) = run_op("sum", [x], {"axes": [0]})
    assert float(got) == 1000.0


def test_reduce_of_a_scalar_and_repeated_axes():
    x = np.array(3.5, np.float32)
    (got,) = run_op("sum", [x], {"axes": [0]})
    check(got, torch.sum(T(x), dim=0))
    with pytest.raises(ValueError, match=r"axes \[1, -1\] name an axis more than once"):
        run_op("sum", [np.zeros((2, 3), np.float32)], {"axes": [1, -1]})


@covers("argmax")
@given(data=st.data())
def test_argmax(data):
    dt = data.draw(st.one_of(FLOATS, INTS))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    keepdims = data.draw(st.booleans())
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, dt, -2, 2)  # few distinct values: ties
    if dt.is_float:
        x = np.round(x.astype(np.float32)).astype(dt.numpy)
        if data.draw(st.booleans()):
            x.reshape(-1)[0] = np.nan  # nan counts as the maximum
    (got,) = run_op("argmax", [x], {"axis": axis, "keepdims": keepdims})
    check(got, torch.argmax(T(x), dim=axis, keepdim=keepdims))


@covers("cumsum")
@given(data=st.data())
def test_cumsum(data):
    src = data.draw(st.one_of(FLOATS, INTS, st.just(DType.bool)))
    dst = data.draw(st.sampled_from([DType.f32, DType.i64, DType.i32] + ([src] if src is not DType.bool else [])))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, src)
    (got,) = run_op("cumsum", [x], {"axis": axis, "dtype": dst})
    check(got, torch.cumsum(T(x), dim=axis, dtype=dtype_to_torch(dst)))


# -- linear algebra ------------------------------------------------------------------------------
@covers("matmul")
@given(data=st.data())
def test_matmul(data):
    dt = data.draw(st.one_of(FLOATS, INTS))
    batch = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3)).input_shapes
    m, k, n = (data.draw(st.integers(1, 6)) for _ in range(3))
    rng = np.random.default_rng(data.draw(SEEDS))
    a, b = rand(rng, (*batch[0], m, k), dt), rand(rng, (*batch[1], k, n), dt)
    (got,) = run_op("matmul", [a, b])
    check(got, torch.matmul(T(a), T(b)))


@covers("linear")
@given(data=st.data())
def test_linear(data):
    dt = data.draw(FLOATS)
    lead = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
    k, n = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(SEEDS))
    x, w = rand(rng, (*lead, k), dt), rand(rng, (n, k), dt)
    args = [x, w] + ([rand(rng, (n,), dt)] if data.draw(st.booleans()) else [])
    (got,) = run_op("linear", args)
    check(got, F.linear(*map(T, args)))


# -- data movement -------------------------------------------------------------------------------
ANY_DTYPE = st.sampled_from([DType.f32, DType.bf16, DType.i64, DType.bool])


@covers("reshape")
@given(data=st.data())
def test_reshape(data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=4))
    dims = data.draw(st.permutations(list(shape)))
    new = []  # merge random neighbours of a permuted shape: same element count, different layout
    for d in dims:
        if new and data.draw(st.booleans()):
            new[-1] *= d
        else:
            new.append(d)
    new += [1] * data.draw(st.integers(0, 1))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("reshape", [x], {"shape": new})
    check(got, torch.reshape(T(x), new))


@covers("permute")
@given(data=st.data())
def test_permute(data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=4))
    perm = data.draw(st.permutations(range(len(shape))))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("permute", [x], {"perm": perm})
    check(got, torch.permute(T(x), perm))


@covers("slice")
@given(data=st.data())
def test_slice(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=7))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(0, n))
    step = data.draw(st.integers(1, 3))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("slice", [x], {"axis": axis, "start": start, "end": end, "step": step})
    want = T(x)[(slice(None),) * (axis % len(shape)) + (slice(start, end, step),)]
    check(got, want)
    if step == 1 and end >= start:
        check(got, T(x).narrow(axis, start, end - start))


@covers("concat")
@given(data=st.data())
def test_concat(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    dt = data.draw(ANY_DTYPE)
    rng = np.random.default_rng(data.draw(SEEDS))
    xs = []
    for _ in range(data.draw(st.integers(1, 4))):
        s = list(shape)
        s[axis] = data.draw(st.integers(0, 3))
        xs.append(rand(rng, s, dt))
    (got,) = run_op("concat", xs, {"axis": axis})
    check(got, torch.cat([T(x) for x in xs], dim=axis))


@covers("split")
@given(data=st.data())
def test_split(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes, left = [], shape[axis]
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    if data.draw(st.booleans()):
        sizes.insert(data.draw(st.integers(0, len(sizes))), 0)
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    got = run_op("split", [x], {"axis": axis, "sizes": sizes})
    want = torch.split(T(x), sizes, dim=axis)
    assert len(got) == len(want) == len(sizes)
    for g, w in zip(got, want):
        check(g, w)


@covers("expand_dims")
@given(data=st.data())
def test_expand_dims(data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("expand_dims", [x], {"axis": axis})
    check(got, torch.unsqueeze(T(x), axis))


@covers("squeeze")
@given(data=st.data())
def test_squeeze(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3))
    ones = [i for i, d in enumerate(shape) if d == 1]
    axes = data.draw(st.lists(st.sampled_from(ones), unique=True)) if ones else []
    axes = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("squeeze", [x], {"axes": axes})
    check(got, torch.squeeze(T(x), tuple(axes)) if axes else T(x))


@covers("broadcast_to")
@given(data=st.data())
def test_broadcast_to(data):
    target = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    keep = data.draw(st.integers(0, len(target)))
    shape = [1 if data.draw(st.booleans()) else d for d in target[len(target) - keep:]]
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, data.draw(ANY_DTYPE))
    (got,) = run_op("broadcast_to", [x], {"shape": list(target)})
    check(got, torch.broadcast_to(T(x), target))


@covers("take")
@given(data=st.data())
def test_take(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    ax, n = axis % len(shape), shape[axis]
    ishape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
    rng = np.random.default_rng(data.draw(SEEDS))
    idx = rng.integers(-n, n, ishape).astype(data.draw(INTS).numpy)
    x = rand(rng, shape, data.draw(ANY_DTYPE))
    (got,) = run_op("take", [x, idx], {"axis": axis})
    # torch advanced indexing with one index tensor at `axis` is numpy.take (negatives count from the end)
    check(got, T(x)[(slice(None),) * ax + (torch.from_numpy(idx).long(),)])
    if idx.ndim == 0:
        check(got, T(x).select(axis, int(idx)))
    elif idx.ndim == 1:
        check(got, torch.index_select(T(x), axis, torch.from_numpy(idx % n).long()))


@covers("gather")
@given(data=st.data())
def test_gather(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    ax = axis % len(shape)
    # torch.gather reads only index's extent of the other dims: index may be smaller there
    ishape = [data.draw(st.integers(0, 4)) if i == ax else data.draw(st.integers(min(d, 1), d))
              for i, d in enumerate(shape)]
    rng = np.random.default_rng(data.draw(SEEDS))
    idx = rng.integers(0, shape[ax], ishape).astype(data.draw(INTS).numpy)
    x = rand(rng, shape, data.draw(ANY_DTYPE))
    (got,) = run_op("gather", [x, idx], {"axis": axis})
    check(got, torch.gather(T(x), axis, torch.from_numpy(idx).long()))


@covers("index")
@given(data=st.data())
def test_index(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    k = data.draw(st.integers(1, len(shape)))
    ishapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=k, max_dims=2, max_side=3)).input_shapes
    rng = np.random.default_rng(data.draw(SEEDS))
    idx = [rng.integers(-shape[i], shape[i], s).astype(data.draw(INTS).numpy) for i, s in enumerate(ishapes)]
    x = rand(rng, shape, data.draw(ANY_DTYPE))
    (got,) = run_op("index", [x, *idx])
    check(got, T(x)[tuple(torch.from_numpy(i).long() for i in idx)])


def test_index_checks_ranges():
    with pytest.raises(interpreter.InterpreterError, match=r"index\(\.\.\.\).*index out of range for dim of size 3"):
        run_op("index", [np.zeros((3, 2), np.float32), np.array([3])])
    with pytest.raises(interpreter.InterpreterError, match=r"gather index out of range \[0, 2\)"):
        run_op("gather", [np.zeros((3, 2), np.float32), np.array([[-1]])], {"axis": 1})


# -- neural-network ops --------------------------------------------------------------------------
@covers("softmax", "log_softmax")
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@given(data=st.data())
def test_softmax(op, data):
    dt = data.draw(FLOATS)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = rand(np.random.default_rng(data.draw(SEEDS)), shape, dt, -8, 8)
    if data.draw(st.booleans()):
        x[..., 0] = -np.inf  # masked positions; whole rows when the last dim is 1 (nan, as in torch)
    (got,) = run_op(op, [x], {"axis": axis})
    check(got, getattr(F, op)(T(x), dim=axis))


def _norm_case(data):
    """A norm test's (dtype, x, rng, normalised tail shape, ndim, eps)."""
    dt = data.draw(FLOATS)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    ndim = data.draw(st.integers(1, len(shape)))
    eps = data.draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    rng = np.random.default_rng(data.draw(SEEDS))
    x = rand(rng, shape, dt, -4, 4)
    tail = shape[len(shape) - ndim:]
    return dt, x, rng, tail, ndim, eps


@covers("layer_norm")
@given(data=st.data())
def test_layer_norm(data):
    dt, x, rng, tail, ndim, eps = _norm_case(data)
    w = rand(rng, tail, dt) if data.draw(st.booleans()) else None
    b = rand(rng, tail, dt) if w is not None and data.draw(st.booleans()) else None
    args = [a for a in (x, w, b) if a is not None]
    (got,) = run_op("layer_norm", args, {"eps": eps, "ndim": ndim})
    want = F.layer_norm(T(x), tail, None if w is None else T(w), None if b is None else T(b), eps)
    # f32: normalising divides by a std computed from a sum, so allow a few ulps more than one rounding
    check(got, want, tol=5e-5 if dt is DType.f32 else None)


@covers("rms_norm")
@given(data=st.data())
def test_rms_norm(data):
    dt, x, rng, tail, ndim, eps = _norm_case(data)
    w = rand(rng, tail, dt) if data.draw(st.booleans()) else None
    (got,) = run_op("rms_norm", [x] + ([w] if w is not None else []), {"eps": eps, "ndim": ndim})
    check(got, F.rms_norm(T(x), list(tail), None if w is None else T(w), eps))


@covers("embedding")
@given(data=st.data())
def test_embedding(data):
    dt = data.draw(FLOATS)
    vocab, dim = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    ishape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    rng = np.random.default_rng(data.draw(SEEDS))
    w = rand(rng, (vocab, dim), dt)
    ids = rng.integers(0, vocab, ishape).astype(data.draw(INTS).numpy)
    (got,) = run_op("embedding", [w, ids])
    check(got, F.embedding(torch.from_numpy(ids), T(w)))


@covers("sdpa")
@given(data=st.data())
def test_sdpa(data):
    dt = data.draw(FLOATS)
    batch = data.draw(st.sampled_from([(), (2,), (1, 2)]))
    hk = data.draw(st.integers(1, 2))
    hq = hk * data.draw(st.sampled_from([1, 2, 3]))  # hq > hk: grouped-query attention
    L, S, E, Ev = (data.draw(st.integers(1, 5)) for _ in range(4))
    rng = np.random.default_rng(data.draw(SEEDS))
    q, k, v = rand(rng, (*batch, hq, L, E), dt), rand(rng, (*batch, hk, S, E), dt), rand(rng, (*batch, hk, S, Ev), dt)
    kind = data.draw(st.sampled_from(["none", "causal", "bool", "float"]))
    scale = data.draw(st.none() | st.sampled_from([0.5, 1.0]))
    args, attrs, kw = [q, k, v], {"is_causal": kind == "causal", "scale": scale}, {}
    if kind in ("bool", "float"):
        full = (*batch, hq, L, S)
        mshape = [1 if data.draw(st.booleans()) else d for d in full][data.draw(st.integers(0, 2)):]
        # bool masks may hide every key from a query: torch then gives zeros for that row
        m = rng.random(mshape) < 0.7 if kind == "bool" else rand(rng, mshape, dt, -2, 2)
        if kind == "float" and m.size and data.draw(st.booleans()):
            m[..., 0] = -np.inf
        args.append(m)
        kw["attn_mask"] = T(m)
    (got,) = run_op("sdpa", args, attrs)
    want = F.scaled_dot_product_attention(T(q), T(k), T(v), is_causal=kind == "causal", scale=scale,
                                          enable_gqa=hq != hk, **kw)
    check(got, want)


def test_sdpa_fully_masked_rows_are_zero_and_causal_is_top_left():
    rng = np.random.default_rng(0)
    q, k, v = (rand(rng, (2, 4, 3), DType.f32) for _ in range(3))
    mask = np.ones((4, 4), bool)
    mask[1] = False
    (got,) = run_op("sdpa", [q, k, v, mask])
    assert np.all(got[:, 1] == 0) and np.all(np.isfinite(got))
    check(got, F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=T(mask)))
    # L != S: query i sees keys 0..i, as torch's is_causal does
    (got,) = run_op("sdpa", [q[:, :2], k, v], {"is_causal": True})
    check(got, F.scaled_dot_product_attention(T(q[:, :2]), T(k), T(v), is_causal=True))
    check(got, F.scaled_dot_product_attention(T(q[:, :2]), T(k), T(v), attn_mask=torch.ones(2, 4).tril().bool()))


def test_sdpa_mask_must_broadcast_to_the_logits():
    q = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(Exception, match=r"mask bool\[2, 1, 3, 3\] must broadcast to the attention logits "
                                        r"\[1, 2, 3, 3\]"):
        run_op("sdpa", [q, q, q, np.ones((2, 1, 3, 3), bool)])


# -- creation ------------------------------------------------------------------------------------
@covers("const")
@given(data=st.data())
def test_const(data):
    dt = data.draw(st.sampled_from([DType.f32, DType.f16, DType.bf16, DType.i64, DType.i32, DType.bool]))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
    value = rand(np.random.default_rng(data.draw(SEEDS)), shape, DType.f32, -5, 5)
    (got,) = run_op("const", [], {"value": value, "dtype": dt})
    check(got, torch.from_numpy(value).to(dtype_to_torch(dt)), tol=0.0)


@covers("arange")
@given(start=st.integers(-5, 5), end=st.integers(-5, 10), step=st.integers(-3, 3),
                            dtype=st.sampled_from([DType.i64, DType.i32, DType.f32]))
def test_arange(start, end, step, dtype):
    assume(step != 0)
    (got,) = run_op("arange", [], {"start": start, "end": end, "step": step, "dtype": dtype})
    if (end - start) * step < 0:  # torch refuses a step pointing away from end; the IR range is empty
        assert got.shape == (0,)
        return
    check(got, torch.arange(start, end, step, dtype=dtype_to_torch(dtype)), tol=0.0)


@covers("full")
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                          value=st.one_of(st.integers(-9, 9), st.floats(-1e3, 1e3, width=32), st.booleans(),
                                          st.sampled_from([math.inf, -math.inf])),
                          dtype=st.sampled_from([DType.f32, DType.f16, DType.bf16, DType.i64, DType.bool]))
def test_full(shape, value, dtype):
    assume(not (dtype.is_int and isinstance(value, float) and math.isinf(value)))
    (got,) = run_op("full", [], {"shape": list(shape), "value": value, "dtype": dtype})
    check(got, torch.full(shape, value, dtype=dtype_to_torch(dtype)), tol=0.0)


# -- fused ops: each against the torch composition it stands for ---------------------------------
TORCH_ACT = {"none": lambda t: t, "relu": torch.relu, "gelu": F.gelu,
             "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh,
             "sigmoid": torch.sigmoid}


@covers("fused.linear_act", "fused.matmul_act")
@pytest.mark.parametrize("op", ["fused.linear_act", "fused.matmul_act"])
@pytest.mark.parametrize("act", sorted(TORCH_ACT))
@given(data=st.data())
def test_fused_gemm(op, act, data):
    dt = data.draw(FLOATS, label="dtype")
    # the IR's matmul wants rank >= 2 operands; linear also takes a vector
    lead = data.draw(hnp.array_shapes(min_dims=0 if op == "fused.linear_act" else 1, max_dims=3, max_side=3),
                     label="lead")
    k, n = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(SEEDS))
    x = rand(rng, (*lead, k), dt)
    w = rand(rng, (n, k) if op == "fused.linear_act" else (k, n), dt)
    b = rand(rng, (n,), dt) if data.draw(st.booleans(), label="bias") else None
    (got,) = run_op(op, [x, w] + ([b] if b is not None else []), {"act": act})
    if op == "fused.linear_act":
        y = F.linear(T(x), T(w), None if b is None else T(b))
    else:
        y = torch.matmul(T(x), T(w))
        y = y if b is None else y + T(b)
    # the activation reads the GEMM's rounded result on both sides; its slope (<= 1.13) can turn the GEMM's
    # one-rounding difference into a little more than one unit, so low precision gets two
    check(got, TORCH_ACT[act](y), tol=None if dt is DType.f32 else 2 * TOL[dt], what=f"{op}{{act={act}}}")


@covers("fused.linear_glu")
@pytest.mark.parametrize("act", sorted(TORCH_ACT))
@given(data=st.data())
def test_fused_linear_glu(act, data):
    dt = data.draw(FLOATS, label="dtype")
    lead = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=3), label="lead")
    k, f = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(SEEDS))
    x, w = rand(rng, (*lead, k), dt), rand(rng, (2 * f, k), dt)
    b = rand(rng, (2 * f,), dt) if data.draw(st.booleans(), label="bias") else None
    (got,) = run_op("fused.linear_glu", [x, w] + ([b] if b is not None else []), {"act": act})
    gate, up = F.linear(T(x), T(w), None if b is None else T(b)).chunk(2, dim=-1)
    want = TORCH_ACT[act](gate) * up
    # two roundings meet in the product (activation of the gate, then the multiply); and each GEMM output is
    # off by up to k * eps * sum|x_i w_i| (the two sides sum in different orders), which the product scales
    # by |act(gate)| (the up error) and by |up| * |act'| <= 1.13 |up| (the gate error): a cancelled up or
    # gate leaves an error far above tol * |result|
    sums = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        sums = sums + np.abs(b.astype(np.float64))
    eps = k * float(np.finfo(np.float32).eps if dt is DType.f32 else TOL[dt])
    act_gate = np.abs(TORCH_ACT[act](gate).double().numpy())
    extra = eps * (act_gate * sums[..., f:] + 1.13 * np.abs(up.double().numpy()) * sums[..., :f])
    check(got, want, tol=3 * TOL[dt], what=f"fused.linear_glu{{act={act}}}", extra=extra)


@covers("fused.add_rms_norm", "fused.add_layer_norm")
@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
@given(data=st.data())
def test_fused_add_norm(norm, data):
    dt = data.draw(FLOATS, label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), label="shape")
    # the residual broadcasts into x (never x into something larger): a suffix of x's shape, some dims 1
    keep = data.draw(st.integers(0, len(shape)))
    rshape = tuple(d if data.draw(st.booleans()) else 1 for d in shape[len(shape) - keep:])
    ndim = data.draw(st.integers(1, len(shape)))
    eps = data.draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    rng = np.random.default_rng(data.draw(SEEDS))
    x, r = rand(rng, shape, dt, -4, 4), rand(rng, rshape, dt, -4, 4)
    tail = shape[len(shape) - ndim:]
    w = rand(rng, tail, dt) if data.draw(st.booleans()) else None
    b = rand(rng, tail, dt) if norm == "layer_norm" and w is not None and data.draw(st.booleans()) else None
    args = [a for a in (x, r, w, b) if a is not None]
    got_sum, got = run_op(f"fused.add_{norm}", args, {"eps": eps, "ndim": ndim})
    s = T(x) + T(r)
    check(got_sum, s, what="sum")
    tw, tb = (None if a is None else T(a) for a in (w, b))
    want = (F.rms_norm(s, list(tail), tw, eps) if norm == "rms_norm" else F.layer_norm(s, tail, tw, tb, eps))
    # as test_layer_norm: f32 normalising divides by a std computed from a sum, a few ulps more than one rounding
    check(got, want, tol=5e-5 if dt is DType.f32 else None, what=norm)


# expression trees for fused.elementwise: (text, torch function of the operand tensors)
EW_UNARY = {"exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "neg": torch.neg,
            "abs": torch.abs, "relu": torch.relu, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf,
            "gelu{approximate=tanh}": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu,
            "clip{min=-1.0, max=0.5}": lambda t: torch.clamp(t, -1.0, 0.5)}
EW_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
             "minimum": torch.minimum}


def ew_trees(n_operands: int, dtype: DType):
    leaves = st.integers(0, n_operands - 1).map(lambda i: (f"%{i}", lambda xs, i=i: xs[i]))
    other = DType.f16 if dtype is not DType.f16 else DType.f32
    tdt, tother = dtype_to_torch(dtype), dtype_to_torch(other)

    def extend(inner):
        def unary(p):
            (name, fn), (text, f) = p
            return f"{name}({text})", lambda xs: fn(f(xs))

        def binary(p):
            name, (ta, fa), (tb, fb) = p
            return f"{name}({ta}, {tb})", lambda xs: EW_BINARY[name](fa(xs), fb(xs))

        def where(p):
            (ta, fa), (tb, fb), (tc, fc) = p
            return f"where(gt({ta}, {tb}), {tb}, {tc})", lambda xs: torch.where(fa(xs) > fb(xs), fb(xs), fc(xs))

        def round_trip(p):  # a cast out of the dtype and back: the value is rounded through `other`
            text, f = p
            return (f"cast{{dtype={dtype}}}(cast{{dtype={other}}}({text}))",
                    lambda xs: f(xs).to(tother).to(tdt))

        return st.one_of(st.tuples(st.sampled_from(sorted(EW_UNARY.items())), inner).map(unary),
                         st.tuples(st.sampled_from(sorted(EW_BINARY)), inner, inner).map(binary),
                         st.tuples(inner, inner, inner).map(where), inner.map(round_trip))

    return st.recursive(leaves, extend, max_leaves=5)


@covers("fused.elementwise")
@given(data=st.data())
def test_fused_elementwise(data):
    dt = data.draw(st.sampled_from([DType.f32, DType.f16]), label="dtype")
    k = data.draw(st.integers(1, 3), label="operands")
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=k, max_dims=3, max_side=4),
                       label="shapes").input_shapes
    text, fn = data.draw(ew_trees(k, dt), label="expr")
    for i in range(k):  # every operand must be used
        if re.search(rf"%{i}\b", text) is None:
            text, fn = f"add({text}, %{i})", (lambda f, i: lambda xs: f(xs) + xs[i])(fn, i)
    rng = np.random.default_rng(data.draw(SEEDS))
    xs = [rand(rng, s, dt) for s in shapes]
    (got,) = run_op("fused.elementwise", xs, {"expr": text})
    want = fn([T(a) for a in xs])
    want = want.expand(torch.broadcast_shapes(*(a.shape for a in xs))) if tuple(want.shape) != got.shape else want
    # every op rounds to the dtype on both sides; a transcendental may round one unit apart and later ops
    # (at most 5 leaves deep) carry that on with slopes near 1, so f16 gets a few units
    check(got, want, tol=None if dt is DType.f32 else 8 * TOL[dt], what=text)


# -- KV cache ------------------------------------------------------------------------------------
@covers("kv.append", "kv.attention")
@given(data=st.data())
def test_kv_append_and_attention(data):
    from llmasos.frontends import kv_ops  # noqa: F401  (registers torch.ops.llmasos)
    dt = data.draw(FLOATS, label="dtype")
    b, hkv, rep = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2, 4]))
    t, d = data.draw(st.integers(1, 4), label="T"), data.draw(st.integers(1, 5), label="D")
    m = t + data.draw(st.integers(0, 4), label="M - T")
    rng = np.random.default_rng(data.draw(SEEDS))
    pos = rng.integers(0, m - t + 1, b).astype(data.draw(st.sampled_from([np.int32, np.int64]), label="pos"))
    cache, new = rand(rng, (b, hkv, m, d), dt), rand(rng, (b, hkv, t, d), dt)
    (appended,) = run_op("kv.append", [cache, new, pos])
    check(appended, torch.ops.llmasos.kv_append(T(cache), T(new), T(pos)), tol=0.0, what="kv.append")
    q, vc = rand(rng, (b, hkv * rep, t, d), dt), rand(rng, (b, hkv, m, d), dt)
    scale = data.draw(st.sampled_from([0.125, 0.5, 1.0]), label="scale")
    (got,) = run_op("kv.attention", [q, appended, vc, pos], {"scale": scale})
    check(got, torch.ops.llmasos.kv_attention(T(q), T(appended), T(vc), T(pos), scale), what="kv.attention")


@covers("kv.paged_append", "kv.paged_attention", "kv.ragged_attention")
@given(data=st.data())
def test_kv_paged_ops_equal_torch_and_the_contiguous_ops(data):
    """kv.paged_append / kv.paged_attention over a scattered block table (random block size, lengths, rows,
    GQA) equal their torch ops, and the contiguous kv.append / kv.attention on the same sequences; so does
    kv.ragged_attention of the same queries packed as one row of tokens."""
    from llmasos.frontends import kv_ops  # noqa: F401  (registers torch.ops.llmasos)
    from tests.paged_util import gather, scatter, scattered_table
    dt = data.draw(FLOATS, label="dtype")
    b, hkv, rep = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2, 4]))
    bs, t, d = data.draw(st.integers(1, 5), label="BS"), data.draw(st.integers(1, 4), label="T"), \
        data.draw(st.integers(1, 5), label="D")
    mb = -(-t // bs) + data.draw(st.integers(0, 3), label="MB - min")
    m = mb * bs
    rng = np.random.default_rng(data.draw(SEEDS))
    pos = rng.integers(0, m - t + 1, b).astype(np.int32)
    cache, new = rand(rng, (b, hkv, m, d), dt), rand(rng, (b, hkv, t, d), dt)
    used = (pos + t - 1) // bs + 1
    table, nb = scattered_table(rng, b, mb, used)
    pool = scatter(cache, table, nb, bs, rng)
    (appended,) = run_op("kv.paged_append", [pool, new, pos, table])
    check(appended, torch.ops.llmasos.kv_paged_append(T(pool), T(new), T(pos), T(table)), tol=0.0,
          what="kv.paged_append")
    (want_cache,) = run_op("kv.append", [cache, new, pos])
    seen = np.arange(m)[None, :] < (pos + t)[:, None]                    # [B, M]: positions the rows hold
    got_cache = gather(appended, table, m)
    np.testing.assert_array_equal(np.where(seen[:, None, :, None], got_cache, 0),
                                  np.where(seen[:, None, :, None], want_cache, 0))
    untouched = np.setdiff1d(np.arange(nb), table[table >= 0])
    np.testing.assert_array_equal(appended[untouched], pool[untouched])
    q, vc = rand(rng, (b, hkv * rep, t, d), dt), rand(rng, (b, hkv, m, d), dt)
    vpool = scatter(vc, table, nb, bs, rng)
    scale = data.draw(st.sampled_from([0.125, 0.5, 1.0]), label="scale")
    (got,) = run_op("kv.paged_attention", [q, appended, vpool, pos, table], {"scale": scale})
    check(got, torch.ops.llmasos.kv_paged_attention(T(q), T(appended), T(vpool), T(pos), T(table), scale),
          what="kv.paged_attention")
    (contiguous,) = run_op("kv.attention", [q, want_cache, vc, pos], {"scale": scale})
    check(got, T(contiguous), tol=TOL[dt], what="kv.paged_attention vs kv.attention")
    # the same queries as one ragged row of b * t tokens (each its own position and its row's table): the rows'
    # outputs, token by token
    q_tok = np.ascontiguousarray(q.transpose(1, 0, 2, 3).reshape(1, hkv * rep, b * t, d))
    pos_tok = (pos[:, None] + np.arange(t)[None, :]).reshape(-1).astype(np.int32)
    table_tok = np.repeat(table, t, axis=0)
    (ragged,) = run_op("kv.ragged_attention", [q_tok, appended, vpool, pos_tok, table_tok], {"scale": scale})
    check(ragged, torch.ops.llmasos.kv_ragged_attention(T(q_tok), T(appended), T(vpool), T(pos_tok), T(table_tok),
                                                        scale), what="kv.ragged_attention")
    check(ragged, T(np.ascontiguousarray(got.transpose(1, 0, 2, 3).reshape(1, hkv * rep, b * t, d))), tol=TOL[dt],
          what="kv.ragged_attention vs kv.paged_attention")


@covers("fused.rope_append_attention", "fused.rope_paged_append_attention")
@pytest.mark.parametrize("paged", [False, True])
@given(data=st.data())
def test_fused_rope_append_attention(paged, data):
    """The fused decode attention equals torch's RoPE (x * cos + rotate_half(x) * sin), the torch append ops and
    attention op; its appended caches are bit for bit those of the separate ops (same dtype rules)."""
    from llmasos.frontends import kv_ops  # noqa: F401  (registers torch.ops.llmasos)
    from tests.paged_util import scattered_table
    dt = data.draw(FLOATS, label="dtype")
    b, hkv, rep = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2, 4]))
    d = 2 * data.draw(st.integers(1, 4), label="D / 2")
    rope = data.draw(st.booleans(), label="rope")
    rng = np.random.default_rng(data.draw(SEEDS))
    q, k, v = rand(rng, (b, hkv * rep, 1, d), dt), rand(rng, (b, hkv, 1, d), dt), rand(rng, (b, hkv, 1, d), dt)
    cs = [rand(rng, (b, 1, 1, d), dt, -1, 1) for _ in range(2)] if rope else []
    scale = data.draw(st.sampled_from([0.125, 0.5]), label="scale")
    if paged:
        bs, mb = data.draw(st.integers(1, 4), label="BS"), data.draw(st.integers(1, 3), label="MB")
        pos = rng.integers(0, mb * bs, b).astype(np.int32)
        table, nb = scattered_table(rng, b, mb, (pos // bs + 1).astype(int))
        kc, vc = rand(rng, (nb, hkv, bs, d), dt), rand(rng, (nb, hkv, bs, d), dt)
        extra, op, append, attend = [table], "fused.rope_paged_append_attention", "kv.paged_append", "kv.paged_attention"
    else:
        m = 1 + data.draw(st.integers(0, 4), label="M - 1")
        pos = rng.integers(0, m, b).astype(np.int32)
        kc, vc = rand(rng, (b, hkv, m, d), dt), rand(rng, (b, hkv, m, d), dt)
        extra, op, append, attend = [], "fused.rope_append_attention", "kv.append", "kv.attention"
    got, got_k, got_v = run_op(op, [q, k, v, kc, vc, pos, *extra, *cs], {"scale": scale})
    # the separate ops (each rounding to the dtype): the appended caches must be identical
    qr, kr = q, k
    if rope:
        (qr,), (kr,) = (run_op("fused.elementwise", [x, cs[0], _rotate_half(x), cs[1]],
                               {"expr": "add(mul(%0, %1), mul(%2, %3))"}) for x in (q, k))
    (want_k,), (want_v,) = run_op(append, [kc, kr, pos, *extra]), run_op(append, [vc, v, pos, *extra])
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    (want,) = run_op(attend, [qr, want_k, want_v, pos, *extra], {"scale": scale})
    np.testing.assert_array_equal(got, want)
    # and torch's: RoPE in torch, the torch append and attention ops
    tq, tk = T(q), T(k)
    if rope:
        c, s_ = T(cs[0]), T(cs[1])
        tq = tq * c + torch.cat([-tq[..., d // 2:], tq[..., :d // 2]], -1) * s_
        tk = tk * c + torch.cat([-tk[..., d // 2:], tk[..., :d // 2]], -1) * s_
    ops = torch.ops.llmasos
    tapp = ops.kv_paged_append if paged else ops.kv_append
    tkc = tapp(T(kc), tk, T(pos), *map(T, extra))
    tvc = tapp(T(vc), T(v), T(pos), *map(T, extra))
    check(got_k, tkc, what="k cache")
    check(got_v, tvc, tol=0.0, what="v cache")
    tatt = ops.kv_paged_attention if paged else ops.kv_attention
    check(got, tatt(tq, tkc, tvc, T(pos), *map(T, extra), scale), what=op)


def _rotate_half(x):
    d = x.shape[-1]
    return np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)


# -- communication ---------------------------------------------------------------------------------
@covers("dist.all_reduce", "dist.all_gather", "dist.reduce_scatter", "dist.shard", "dist.send", "dist.recv")
@given(data=st.data())
def test_collectives_over_a_simulated_group_equal_torch(data):
    """The group semantics (every rank in one process) against torch's reductions and concatenation; a
    group of one is the identity on one rank. send/recv: a two-stage pipeline hands the value over."""
    from llmasos.ir.interpreter import run_ranks
    from llmasos.ir.opset.collective import GROUP_SEMANTICS
    dt = data.draw(FLOATS, label="dtype")
    parts = data.draw(st.sampled_from([1, 2, 4]), label="parts")
    rng = np.random.default_rng(data.draw(SEEDS))
    shape = (2, 4, 3)
    xs = [rand(rng, shape, dt) for _ in range(parts)]
    op = data.draw(st.sampled_from(["sum", "max", "min"]), label="op")
    red = {"sum": lambda ts: functools.reduce(torch.add, ts), "max": lambda ts: functools.reduce(torch.maximum, ts),
           "min": lambda ts: functools.reduce(torch.minimum, ts)}[op]
    for got in GROUP_SEMANTICS["dist.all_reduce"](xs, "tp", parts, op):
        check(got, red([T(x) for x in xs]), tol=parts * TOL[dt], what="all_reduce")
    dim = data.draw(st.integers(0, 2), label="dim")
    for got in GROUP_SEMANTICS["dist.all_gather"](xs, "tp", parts, dim):
        check(got, torch.cat([T(x) for x in xs], dim), tol=0.0, what="all_gather")
    if shape[1] % parts == 0:
        for r, got in enumerate(GROUP_SEMANTICS["dist.reduce_scatter"](xs, "tp", parts, 1, op)):
            check(got, red([T(x) for x in xs]).chunk(parts, 1)[r], tol=parts * TOL[dt], what="reduce_scatter")
        for r, got in enumerate(GROUP_SEMANTICS["dist.shard"](xs, "tp", parts, 1)):
            check(got, T(xs[r]).chunk(parts, 1)[r], tol=0.0, what="shard")
    for o in ("dist.all_reduce", "dist.all_gather", "dist.reduce_scatter", "dist.shard"):
        attrs = {"axis": "tp", "parts": 1, **({"dim": dim} if o != "dist.all_reduce" else {})}
        (got,) = run_op(o, [xs[0]], attrs)
        check(got, T(xs[0]), tol=0.0, what=o)
    g = Graph("pp")
    x = g.add_input("x", TensorType(shape, dt))
    g.mesh = {"pp": 2}
    g.add_node("dist.send", [x], {"axis": "pp", "peer": 1, "tag": 1})
    y = g.add_node("dist.recv", [], {"axis": "pp", "peer": 0, "tag": 1, "shape": list(shape), "dtype": dt})
    g.set_outputs([g.add_node("neg", [y])])
    verify(g)
    per_rank = run_ranks(g, [xs[0]])
    assert per_rank[0] == [None]
    check(per_rank[1][0], -T(xs[0]), tol=0.0, what="send/recv")


# -- coverage ------------------------------------------------------------------------------------
def test_every_op_has_a_torch_test():
    # ops that test modules register for themselves (tests/backends registers 'test_square') are theirs
    ours = {name for name, op in all_ops().items() if not op.infer.__module__.startswith("tests.")}
    missing = sorted(ours - TESTED)
    assert not missing, f"ops without an interpreter-vs-torch test in {__file__}: {missing}"


@given(graphs_with_inputs(max_nodes=10))
def test_random_graphs_run(case):
    """Every op's reference semantics accept what its type rule accepts, with the promised result types."""
    g, inputs = case
    outs = interpreter.run(g, inputs)
    assert [o.dtype for o in outs] == [v.type.dtype.numpy for v in g.outputs]


# -- symbolic attrs are evaluated from the input shapes ------------------------------------------
B, S = sym("batch"), sym("seq")


def symbolic_graph() -> Graph:
    g = Graph("sym")
    g.add_symbol("batch", 1, 4)
    g.add_symbol("seq", 1, 16)
    x = g.add_input("x", TensorType((B, S, 64), DType.f32))
    flat = g.add_node("reshape", [x], {"shape": [B * S, 64]})
    head = g.add_node("slice", [x], {"axis": 1, "start": 1, "end": S}, name="head")
    pos = g.add_node("arange", [], {"end": S})
    ones = g.add_node("full", [], {"shape": [B, S], "value": 1.0, "dtype": DType.f16})
    g.set_outputs([flat, head, pos, ones])
    verify(g)
    return g


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 5), (4, 16)])
def test_symbolic_attrs_follow_the_inputs(batch, seq):
    x = np.random.default_rng(seq).standard_normal((batch, seq, 64)).astype(np.float32)
    flat, head, pos, ones = interpreter.run(symbolic_graph(), [x])
    check(flat, torch.from_numpy(x).reshape(batch * seq, 64))
    check(head, torch.from_numpy(x)[:, 1:seq])
    check(pos, torch.arange(seq))
    check(ones, torch.ones(batch, seq, dtype=torch.float16))


def test_symbolic_types_of_the_symbolic_ops():
    g = symbolic_graph()
    assert [str(v.type) for v in g.outputs] == ["f32[batch*seq, 64]", "f32[batch, seq-1, 64]", "i64[seq]",
                                                "f16[batch, seq]"]


# -- input checks --------------------------------------------------------------------------------
def two_input_graph() -> Graph:
    g = Graph("pair")
    g.add_symbol("batch", 1, 4)
    g.add_symbol("seq", 2, 16)
    a = g.add_input("a", TensorType((B, S, 8), DType.f32))
    b = g.add_input("b", TensorType((B, S, 8), DType.f32))
    g.set_outputs([g.add_node("add", [a, b])])
    return g


def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("inputs,message", [
    ([f32(2, 4)], "graph takes 2 inputs, got 1"),
    ([f32(2, 4, 8), f32(2, 4)], "input %b: expected rank 3 (f32[batch, seq, 8]), got shape [2, 4]"),
    ([f32(2, 4, 8), f32(2, 4, 7)], "input %b: dim 2 must be 8 (f32[batch, seq, 8]), got 7"),
    ([f32(2, 4, 8), f32(2, 5, 8)], "input %b: dim 1 is 'seq' (f32[batch, seq, 8]), which is 4 in input %a dim 1, got 5"),
    ([f32(2, 17, 8), f32(2, 17, 8)], "input %a: dim 1: 'seq' = 17 is outside its declared range [2, 16]"),
    ([f32(2, 1, 8), f32(2, 1, 8)], "input %a: dim 1: 'seq' = 1 is outside its declared range [2, 16]"),
    ([f32(2, 4, 8), np.zeros((2, 4, 8), np.float16)], "input %b: expected dtype f32, got float16"),
    ({"a": f32(2, 4, 8)}, "missing inputs: ['b']"),
])
def test_input_checks(inputs, message):
    with pytest.raises(ValueError) as info:
        interpreter.run(two_input_graph(), inputs)
    assert message in str(info.value)


def test_derived_input_dims():
    g = Graph("derived")
    g.add_symbol("seq")
    a = g.add_input("a", TensorType((S,), DType.f32))
    b = g.add_input("b", TensorType((S + 1,), DType.f32))
    g.set_outputs([g.add_node("concat", [a, b], {"axis": 0})])
    (out,) = interpreter.run(g, [f32(3), np.ones(4, np.float32)])
    assert out.shape == (7,) and out.sum() == 4
    with pytest.raises(ValueError, match=r"input %b: dim 0 is seq\+1 = 4 \(f32\[seq\+1\] with seq=3\), got 5"):
        interpreter.run(g, [f32(3), f32(5)])
    g2 = Graph("underived")
    g2.add_symbol("seq")
    c = g2.add_input("c", TensorType((2 * S,), DType.f32))
    g2.set_outputs([c])
    with pytest.raises(ValueError, match=r"input %c: dim 0 is 2\*seq but \['seq'\] is not the whole dim of any input"):
        interpreter.run(g2, [f32(4)])


def test_inputs_by_name_and_as_torch_tensors():
    g = two_input_graph()
    a = torch.randn(2, 3, 8)
    (out,) = interpreter.run(g, {"b": a.numpy(), "a": a})
    check(out, a + a)


def test_bf16_inputs_from_torch():
    g = Graph("bf")
    x = g.add_input("x", TensorType((3,), DType.bf16))
    g.set_outputs([g.add_node("exp", [x])])
    t = torch.tensor([0.5, 1.0, -2.0], dtype=torch.bfloat16)
    (out,) = interpreter.run(g, [t])
    assert out.dtype == ml_dtypes.bfloat16
    check(out, torch.exp(t))


def test_reference_failures_name_the_node():
    g = Graph("oob")
    w = g.add_input("w", TensorType((4, 2), DType.f32))
    ids = g.add_input("ids", TensorType((3,), DType.i64))
    g.set_outputs([g.add_node("embedding", [w, ids], loc="model.wte")])
    with pytest.raises(interpreter.InterpreterError,
                       match=r"node %v0 = embedding\(\.\.\.\) \[from model.wte\]: reference semantics failed: "
                             r"embedding ids out of range \[0, 4\)"):
        interpreter.run(g, [f32(4, 2), np.array([0, 4, 1])])


# -- quantized GEMMs: against torch dequantizing the codes itself ---------------------------------
def _torch_codes(q: np.ndarray, bits: int) -> torch.Tensor:
    t = torch.from_numpy(q.astype(np.int16) if q.dtype != ml_dtypes.float8_e4m3fn else q.astype(np.float32))
    if bits == 4:  # low nibble = even k, high nibble = odd k
        t = torch.stack([t & 15, t >> 4], dim=-1).reshape(q.shape[0], -1)
    return t.float()


@covers("quant.embedding")
@given(data=st.data())
def test_quant_embedding_is_the_dequantized_rows(data):
    """quant.embedding (a tied head's codes read as an embedding table) equals F.embedding of the torch
    dequantization; an id outside the table is an error."""
    bits = data.draw(st.sampled_from([4, 8]), label="bits")
    group = data.draw(st.sampled_from([0, 2, 4]), label="group")
    n, k = data.draw(st.integers(1, 6)), (group or 4) * data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(SEEDS))
    q = rng.integers(0, 256, (n, k // 2 if bits == 4 else k)).astype(np.uint8)
    g = 1 if group == 0 else k // group
    scale = rng.uniform(0.001, 0.1, (n, g)).astype(np.float32)
    zero = rng.uniform(0, 15, (n, g)).astype(np.float32)
    ids = rng.integers(0, n, (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))).astype(np.int64)
    attrs = {"bits": bits, "group": group}
    (got,) = run_op("quant.embedding", [q, scale, zero, ids], attrs)
    tw = (_torch_codes(q, bits) - T(zero).repeat_interleave(k // g, 1)) * T(scale).repeat_interleave(k // g, 1)
    check(got, F.embedding(torch.from_numpy(ids), tw), what="quant.embedding")
    with pytest.raises(Exception, match="out of range"):
        run_op("quant.embedding", [q, scale, zero, np.array([[n]], np.int64)], attrs)


@covers("quant.dequant", "quant.linear")
@given(data=st.data())
def test_quant_dequant_and_linear(data):
    kind = data.draw(st.sampled_from(["i8", "u8", "u4", "f8"]), label="codes")
    bits = 4 if kind == "u4" else 8
    dt = data.draw(FLOATS, label="x dtype")
    n, groups = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    group = data.draw(st.sampled_from([0, 2, 4])) if kind != "f8" else 0
    k = (group or 4) * groups
    rng = np.random.default_rng(data.draw(SEEDS))
    if kind == "i8":
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    elif kind == "u8":
        q = rng.integers(0, 256, (n, k)).astype(np.uint8)
    elif kind == "u4":
        q = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    else:
        q = rng.uniform(-400, 400, (n, k)).astype(ml_dtypes.float8_e4m3fn)
    g = 1 if group == 0 else k // group
    scale = rng.uniform(0.001, 0.1, (n, g)).astype(np.float32)
    zero = rng.uniform(0, 15, (n, g)).astype(np.float32)
    attrs = {"bits": bits, "group": group}
    (w,) = run_op("quant.dequant", [q, scale, zero], attrs)
    tw = (_torch_codes(q, bits) - T(zero).repeat_interleave(k // g, 1)) * T(scale).repeat_interleave(k // g, 1)
    check(w, tw, what="quant.dequant")
    x = rand(rng, (data.draw(st.integers(1, 3)), k), dt)
    b = rand(rng, (n,), dt) if data.draw(st.booleans(), label="bias") else None
    (got,) = run_op("quant.linear", [x, q, scale, zero] + ([b] if b is not None else []), attrs)
    # computed in f32 (the weight not rounded to x's dtype), the result in x's dtype
    want = F.linear(T(x).float(), tw.float(), None if b is None else T(b).float()).to(dtype_to_torch(dt))
    check(got, want, what="quant.linear")


@covers("quant.linear_a8")
@given(data=st.data())
def test_quant_linear_a8(data):
    n, k, m = (data.draw(st.integers(1, 8)) for _ in range(3))
    rng = np.random.default_rng(data.draw(SEEDS))
    x = rand(rng, (m, k), DType.f32)
    x[0] = 0.0 if data.draw(st.booleans(), label="zero row") else x[0]
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
    (got,) = run_op("quant.linear_a8", [x, q, ws])
    tx = T(x)
    sx = tx.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(tx / torch.where(sx > 0, sx, 1.0)), -127, 127).to(torch.int32)
    acc = (xq.to(torch.int64) @ torch.from_numpy(q).to(torch.int64).T)  # exact integer product
    check(got, acc.float() * sx * T(ws), what="quant.linear_a8")
