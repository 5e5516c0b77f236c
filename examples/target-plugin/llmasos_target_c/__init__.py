"""llmasos-target-c: LLMasOS models as portable C, compiled by the system C compiler.

A vendor of a microcontroller or DSP without an LLVM backend ships a C compiler; TVM's ``c`` code generator
writes every kernel (and the host glue the Relax VM calls) as C, and ``export_library`` hands that C to a
compiler of your choice. This package registers the target ``c`` with LLMasOS through the
``llmasos.targets`` entry point and uses only LLMasOS's public API:

    import llmasos
    cm = llmasos.compile(model, target="c", example_inputs=(ids,))       # or {"kind": "c"}
    cm.executable.source()                                                # the generated C

What the target changes (everything else is LLMasOS's generic host target):
  * schedule rules: ``FlatElementwise`` -- an injective kernel becomes one flat loop split into
    ``chunk``-element pieces (the C compiler vectorises the constant-length inner piece); reductions and
    GEMMs keep their legalised loops;
  * op lowerings: ``rms_norm`` as one kernel (sum of squares and scaling, f32 accumulation) and ``silu``
    as ``x / (1 + exp(-x))`` in one TE function, instead of the core lowerings;
  * the compiler: ``export_options`` compiles the C with ``gcc -O2 -fno-math-errno`` (``$CC`` if set) and
    a header defining what TVM's C names without defining (``half`` as the compiler's ``_Float16``,
    ``inff``); target options ``cc`` (a cross compiler) and ``cflags`` replace the defaults, e.g.
    ``dataclasses.replace(resolve_target("c"), extra={"cc": "arm-none-eabi-gcc"})``;
  * intrinsics: TVM's C code generator has no rule for some math intrinsics (``fabs``, ``exp2``...): the
    package registers C library calls for them (``tvm.tirx.op.register_intrin_lowering``, target ``c``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from llmasos.backends.tvm import Target

__all__ = ["CTarget", "FlatElementwise", "rms_norm", "silu", "HEADER"]

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include", "llmasos_target_c.h")


def _c_target() -> dict:
    return {"kind": "c"}


@dataclass(frozen=True)
class CTarget(Target):
    """TVM's C code generator, compiled by the system C compiler (options ``cc``, ``cflags``, ``chunk``)."""
    name: str = "c"
    target: dict = field(default_factory=_c_target)
    device: str = "cpu"                 # the kernels run on the host, in TVM's CPU runtime
    schedule: str = "c-simple"          # "none": legalised loops everywhere

    tvm_kinds: ClassVar[tuple] = ("c",)
    variant_key: ClassVar[Optional[str]] = "mcpu"
    host_memory: ClassVar[bool] = True
    source_kind: ClassVar[Optional[str]] = "c"

    def pipeline_stages(self) -> tuple:
        _register_intrinsics()  # at build time: a library loads where only TVM's runtime is installed
        return super().pipeline_stages()

    def schedule_rules(self) -> list:
        self.check_schedule(("c-simple",))
        return [] if self.schedule == "none" else [FlatElementwise(self.extra.get("chunk", 64))]

    def lowerings(self) -> dict:
        return {"rms_norm": rms_norm, "silu": silu}

    def export_options(self) -> dict:
        from tvm.support import cc
        # -fno-math-errno: libm calls are pure, so an inlined producer read twice is computed once
        flags = list(self.extra.get("cflags", ["-O2", "-fno-math-errno"]))
        # a C compiler, not TVM's default (g++): the generated code is C (it names variables `new`)
        compiler = self.extra.get("cc", os.environ.get("CC", "gcc"))
        return {"fcompile": functools.partial(cc.create_shared, cc=compiler),
                "options": [*flags, "-include", HEADER]}

    def measure_bandwidth(self) -> Optional[float]:
        return None  # a real board would report its memory's figure; this host's is no such board's


# ------------------------------------------------------------------------------------------------
# the schedule rule

