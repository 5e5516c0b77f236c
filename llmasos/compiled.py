"""CompiledModel: what ``llmasos.compile`` returns -- a callable with the model's calling convention."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .ir.graph import Graph


class InputError(ValueError):
    """A call with inputs the compiled model cannot take (count, dtype, shape, range)."""


@dataclass
class Signature:
    """How user calls map to graph inputs and graph outputs back to the model's output structure."""
    in_spec: Any                  # torch pytree TreeSpec of (args, kwargs)
    out_spec: Any                 # TreeSpec of the model's output
    out_leaves: list              # per output leaf: index into graph.outputs, or ("const", value)
    input_names: list


@dataclass
class CompiledModel:
    graph: Graph
    executable: Any
    signature: Signature
    target: Any
    timings: dict = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def ir(self) -> str:
        from .ir.printer import print_graph
        return print_graph(self.graph)

    def __call__(self, *args, **kwargs):
        import torch
        from torch.utils import _pytree as pytree

        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if len(tensors) != len(self.graph.inputs):
            raise InputError(f"the compiled model takes {len(self.graph.inputs)} tensor input(s) "
                             f"({', '.join(self.signature.input_names)}), got {len(tensors)}")
        self.check_inputs(tensors)
        outs = self.executable(*tensors)
        flat = [outs[leaf] if isinstance(leaf, int) else leaf[1] for leaf in self.signature.out_leaves]
        return pytree.tree_unflatten(flat, self.signature.out_spec)

    def check_inputs(self, tensors) -> None:
        """Dtype, rank, fixed dims and symbol ranges, checked before anything runs."""
        from .ir.torch_dtypes import dtype_from_torch

        env: dict[str, int] = {}
        for i, (v, t) in enumerate(zip(self.graph.inputs, tensors)):
            name = self.signature.input_names[i] if i < len(self.signature.input_names) else v.name
            want = v.type
            where = f"input '{name}' (#{i})"
            try:
                got_dt = dtype_from_torch(t.dtype)
            except TypeError:
                got_dt = None
            if got_dt is not want.dtype:
                raise InputError(f"{where}: expected dtype {want.dtype}, got {t.dtype} "
                                 f"(cast it, e.g. .to(torch.{_torch_name(want.dtype)}))")
            if t.dim() != want.rank:
                raise InputError(f"{where}: expected {want.rank} dims {self._describe(want)}, "
                                 f"got shape {list(t.shape)}")
            for axis, (d, n) in enumerate(zip(want.shape, t.shape)):
                if isinstance(d, int):
                    if d != n:
                        raise InputError(f"{where}: dim {axis} must be {d} {self._describe(want)}, "
                                         f"got shape {list(t.shape)}")
                elif d.is_Symbol:
                    lo, hi = self.graph.symbols.get(d.name, (None, None))
                    if (lo is not None and n < lo) or (hi is not None and n > hi):
                        raise InputError(f"{where}: dim {axis} ('{d.name}') = {n} is outside the compiled range "
                                         f"[{lo}, {hi}]; recompile with a larger bound")
                    if env.setdefault(d.name, int(n)) != n:
                        raise InputError(f"{where}: dim {axis} ('{d.name}') = {n}, but '{d.name}' = "
                                         f"{env[d.name]} in an earlier input")

    def _describe(self, t) -> str:
        bounds = [f"{s} in [{lo}, {hi}]" for s, (lo, hi) in self.graph.symbols.items() if s in t.symbols()]
        return f"({t}{'; ' + ', '.join(bounds) if bounds else ''})"

    def save(self, path) -> None:
        from .artifact import save
        save(self, path)

    def benchmark(self, *args, warmup: int = 2, repeat: int = 10) -> float:
        """Median seconds per call."""
        for _ in range(warmup):
            self(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self(*args)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def _torch_name(dt) -> str:
    from .ir.torch_dtypes import dtype_to_torch
    return str(dtype_to_torch(dt)).replace("torch.", "")

