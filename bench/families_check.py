"""compile_lm for every built-in model family on a target (default cuda), against transformers' greedy tokens.

    python bench/families_check.py [--target cuda] [--n 32] [--families llama,gpt2,qwen2,mistral,phi3,gemma]

Each family's tiny random preset (llmasos/llm/presets.py; norms and q/k/v biases randomised so they matter) is
compiled with compile_lm (f32, batch 1 and a batch-2 symbolic build) and its greedy tokens compared with
transformers' generate on the CPU. One JSON document: per family, whether the tokens match, the first
mismatch, and compile seconds; plus an MQA (kv_heads=1) Llama (its one-head KV append once failed the build).
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {"llama": "llama-tiny", "gpt2": "gpt2-tiny", "qwen2": "qwen2-tiny", "mistral": "mistral-tiny",
           "phi3": "phi3-tiny", "gemma": "gemma-tiny", "llama-mqa": "llama-tiny"}


def main(argv=None) -> int:
    import torch

    import llmasos
    from llmasos.llm.presets import hf_model
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--families", default=",".join(PRESETS))
    args = ap.parse_args(argv)
    out = {"target": args.target, "n": args.n, "families": {}}
    for fam in args.families.split(","):
        kw = {"num_key_value_heads": 1} if fam == "llama-mqa" else {}
        m = hf_model(PRESETS[fam], seed=3, eos_token_id=None, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n and n.endswith("weight"):
                    p.normal_(0.0, 0.3)
                if n.endswith("_proj.bias"):
                    p.normal_(0.0, 0.5)
        prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
        cfg = copy.deepcopy(m.generation_config)
        cfg.eos_token_id, cfg.pad_token_id = None, 0
        cfg.max_new_tokens, cfg.do_sample, cfg.use_cache = args.n, False, True
        want = m.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg)[0, 5:].tolist()
        row = {}
        for label, opts in (("batch1", dict(batch=1)), ("symbolic", dict(max_batch=2))):
            t0 = time.perf_counter()
            try:
                lm = llmasos.compile_lm(m, args.target, max_seq=min(5 + args.n, 32 if fam == "mistral" else 64),
                                        **opts)
                got = lm.generate(prompt[0].tolist(), args.n)
                bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                row[label] = {"match": got == want, "first_mismatch": bad,
                              "compile_s": round(time.perf_counter() - t0, 1)}
            except Exception as e:  # noqa: BLE001 -- reported, the next family runs
                row[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["families"][fam] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
