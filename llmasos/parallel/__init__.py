"""Parallel execution: partitioned programs on torch.distributed (tensor / pipeline parallel), data-parallel
replicas on Ray, and the parallel planner. Heavy dependencies (torch.distributed, Ray) load on use."""
from .partition import check_degrees, mesh_of, partition_lm_graphs, rank_graph
from .planner import plan_parallel, simulate_table
from .data_parallel import DataParallelLM, ReplicaError

def launch(fn, world_size: int, *args, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by torch.distributed (see
    llmasos.parallel.runtime.launch)."""
    from .runtime import launch as _launch  # deferred: torch.distributed and the TVM runtime
    return _launch(fn, world_size, *args, **kwargs)


__all__ = ["DataParallelLM", "ReplicaError", "check_degrees", "mesh_of", "partition_lm_graphs", "rank_graph", "plan_parallel", "simulate_table",
           "launch", "compile_parallel_lm", "load_parallel_lm", "init_from_env", "LaunchError"]


def __getattr__(name):
    if name in ("compile_parallel_lm", "load_parallel_lm", "init_from_env", "LaunchError", "use_mesh"):
        from . import runtime  # deferred: torch (the distributed runtime)
        return getattr(runtime, name)
    raise AttributeError(name)
