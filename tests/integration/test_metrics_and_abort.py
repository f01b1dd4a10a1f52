"""/metrics names and movement with traffic; a client disconnect aborts its request and frees its KV blocks."""

from __future__ import annotations

import time

import httpx
from live_server import API_KEY, LiveServer

METRIC_NAMES = [
    "kvserve_num_requests_running", "kvserve_num_requests_waiting", "kvserve_kv_cache_usage_ratio",
    "kvserve_prompt_tokens_total", "kvserve_generation_tokens_total", "kvserve_request_success_total",
    "kvserve_request_aborted_total", "kvserve_request_errors_total", "kvserve_num_preemptions_total", "kvserve_prefix_cache_queries_total",
    "kvserve_prefix_cache_hits_total", "kvserve_time_to_first_token_seconds", "kvserve_inter_token_latency_seconds",
    "kvserve_e2e_request_latency_seconds", "kvserve_request_queue_time_seconds", "kvserve_request_prompt_tokens",
    "kvserve_request_generation_tokens", "kvserve_iteration_tokens",
]
LONG_PROMPT = "Here is a long shared preamble that several requests repeat word for word, so that the " \
              "prefix cache has full blocks to find the second time around. " * 2


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_every_metric_is_exposed_with_the_model_label(server: LiveServer) -> None:
    # The errors counter has a labelled child once some response was an error: make one, so this test does
    # not depend on which tests ran before it on the shared server.
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
        assert any(line.startswith(name) and 'model="smollm2-test"' in line for line in text.splitlines()), name


def test_metrics_move_with_traffic(server: LiveServer, http: httpx.Client) -> None:
    before = server.metrics()
    first = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 3, "temperature": 0}).json()
    second = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 3, "temperature": 0}).json()
    after = server.metrics()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    model = 'model="smollm2-test"'
    prompt_tokens = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    assert delta(f"kvserve_prompt_tokens_total{{{model}}}") == prompt_tokens
    assert delta(f"kvserve_generation_tokens_total{{{model}}}") == 6
    assert delta(f'kvserve_request_success_total{{finish_reason="length",{model}}}') == 2
    for histogram in ("kvserve_time_to_first_token_seconds", "kvserve_e2e_request_latency_seconds",
                      "kvserve_request_queue_time_seconds", "kvserve_request_prompt_tokens",
                      "kvserve_request_generation_tokens"):
        assert delta(f"{histogram}_count{{{model}}}") == 2, histogram
    assert delta(f"kvserve_inter_token_latency_seconds_count{{{model}}}") == 4  # 2 gaps in 3 tokens, twice
    assert delta(f"kvserve_request_prompt_tokens_sum{{{model}}}") == prompt_tokens
    assert delta(f"kvserve_iteration_tokens_count{{{model}}}") >= 6  # at least one step per generated token
    assert delta(f"kvserve_iteration_tokens_sum{{{model}}}") >= 6
    # The second request found the first one's full prompt blocks in the prefix cache.
    assert delta(f"kvserve_prefix_cache_queries_total{{{model}}}") > 0
    assert delta(f"kvserve_prefix_cache_hits_total{{{model}}}") >= 16


def test_disconnect_mid_stream_aborts_and_frees_kv(server: LiveServer) -> None:
    aborted_before = server.metric("kvserve_request_aborted_total", reason="client_disconnected")
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as session:
        with session.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # not a for-loop: breaking out of it would close the response
            data_lines = 0
            while data_lines < 3:
                data_lines += next(lines).startswith("data: ")
            assert server.metric("kvserve_num_requests_running") == 1
            assert server.metric("kvserve_kv_cache_usage_ratio") > 0
    # Leaving the block closed the connection mid-stream.
    assert wait_for(lambda: server.metric("kvserve_num_requests_running") == 0)
    assert wait_for(lambda: server.metric("kvserve_kv_cache_usage_ratio") == 0)
    assert wait_for(lambda: server.metric("kvserve_request_aborted_total", reason="client_disconnected")
                    == aborted_before + 1)


def test_disconnect_during_non_streamed_request_aborts(server: LiveServer) -> None:
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=1.5) as session:
        try:
            session.post("/v1/completions", json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up (closes its connection) while the server is generating
    assert wait_for(lambda: server.metric("kvserve_num_requests_running") == 0, timeout=10)
    assert wait_for(lambda: server.metric("kvserve_kv_cache_usage_ratio") == 0)
