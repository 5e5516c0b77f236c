"""A reference SIMT interpreter for hand-scheduled CUDA TIR kernels, so their numerics are checked on a
machine without a GPU (tests/backends/test_cuda_schedule.py, test_cuda_quant_gemm.py, test_cuda_attention.py).

``run(func, *arrays)`` executes a scheduled PrimFunc (thread-binding loops over blockIdx / threadIdx, then
one SBlock of per-thread code: the shape of cuda_gemm.py's kernels) on numpy arrays: every thread of the
grid at once, in lock step, one numpy lane per thread. Local buffers are [threads, size] arrays, shared
ones [blocks, size]; a branch on a per-thread condition runs under a mask. Warp-collective instructions see
their warp's 32 lanes: ``ptx_legacy.mma`` m16n8k16 (row.col, f16 x f16 -> f32) gathers its A, B and C
fragments from the lanes by the PTX ISA's fragment layout and scatters D back (``ldmatrix`` x1/x2/x4,
plain or ``.trans``, fills them from shared memory by the same layout; ``cp.async`` copies land at the
``wait_group`` that covers them, and reading one before is an error), so a kernel whose lanes hold
the wrong elements computes the wrong product here as on the GPU; a warp only partly active at an
``mma.sync`` is an error, as is a global access out of bounds by an active thread. The half2 / bit
instructions (``lop3``, ``prmt``, ``sub.f16x2``, ``fma.rn.f16x2``) follow the ISA bit for bit (one rounding
to f16), ``tvm_warp_shuffle_xor`` reads its partner lane. ``tvm_thread_allreduce`` (a sum, under its ``reduce_scope``) gives each thread the sum over the
threads of its block that differ only in the reduced indices, all of which must be active. Lock step is a legal schedule of a kernel with correct barriers, and the races it would hide are
errors: a thread reading a shared element another thread wrote since the last ``tvm_storage_sync`` (a
missing barrier), a thread writing a shared element another thread read since then (write after read),
two threads storing to one shared or global element in the same step, a barrier reached by only some
threads of a block. A serial loop whose trip count differs between threads (read from a
per-block position, as the flash prefill kernel's tile loop) runs to the largest count with each thread
masked off past its own; a block whose threads have all left such a loop is not waited for at a barrier.

Only the constructs these kernels use are implemented; anything else raises NotImplementedError naming it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_NP = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
       "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
       "uint64": np.uint64, "bool": np.bool_}

_THREAD_TAGS = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z")


def _dt(expr) -> str:
    """An expression's dtype name (this TVM keeps it in ``ty``, older ones in ``dtype``)."""
    dtype = getattr(expr, "dtype", None)
    return str(dtype if dtype is not None else expr.ty)


def _binding(loop) -> bool:
    """Whether a For is a thread-binding loop (ForKind is an int in this TVM)."""
    return int(loop.kind) == 4 if isinstance(loop.kind, int) else loop.kind.name == "THREAD_BINDING"


def _buffer(node):
    """The buffer a load or store touches (``source`` in this TVM, ``buffer`` in older ones)."""
    return node.buffer if hasattr(node, "buffer") else node.source


def _np_dtype(dtype) -> Any:
    name = str(dtype)
    if name not in _NP:
        raise NotImplementedError(f"simt: dtype {name} is not supported")
    return _NP[name]


class _Storage:
    """A buffer's elements: ``scope`` global (one flat array), local ([threads, size]) or shared ([blocks, size])."""

    def __init__(self, array: np.ndarray, scope: str, name: str):
        self.array, self.scope, self.name = array, scope, name
        # shared: the thread that wrote each element since the last barrier (-1: none), to catch a read of
        # another thread's write with no barrier between -- a race lock step would otherwise hide
        self.writer = np.full(array.shape, -1, np.int64) if scope == "shared" else None
        # shared: the thread that read each element since the last barrier (-1: none, -2: several), to catch
        # a write over an element another thread read with no barrier between (write after read): lock step
        # runs every read of a step before the next step's write, so on a GPU that write could land first
        self.reader = np.full(array.shape, -1, np.int64) if scope == "shared" else None
        # shared: copies issued by cp.async that have not landed (a thread's wait_group lands them)
        self.pending = np.zeros(array.shape, np.int32) if scope == "shared" else None


