"""TIR schedules for the host CPU (llvm), applied after fusion as DLight's rules are on GPU.

TVM 0.27 ships DLight CPU rules only for GEMV and row reductions (softmax, norms); legalised matmul and
elementwise TIR left unscheduled runs serial and scalar (a 32x576x576 linear: ~40 ms vs torch's ~0.4 ms
here). These rules fill the gap:

* ``Matmul``: C[S, I, J] += A[S, I, K] * B[S, K, J] with J innermost in B -- weights arrive as NR-wide
  panels [N/NR, K, NR] (lowering.linear/matmul; repacked once at load by main_transform_params).
  An MR x NR register tile accumulates over all of K (NR vectorised, MR unrolled; the tile buffer is a
  small stack array LLVM keeps in registers); the (S, leading-I, J-panel) loops run in parallel; dynamic
  row counts are padded to whole tiles (pad_einsum) instead of bound-checking every FMA; fused epilogues
  (bias, activations, casts) are applied as the tile is written back.
* ``Elementwise``: injective functions: leading loops fused and parallel, the innermost vectorised.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import IterKind, detect_iter_traits, get_reduction_blocks
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width


def _is_llvm(target: Target) -> bool:
    return target.kind.name == "llvm"


def _extent(sch, loop):
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def _lanes(target: Target, dtype_bits: int) -> int:
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 1)


def _fuse(sch, loops):
    return sch.fuse(*loops) if len(loops) > 1 else loops[0]


# Below this many elements of work a kernel runs on the thread that calls it: a parallel loop is a
# fork/join of TVM's pool (a few us when the workers spin, a scheduler time slice when another process
# holds their core), and a decode step launches ~17 small kernels per layer (RoPE, cache appends, norms,
# reshapes) next to its GEMVs. Those stay serial; the GEMVs and anything with a dynamic extent (prefill)
# stay parallel. (issue 16)
MIN_PARALLEL_WORK = 1 << 15


def _work(sch, loops):
    """Iterations of ``loops`` (static extents), None when one is dynamic."""
    n = 1
    for loop in loops:
        e = _extent(sch, loop)
        if e is None:
            return None
        n *= e
    return n


def _parallel(sch, loop, work) -> None:
    """sch.parallel(loop) unless ``work`` (elements; None = dynamic) is below MIN_PARALLEL_WORK."""
    if work is None or work >= MIN_PARALLEL_WORK:
        sch.parallel(loop)


def is_reduction_block(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_all(sch, blocks, keep) -> None:
    """Inline every spatial block except ``keep`` (producers into consumers) as far as possible."""
    for b in blocks:
        if sch.get(b).same_as(sch.get(keep)):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 -- not inlinable (e.g. feeds two consumers): left as its own loop
            pass


class Matmul(ScheduleRule):
    """Register-tiled, vectorised, multi-threaded GEMM for llvm targets (see the module doc)."""

    def __init__(self, mr: int = 4, nr_vectors: int = 2):
        self.mr = mr
        self.nr_vectors = nr_vectors

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        # first with every producer (casts, transposes) read straight from the inputs inside the GEMM
        # loop; if that leaves B with J not innermost (q @ k^T), B's transpose stays a separate copy
        # last resort: an epilogue the tile write-back cannot take (it reads the GEMM result at other
        # indices, as fused.linear_glu's pairs of columns do when the panel layout does not line them up)
        # runs as its own parallel loop after the GEMM, still in this one kernel
        for inline_b, tile_epilogue in ((True, True), (False, True), (True, False), (False, False)):
            try:
                sch = self._schedule(func, target, inline_b, tile_epilogue)
            except Exception:  # noqa: BLE001 -- a pattern this rule does not cover
                sch = None
            if sch is not None:
                return sch
        return None

    def _schedule(self, func, target, inline_b: bool, tile_epilogue: bool = True):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        b_buf = sch.get(main).reads[1].source
        for b in blocks:
            if sch.get(b).same_as(sch.get(main)):
                break
            if inline_b or not any(w.source.same_as(b_buf) for w in sch.get(b).writes):
                sch.compute_inline(b)
        traits = detect_iter_traits(sch.get(main))
        if traits is None:
            return None
        main_stmt = sch.get(main)
        block_traits = traits[3]
        iter_vars = list(main_stmt.iter_vars)
        # J must be the innermost index of B for contiguous vector loads
        j_vars = [iv.var for iv, t in zip(iter_vars, block_traits) if t.kind == IterKind.kIter_J]
        lanes = _lanes(target, main_stmt.writes[0].source.dtype.bits)
        nr = lanes * self.nr_vectors
        if not j_vars or not main_stmt.reads[1].region[-1].min.same_as(j_vars[-1]):
            return None
        # B packed in NR-wide column panels ([N/NR, K, NR], see lowering.linear): one panel per tile
        j_ext = [t.extent for t in block_traits if t.kind == IterKind.kIter_J][-1]
        j_count = sum(1 for t in block_traits if t.kind == IterKind.kIter_J)
        inner_j = [t.extent for t in block_traits if t.kind == IterKind.kIter_J][1:]
        if j_count > 1 and all(isinstance(e, tirx.IntImm) for e in inner_j) \
                and int(np.prod([e.value for e in inner_j])) % lanes == 0:
            # a packed panel ([..., panels, NR] or fused.linear_glu's [..., panels, 2, NR]): the tile is
            # one whole panel wide, so an epilogue that combines columns of a panel finds them in it
            nr = int(np.prod([e.value for e in inner_j]))
        elif isinstance(j_ext, tirx.IntImm):
            while nr > lanes and j_ext.value % nr:
                nr //= 2
        # only the innermost I loop is tiled; leading ones (batch of a [batch, seq, K] input) stay outer
        # loops, since a tile straddling two of them defeats the write-back's region analysis
        i_ext = [t.extent for t in block_traits if t.kind == IterKind.kIter_I][-1]
        mr = self.mr
        if isinstance(i_ext, tirx.IntImm):
            mr = min(mr, int(i_ext.value))

        # dynamic extents are padded to whole tiles (pad_einsum adds a zero-padded input copy and an
        # unpadding epilogue): without it every FMA of the tile would sit behind a row bound check
        last_i = max(n for n, t in enumerate(block_traits) if t.kind == IterKind.kIter_I)
        padding = [1] * len(block_traits)
        if not isinstance(block_traits[last_i].extent, tirx.IntImm):
            padding[last_i] = mr
        j_pos = [n for n, t in enumerate(block_traits) if t.kind == IterKind.kIter_J][-1]
        if not isinstance(j_ext, tirx.IntImm):
            padding[j_pos] = nr
        if any(p > 1 for p in padding):
            sch.pad_einsum(main, padding)

        loops = sch.get_loops(main)
        if len(loops) != len(block_traits):
            return None
        groups = {k: [] for k in IterKind}
        for loop, t in zip(loops, block_traits):
            groups[t.kind].append(loop)
        sch.reorder(*groups[IterKind.kIter_T], *groups[IterKind.kIter_S], *groups[IterKind.kIter_I],
                    *groups[IterKind.kIter_J], *groups[IterKind.kIter_K])
        outer = groups[IterKind.kIter_T] + groups[IterKind.kIter_S] + groups[IterKind.kIter_I][:-1]
        i = groups[IterKind.kIter_I][-1]
        j = _fuse(sch, groups[IterKind.kIter_J])
        k = _fuse(sch, groups[IterKind.kIter_K])

        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(jo, io, k, ii, ji)
        par = sch.fuse(*outer, jo) if outer else jo
        sch.parallel(par)
        sch.unroll(ii)
        sch.vectorize(ji)

        # the MR x NR accumulator tile lives in a small buffer (registers once unrolled); the epilogue
        # (unpadding, bias, activation, casts -- fused by FuseOps) is applied as the tile is written back
        blocks = sch.get_child_blocks(get_root_block(sch))
        pos = [n for n, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
        epilogue = blocks[pos + 1:]
        for b in epilogue[:-1]:
            sch.compute_inline(b)
        if not tile_epilogue and epilogue:
            Elementwise._loops(sch, epilogue[-1], target)
            epilogue = []
        # (scope "global": TVM puts small constant-size global buffers on the stack, where LLVM promotes
        # them to registers, but serves "local" ones from the heap workspace allocator on CPU)
        if epilogue:
            wb = epilogue[-1]
        else:
            wb = sch.cache_write(main, 0, "global")
        sch.reverse_compute_at(wb, io, preserve_unit_loops=True)
        wb_loops = list(sch.get_loops(wb))
        wb_loops = wb_loops[[sch.get(l).same_as(sch.get(io)) for l in wb_loops].index(True) + 1:]
        if _extent(sch, wb_loops[-1]) == nr:
            sch.vectorize(wb_loops[-1])
            wb_loops = wb_loops[:-1]
        for loop in wb_loops:
            # constant tile indices everywhere let LLVM keep the accumulator tile in registers (SROA);
            # a rolled write-back loop would pin it to the stack and store it on every k step
            if _extent(sch, loop) is not None:
                sch.unroll(loop)
        init = sch.decompose_reduction(main, k)
        sch.vectorize(sch.get_loops(init)[-1])
        for b in blocks[:pos]:  # padded / transposed input copies
            Elementwise._loops(sch, b, target)
        return sch


class Elementwise(ScheduleRule):
    """Injective functions: fuse leading loops into one parallel loop, vectorise the innermost."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        try:
            return self._schedule(func, target)
        except Exception:  # noqa: BLE001
            return None

    def _schedule(self, func, target):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        for b in blocks:
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
                return None
        last = blocks[-1]
        _inline_all(sch, blocks[:-1], last)
        for b in sch.get_child_blocks(get_root_block(sch)):
            self._loops(sch, b, target)
        return sch

    @staticmethod
    def _loops(sch, block, target):
        loops = sch.get_loops(block)
        if not loops:
            return
        work = _work(sch, loops)
        bits = sch.get(block).writes[0].source.dtype.bits if sch.get(block).writes else 32
        lanes = _lanes(target, max(bits, 8))
        inner = loops[-1]
        n = _extent(sch, inner)
        if n is not None and n % lanes == 0 and n > 1:
            outer, vec = sch.split(inner, [None, min(n, lanes)])
            loops = [*loops[:-1], outer]
            sch.vectorize(vec)
        elif len(loops) > 1:
            # a ragged or dynamic row: left as a plain inner loop, which LLVM vectorises with a tail
            loops = loops[:-1]
        else:
            loops = list(sch.split(inner, [None, 256]))[:1]
        _parallel(sch, _fuse(sch, loops), work)


