"""Backpressure (429 + Retry-After when the waiting queue is full) and SIGTERM drain, on a one-slot server."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import LiveServer, start_server

LONG = {"prompt": "Count slowly:", "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def one_slot() -> Iterator[LiveServer]:
    """One running sequence at a time, one waiting request allowed, no API key."""
    live = start_server("--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", "60")
    yield live
    live.stop()


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_gets_429_with_retry_after(one_slot: LiveServer) -> None:
    url = one_slot.base_url
    with httpx.Client(base_url=url, timeout=120) as running, ThreadPoolExecutor(1) as pool:
        with running.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 48, "stream": True}) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()
            assert next(first_lines).startswith("data: ")  # it runs (headers alone come while still queued)
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=120)
            assert wait_for(lambda: one_slot.metric("kvserve_num_requests_waiting") == 1)
            rejected = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2})
            assert rejected.status_code == 429
            assert int(rejected.headers["Retry-After"]) >= 1
            assert rejected.json()["error"]["code"] == "queue_full"
            list(first_lines)  # to the end: the slot frees
        assert waiting.result().status_code == 200  # the queued one was served once the slot freed
    assert httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


def test_sigterm_drains_in_flight_then_exits_zero(one_slot: LiveServer) -> None:
    url = one_slot.base_url
    with httpx.Client(base_url=url, timeout=120) as session:
        with session.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 40, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            one_slot.process.send_signal(signal.SIGTERM)
            assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, timeout=5)
            assert httpx.get(f"{url}/health").status_code == 200
            refused = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to max_tokens, not aborted
    assert one_slot.process.wait(30) == 0
