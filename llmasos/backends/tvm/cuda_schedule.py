"""GPU schedule rules of our own, applied before DLight's (CUDATarget.schedule_rules).

``DecodeGEMV``: a single-row GEMV, y[n] = sum_k x[k] * w(n, k) -- a batch-1 decode step's projections,
with whatever the fusion stage put around them (a dequantize of int4/int8 codes inlined into w, a cast,
a bias or a residual add after). Decode reads every weight once per step, so these kernels are what the
step's time is; DLight's GEMV rule loads 4 bytes of weight per thread and step (one uint32 word of 8
int4 codes, or two halves) and first stages the whole x vector in shared memory behind a barrier, which
ran the int4 projections of Llama-1B at 0.5-2 TB/s on an H200 and the small fp16 ones at 2.2-2.5 TB/s.
Here a warp owns 2 output rows (4 for packed int4/int8 codes): each lane loads 16 bytes of weight per
row and step (8 halves, or 4 words = 32 int4 codes) straight into registers and its x chunk once for all
its rows (from global memory: the block's warps share it through L1), the K loop is unrolled so several
loads are in flight, and warp shuffles sum the lanes. When a projection has few rows, K is split over up
to 8 warps (TVM joins them in shared memory) until the grid has ~WARPS_WANTED warps. Static shapes only:
a symbolic batch stays with DLight's LowBatchGEMV.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block, is_gemv, normalize, normalize_prim_func
from tvm.s_tir.dlight.base import get_bytes, get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (MatmulTensorization, get_in_out_dtypes, get_index_map,
                                         get_reduction_blocks)

from .cuda_gemm import sm_version

LANES = 32        # a warp's lanes along K (times the warps K is split over)
LOAD_BYTES = 16   # weight bytes per lane and step: one 128-bit load
UNROLL = 8        # K steps unrolled, for loads in flight
WARPS_WANTED = 4096  # warps a grid should have to keep HBM busy (H100/H200: 132 SMs x 32 resident warps)


class DecodeGEMV(GPUScheduleRule):
    """Single-row GEMV (optionally with a dequantized weight and one injective epilogue): see the module
    docstring. ``warps_per_block`` warps a thread block, ``rows_per_warp`` output rows a warp (its lanes
    load and convert the x chunk once for them all, and have that many weight loads in flight)."""

    def __init__(self, warps_per_block: int = 4, rows_per_warp: int = 2, quantized_only: bool = False):
        self.warps_per_block = warps_per_block
        self.rows_per_warp = rows_per_warp
        self.quantized_only = quantized_only  # leave float weights to DLight's GEMV (target decode_gemv)

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) not in (1, 2):
            return None
        epilogue = infos[1] if len(infos) == 2 else None
        if epilogue is not None and not epilogue.is_injective():
            return None
        info = infos[0]
        vectors = is_gemv(sch, info) if len(info.iters) in (2, 3) else None
        if not vectors:
            return None
        block = info.block_rv
        if normalize(sch, info) is not True:  # inner reduction: k is the weight's contiguous axis
            return None
        batch, s, r, c = sch.get_loops(block)
        extents = [get_extent(sch, loop) for loop in (batch, s, r, c)]
        if not all(isinstance(e, int) for e in extents):
            return None
        rows, k = extents[0] * extents[1], extents[2] * extents[3]
        stmt = sch.get(block)
        weight = _weight_read(stmt)
        if weight is None:
            return None
        w_index, w_buf = weight
        # x: the vector read along k (per-row scales of int8 weights count as vectors too)
        xs = [(i, reg.source) for i, reg in enumerate(stmt.reads)
              if any(reg.source.same_as(v) for v in vectors) and isinstance(reg.source.shape[-1], tirx.IntImm)
              and int(reg.source.shape[-1]) == k]
        if len(xs) != 1:
            return None
        x_index, x_buf = xs[0]
        k_per_elem = max(k // int(w_buf.shape[-1]), 1)  # 8 int4 / 4 int8 codes per uint32 word
        if self.quantized_only and k_per_elem == 1:
            return None
        vec = LOAD_BYTES // get_bytes(w_buf.dtype) * k_per_elem  # k values per lane and step
        while vec > k_per_elem and k % (LANES * vec):
            vec //= 2
        if k % (LANES * vec):
            return None
        # rows a warp: the lane's x chunk is loaded and converted to f32 once for all of them. A GPU converts
        # at a quarter of its FMA rate, and a packed int4 weight brings 32 x values per 16-byte load, so
        # with one row a warp the conversions of x, not HBM, bounded the int4 GEMV (0.7-1.9 TB/s, H200)
        rw = self.rows_per_warp * (2 if k_per_elem > 1 else 1)
        while rw > 1 and rows % rw:
            rw //= 2
        # K split over kw warps of a row (a shared-memory reduction joins them) until the grid has about
        # WARPS_WANTED warps: with one warp a row, Llama-1B's 2048-row projections kept 2 blocks per SM
        # and ran at 2 TB/s
        kw = 1
        while kw < 8 and rows // rw * kw < WARPS_WANTED and k % (LANES * vec * kw * 2) == 0:
            kw *= 2
        ts = max(self.warps_per_block // kw, 1)
        while ts > 1 and rows % (ts * rw):  # (rw divides rows: at ts = 1 the split is whole)
            ts //= 2
        lanes = LANES * kw

        s = sch.fuse(batch, s)
        r = sch.fuse(r, c)
        bx, ty, ri = sch.split(s, factors=[None, ts, rw], preserve_unit_iters=True)
        ro, tx, v = sch.split(r, factors=[None, lanes, vec], preserve_unit_iters=True)
        rf = sch.rfactor(tx, 0)
        bx, ty, ri, ro, tx, v = sch.get_loops(rf)
        sch.reorder(bx, ty, tx, ro, ri, v)
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        # each of the lane's rows: one vector load of its weight chunk into registers; the x chunk, shared
        # by the rows, likewise (L1 hits: the block's warps read the same x)
        w_cache = sch.cache_read(rf, read_buffer_index=w_index, storage_scope="local")
        sch.compute_at(w_cache, ro, preserve_unit_loops=True)
        *outer, inner = sch.get_loops(w_cache)[4:]
        sch.vectorize(inner)
        for loop in outer:
            sch.unroll(loop)
        x_cache = sch.cache_read(rf, read_buffer_index=x_index, storage_scope="local")
        sch.compute_at(x_cache, ro, preserve_unit_loops=True)
        loop = sch.fuse(*sch.get_loops(x_cache)[4:])
        width = LOAD_BYTES // get_bytes(x_buf.dtype)
        if get_extent(sch, loop) > width:
            loop = sch.split(loop, factors=[None, width])[-1]
        sch.vectorize(loop)
        sch.unroll(ri)
        sch.unroll(v)
        sch.decompose_reduction(rf, ro)
        steps = get_extent(sch, ro)
        if steps > 1:
            inner = sch.split(ro, factors=[None, max(f for f in range(1, UNROLL + 1) if steps % f == 0)])[1]
            sch.unroll(inner)
        # the lanes' partial sums: a warp allreduce per row, then the epilogue by the same warp
        sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
        red, *spatial = sch.get_loops(block)[1:]  # (red spans the kw warps: TVM joins them in shared memory)
        ty2, ri2 = sch.split(sch.fuse(*spatial), factors=[ts, rw])
        sch.reorder(ty2, ri2, red)
        sch.bind(ty2, "threadIdx.y")
        sch.bind(red, "threadIdx.x")
        sch.set_scope(rf, 0, "local")
        if epilogue is not None:
            sch.reverse_compute_at(epilogue.block_rv, bx, preserve_unit_loops=True)
            ty3, _ = sch.split(sch.fuse(*sch.get_loops(epilogue.block_rv)[1:]), factors=[ts, rw])
            sch.bind(ty3, "threadIdx.y")
            sch.set_scope(block, 0, "local")
        return sch


def _weight_read(stmt):
    """(read index, buffer) of the block's weight: the read whose region spans the
    most elements (x is [.., K], scales [N, K / group]; the weight [N, K], or [N, K / 8] uint32 words)."""
    best = None
    for i, region in enumerate(stmt.reads):
        buf = region.source
        if len(buf.shape) < 2:
            continue
        n = 1
        for d in buf.shape:
            if not isinstance(d, tirx.IntImm):
                return None
            n *= int(d)
        size = n * get_bytes(buf.dtype)
        if best is None or size > best[0]:
            best = (size, i, buf)
    if best is None:
        return None
    return best[1], best[2]


class OnlyBatchSymbolic:
    """A DLight rule applied only to PrimFuncs whose sole symbolic shape variable is named ``batch``."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        # shape variables are bound by the buffer map, so the body sees them as undefined integer vars
        # (as it does block iterators, which TVM names v_*)
        names = {v.name for v in tirx.analysis.undefined_vars(func.body, list(func.params))
                 if "int" in str(v.ty).lower() and not v.name.startswith("v_")}
        if names != {"batch"}:
            return None
        return self.rule.apply(func, target, tunable)

    def is_target_available(self, target) -> bool:
        return self.rule.is_target_available(target)

    def apply_config(self, func, config):
        return self.rule.apply_config(func, config)