class AddNorm(ScheduleRule):
    """fused.add_rms_norm / add_layer_norm (lowering_fused): the residual sum is an output as well as the
    norm's input, which DLight's CPU Reduction rule cannot place (it compute_at's every producer, and an
    output block cannot move). Here everything moves under the sum's row loop instead, one row per
    iteration, rows in parallel, inner loops vectorised."""

    NORMS = ("rms_norm", "layer_norm")

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(get_root_block(sch))
            names = [sch.get(b).name_hint for b in blocks]
            if len(blocks) < 3 or names[0] != "T_add" or names[-1] not in self.NORMS:
                return None
            loops = sch.get_loops(blocks[0])
            work = _work(sch, loops)
            row = _fuse(sch, loops[:-1]) if len(loops) > 1 else None
            if row is None:
                return None
            for b in blocks[1:]:
                sch.reverse_compute_at(b, row)
            _parallel(sch, row, work)
            lanes = _lanes(target, 32)
            for b in (blocks[0], blocks[-1]):
                inner = sch.get_loops(b)[-1]
                n = _extent(sch, inner)
                if n is not None and n % lanes == 0:
                    sch.vectorize(sch.split(inner, [None, lanes])[1])
            return sch
        except Exception:  # noqa: BLE001 -- another shape: left to the next rule
            return None


