"""Resident memory of a live server stays flat over bursts of concurrent requests of mixed lengths."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from live_server import SERVED_NAME, LiveServer, start_server

pytestmark = pytest.mark.slow

BURSTS = 4
CONCURRENT = 48
MAX_GROWTH_MB = 100
WORDS = ("the quick brown fox jumps over a lazy dog while seven sailors sing about distant islands and "
         "an old lighthouse keeper counts the ships that pass before the storm").split()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


async def burst(server: LiveServer, seed: int) -> list[int]:
    """CONCURRENT requests at once: a quarter with ~300-word prompts, the rest short; chat and completions,
    streamed and not. Returns their status codes."""
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        words = 300 if i % 4 == 0 else rng.randint(3, 30)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        options = {"model": SERVED_NAME, "max_tokens": rng.randint(2, 12), "temperature": 0.8, "stream": i % 3 == 0}
        if i % 2:
            response = await client.post("/v1/chat/completions",
                                         json={**options, "messages": [{"role": "user", "content": text}]})
        else:
            response = await client.post("/v1/completions", json={**options, "prompt": text})
        return response.status_code

    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
        return await asyncio.gather(*(one(client, i) for i in range(CONCURRENT)))


def wait_until_kv_cache_resident(server: LiveServer, timeout: float = 300.0) -> None:
    """The KV cache's pages are made resident on a background thread after start-up (engine/resident_memory.py);
    until it logs that it is done, RSS climbs by up to the cache's size whatever the requests do."""
    deadline = time.monotonic() + timeout
    while "KV cache resident" not in server.log_text():
        assert time.monotonic() < deadline, "the server never logged that its KV cache is resident"
        time.sleep(0.2)


@pytest.mark.timeout(1800)  # ~1 min on an idle 2-core box; far longer on a shared one
def test_rss_stays_flat_over_bursts_of_mixed_requests() -> None:
    server = start_server()
    try:
        pid = server.process.pid
        wait_until_kv_cache_resident(server)
        assert set(asyncio.run(burst(server, seed=0))) == {200}  # warm-up: first-use allocations happen here
        after_warmup = rss_mb(pid)
        readings = []
        for seed in range(1, BURSTS + 1):
            assert set(asyncio.run(burst(server, seed))) == {200}
            readings.append(rss_mb(pid))
        print(f"RSS after the warm-up burst {after_warmup:.0f} MB, after each of {BURSTS} more bursts of "
              f"{CONCURRENT}: {', '.join(f'{mb:.0f}' for mb in readings)} MB")
        assert readings[-1] - after_warmup <= MAX_GROWTH_MB
    finally:
        assert server.stop() == 0
