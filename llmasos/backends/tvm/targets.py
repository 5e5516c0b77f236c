"""Targets: everything the backend does differently for one kind of hardware lives in a ``Target`` subclass.

A Target is a frozen dataclass (its fields are the options a user may change: the TVM target dict, the
schedule rule set, extra options) plus methods and class attributes the backend asks instead of comparing
device names: the Relax pipeline, the schedule rules, the PassContext config, per-op lowering overrides,
the KV-attention decode kernel, CUDA graphs, how tensors reach the device. The base class is a working
generic host target (TVM's cpu_generic pipeline, no schedule rules); ``CPUTarget`` (``cpu``, alias
``llvm``; ``cpu-generic``) and ``CUDATarget`` (``cuda``) are written only against the public API, as a
plugin's target is.

Accepted by ``resolve_target``:
  * a registered name: ``"cpu"`` / ``"llvm"`` (this host's CPU, -mcpu detected), ``"cpu-generic"`` (portable
    x86-64, for libraries exported to other machines), ``"cuda"`` (the visible GPU's arch, else sm_90a),
    and whatever plugins register (the ``llmasos.targets`` entry-point group, loaded at the first lookup,
    or ``register_target`` in code);
  * ``"name:variant"``: a registered name with its arch replaced (``Target.with_variant``) --
    ``"cuda:sm_80"`` sets the CUDA arch, ``"cpu:skylake-avx512"`` the LLVM -mcpu;
  * a full TVM target dict (``{"kind": "llvm", ...}``): the first registered target whose class accepts
    that kind (``Target.tvm_kinds``), built-in targets before plugins;
  * a Target, returned as is.

This module imports TVM's runtime only: an exported library loads and runs with TVM's runtime alone
(``TVM_USE_RUNTIME_LIB=1``), and the Executable asks its Target how to reach the device. The methods that
build (pipeline, schedule rules, lowering hooks) import the compiler when called.
"""
from __future__ import annotations

import dataclasses
import os
import time
import types
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
import tvm
import tvm_ffi
from tvm.support import nvcc
from tvm.target.codegen import llvm_get_vector_width, target_has_features
from tvm_ffi.libinfo import load_lib_ctypes

try:  # NVIDIA's management library, for the GPU's energy counter (optional)
    import pynvml
except ImportError:
    pynvml = None

PLUGIN_GROUP = "llmasos.targets"


