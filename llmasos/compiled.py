"""CompiledModel: what ``llmasos.compile`` returns -- a view over a CompiledProgram of kind "model" that is
callable with the model's own calling convention (torch tensors in, the model's output structure out)."""
from __future__ import annotations

import time

from .driver import MAIN, CompiledProgram, ProgramView
from .ir.interpreter import bind_symbols
from .ir.torch_dtypes import dtype_from_torch, dtype_to_torch


class InputError(ValueError):
    """A call with inputs the compiled model cannot take (count, dtype, shape, range)."""


class CompiledModel(ProgramView):
    """``cm(*args, **kwargs)`` runs the library's ``main``; ``cm.ir``, ``cm.save(path)``, ``cm.benchmark(...)``.
    ``cm.program`` is the CompiledProgram it views (graphs, executable, target, timings, tokenizer)."""

    def __init__(self, program: CompiledProgram, entry: str = MAIN):
        if entry not in program.conventions or entry not in program.graphs:
            raise ValueError(f"a CompiledModel needs entry '{entry}' with its graph and calling convention; the "
                             f"program has {', '.join(program.entries)}")
        self.program = program
        self.entry = entry
        # input index -> table size for inputs used directly as embedding ids: compiled code clamps
        # out-of-range gathers instead of raising, so ids are checked before the call
        pos = {v: i for i, v in enumerate(self.graph.inputs)}
        self.id_ranges: dict[int, int] = {}
        for n in self.graph.nodes:
            rows = n.inputs[0].type.shape[0] if n.op == "embedding" else None
            if isinstance(rows, int) and n.inputs[1] in pos:
                i = pos[n.inputs[1]]
                self.id_ranges[i] = min(self.id_ranges.get(i, rows), rows)

    # -- the program, seen as one model --------------------------------------------------------------
    @property
    def graph(self):
        return self.program.graphs[self.entry]

    @property
    def convention(self):
        return self.program.conventions[self.entry]

    @property
    def target(self):
        return self.program.target

    @property
    def ir(self) -> str:
        return self.program.ir(self.entry)

    # -- calls -----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        import torch  # deferred: torch (importing llmasos does not load it)
        from torch.utils import _pytree as pytree

        leaves, _ = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if len(tensors) != len(self.graph.inputs):
            raise InputError(f"the compiled model takes {len(self.graph.inputs)} tensor input(s) "
                             f"({', '.join(self.convention.input_names)}), got {len(tensors)}")
        self.check_inputs(tensors)
        outs = self.executable.call(self.entry, *tensors)
        flat = [outs[leaf] if isinstance(leaf, int) else leaf[1] for leaf in self.convention.out_leaves]
        return pytree.tree_unflatten(flat, self.convention.out_spec)

    def check_inputs(self, tensors) -> None:
        """Dtype, rank, fixed dims, symbol ranges and embedding-id ranges, checked before anything runs."""
        for i, (v, t) in enumerate(zip(self.graph.inputs, tensors)):
            try:
                got = dtype_from_torch(t.dtype)
            except TypeError:
                got = None
            if got is not v.type.dtype:
                raise InputError(f"input %{v.name} (#{i}): expected dtype {v.type.dtype}, got {t.dtype} "
                                 f"(cast it, e.g. .to(torch.{_torch_name(v.type.dtype)}))")
        try:
            bind_symbols(self.graph, tensors)
        except ValueError as e:
            raise InputError(f"{e}; this model was compiled for {self._describe_inputs()}") from None
        for i, vocab in self.id_ranges.items():
            t = tensors[i]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                raise InputError(f"input %{self.graph.inputs[i].name} (#{i}): token ids must be in [0, {vocab}), "
                                 f"got values in [{int(t.min())}, {int(t.max())}]")

    def _describe_inputs(self) -> str:
        ins = ", ".join(f"%{v.name}: {v.type}" for v in self.graph.inputs)
        bounds = ", ".join(f"{s} in [{lo}, {hi}]" for s, (lo, hi) in self.graph.symbols.items())
        return f"({ins})" + (f" with {bounds}" if bounds else "")

    def benchmark(self, *args, warmup: int = 2, repeat: int = 10) -> float:
        """Median seconds per call."""
        return median_seconds(lambda: self(*args), repeat, warmup)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.target.name!r}, {self._describe_inputs()})"


def median_seconds(fn, repeat: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _torch_name(dt) -> str:
    return str(dtype_to_torch(dt)).replace("torch.", "")
