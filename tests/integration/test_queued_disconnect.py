"""Requests that wait in the queue: a stream gets its headers at once, and a client that leaves while
queued is dropped within 2 s without being prefilled, counted and logged as aborted (one-slot server)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from live_server import LiveServer, start_server

RUNNING = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}
QUEUED_PROMPT = "A queued request that its client gives up on before it is scheduled. " * 3
ABORT_DEADLINE_S = 2.0
# The engine drops an aborted request at its next step boundary: milliseconds here, but a step can take
# seconds on a CI box shared by many jobs.
ENGINE_STEP_SLACK_S = 30.0


@pytest.fixture(scope="module")
def one_slot() -> Iterator[LiveServer]:
    live = start_server("--max-num-seqs", "1")
    yield live
    live.stop()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def aborted(server: LiveServer, aborted_before: float) -> bool:
    """The server noticed the client leave and aborted its engine request."""
    return server.metric("kvserve_request_aborted_total", reason="client_disconnected") == aborted_before + 1


def log_line(server: LiveServer, request_id: str) -> dict:
    """The request log line of one request (JSON log format)."""
    for line in server.log_text().splitlines():
        if line.startswith("{") and f'"request_id": "{request_id}"' in line:
            record = json.loads(line)
            if record.get("message") == "request":
                return record
    raise AssertionError(f"no request log line for {request_id}")


class Occupied:
    """Holds the server's only slot with a long stream until closed."""

    def __init__(self, server: LiveServer) -> None:
        self.client = httpx.Client(base_url=server.base_url, timeout=120)
        self.response = self.client.send(self.client.build_request("POST", "/v1/completions", json=RUNNING),
                                          stream=True)
        assert self.response.status_code == 200
        # Kept: a line iterator that is dropped or left closes the response (and so the request).
        self.lines = self.response.iter_lines()
        while not next(self.lines).startswith("data: "):
            pass  # generating: the slot is taken

    def close(self) -> None:
        self.response.close()
        self.client.close()


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_queued_stream_gets_headers_and_leaving_aborts_it_unprefilled(one_slot: LiveServer, endpoint: str) -> None:
    occupied = Occupied(one_slot)
    try:
        queries_before = one_slot.metric("kvserve_prefix_cache_queries_total")
        aborted_before = one_slot.metric("kvserve_request_aborted_total", reason="client_disconnected")
        success_before = one_slot.metric("kvserve_request_success_total")
        request_id = f"queued-stream-{'chat' if 'chat' in endpoint else 'text'}"
        body = ({"prompt": QUEUED_PROMPT} if endpoint == "/v1/completions"
                else {"messages": [{"role": "user", "content": QUEUED_PROMPT}]})
        with httpx.Client(base_url=one_slot.base_url, timeout=30) as queued_client:
            request = queued_client.build_request("POST", endpoint, headers={"X-Request-ID": request_id},
                                                  json={**body, "max_tokens": 8, "stream": True})
            queued = queued_client.send(request, stream=True)  # returns once the headers are in
            assert queued.status_code == 200
            assert queued.headers["content-type"].startswith("text/event-stream")
            # The headers came first; the request is queued behind the running one, and stays there.
            assert wait_for(lambda: one_slot.metric("kvserve_num_requests_waiting") == 1, 5)
            queued.close()
        left_at = time.monotonic()
        assert wait_for(lambda: aborted(one_slot, aborted_before), ABORT_DEADLINE_S)
        assert time.monotonic() - left_at <= ABORT_DEADLINE_S
        assert wait_for(lambda: one_slot.metric("kvserve_num_requests_waiting") == 0, ENGINE_STEP_SLACK_S)
    finally:
        occupied.close()
    assert wait_for(lambda: one_slot.metric("kvserve_kv_cache_usage_ratio") == 0, 15)
    # Never scheduled: its prompt was never looked up in the prefix cache, let alone prefilled.
    assert one_slot.metric("kvserve_prefix_cache_queries_total") == queries_before
    assert one_slot.metric("kvserve_request_success_total") == success_before
    line = log_line(one_slot, request_id)
    assert line["aborted"] == "client_disconnected" and line["ttft_s"] is None
    assert line["completion_tokens"] == 0


def test_queued_non_streaming_client_that_leaves_is_aborted(one_slot: LiveServer) -> None:
    occupied = Occupied(one_slot)
    try:
        queries_before = one_slot.metric("kvserve_prefix_cache_queries_total")
        aborted_before = one_slot.metric("kvserve_request_aborted_total", reason="client_disconnected")
        with httpx.Client(base_url=one_slot.base_url, timeout=1.5) as queued_client:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request waits
                queued_client.post("/v1/completions", headers={"X-Request-ID": "queued-plain"},
                                   json={"prompt": QUEUED_PROMPT, "max_tokens": 8})
        left_at = time.monotonic()
        assert wait_for(lambda: aborted(one_slot, aborted_before), ABORT_DEADLINE_S)
        assert time.monotonic() - left_at <= ABORT_DEADLINE_S
        assert wait_for(lambda: one_slot.metric("kvserve_num_requests_waiting") == 0, ENGINE_STEP_SLACK_S)
    finally:
        occupied.close()
    assert wait_for(lambda: one_slot.metric("kvserve_kv_cache_usage_ratio") == 0, 15)
    assert one_slot.metric("kvserve_prefix_cache_queries_total") == queries_before
    line = log_line(one_slot, "queued-plain")
    assert line["status"] == 499 and line["aborted"] == "client_disconnected"


def test_finished_requests_count_as_success_and_aborts_do_not(one_slot: LiveServer) -> None:
    success_before = one_slot.metric("kvserve_request_success_total")
    done = httpx.post(f"{one_slot.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert done.status_code == 200
    assert one_slot.metric("kvserve_request_success_total", finish_reason="length") >= 1
    assert one_slot.metric("kvserve_request_success_total") == success_before + 1
    text = httpx.get(f"{one_slot.base_url}/metrics").text
    assert 'finish_reason="abort"' not in text  # aborts are kvserve_request_aborted_total, not successes