class _Machine:
    def __init__(self, func, arrays):
        self.func = func
        self.env: dict = {}
        self.store: dict = {}          # buffer data Var -> _Storage
        self.mask = None               # bool [threads] while inside the thread grid
        self._reducer = None           # the enclosing reduce_scope's reducer ("add"), for tvm_thread_allreduce
        self._copies: list = []        # cp.async copies in flight: [tids, groups, storage, rows, flat, values]
        self._commits = None           # per thread: cp.async groups committed so far
        self.threads = 0
        params = list(func.params)
        if len(params) != len(arrays):
            raise ValueError(f"simt.run: the kernel takes {len(params)} arguments, got {len(arrays)}")
        for var, arr in zip(params, arrays):
            buf = func.buffer_map[var] if hasattr(func, "buffer_map") else var   # (this TVM: params are buffers)
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"simt.run: argument {buf.name} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != _np_dtype(buf.dtype):
                raise TypeError(f"simt.run: argument {buf.name} must be {buf.dtype}, got {arr.dtype}")
            if len(arr.shape) != len(buf.shape):
                raise ValueError(f"simt.run: argument {buf.name} must have rank {len(buf.shape)}, got {arr.shape}")
            for dim, size in zip(buf.shape, arr.shape):
                if type(dim).__name__ == "Var" and dim not in self.env:
                    self.env[dim] = np.int64(size)
            want = tuple(int(self.scalar(d)) for d in buf.shape)
            if want != arr.shape:
                raise ValueError(f"simt.run: argument {buf.name} must have shape {want}, got {arr.shape}")
            if not arr.flags.c_contiguous:
                raise ValueError(f"simt.run: argument {buf.name} must be C-contiguous")
            self.store[buf] = _Storage(arr.reshape(-1), "global", buf.name)
            self.env[buf] = buf

    # -- expressions ---------------------------------------------------------------------------------
    def scalar(self, expr):
        v = self.eval(expr)
        if isinstance(v, np.ndarray) and v.ndim:
            raise NotImplementedError(f"simt: {expr} must be the same for every thread here")
        return v

    def eval(self, e):
        kind = type(e).__name__
        fn = getattr(self, "_e_" + kind, None)
        if fn is None:
            raise NotImplementedError(f"simt: expression {kind} ({e}) is not supported")
        return fn(e)

    def _cast(self, v, dtype):
        return np.asarray(v).astype(_np_dtype(dtype)) if isinstance(v, np.ndarray) else _np_dtype(dtype)(v)

    def _e_IntImm(self, e):
        return _np_dtype(_dt(e))(e.value)

    def _e_FloatImm(self, e):
        return _np_dtype(_dt(e))(e.value)

    def _e_StringImm(self, e):
        return e.value

    def _e_Var(self, e):
        if e not in self.env:
            raise NotImplementedError(f"simt: variable {e} has no value")
        return self.env[e]

    def _binary(self, e, op):
        with np.errstate(over="ignore"):
            return self._cast(op(self.eval(e.a), self.eval(e.b)), _dt(e))

    def _e_Add(self, e):
        return self._binary(e, np.add)

    def _e_Sub(self, e):
        return self._binary(e, np.subtract)

    def _e_Mul(self, e):
        return self._binary(e, np.multiply)

    def _e_FloorDiv(self, e):
        return self._binary(e, np.floor_divide)

    def _e_FloorMod(self, e):
        return self._binary(e, np.mod)

    def _e_Div(self, e):
        if "float" in str(_dt(e)):
            return self._binary(e, np.divide)
        return self._binary(e, lambda a, b: np.trunc(np.divide(a, b)))

    def _e_Mod(self, e):
        return self._binary(e, np.fmod)

    def _e_Min(self, e):
        return self._binary(e, np.minimum)

    def _e_Max(self, e):
        return self._binary(e, np.maximum)

    def _e_LT(self, e):
        return np.less(self.eval(e.a), self.eval(e.b))

    def _e_LE(self, e):
        return np.less_equal(self.eval(e.a), self.eval(e.b))

    def _e_GT(self, e):
        return np.greater(self.eval(e.a), self.eval(e.b))

    def _e_GE(self, e):
        return np.greater_equal(self.eval(e.a), self.eval(e.b))

    def _e_EQ(self, e):
        return np.equal(self.eval(e.a), self.eval(e.b))

    def _e_NE(self, e):
        return np.not_equal(self.eval(e.a), self.eval(e.b))

    def _e_And(self, e):
        return np.logical_and(self.eval(e.a), self.eval(e.b))

    def _e_Or(self, e):
        return np.logical_or(self.eval(e.a), self.eval(e.b))

    def _e_Not(self, e):
        return np.logical_not(self.eval(e.a))

    def _e_Select(self, e):
        return self._cast(np.where(self.eval(e.condition), self.eval(e.true_value), self.eval(e.false_value)),
                          _dt(e))

    def _e_Cast(self, e):
        return self._cast(self.eval(e.value), _dt(e))

    def _e_BitwiseAnd(self, e):
        return self._binary(e, np.bitwise_and)

    def _e_BitwiseOr(self, e):
        return self._binary(e, np.bitwise_or)

    def _e_BitwiseXor(self, e):
        return self._binary(e, np.bitwise_xor)

    def _e_LShift(self, e):
        return self._binary(e, np.left_shift)

    def _e_RShift(self, e):
        return self._binary(e, np.right_shift)

    def _e_Let(self, e):
        self.env[e.var] = self.eval(e.value)
        return self.eval(e.body)

    def _flat(self, buf, indices):
        flat = np.int64(0)
        for dim, idx in zip(buf.shape, indices):
            flat = flat * np.int64(self.scalar(dim)) + np.asarray(self.eval(idx)).astype(np.int64)
        return flat

    def _lanes(self, flat, storage, mask):
        """(row index per thread, flat index per thread) of an access, bounds-checked for the active threads."""
        size = storage.array.shape[-1]
        flat = np.broadcast_to(flat, (self.threads,))
        bad = mask & ((flat < 0) | (flat >= size))
        if bad.any():
            i = int(np.argmax(bad))
            raise IndexError(f"simt: thread {i} accesses {storage.name}[{int(flat[i])}] of {size} elements")
        flat = np.where(mask, flat, 0)
        if storage.scope == "local":
            return self.tid, flat
        if storage.scope == "shared":
            return self.block, flat
        return None, flat

    def _e_TensorLoad(self, e):
        buf = _buffer(e)
        storage = self.store[buf]
        rows, flat = self._lanes(self._flat(buf, e.indices), storage, self.mask)
        if storage.pending is not None and (self.mask & (storage.pending[rows, flat] > 0)).any():
            i = int(np.argmax(self.mask & (storage.pending[rows, flat] > 0)))
            raise RuntimeError(f"simt: thread {i} reads {storage.name}[{int(flat[i])}] while a cp.async copy into "
                               f"it has not landed (no cp.async.wait_group covering it)")
        if storage.writer is not None:
            w = storage.writer[rows, flat]
            bad = self.mask & (w >= 0) & (w != self.tid)
            if bad.any():
                i = int(np.argmax(bad))
                raise RuntimeError(f"simt: thread {i} reads {storage.name}[{int(flat[i])}], written by thread "
                                   f"{int(w[i])} with no barrier between (a race)")
        if storage.reader is not None:
            self._note_readers(storage, rows, flat)
        return storage.array[flat] if rows is None else storage.array[rows, flat]

    _e_BufferLoad = _e_TensorLoad

    def _note_readers(self, storage, rows, flat):
        m = self.mask
        r, f, t = rows[m], flat[m], self.tid[m]
        key = r * storage.array.shape[-1] + f
        order = np.lexsort((t, key))
        key, t = key[order], t[order]
        first = np.r_[True, key[1:] != key[:-1]]
        start = np.flatnonzero(first)
        lo = t[start]                                   # per element read this step: smallest and largest tid
        hi = t[np.r_[start[1:], len(t)] - 1]
        kk = key[start]
        cur = storage.reader.reshape(-1)[kk]
        one = lo == hi
        new = np.where(one & ((cur == -1) | (cur == lo)), lo, -2)
        storage.reader.reshape(-1)[kk] = new

    def _e_Call(self, e):
        name = e.op.name
        fn = getattr(self, "_c_" + name.replace("tirx.", "").replace("prim.", "").replace(".", "_"), None)
        if fn is None:
            raise NotImplementedError(f"simt: call {name} is not supported")
        return fn(e)

    # -- calls -----------------------------------------------------------------------------------------
    def _c_tvm_storage_sync(self, e):
        # a block's barrier must be reached by all its threads; blocks whose threads are all masked off
        # (past a per-block loop end) are simply not at it
        per_block = np.bincount(self.block, weights=self.mask, minlength=int(self.block.max()) + 1)
        size = np.bincount(self.block, minlength=int(self.block.max()) + 1)
        if ((per_block > 0) & (per_block < size)).any():
            raise RuntimeError("simt: a barrier (tvm_storage_sync) reached by only some threads of a block")
        at = per_block > 0
        for st in self.store.values():     # lock step: every write before it is now visible to the block
            if st.writer is not None:
                st.writer[at] = -1
                st.reader[at] = -1
        return None

    def _c_tvm_thread_allreduce(self, e):
        """A cross-thread sum (the ``reduce_scope`` attribute above it names the reducer): each thread gets the
        sum over the threads of its block that differ only in the reduced thread indices; every thread of
        such a group must be active (on a GPU the others would wait forever or read garbage)."""
        if self._reducer != "add":
            raise NotImplementedError(f"simt: tvm_thread_allreduce with reducer {self._reducer}")
        if int(self.scalar(e.args[0])) != 1 or not bool(np.all(self.eval(e.args[2]))):
            raise NotImplementedError("simt: tvm_thread_allreduce of several values or with a condition")
        value = np.broadcast_to(np.asarray(self.eval(e.args[1])), (self.threads,))
        key = self.tid.copy()
        for var in e.args[4:]:
            tag = next((t for t, v in self._thread_vars.items() if v.same_as(var)), None)
            if tag is None or not tag.startswith("threadIdx"):
                raise NotImplementedError(f"simt: tvm_thread_allreduce over {var}, not a threadIdx variable")
            key = key - self._coords[tag] * self._strides[tag]
        uniq, group = np.unique(key, return_inverse=True)
        active = np.bincount(group, weights=self.mask, minlength=len(uniq))
        size = np.bincount(group, minlength=len(uniq))
        if ((active > 0) & (active < size)).any():
            raise RuntimeError("simt: tvm_thread_allreduce reached by only some threads of a group")
        sums = np.zeros(len(uniq), np.float64)
        np.add.at(sums, group, value.astype(np.float64))
        self._write(e.args[3], sums[group].astype(value.dtype))
        return None

    def _c_tvm_warp_shuffle_xor(self, e):
        """``__shfl_xor_sync(mask, value, lane_mask, 32)``: each active thread gets ``value`` of lane
        ``lane ^ lane_mask`` of its warp, which must be active too (the full-warp form only)."""
        value = np.broadcast_to(np.asarray(self.eval(e.args[1])), (self.threads,))
        lane_mask, width = int(self.scalar(e.args[2])), int(self.scalar(e.args[3]))
        if width != 32 or not 0 < lane_mask < 32:
            raise NotImplementedError(f"simt: tvm_warp_shuffle_xor lane mask {lane_mask}, width {width}")
        partner = np.arange(self.threads) ^ lane_mask      # within the warp: warps are 32 aligned lanes
        if (self.mask & ~self.mask[partner]).any():
            raise RuntimeError("simt: tvm_warp_shuffle_xor reads a lane that is not active")
        return value[partner].copy()

    def _c_exp2(self, e):
        with np.errstate(over="ignore", under="ignore"):
            return self._cast(np.exp2(self.eval(e.args[0])), _dt(e))

    def _c_buffer_data(self, e):
        return e.args[0]

    def _pointer(self, ref, offset):
        """(storage, per-thread element offset) of a PTX intrinsic's (pointer, offset) argument pair: the
        pointer a buffer's data Var or ``tvm_access_ptr(dtype, data, elem_offset, extent, rw)`` (whose
        elem_offset adds to the offset; its dtype must be the buffer's: the offset counts its elements)."""
        off = self._per_thread(offset, np.int64)
        if type(ref).__name__ == "Call" and ref.op.name.endswith("tvm_access_ptr"):
            st = self.store[self.eval(ref.args[1])]
            if np.dtype(_np_dtype(_dt(ref.args[0]))) != st.array.dtype:
                raise NotImplementedError(f"simt: an access_ptr of {_dt(ref.args[0])} into {st.name} "
                                          f"({st.array.dtype})")
            return st, off + self._per_thread(ref.args[2], np.int64)
        return self.store[self.eval(ref)], off

    def _c_reinterpret(self, e):
        v = np.asarray(self.eval(e.args[0]))
        return v.view(_np_dtype(_dt(e)))

    def _c_if_then_else(self, e):
        return self._cast(np.where(self.eval(e.args[0]), self.eval(e.args[1]), self.eval(e.args[2])), _dt(e))

    def _c_shift_right(self, e):
        return self._cast(np.right_shift(self.eval(e.args[0]), self.eval(e.args[1])), _dt(e))

    def _c_shift_left(self, e):
        return self._cast(np.left_shift(self.eval(e.args[0]), self.eval(e.args[1])), _dt(e))

    def _c_bitwise_and(self, e):
        return self._cast(np.bitwise_and(self.eval(e.args[0]), self.eval(e.args[1])), _dt(e))

    def _c_bitwise_or(self, e):
        return self._cast(np.bitwise_or(self.eval(e.args[0]), self.eval(e.args[1])), _dt(e))

    def _c_bitwise_xor(self, e):
        return self._cast(np.bitwise_xor(self.eval(e.args[0]), self.eval(e.args[1])), _dt(e))

    def _write(self, dest, value):
        """An instruction's destination register: a one-element local buffer load."""
        if type(dest).__name__ not in ("TensorLoad", "BufferLoad"):
            raise NotImplementedError(f"simt: instruction destination {dest} must be a buffer element")
        self._store(_buffer(dest), dest.indices, value)

    def _per_thread(self, e, dtype):
        """``e`` evaluated for every thread, as ``dtype``."""
        return np.broadcast_to(np.asarray(self.eval(e)).astype(dtype), (self.threads,))

    def _u32(self, e):
        return self._per_thread(e, np.uint32)

    def _c_ptx_lop3(self, e):
        a, b, c = (self._u32(x) for x in e.args[1:4])
        lut = int(self.scalar(e.args[4]))
        out = np.zeros(self.threads, np.uint32)
        for i in range(8):
            if lut >> i & 1:
                out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
        self._write(e.args[0], out)

    def _c_ptx_prmt(self, e):
        a, b = self._u32(e.args[1]), self._u32(e.args[2])
        sel = int(self.scalar(e.args[3]))
        if any(str(x.value) for x in e.args[5:] if type(x).__name__ == "StringImm"):
            raise NotImplementedError("simt: prmt modes other than the default")
        src = np.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)])
        out = np.zeros(self.threads, np.uint32)
        for i in range(4):
            nib = sel >> (4 * i) & 0xF
            byte = src[nib & 7]
            if nib & 8:      # sign replication
                byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
            out |= byte.astype(np.uint32) << np.uint32(8 * i)
        self._write(e.args[0], out)

    @staticmethod
    def _halves(u):
        return np.ascontiguousarray(u).view(np.float16).reshape(-1, 2).astype(np.float64)

    @staticmethod
    def _pack(h):
        return np.ascontiguousarray(h.astype(np.float16)).view(np.uint32).reshape(-1)

    def _check_f16x2(self, e):
        strs = [str(x.value) for x in e.args if type(x).__name__ == "StringImm"]
        if "f16x2" not in strs or any(s not in ("", "f16x2", "rn") for s in strs):
            raise NotImplementedError(f"simt: {e.op.name} with modifiers {strs}")

    def _c_ptx_sub_half(self, e):
        self._check_f16x2(e)
        a, b = self._halves(self._u32(e.args[1])), self._halves(self._u32(e.args[2]))
        self._write(e.args[0], self._pack(a - b))          # exact in f64, one rounding to f16

    def _c_ptx_fma_half(self, e):
        self._check_f16x2(e)
        a, b, c = (self._halves(self._u32(x)) for x in e.args[1:4])
        self._write(e.args[0], self._pack(a * b + c))     # a * b exact in f64; one rounding to f16

    def _address(self, e):
        """(storage, row per thread, flat element per thread) of ``address_of(buf[...])`` (through
        ``cvta_generic_to_shared``)."""
        if type(e).__name__ == "Call" and e.op.name.endswith("cvta_generic_to_shared"):
            e = e.args[0]
        if type(e).__name__ != "Call" or not e.op.name.endswith("address_of"):
            raise NotImplementedError(f"simt: an address other than address_of(buffer[...]): {e}")
        load = e.args[0]
        buf = _buffer(load)
        storage = self.store[buf]
        flat = np.broadcast_to(np.asarray(self._flat(buf, load.indices)).astype(np.int64), (self.threads,))
        rows = self.tid if storage.scope == "local" else self.block if storage.scope == "shared" else None
        return storage, rows, flat

    def _c_ptx_cp_async_cg(self, e):
        return self._c_ptx_cp(e)

    _c_ptx_cp_async_cg_src_size = _c_ptx_cp_async_cg
    _c_ptx_cp_async_ca = _c_ptx_cp_async_cg
    _c_ptx_cp_async_ca_src_size = _c_ptx_cp_async_cg
    _c_ptx_cp_async_commit_group = _c_ptx_cp_async_cg
    _c_ptx_cp_async_wait_group = _c_ptx_cp_async_cg

    def _c_ptx_cp(self, e):
        """``cp.async`` (16-byte global -> shared copies, src-size zero-filling), ``commit_group`` and
        ``wait_group N``. A copy is read from global when issued and lands in shared memory when a wait of
        its thread covers its group (all but the N most recent committed groups); a read or store of an
        element whose copy has not landed is an error (a missing wait), and a landed copy counts as its
        thread's write (other threads read it only after a barrier)."""
        strs = [str(x.value) for x in e.args if type(x).__name__ == "StringImm"]
        if self._commits is None:
            self._commits = np.zeros(self.threads, np.int64)
        m = self.mask
        if "commit_group" in strs:
            self._commits[m] += 1
            return None
        if "wait_group" in strs:
            keep = int(self.scalar(e.args[0]))
            rest = []
            for tids, groups, st, rows, flat, vals in self._copies:
                land = m[tids] & (groups < self._commits[tids] - keep)
                if land.any():
                    r, f = rows[land], flat[land]
                    st.array[r[:, None], f] = vals[land]
                    np.subtract.at(st.pending, (np.repeat(r, f.shape[1]), f.reshape(-1)), 1)
                    st.writer[r[:, None], f] = tids[land][:, None]
                if (~land).any():
                    rest.append([tids[~land], groups[~land], st, rows[~land], flat[~land], vals[~land]])
            self._copies = rest
            return None
        if "async" not in strs or "shared" not in strs or "global" not in strs:
            raise NotImplementedError(f"simt: ptx.cp {strs}")
        nbytes = int(self.scalar(e.args[2]))
        has_size = type(e.args[3]).__name__ != "StringImm"
        dst, drows, dflat = self._address(e.args[0])
        src, _, sflat = self._address(e.args[1])
        if dst.scope != "shared" or src.scope != "global":
            raise NotImplementedError("simt: cp.async other than global -> shared")
        n = nbytes // dst.array.dtype.itemsize
        if nbytes % dst.array.dtype.itemsize or src.array.dtype != dst.array.dtype:
            raise NotImplementedError("simt: cp.async between buffers of different element types")
        size = self._per_thread(e.args[3], np.int64) if has_size else np.full(self.threads, nbytes, np.int64)
        tids = np.flatnonzero(m)
        cols = dflat[tids][:, None] + np.arange(n)[None, :]
        if ((cols < 0) | (cols >= dst.array.shape[-1])).any():
            raise IndexError(f"simt: cp.async past the end of {dst.name}")
        scols = sflat[tids][:, None] + np.arange(n)[None, :]
        reads = size[tids] > 0
        if ((scols[reads] < 0) | (scols[reads] >= src.array.shape[-1])).any():
            raise IndexError(f"simt: cp.async reads past the end of {src.name}")
        vals = src.array[np.clip(scols, 0, src.array.shape[-1] - 1)]
        filled = np.arange(n)[None, :] * dst.array.dtype.itemsize < size[tids][:, None]   # src-size: zeros after
        vals = np.where(filled, vals, np.zeros((), vals.dtype))
        r = drows[tids]
        if (dst.pending[r[:, None], cols] > 0).any() or (dst.reader[r[:, None], cols] >= 0).any() \
                or (dst.reader[r[:, None], cols] == -2).any():
            raise RuntimeError(f"simt: cp.async into {dst.name} over a copy in flight or an element read since "
                               f"the last barrier (a race)")
        np.add.at(dst.pending, (np.repeat(r, n), cols.reshape(-1)), 1)
        self._copies.append([tids, self._commits[tids].copy(), dst, r, cols, vals])
        return None

    def _whole_warps(self, what: str) -> np.ndarray:
        """[warps] bool: the warps executing a warp-collective instruction ``what``, which must find each warp
        wholly active or wholly masked off."""
        warps = self.mask.reshape(-1, 32)
        if not (warps.all(axis=1) | ~warps.any(axis=1)).all():
            raise RuntimeError(f"simt: {what} executed by a partly active warp")
        return warps.all(axis=1)

    def _c_ptx_legacy_ldmatrix(self, e):
        """``ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16``: lane l gives the shared address of row l % 8
        of matrix l // 8 (N matrices, lanes 8N.. unused); each lane receives, per matrix i, the two halves at
        row l // 4, columns 2 (l % 4) and 2 (l % 4) + 1 (.trans: rows 2 (l % 4) and 2 (l % 4) + 1 of column
        l // 4) into its fragment at local_offset + 2 i. Every row must lie in shared memory written before
        the last barrier (a race otherwise); the whole warp must be active."""
        trans, num = bool(self.scalar(e.args[0])), int(self.scalar(e.args[1]))
        if str(e.args[2].value) != ".b16" or num not in (1, 2, 4):
            raise NotImplementedError(f"simt: ldmatrix .x{num} {e.args[2].value}")
        live = np.repeat(self._whole_warps("ldmatrix"), 32)
        if not live.any():
            return None
        dst, doff = self._pointer(e.args[3], e.args[4])
        src, soff = self._pointer(e.args[5], e.args[6])
        if src.scope != "shared" or dst.scope != "local":
            raise NotImplementedError("simt: ldmatrix from a non-shared or into a non-local buffer")
        if src.array.dtype.itemsize != 2 or dst.array.dtype.itemsize != 2:
            raise NotImplementedError("simt: ldmatrix into or from a buffer of other than 16-bit elements")
        size = src.array.shape[-1]
        lane = np.arange(self.threads) % 32
        base = np.arange(self.threads) - lane                   # each thread's warp's lane 0
        cols = soff[:, None] + np.arange(8)[None, :]             # [threads, 8]: the row each lane addresses
        rowlive = live & (lane < 8 * num)
        if ((cols[rowlive] < 0) | (cols[rowlive] >= size)).any():
            raise IndexError(f"simt: ldmatrix row past the end of {src.name}")
        blk = self.block
        if (rowlive[:, None] & (src.pending[blk[:, None], np.clip(cols, 0, size - 1)] > 0)).any():
            raise RuntimeError(f"simt: ldmatrix reads {src.name} while a cp.async copy into it has not landed")
        if src.writer is not None:
            w = src.writer[blk[:, None], np.clip(cols, 0, size - 1)]
            if (rowlive[:, None] & (w >= 0)).any():
                raise RuntimeError(f"simt: ldmatrix reads {src.name} written with no barrier between (a race)")
            src.reader[blk[rowlive][:, None], cols[rowlive]] = -2
        rows = src.array[blk[:, None], np.clip(cols, 0, size - 1)]   # [threads, 8]
        out = np.zeros((self.threads, 2 * num), src.array.dtype)
        g, t = lane // 4, lane % 4
        for i in range(num):
            if trans:   # rows 2t, 2t + 1 of matrix i, column g
                out[:, 2 * i] = rows[base + 8 * i + 2 * t, g]
                out[:, 2 * i + 1] = rows[base + 8 * i + 2 * t + 1, g]
            else:       # row g of matrix i, columns 2t, 2t + 1
                out[:, 2 * i] = rows[base + 8 * i + g, 2 * t]
                out[:, 2 * i + 1] = rows[base + 8 * i + g, 2 * t + 1]
        dcols = doff[:, None] + np.arange(2 * num)[None, :]
        if ((dcols[live] < 0) | (dcols[live] >= dst.array.shape[1])).any():
            raise IndexError(f"simt: ldmatrix fragment past the end of {dst.name}")
        tid = np.flatnonzero(live)
        dst.array[tid[:, None], dcols[live]] = out[live].view(dst.array.dtype)
        return None

    def _c_ptx_legacy_mma(self, e):
        shape, la, lb, ta, tb, tc = (str(x.value) for x in e.args[:6])
        if (shape, la, lb, ta, tb, tc) != ("m16n8k16", "row", "col", "fp16", "fp16", "fp32"):
            raise NotImplementedError(f"simt: mma {shape} {la}.{lb} {ta}x{tb}->{tc}")
        if bool(self.scalar(e.args[12])):
            raise NotImplementedError("simt: saturating mma")
        live = self._whole_warps("mma.sync")
        if not live.any():
            return None

        def frag(ref, offset, count, dtype):
            st, off = self._pointer(ref, offset)
            width = np.dtype(dtype).itemsize
            own = st.array.dtype.itemsize
            n_own = count * width // own
            cols = off[:, None] + np.arange(n_own)[None, :]
            if (cols >= st.array.shape[1]).any() or (cols < 0).any():
                raise IndexError(f"simt: mma fragment past the end of {st.name}")
            raw = np.ascontiguousarray(st.array[self.tid[:, None], cols])
            return st, cols, raw.view(dtype).reshape(self.threads, count)

        _, _, a = frag(e.args[6], e.args[7], 8, np.float16)
        _, _, b = frag(e.args[8], e.args[9], 4, np.float16)
        cst, ccols, c = frag(e.args[10], e.args[11], 4, np.float32)
        a = a.reshape(-1, 32, 8)[live].astype(np.float32)
        b = b.reshape(-1, 32, 4)[live].astype(np.float32)
        c = c.reshape(-1, 32, 4)[live]
        nw = a.shape[0]
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        A = np.zeros((nw, 16, 16), np.float32)
        B = np.zeros((nw, 16, 8), np.float32)
        C = np.zeros((nw, 16, 8), np.float32)
        for i in range(2):
            A[:, g, 2 * t + i] = a[:, :, i]
            A[:, g + 8, 2 * t + i] = a[:, :, 2 + i]
            A[:, g, 2 * t + 8 + i] = a[:, :, 4 + i]
            A[:, g + 8, 2 * t + 8 + i] = a[:, :, 6 + i]
            B[:, 2 * t + i, g] = b[:, :, i]
            B[:, 2 * t + 8 + i, g] = b[:, :, 2 + i]
            C[:, g, 2 * t + i] = c[:, :, i]
            C[:, g + 8, 2 * t + i] = c[:, :, 2 + i]
        D = (A.astype(np.float64) @ B.astype(np.float64) + C).astype(np.float32)
        d = np.zeros((nw, 32, 4), np.float32)
        for i in range(2):
            d[:, :, i] = D[:, g, 2 * t + i]
            d[:, :, 2 + i] = D[:, g + 8, 2 * t + i]
        rows = self.tid.reshape(-1, 32)[live].reshape(-1)
        cols = ccols.reshape(-1, 32, 4)[live].reshape(-1, 4)
        cst.array[rows[:, None], cols] = d.reshape(-1, 4)
        return None

    # -- statements ------------------------------------------------------------------------------------
    def _store(self, buf, indices, value):
        storage = self.store[buf]
        rows, flat = self._lanes(self._flat(buf, indices), storage, self.mask)
        value = np.broadcast_to(np.asarray(value).astype(storage.array.dtype), (self.threads,))
        m = self.mask
        if storage.scope != "local":      # two threads writing one element in the same step: a race
            key = flat[m] if rows is None else rows[m] * storage.array.shape[-1] + flat[m]
            uniq, first = np.unique(key, return_index=True)
            if len(uniq) != len(key):
                dup = np.setdiff1d(np.arange(len(key)), first)[0]
                raise RuntimeError(f"simt: two threads write {storage.name}[{int(flat[m][dup])}] at once (a race)")
        if storage.pending is not None and (storage.pending[rows[m], flat[m]] > 0).any():
            raise RuntimeError(f"simt: a store into {storage.name} over a cp.async copy that has not landed")
        if storage.reader is not None:
            rd = storage.reader[rows[m], flat[m]]
            bad = (rd != -1) & (rd != self.tid[m])
            if bad.any():
                i = int(np.argmax(bad))
                who = "several threads" if rd[i] == -2 else f"thread {int(rd[i])}"
                raise RuntimeError(f"simt: thread {int(self.tid[m][i])} writes {storage.name}[{int(flat[m][i])}], read "
                                   f"by {who} with no barrier between (a write-after-read race)")
        if rows is None:
            storage.array[flat[m]] = value[m]
        else:
            storage.array[rows[m], flat[m]] = value[m]
            if storage.writer is not None:
                storage.writer[rows[m], flat[m]] = self.tid[m]

    def exec(self, s):
        kind = type(s).__name__
        fn = getattr(self, "_s_" + kind, None)
        if fn is None:
            raise NotImplementedError(f"simt: statement {kind} is not supported")
        fn(s)

    def _s_SeqStmt(self, s):
        for x in s.seq:
            self.exec(x)

    def _s_Bind(self, s):
        self.env[s.var] = self.eval(s.value)

    def _s_AttrStmt(self, s):
        if s.attr_key != "reduce_scope":
            raise NotImplementedError(f"simt: attribute {s.attr_key}")
        src = str(s.node.result[0]) if len(s.node.result) == 1 else ""
        lhs, rhs = (str(x) for x in (s.node.lhs[0], s.node.rhs[0])) if len(s.node.lhs) == 1 else ("", "")
        self._reducer = "add" if src in (f"{lhs} + {rhs}", f"{rhs} + {lhs}") else src
        try:
            self.exec(s.body)
        finally:
            self._reducer = None

    def _s_Evaluate(self, s):
        self.eval(s.value)

    def _s_BufferStore(self, s):
        self._store(_buffer(s), s.indices, self.eval(s.value))

    _s_TensorStore = _s_BufferStore

    def _s_IfThenElse(self, s):
        cond = self.eval(s.condition)
        if self.mask is None or not (isinstance(cond, np.ndarray) and cond.ndim):
            if bool(cond):
                self.exec(s.then_case)
            elif s.else_case is not None:
                self.exec(s.else_case)
            return
        saved = self.mask
        for branch, m in ((s.then_case, saved & cond), (s.else_case, saved & ~cond)):
            if branch is not None and m.any():
                self.mask = m
                self.exec(branch)
        self.mask = saved

    def _s_For(self, s):
        if _binding(s):
            if self.mask is not None:
                raise NotImplementedError("simt: thread-binding loops must enclose all the kernel's code")
            self._grid(s)
            return
        lo, ext = self.eval(s.min), self.eval(s.extent)
        if isinstance(lo, np.ndarray) and lo.ndim or isinstance(ext, np.ndarray) and ext.ndim:
            # a trip count that differs between threads (e.g. read from a per-block position): every thread
            # steps the loop variable together, each one masked off past its own end
            lo = np.broadcast_to(np.asarray(lo).astype(np.int64), (self.threads,))
            end = lo + np.broadcast_to(np.asarray(ext).astype(np.int64), (self.threads,))
            saved = self.mask
            for i in range(int(lo[saved].min(initial=0)), int(end[saved].max(initial=0))):
                self.mask = saved & (lo <= i) & (i < end)
                if self.mask.any():
                    self.env[s.loop_var] = _np_dtype(_dt(s.loop_var))(i)
                    self.exec(s.body)
            self.mask = saved
            return
        for i in range(int(lo), int(lo) + int(ext)):
            self.env[s.loop_var] = _np_dtype(_dt(s.loop_var))(i)
            self.exec(s.body)

    def _s_SBlockRealize(self, s):
        if not bool(np.all(self.eval(s.predicate))):
            raise NotImplementedError("simt: block predicates")
        blk = s.block
        if len(blk.iter_vars) or blk.init is not None or len(blk.match_buffers):
            raise NotImplementedError(f"simt: block {blk.name_hint} with iterators, init or match_buffers")
        for buf in blk.alloc_buffers:
            self._alloc(buf)
        self.exec(blk.body)

    def _alloc(self, buf):
        scope = buf.scope()
        size = int(np.prod([int(self.scalar(d)) for d in buf.shape]))
        dtype = _np_dtype(buf.dtype)
        if scope == "local":
            self.store[buf] = _Storage(np.zeros((self.threads, size), dtype), "local", buf.name)
        elif scope in ("shared", "shared.dyn"):    # dynamic shared memory: the same per-block storage
            nblocks = int(self.block.max()) + 1 if self.mask is not None else 1
            self.store[buf] = _Storage(np.zeros((nblocks, size), dtype), "shared", buf.name)
        elif scope == "global":
            self.store[buf] = _Storage(np.zeros(size, dtype), "global", buf.name)
        else:
            raise NotImplementedError(f"simt: buffer scope {scope}")
        self.env[buf] = buf

    def _grid(self, s):
        extents, node = {}, s
        while type(node).__name__ == "For" and _binding(node):
            tag = node.thread_binding.thread_tag
            if tag not in _THREAD_TAGS or tag in extents:
                raise NotImplementedError(f"simt: thread binding {tag}")
            extents[tag] = (node.loop_var, int(self.scalar(node.extent)) - 0, int(self.scalar(node.min)))
            node = node.body
        dims = {tag: extents[tag][1] if tag in extents else 1 for tag in _THREAD_TAGS}
        per_block = dims["threadIdx.x"] * dims["threadIdx.y"] * dims["threadIdx.z"]
        if per_block % 32:
            raise NotImplementedError(f"simt: {per_block} threads a block (not whole warps)")
        nblocks = dims["blockIdx.x"] * dims["blockIdx.y"] * dims["blockIdx.z"]
        self.threads = nblocks * per_block
        if self.threads == 0:
            return
        # thread i: block-major, then threadIdx.z, y, x (x fastest), so a warp is 32 consecutive lanes
        idx = np.arange(self.threads)
        self.block, within = idx // per_block, idx % per_block
        coords = {"threadIdx.x": within % dims["threadIdx.x"],
                  "threadIdx.y": within // dims["threadIdx.x"] % dims["threadIdx.y"],
                  "threadIdx.z": within // (dims["threadIdx.x"] * dims["threadIdx.y"]),
                  "blockIdx.x": self.block % dims["blockIdx.x"],
                  "blockIdx.y": self.block // dims["blockIdx.x"] % dims["blockIdx.y"],
                  "blockIdx.z": self.block // (dims["blockIdx.x"] * dims["blockIdx.y"])}
        for tag, (var, _, lo) in extents.items():
            self.env[var] = (coords[tag] + lo).astype(_np_dtype(_dt(var)))
        self._thread_vars = {tag: var for tag, (var, _, _) in extents.items()}
        self._coords = coords
        self._strides = {"threadIdx.x": 1, "threadIdx.y": dims["threadIdx.x"],
                         "threadIdx.z": dims["threadIdx.x"] * dims["threadIdx.y"]}
        self.tid = idx
        self.mask = np.ones(self.threads, bool)
        self.exec(node)
        self.mask = None


def run(func, *arrays: np.ndarray) -> None:
    """Execute the scheduled TIR PrimFunc ``func`` on numpy ``arrays`` (its parameters in order, outputs
    included, written in place); symbolic extents are bound from the arrays' shapes."""
    m = _Machine(func, arrays)
    m.exec(func.body)
