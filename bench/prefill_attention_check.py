"""The flash-style prefill attention kernel (llmasos/backends/tvm/cuda_attention.py) on a GPU: numerics and time
against torch's scaled_dot_product_attention (causal, GQA heads repeated) and against torch's math of the
cache layout (a prefix at pos > 0), in the same run.

    python bench/prefill_attention_check.py [--heads 32:8] [--head-dim 64] [--batch 1,8] [--prompt 128,1024]
                                            [--max-seq 1152] [--repeat 20] [--out FILE]

``--kernels mma,mma_s2,mma_w8,mma_w8_s2,cuda_cores``: the tensor-core kernel (4 or 8 warps a block, one or
two cp.async K/V stages) and the CUDA-core one, each timed in every row.
Per case: max |out - ref| (ref: f32 math of the same f16 operands) for ours and torch's SDPA, median
milliseconds of ``--repeat`` back-to-back calls (CUDA events, 3 samples), TFLOP/s counted as the causal
work (2 * 2 * B * H * D * sum over queries of the positions they see). A prefix case (pos = 100, 37 new
queries) checks the position offset, and a paged case (the paged kernel through a shuffled block table
with an unallocated block inside a row's range) the paged layout; rows of ``out`` are all written. One JSON document on stdout, rows on
stderr.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # after the rest: no shadowing

from _cuda_timing import median_ms  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="32:8", help="query heads:kv heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt", default="128,1024")
    p.add_argument("--max-seq", type=int, default=1152)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--kernels", default="mma,mma_s2,mma_w8,mma_w8_s2,cuda_cores",
                   help="which kernels: mma[_w8][_s2] (tensor cores: 8 warps a block, cp.async double-buffered "
                        "K/V) and/or cuda_cores")
    a = p.parse_args(argv)

    import torch
    import tvm

    from llmasos.backends.tvm import resolve_target
    from llmasos.backends.tvm.cuda_attention import (paged_prefill_attention_func, paged_prefill_attention_mma_func,
                                                     prefill_attention_func, prefill_attention_mma_func,
                                                     prefill_attention_mma_supported, prefill_attention_supported)

    h, hkv = (int(v) for v in a.heads.split(":"))
    d, m, rep = a.head_dim, a.max_seq, h // hkv
    scale = d ** -0.5
    spec = resolve_target("cuda")
    t0 = time.perf_counter()

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                           target=spec.tvm_target())["main"]
    # name -> (contiguous maker, paged maker, whether the kernel covers this layout)
    makers = {"cuda_cores": (lambda: prefill_attention_func(h, hkv, m, d, "float16", "int32", scale),
                             lambda bs, mb: paged_prefill_attention_func(h, hkv, bs, mb, d, "float16", "int32", scale),
                             prefill_attention_supported(h, hkv, m, d, "float16"))}
    for w in (4, 8):            # mma, mma_w8, mma_s2, mma_w8_s2: warps a block, K/V stages (cp.async)
        for st in (1, 2):
            makers["mma" + (f"_w{w}" if w != 4 else "") + (f"_s{st}" if st != 1 else "")] = (
                lambda w=w, st=st: prefill_attention_mma_func(h, hkv, m, d, "int32", scale, w, st),
                lambda bs, mb, w=w, st=st: paged_prefill_attention_mma_func(h, hkv, bs, mb, d, "int32", scale, w, st),
                prefill_attention_mma_supported(h, hkv, m, d, "float16", w, st))
    asked = [k for k in a.kernels.split(",") if k]
    if not asked or any(k not in makers for k in asked):
        p.error(f"--kernels: choose from {sorted(makers)}")
    names = [k for k in asked if makers[k][2]]          # a variant that does not cover the layout is skipped
    if not names:
        p.error(f"--kernels: none of {asked} covers heads {h}:{hkv}, head dim {d}")
    fns = {k: build(makers[k][0]()) for k in names}
    doc = {"gpu": torch.cuda.get_device_name(0), "heads": h, "kv_heads": hkv, "head_dim": d, "max_seq": m,
           "kernels": names, "skipped_kernels": [k for k in asked if k not in names],
           "compile_s": time.perf_counter() - t0, "rows": []}

    def cuda_ms(call):
        return median_ms(call, a.repeat)

    def measure(row, k, fn, inputs, ref):
        """Kernel ``k``'s figures into ``row``: every output row written, max |out - ref| after one call and
        after the timed calls (a race would show in some of them), median ms."""
        q = inputs[0]
        out = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
        args = [tvm.runtime.from_dlpack(x) for x in (*inputs, out)]
        fn(*args)
        torch.cuda.synchronize()
        row[f"{k}_all_written"] = bool(torch.isfinite(out).all())
        row[f"{k}_max_abs_err"] = float((out.float() - ref).abs().max())
        row[f"{k}_ms"] = cuda_ms(lambda: fn(*args))
        torch.cuda.synchronize()
        row[f"{k}_max_abs_err_after_timing"] = float((out.float() - ref).abs().max())

    def reference(q, kc, vc, pos):
        """f32 attention of query t of row b at position pos[b] + t over cache rows 0..pos[b] + t."""
        b_, _, t_, _ = q.shape
        k = kc.float().repeat_interleave(rep, 1)
        v = vc.float().repeat_interleave(rep, 1)
        s = torch.einsum("bhtd,bhjd->bhtj", q.float(), k) * scale
        j = torch.arange(m, device=q.device)
        t = torch.arange(t_, device=q.device)
        allowed = j[None, None, :] <= (pos.long()[:, None, None] + t[None, :, None])  # [B, T, M]
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(s, -1) @ v

    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [(int(b), int(t), 0) for b in a.batch.split(",") for t in a.prompt.split(",")] + [(2, 37, 100)]
    for b, t, p0 in cases:
        if p0 + t > m:
            doc["rows"].append({"batch": b, "prompt": t, "pos": p0, "skipped": "past max_seq"})
            continue
        q = torch.randn(b, h, t, d, generator=g).half().cuda()
        kc = torch.randn(b, hkv, m, d, generator=g).half().cuda()
        vc = torch.randn(b, hkv, m, d, generator=g).half().cuda()
        pos = torch.full((b,), p0, dtype=torch.int32, device="cuda")
        ref = reference(q, kc, vc, pos)
        row = {"batch": b, "prompt": t, "pos": p0}
        flop = 4 * b * h * d * sum(min(p0 + i + 1, m) for i in range(t))
        for k, fn in fns.items():
            measure(row, k, fn, (q, kc, vc, pos), ref)
            row[f"{k}_tflops"] = flop / (row[f"{k}_ms"] / 1e3) / 1e12
        if p0 == 0:
            # torch's own fused causal attention over the prompt's keys (the cache rows 0..T-1)
            kr = kc[:, :, :t].repeat_interleave(rep, 1)
            vr = vc[:, :, :t].repeat_interleave(rep, 1)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            y = sdpa(q, kr, vr, is_causal=True, scale=scale)
            row["sdpa_max_abs_err"] = float((y.float() - ref).abs().max())
            row["sdpa_ms"] = cuda_ms(lambda: sdpa(q, kr, vr, is_causal=True, scale=scale))
            for k in fns:
                row[f"{k}_vs_sdpa"] = row["sdpa_ms"] / row[f"{k}_ms"]
        log(json.dumps(row))
        doc["rows"].append(row)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(doc, f, indent=1)
    # the paged kernel: the same attention through a shuffled block table (block size 16), one unallocated
    # block inside row 1's range (it must weigh 0), against the contiguous reference of the gathered rows
    bs, b, t, p0 = 16, 2, 200, 300
    mb = m // bs
    pfns = {k: build(makers[k][1](bs, mb)) for k in names}
    nb = b * mb + 3
    perm = torch.randperm(nb, generator=g)[: b * mb].view(b, mb).int()
    table = perm.clone()
    table[1, 5] = -1
    kp = torch.randn(nb, hkv, bs, d, generator=g).half().cuda()
    vp = torch.randn(nb, hkv, bs, d, generator=g).half().cuda()
    q = torch.randn(b, h, t, d, generator=g).half().cuda()
    pos = torch.full((b,), p0, dtype=torch.int32, device="cuda")
    tab = table.cuda()
    kc = kp[perm.long().cuda()].permute(0, 2, 1, 3, 4).reshape(b, hkv, mb * bs, d)   # [B, Hkv, M, D]
    vc = vp[perm.long().cuda()].permute(0, 2, 1, 3, 4).reshape(b, hkv, mb * bs, d)
    kc[1, :, 5 * bs:6 * bs] = 0
    vc[1, :, 5 * bs:6 * bs] = 0
    ref = reference(q, kc, vc, pos)
    # row 1's unallocated block is excluded from its softmax: recompute row 1 without those positions
    keep = torch.ones(mb * bs, dtype=torch.bool, device=q.device)
    keep[5 * bs:6 * bs] = False
    k1 = kc[1:2, :, keep].float().repeat_interleave(rep, 1)
    v1 = vc[1:2, :, keep].float().repeat_interleave(rep, 1)
    jpos = torch.arange(mb * bs, device=q.device)[keep]
    s1 = torch.einsum("bhtd,bhjd->bhtj", q[1:2].float(), k1) * scale
    s1 = s1.masked_fill(~(jpos[None, None, None, :] <= p0 + torch.arange(t, device=q.device)[None, None, :, None]),
                        float("-inf"))
    ref[1:2] = torch.softmax(s1, -1) @ v1
    row = {"paged": True, "batch": b, "prompt": t, "pos": p0, "block_size": bs}
    for k, pfn in pfns.items():
        measure(row, k, pfn, (q, kp, vp, pos, tab), ref)
    log(json.dumps(row))
    doc["rows"].append(row)
    doc["ok"] = all(r.get(f"{k}_all_written", True) and max(r.get(f"{k}_max_abs_err", 0),
                                                            r.get(f"{k}_max_abs_err_after_timing", 0)) < 1e-2
                    for r in doc["rows"] for k in names)
    print(json.dumps(doc, indent=1))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
