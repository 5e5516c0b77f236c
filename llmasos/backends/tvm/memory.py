"""What a lowered module needs in memory at its compiled bounds, and how its intermediates are allocated.

TVM's memory planning (StaticPlanBlockMemory) sizes every intermediate of symbolic shape at the symbols'
upper bounds (the ``tir_var_upper_bound`` function attribute) and allocates that storage on every call: a
prefill compiled for ``seq <= 32768`` allocates its attention scores ``[batch, heads, 32768, 32768]`` even
for a three-token prompt (``std::bad_alloc`` on the first call). So:

* ``estimate(mod)`` walks each Relax function's bindings before the build, sizing every tensor at the
  bounds (TVM's arithmetic analyzer bounds each shape expression) and tracking which are live, for the
  peak of intermediates, next to the inputs (an LM's KV caches) and the weights;
* functions whose static plan would exceed ``static_plan_limit()`` (1 GiB, or $LLMASOS_STATIC_PLAN_LIMIT
  bytes) lose their upper bounds (``dynamic_allocation``): their intermediates are then allocated for each
  call's actual shapes (TVM's pooled allocator reuses them across calls). Functions run as CUDA graphs keep
  static planning, which capture needs;
* ``check_fits`` refuses (MemoryBudgetError) bounds whose estimate exceeds the device's memory
  ($LLMASOS_MEMORY_LIMIT bytes overrides it), naming the bound to lower.

The estimate counts what the Relax program holds (kernels' on-chip scratch is not); in-place updates
(``call_tir_inplace``: the KV append, and the aliased results of a fused one) and reshapes/views cost nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import tvm
import tvm.sym as tsym
from tvm import relax

GiB = 1 << 30
STATIC_PLAN_LIMIT = GiB
ALIASING_OPS = {"relax.call_tir_inplace", "relax.reshape", "relax.memory.view"}
USER_BOUNDS = {"batch": "max_batch", "seq": "max_seq"}   # the symbols the front doors' bounds set


class MemoryBudgetError(ValueError):
    """The compiled bounds need more memory than the device has (llmasos.MemoryBudgetError is this one, as a
    CompileError)."""


@dataclass
class FunctionMemory:
    name: str
    bounds: dict                      # symbol -> upper bound used
    inputs: int = 0                   # bytes of the function's inputs at the bounds (an LM's KV caches)
    peak: int = 0                     # peak bytes of live intermediates at the bounds
    largest: tuple = ("", "", 0)      # (var name, shape text, bytes) of the largest tensor at the bounds
    unbounded: tuple = ()             # symbols with no upper bound: sizes with them are not counted


@dataclass
class MemoryEstimate:
    params: int                                   # bytes of the weights
    functions: dict = field(default_factory=dict)  # name -> FunctionMemory
    dynamic: tuple = ()                           # functions whose intermediates are allocated per call

    @property
    def total(self) -> int:
        """Weights plus the most demanding function's inputs and peak intermediates."""
        return self.params + max((f.inputs + f.peak for f in self.functions.values()), default=0)

    def to_json(self) -> dict:
        return {"params": self.params, "total": self.total, "dynamic": list(self.dynamic),
                "functions": {n: {"inputs": f.inputs, "peak": f.peak, "largest": list(f.largest),
                                  "bounds": dict(f.bounds)} for n, f in self.functions.items()}}


def static_plan_limit() -> int:
    return _env_bytes("LLMASOS_STATIC_PLAN_LIMIT", STATIC_PLAN_LIMIT)


def device_memory(spec) -> Optional[int]:
    """Bytes of memory of ``spec``'s device ($LLMASOS_MEMORY_LIMIT overrides): the host's RAM for host-memory
    targets, else the device's global memory; None when it cannot tell."""
    env = _env_bytes("LLMASOS_MEMORY_LIMIT", None)
    if env is not None:
        return env
    if getattr(spec, "host_memory", False):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        dev = spec.tvm_device()
        return int(dev.total_global_memory) if dev.exist else None
    except Exception:  # noqa: BLE001 -- a device that cannot say: no check
        return None


def _env_bytes(name: str, default):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(float(v))
    except ValueError:
        raise MemoryBudgetError(f"${name} must be a number of bytes, got {v!r}") from None


def _bytes_of(ty, analyzer) -> Optional[int]:
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    n = 1
    for d in ty.shape.values:
        hi = analyzer.const_int_bound(d).max_value
        if hi >= (1 << 62):       # unbounded
            return None
        n *= max(int(hi), 0)
    bits = tvm.runtime.DataType(ty.dtype).bits * tvm.runtime.DataType(ty.dtype).lanes
    return (n * bits + 7) // 8


def _shape_text(ty) -> str:
    dims = (str(int(d.value)) if isinstance(getattr(d, "value", None), int) else str(d) for d in ty.shape.values)
    return f"{ty.dtype}[{', '.join(dims)}]"


# symbols a caller sizes at run time, not the compiled bounds: the paged KV pools' block count (the runner's
# num_blocks, llm/paged.py, which allocates them); inputs over them are left out of the estimate
RUNTIME_SIZED = frozenset({"blocks"})


