"""Lowerings of the quantized GEMMs (llmasos/ir/opset/quant.py) with dequantization inside the GEMM.

The stored weights stay int8/uint8 (4-bit: two codes per byte) from the parameter file to the kernel: no
float copy of a weight is ever made, at load or per call, so resident weight memory shrinks 4x (int8) or
~8x (int4) against f32.

* CPU (``llmasos-cpu`` schedule, f32 activations, parameter weights): the codes, scales and zeros are
  repacked once at load (param-only Relax ops, hoisted into main_transform_params) into NR-column panels
  like lowering.panel_matmul's, still as bytes: codes [P, K, NR] (4-bit: [P, K/2, NR] packed; fp8 codes
  as fp8), scales and zeros [P, G, NR] with G = ceil(K / group): the kernels index group k // group, which
  also covers a ragged last group (K = 576, group 128: G = 5, the last of 64 columns), and panels split
  N only, never K. One kernel, panels in parallel: each thread unpacks and
  dequantizes its panel once into an f32 [K, NR] scratch buffer (L2-sized: 73 KB at K=576, 196 KB at
  K=1536), then runs cpu_schedule.Matmul's MR x NR register-tiled GEMM over every row tile from it. So
  the dequant costs K*NR operations per panel and call, whatever the row count, and resident weights stay
  bytes. The PrimFunc comes already scheduled (cpu_schedule.Matmul wants a two-input GEMM block) and is
  marked ``tirx.is_scheduled`` and opaque, so DLight and FuseOps leave it alone. A single static row (a
  decode step) gets its own kernel instead (_build_qgemv): there the per-panel dequantized copy cost as
  much as the dot products, so scale and zero leave the inner loop (y = sum_g s_g (sum_k x_k c_k - z_g
  sum_k x_k)), one conversion and one FMA per weight: SmolLM2 int8 decode 120.8 vs 72.1 tokens/s.
* CPU with x86 VNNI (target option ``int8_gemv``, on by default where LLVM's target has AVX512-VNNI or
  AVX-VNNI): the decode row takes _build_qgemv_int8 instead -- x quantized per 32-block to one or two
  int8 digits, integer dot products with ``vpdpbusd`` on codes repacked at load into its byte order, scales
  applied per block (llama.cpp's Q8 x Q4/Q8 scheme); the prefill GEMM then reads the same repacked blocks
  (_build_qgemm_blocks), so the one weight transform prefill and decode share is lifted (docs/llm.md).
* elsewhere (CUDA, f16 activations): one TE function, a dequant stage feeding the GEMM reduction in the
  same PrimFunc -- the shape DLight's GPU GEMV/Matmul rules schedule with the dequant inlined into the
  reduction (as MLC-LLM's decode + matmul).
* ``quant.linear_a8``: per-token activation quantization (one row-reduction kernel), then an int8 x int8 ->
  int32 panel GEMM whose epilogue rescales by s_x * wscale and adds the bias (cpu_schedule.Matmul
  schedules it: two inputs, int32 accumulator).
"""
from __future__ import annotations

from tvm import relax, s_tir, te
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major
from tvm import tirx as tir
from tvm.s_tir.dlight.analysis import get_root_block

from ...ir.types import DType
from .cuda_gemm import quant_repack_scales, quant_repack_words, quant_words_dequant
from .lowering import acc_dtype, register_lowering, rows_gemm, tvm_dtype

R = relax.op
MR = 4  # rows per register tile of the CPU kernel