@dataclass(frozen=True)
class Target:
    """One compilation target. Subclass it for new hardware; override what differs from the generic host.

    Fields (options; change them with ``dataclasses.replace``):
      name        -- what reports, errors and artifacts call the target
      target      -- the TVM target dict, e.g. ``{"kind": "cuda", "arch": "sm_90a"}``
      device      -- TVM's runtime device kind (``tvm.runtime.device(device, 0)``): "cpu", "cuda", ...
      lift_params -- hoist param-only work (weight transposes, panels) into a function run once at load
      schedule    -- the rule set ``schedule_rules`` returns; "none" everywhere means no schedules of ours
      extra       -- target-specific options (e.g. ``fast_math``, CUDA's ``decode_gemv``)
    """
    name: str
    target: dict
    device: str = "cpu"
    lift_params: bool = True
    schedule: str = "default"
    extra: dict = field(default_factory=dict)

    # -- what the class is ------------------------------------------------------------------------
    tvm_kinds: ClassVar[tuple] = ()           # TVM target kinds a target dict may name to resolve to this class
    variant_key: ClassVar[Optional[str]] = None  # the target dict key ``"name:variant"`` sets ("arch", "mcpu")
    host_memory: ClassVar[bool] = False       # device tensors are host memory: numpy reads them without a copy
    source_kind: ClassVar[Optional[str]] = None  # runtime module kind whose source ``Executable.source()`` shows
    # lowering choices
    gemm_nt: ClassVar[bool] = False           # GEMMs read weights [N, K] as stored (a GPU GEMV's layout);
    #                                           False: a transposed [K, N] copy made once at load
    fused_add_norm: ClassVar[bool] = True     # residual add + norm as one two-output kernel (False: two)
    # LLM runtime choices
    graph_capture: ClassVar[bool] = False     # functions can run as captured device graphs (CUDA graphs)
    symbolic_decode_batch: ClassVar[bool] = False  # a static decode batch > 1 compiles with a symbolic batch
    # tuning: build and time MetaSchedule candidates in this process (False: TVM's popen builder/runner,
    # so a faulting kernel ends a worker, not the tuning process)
    measure_in_process: ClassVar[bool] = False
    # the ``extra`` options the class reads; an option not named here is refused (a misspelt option would
    # otherwise be ignored without a word). None: not declared, anything accepted (a plugin's choice)
    options: ClassVar[Optional[tuple]] = None

    def __post_init__(self):
        if not isinstance(self.target, dict) or "kind" not in self.target:
            raise ValueError(f"target '{self.name}': target must be a TVM target dict with a 'kind', "
                             f"got {self.target!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"target '{self.name}': extra must be a dict of options, got {self.extra!r}")
        if self.options is not None:
            unknown = sorted(k for k in self.extra if k not in self.options)
            if unknown:
                raise ValueError(f"target '{self.name}': unknown option(s) {unknown}; {type(self).__name__} takes "
                                 f"{', '.join(sorted(self.options))} (docs/targets.md)")

    @classmethod
    def accepts(cls, tvm_target: dict) -> bool:
        """Whether a TVM target dict resolves to this class (its kind is one of ``tvm_kinds``)."""
        return tvm_target.get("kind") in cls.tvm_kinds

    # -- the target and the device ----------------------------------------------------------------
    def tvm_target(self):
        return tvm.target.Target(dict(self.target))

    def tvm_device(self):
        return tvm.runtime.device(self.device, 0)

    @property
    def torch_device(self) -> str:
        """The torch device that shares memory with ``tvm_device()`` through DLPack."""
        return self.device

    def on_device(self, tensor) -> bool:
        """Whether a torch or TVM tensor lives where the compiled code reads it (else it is moved there)."""
        if type(tensor).__module__.startswith("torch"):
            return tensor.device.type == self.torch_device
        return tensor.device == self.tvm_device()

    def device_name(self) -> Optional[str]:
        """The hardware's name for reports (a GPU's model), None when there is nothing better than ``name``."""
        return None

    def ensure_runtime(self) -> None:
        """Make the device usable in this process (e.g. load TVM's device library when only TVM's runtime
        is installed). Called before a library is loaded for this target."""

    def synchronize(self) -> None:
        """Wait for the work queued on the device (timing)."""
        self.tvm_device().sync()

    def export_options(self) -> dict:
        """Keyword arguments of ``export_library`` / ``jit`` for this target's libraries (e.g. ``fcompile``
        or ``options`` for a cross compiler, extra headers)."""
        return {}

    def with_variant(self, variant: str) -> "Target":
        """``name:variant``: the same target with ``target[variant_key]`` replaced (a CUDA arch, a CPU model)."""
        if self.variant_key is None:
            raise ValueError(f"target '{self.name}' has no variants")
        return dataclasses.replace(self, name=f"{self.name}:{variant}",
                                   target={**self.target, self.variant_key: variant})

    def with_target(self, tvm_target: dict) -> "Target":
        """The same target with another TVM target dict (what resolving a dict gives)."""
        return dataclasses.replace(self, target=dict(tvm_target))

    # -- building ---------------------------------------------------------------------------------
    def base_pipeline(self):
        """A module with TVM's four Relax pipeline stages for this target (``library_dispatch_passes``,
        ``legalize_passes``, ``dataflow_lower_passes``, ``finalize_passes``): TVM's cpu_generic here."""
        from tvm.relax.backend.cpu_generic import pipeline  # deferred: the TVM compiler (module docstring)
        return pipeline

    def pipeline_stages(self) -> tuple:
        """(fusion, lowering) pass lists of the target's pipeline; the schedule rules run between them.

        Tuning runs the fusion stage alone to see exactly the PrimFuncs a build schedules, and a build with
        a tuning database applies its records between the two stages, before the schedule rules."""
        base = self.base_pipeline()
        target = self.tvm_target()
        legalize = [p for p in base.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
        fusion = self.fusion_prologue() + base.library_dispatch_passes(target) + legalize
        return fusion, base.dataflow_lower_passes(target) + base.finalize_passes(target)

    def fusion_prologue(self) -> list:
        """Relax passes run first, before library dispatch and legalization (none here)."""
        return []

    def schedule_rules(self) -> list:
        """DLight-style rules (``apply(func, target, tunable)``) a build applies, in order, to every PrimFunc
        not already scheduled; a PrimFunc no rule takes keeps its legalised loops. None here."""
        self.check_schedule(("default",))
        return []

    def check_schedule(self, known: tuple) -> None:
        """Raise unless ``schedule`` is one of ``known`` or "none" (for ``schedule_rules`` overrides)."""
        if self.schedule not in (*known, "none"):
            raise ValueError(f"target '{self.name}': unknown schedule {self.schedule!r}; "
                             f"known: {', '.join(repr(k) for k in (*known, 'none'))}")

    def pass_config(self, graph_capture: bool = False) -> dict:
        """The PassContext config a build compiles with (tuning builds its candidates with it too)."""
        return {}

    def lowerings(self) -> Mapping[str, Callable]:
        """Per-op lowering overrides, op name -> ``fn(ctx, node, args)`` (see lowering.py): consulted before
        the core lowering table, for this target's builds only."""
        return {}

    @property
    def fast_math(self) -> bool:
        """Polynomial exp/tanh/erf (vectorisable) instead of libm calls; option ``fast_math``."""
        return bool(self.extra.get("fast_math", False))

    def panel_width(self) -> Optional[int]:
        """Columns per weight panel of the CPU panel GEMM (lowering.py), None when the target does not use it."""
        return None

    def kv_decode_attention(self, heads: int, kv_heads: int, max_seq: int, head_dim: int, dtype: str,
                            pos_dtype: str, scale: float) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written kv.attention kernel for one query per row (a decode step), or
        None for the generic lowering (softmax of masked q k^T, then p v)."""
        return None

    def kv_decode_append_attention(self, heads: int, kv_heads: int, max_seq: int, head_dim: int, dtype: str,
                                   pos_dtype: str, scale: float, rope: bool,
                                   packed: Optional[tuple] = None) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written kernel for fused.rope_append_attention with one query per row:
        RoPE of q and the new key (``rope``), both cache appends (in place) and the attention, arguments as
        lowering_kv._decode_prim_func with ``fused=rope`` and ``packed`` (not None: q, k and v are slices of
        one projection, passed instead of them; a target that cannot read that form returns None and is
        asked again with packed=None); or None to run the ops it stands for."""
        return None

    def kv_paged_decode_append_attention(self, heads: int, kv_heads: int, block_size: int, max_blocks: int,
                                         head_dim: int, dtype: str, pos_dtype: str, scale: float,
                                         rope: bool, packed: Optional[tuple] = None) -> Optional[tuple]:
        """The paged twin of kv_decode_append_attention (fused.rope_paged_append_attention), or None."""
        return None

    def kv_prefill_attention(self, heads: int, kv_heads: int, max_seq: int, head_dim: int, dtype: str,
                             pos_dtype: str, scale: float) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written kv.attention kernel for many queries per row (a prompt, T > 1)
        on a contiguous cache, or None for the generic lowering (softmax of masked q k^T, then p v)."""
        return None

    def kv_paged_prefill_attention(self, heads: int, kv_heads: int, block_size: int, max_blocks: int,
                                   head_dim: int, dtype: str, pos_dtype: str, scale: float) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written kv.paged_attention kernel for many queries per row (prefill
        chunks), or None for the generic lowering (the row's blocks gathered, then kv.attention's generic
        path)."""
        return None

    def small_m_gemm(self, n: int, k: int, dtype: str) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written GEMM y [M, N] = x [M, K] @ w [N, K]^T for a decode step's few
        rows (M symbolic: the batch), or None for the generic lowering."""
        return None

    def prefill_gemm(self, n: int, k: int, dtype: str) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written GEMM y [M, N] = x [M, K] @ w [N, K]^T for a prompt's many rows (M
        symbolic: the prompt's tokens), or None for the generic lowering."""
        return None

    def small_m_quant_gemm(self, n: int, k: int, bits: int, group: int, dtype: str,
                           rows: Optional[int] = None) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written quant.linear kernel for a decode step's few rows (M symbolic;
        ``rows``: a static row count instead), reading codes and scales in cuda_gemm.quant_repack_words /
        quant_repack_scales' layouts, or None for the generic lowering."""
        return None

    def kv_paged_decode_attention(self, heads: int, kv_heads: int, block_size: int, max_blocks: int,
                                  head_dim: int, dtype: str, pos_dtype: str, scale: float) -> Optional[tuple]:
        """(name, PrimFunc) of a hand-written kv.paged_attention kernel for one query per row (a decode step)
        that reads only the row's blocks up to its position, or None for the generic lowering (the row's
        blocks gathered, then kv.attention's generic path)."""
        return None

    def paged_graph_capture(self) -> bool:
        """Whether a paged-KV model's decode step runs as captured device graphs (one per padded batch size;
        the runner then pads the rows and keeps the step's inputs at fixed addresses). Off where the
        target cannot capture."""
        return False

    def prepare_graph_capture(self, mod, functions: tuple):
        """The Relax module with ``functions`` marked for capture as device graphs (``graph_capture``)."""
        return mod

    # -- measuring --------------------------------------------------------------------------------
    def measure_bandwidth(self) -> Optional[float]:
        """Bytes/s of the device's memory (a roofline's denominator), None when the target cannot tell."""
        return None

    def energy_counter(self) -> Optional[float]:
        """Joules the device has used since some fixed point (read twice and subtract), None if unknown."""
        return None


def copy_bandwidth(torch_device: str, elements: int) -> float:
    """Bytes/s of a copy of ``elements`` f32 values on a torch device (read + write): a measure_bandwidth."""
    x = torch.empty(elements, dtype=torch.float32, device=torch_device)
    y = torch.empty_like(x)
    sync = getattr(getattr(torch, torch.device(torch_device).type, None), "synchronize", lambda: None)
    for _ in range(3):
        y.copy_(x)
    sync()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 4 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# the built-in targets


def host_cpu_target() -> dict:
    """This host's CPU as an LLVM target (with TVM's runtime alone, which has no LLVM to ask: the kind only)."""
    cpu_name = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName", allow_missing=True)
    triple = tvm.get_global_func("tvm.codegen.llvm.GetDefaultTargetTriple", allow_missing=True)
    if cpu_name is None or triple is None:
        return {"kind": "llvm", "num-cores": _num_threads()}
    return {"kind": "llvm", "mtriple": triple(), "mcpu": cpu_name(), "num-cores": _num_threads()}


def _num_threads() -> int:
    n = os.environ.get("TVM_NUM_THREADS")
    if n and n.isdigit():
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CPUTarget(Target):
    """LLVM on the host CPU: our CPU schedule rules (cpu_schedule.py: register-tiled panel GEMMs, DLight's
    CPU GEMV/reduction, parallel + vectorised elementwise), FastMath, weights in column panels."""
    name: str = "cpu"
    target: dict = field(default_factory=host_cpu_target)
    device: str = "cpu"
    # "llmasos-cpu": our rules; "none": legalised TIR as is (slow, for debugging schedule bugs)
    schedule: str = "llmasos-cpu"

    tvm_kinds: ClassVar[tuple] = ("llvm",)
    options: ClassVar[Optional[tuple]] = ("fast_math", "panel_vectors", "int8_gemv", "int8_gemv_digits")
    variant_key: ClassVar[Optional[str]] = "mcpu"
    host_memory: ClassVar[bool] = True
    source_kind: ClassVar[Optional[str]] = "llvm"
    measure_in_process: ClassVar[bool] = True  # MetaSchedule's popen workers import TVM afresh per batch

    @property
    def fast_math(self) -> bool:
        return bool(self.extra.get("fast_math", True))

    def fusion_prologue(self) -> list:
        # exp/tanh/erf/softmax as TVM's polynomial forms: vectorisable, where libm calls are scalar
        if self.schedule == "none" or not self.fast_math:
            return []
        from tvm import relax  # deferred: the TVM compiler (module docstring)
        return [relax.transform.FastMathTransform()]

    def schedule_rules(self) -> list:
        self.check_schedule(("llmasos-cpu",))
        if self.schedule == "none":
            return []
        from .cpu_schedule import default_rules  # deferred: the TVM compiler (module docstring)
        return default_rules()

    def pass_config(self, graph_capture: bool = False) -> dict:
        # loop partitioning peels the tail of dynamic-size loops (a seq not divisible by the tile) so the
        # main tile loop runs without per-row bound checks
        return {"s_tir.LoopPartition": {"partition_const_loop": True}}

    def panel_width(self) -> Optional[int]:
        """Two SIMD vectors of f32 (option ``panel_vectors``)."""
        if self.schedule != "llmasos-cpu":
            return None
        with self.tvm_target() as t:
            bits = llvm_get_vector_width(t)
        return self.extra.get("panel_vectors", 2) * max(bits if bits > 0 else 128, 128) // 32

    def int8_gemv_lanes(self) -> Optional[int]:
        """int32 lanes of the int8-activation decode GEMV (lowering_quant._build_qgemv_int8: x quantized per
        32-block, ``vpdpbusd`` dot products), or None for the float-dequant GEMV. Option ``int8_gemv``:
        "auto" (default: on where the CPU has AVX512-VNNI, 16 lanes, or AVX-VNNI, 8 lanes), "on" (the same,
        an error where the CPU has neither), "body" (as "auto", but the output head -- traced from ``lm_head`` --
        keeps the float GEMV: the logits then carry no activation-quantization error), "off". The panel
        (``panel_width`` columns) is whole vectors."""
        which = self.extra.get("int8_gemv", "auto")
        if which not in ("auto", "on", "off", "body"):
            raise ValueError(f"target '{self.name}': int8_gemv must be 'auto', 'on', 'body' or 'off', got {which!r}")
        nr = self.panel_width()
        if which == "off" or nr is None:
            return None
        t = self.tvm_target()
        try:
            feats = {f: bool(target_has_features(f, t)) for f in ("avx512vnni", "avxvnni")}
        except Exception:  # noqa: BLE001 -- not an x86 LLVM target (TVM's runtime alone, another arch)
            feats = {}
        lanes = None
        if feats.get("avx512vnni") and nr % 16 == 0:
            lanes = 16
        elif feats.get("avxvnni") and nr % 8 == 0:
            lanes = 8
        if lanes is None and which == "on":
            raise ValueError(f"target '{self.name}': int8_gemv='on' needs an x86 CPU with AVX512-VNNI or AVX-VNNI "
                             f"(target {self.target}, panel width {nr}); use 'auto' or 'off'")
        return lanes

    def int8_gemv_digits(self) -> int:
        """int8 digits of x in the int8 GEMV (option ``int8_gemv_digits``): 2 (default) quantizes x to ~16 bits
        as two int8 digits (two vpdpbusd per code vector: SmolLM2 int4's greedy tokens stay f32's); 1 is
        llama.cpp's Q8 activation (half the dot-product work, ~0.4% error per GEMV)."""
        d = self.extra.get("int8_gemv_digits", 2)
        if str(d) not in ("1", "2"):        # "1" from --target-option KEY=VALUE is 1
            raise ValueError(f"target '{self.name}': int8_gemv_digits must be 1 or 2, got {d!r}")
        return int(str(d))

    def kv_decode_attention(self, heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale):
        from .lowering_kv import decode_attention_cpu_func  # deferred: the TVM compiler (module docstring)
        return ("kv_decode_attention_cpu",
                decode_attention_cpu_func(heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale))

    def kv_paged_decode_attention(self, heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype, scale):
        from .lowering_kv import paged_decode_attention_cpu_func  # deferred: the TVM compiler (module docstring)
        return ("kv_paged_decode_attention_cpu",
                paged_decode_attention_cpu_func(heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                                scale))

    # (packed: the fused kernel reading q, k, v from the merged projection measured 4% slower than taking the
    # three head views, SmolLM2 int4 decode on 1 and 2 threads -- the views' copies join the GEMV's kernel)
    def kv_decode_append_attention(self, heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale, rope,
                                   packed=None):
        if packed is not None:
            return None
        from .lowering_kv import decode_attention_cpu_func  # deferred: the TVM compiler (module docstring)
        return (f"kv_decode{'_rope' if rope else ''}_append_attention_cpu",
                decode_attention_cpu_func(heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale, fused=rope,
                                          packed=packed))

    def kv_paged_decode_append_attention(self, heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                         scale, rope, packed=None):
        if packed is not None:
            return None
        from .lowering_kv import paged_decode_attention_cpu_func  # deferred: the TVM compiler (module docstring)
        return (f"kv_paged_decode{'_rope' if rope else ''}_append_attention_cpu",
                paged_decode_attention_cpu_func(heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                                scale, fused=rope, packed=packed))

    def synchronize(self) -> None:
        pass  # the CPU kernels return when their work is done

    def measure_bandwidth(self) -> Optional[float]:
        return copy_bandwidth("cpu", 1 << 26)


def generic_cpu() -> CPUTarget:
    """``cpu-generic``: portable x86-64, for libraries exported to other machines."""
    return CPUTarget(name="cpu-generic", target={"kind": "llvm", "mcpu": "x86-64", "num-cores": _num_threads()})


def _cuda_target() -> dict:
    # the limits every CUDA GPU since sm_50 guarantees without opt-in (TVM warns when they are missing)
    return {"kind": "cuda", "arch": _cuda_arch(), "max_shared_memory_per_block": 49152,
            "max_threads_per_block": 1024, "thread_warp_size": 32}


def _cuda_arch() -> str:
    try:
        dev = tvm.cuda(0)
        if dev.exist:
            major, minor = dev.compute_version.split(".")
            return f"sm_{major}{minor}a" if major == "9" else f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001 -- TVM's runtime alone before its CUDA library is loaded
        pass
    return "sm_90a"


@dataclass(frozen=True)
class CUDATarget(Target):
    """CUDA GPUs: TVM's CUDA pipeline with DLight's GPU rules after our DecodeGEMV (cuda_schedule.py),
    weights read as stored, the hand-written decode attention kernel, CUDA graphs."""
    name: str = "cuda"
    target: dict = field(default_factory=_cuda_target)
    device: str = "cuda"
    # "dlight-gpu": DecodeGEMV + DLight's rules; "none": DLight's default rules alone (a GPU kernel needs
    # thread bindings to compile at all)
    schedule: str = "dlight-gpu"

    tvm_kinds: ClassVar[tuple] = ("cuda",)
    options: ClassVar[Optional[tuple]] = ("fast_math", "decode_gemv", "tensor_cores", "small_m_gemm", "small_m_rows",
                                          "prefill_gemm", "prefill_gemm_warps", "prefill_gemm_bk", "prefill_gemm_stages",
                                          "prefill_gemm_frags", "small_m_quant_gemm", "flash_prefill",
                                          "fused_attention_packed", "paged_cuda_graph", "flash_prefill_warps",
                                          "flash_prefill_stages", "decode_attention_tile")
    variant_key: ClassVar[Optional[str]] = "arch"
    source_kind: ClassVar[Optional[str]] = "cuda"
    gemm_nt: ClassVar[bool] = True
    # DLight has no rule for a two-output row reduction, and its fallback schedule is slow: for LayerNorm
    # it made GPT-2 slower than unfused, for RMSNorm one Llama-1B decode step spent 0.94 ms of its 2.1 ms in
    # it (30 us a call against ~1.5 us for add + rms_norm; H100)
    fused_add_norm: ClassVar[bool] = False
    graph_capture: ClassVar[bool] = True
    # DLight schedules a decode GEMM with a symbolic batch as a low-batch GEMV (the weights stream once for
    # all rows); a static batch > 1 gets the large-M matmul tiles, ~10x slower
    symbolic_decode_batch: ClassVar[bool] = True

    def base_pipeline(self):
        from tvm.relax.backend.cuda import pipeline  # deferred: the TVM compiler (module docstring)
        return pipeline

    def schedule_rules(self) -> list:
        self.check_schedule(("dlight-gpu",))
        from tvm.s_tir import dlight as dl  # deferred: the TVM compiler (module docstring)
        if self.schedule == "none":
            return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        # LowBatchGEMV first, for kernels whose only symbolic extent is ``batch`` -- a decode step's GEMMs
        # at batch > 1: the default rules give those to the Matmul rule (tiles for large M), which ran
        # GPT-2's batch-8 decode at a tenth of torch.compile's speed. Bucket 4 (rows of accumulators per
        # thread): measured on an H100, Llama-1B decode at batch 8 / 32 ran 2422 / 2781 tok/s with it and
        # 1944 / 829 with the bucket = batch (register pressure)
        # DecodeGEMV (cuda_schedule.py) takes the static single-row GEMVs of a batch-1 decode step; the
        # target option decode_gemv = "all" | "quantized" | "off" narrows it, for A/B runs against DLight's
        # TensorCoreMatmul: the prefill GEMMs on the tensor cores (DLight's Matmul skips them on sm_90a);
        # target option tensor_cores = "on" | "off", for A/B runs
        from .cuda_schedule import (DecodeGEMV, OnlyBatchSymbolic,  # deferred: the TVM compiler (module docstring)
                                    TensorCoreMatmul)
        which = self.extra.get("decode_gemv", "all")
        if which not in ("all", "quantized", "off"):
            raise ValueError(f"target '{self.name}': decode_gemv must be 'all', 'quantized' or 'off', got {which!r}")
        tc = self.extra.get("tensor_cores", "on")
        if tc not in ("on", "off"):
            raise ValueError(f"target '{self.name}': tensor_cores must be 'on' or 'off', got {tc!r}")
        own = [] if which == "off" else [DecodeGEMV(quantized_only=which == "quantized")]
        mma = [TensorCoreMatmul()] if tc == "on" else []
        return [*own, OnlyBatchSymbolic(dl.gpu.LowBatchGEMV(4)), *mma, dl.gpu.Matmul(), dl.gpu.GEMV(),
                dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]

    def pass_config(self, graph_capture: bool = False) -> dict:
        return {"relax.backend.use_cuda_graph": True} if graph_capture else {}

    def small_m_gemm(self, n, k, dtype):
        """The tensor-core small-M GEMM of cuda_gemm.py (target option small_m_gemm = "on" | "off"), with R
        16-row weight tiles per block (target option small_m_rows = 1 | 2 | 4 | "auto"; auto:
        cuda_gemm.small_m_rows; a fixed R the shape does not take falls back to the largest smaller one).
        The default is R = 1, the kernel measured on an H100; R = 2 / 4 are checked on the CPU (simt) but have not
        run on a GPU yet, so "auto" stays opt-in until bench/small_m_gemm_check.py shows it faster."""
        which = self.extra.get("small_m_gemm", "on")
        if which not in ("on", "off"):
            raise ValueError(f"target '{self.name}': small_m_gemm must be 'on' or 'off', got {which!r}")
        from .cuda_gemm import (small_m_gemm_func,  # deferred: the TVM compiler (module docstring)
                                small_m_gemm_supported, small_m_rows, sm_version)
        rows = self._small_m_rows_option()
        if which == "off" or sm_version(self.target.get("arch", "")) < 80:
            return None
        rows = small_m_rows(n, k) if rows == "auto" else rows
        while rows > 1 and not small_m_gemm_supported(n, k, dtype, rows):
            rows //= 2
        if not small_m_gemm_supported(n, k, dtype, rows):
            return None
        return f"small_m_gemm_{n}x{k}" + (f"_r{rows}" if rows > 1 else ""), small_m_gemm_func(n, k, rows=rows)

    def _small_m_rows_option(self):
        """Target option small_m_rows: the R (1, 2, 4; default 1) of the small-M GEMMs, or "auto"."""
        from .cuda_gemm import ROW_TILES  # deferred: the TVM compiler (module docstring)
        value = self.extra.get("small_m_rows", "1")
        if str(value) == "auto":
            return "auto"
        if str(value) not in {str(r) for r in ROW_TILES}:
            raise ValueError(f"target '{self.name}': small_m_rows must be 'auto' or one of "
                             f"{', '.join(map(str, ROW_TILES))}, got {value!r}")
        return int(value)

    def prefill_gemm(self, n, k, dtype):
        """The tensor-core prefill GEMM of cuda_gemm.py (cp.async pipeline, ldmatrix, mma.sync). Target option
        prefill_gemm = "on" (the default: with flash_prefill, a 1024-token Llama-1B prefill took 15.3 against
        20.9 ms at batch 1 and 106 against 153 ms at batch 8 on an H100, bench/prefill.py) | "off";
        prefill_gemm_warps = "2x2" (default: 4 warps of 64 x 64; on an H100 a 1024-token Llama-1B prefill took
        10.23 against 10.75 ms at batch 1 and 65.5 against 71.9 ms at batch 8 with "2x4") | "2x4" (8 warps of 64 x 32);
        prefill_gemm_bk = "32" (default) | "64" (K columns a pipeline step: four k-steps a barrier, dynamic
        shared memory); prefill_gemm_stages = "2" | "3" (default) | "4"; prefill_gemm_frags = "off" (default) |
        "on" (k-step kk + 1's fragments loaded before kk's MMAs). A shape the bk does not divide keeps 32."""
        which = self.extra.get("prefill_gemm", "on")
        if which not in ("on", "off"):
            raise ValueError(f"target '{self.name}': prefill_gemm must be 'on' or 'off', got {which!r}")
        warps = self.extra.get("prefill_gemm_warps", "2x2")
        if warps not in ("2x4", "2x2"):
            raise ValueError(f"target '{self.name}': prefill_gemm_warps must be '2x4' or '2x2', got {warps!r}")
        bk = self._choice("prefill_gemm_bk", "32", ("32", "64"))
        stages = self._choice("prefill_gemm_stages", "3", ("2", "3", "4"))
        frags = self._choice("prefill_gemm_frags", "off", ("on", "off"))
        from .cuda_gemm import (prefill_gemm_func,  # deferred: the TVM compiler (module docstring)
                                prefill_gemm_supported, sm_version)
        if which == "off" or sm_version(self.target.get("arch", "")) < 80 or not prefill_gemm_supported(n, k, dtype):
            return None
        bk = int(bk) if prefill_gemm_supported(n, k, dtype, int(bk)) else 32
        wp = tuple(int(v) for v in warps.split("x"))
        name = f"prefill_gemm_{n}x{k}" + ("" if warps == "2x2" else f"_w{warps}") + ("" if bk == 32 else f"_k{bk}") \
            + ("" if stages == "3" else f"_s{stages}") + ("" if frags == "off" else "_f")
        return name, prefill_gemm_func(n, k, warps=wp, bk=bk, stages=int(stages), frag_pipeline=frags == "on")

    def small_m_quant_gemm(self, n, k, bits, group, dtype, rows=None):
        """The int4/int8 small-M tensor-core GEMM of cuda_gemm.py. Target option small_m_quant_gemm = "off"
        (the default until a GPU run times it with its repack lifted: the one H100 run so far repacked the words
        every step, docs/llm.md; checked on the CPU by an emulation of its layout and by the simt interpreter,
        tests/backends/test_cuda_quant_gemm.py), "on" (a symbolic batch), "all" (also static
        row counts up to 64, batch 1 included, instead of DecodeGEMV: for A/B runs on a GPU); R tiles a block by
        target option small_m_rows, as small_m_gemm (auto: cuda_gemm.small_m_quant_rows)."""
        which = self.extra.get("small_m_quant_gemm", "off")
        if which not in ("on", "all", "off"):
            raise ValueError(f"target '{self.name}': small_m_quant_gemm must be 'on', 'all' or 'off', got {which!r}")
        if rows is not None and (which != "all" or rows > 64):
            return None
        from .cuda_gemm import (TILE_N, small_m_quant_gemm_func,  # deferred: the TVM compiler (module docstring)
                                small_m_quant_gemm_supported, small_m_quant_rows, sm_version)
        r = self._small_m_rows_option()     # R 16-row tiles a block, as small_m_gemm
        if (which == "off" or sm_version(self.target.get("arch", "")) < 80
                or not small_m_quant_gemm_supported(n, k, bits, group, dtype)):
            return None
        r = small_m_quant_rows(n) if r == "auto" else r
        while n % (TILE_N * r):
            r //= 2
        return (f"small_m_quant_gemm_{n}x{k}_q{bits}g{group}" + (f"_r{r}" if r > 1 else ""),
                small_m_quant_gemm_func(n, k, bits, group, rows=r))

    def _decode_tile(self) -> Optional[int]:
        """Cache rows each row group of the decode attention kernels takes per iteration: target option
        decode_attention_tile = "auto" (the default: 2 without grouped queries, else 1) | "1" | "2" | "4" | "8"
        (more rows per iteration: fewer load / barrier rounds over a long cache, more registers; for A/B on a GPU,
        e.g. bench/paged_gpu_check.py --target-option decode_attention_tile=4)."""
        from .lowering_kv import DECODE_TILES  # deferred: the TVM compiler (module docstring)
        which = self._choice("decode_attention_tile", "auto", ("auto",) + tuple(str(t) for t in DECODE_TILES))
        return None if which == "auto" else int(which)

    def _choice(self, key: str, default: str, allowed: tuple) -> str:
        """Target option ``key`` as a string (``default`` when not given), refused unless one of ``allowed``."""
        value = str(self.extra.get(key, default))
        if value not in allowed:
            raise ValueError(f"target '{self.name}': {key} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def kv_decode_attention(self, heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale):
        from .lowering_kv import decode_attention_func  # deferred: the TVM compiler (module docstring)
        return "kv_decode_attention", decode_attention_func(heads, kv_heads, max_seq, head_dim, dtype, pos_dtype,
                                                            scale, tile=self._decode_tile())

    def kv_paged_decode_attention(self, heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype, scale):
        from .lowering_kv import paged_decode_attention_func  # deferred: the TVM compiler (module docstring)
        return ("kv_paged_decode_attention",
                paged_decode_attention_func(heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype, scale,
                                            tile=self._decode_tile()))

    def _packed_attention(self, packed) -> bool:
        """Whether the fused decode attention reads q, k, v from the merged projection (target option
        fused_attention_packed "on", the default: Llama-1B batch-1 decode 938 against 836 tok/s with the three
        head views on an H100, two processes on one machine; "off": the views)."""
        which = self.extra.get("fused_attention_packed", "on")
        if which not in ("on", "off"):
            raise ValueError(f"target '{self.name}': fused_attention_packed must be 'on' or 'off', got {which!r}")
        return packed is None or which == "on"

    def kv_decode_append_attention(self, heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale, rope,
                                   packed=None):
        if not self._packed_attention(packed):
            return None
        from .lowering_kv import decode_attention_func  # deferred: the TVM compiler (module docstring)
        return (f"kv_decode{'_rope' if rope else ''}_append_attention",
                decode_attention_func(heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale, fused=rope,
                                      packed=packed, tile=self._decode_tile()))

    def kv_paged_decode_append_attention(self, heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                         scale, rope, packed=None):
        if not self._packed_attention(packed):
            return None
        from .lowering_kv import paged_decode_attention_func  # deferred: the TVM compiler (module docstring)
        return (f"kv_paged_decode{'_rope' if rope else ''}_append_attention",
                paged_decode_attention_func(heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                            scale, fused=rope, packed=packed, tile=self._decode_tile()))

    def _flash_prefill(self, heads, kv_heads, max_seq, head_dim, dtype) -> Optional[str]:
        """Which prefill attention kernel: "mma" (tensor cores), "simt" (CUDA cores), or None (the generic three
        kernels). Target option flash_prefill = "mma" (the default since an H100 run: the tensor-core kernel where
        it applies -- f16, sm_80+, D a multiple of 16 up to 128 -- else the CUDA-core one; Llama-1B's 1024-token
        prefill attention at batch 8 0.18 ms against the CUDA-core kernel's 2.45, the whole prefill 72 against
        106 ms) | "on" (the CUDA-core kernel) | "off"."""
        which = self.extra.get("flash_prefill", "mma")
        if which not in ("on", "mma", "off"):
            raise ValueError(f"target '{self.name}': flash_prefill must be 'on', 'mma' or 'off', got {which!r}")
        from .cuda_attention import (  # deferred: the TVM compiler (module docstring)
            prefill_attention_mma_supported, prefill_attention_supported)
        from .cuda_gemm import sm_version  # deferred: the TVM compiler (module docstring)
        if which == "off":
            return None
        warps, stages = self._flash_mma_shape()
        if (which == "mma" and sm_version(self.target.get("arch", "")) >= 80
                and prefill_attention_mma_supported(heads, kv_heads, max_seq, head_dim, dtype, warps, stages)):
            return "mma"
        return "simt" if prefill_attention_supported(heads, kv_heads, max_seq, head_dim, dtype) else None

    def _flash_mma_shape(self) -> tuple:
        """(warps, stages) of the tensor-core prefill attention: target options flash_prefill_warps = 4 (the
        default: 64 grouped query rows a block) | 8 (128), flash_prefill_stages = 1 (the default: each K/V tile
        loaded, then used) | 2 (cp.async double buffering: the next tile in flight while this one runs)."""
        warps, stages = str(self.extra.get("flash_prefill_warps", "4")), str(self.extra.get("flash_prefill_stages", "1"))
        if warps not in ("4", "8"):
            raise ValueError(f"target '{self.name}': flash_prefill_warps must be 4 or 8, got {warps!r}")
        if stages not in ("1", "2"):
            raise ValueError(f"target '{self.name}': flash_prefill_stages must be 1 or 2, got {stages!r}")
        return int(warps), int(stages)

    def kv_prefill_attention(self, heads, kv_heads, max_seq, head_dim, dtype, pos_dtype, scale):
        """The flash-style prefill kernel (cuda_attention.py): on the CUDA cores or the tensor cores, by the
        option flash_prefill (see _flash_prefill; "off": the generic three kernels)."""
        which = self._flash_prefill(heads, kv_heads, max_seq, head_dim, dtype)
        # deferred: the TVM compiler (module docstring)
        from .cuda_attention import prefill_attention_func, prefill_attention_mma_func
        if which == "mma":
            w, st = self._flash_mma_shape()
            return (f"kv_prefill_attention_mma_w{w}s{st}",
                    prefill_attention_mma_func(heads, kv_heads, max_seq, head_dim, pos_dtype, scale, w, st))
        if which == "simt":
            return "kv_prefill_attention", prefill_attention_func(heads, kv_heads, max_seq, head_dim, dtype,
                                                                  pos_dtype, scale)
        return None

    def kv_paged_prefill_attention(self, heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype, scale):
        """The paged twin of kv_prefill_attention (same option)."""
        which = self._flash_prefill(heads, kv_heads, block_size * max_blocks, head_dim, dtype)
        # deferred: the TVM compiler (module docstring)
        from .cuda_attention import paged_prefill_attention_func, paged_prefill_attention_mma_func
        if which == "mma":
            w, st = self._flash_mma_shape()
            return (f"kv_paged_prefill_attention_mma_w{w}s{st}",
                    paged_prefill_attention_mma_func(heads, kv_heads, block_size, max_blocks, head_dim, pos_dtype,
                                                     scale, w, st))
        if which == "simt":
            return ("kv_paged_prefill_attention",
                    paged_prefill_attention_func(heads, kv_heads, block_size, max_blocks, head_dim, dtype, pos_dtype,
                                                 scale))
        return None

    def paged_graph_capture(self) -> bool:
        """Target option paged_cuda_graph = "off" (the default: not yet run on a GPU) | "on": the paged decode
        step as a CUDA graph per padded batch size (llmasos/llm/paged.py, GRAPH_BUCKETS)."""
        which = self.extra.get("paged_cuda_graph", "off")
        if which not in ("on", "off"):
            raise ValueError(f"target '{self.name}': paged_cuda_graph must be 'on' or 'off', got {which!r}")
        return which == "on"

    def prepare_graph_capture(self, mod, functions: tuple):
        """Every argument of a captured function is then fixed storage: TVM's RewriteCUDAGraph captures only
        kernels whose operands are parameters past ``num_input`` or statically planned memory."""
        from tvm import relax  # deferred: the TVM compiler (module docstring)
        for name in functions:
            gv = mod.get_global_var(name)
            f = mod[gv].with_attr("num_input", 0)
            sym = sorted({str(v) for p in f.params for v in relax.analysis.definable_tir_vars_in_type(p.ty)})
            if sym:  # one graph per value of each symbol (a decode step per batch size)
                f = f.with_attr("relax.rewrite_cuda_graph.capture_symbolic_vars", sym)
            mod[gv] = f
        return mod

    def device_name(self) -> Optional[str]:
        dev = self.tvm_device()
        return dev.device_name if dev.exist else None

    def synchronize(self) -> None:
        # torch's queue too: the runtime samples tokens with torch on the device
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.tvm_device().sync()

    def measure_bandwidth(self) -> Optional[float]:
        return copy_bandwidth("cuda", 1 << 28)

    def energy_counter(self) -> Optional[float]:
        if pynvml is None:
            return None
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ
        except pynvml.NVMLError:
            return None

    def ensure_runtime(self) -> None:
        """With TVM's runtime alone, load its CUDA device library (the compiler build loads it at import)."""
        if not getattr(tvm.base, "_RUNTIME_ONLY", False):
            return
        if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
            return
        lib_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[lib_dir], mode="RTLD_GLOBAL")
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda): {e}") from e
        # the library's kernels are CUDA source compiled (NVRTC) when it loads; TVM's callback reads the arch
        # from the compiler's current Target, which the runtime alone lacks, so name the device's arch here
        arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")

        def compile_at_load(code):
            return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_at_load, override=True)