class SingleRowReduction(ScheduleRule):
    """A norm (or any row reduction with its producers and epilogue) over a single row, as in a decode step.

    DLight's CPU Reduction rule finds no row loop of extent > 1 there, parallelises the output columns and
    recomputes the row's reduction under each of them: SmolLM2's final rms_norm did 576 x 576 work, 165 us
    instead of ~1 us (found by ``llmasos tune``, whose search beat it 150x). Here: producers inlined, the
    reduction and the epilogue one after the other on one thread (a row is far too little work to share),
    the epilogue vectorised."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(get_root_block(sch))
            reductions = [b for b in blocks if is_reduction_block(sch, b)]
            if not reductions:
                return None
            for b in reductions:  # one row: every spatial iterator of each reduction has extent 1
                for iv in sch.get(b).iter_vars:
                    if iv.iter_type == tirx.IterVar.DataPar and not (isinstance(iv.dom.extent, tirx.IntImm)
                                                                    and iv.dom.extent.value == 1):
                        return None
            for b in blocks:
                if is_reduction_block(sch, b):
                    continue
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001 -- an output or a block feeding two consumers
                    try:
                        sch.reverse_compute_inline(b)
                    except Exception:  # noqa: BLE001
                        pass
            lanes = _lanes(target, 32)
            for b in sch.get_child_blocks(get_root_block(sch)):
                if is_reduction_block(sch, b):
                    continue
                loops = sch.get_loops(b)
                if not loops:
                    continue
                inner = _fuse(sch, loops)
                n = _extent(sch, inner)
                if n is not None and n % lanes == 0:
                    sch.vectorize(sch.split(inner, [None, lanes])[1])
            return sch
        except Exception:  # noqa: BLE001 -- another shape: left to the next rule
            return None


def default_rules():
    """The rule list for llvm targets, tried in order on each PrimFunc."""
    return [Matmul(), AddNorm(), SingleRowReduction(), dl.cpu.GEMV(), dl.cpu.Reduction(), Elementwise()]
