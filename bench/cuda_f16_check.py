"""CUDA f16 accuracy of ``llmasos.compile`` and ``torch.compile(backend="llmasos")`` on transformers models.

    python bench/cuda_f16_check.py [--models gpt2-small,llama-135m] [--seq 128]

On an H100 the torch.compile backend's f16 logits were wrong (GPT-2-small: NaN; Llama-135M shape: max error
2.5 at logits scale 2.4) while the same graphs in f16 on the CPU and the compile_lm path on CUDA are right.
Suspect: DLight's tensor-core Matmul rule, which TVM applies to f16 GEMMs whose static extents all exceed
64 on sm >= 70 (dynamo hands static shapes; compile_lm's prefill has a symbolic length). This script
separates the cases in one run: per model, ``llmasos.compile`` with static shapes at the GPU's own arch and
at sm_60 (no tensor-core rule), with symbolic shapes, and the torch.compile backend; each against torch
eager in f16. One JSON line per case on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2-small,llama-135m")
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args(argv)

    import torch

    import llmasos
    import llmasos.dynamo
    from llmasos.backends.tvm import resolve_target
    from llmasos.llm.presets import hf_model

    warnings.simplefilter("ignore")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    cuda = resolve_target("cuda")
    old = {**cuda.target, "arch": "sm_60"}
    for name in a.models.split(","):
        torch.manual_seed(0)
        m = hf_model(name).to(torch.float16).cuda().eval()
        ids = torch.randint(0, 1000, (1, a.seq), device="cuda")
        with torch.no_grad():
            ref = m(ids).logits.float()
            cases = [("compile static", cuda, None), ("compile static sm_60", old, None),
                     ("compile symbolic", cuda, "auto"), ("torch.compile backend", cuda, "dynamo")]
            for what, target, shapes in cases:
                t0 = time.perf_counter()
                arch = (target.target if hasattr(target, "target") else target)["arch"]
                row = {"model": name, "case": what, "arch": arch}
                try:
                    if shapes == "dynamo":
                        torch._dynamo.reset()
                        # the backend function itself: a checkout without the entry point runs it too
                        fast = torch.compile(m, backend=llmasos.dynamo.backend, options={"target": target})
                        out = fast(ids).logits.float()
                    else:
                        cm = llmasos.compile(m, target, example_inputs=(ids,), dynamic_shapes=shapes,
                                             max_seq=max(2 * a.seq, 256), max_batch=2)
                        out = cm(ids).logits.float()
                    row.update(max_abs_err=float((out - ref).abs().max()), nan=bool(out.isnan().any()),
                               logits_scale=float(ref.abs().max()))
                except Exception as e:  # noqa: BLE001 -- a case that fails is a result too
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(row), flush=True)
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
