"""Soak: many clients for a while (streaming and not, chat and completions, some hanging up mid-stream), a KV
pool small enough that requests get preempted. Every completed greedy answer equals its reference, every
block is free at the end, and the process RSS is flat (no per-request leak). Short by default; the 60-second,
concurrency-32 run of the issue is marked slow."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import psutil
import pytest

from .fake_runner import reference
from .test_server import EOS, VOCAB, make_server, metric, wait_blocks_free


def soak(tok, seconds: float, concurrency: int, seed: int = 0) -> dict:
    # 48 blocks of 4 = 192 positions for up to 8 running requests of up to 80: preemption happens
    with make_server(tok, num_blocks=48, max_batch=8, max_waiting=10_000).start() as s:
        proc = psutil.Process()
        stats = {"ok": 0, "checked": 0, "hangups": 0, "errors": [], "rss": []}

        async def worker(w: int, c: httpx.AsyncClient, until: float):
            rng = random.Random(seed * 1000 + w)
            while time.monotonic() < until:
                ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
                mt = rng.randint(1, 40)
                kind = rng.random()
                if kind < 0.15:         # a client that hangs up after a few chunks
                    async with c.stream("POST", "/v1/completions", json={
                            "prompt": ids, "max_tokens": mt, "temperature": 0, "stream": True}) as r:
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: {")
                            if n >= 2:
                                break
                    stats["hangups"] += 1
                    continue
                if kind < 0.25:
                    body = {"messages": [{"role": "user", "content": "x" * rng.randint(1, 30)}],
                            "max_tokens": mt, "temperature": 0.7, "seed": rng.randrange(100)}
                    r = await c.post("/v1/chat/completions", json=body)
                elif kind < 0.5:
                    async with c.stream("POST", "/v1/completions", json={
                            "prompt": ids, "max_tokens": mt, "temperature": 0, "stream": True}) as r:
                        lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]":
                        stats["errors"].append((r.status_code, lines[-3:]))
                    stats["ok"] += 1
                    continue
                else:
                    r = await c.post("/v1/completions", json={"prompt": ids, "max_tokens": mt, "temperature": 0})
                    if r.status_code == 200:
                        want = reference(ids, mt, VOCAB, stop=(EOS,))
                        if r.json()["usage"]["completion_tokens"] != len(want) or r.json()["choices"][0]["text"] \
                                != tok.decode([t for t in want if t != EOS], skip_special_tokens=True):
                            stats["errors"].append(("mismatch", ids, mt))
                        stats["checked"] += 1
                if r.status_code != 200:
                    stats["errors"].append((r.status_code, r.text[:200]))
                stats["ok"] += 1

        async def sample_rss(until: float):
            while time.monotonic() < until:
                stats["rss"].append(proc.memory_info().rss)
                await asyncio.sleep(0.25)

        async def main():
            until = time.monotonic() + seconds
            limits = httpx.Limits(max_connections=concurrency + 4)
            async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as c:
                await asyncio.gather(sample_rss(until), *(worker(w, c, until) for w in range(concurrency)))
        asyncio.run(main())
        wait_blocks_free(s, timeout=30)
        s.engine.blocks.check()
        assert not s.engine.requests and s.engine.blocks.num_used == 0
        stats["preemptions"] = s.engine.scheduler.num_preemptions
        stats["aborts"] = metric(s, 'llmasos_requests_total{reason="abort"}')
        stats["blocks_used"] = metric(s, "llmasos_kv_blocks_used")
        return stats


def _check(st, min_ok):
    print({k: v for k, v in st.items() if k != "rss"}, f"rss {min(st['rss']) / 2**20:.0f}..{max(st['rss']) / 2**20:.0f} MiB")
    assert not st["errors"], st["errors"][:5]
    assert st["ok"] >= min_ok and st["checked"] >= 1 and st["hangups"] >= 1, st
    assert st["blocks_used"] == 0
    rss = st["rss"]
    third = len(rss) // 3
    settled, end = max(rss[third:2 * third]), max(rss[2 * third:])
    assert end - settled < 40 * 2**20, f"RSS grew {(end - settled) / 2**20:.1f} MiB in the last third"


def test_soak_short(smol_tokenizer):
    st = soak(smol_tokenizer, seconds=6, concurrency=8)
    _check(st, min_ok=10)


@pytest.mark.slow
def test_soak_60s_concurrency_32(smol_tokenizer):
    st = soak(smol_tokenizer, seconds=60, concurrency=32, seed=1)
    _check(st, min_ok=100)
    assert st["preemptions"] > 0 and st["aborts"] >= 1
