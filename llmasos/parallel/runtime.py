"""The distributed runtime: one process per rank over torch.distributed (gloo on CPU, NCCL on CUDA), each
running its own compiled TVM module with its shard of the weights and of the KV cache.

    def work(rank, world):                              # runs in every process
        lm = compile_parallel_lm(model, tp=2, pp=1, max_seq=64)
        return lm.generate(prompt, 8)
    results = launch(work, world_size=2)                # [rank 0's result, rank 1's result]

or, under torchrun (``torchrun --nproc-per-node 2 script.py``), ``init_from_env()`` then the same calls.
The collectives run inside the compiled module (packed functions calling the process group,
llmasos/backends/dist.py). Every blocking call has the process group's timeout: a rank that dies makes
the others fail with ``CommError`` naming the op, and ``launch`` reports which rank died -- never a hang.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import tvm

from ..backends import dist as comm
from ..driver import Source, compile_program, load_program, lower, prepare
from ..llm.compile import as_decoder, lm_source
from ..llm.runtime import CompiledLM
from ..ir.sharding import all_groups, mesh_size, rank_coords
from .partition import check_degrees, mesh_of, partition_lm_graphs, rank_graph, stage_of_rank

DEFAULT_TIMEOUT_S = 60.0


class LaunchError(RuntimeError):
    """A distributed run that failed: names the rank(s) that died or raised, with their errors."""


# -- process groups ------------------------------------------------------------------------------------
_STATE: dict = {}


def init_process(rank: int, world_size: int, init_method: str, backend: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("LLMASOS_DIST_BACKEND") != "gloo" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _STATE.update(rank=rank, world=world_size, backend=backend, timeout_s=timeout_s, mesh=None)


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """torchrun-style: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment; returns the rank."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        raise LaunchError(f"init_from_env needs {e.args[0]} in the environment (run under torchrun or llmasos.launch)")
    init_process(rank, world, "env://", timeout_s=timeout_s)
    return rank


def use_mesh(mesh: dict) -> None:
    """Make (collectively: every rank calls it with the same mesh) the process groups of each mesh axis."""
    if not dist.is_initialized():
        raise LaunchError("no process group: call init_process / init_from_env first, or run under llmasos.launch")
    world, rank = dist.get_world_size(), dist.get_rank()
    if mesh_size(mesh) != world:
        raise LaunchError(f"the parallel plan {mesh} needs {mesh_size(mesh)} processes, the world has {world}")
    if _STATE.get("mesh") == mesh:
        return
    groups = {}
    for axis in mesh:
        for ranks in all_groups(mesh, axis):     # every rank creates every group, in the same order
            pg = dist.new_group(ranks, timeout=datetime.timedelta(seconds=_STATE.get("timeout_s", DEFAULT_TIMEOUT_S)))
            if rank in ranks:
                groups[axis] = comm.Group(axis, pg, ranks, ranks.index(rank))
    comm.set_groups(groups)
    comm.install_tvm_funcs(list(mesh))
    _STATE["mesh"] = dict(mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, timeout_s, q, args, env):
    os.environ.update(env)
    if env.get("LLMASOS_PIN_CUDA_DEVICE"):      # before any CUDA call: this rank's GPU is its device 0
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    try:
        init_process(rank, world, f"tcp://127.0.0.1:{port}", backend=env.get("LLMASOS_DIST_BACKEND"),
                     timeout_s=timeout_s)
        q.put((rank, True, fn(rank, world, *args)))
    except BaseException as e:  # noqa: BLE001  (reported to the parent with its traceback)
        q.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def launch(fn: Callable, world_size: int, *args, timeout_s: float = 300.0, comm_timeout_s: float = 30.0,
           backend: str = "gloo", threads_per_rank: Optional[int] = None, pin_cuda_device: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process group (gloo
    on 127.0.0.1 by default); return their results in rank order. ``fn`` must be importable (a module-level
    function). ``pin_cuda_device``: rank r sees GPU r alone (as its device 0). A rank that raises or dies fails the launch with LaunchError naming it; the survivors' pending
    collectives fail after ``comm_timeout_s``; the whole run is killed after ``timeout_s``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    env = {"LLMASOS_DIST_BACKEND": backend}
    if pin_cuda_device:
        env["LLMASOS_PIN_CUDA_DEVICE"] = "1"
    if threads_per_rank:
        env.update(OMP_NUM_THREADS=str(threads_per_rank), TVM_NUM_THREADS=str(threads_per_rank))
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, comm_timeout_s, q, args, env), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, val = q.get(timeout=0.5)
                (results if ok else errors)[rank] = val
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results and r not in errors]
            for r in dead:       # exited without a report: give the queue a moment, then call it dead
                try:
                    rank, ok, val = q.get(timeout=2.0)
                    (results if ok else errors)[rank] = val
                except queue.Empty:
                    errors.setdefault(r, f"process died (exit code {procs[r].exitcode}) without a result")
            if time.monotonic() > deadline:
                for r in range(world_size):
                    if r not in results and r not in errors:
                        errors[r] = f"no result within timeout_s={timeout_s}"
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        lines = "\n".join(f"  rank {r}: {errors[r]}" for r in sorted(errors))
        raise LaunchError(f"{len(errors)} of {world_size} rank(s) failed:\n{lines}")
    return [results[r] for r in range(world_size)]


