"""Start-up of a live server: the engine is warmed up before /ready says yes, the warm-up leaves the metrics
untouched, /ready's 503s while loading are neither request errors nor info-level log lines, and the cyclic
garbage collector, off during start-up, runs again once the engine is up."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from helpers.integer_kernels import KIND
from live_server import start_server


def test_warm_up_before_ready_and_clean_metrics(tmp_path: Path) -> None:
    # An empty kernel cache: this start builds the kernels (~5 s on 2 cores) before the model is ready, so /ready
    # says 503 for seconds. With the cache warm the server listens only ~0.2 s before it is ready, a window in
    # which the engine's start-up holds the GIL for tens of ms at a time and 50 ms polls sometimes got no 503.
    server = start_server("--log-level", "debug", env={"KVSERVE_KERNEL_CACHE": str(tmp_path)}, poll_interval=0.05)
    try:
        before = server.metrics()
        response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                              timeout=120)
        assert response.status_code == 200
        after = server.metric("kvserve_iteration_tokens_count")
        # Requests with logprobs make thousands of objects: the youngest generation fills in one or two of them
        # (700 more allocations than frees), and with the collector on it is collected.
        collections = server.metric("python_gc_collections_total", generation="0")
        for _ in range(20):
            httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 32, "logprobs": 5},
                       timeout=120)
            if server.metric("python_gc_collections_total", generation="0") > collections:
                break
        else:
            raise AssertionError("no garbage collection in 20 requests after start-up: is the collector still off?")
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    warmed = messages.index("engine built and warmed up")
    assert warmed < messages.index("model ready")
    assert lines[warmed]["warmup_s"] > 0
    # Speculation as the engine runs it: the drafts an unset --speculative-config leaves to the kernels filled in.
    assert lines[warmed]["speculative_config"]["num_speculative_tokens"] == (1 if KIND == "AVX2" else 3)
    assert lines[warmed]["speculative_config"]["disable_by_batch_size"] == 2
    # Every 503 /ready answered before the model was ready is a debug line, none an info line or an error.
    ready_503 = [line for line in lines if line.get("path") == "/ready" and line.get("status") == 503]
    assert ready_503, "polled every 50 ms; building the kernels and loading SmolLM2 takes longer than that"
    assert all(line["level"] == "debug" for line in ready_503)
    assert not any(k.startswith("kvserve_request_errors_total") for k, v in before.items() if v), before
    # The warm-up's steps and tokens are not in the metrics; the first request's are.
    model = 'model="smollm2-test"'
    for name in ("kvserve_iteration_tokens_count", "kvserve_prompt_tokens_total", "kvserve_generation_tokens_total",
                 "kvserve_prefix_cache_queries_total"):
        assert before[f"{name}{{{model}}}"] == 0, name
    assert after > 0