def _layout(node):
    """(N, K, bits, group, G, per_tensor) of a quant.linear / quant.dequant node."""
    off = 0 if node.op in ("quant.dequant", "quant.embedding") else 1
    qt, st = node.inputs[off].type, node.inputs[off + 1].type
    bits, group = node.attrs["bits"], node.attrs["group"]
    n, kq = qt.shape
    k = kq * 2 if bits == 4 else kq
    per_tensor = tuple(st.shape) == (1, 1)
    g = 1 if group == 0 else -(-k // group)  # ragged last group: G = ceil(K / group), column k in k // group
    return n, k, bits, group, g, per_tensor


def _code(codes, bits, idx_row, k, j_tail=()):
    """The f32 value of code k of a weight row: 4-bit nibbles unpacked, fp8/int read and converted."""
    if bits == 4:
        byte = codes(*idx_row, k // 2, *j_tail)
        shift = (k % 2 * 4).astype("uint8")
        return ((byte >> shift) & tir.const(15, "uint8")).astype("float32")
    return codes(*idx_row, k, *j_tail).astype("float32")


def _dequant_fn(bits, group, per_tensor):
    """TE: w[n, k] = (code - zero) * scale over codes [N, Kq], scale/zero [N, G] or [1, 1]."""
    def w(codes, scale, zero, n, k, out_dtype):
        gi = (k // group) if group else 0
        s = scale[0, 0] if per_tensor else scale[n, gi]
        z = zero[0, 0] if per_tensor else zero[n, gi]
        v = (_code(codes, bits, (n,), k) - z.astype("float32")) * s.astype("float32")
        return v.astype(out_dtype)
    return w


@register_lowering("quant.dequant")
def _dequant(ctx, node, args):
    n, k, bits, group, _, per_tensor = _layout(node)
    out_dt = tvm_dtype(node.outputs[0].type.dtype)
    w = _dequant_fn(bits, group, per_tensor)
    return ctx.emit_te(lambda c, s, z: te.compute((n, k), lambda i, j: w(c, s, z, i, j, out_dt), name="dequant"),
                       *args, name="dequant")


def _cpu_panels(ctx, node) -> bool:
    ins = node.inputs
    return (ctx.panel_width() is not None and all(ctx.is_param(v) and v.type.is_static for v in ins[1:])
            and ins[0].type.dtype is DType.f32 and ins[1].type.dtype in (DType.i8, DType.u8, DType.f8e4m3))


@register_lowering("quant.embedding")
def _quant_embedding(ctx, node, args):
    """Rows of the quantized table picked by ids, dequantized: one TE gather (only the picked rows are read),
    the same function on every target (DLight / cpu_schedule.Elementwise schedule it)."""
    _, k, bits, group, _, per_tensor = _layout(node)
    n = node.inputs[0].type.shape[0]
    out_dt = tvm_dtype(node.outputs[0].type.dtype)
    w = _dequant_fn(bits, group, per_tensor)

    def f(codes, scale, zero, ids):
        def row(*i):
            # out-of-range ids are a caller error; clipping keeps one from reading outside the table
            r = tir.max(tir.min(ids(*i[:-1]).astype("int64"), tir.const(n - 1, "int64")), tir.const(0, "int64"))
            return w(codes, scale, zero, r, i[-1], out_dt)
        return te.compute((*ids.shape, k), row, name="quant_embedding")
    return ctx.emit_te(f, *args, name="quant_embedding")


@register_lowering("quant.linear")
def _quant_linear(ctx, node, args):
    if _cpu_panels(ctx, node):
        return _cpu_quant_linear(ctx, node, args)
    y = _small_m_quant_linear(ctx, node, args)
    if y is not None:
        return y
    y = _words_quant_linear(ctx, node, args)
    if y is not None:
        return y
    return _generic_quant_linear(ctx, node, args)


def _small_m_quant_kernel(spec, node, is_param):
    """(name, PrimFunc) of the target's small-M kernel for this quant.linear (a decode step's rows: x [batch, K]
    or [batch, 1, K] f16, parameter codes, scales and zeros), or None. Pure: the lowering of every function
    asks it, and _words_params asks it of all the module's functions before any is lowered."""
    xt = node.inputs[0].type
    lead = xt.shape[:-1]
    if (spec is None or not lead or any(d != 1 for d in lead[1:])
            or not isinstance(xt.shape[-1], int) or xt.dtype is not DType.f16
            or not all(is_param(v) and v.type.is_static for v in node.inputs[1:4])
            or node.inputs[1].type.dtype not in (DType.i8, DType.u8)):
        return None
    n, k, bits, group, g, per_tensor = _layout(node)
    static = isinstance(lead[0], int)
    return spec.small_m_quant_gemm(n, k, bits, 0 if per_tensor else group, "float16",
                                   rows=lead[0] if static else None)


def _words_params(ctx) -> set:
    """Names of the code parameters some function of this module reads through the small-M kernel (its
    repacked words): every other quant.linear of them must read the same words (_words_quant_linear), since
    LiftTransformParams lifts a repacking only when all the functions make it -- with the prefill on the plain
    codes, the decode step repacked its words at every step (found on an H100: int8 decode at batch 1 ran at
    0.69x f16). Computed once per module (ctx.shared)."""
    if "quant_words_params" not in ctx.shared:
        names = set()
        for graph in ctx.functions.values():
            params = set(graph.params.values())
            for nd in graph.nodes:
                if nd.op == "quant.linear" and _small_m_quant_kernel(ctx.spec, nd, params.__contains__) is not None:
                    names.add(nd.inputs[1].name)
        ctx.shared["quant_words_params"] = names
    return ctx.shared["quant_words_params"]


def _repacked(ctx, node, args):
    """(words, scale words) of the small-M kernel's layout: parameter-only TE functions, identical in every
    function of the module, so LiftTransformParams runs them once, at load."""
    n, k, bits, group, g, per_tensor = _layout(node)
    signed8 = bits == 8 and node.inputs[1].type.dtype is DType.i8
    words = ctx.emit_te(lambda c: quant_repack_words(c, n, k, bits, signed8), args[1], name="quant_words")
    sz = ctx.emit_te(lambda s, z: quant_repack_scales(s, z, n, 1 if per_tensor else g, signed8), args[2], args[3],
                     name="quant_scale_words")
    return words, sz


def _small_m_quant_linear(ctx, node, args):
    """A decode step's quant.linear at a symbolic batch through the target's small-M kernel
    (``Target.small_m_quant_gemm``: tensor cores on CUDA, cuda_gemm.py), or None. Codes and scales are
    repacked into the kernel's lane order by parameter-only TE functions, which LiftTransformParams runs
    once, at load. Static rows (batch 1) only where the target asks for them (CUDA: small_m_quant_gemm = "all")."""
    kernel = _small_m_quant_kernel(ctx.spec, node, ctx.is_param)
    if kernel is None:
        return None
    n = _layout(node)[0]
    k = node.inputs[0].type.shape[-1]
    lead = node.inputs[0].type.shape[:-1]
    name, func = kernel
    words, sz = _repacked(ctx, node, args)
    rows = ctx.dim(lead[0])
    x2 = ctx.emit(R.reshape(args[0], [rows, k])) if len(lead) > 1 else args[0]
    gv = ctx.bb.add_func(func, name)
    y = ctx.emit(relax.call_tir(gv, [x2, words, sz], relax.TensorType([rows, n], "float16")), "small_m_quant_gemm")
    if len(args) > 4:
        y = ctx.emit(R.add(y, ctx.cast(args[4], DType.f16)))
    return ctx.emit(R.reshape(y, [*ctx.shape(node.inputs[0])[:-1], n])) if len(lead) > 1 else y


def _words_quant_linear(ctx, node, args):
    """A quant.linear of a weight the module's decode step reads through the small-M kernel, at other rows (a
    prompt, a ragged step): the same repacked words, dequantized per call into an f16 temporary [N, K]
    (cuda_gemm.quant_words_dequant: one pass, 2 bytes written a weight), then the f16 GEMM -- the target's
    tensor-core prefill kernel where it takes the shape (``Target.prefill_gemm``), else a TE matmul. Never
    lifted: its input is the activation too (a weight-only dequant would be a float copy of every weight,
    made once at load, which quantizing exists to avoid). None when the weight is not in _words_params."""
    xt = node.inputs[0].type
    if (ctx.spec is None or xt.dtype is not DType.f16 or len(xt.shape) < 2 or not isinstance(xt.shape[-1], int)
            or node.inputs[1].name not in _words_params(ctx)
            or not all(ctx.is_param(v) and v.type.is_static for v in node.inputs[1:4])):
        return None
    n, k, bits, group, g, per_tensor = _layout(node)
    words, sz = _repacked(ctx, node, args)
    grp = 0 if per_tensor else group
    # x is an input of the dequant's TE only so that the binding depends on the call (see the docstring)
    w16 = ctx.emit_te(lambda x, wd, s: quant_words_dequant(wd, s, n, k, bits, grp), args[0], words, sz,
                      name="quant_words_dequant")
    y = rows_gemm(ctx, xt, args[0], w16, n, k, DType.f16, ctx.spec.prefill_gemm(n, k, "float16"))
    return ctx.emit(R.add(y, ctx.cast(args[4], DType.f16))) if len(args) > 4 else y


def _pack_words(ctx, codes, n: int, kq: int):
    """int8/uint8 codes [N, Kq] -> uint32 words [N, Kq / 4], byte b of word q = code byte 4q + b
    (little-endian: 4-bit code k sits at bits 4 (k % 8) of word k // 8, 8-bit code k at bits 8 (k % 4) of
    word k // 4). A parameter-only kernel: LiftTransformParams runs it once, at load."""
    def byte(c, i, j):  # through uint8: an int8 code must not sign-extend into the other bytes
        return c[i, j].astype("uint8").astype("uint32")

    def pack(c):
        return te.compute((n, kq // 4), lambda i, q: (
            byte(c, i, 4 * q) | (byte(c, i, 4 * q + 1) << tir.const(8, "uint32"))
            | (byte(c, i, 4 * q + 2) << tir.const(16, "uint32"))
            | (byte(c, i, 4 * q + 3) << tir.const(24, "uint32"))), name="pack_words")
    return ctx.emit_te(pack, codes, name="pack_words")


_MAGIC = 0x4B000000  # 2^23 as f32 bits: (_MAGIC | c) read as an f32 is exactly 2^23 + c, for c < 2^23


def _word_code(words, n, k, bits: int, signed: bool):
    """The f32 value of code k of row n from _pack_words' uint32 words. Converted through the f32 bit
    pattern (an OR and a subtract, full-rate ALU work) instead of an int->float conversion, which a GPU
    runs at a quarter of the FMA rate. (The int4 decode GEMV is bound by instructions per weight: with this
    and the folded zero it still reads 0.8-1.9 TB/s on an H200; two codes per half2 instruction is next.)"""
    per = 32 // bits
    shift = ((k % per) * bits).astype("uint32")
    v = (words[n, k // per] >> shift) & tir.const((1 << bits) - 1, "uint32")
    offset = float(1 << 23)
    if signed:  # int8 codes: the byte's two's complement, (byte ^ 128) - 128
        v, offset = v ^ tir.const(128, "uint32"), offset + 128
    return tir.reinterpret("float32", v | tir.const(_MAGIC, "uint32")) - tir.const(offset, "float32")


def _generic_quant_linear(ctx, node, args):
    n, k, bits, group, _, per_tensor = _layout(node)
    xt = node.inputs[0].type
    dt = tvm_dtype(xt.dtype)
    acc = tvm_dtype(acc_dtype(xt.dtype))
    deq = _dequant_fn(bits, group, per_tensor)
    w_dt = acc  # the f32 dequantized weight into the f32 accumulation, as the op's reference computes
    code_dt = node.inputs[1].type.dtype
    # codes read as uint32 words (8 4-bit or 4 8-bit codes a load), as MLC-LLM's quantized layouts: DLight's
    # GEMV reads the weight operand at its element width, and with uint8 codes each thread loaded one byte
    # per step (the generated CUDA shows it) -- the int4 decode GEMV ran at 1.05x the fp16 one on an H100
    kq = k // 2 if bits == 4 else k
    if (bits in (4, 8) and kq % 4 == 0 and code_dt in (DType.i8, DType.u8) and ctx.is_param(node.inputs[1])
            and node.inputs[1].type.is_static):
        signed = code_dt is DType.i8
        # (c - z) * s as c * s + (-z * s): one FMA per weight, the products -z * s made once at load
        fold = ctx.is_param(node.inputs[2]) and ctx.is_param(node.inputs[3])
        offsets = (ctx.emit_te(lambda sc, z: te.compute(z.shape, lambda *i: -(z(*i).astype("float32")
                                                                            * sc(*i).astype("float32")),
                                                        name="zero_times_scale"), args[2], args[3],
                               name="zero_times_scale") if fold else args[3])
        args = [args[0], _pack_words(ctx, args[1], n, kq), args[2], offsets, *args[4:]]

        def deq(words, scale, zero, i, j, out_dtype):
            gi = (j // group) if group else 0
            s = scale[0, 0] if per_tensor else scale[i, gi]
            z = zero[0, 0] if per_tensor else zero[i, gi]
            c = _word_code(words, i, j, bits, signed)
            if fold:
                return (c * s.astype("float32") + z).astype(out_dtype)
            return ((c - z.astype("float32")) * s.astype("float32")).astype(out_dtype)

    def f(x, codes, scale, zero, *b):
        # (a weight rounded to x's dtype first would cost the GPU's decode GEMV two conversions per weight)
        w = te.compute((n, k), lambda i, j: deq(codes, scale, zero, i, j, w_dt), name="dequant")
        r = te.reduce_axis((0, k), name="k")
        y = te.compute((*x.shape[:-1], n), lambda *i: te.sum(x(*i[:-1], r).astype(acc) * w[i[-1], r].astype(acc),
                                                             axis=r), name="qmatmul")
        if b:
            y = te.compute(y.shape, lambda *i: y(*i) + b[0][i[-1]].astype(acc), name="bias_add")
        return te.compute(y.shape, lambda *i: y(*i).astype(dt), name="cast") if acc != dt else y
    return ctx.emit_te(f, *args, name="quant_linear")


def _pad_rows(ctx, a, n, n_pad, name):
    if n_pad == n:
        return a
    shape = list(a.ty.shape.values)
    return ctx.emit(R.concat([a, R.zeros([n_pad - n, *shape[1:]], str(a.ty.dtype))], axis=0), name)


def _cpu_quant_linear(ctx, node, args):
    x, codes, scale, zero = args[:4]
    bias = args[4] if len(args) > 4 else None
    n, k, bits, group, g, per_tensor = _layout(node)
    nr = ctx.panel_width()
    lanes = _int8_gemv_lanes(ctx, node)
    if lanes is not None:
        return _cpu_quant_gemv_int8(ctx, node, args, lanes)
    kq = k // 2 if bits == 4 else k
    n_pad = -(-n // nr) * nr
    p = n_pad // nr
    # codes of padded rows are 0 and their scales 0: padded columns compute exact zeros, sliced off below
    codes = _pad_rows(ctx, codes, n, n_pad, "codes_padded")
    cpanels = ctx.emit(R.permute_dims(R.reshape(codes, [p, nr, kq]), [0, 2, 1]), "code_panels")
    if not per_tensor:
        scale = _pad_rows(ctx, scale, n, n_pad, "scale_padded")
        zero = _pad_rows(ctx, zero, n, n_pad, "zero_padded")
        scale = ctx.emit(R.permute_dims(R.reshape(scale, [p, nr, g]), [0, 2, 1]), "scale_panels")
        zero = ctx.emit(R.permute_dims(R.reshape(zero, [p, nr, g]), [0, 2, 1]), "zero_panels")
    if bias is not None:
        bias = ctx.emit(R.reshape(_pad_rows(ctx, bias, n, n_pad, "bias_padded"), [p, nr]), "bias_panels")
    lead = ctx.shape(node.inputs[0])[:-1]
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    x2 = ctx.emit(R.reshape(x, [m, k]), "x_rows")
    if isinstance(m, (int, tir.IntImm)) and int(m) == 1:
        # a ragged last group is padded to a whole one: zero codes (at load) and zero x columns add
        # nothing to either sum, and the inner loop needs no bound check
        k_pad = k if (group == 0 or per_tensor) else g * group
        if k_pad != k:
            # (4-bit: K is even; an odd k_pad still needs its last nibble's byte)
            pad = (k_pad + 1) // 2 - k // 2 if bits == 4 else k_pad - k
            cpanels = ctx.emit(R.concat([cpanels, R.zeros([p, pad, nr], str(codes.ty.dtype))], axis=1),
                               "code_panels_padded")
            x2 = ctx.emit(R.concat([x2, R.zeros([1, k_pad - k], "float32")], axis=1), "x_padded")
        func = _build_qgemv(k_pad, p, nr, bits, group, per_tensor, bias is not None, str(codes.ty.dtype))
    else:
        func = _qgemm_primfunc(m, k, p, nr, bits, group, per_tensor, bias is not None, str(codes.ty.dtype))
    gv = ctx.bb.add_func(func, "quant_linear_panels")
    ins = [x2, cpanels, scale, zero, *([bias] if bias is not None else [])]
    y = ctx.emit(relax.call_tir(gv, ins, relax.TensorType([m, p, nr], "float32")), "quant_linear")
    y = ctx.emit(R.reshape(y, [*lead, n_pad]))
    if n_pad != n:
        y = R.strided_slice(y, [len(lead)], [0], [n], assume_inbound=True)
    return y


def _build_qgemm(m, k, p, nr, bits, group, per_tensor, has_bias, code_dtype):
    kq = k // 2 if bits == 4 else k
    gsh = (1, 1) if per_tensor else (p, 1 if group == 0 else -(-k // group), nr)
    x = te.placeholder((m, k), "float32", name="x")
    codes = te.placeholder((p, kq, nr), code_dtype, name="codes")
    scale = te.placeholder(gsh, "float32", name="scale")
    zero = te.placeholder(gsh, "float32", name="zero")
    b = te.placeholder((p, nr), "float32", name="bias") if has_bias else None
    r = te.reduce_axis((0, k), name="k")

    def w(pi, kk, j):
        c = _code(codes, bits, (pi,), kk, (j,))
        if per_tensor:
            return (c - zero[0, 0]) * scale[0, 0]
        gi = kk // group if group else 0
        return (c - zero[pi, gi, j]) * scale[pi, gi, j]

    # the panel's weights dequantized once per panel (compute_at the panel loop: an f32 [K, NR] buffer per
    # thread, L2-resident for K up to a few thousand) and reused by every row tile of that panel
    wdq = te.compute((p, k, nr), w, name="dequant")
    y = te.compute((m, p, nr), lambda i, pi, j: te.sum(x[i, r] * wdq[pi, r, j], axis=r), name="qgemm")
    outs = [x, codes, scale, zero]
    if has_bias:
        y = te.compute((m, p, nr), lambda i, pi, j: y[i, pi, j] + b[pi, j], name="qgemm_bias")
        outs.append(b)
    func = te.create_prim_func([*outs, y])
    return _schedule_qgemm(func, nr, has_bias, dynamic=not isinstance(m, (int, tir.IntImm)))


def _schedule_qgemm(func, nr, has_bias, dynamic):
    """cpu_schedule.Matmul's tiling, plus the dequant of each k row computed once per register tile."""
    sch = s_tir.Schedule(func)
    main = sch.get_sblock("qgemm")
    if dynamic:
        # a dynamic row count is padded to whole tiles (a padded copy of x, an unpadding epilogue), as
        # cpu_schedule.Matmul does: otherwise every FMA of the tile sits behind a row bound check
        sch.pad_einsum(main, [MR, 1, 1, 1])
    i, pi, j, kk = sch.get_loops(main)
    io, ii = sch.split(i, [None, MR])
    sch.reorder(pi, io, kk, ii, j)
    sch.parallel(pi)
    sch.unroll(ii)
    sch.vectorize(j)
    dq = sch.get_sblock("dequant")
    sch.compute_at(dq, pi, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(dq)[-1])
    blocks = sch.get_child_blocks(get_root_block(sch))
    pos = [n for n, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
    epilogue = blocks[pos + 1:]
    for b in epilogue[:-1]:
        sch.compute_inline(b)
    wb = epilogue[-1] if epilogue else sch.cache_write(main, 0, "global")
    sch.reverse_compute_at(wb, io, preserve_unit_loops=True)
    wl = list(sch.get_loops(wb))
    wl = wl[[sch.get(l).same_as(sch.get(io)) for l in wl].index(True) + 1:]
    if len(wl) > 0:
        sch.vectorize(wl[-1])
    for l in wl[:-1]:
        sch.unroll(l)
    init = sch.decompose_reduction(main, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    for b in blocks[:pos]:  # the padded copy of x
        if sch.get(b).name_hint != "dequant":
            sch.parallel(sch.get_loops(b)[0])
    return (sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
            .with_attr("op_pattern", 8))  # opaque: FuseOps must not merge it into an unscheduled function


def _build_qgemv(k, p, nr, bits, group, per_tensor, has_bias, code_dtype):
    """One row (a decode step): the GEMM kernel's per-panel dequantized copy would cost as much as the dot
    products themselves, so the scale and zero come out of the inner loop instead:

        y[j] = sum_g s[g, j] * (sum_{k in g} x[k] * c[k, j]  -  z[g, j] * sum_{k in g} x[k])

    The inner loop is one code conversion and one FMA per weight (NR-wide vectors, codes read as stored,
    4-bit nibbles split in registers); panels run in parallel; the group sums of x are computed once."""
    gk = k if (group == 0 or per_tensor) else group     # the width of a scale group along K
    assert k % gk == 0, "quant GEMV: K must be whole groups (the caller pads it)"
    ng = k // gk
    kq = (k + 1) // 2 if bits == 4 else k
    gsh = (1, 1) if per_tensor else (p, ng, nr)
    x = te.placeholder((1, k), "float32", name="x")
    codes = te.placeholder((p, kq, nr), code_dtype, name="codes")
    scale = te.placeholder(gsh, "float32", name="scale")
    zero = te.placeholder(gsh, "float32", name="zero")
    b = te.placeholder((p, nr), "float32", name="bias") if has_bias else None
    r = te.reduce_axis((0, gk), name="r")  # (the caller pads K to whole groups)
    xs = te.compute((ng,), lambda gi: te.sum(x[0, gi * gk + r], axis=r), name="xsum")
    part = te.compute((p, ng, nr), lambda pi, gi, j: te.sum(
        x[0, gi * gk + r] * _code(codes, bits, (pi,), gi * gk + r, (j,)), axis=r), name="qdot")
    g2 = te.reduce_axis((0, ng), name="g")

    def sz(t, pi, gi, j):
        return t[0, 0] if per_tensor else t[pi, gi, j]
    y = te.compute((1, p, nr), lambda i, pi, j: te.sum(
        sz(scale, pi, g2, j) * (part[pi, g2, j] - sz(zero, pi, g2, j) * xs[g2]), axis=g2), name="qgemv")
    outs = [x, codes, scale, zero]
    if has_bias:
        y = te.compute((1, p, nr), lambda i, pi, j: y[i, pi, j] + b[pi, j], name="qgemv_bias")
        outs.append(b)
    func = te.create_prim_func([*outs, y])
    sch = s_tir.Schedule(func)
    main, dot = sch.get_sblock("qgemv"), sch.get_sblock("qdot")
    i, pi, j, gl = sch.get_loops(main)
    sch.reorder(i, pi, gl, j)
    sch.parallel(pi)
    sch.compute_at(dot, gl, preserve_unit_loops=True)
    dj, dr = sch.get_loops(dot)[-2:]
    sch.reorder(dr, dj)
    if bits == 4 and gk % 2 == 0:  # (an odd group starts every other group on an odd nibble)
        dr, dr2 = sch.split(dr, [None, 2])
        sch.unroll(dr2)  # even and odd nibble: constant shifts
    if has_bias:
        sch.reverse_compute_at(sch.get_sblock("qgemv_bias"), pi, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(sch.get_sblock("qgemv_bias"))[-1])
    # (vectorized before decompose_reduction: a reduction block must still have its init to be vectorized)
    sch.vectorize(dj)
    sch.vectorize(sch.get_loops(main)[-1])
    sch.vectorize(sch.get_loops(sch.decompose_reduction(dot, dr))[-1])
    sch.vectorize(sch.get_loops(sch.decompose_reduction(main, gl))[-1])
    return (sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
            .with_attr("op_pattern", 8))


def _qgemm_primfunc(m, k, p, nr, bits, group, per_tensor, has_bias, code_dtype):
    if not isinstance(m, (int, tir.IntImm)):
        m = tir.Var("m", "int64")
    return _build_qgemm(m, k, p, nr, bits, group, per_tensor, has_bias, code_dtype)


# ------------------------------------------------------------------------------------------------
# W8A8

def _act_scale(x):
    """TE: s_x f32 [M] = max|x_row| / 127 (a row reduction: its own kernel, DLight's CPU Reduction rule)."""
    m, k = x.shape
    r = te.reduce_axis((0, k), name="k")
    f32 = "float32"
    amax = te.compute((m,), lambda i: te.max(tir.abs(x[i, r].astype(f32)), axis=r), name="amax")
    return te.compute((m,), lambda i: amax[i] / tir.const(127.0, f32), name="act_scale")


def _act_codes(x, s):
    """TE: x_q int8 [M, K] = clip(round(x / s_x), -127, 127), a zero row divided by 1 (the reference's)."""
    f32 = "float32"

    def code(i, j):
        safe = tir.Select(s[i] > tir.const(0.0, f32), s[i], tir.const(1.0, f32))
        v = tir.round(x[i, j].astype(f32) / safe)
        return tir.max(tir.min(v, tir.const(127.0, f32)), tir.const(-127.0, f32)).astype("int8")
    return te.compute(x.shape, code, name="act_codes")


@register_lowering("quant.linear_a8")
def _linear_a8(ctx, node, args):
    x, q, ws = args[:3]
    bias = args[3] if len(args) > 3 else None
    xt = node.inputs[0].type
    n, k = node.inputs[1].type.shape
    lead = ctx.shape(node.inputs[0])[:-1]
    m = lead[0] if lead else tir.IntImm("int64", 1)
    for d in lead[1:]:
        m = m * d
    x2 = ctx.emit(R.reshape(x, [m, k]), "x_rows")
    sx = ctx.emit_te(_act_scale, x2, name="act_scale")
    xq = ctx.emit_te(_act_codes, x2, sx, name="act_codes")
    nr = ctx.panel_width()
    static = all(ctx.is_param(v) and v.type.is_static for v in node.inputs[1:])
    if bias is not None:
        bias = ctx.cast(bias, DType.f32)
    if nr is not None and static:
        # int8 weight panels [P, K, NR] (bytes still), so cpu_schedule.Matmul tiles the int32 GEMM
        n_pad = -(-n // nr) * nr
        p = n_pad // nr
        q = ctx.emit(R.permute_dims(R.reshape(_pad_rows(ctx, q, n, n_pad, "codes_padded"), [p, nr, k]), [0, 2, 1]),
                     "code_panels")
        ws = ctx.emit(R.reshape(_pad_rows(ctx, ws, n, n_pad, "wscale_padded"), [p, nr]), "wscale_panels")
        if bias is not None:
            bias = ctx.emit(R.reshape(_pad_rows(ctx, ctx.emit(bias), n, n_pad, "bias_padded"), [p, nr]), "bias_panels")

        def gemm(xq, qp, sx, ws, *b):
            r = te.reduce_axis((0, k), name="k")
            acc = te.compute((xq.shape[0], p, nr), lambda i, pi, j: te.sum(
                xq[i, r].astype("int32") * qp[pi, r, j].astype("int32"), axis=r), name="int_matmul")

            def out(i, pi, j):
                v = acc[i, pi, j].astype("float32") * sx[i] * ws[pi, j]
                return v + b[0][pi, j] if b else v
            return te.compute(acc.shape, out, name="rescale")
        y = ctx.emit_te(gemm, xq, q, sx, ws, *([bias] if bias is not None else []), name="linear_a8")
        y = ctx.emit(R.reshape(y, [*lead, n_pad]))
        if n_pad != n:
            y = ctx.emit(R.strided_slice(y, [len(lead)], [0], [n], assume_inbound=True))
        return ctx.cast(y, xt.dtype)

    def gemm(xq, q, sx, ws, *b):
        r = te.reduce_axis((0, k), name="k")
        acc = te.compute((xq.shape[0], n), lambda i, j: te.sum(
            xq[i, r].astype("int32") * q[j, r].astype("int32"), axis=r), name="int_matmul")

        def out(i, j):
            v = acc[i, j].astype("float32") * sx[i] * ws[j]
            return v + b[0][j] if b else v
        return te.compute(acc.shape, out, name="rescale")
    y = ctx.emit_te(gemm, xq, q, sx, ws, *([bias] if bias is not None else []), name="linear_a8")
    return ctx.cast(ctx.emit(R.reshape(y, [*lead, n])), xt.dtype)


# ------------------------------------------------------------------------------------------------
# int8-activation decode GEMV (x86 VNNI)

QBLOCK = 32  # activation block: one f32 scale and one code sum per 32 values of x (llama.cpp's Q8_1)


def _int8_gemv_lanes(ctx, node):
    """int32 lanes of the int8-activation GEMV for this quant.linear, or None for the float GEMV: 4/8-bit
    integer codes, K whole 32-blocks, groups whole blocks, and the target asks for it (``Target.int8_gemv_lanes``:
    x86 VNNI). Whatever the row count: a decode step's GEMV and the prefill's GEMM must read one repacked
    layout, else LiftTransformParams (one transform shared by prefill and decode) lifts neither repacking
    and both run on every call."""
    spec_lanes = getattr(ctx.spec, "int8_gemv_lanes", None)
    if spec_lanes is None:
        return None
    n, k, bits, group, _, per_tensor = _layout(node)
    if (bits not in (4, 8) or node.inputs[1].type.dtype not in (DType.i8, DType.u8) or k % QBLOCK
            or (group and not per_tensor and group % QBLOCK)):
        return None
    if not hasattr(ctx, "_int8_gemv_lanes"):
        ctx._int8_gemv_lanes = spec_lanes()
    if ctx.spec.extra.get("int8_gemv") == "body" and _is_head(node):
        return None
    return ctx._int8_gemv_lanes


def _is_head(node) -> bool:
    """The output head: the GEMM traced from ``lm_head`` (a tied head reads the embedding's codes, but its loc
    names lm_head), as quantize's ``head`` option finds it."""
    path = (node.loc or "").split(" (")[0]
    return path.split(".")[-1] == "lm_head" or "lm_head" in node.inputs[1].name


def _cpu_quant_gemv_int8(ctx, node, args, lanes: int):
    """A decode step's quant.linear as int8 dot products (module doc of _build_qgemv_int8); the codes, scales
    and zero terms are repacked by parameter-only TE functions (run once, at load)."""
    x, codes, scale, zero = args[:4]
    bias = args[4] if len(args) > 4 else None
    n, k, bits, group, g, per_tensor = _layout(node)
    nr = ctx.panel_width()   # columns per panel: nr / lanes int32 vectors
    p = -(-n // nr)
    ng = 1 if (group == 0 or per_tensor) else g
    signed = node.inputs[1].type.dtype is DType.i8
    w = ctx.emit_te(lambda c: _repack_codes_int8(c, n, k, p, nr, bits, lanes, signed), codes, name="code_blocks")
    sz = ctx.emit_te(lambda s, z: _repack_scales_int8(s, z, n, p, ng, nr, per_tensor, signed), scale, zero,
                     name="scale_blocks")
    if bias is not None:
        bias = ctx.emit(R.reshape(_pad_rows(ctx, bias, n, p * nr, "bias_padded"), [p, nr]), "bias_panels")
    lead = ctx.shape(node.inputs[0])[:-1]
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    x2 = ctx.emit(R.reshape(x, [m, k]), "x_rows")
    gdiv = group // QBLOCK if ng > 1 else k // QBLOCK
    if isinstance(m, (int, tir.IntImm)) and int(m) == 1:
        func = _build_qgemv_int8(k, p, nr, lanes, bits, ng, gdiv, bias is not None, ctx.spec.int8_gemv_digits())
        gv = ctx.bb.add_func(func, "quant_linear_int8")
    else:   # prefill: the panel GEMM, its dequant reading the same repacked blocks
        mm = m if isinstance(m, (int, tir.IntImm)) else tir.Var("m", "int64")
        gv = ctx.bb.add_func(_build_qgemm_blocks(mm, k, p, nr, lanes, bits, ng, gdiv, bias is not None),
                             "quant_linear_panels")
    ins = [x2, w, sz, *([bias] if bias is not None else [])]
    y = ctx.emit(relax.call_tir(gv, ins, relax.TensorType([m, p, nr], "float32")), "quant_linear")
    y = ctx.emit(R.reshape(y, [*lead, p * nr]))
    if p * nr != n:
        y = R.strided_slice(y, [len(lead)], [0], [n], assume_inbound=True)
    return y


def _repack_codes_int8(codes, n, k, p, nr, bits, lanes, signed):
    """TE: codes [N, Kq] -> unsigned bytes [P, K/32, NR/lanes, J, 4 lanes] in vpdpbusd's order: for panel p
    (NR columns), block b (32 k) and vector h of the panel, vector j holds column h*lanes + i // 4's code
    k = 32b + 4j + i % 4 at byte i. 4-bit (J = 4): that code in the low nibble and code k + 16 in the high one. Signed int8 codes
    flipped to unsigned (c + 128; the kernel's zero term takes the 128 back). Columns past N: 0."""
    u8 = "uint8"

    def code(col, kk):
        if bits == 4:
            return (codes[col, kk // 2] >> ((kk % 2) * 4).astype(u8)) & tir.const(15, u8)
        v = codes[col, kk].astype(u8)
        return v ^ tir.const(128, u8) if signed else v

    def byte(pi, b, h, j, i):
        col = pi * nr + h * lanes + i // 4
        colc = tir.min(col, n - 1)
        kk = b * QBLOCK + 4 * j + i % 4
        v = code(colc, kk) | (code(colc, kk + 16) << tir.const(4, u8)) if bits == 4 else code(colc, kk)
        return tir.Select(col < n, v, tir.const(0, u8))
    return te.compute((p, k // QBLOCK, nr // lanes, 4 if bits == 4 else 8, 4 * lanes), byte, name="code_blocks")


def _repack_scales_int8(scale, zero, n, p, ng, nr, per_tensor, signed):
    """TE: scale, zero [N, G] (or [1, 1]) -> f32 [P, 2, G, NR]: [:, 0] the scales, [:, 1] scale * zero (zero +
    128 for signed int8 codes, which the kernel reads as unsigned). Columns past N: 0."""
    def v(pi, which, gi, j):
        col = pi * nr + j
        colc = tir.min(col, n - 1)
        s = scale[0, 0] if per_tensor else scale[colc, gi]
        z = zero[0, 0] if per_tensor else zero[colc, gi]
        z = z + tir.const(128.0, "float32") if signed else z
        out = tir.Select(which == 0, s, s * z)
        return tir.Select(col < n, out, tir.const(0.0, "float32"))
    return te.compute((p, 2, ng, nr), v, name="scale_blocks")


def _build_qgemm_blocks(m, k, p, nr, lanes, bits, ng, gdiv, has_bias):
    """Several rows (prefill) on _repack_codes_int8 / _repack_scales_int8's layout: _build_qgemm's panel GEMM
    (f32 activations), each panel's codes dequantized once per call as c * s - s * z' (z' the zero the
    repacking stored, + 128 for signed int8 codes flipped to unsigned)."""
    nb = k // QBLOCK
    J = 4 if bits == 4 else 8
    x = te.placeholder((m, k), "float32", name="x")
    codes = te.placeholder((p, nb, nr // lanes, J, 4 * lanes), "uint8", name="codes")
    sz = te.placeholder((p, 2, ng, nr), "float32", name="scale")
    b = te.placeholder((p, nr), "float32", name="bias") if has_bias else None
    r = te.reduce_axis((0, k), name="k")

    def w(pi, kk, j):
        blk, q = kk // QBLOCK, kk % QBLOCK
        h, c = j // lanes, j % lanes
        if bits == 4:
            byte = codes[pi, blk, h, (q % 16) // 4, c * 4 + q % 4]
            v = (byte >> ((q // 16) * 4).astype("uint8")) & tir.const(15, "uint8")
        else:
            v = codes[pi, blk, h, q // 4, c * 4 + q % 4]
        gi = blk // gdiv
        return v.astype("float32") * sz[pi, 0, gi, j] - sz[pi, 1, gi, j]

    wdq = te.compute((p, k, nr), w, name="dequant")
    y = te.compute((m, p, nr), lambda i, pi, j: te.sum(x[i, r] * wdq[pi, r, j], axis=r), name="qgemm")
    outs = [x, codes, sz]
    if has_bias:
        y = te.compute((m, p, nr), lambda i, pi, j: y[i, pi, j] + b[pi, j], name="qgemm_bias")
        outs.append(b)
    func = te.create_prim_func([*outs, y])
    return _schedule_qgemm(func, nr, has_bias, dynamic=not isinstance(m, (int, tir.IntImm)))


def _build_qgemv_int8(k, p, nr, lanes, bits, ng, gdiv, has_bias, digits=2):
    """One row times int8/int4 codes with int8 activations (llama.cpp's Q8 x Q4/Q8 dot products):

        y[j] = sum_b sx[b] * (s[g, j] * sum_{k in b} c[k, j] xq[k]  -  s[g, j] z[g, j] * sum_{k in b} xq[k])

    over 32-blocks b of K, g = b // gdiv the weight group of block b (gdiv = K / 32 for one group). x is
    quantized first, on the calling thread: sx[b] = max |x_b| / 127, xq = round(x / sx[b]) (a zero block:
    codes 0); with ``digits`` = 2 (the default, target option int8_gemv_digits) also the remainder as a
    second int8 digit, xr = round((x / sx[b] - xq) * 254), so x = sx (xq + xr / 254) to ~1/64500 of the
    block's max instead of ~1/254, at twice the vpdpbusd work on the same code vectors. Then panels of NR columns run in parallel; per block and ``lanes`` columns, vpdpbusd
    multiplies unsigned code bytes by a broadcast quad of xq (4 products summed per int32 lane), J times,
    into an int32 vector (no overflow: |sum| <= 32 * 255 * 127), converted and scaled once per block. 4-bit
    codes are split from their bytes with an AND and a shift (u8 lanes). Exact against the same arithmetic
    in numpy up to f32 rounding; against the float GEMV the error is x's quantization: ~0.4% of |y|'s scale
    on random data (tests/backends/test_quant_lowering.py states the tolerance)."""
    nb = k // QBLOCK
    J = 4 if bits == 4 else 8
    H = nr // lanes
    vi, vf, vb = f"int32x{lanes}", f"float32x{lanes}", f"int8x{4 * lanes}"
    intrin = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    bytes_args = llvm_version_major() >= 20   # LLVM 20 typed vpdpbusd's operands as bytes (was i32 lanes)

    def vdot(acc, w, xw):
        xb = T.broadcast(xw, lanes)
        if bytes_args:
            return T.call_llvm_pure_intrin(vi, intrin, acc, T.reinterpret(vb, w), T.reinterpret(vb, xb))
        return T.call_llvm_pure_intrin(vi, intrin, acc, T.reinterpret(vi, w), xb)

    def quad(xq, b, off):
        return T.reinterpret("int32", xq.vload([b * QBLOCK + off], "int8x4"))

    def block_dot(w, xq, pi, b, h):
        acc = T.broadcast(T.int32(0), lanes)
        for j in range(J):
            v = w.vload([pi, b, h, j, 0], f"uint8x{4 * lanes}")
            if bits == 4:
                acc = vdot(acc, v & T.broadcast(T.uint8(15), 4 * lanes), quad(xq, b, 4 * j))
                acc = vdot(acc, v >> T.broadcast(T.uint8(4), 4 * lanes), quad(xq, b, 16 + 4 * j))
            else:
                acc = vdot(acc, v, quad(xq, b, 4 * j))
        return acc

    def block_dotf(w, xq, xr, pi, b, h):
        """f32 x lanes: the block's dot product in units of sx, from one or two int8 digits of x."""
        d = T.Cast(vf, block_dot(w, xq, pi, b, h))
        if digits == 2:   # (the same code vectors: LLVM computes the loads and nibble splits once)
            d = d + T.Cast(vf, block_dot(w, xr, pi, b, h)) * T.broadcast(T.float32(1.0 / 254), lanes)
        return d

    # fmt: off
    @T.macro
    def body(X, W, S, B, Y):
        XQ = T.decl_buffer((k,), "int8")
        XR = T.decl_buffer((k,), "int8")
        XS = T.decl_buffer((nb,), "float32")
        XZ = T.decl_buffer((nb,), "float32")
        for b in range(nb):
            am = T.decl_buffer((1,), "float32")
            am[0] = T.float32(0)
            for i in range(QBLOCK):
                am[0] = T.max(am[0], T.fabs(X[0, b * QBLOCK + i]))
            inv: T.float32 = T.Select(am[0] > T.float32(0), T.float32(127) / am[0], T.float32(0))
            for i in T.vectorized(QBLOCK):
                XQ[b * QBLOCK + i] = T.Cast("int8", T.round(X[0, b * QBLOCK + i] * inv))
            for i in T.vectorized(QBLOCK):   # the second digit: what the first left, in 1/254ths of sx
                XR[b * QBLOCK + i] = T.Cast("int8", T.round((X[0, b * QBLOCK + i] * inv
                                                             - T.Cast("float32", XQ[b * QBLOCK + i])) * T.float32(254)))
            sm = T.decl_buffer((2,), "int32")
            sm[0] = 0
            sm[1] = 0
            for i in range(QBLOCK):
                sm[0] = sm[0] + T.Cast("int32", XQ[b * QBLOCK + i])
                sm[1] = sm[1] + T.Cast("int32", XR[b * QBLOCK + i])
            XS[b] = am[0] / T.float32(127)
            XZ[b] = -(am[0] / T.float32(127)) * (T.Cast("float32", sm[0])
                                                 + T.Cast("float32", sm[1]) * T.float32(1.0 / 254 if digits == 2 else 0.0))
        for pi in T.parallel(p):
            acc = T.decl_buffer((nr,), "float32")
            for i in T.vectorized(nr):
                acc[i] = T.float32(0)
            for b in range(nb):
                for h in T.unroll(H):
                    acc[T.ramp(h * lanes, 1, lanes)] = (
                        acc[T.ramp(h * lanes, 1, lanes)]
                        + block_dotf(W, XQ, XR, pi, b, h) * S[pi, 0, b // gdiv, T.ramp(h * lanes, 1, lanes)]
                        * T.broadcast(XS[b], lanes)
                        + S[pi, 1, b // gdiv, T.ramp(h * lanes, 1, lanes)] * T.broadcast(XZ[b], lanes))
            for i in T.vectorized(nr):
                if has_bias:
                    Y[0, pi, i] = acc[i] + B[pi, i]
                else:
                    Y[0, pi, i] = acc[i]

    if has_bias:
        @T.prim_func(private=True, s_tir=True)
        def qgemv_int8(X: T.Buffer((1, k), "float32"), W: T.Buffer((p, nb, H, J, 4 * lanes), "uint8"),
                       S: T.Buffer((p, 2, ng, nr), "float32"), B: T.Buffer((p, nr), "float32"),
                       Y: T.Buffer((1, p, nr), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            body(X, W, S, B, Y)
    else:
        @T.prim_func(private=True, s_tir=True)
        def qgemv_int8(X: T.Buffer((1, k), "float32"), W: T.Buffer((p, nb, H, J, 4 * lanes), "uint8"),
                       S: T.Buffer((p, 2, ng, nr), "float32"), Y: T.Buffer((1, p, nr), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            body(X, W, S, None, Y)
    # fmt: on
    return qgemv_int8
