"""Graph -> Relax IRModule.

``main(inputs..., params...)`` returns a tuple of the graph outputs. Parameters stay function arguments
(in ``graph.params`` order), never constants, so the module is small and weights are bound at run time.
Each symbolic dim name becomes one int64 ``tir.Var`` shared by every shape that uses it; bounds from
``graph.symbols`` become the ``tir_var_upper_bound`` / ``tir_var_lower_bound`` function attributes
(memory planning uses the upper bounds).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm import tirx as tir

from ...ir.graph import Graph
from ...ir.types import TensorType, dim_str
from . import lowering_fused  # noqa: F401  (registers the fused ops' lowerings)
from . import lowering_quant  # noqa: F401  (registers the quantized GEMMs' lowerings)
from . import lowering_kv  # noqa: F401  (registers the KV-cache ops' lowerings)
from . import lowering_dist  # noqa: F401  (registers the communication ops' lowerings)
from .lowering import LowerContext, LoweringError, tvm_dtype


def lower(graph: Graph, spec=None) -> tvm.IRModule:
    """The Relax module of ``graph`` (one function, ``main``); ``spec`` (a Target) lets lowerings pick
    target-specific forms and supplies per-op overrides (``Target.lowerings``)."""
    return lower_functions({"main": graph}, spec)


def lower_functions(graphs: dict, spec=None) -> tvm.IRModule:
    """One Relax module with a function per graph, e.g. an LLM's ``prefill`` and ``decode``.

    The graphs must have the same parameters (names and types, in the same order): each function takes
    ``(inputs..., params...)``, so one set of uploaded weights serves all of them.
    """
    if not graphs:
        raise LoweringError("lower_functions needs at least one graph")
    names = list(graphs)
    first = graphs[names[0]]
    want = [(n, v.type) for n, v in first.params.items()]
    for name in names[1:]:
        got = [(n, v.type) for n, v in graphs[name].params.items()]
        if got != want:
            diff = next((f"%{a[0]}: {a[1]} vs %{b[0]}: {b[1]}" for a, b in zip(want, got) if a != b),
                        f"{len(want)} vs {len(got)} parameters")
            raise LoweringError(f"functions '{names[0]}' and '{name}' must share their parameters to share "
                                f"weights; first difference: {diff}")
    bb = relax.BlockBuilder()
    shared: dict = {}
    for name, graph in graphs.items():
        _lower_function(bb, name, graph, spec, graphs, shared)
    return bb.get()


def _lower_function(bb, fname: str, graph: Graph, spec, functions=None, shared=None) -> None:
    sym_vars = _symbol_vars(graph)
    ctx = LowerContext(bb, sym_vars, spec, graph.params.values(), graph=graph, functions=functions, shared=shared)

    def rvar(v):
        if v.type.dtype.is_packed:
            raise LoweringError(f"%{v.name}: packed dtype {v.type.dtype} is not supported by the TVM backend yet")
        return relax.Var(v.name, relax.TensorType([ctx.dim(d) for d in v.type.shape], tvm_dtype(v.type.dtype)))

    env = {}
    in_vars = []
    for v in [*graph.inputs, *graph.params.values()]:
        env[v] = rvar(v)
        in_vars.append(env[v])
    if not graph.outputs:
        raise LoweringError(f"graph '{graph.name}' has no outputs")

    with bb.function(fname, in_vars, attrs=_func_attrs(graph, sym_vars, fname)):
        with bb.dataflow():
            for node in graph.nodes:
                ctx.node = node
                fn = ctx.lowering(node.op)  # the target's override (Target.lowerings), else the core table's
                try:
                    res = fn(ctx, node, [env[i] for i in node.inputs])
                    res = list(res) if isinstance(res, (list, tuple)) else [res]
                    if len(res) != len(node.outputs):
                        raise LoweringError(f"lowering returned {len(res)} results, the op has "
                                            f"{len(node.outputs)}")
                    for out, r in zip(node.outputs, res):
                        var = r if isinstance(r, relax.Var) else bb.emit(r, name_hint=out.name)
                        _check_type(var, out.type)
                        env[out] = var
                    if _param_only(node, ctx):
                        # e.g. concat of Q/K/V weights: LiftTransformParams runs it once, at load
                        ctx.params.update(node.outputs)
                except LoweringError as e:
                    raise LoweringError(f"{node.describe()}: {e}") from e
                except Exception as e:  # TVM raises its own errors; name the node that caused them
                    raise LoweringError(f"{node.describe()}: cannot lower to Relax: "
                                        f"{type(e).__name__}: {e}") from e
            out = bb.emit_output(relax.Tuple([env[v] for v in graph.outputs]))
        bb.emit_func_output(out)


def _param_only(node, ctx) -> bool:
    """Whether a node computes from parameters (and constants) alone, with static result shapes."""
    if not node.inputs or not all(o.type.is_static for o in node.outputs):
        return False
    return all(ctx.is_param(v) or (v.producer is not None and v.producer.op == "const") for v in node.inputs) \
        and any(ctx.is_param(v) for v in node.inputs)


def _symbol_vars(graph: Graph) -> dict:
    """One tir.Var per symbol; every symbol used anywhere must appear as a plain dim of some input."""
    names: dict[str, tir.Var] = {}
    for v in graph.inputs:
        for d in v.type.shape:
            if not isinstance(d, int) and d.is_Symbol and d.name not in names:
                names[d.name] = tir.Var(d.name, "int64")
    for v in [*graph.inputs, *graph.params.values()]:
        missing = v.type.symbols() - set(names)
        if missing:
            raise LoweringError(f"%{v.name}: {v.type} uses symbol(s) {sorted(missing)} that no input has as a "
                                f"plain dim, so their value cannot be read from the input shapes")
    return names


def _func_attrs(graph: Graph, sym_vars: dict, fname: str = "main") -> dict:
    attrs = {"num_input": len(graph.inputs), "global_symbol": fname}
    upper = {n: hi for n, (lo, hi) in graph.symbols.items() if n in sym_vars and hi is not None}
    lower_ = {n: lo for n, (lo, hi) in graph.symbols.items() if n in sym_vars and lo is not None}
    if upper:
        attrs["tir_var_upper_bound"] = upper
    if lower_:
        attrs["tir_var_lower_bound"] = lower_
    if sym_vars:
        attrs["tir_non_negative_var"] = list(sym_vars)
    return attrs


def _check_type(var, t: TensorType) -> None:
    ty = var.ty
    want = tvm_dtype(t.dtype)
    if not isinstance(ty, relax.TensorType):
        raise LoweringError(f"lowering produced {ty}, expected a tensor {t}")
    if str(ty.dtype) != want or ty.ndim != t.rank:
        raise LoweringError(f"lowering produced {ty}, expected {t} ({want})")
    shape = getattr(ty.shape, "values", None)
    if shape is None:
        return
    for i, (got, d) in enumerate(zip(shape, t.shape)):
        if isinstance(d, int) and isinstance(got, tir.IntImm) and got.value != d:
            raise LoweringError(f"lowering produced {ty}, expected {t}: dim {i} is {got.value}, not {dim_str(d)}")
