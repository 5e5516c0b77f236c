"""Tensor types of the IR: a dtype and a shape whose dims are ints or symbolic expressions.

Symbolic dims are sympy expressions over named symbols (``batch``, ``seq``): torch.export hands us
sympy already, and derived dims such as ``batch*seq`` must stay exact through reshapes.
"""
from __future__ import annotations

import ast
import enum
import functools
import itertools
from dataclasses import dataclass
from typing import Union

import ml_dtypes
import numpy as np
import sympy


class DType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f8e4m3 = "f8e4m3"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    u8 = "u8"
    i4 = "i4"  # packed two per byte in storage
    u4 = "u4"
    bool = "bool"

    def __str__(self) -> str:
        return self.value

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f8e4m3)

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32, DType.i8, DType.u8, DType.i4, DType.u4)

    @property
    def is_packed(self) -> bool:
        return self.bits < 8 and self is not DType.bool

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype values of this type are held in (unpacked for i4/u4)."""
        return np.dtype(_NUMPY[self])

    @staticmethod
    def from_numpy(dt) -> "DType":
        dt = np.dtype(dt)
        for k, v in _NUMPY.items():
            if not k.is_packed and np.dtype(v) == dt:
                return k
        raise TypeError(f"no LLMasOS dtype for numpy dtype {dt}")

    @staticmethod
    def parse(text: str) -> "DType":
        try:
            return DType(text)
        except ValueError:
            known = ", ".join(d.value for d in DType)
            raise ValueError(f"unknown dtype {text!r}; known dtypes: {known}") from None


_BITS = {DType.f32: 32, DType.f16: 16, DType.bf16: 16, DType.f8e4m3: 8, DType.i64: 64, DType.i32: 32,
         DType.i8: 8, DType.u8: 8, DType.i4: 4, DType.u4: 4, DType.bool: 8}
_NUMPY = {DType.f32: np.float32, DType.f16: np.float16, DType.bf16: ml_dtypes.bfloat16,
          DType.f8e4m3: ml_dtypes.float8_e4m3fn, DType.i64: np.int64, DType.i32: np.int32, DType.i8: np.int8,
          DType.u8: np.uint8, DType.i4: ml_dtypes.int4, DType.u4: ml_dtypes.uint4, DType.bool: np.bool_}

Dim = Union[int, sympy.Expr]


def sym(name: str) -> sympy.Symbol:
    """The symbol for a named dim. Dims are sizes, so symbols are positive integers."""
    return sympy.Symbol(name, integer=True, positive=True)


def as_dim(d) -> Dim:
    """Normalise a dim: python/numpy ints stay ints, constant expressions fold to ints."""
    if isinstance(d, (bool, np.bool_)):
        raise TypeError(f"a dim must be an int or a symbolic expression, got {d!r}")
    if isinstance(d, (int, np.integer)):
        return int(d)
    if isinstance(d, str):
        d = _dim_from_text(d)
    if isinstance(d, sympy.Expr):
        return _simplify(d)
    raise TypeError(f"a dim must be an int or a symbolic expression, got {d!r}")


@functools.lru_cache(maxsize=4096)
def _simplify(d: sympy.Expr) -> Dim:
    # sympy.simplify costs milliseconds; graphs repeat the same few dims thousands of times
    d = sympy.simplify(d) if not d.is_Atom else d
    return int(d) if d.is_Integer else d


# -- dim text (sympy's printing, e.g. from a saved signature), read without eval -------------------------------
# sympy.sympify evaluates its text as Python (an artifact's manifest could run code through it), so dim text
# is read from Python's AST, allowing only integers, names (symbols), arithmetic and these functions
_DIM_FUNCS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Min": sympy.Min, "Max": sympy.Max, "min": sympy.Min,
              "max": sympy.Max, "Mod": sympy.Mod, "FloorDiv": lambda a, b: sympy.floor(a / b)}
_DIM_TEXT_MAX = 4096           # characters
_DIM_INT_MAX = 1 << 62         # a literal, or a power's result, beyond this is not a tensor size


def _dim_from_text(text: str):
    if len(text) > _DIM_TEXT_MAX:
        raise ValueError(f"dim expression of {len(text)} characters is too long (at most {_DIM_TEXT_MAX})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        raise ValueError(f"not a dim expression: {text[:80]!r}") from None

    def bad(node):
        return ValueError(f"not a dim expression: {text[:80]!r} (only integers, symbol names, + - * / // % ** "
                          f"and {', '.join(sorted(_DIM_FUNCS))} are allowed; got {type(node).__name__})")

    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: sympy.floor(a / b), ast.Mod: sympy.Mod}

    def build(node, depth):
        if depth > 200:
            raise ValueError(f"dim expression nested too deeply: {text[:80]!r}")
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if abs(node.value) > _DIM_INT_MAX:
                raise ValueError(f"dim literal {str(node.value)[:30]} is too large (at most {_DIM_INT_MAX})")
            return sympy.Integer(node.value)
        if isinstance(node, ast.Name):
            return sym(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = build(node.operand, depth + 1)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](build(node.left, depth + 1), build(node.right, depth + 1))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exp = build(node.left, depth + 1), build(node.right, depth + 1)
            if not (exp.is_Integer and 0 <= int(exp) <= 64):
                raise ValueError(f"dim expression {text[:80]!r}: exponents must be integers in 0..64")
            if base.is_Integer and abs(int(base)) > 1 and int(exp) * abs(int(base)).bit_length() > 63:
                raise ValueError(f"dim expression {text[:80]!r}: a power beyond {_DIM_INT_MAX}")
            return base ** exp
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DIM_FUNCS
                and not node.keywords and node.args):
            return _DIM_FUNCS[node.func.id](*(build(a, depth + 1) for a in node.args))
        raise bad(node)

    try:
        d = build(tree.body, 0)
    except RecursionError:
        raise ValueError(f"dim expression nested too deeply: {text[:80]!r}") from None
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"not a dim expression: {text[:80]!r} ({e})") from None
    if d.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise ValueError(f"dim expression {text[:80]!r} divides by zero")
    if d.is_Integer and abs(int(d)) > _DIM_INT_MAX:
        raise ValueError(f"dim expression {text[:80]!r} is too large (at most {_DIM_INT_MAX})")
    return d


def dim_str(d: Dim) -> str:
    if isinstance(d, int):
        return str(d)
    return str(d).replace(" ", "")


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return _sym_equal(as_dim(a) if not isinstance(a, int) else a, as_dim(b) if not isinstance(b, int) else b)


@functools.lru_cache(maxsize=4096)
def _sym_equal(a: Dim, b: Dim) -> bool:
    diff = sympy.simplify(sympy.Integer(a) - b if isinstance(a, int) else a - b)
    if diff == 0:
        return True
    if not diff.has(sympy.floor, sympy.ceiling, sympy.Mod):
        return False
    # sympy cannot prove floor/ceiling identities such as (seq+1)//2 == ceil(seq/2): decide by
    # evaluating at every point of a small grid, which separates the integer forms our dims take
    syms = sorted(diff.free_symbols, key=lambda s: s.name)
    grid = range(1, 13) if len(syms) <= 2 else range(1, 6)
    return all(diff.subs(dict(zip(syms, vals))) == 0 for vals in itertools.product(grid, repeat=len(syms)))


def eval_dim(d: Dim, env: dict) -> int:
    """Evaluate a dim under symbol bindings {name: int}."""
    if isinstance(d, int):
        return d
    missing = {s.name for s in d.free_symbols} - set(env)
    if missing:
        raise ValueError(f"dim {dim_str(d)} uses unbound symbols {sorted(missing)}")
    v = d.subs({s: env[s.name] for s in d.free_symbols})
    if not v.is_Integer:
        raise ValueError(f"dim {dim_str(d)} evaluates to non-integer {v}")
    return int(v)


def dim_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in d.free_symbols}


@dataclass(frozen=True)
class TensorType:
    shape: tuple
    dtype: DType

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))
        if not isinstance(self.dtype, DType):
            object.__setattr__(self, "dtype", DType.parse(str(self.dtype)))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            out |= dim_symbols(d)
        return out

    def concrete(self, env: dict) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def same_as(self, other: "TensorType") -> bool:
        return (self.dtype == other.dtype and self.rank == other.rank
                and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(dim_str(d) for d in self.shape)}]"


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ValueError(f"{what} {axis} out of range for rank {rank}")
    return axis % rank if rank else 0