class FlatElementwise:
    """A DLight-style rule for injective PrimFuncs (every block spatial): producers inlined into the last
    block, whose loops are fused into one flat loop split into ``chunk``-element pieces: a constant trip
    count the C compiler vectorises whatever the symbolic shape. (TVM's C code generator emits a
    ``parallel`` loop as a serial one, so there is no thread-level parallelism to ask for here.)"""

    def __init__(self, chunk: int = 64):
        self.chunk = chunk

    def is_target_available(self, target) -> bool:
        return target.kind.name == "c"

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import get_root_block
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(get_root_block(sch))
            if not blocks or any(iv.iter_type != tirx.IterVar.DataPar
                                 for b in blocks for iv in sch.get(b).iter_vars):
                return None
            for b in blocks[:-1]:
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001 -- a block feeding two consumers stays its own loop
                    pass
            for b in sch.get_child_blocks(get_root_block(sch)):
                loops = sch.get_loops(b)
                if not loops:
                    continue
                flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                sch.split(flat, [None, self.chunk])
            return sch
        except Exception:  # noqa: BLE001 -- another shape: left to the legalised loops
            return None

    def apply_config(self, func, config):
        return None


# ------------------------------------------------------------------------------------------------
# the lowerings (fn(ctx, node, args) -> Relax expression; see llmasos.backends.tvm.lowering)

def _acc(dtype: str) -> str:
    """Where LLMasOS's reference accumulates: f32 for low-precision floats."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def rms_norm(ctx, node, args):
    """x / sqrt(mean(x^2 over the last ``ndim`` dims) + eps) (* weight): one kernel, f32 accumulation."""
    from tvm import te, tirx

    from llmasos.backends.tvm import tvm_dtype  # (the compiler's half of the API: imported when building)
    x_t = node.inputs[0].type
    nd, eps = node.attrs["ndim"], node.attrs["eps"]
    out_dt = tvm_dtype(x_t.dtype)
    acc = _acc(out_dt)

    def f(x, *w):
        rank = len(x.shape)
        tail = x.shape[rank - nd:]
        axes = [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(tail)]
        count = functools.reduce(lambda a, b: a * b, tail)
        ss = te.compute(x.shape[:rank - nd], lambda *i: te.sum(
            x(*i, *axes).astype(acc) * x(*i, *axes).astype(acc), axis=axes), name="sum_sq")

        def out(*i):
            lead, t = i[:rank - nd], i[rank - nd:]
            y = x(*i).astype(acc) / tirx.sqrt(ss(*lead) / count.astype(acc) + tirx.const(eps, acc))
            if w:
                y = y * w[0](*t).astype(acc)
            return y.astype(out_dt)
        return te.compute(x.shape, out, name="rms")
    return ctx.emit_te(f, *args, name="c_rms_norm")


def silu(ctx, node, args):
    """x / (1 + exp(-x)), in f32 for low-precision floats: one TE function."""
    from tvm import te, tirx

    from llmasos.backends.tvm import tvm_dtype
    out_dt = tvm_dtype(node.inputs[0].type.dtype)
    acc = _acc(out_dt)

    def f(x):
        def body(*i):
            v = x(*i).astype(acc)
            return (v / (tirx.const(1.0, acc) + tirx.exp(-v))).astype(out_dt)
        return te.compute(x.shape, body, name="silu")
    return ctx.emit_te(f, args[0], name="c_silu")


# ------------------------------------------------------------------------------------------------
# C library calls for intrinsics TVM's C code generator leaves unresolved

_C_MATH = {"fabs": ("fabsf", "fabs"), "exp2": ("exp2f", "exp2"), "log2": ("log2f", "log2"),
           "log10": ("log10f", "log10"), "trunc": ("truncf", "trunc"), "fmod": ("fmodf", "fmod")}


@functools.lru_cache(maxsize=None)
def _register_intrinsics() -> None:
    from tvm import tirx

    def lower(f32: str, f64: str):
        def rule(op):
            dt = str(op.ty.dtype)
            fn = f32 if dt == "float32" else f64 if dt == "float64" else None
            return op if fn is None else tirx.call_pure_extern(op.ty, fn, *op.args)
        return rule
    for name, (f32, f64) in _C_MATH.items():
        tirx.op.register_intrin_lowering(f"tirx.{name}", "c", f=lower(f32, f64), level=99)