def function_memory(name: str, func) -> FunctionMemory:
    attrs = func.attrs or {}
    ub = {str(k): int(v) for k, v in (attrs.get("tir_var_upper_bound") or {}).items()}
    analyzer = tsym.Analyzer()
    syms = {}
    for p in func.params:
        for v in relax.analysis.definable_tir_vars_in_type(p.ty):
            syms[v.name] = v
    for n, v in syms.items():
        if n in ub:
            analyzer.bind(v, tvm.ir.Range(0, ub[n] + 1))
    fm = FunctionMemory(name, {n: ub[n] for n in syms if n in ub}, unbounded=tuple(n for n in syms if n not in ub))
    num_input = int(attrs.get("num_input", len(func.params)))
    largest = fm.largest

    def consider(var_name, ty, b):
        nonlocal largest
        if b is not None and b > largest[2]:
            largest = (var_name, _shape_text(ty), b)

    for p in list(func.params)[:num_input]:
        if any(v.name in RUNTIME_SIZED for v in relax.analysis.definable_tir_vars_in_type(p.ty)):
            continue
        b = _bytes_of(p.ty, analyzer)
        fm.inputs += b or 0
        consider(p.name, p.ty, b)
    body = func.body
    bindings = [b for blk in body.blocks for b in blk.bindings]
    last = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            last[v] = i
    for v in relax.analysis.free_vars(body.body):
        last[v] = len(bindings)
    size = {}
    inplace = {}    # var bound to a call_tir_inplace with several results -> its inplace_indices
    live = peak = 0
    for i, b in enumerate(bindings):
        op = getattr(getattr(b.value, "op", None), "name", None)
        nbytes = _bytes_of(b.var.ty, analyzer)
        consider(b.var.name, b.var.ty, nbytes)
        if op == "relax.call_tir_inplace":
            inplace[b.var] = [int(x) for x in b.value.attrs.inplace_indices]
        if isinstance(b.value, relax.TupleGetItem) and b.value.tuple_value in inplace:
            # a result of an in-place call: an alias of its argument, unless freshly allocated (index -1)
            aliased = inplace[b.value.tuple_value][b.value.index] >= 0
            nbytes = 0 if aliased else (nbytes or 0)
        nbytes = 0 if op in ALIASING_OPS else (nbytes or 0)
        size[b.var] = nbytes
        live += nbytes
        peak = max(peak, live)
        for v in relax.analysis.free_vars(b.value):
            if last.get(v) == i and v in size:
                live -= size.pop(v)
        if b.var not in last and b.var in size:   # never used
            live -= size.pop(b.var)
    fm.peak, fm.largest = peak, largest
    return fm


def estimate(mod, param_bytes: int) -> MemoryEstimate:
    """The memory estimate of every Relax function of ``mod`` at its bounds (see the module docstring)."""
    out = MemoryEstimate(param_bytes)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out.functions[gv.name_hint] = function_memory(gv.name_hint, func)
    return out


def dynamic_allocation(mod, est: MemoryEstimate, keep_static: tuple = ()):
    """``mod`` with the upper bounds dropped from every function whose peak intermediates exceed the static
    plan limit (except ``keep_static``: CUDA-graph functions); records them in ``est.dynamic``."""
    limit = static_plan_limit()
    dynamic = tuple(n for n, f in est.functions.items() if f.peak > limit and n not in keep_static)
    for n in dynamic:
        gv = mod.get_global_var(n)
        mod[gv] = mod[gv].without_attr("tir_var_upper_bound")
    est.dynamic = dynamic
    return mod


def check_fits(est: MemoryEstimate, spec) -> None:
    """Refuse bounds whose estimate exceeds the device's memory, naming the bound to lower."""
    have = device_memory(spec)
    if have is None or est.total <= have:
        return
    fn = max(est.functions.values(), key=lambda f: f.inputs + f.peak)
    var, shape, nbytes = fn.largest
    dims = shape[shape.index("[") + 1:-1].split(", ")
    grows = [USER_BOUNDS.get(s, f"the bound of {s}") for s in sorted(fn.bounds, key=lambda s: -dims.count(s))
             if s in dims]     # the symbol the tensor grows fastest with first (seq: quadratic attention)
    lower = " or ".join(dict.fromkeys(grows)) or "max_seq or max_batch"
    bounds = ", ".join(f"{s} <= {hi}" for s, hi in fn.bounds.items())
    raise MemoryBudgetError(
        f"the compiled bounds ({bounds or 'static shapes'}) need an estimated {est.total / GiB:.2f} GiB "
        f"(weights {est.params / GiB:.2f}, '{fn.name}' inputs {fn.inputs / GiB:.2f} and intermediates "
        f"{fn.peak / GiB:.2f} at the bounds; the largest tensor is %{var}: {shape}, {nbytes / GiB:.2f} GiB), but the "
        f"{getattr(spec, 'name', 'target')} device has {have / GiB:.2f} GiB: lower {lower}")