class TensorCoreMatmul(GPUScheduleRule):
    """fp16 GEMMs on the tensor cores: DLight's ``MatmulTensorization`` (wmma 16x16x16, 128x128 block tiles,
    f32 accumulation where the block accumulates in f32), applied on sm_70+ including the "a" variants, under
    the condition DLight's ``Matmul`` uses: no static M/N/K extent of 64 or less (those are GEMVs and
    small-M decode GEMMs, which other rules take). Placed before ``dl.gpu.Matmul``, whose CUDA-core
    schedule then takes what this declines."""

    MIN_EXTENT = 64

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        if sm_version(str(target.attrs.get("arch", ""))) < 70 or "dlight.do_not_tensorize" in func.attrs.keys():
            return None
        sch = s_tir.Schedule(func)
        reduction = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if reduction is None or len(reduction) != 1:
            return None
        main = reduction[0]
        maps = get_index_map(sch.get(main))
        if not maps:
            return None
        sch.reindex(main, ("read", 0))
        sch.reindex(main, ("read", 1))
        sch.reindex(main, ("write", 0))
        sch.transform_block_layout(main, get_index_map(sch.get(main))[0])
        stmt = sch.get(main)
        for iv in stmt.iter_vars[1:]:    # S, I, J, K: the batch dim is not considered
            if isinstance(iv.dom.extent, tirx.IntImm) and iv.dom.extent.value <= self.MIN_EXTENT:
                return None
        in_dtype, out_dtype = get_in_out_dtypes(stmt)
        if in_dtype != "float16" or out_dtype not in ("float16", "float32"):
            return None
        return MatmulTensorization().apply(func, target, tunable)