# -- the per-rank LM ----------------------------------------------------------------------------------
PLAN_FILE = "parallel.json"


def compile_parallel_lm(model, tp: int = 1, pp: int = 1, target: Any = "cpu", *, max_seq: int = 256,
                        batch: int = 1, dtype=None, passes: Any = "fuse", tokenizer=None):
    """This rank's CompiledLM of ``model`` partitioned ``tp`` x ``pp`` (call in every rank, under launch /
    torchrun, with the same arguments). Its ``generate`` returns the same tokens on every rank."""

    dec = as_decoder(model, dtype)
    check_degrees(dec.cfg, tp, pp)
    mesh = mesh_of(tp, pp)
    use_mesh(mesh)
    rank = dist.get_rank()
    plan = prepare(target, None)
    src = lower(plan, lambda spec: lm_source(dec, spec, max_seq=max_seq, max_batch=batch, batch=batch, dtype=dtype,
                                             cuda_graph=False))
    parts = partition_lm_graphs(src.graphs, tp, pp)
    graphs = {name: rank_graph(g, rank) for name, g in parts.items()}
    meta = dict(src.meta, parallel={"tp": tp, "pp": pp, "mesh": mesh, "rank": rank, "world_size": mesh_size(mesh)})
    program = compile_program("lm", lambda spec: Source(graphs, meta=meta), target, passes=passes,
                              tokenizer=tokenizer)
    return RankLM.of(program)


def load_parallel_lm(path, target=None):
    """Load this rank's part of a sharded LM artifact written by ``RankLM.save`` (same world size)."""
    path = Path(path)
    plan_path = path / PLAN_FILE
    if not plan_path.exists():
        raise LaunchError(f"{path} is not a sharded LM artifact (no {PLAN_FILE})")
    plan = json.loads(plan_path.read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if plan["world_size"] != world:
        raise LaunchError(f"{path} was partitioned for {plan['world_size']} ranks (tp={plan['tp']}, pp={plan['pp']}) "
                          f"but this run has {world} process(es): launch it with world_size={plan['world_size']}")
    use_mesh(plan["mesh"])
    rank = dist.get_rank()
    return RankLM.of(load_program(path / f"rank{rank}", target, kind="lm"))


class RankLM:
    """Namespace for the per-rank CompiledLM factory (a CompiledLM whose entry calls also bring the last
    pipeline stage's logits to every stage)."""

    @staticmethod
    def of(program):
        lm = CompiledLM(program)
        par = program.meta["parallel"]
        mesh = par["mesh"]
        stage, stages = stage_of_rank(mesh, par["rank"])
        lm.parallel = par
        if stages > 1:
            lm._prefill = _with_logits(lm._prefill, lm, stage, stages)
            lm._decode = _with_logits(lm._decode, lm, stage, stages)
        else:
            lm._prefill, lm._decode = _flushing(lm._prefill), _flushing(lm._decode)

        def save(path, _lm=lm):
            save_rank(_lm, path)
        lm.save = save
        return lm


def _flushing(raw):
    def call(*args):
        out = raw(*args)
        comm.wait_sends()
        return out
    return call


def _with_logits(raw, lm, stage: int, stages: int):
    """The entry of one pipeline stage, returning the logits (made on the last stage, broadcast over the
    pipeline group) first, as CompiledLM expects."""

    def call(*args):
        out = raw(*args)
        comm.wait_sends()
        g = comm.GROUPS["pp"]
        B = int(args[0].shape[0])
        if stage == stages - 1:
            logits = out[0]
            rest = list(out)[1:]
        else:
            logits = tvm.runtime.tensor(np.zeros((B, lm.vocab), lm._cache_types[0].dtype.numpy), lm._dev)
            rest = list(out)
        t = torch.from_dlpack(logits)
        comm.call("broadcast logits", "pp", lambda d: d.broadcast(t, src=g.ranks[stages - 1], group=g.pg))
        return (logits, *rest)
    return call


def save_rank(lm, path) -> None:
    """Every rank writes its program to ``path/rank{r}``; rank 0 writes the plan (``parallel.json``)."""
    path = Path(path)
    par = lm.parallel
    lm.program.save(path / f"rank{par['rank']}")
    if par["rank"] == 0:
        (path / PLAN_FILE).write_text(json.dumps({k: par[k] for k in ("tp", "pp", "mesh", "world_size")}, indent=1))
    dist.barrier()
