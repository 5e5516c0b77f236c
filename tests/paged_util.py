"""Helpers of the paged-KV-cache tests: scatter contiguous caches into a pool through a random block table."""
from __future__ import annotations

import numpy as np


def scattered_table(rng, batch: int, mb: int, used: np.ndarray, spare: int = 3) -> tuple[np.ndarray, int]:
    """(table [batch, mb] i32, num_blocks): row b gets used[b] distinct blocks drawn at random from a pool of
    sum(used) + spare blocks (so rows interleave and leave holes), its other entries -1."""
    nb = int(np.sum(used)) + spare
    perm = rng.permutation(nb)
    table = np.full((batch, mb), -1, np.int32)
    i = 0
    for b in range(batch):
        table[b, :used[b]] = perm[i:i + used[b]]
        i += used[b]
    return table, nb


def scatter(cache: np.ndarray, table: np.ndarray, nb: int, bs: int, rng=None) -> np.ndarray:
    """A pool [nb, Hkv, bs, D] holding row b's cache positions in its table's blocks (other blocks random
    finite noise when rng is given, else zeros)."""
    B, hkv, m, d = cache.shape
    pool = np.zeros((nb, hkv, bs, d), cache.dtype) if rng is None else \
        rng.standard_normal((nb, hkv, bs, d)).astype(cache.dtype)
    for b in range(B):
        for k, blk in enumerate(table[b]):
            if blk < 0:
                continue
            seg = cache[b, :, k * bs:(k + 1) * bs]
            pool[blk, :, :seg.shape[1]] = seg
    return pool


def gather(pool: np.ndarray, table: np.ndarray, m: int) -> np.ndarray:
    """[B, Hkv, m, D]: each row's first m positions read back through its table (unallocated: zeros)."""
    nb, hkv, bs, d = pool.shape
    out = np.zeros((table.shape[0], hkv, m, d), pool.dtype)
    for b in range(table.shape[0]):
        for p in range(m):
            blk = table[b, p // bs]
            if blk >= 0:
                out[b, :, p] = pool[blk, :, p % bs]
    return out
