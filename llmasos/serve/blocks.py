"""The paged KV cache's block manager: fixed-size blocks, a free list, reference counts, prefix sharing.

The runner holds the K/V pools ([num_blocks, Hkv, block_size, D] per layer); this module only decides which
block holds which positions of which sequence. An unused entry of a block table is -1 (``UNALLOCATED``): the
runner writes nothing there, so the padded positions of a prefill chunk land either there or in the row's
own not-yet-computed blocks (overwritten later), never in another sequence's block.

Prefix sharing: a full block is identified by a hash chain (the hash of its parent block's key and its own
token ids), so equal keys mean equal tokens at equal positions, hence equal K/V. A sequence that becomes a
full block registers it; a new sequence whose prompt starts with registered blocks takes them (ref count +1)
and skips computing them. A block whose count falls to 0 stays registered but evictable (least recently
freed first): it is reused only when the free list is empty. A sequence about to write into a block held by
another is given a copy first (copy-on-write, ``copy`` entries that the engine hands to
``runner.copy_blocks``).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional

UNALLOCATED = -1


class NoFreeBlocks(RuntimeError):
    """Every block is held by a running sequence (the scheduler preempts one and retries)."""


@dataclass(frozen=True)
class BlockKey:
    """A full block's identity in the prefix cache: the chain hash plus what it hashes (checked on a hit, so a
    hash collision can never share the wrong K/V)."""
    hash: int
    parent: Optional[int]
    tokens: tuple


def block_key(parent: Optional[BlockKey], tokens) -> BlockKey:
    toks = tuple(int(t) for t in tokens)
    p = None if parent is None else parent.hash
    return BlockKey(hash((p, toks)), p, toks)


class BlockManager:
    """Blocks 0..num_blocks-1 for sequences."""

    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks, self.block_size, self.prefix_sharing = num_blocks, block_size, prefix_sharing
        self.ref = [0] * num_blocks
        self._free: deque = deque(range(num_blocks))
        self._key_of: dict[int, BlockKey] = {}          # registered block -> its key
        self._by_hash: dict[int, int] = {}              # key hash -> block
        self._evictable: OrderedDict = OrderedDict()    # registered blocks with ref 0, oldest first
        self.hits = 0                                   # blocks shared through the prefix cache (a counter)

    # -- counts ---------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks sequences can use (all of them)."""
        return self.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    # -- allocation -----------------------------------------------------------------------------------
    def allocate(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._unregister(b)
        else:
            raise NoFreeBlocks(f"all {self.capacity} KV blocks are in use")
        self.ref[b] = 1
        return b

    def release(self, block: int) -> None:
        """Drop one reference; at 0 the block is free (or evictable, when registered)."""
        if not 0 <= block < self.num_blocks or self.ref[block] <= 0:
            ref = self.ref[block] if 0 <= block < self.num_blocks else None
            raise RuntimeError(f"release of block {block} with ref count {ref} (double free)")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def release_all(self, blocks) -> None:
        # the tail first: of a sequence's cached blocks, its last ones are evicted before its prefix
        for b in reversed(blocks):
            self.release(b)

    # -- prefix cache ---------------------------------------------------------------------------------
    def lookup(self, key: BlockKey) -> Optional[int]:
        """The registered block with this key, with a new reference taken; None on a miss."""
        if not self.prefix_sharing:
            return None
        b = self._by_hash.get(key.hash)
        if b is None or self._key_of[b] != key:
            return None
        if self.ref[b] == 0:
            del self._evictable[b]
        self.ref[b] += 1
        self.hits += 1
        return b

    def register(self, block: int, key: BlockKey) -> None:
        """Make a full block findable by ``key`` (a block already holding that key is kept instead)."""
        if not self.prefix_sharing or block in self._key_of or key.hash in self._by_hash:
            return
        self._key_of[block] = key
        self._by_hash[key.hash] = block

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None and self._by_hash.get(key.hash) == block:
            del self._by_hash[key.hash]

    def drop_cache(self) -> int:
        """Forget every cached block no sequence holds (they become free); returns how many. Blocks in use
        keep their keys. (A benchmark replaying the same prompts starts each run from a cold cache.)"""
        n = len(self._evictable)
        for b in self._evictable:
            self._unregister(b)
            self._free.append(b)
        self._evictable.clear()
        return n

    def prepare_write(self, block: int, copies: list) -> int:
        """The block a sequence may write into in place of ``block``: itself when only that sequence holds it
        (dropped from the prefix cache, whose key would no longer describe it), else a fresh copy
        (copy-on-write: ``(block, new)`` is appended to ``copies`` for ``runner.copy_blocks``)."""
        if self.ref[block] == 1:
            self._unregister(block)
            return block
        new = self.allocate()
        copies.append((block, new))
        self.release(block)
        return new

    def check(self) -> None:
        """Internal consistency (tests): every block is exactly one of free, evictable, held."""
        free, ev = set(self._free), set(self._evictable)
        assert not free & ev
        for b in range(self.num_blocks):
            held = self.ref[b] > 0
            assert held + (b in free) + (b in ev) == 1, (b, self.ref[b], b in free, b in ev)
            assert b not in ev or b in self._key_of
