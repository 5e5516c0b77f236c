"""Iteration-level scheduling (continuous batching) over the paged KV cache.

Every engine step the scheduler decides, for each running request, how many of its tokens to compute:

* a request whose K/V is complete but for its newest token decodes (1 token);
* a request still prefilling gets a chunk of at most ``prefill_chunk`` tokens, within a per-step budget of
  ``prefill_budget`` prompt tokens, so a long prompt is spread over several steps and the running requests
  keep decoding in between (their inter-token latency is bounded by one chunk, not by a whole prompt).

Requests join at any step: a waiting request is admitted (oldest first) while fewer than ``max_batch`` run
and the free blocks hold its whole prompt (less the blocks it shares through the prefix cache) with one
block per running request to spare. Decode blocks are taken as sequences grow; when none is left the newest
running request is preempted: its blocks are freed and it goes back to the waiting queue, to be recomputed
(prompt + what it already generated) when it is readmitted. Finished and cancelled requests free their
blocks at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .blocks import BlockManager, NoFreeBlocks, block_key
from .request import Request, Status


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Plan:
    """One step: rows (request, tokens to compute from request.num_computed), the block copies the runner
    must make first (copy-on-write), and the requests preempted while planning."""
    rows: list = field(default_factory=list)
    copies: list = field(default_factory=list)
    preempted: list = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch: int, prefill_chunk: int = 256,
                 prefill_budget: Optional[int] = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        if prefill_budget is not None and (isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int)
                                           or prefill_budget < 1):
            raise ValueError(f"prefill_budget must be an int >= 1 (prompt tokens computed per step) or None "
                             f"(default: 2 * prefill_chunk), got {prefill_budget!r}")
        self.blocks = blocks
        self.bs = blocks.block_size
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = 2 * prefill_chunk if prefill_budget is None else prefill_budget
        self.waiting: list = []       # by arrival (seq_no): preempted requests go back to their place
        self.running: list = []       # by arrival
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self._insert(self.waiting, req)

    @staticmethod
    def _insert(queue: list, req: Request) -> None:
        i = len(queue)
        while i > 0 and queue[i - 1].seq_no > req.seq_no:
            i -= 1
        queue.insert(i, req)

    def free(self, req: Request) -> None:
        """Finish or cancel: the request leaves both queues and its blocks are released now."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release_all(req.block_table)
        req.block_table = []
        req.status = Status.FINISHED

    def _preempt(self, req: Request, plan: Plan) -> None:
        self.running.remove(req)
        mine = set(req.block_table)     # copies into its blocks are void: those blocks may be handed out again
        plan.copies = [(s, d) for s, d in plan.copies if d not in mine]
        self.blocks.release_all(req.block_table)
        req.block_table, req.keys, req.num_computed = [], [], 0
        req.preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(req)
        plan.rows = [(r, n) for r, n in plan.rows if r is not req]
        self.add(req)

    # -- admission ------------------------------------------------------------------------------------
    def _prefix_keys(self, req: Request) -> list:
        ids, keys, parent = req.all_ids, [], None
        for i in range(len(ids) // self.bs):
            parent = block_key(parent, ids[i * self.bs:(i + 1) * self.bs])
            keys.append(parent)
        return keys

    def _try_admit(self, req: Request) -> bool:
        bm = self.blocks
        keys = self._prefix_keys(req) if bm.prefix_sharing else []
        hits = []
        for k in keys:                                  # peek first: take references only if it fits
            b = bm._by_hash.get(k.hash)
            if b is None or bm._key_of.get(b) != k:
                break
            hits.append(b)
        n = req.num_tokens
        computed = min(len(hits) * self.bs, n - 1)      # the last token is always computed (its logits)
        need = cdiv(n, self.bs) - len(hits) + (1 if computed < len(hits) * self.bs else 0)   # + a COW copy
        reusing_free = sum(1 for b in hits if bm.ref[b] == 0)
        if bm.num_free - reusing_free < need + len(self.running):
            return False
        for k in keys[:len(hits)]:
            req.block_table.append(bm.lookup(k))
        req.keys = list(keys[:len(hits)])
        req.num_computed = computed
        try:
            while len(req.block_table) < cdiv(n, self.bs):
                req.block_table.append(bm.allocate())
        except NoFreeBlocks:    # cannot happen after the check above; keep the books straight if it does
            bm.release_all(req.block_table)
            req.block_table, req.keys, req.num_computed = [], [], 0
            return False
        req.status = Status.RUNNING
        self._insert(self.running, req)
        return True

    # -- one step -------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan()
        while self.waiting and len(self.running) < self.max_batch:
            if not self._try_admit(self.waiting[0]):
                break
            self.waiting.pop(0)
        budget = self.prefill_budget
        for req in list(self.running):
            if req.status is not Status.RUNNING:        # preempted while planning an older request
                continue
            remaining = req.num_tokens - req.num_computed
            if remaining <= 0:
                continue
            if remaining == 1:
                n = 1
            else:
                n = min(remaining, self.prefill_chunk, budget)
                if n <= 0:
                    continue
            if not self._reserve(req, n, plan):
                continue
            if n > 1 or remaining > 1:
                budget -= n
            plan.rows.append((req, n))
        return plan

    def _reserve(self, req: Request, n: int, plan: Plan) -> bool:
        """Blocks for positions [num_computed, num_computed + n), writable by ``req`` (copy-on-write where
        shared), preempting the newest running requests when none is free. False when ``req`` itself was
        preempted."""
        bm = self.blocks
        start, end = req.num_computed, req.num_computed + n
        while True:
            try:
                while len(req.block_table) < cdiv(end, self.bs):
                    req.block_table.append(bm.allocate())
                for i in range(start // self.bs, cdiv(end, self.bs)):
                    b = req.block_table[i]
                    if bm.ref[b] > 1 or b in bm._key_of:
                        req.block_table[i] = bm.prepare_write(b, plan.copies)
                        del req.keys[i:]                # this block (and any after) is no longer cached
                return True
            except NoFreeBlocks:
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is req:
                    return False

    def computed(self, req: Request, n: int) -> None:
        """After the runner ran a plan row: n more tokens have K/V; register the blocks that became full."""
        req.num_computed += n
        ids = None
        for i in range(len(req.keys), req.num_computed // self.bs):
            ids = ids or req.all_ids
            key = block_key(req.keys[-1] if req.keys else None, ids[i * self.bs:(i + 1) * self.bs])
            self.blocks.register(req.block_table[i], key)
            req.keys.append(key)
