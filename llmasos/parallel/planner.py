"""``plan_parallel``: pick TP x PP x DP for a model on N devices from a roofline cost model, and explain it;
``simulate_table``: predicted decode tok/s and memory per GPU past the machines we can borrow.

Model of one batch-B decode step (memory-bound at small B, as LLM decode is):

* weights per device  = P * bytes / (TP * PP);  KV per device = 2 * L * Hkv * D * S * B * bytes / (TP * PP)
  (KV heads split over TP, layers over PP); a plan must fit ``memory_per_device`` with 10% headroom;
* time per step, per stage = max(FLOPs / (TP * peak), bytes / (TP * HBM bandwidth)) per layer, plus per
  layer 2 all-reduces of the activations (B x hidden) over TP, each a ring: 2 (TP-1)/TP * bytes / link
  bandwidth + a fixed latency (``link_latency_s``); the vocabulary-parallel head's all-gather once;
* pipeline: a decode token passes every stage in turn (no overlap at batch 1: PP adds capacity, not speed),
  plus one send per stage boundary; with M = PP micro-batches in flight throughput scales by M/PP... we
  count the conservative one-request figure;
* DP replicas multiply throughput (requests are independent) and leave latency as it is.

``plan_parallel`` returns the plan with the best tokens/s per request among those that fit, ties going to
fewer devices per replica (more replicas); ``explain`` says why, with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

GB = 1e9

# Llama-3 8B / 70B shapes (public configs)
SHAPES = {
    "llama-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256),
    "llama-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, vocab=128256),
}
# HBM bandwidth achieved by a memory-bound GEMV (~80% of peak), dense fp16 peak, memory
GPUS = {
    "H100": dict(hbm=3.35e12 * 0.8, flops=989e12 * 0.6, memory=80 * GB),
    "H200": dict(hbm=4.8e12 * 0.8, flops=989e12 * 0.6, memory=141 * GB),
}
LINKS = {"nvlink": 900e9 / 2, "pcie": 64e9 / 2}   # one direction of NVLink 4 (900 GB/s total) / PCIe 5 x16
LATENCY = {"nvlink": 8e-6, "pcie": 25e-6}          # per ring hop of a small all-reduce (NCCL, measured orders)


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @staticmethod
    def of(model) -> "Shape":
        if isinstance(model, Shape):
            return model
        if isinstance(model, str):
            if model not in SHAPES:
                raise ValueError(f"unknown model shape {model!r}: known {sorted(SHAPES)}, or pass a DecoderConfig")
            return Shape(**SHAPES[model])
        if isinstance(model, dict):
            return Shape(**model)
        cfg = getattr(model, "cfg", model)      # a Decoder or a DecoderConfig
        try:
            return Shape(cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn, cfg.vocab)
        except AttributeError:
            raise TypeError(f"plan_parallel takes a DecoderConfig, a Decoder, a shape dict or one of {sorted(SHAPES)}, "
                            f"got {type(model).__name__}") from None

    @property
    def params(self) -> float:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attn + mlp) + 2 * self.vocab * self.hidden


@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    weights_gb: float
    kv_gb: float
    step_ms: float
    tokens_per_s: float            # all replicas
    per_request_tokens_per_s: float
    breakdown: dict = field(default_factory=dict)
    why: str = ""

    def explain(self) -> str:
        return self.why


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def estimate(shape, tp: int, pp: int, dp: int = 1, *, batch: int = 1, seq: int = 4096, bytes_per_param: float = 2,
             hbm_bandwidth: float = GPUS["H200"]["hbm"], peak_flops: float = GPUS["H200"]["flops"],
             link_bandwidth: float = LINKS["nvlink"], link_latency_s: float = 8e-6) -> Plan:
    s = Shape.of(shape)
    weights = s.params * bytes_per_param
    kv = 2 * s.layers * s.kv_heads * s.head_dim * seq * batch * bytes_per_param
    w_dev, kv_dev = weights / (tp * pp), kv / (tp * pp)
    # one token: every weight byte read once, the KV cache read once; 2 flops per weight per row
    compute = max(2 * s.params * batch / (tp * peak_flops), (weights + kv) / (tp * hbm_bandwidth))
    act = batch * s.hidden * bytes_per_param
    allreduce = 0.0
    if tp > 1:
        one = 2 * (tp - 1) / tp * act / link_bandwidth + link_latency_s * (tp - 1)
        allreduce = 2 * s.layers * one + (tp - 1) / tp * batch * s.vocab * bytes_per_param / link_bandwidth
    send = (pp - 1) * (act / link_bandwidth + link_latency_s)
    step = compute + allreduce + send
    per_req = batch / step
    return Plan(tp, pp, dp, w_dev / GB, kv_dev / GB, step * 1e3, per_req * dp, per_req,
                {"compute_ms": compute * 1e3, "allreduce_ms": allreduce * 1e3, "send_ms": send * 1e3})


def plan_parallel(model, devices: int, memory_per_device: float = GPUS["H200"]["memory"],
                  link_bandwidth: float = LINKS["nvlink"], *, batch: int = 1, seq: int = 4096,
                  bytes_per_param: float = 2, hbm_bandwidth: float = GPUS["H200"]["hbm"],
                  peak_flops: float = GPUS["H200"]["flops"]) -> Plan:
    """The TP x PP x DP plan for ``model`` on ``devices`` devices (memory in bytes, bandwidths in bytes/s);
    TP must divide heads, KV heads and ffn (and stays within one node's 8 GPUs), PP at most the layers."""
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an int >= 1, got {devices!r}")
    s = Shape.of(model)
    fits, rejected = [], []
    for tp in _divisors(devices):
        if s.heads % tp or s.kv_heads % tp or s.ffn % tp or tp > 8:
            rejected.append(f"tp={tp}: does not divide heads {s.heads} / KV heads {s.kv_heads} / ffn {s.ffn} "
                            f"(or spans more than one 8-GPU node)")
            continue
        for pp in _divisors(devices // tp):
            if pp > s.layers:
                continue
            dp = devices // (tp * pp)
            p = estimate(s, tp, pp, dp, batch=batch, seq=seq, bytes_per_param=bytes_per_param,
                         hbm_bandwidth=hbm_bandwidth, peak_flops=peak_flops, link_bandwidth=link_bandwidth)
            need = (p.weights_gb + p.kv_gb) * GB * 1.1
            if need > memory_per_device:
                rejected.append(f"tp={tp} pp={pp}: needs {need / GB:.1f} GB per device > {memory_per_device / GB:.0f} GB")
                continue
            fits.append(p)
    if not fits:
        raise ValueError(f"no TP x PP x DP plan on {devices} device(s) of {memory_per_device / GB:.0f} GB fits the model "
                         f"({s.params / 1e9:.1f} B params):\n  " + "\n  ".join(rejected[-6:]))
    # the fastest single request; then the most replicas (throughput)
    best = max(fits, key=lambda p: (round(p.per_request_tokens_per_s, 1), p.dp))
    others = sorted(fits, key=lambda p: -p.per_request_tokens_per_s)[1:4]
    best.why = (f"TP={best.tp} x PP={best.pp} x DP={best.dp} on {devices} device(s): {best.weights_gb:.1f} GB weights + "
                f"{best.kv_gb:.2f} GB KV per device (of {memory_per_device / GB:.0f} GB); a decode step "
                f"{best.step_ms:.2f} ms = {best.breakdown['compute_ms']:.2f} ms reading weights/KV (split over TP) + "
                f"{best.breakdown['allreduce_ms']:.2f} ms all-reduces + {best.breakdown['send_ms']:.2f} ms stage sends "
                f"-> {best.per_request_tokens_per_s:.0f} tok/s per request, {best.tokens_per_s:.0f} tok/s over "
                f"{best.dp} replica(s). Runners-up: " +
                "; ".join(f"TP={p.tp} PP={p.pp} DP={p.dp} {p.per_request_tokens_per_s:.0f} tok/s" for p in others) +
                (f". Rejected: {'; '.join(rejected[:3])}" if rejected else ""))
    return best


def simulate_table(models=("llama-8b", "llama-70b"), gpus=("H100", "H200"), links=("nvlink", "pcie"),
                   tps=(1, 2, 4, 8), devices=(1, 2, 4, 8, 16, 32, 64)) -> list:
    """Rows: model, gpu, link, tp, predicted batch-1 decode tok/s and GB per GPU (weights + 4k-token KV), and
    the planner's pick for each device count."""
    rows = []
    for m in models:
        for gname in gpus:
            g = GPUS[gname]
            for link in links:
                for tp in tps:
                    p = estimate(m, tp, 1, hbm_bandwidth=g["hbm"], peak_flops=g["flops"], link_bandwidth=LINKS[link],
                                 link_latency_s=LATENCY[link])
                    fits = (p.weights_gb + p.kv_gb) * GB * 1.1 <= g["memory"]
                    rows.append({"model": m, "gpu": gname, "link": link, "tp": tp, "pp": 1,
                                 "tok_s": round(p.per_request_tokens_per_s, 1) if fits else None,
                                 "gb_per_gpu": round(p.weights_gb + p.kv_gb, 1), "fits": fits})
                for n in devices:
                    try:
                        p = plan_parallel(m, n, g["memory"], LINKS[link], hbm_bandwidth=g["hbm"], peak_flops=g["flops"])
                        rows.append({"model": m, "gpu": gname, "link": link, "devices": n, "plan": f"{p.tp}x{p.pp}x{p.dp}",
                                     "tok_s_per_request": round(p.per_request_tokens_per_s, 1),
                                     "tok_s_total": round(p.tokens_per_s, 1)})
                    except ValueError:
                        rows.append({"model": m, "gpu": gname, "link": link, "devices": n, "plan": None})
    return rows


__all__ = ["plan_parallel", "simulate_table", "estimate", "Plan", "Shape", "SHAPES", "GPUS", "LINKS"]
