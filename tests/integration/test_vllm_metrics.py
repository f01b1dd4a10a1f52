"""/metrics on a live server: every name the deployment files read (dashboard, alerts, HPA, the
inference gateway's endpoint picker) is there, and vLLM's names carry the same numbers as kvserve's."""

from __future__ import annotations

import time

import httpx
from helpers.deploy_metrics import (
    EPP_BUILTIN_VLLM,
    alert_metric_names,
    dashboard_metric_names,
    hpa_metric_names,
    router_metric_names,
)
from live_server import API_KEY, SERVED_NAME, LiveServer
from prometheus_client.parser import text_string_to_metric_families

VLLM_NAMES = {  # issue 17's list: what dashboards, KEDA/HPA rules and routers written for vLLM read
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:request_success": "counter", "vllm:num_preemptions": "counter",
}


def scrape(server: LiveServer) -> tuple[dict[str, str], dict[str, list]]:
    """(family name -> type, sample name -> samples) of the live /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return types, samples


def test_every_metric_the_deployment_files_read_is_exposed(server: LiveServer) -> None:
    # A labelled counter has no series until its first label set: one error response gives the
    # dashboard's error panel its series, whichever tests ran before on this server.
    assert httpx.post(f"{server.base_url}/v1/completions", json={}, timeout=30).status_code >= 400
    _, samples = scrape(server)
    sources = {"dashboard": dashboard_metric_names(), "alerts": alert_metric_names(), "hpa": hpa_metric_names(),
               "router": router_metric_names(), "router (vLLM engine type)": EPP_BUILTIN_VLLM}
    for source, names in sources.items():
        assert names, f"found no metric names in the {source} files"
        missing = names - samples.keys()
        assert not missing, f"the {source} reads {sorted(missing)}, which /metrics does not expose"


def test_vllm_names_types_and_labels(server: LiveServer) -> None:
    types, samples = scrape(server)
    for name, kind in VLLM_NAMES.items():
        assert types.get(name) == kind, name
        series = samples[f"{name}_total" if kind == "counter" else name if kind == "gauge" else f"{name}_count"]
        assert all(s.labels.get("model_name") == SERVED_NAME for s in series), name
    reasons = {s.labels["finished_reason"] for s in samples["vllm:request_success_total"]}
    assert {"stop", "length", "abort"} <= reasons
    assert samples["process_resident_memory_bytes"][0].value > 10e6  # a loaded model is more than 10 MB
    assert samples["process_cpu_seconds_total"][0].value > 0


def test_vllm_metrics_carry_kvserve_numbers(server: LiveServer) -> None:
    def values() -> dict[str, float]:
        model, vllm = {"model": SERVED_NAME}, {"model_name": SERVED_NAME}
        return {
            "prompt": server.metric("kvserve_prompt_tokens_total", **model),
            "vllm_prompt": server.metric("vllm:prompt_tokens_total", **vllm),
            "gen": server.metric("kvserve_generation_tokens_total", **model),
            "vllm_gen": server.metric("vllm:generation_tokens_total", **vllm),
            "length": server.metric("kvserve_request_success_total", finish_reason="length", **model),
            "vllm_length": server.metric("vllm:request_success_total", finished_reason="length", **vllm),
            "itl": server.metric("kvserve_inter_token_latency_seconds_count", **model),
            "vllm_itl": server.metric("vllm:inter_token_latency_seconds_count", **vllm),
            **{f"vllm_{h}": server.metric(f"vllm:{h}_seconds_count", **vllm)
               for h in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
                         "request_decode_time")},
            "vllm_e2e_sum": server.metric("vllm:e2e_request_latency_seconds_sum", **vllm),
            "vllm_phases_sum": sum(server.metric(f"vllm:request_{p}_time_seconds_sum", **vllm)
                                   for p in ("queue", "prefill", "decode")),
        }

    before = values()
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        reply = http.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True}, timeout=120).json()
    after = values()
    delta = {key: after[key] - before[key] for key in before}
    assert delta["prompt"] == delta["vllm_prompt"] == reply["usage"]["prompt_tokens"]
    assert delta["gen"] == delta["vllm_gen"] == 4
    assert delta["length"] == delta["vllm_length"] == 1
    assert delta["itl"] == delta["vllm_itl"] == 3  # 3 gaps between 4 tokens
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
                      "request_decode_time"):
        assert delta[f"vllm_{histogram}"] == 1, histogram
    # Queue, prefill and decode are consecutive phases inside the end-to-end time.
    assert 0 < delta["vllm_phases_sum"] <= delta["vllm_e2e_sum"]


def test_a_client_that_leaves_counts_as_finished_reason_abort(server: LiveServer) -> None:
    # vLLM declares finished_reason="abort" for sequences cut short; kvserve counts a client disconnect there.
    def aborted() -> float:
        return server.metric("vllm:request_success_total", finished_reason="abort", model_name=SERVED_NAME)

    before = aborted()
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
    deadline = time.monotonic() + 15
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() == before + 1
