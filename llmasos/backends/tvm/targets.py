"""The target registry: names -> TargetSpec (a TVM target dict, the runtime device, pipeline options).

Accepted by ``resolve_target``:
  * a registered name: ``"cpu"`` (alias ``"llvm"``: this host's CPU, -mcpu detected), ``"cpu-generic"``
    (portable x86-64, for libraries exported to other machines), ``"cuda"`` (arch of the visible GPU,
    else sm_90a -- the H100/H200 class);
  * ``"name:variant"``: a registered name with its arch replaced -- ``"cuda:sm_80"`` sets the CUDA arch,
    ``"cpu:skylake-avx512"`` sets the LLVM -mcpu;
  * a full TVM target dict (``{"kind": "llvm", ...}`` or ``{"kind": "cuda", ...}``);
  * a TargetSpec, returned as is.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Union

_DEVICES = {"llvm": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class TargetSpec:
    name: str
    target: dict            # the TVM target dict, e.g. {"kind": "cuda", "arch": "sm_90a"}
    device: str             # runtime device: "cpu" | "cuda"
    # how weights are prepared: param-only expressions (weight transposes) are hoisted into a function the
    # Executable runs once at load, so the per-call graph reads weights in the layout its kernels want
    lift_params: bool = True
    # TIR schedules applied after fusion: "llmasos-cpu" (our CPU rules: tiled/vectorised/parallel matmul,
    # dlight CPU GEMV/reduction, parallel+vectorised elementwise), "dlight-gpu" (TVM's default CUDA rules)
    # or "none" (legalised TIR as is: slow, for debugging schedule bugs)
    schedule: str = "llmasos-cpu"
    extra: dict = field(default_factory=dict)  # room for plugin options

    def tvm_target(self):
        import tvm
        return tvm.target.Target(dict(self.target))

    def tvm_device(self):
        import tvm
        return tvm.cpu(0) if self.device == "cpu" else tvm.cuda(0)

    def with_variant(self, variant: str) -> "TargetSpec":
        key = "arch" if self.target["kind"] == "cuda" else "mcpu"
        return dataclasses.replace(self, name=f"{self.name}:{variant}", target={**self.target, key: variant})


SpecOrFactory = Union[TargetSpec, Callable[[], TargetSpec]]
_REGISTRY: dict[str, SpecOrFactory] = {}


def register_target(name: str, spec_or_factory: SpecOrFactory, *, replace: bool = False) -> None:
    """Register a target name; a factory (no arguments) is called at each resolve (for host detection)."""
    if ":" in name:
        raise ValueError(f"target name {name!r} must not contain ':' (it separates the arch variant)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"target '{name}' is already registered; pass replace=True to override it")
    _REGISTRY[name] = spec_or_factory


def known_targets() -> list[str]:
    return sorted(_REGISTRY)


def resolve_target(t) -> TargetSpec:
    if isinstance(t, TargetSpec):
        return t
    if isinstance(t, dict):
        return _from_dict(t)
    if not isinstance(t, str):
        raise TypeError(f"a target is a name, a TVM target dict or a TargetSpec, got {type(t).__name__}")
    name, _, variant = t.partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown target {t!r}; known targets: {', '.join(known_targets())} "
                         f"(or 'name:arch', or a TVM target dict)")
    entry = _REGISTRY[name]
    spec = entry if isinstance(entry, TargetSpec) else entry()
    return spec.with_variant(variant) if variant else spec


def _from_dict(d: dict) -> TargetSpec:
    kind = d.get("kind")
    if kind not in _DEVICES:
        raise ValueError(f"unsupported TVM target kind {kind!r} in {d}; supported kinds: {sorted(_DEVICES)}")
    if kind == "cuda":
        return TargetSpec(name="cuda", target=dict(d), device="cuda", schedule="dlight-gpu")
    return TargetSpec(name="cpu", target=dict(d), device="cpu", schedule="llmasos-cpu")


def host_cpu_target() -> dict:
    import tvm
    mcpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    triple = tvm.get_global_func("tvm.codegen.llvm.GetDefaultTargetTriple")()
    return {"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": _num_threads()}


def _num_threads() -> int:
    n = os.environ.get("TVM_NUM_THREADS")
    if n and n.isdigit():
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu() -> TargetSpec:
    return TargetSpec(name="cpu", target=host_cpu_target(), device="cpu")


def _cpu_generic() -> TargetSpec:
    return TargetSpec(name="cpu-generic", target={"kind": "llvm", "mcpu": "x86-64", "num-cores": _num_threads()},
                      device="cpu")


def _cuda() -> TargetSpec:
    # the limits every CUDA GPU since sm_50 guarantees without opt-in (TVM warns when they are missing)
    return TargetSpec(name="cuda", target={"kind": "cuda", "arch": _cuda_arch(), "max_shared_memory_per_block": 49152,
                                           "max_threads_per_block": 1024, "thread_warp_size": 32},
                      device="cuda", schedule="dlight-gpu")


def _cuda_arch() -> str:
    import tvm
    dev = tvm.cuda(0)
    if dev.exist:
        major, minor = dev.compute_version.split(".")
        return f"sm_{major}{minor}a" if major == "9" else f"sm_{major}{minor}"
    return "sm_90a"


register_target("cpu", _cpu)
register_target("llvm", _cpu)
register_target("cpu-generic", _cpu_generic)
register_target("cuda", _cuda)
