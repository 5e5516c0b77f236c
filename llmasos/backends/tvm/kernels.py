"""How many kernels a compiled graph launches per call: ``kernel_stats(graph, target) -> dict``.

The count is read from the Relax module at the point TVM's pipeline has fused it (FuseOps + FuseTIR) and
turned view-only reshapes into ``R.reshape`` (RewriteDataflowReshape): every ``call_tir`` /
``call_dps_packed`` left in ``main`` then is one kernel launch per call (main has no control flow, so the
static count is the dynamic one). Weight preparation lifted into ``main_transform_params`` runs once at
load and is reported on its own.

The module is pipeline.fused_module's (the pipeline's fusion stage) plus RewriteDataflowReshape: the schedule
rules that come between them in a build (cpu_schedule / DLight) rewrite loops inside a PrimFunc but never
split or merge PrimFuncs, so they are left out (they are most of the pipeline's time).

Unlike build.py this module imports TVM's compiler at its top: it inspects what the compiler makes, and
nothing on an exported library's runtime path imports it.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block

from ...ir.graph import Graph
from .build import MAIN, TRANSFORMS
from .pipeline import fused_module as build_fused_module
from .targets import resolve_target

TRANSFORM = TRANSFORMS[0]   # one entry function: LiftTransformParams names it main_transform_params

# Relax ops whose call is one kernel launch (the callee: a PrimFunc GlobalVar or a packed function)
_KERNEL_OPS = ("relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad", "relax.call_dps_packed")
# packed calls to VM builtins are runtime bookkeeping (shape checks, allocation), not kernels
_PACKED_OPS = ("relax.call_pure_packed", "relax.call_packed")


def fused_module(graph: Graph, target: Any = "cpu"):
    """The Relax IRModule of ``graph`` as build() has it right after fusion and reshape-to-view rewriting."""
    spec = resolve_target(target)
    mod = build_fused_module({MAIN: graph}, spec)
    with tvm.transform.PassContext(opt_level=3), spec.tvm_target():
        return relax.transform.RewriteDataflowReshape()(mod)


def kernel_stats(graph: Graph, target: Any = "cpu") -> dict:
    """Kernel launches per call of ``main`` for ``graph`` built for ``target``.

    Returns ``{"kernels": int, "by_name": Counter(callee name without digits -> launches), "gemm": launches
    of kernels with a matmul reduction, "transform_params_kernels": launches in main_transform_params}``.
    """
    mod = fused_module(graph, target)
    calls = _kernel_calls(mod, MAIN)
    gemm_funcs = {name for name, f in _prim_funcs(mod).items() if _has_matmul_reduction(f)}
    return {
        "kernels": len(calls),
        "by_name": Counter(_strip_digits(c) for c in calls),
        "gemm": sum(1 for c in calls if c in gemm_funcs),
        "transform_params_kernels": len(_kernel_calls(mod, TRANSFORM)) if _has_func(mod, TRANSFORM) else 0,
    }


def _has_func(mod, name: str) -> bool:
    return any(gv.name_hint == name for gv in mod.functions)


def _prim_funcs(mod) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def _kernel_calls(mod, func_name: str) -> list:
    """Callee names of the kernel launches in ``func_name``, in binding order."""
    prim = set(_prim_funcs(mod))
    names = []

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            op = call.op
            if isinstance(op, tvm.ir.Op) and op.name in _KERNEL_OPS:
                names.append(_callee_name(call.args[0]))
            elif isinstance(op, tvm.ir.Op) and op.name in _PACKED_OPS:
                callee = _callee_name(call.args[0])
                if not callee.startswith("vm.builtin."):
                    names.append(callee)
            elif isinstance(op, relax.ExternFunc) and not op.global_symbol.startswith("vm.builtin."):
                names.append(op.global_symbol)
            elif isinstance(op, relax.GlobalVar) and op.name_hint in prim:
                names.append(op.name_hint)  # a direct PrimFunc call (after CallTIRRewrite)
            for a in call.args:
                self.visit_expr(a)

    _Calls().visit_expr(mod[func_name])
    return names


def _callee_name(expr) -> str:
    if isinstance(expr, relax.GlobalVar):
        return expr.name_hint
    if isinstance(expr, relax.ExternFunc):
        return expr.global_symbol
    if isinstance(expr, tvm.ir.StringImm):
        return expr.value
    return type(expr).__name__


def _strip_digits(name: str) -> str:
    # FuseTIR numbers duplicates (fused_matmul1_add2); the digit-free name groups kernels of one kind
    return re.sub(r"\d+", "", name)


def _has_matmul_reduction(func) -> bool:
    # TIR's statement visitors are not exposed to Python in TVM 0.27; the schedule's block tree is
    sch = s_tir.Schedule(func)
    todo = list(sch.get_child_blocks(get_root_block(sch)))
    while todo:
        b = todo.pop()
        block = sch.get(b)
        if "matmul" in block.name_hint and any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            return True
        todo.extend(sch.get_child_blocks(b))
    return False