# ------------------------------------------------------------------------------------------------
# the registry

TargetEntry = Union[Target, type, Callable[[], Target]]
_REGISTRY: dict[str, TargetEntry] = {}
_SOURCES: dict[str, str] = {}
_loaded = False
_load_errors: list[str] = []
_loading_from: Optional[str] = None   # the entry point being loaded: what register_target records as source


class UnknownTargetError(ValueError):
    """A target name or TVM target kind no registered Target accepts."""


def register_target(name: str, target: TargetEntry, *, replace: bool = False) -> None:
    """Register ``target`` under ``name``: a Target (returned as is), a Target subclass (instantiated with
    no arguments at each resolve) or a callable returning a Target (called at each resolve: for host
    detection)."""
    _register(name, target, replace, source=_loading_from or "register_target")


def _register(name: str, target: TargetEntry, replace: bool, source: str) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"target name {name!r} must be a non-empty string without ':' (it separates the "
                         f"arch variant)")
    if not (isinstance(target, Target) or (isinstance(target, type) and issubclass(target, Target))
            or callable(target)):
        raise TypeError(f"target '{name}': expected a Target, a Target subclass or a factory, got {target!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"target '{name}' is already registered (by {_SOURCES.get(name, '?')}); pass "
                         f"replace=True to override it")
    _REGISTRY[name] = target
    _SOURCES[name] = source


