"""``llmasos opt``: read IR text, run a pass pipeline, print IR (in the style of mlir-opt).

    llmasos opt model.llir -p dce,cse --print-after-all --timing
    cat model.llir | llmasos opt - -p "dce" -o out.llir

IR goes to stdout (or -o), instruments and errors to stderr. Bad input -- IR that does not parse, a bad
pipeline string, an unknown pass, a pass that fails -- exits with status 2 and a located message.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

from .ir import DType, ParseError, parse, print_graph
from .ir.types import eval_dim
from .ir.verifier import VerificationError
from .passes import PassError, PassManager, PassRegistryError, PipelineError, all_passes, pass_source


def add_parser(sub) -> None:
    p = sub.add_parser("opt", help="run a pass pipeline over IR text and print the result",
                       description="Read LLMasOS IR text, run a pass pipeline, print the IR.")
    p.add_argument("file", nargs="?", default="-", help="IR text file, or - for stdin (default)")
    p.add_argument("-p", "--pipeline", default="", help='passes, e.g. "dce,cse" or "quantize{bits=4},fuse"')
    p.add_argument("-o", "--output", help="write the IR here instead of stdout")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass (stderr)")
    p.add_argument("--timing", action="store_true", help="print a table of seconds per pass (stderr)")
    p.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True,
                   help="run the verifier after every pass (default: on)")
    p.add_argument("--check-numerics", action="store_true",
                   help="run the reference interpreter after every pass on random inputs (random data for "
                        "parameters, which IR text leaves out) and stop at the first pass that drifts")
    p.add_argument("--seed", type=int, default=0, help="seed of --check-numerics inputs")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.set_defaults(fn=cmd_opt)


def cmd_opt(args) -> int:
    try:
        if args.list_passes:
            for name, cls in all_passes().items():
                kind = "exact" if cls.exact else f"rtol {cls.rtol:g}, atol {cls.atol:g}"
                print(f"{name:24} {kind:24} {pass_source(name)}")
            return 0
        pm = PassManager(args.pipeline, print_after_all=args.print_after_all, timing=args.timing,
                         verify_each=args.verify_each, out=sys.stderr)
        src = "<stdin>" if args.file == "-" else args.file
        text = sys.stdin.read() if args.file == "-" else _read(args.file)
        try:
            graph = parse(text)
        except ParseError as e:
            raise _CliError(f"{src}: {e}") from None
        if args.check_numerics:
            _check_numerics_size(graph, args.seed)
            fill_params(graph, args.seed)
            pm.numeric_check = lambda g: sample_inputs(g, args.seed)
        result = pm.run(graph)
        out = print_graph(result) + "\n"
        if args.output:
            with open(args.output, "w") as f:
                f.write(out)
        else:
            sys.stdout.write(out)
        return 0
    except (_CliError, PipelineError, PassRegistryError, PassError, VerificationError, OSError) as e:
        print(f"llmasos opt: error: {e}", file=sys.stderr)
        return 2


class _CliError(Exception):
    pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise _CliError(f"cannot read {path}: {e.strerror}") from None


NUMERICS_LIMIT = 1 << 32     # bytes of any one tensor --check-numerics makes or computes


def _check_numerics_size(graph, seed: int) -> None:
    """--check-numerics makes random weights and inputs and runs the reference interpreter: refuse graphs whose
    tensors (at the sample symbol values) would not fit, instead of asking numpy for terabytes."""
    env = {}
    for name, (lo, hi) in graph.symbols.items():
        v = max(lo if lo is not None else 1, 2)
        env[name] = v if hi is None else min(v, hi)
    values = [*graph.params.values(), *graph.inputs, *(o for n in graph.nodes for o in n.outputs)]
    for v in values:
        try:
            n = 1
            for d in v.type.shape:
                n *= int(eval_dim(d, env))
        except (TypeError, ValueError, KeyError):
            continue
        nbytes = n * max(v.type.dtype.bits, 8) // 8
        if nbytes > NUMERICS_LIMIT:
            raise _CliError(f"--check-numerics: %{v.name}: {v.type} would take {nbytes / (1 << 30):.1f} GiB (the "
                            f"reference interpreter runs on random data; at most {NUMERICS_LIMIT >> 30} GiB a tensor): "
                            f"check numerics on a smaller graph")


def fill_params(graph, seed: int = 0) -> None:
    """Random data (seeded) for every parameter that has none: IR text carries no weights."""
    rng = np.random.default_rng(seed)
    for name, v in graph.params.items():
        if name not in graph.param_data:
            shape = tuple(int(d) for d in v.type.shape)
            graph.param_data[name] = _random(rng, shape, v.type.dtype)


def sample_inputs(graph, seed: int = 0, symbols: Optional[dict] = None) -> list:
    """Random inputs for ``graph``: each symbol at a small value within its bounds, integer inputs 0 (a
    valid index into any non-empty dim), floats standard normal."""
    rng = np.random.default_rng(seed)
    env = dict(symbols or {})
    for name, (lo, hi) in graph.symbols.items():
        if name not in env:
            v = max(lo if lo is not None else 1, 2)
            env[name] = v if hi is None else min(v, hi)
    out = []
    for v in graph.inputs:
        shape = tuple(int(eval_dim(d, env)) for d in v.type.shape)
        out.append(_random(rng, shape, v.type.dtype))
    return out


def _random(rng, shape, dtype):
    if dtype is DType.bool:
        return rng.random(shape) < 0.5
    if dtype.is_int:
        return np.zeros(shape, dtype.numpy)
    return rng.standard_normal(shape).astype(dtype.numpy)
