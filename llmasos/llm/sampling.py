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
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
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