def _ensure_loaded() -> None:
    """Import the ``llmasos.targets`` entry points once. Each names a Target subclass or instance, or a
    factory, registered under the entry point's name, or a module whose import calls register_target. A
    plugin that fails to load is reported (a warning, and in the unknown-target message) without taking
    the other targets down."""
    global _loaded, _loading_from
    if _loaded:
        return
    _loaded = True  # first: a plugin module calls register_target, which must not load plugins again
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        dist = getattr(ep, "dist", None)
        source = (f"entry point '{ep.name} = {ep.value}'"
                  + (f" of distribution {dist.metadata['Name']}" if dist is not None else ""))
        _loading_from = source
        try:
            obj = ep.load()
            if isinstance(obj, types.ModuleType):
                continue  # a module: its import registered what it has
            if ep.name in _REGISTRY and _REGISTRY[ep.name] is obj:
                continue  # its module registered it already
            _register(ep.name, obj, False, source)
        except Exception as e:  # noqa: BLE001 -- one broken plugin must not hide the others
            msg = f"cannot load target plugin {source}: {type(e).__name__}: {e}"
            _load_errors.append(msg)
            warnings.warn(msg, stacklevel=3)
        finally:
            _loading_from = None


def known_targets() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def target_source(name: str) -> str:
    """Who registered ``name`` (``register_target``, an entry point and its distribution, or llmasos)."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise _unknown(name)
    return _SOURCES[name]


def _unknown(t) -> UnknownTargetError:
    errors = "".join(f"\n  ({e})" for e in _load_errors)
    return UnknownTargetError(f"unknown target {t!r}; known targets: {', '.join(known_targets())} "
                              f"(or 'name:arch', or a TVM target dict){errors}")


def _instance(name: str, entry: TargetEntry) -> Target:
    t = entry if isinstance(entry, Target) else entry()
    if not isinstance(t, Target):
        raise TypeError(f"target '{name}' ({_SOURCES.get(name, '?')}): its factory returned {t!r}, not a Target")
    return t


def _entry_class(name: str, entry: TargetEntry) -> type:
    if isinstance(entry, Target):
        return type(entry)
    if isinstance(entry, type):
        return entry
    return type(_instance(name, entry))


def _from_dict(d: dict) -> Target:
    _ensure_loaded()
    kinds = set()
    for name, entry in _REGISTRY.items():
        cls = _entry_class(name, entry)
        kinds.update(cls.tvm_kinds)
        if cls.accepts(d):
            if isinstance(entry, type):
                return entry(target=dict(d))
            return _instance(name, entry).with_target(d)
    errors = "".join(f"\n  ({e})" for e in _load_errors)
    raise UnknownTargetError(f"unsupported TVM target kind {d.get('kind')!r} in {d}; supported kinds: "
                             f"{sorted(kinds)} (registered targets: {', '.join(known_targets())}){errors}")


def resolve_target(t: Any) -> Target:
    """A Target for a registered name (``"cpu"``, ``"cuda:sm_80"``), a TVM target dict or a Target."""
    if isinstance(t, Target):
        return t
    if isinstance(t, dict):
        return _from_dict(t)
    if not isinstance(t, str):
        raise TypeError(f"a target is a name, a TVM target dict or a Target, got {type(t).__name__}")
    _ensure_loaded()
    name, _, variant = t.partition(":")
    if name not in _REGISTRY:
        raise _unknown(t)
    spec = _instance(name, _REGISTRY[name])
    return spec.with_variant(variant) if variant else spec


def target_for_torch_device(torch_device: str) -> Target:
    """The registered target whose compiled code reads torch tensors of ``torch_device`` ("cpu", "cuda", a
    plugin's device type) in place: the first registered name that does, built-in targets first."""
    _ensure_loaded()
    for name in _REGISTRY:   # registration order: the built-in targets, then plugins
        try:
            spec = _instance(name, _REGISTRY[name])
        except Exception:  # noqa: BLE001 -- a plugin that cannot be built here is not a candidate
            continue
        if spec.torch_device == torch_device:
            return spec
    raise _unknown(f"<a target for torch device {torch_device!r}>")


class _TargetSpecMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, Target)

    def __subclasscheck__(cls, sub) -> bool:
        return isinstance(sub, type) and issubclass(sub, Target)

    def __call__(cls, name: str, target: dict, device: Optional[str] = None, **fields) -> Target:
        kind = type(_from_dict(dict(target)))
        return kind(name=name, target=dict(target), **({"device": device} if device else {}), **fields)


class TargetSpec(metaclass=_TargetSpecMeta):
    """The earlier name of Target, kept for code that built or annotated targets with it:
    ``TargetSpec(name, tvm_target_dict, device, ...)`` builds the registered Target class that accepts the
    dict's kind, and every Target is an instance of TargetSpec."""


_loading_from = "llmasos"
register_target("cpu", CPUTarget)
register_target("llvm", CPUTarget)
register_target("cpu-generic", generic_cpu)
register_target("cuda", CUDATarget)
_loading_from = None
