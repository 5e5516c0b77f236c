"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Runs with torch on whatever device the logits live on (the GPU's logits never come to the host; only the
chosen ids do), seeded per request so sampled generations are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). top_k 0 keeps every token;
    top_p 1.0 keeps every token. ``seed`` makes sampling reproducible."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling top_k must be an int >= 0 (0 = no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @staticmethod
    def of(x) -> "Sampling":
        """A Sampling from None (greedy), a Sampling, or a dict of its fields."""
        if x is None:
            return Sampling()
        if isinstance(x, Sampling):
            return x
        if isinstance(x, dict):
            unknown = set(x) - {"temperature", "top_k", "top_p", "seed"}
            if unknown:
                raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; known: temperature, top_k, "
                                 f"top_p, seed")
            return Sampling(**x)
        raise TypeError(f"sampling must be None, a Sampling or a dict, got {type(x).__name__}")


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Logits [B, V] (float) with every token outside the top-k / top-p set at -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the most likely
    token always survives)."""
    import torch  # deferred: torch (`import llmasos` imports this module)

    x = logits.float()
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        probs = sorted_x.softmax(-1).double()      # f64 sums: an f32 cumsum saturates before a large vocab ends
        # a token is dropped when the tokens before it already reach top_p
        before = probs.cumsum(-1) - probs
        drop = before >= top_p
        drop[..., 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def sample(logits, sampling: Sampling, generator=None):
    """Next ids [B] (int64, on the logits' device) from logits [B, V]."""
    import torch  # deferred: torch (`import llmasos` imports this module)

    if sampling.greedy:
        return torch.argmax(logits, dim=-1)
    x = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(sampling: Sampling, device):
    import torch  # deferred: torch (`import llmasos` imports this module)

    if sampling.greedy or sampling.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(sampling.seed)
    return g


def sample_rows(logits, temperature, top_k, top_p, u, rows=None):
    """Next ids [B] (int64, on the logits' device) of a batch whose rows each have their own options.

    logits [B, V]; temperature, top_p (float) and top_k (int) [B] tensors on the logits' device; ``u`` [B]
    uniforms in [0, 1) drawn by each request's own generator (so a seeded request makes the same tokens in
    any batch, and only one number per row and step comes from the host); ``rows``: the indices of the rows
    that sample (temperature > 0; None: every row whose temperature is > 0, found on the device) -- every
    other row is greedy (argmax). A sampled row keeps the tokens ``filter_logits`` keeps (top-k, then top-p
    of what is left) and picks by inverse CDF: the first token, most likely first, whose cumulative
    probability exceeds u. Batched over the rows (one sort), no per-row kernels, no host sync."""
    import torch  # deferred: torch (`import llmasos` imports this module)

    ids = torch.argmax(logits, dim=-1)
    if rows is None:
        rows = torch.nonzero(temperature > 0).flatten()
    elif len(rows) == 0:
        return ids
    else:
        rows = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
    V = logits.shape[-1]
    x = logits.index_select(0, rows).float() / temperature.index_select(0, rows).float()[:, None]
    xs, order = torch.sort(x, dim=-1, descending=True, stable=True)   # stable: ties (f16 logits) pick alike anywhere
    k = top_k.index_select(0, rows).long()
    k = torch.where((k > 0) & (k < V), k, torch.full_like(k, V))
    kth = xs.gather(1, (k - 1)[:, None])
    xs = xs.masked_fill(xs < kth, float("-inf"))                  # top-k: ties with the k-th value stay, as filter_logits
    probs = xs.softmax(-1).double()               # f64 sums: an f32 cumsum saturates before a large vocab ends
    before = probs.cumsum(-1) - probs
    p = top_p.index_select(0, rows).double()[:, None]
    drop = (before >= p) & (p < 1)                 # top_p = 1 keeps every token, as filter_logits
    drop[:, 0] = False
    w = probs.masked_fill(drop, 0.0)
    c = w.cumsum(-1)
    target = u.index_select(0, rows).to(c.dtype)[:, None] * c[:, -1:]
    j = torch.searchsorted(c, target, right=True)
    last_kept = (w > 0).sum(-1, keepdim=True) - 1                  # float safety: never past the kept tokens
    j = torch.minimum(j, last_kept.clamp(min=0))
    ids = ids.index_copy(0, rows, order.gather(1, j)[:, 0])
    return ids
