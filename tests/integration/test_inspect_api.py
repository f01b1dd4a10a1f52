"""The inspection API on a live server: shapes, cross-checks with serving, limits, auth, and no stall of serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.live_server import SERVED_NAME, LiveServer

PROMPT = "The dog chased the llama because it"
LONG_PROMPT = " ".join(["the llama ran"] * 90)  # about 270 tokens: over the default inspect_max_tokens (256)


def post(http: httpx.Client, path: str, **body) -> httpx.Response:
    return http.post(path, json=body)


def test_attention_report_shape(http: httpx.Client) -> None:
    response = post(http, "/v1/attention", prompt=PROMPT, layers=[0, -1], heads="0:3", query_positions="last",
                    top_k=3)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["object"] == "attention" and report["model"] == SERVED_NAME
    assert report["model_info"] | {"layers": 30, "heads": 9, "kv_heads": 3} == report["model_info"]
    tokens = report["tokens"]
    n = len(tokens)
    assert n == report["num_prompt_tokens"] >= 8
    assert all(set(t) == {"id", "text", "start", "end"} for t in tokens)
    assert tokens[-1]["text"].strip() == "it" and report["text"][tokens[-1]["start"]:tokens[-1]["end"]].strip() == "it"
    assert (report["layers"], report["heads"], report["query_positions"]) == ([0, 29], [0, 1, 2], [n - 1])
    weights = report["attention"]  # [layer][head][query][key]
    assert [len(weights), len(weights[0]), len(weights[0][0]), len(weights[0][0][0])] == [2, 3, 1, n]
    for layer in weights:
        for head in layer:
            assert sum(head[0]) == pytest.approx(1.0, abs=1e-3 * n)
    assert [len(report["entropy"]), len(report["entropy"][0])] == [2, 3]
    top = report["top_k"][1][0][0]  # layer 29, head 0, last query: [[key, weight], ...] best first
    assert len(top) == 3 and [w for _, w in top] == sorted((w for _, w in top), reverse=True)
    assert top[0][1] == max(weights[1][0][0])


def test_causal_mask_and_aggregate(http: httpx.Client) -> None:
    report = post(http, "/v1/attention", prompt=PROMPT, layers=3, aggregate="max", top_k=0).json()
    weights = report["attention"][0]
    assert len(weights) == 1  # heads folded by max
    for q, row in enumerate(weights[0]):
        assert all(w == 0 for w in row[q + 1:]) and row[q] >= 0


def test_generation_matches_serving(http: httpx.Client) -> None:
    inspected = post(http, "/v1/attention", prompt=PROMPT, max_tokens=5, layers="last", heads=0,
                     query_positions="last", top_k=1).json()
    served = post(http, "/v1/completions", prompt=PROMPT, max_tokens=5, temperature=0).json()
    generated = inspected["tokens"][inspected["num_prompt_tokens"]:]
    assert len(generated) == served["usage"]["completion_tokens"] == 5
    assert "".join(t["text"] for t in generated) == served["choices"][0]["text"]
    assert inspected["text"].endswith(served["choices"][0]["text"])


def test_logit_lens_last_layer_predicts_what_serving_samples(http: httpx.Client) -> None:
    lens = post(http, "/v1/logit_lens", prompt=PROMPT, layers=[0, 15, 29], positions="last", top_k=4).json()
    assert lens["object"] == "logit_lens" and lens["layers"] == [0, 15, 29]
    assert lens["positions"] == [len(lens["tokens"]) - 1]
    predictions = lens["predictions"]  # [layer][position] -> top-k
    assert [len(predictions), len(predictions[0]), len(predictions[0][0])] == [3, 1, 4]
    for layer in predictions:
        probs = [p["prob"] for p in layer[0]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    served = post(http, "/v1/completions", prompt=PROMPT, max_tokens=1, temperature=0).json()
    assert predictions[-1][0][0]["text"] == served["choices"][0]["text"]


def test_chat_messages(http: httpx.Client) -> None:
    report = post(http, "/v1/logit_lens", messages=[{"role": "user", "content": "Hi"}], layers="last",
                  positions="last", top_k=1).json()
    assert "<|im_start|>" in report["text"] and report["text"].rstrip().endswith("assistant")


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": LONG_PROMPT}, 400, "limited to 256 tokens (inspect_max_tokens)"),
    ({"prompt": PROMPT, "max_tokens": 250}, 400, "limited to 256 tokens"),
    ({"prompt": "x " * 200, "query_positions": "all"}, 413, "inspect_max_bytes"),
    ({"prompt": PROMPT, "layers": 30}, 400, "layers: index 30 is out of range (there are 30)"),
    ({"prompt": PROMPT, "heads": "a:b"}, 400, "heads"),
    ({"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one of prompt or messages"),
    ({"prompt": PROMPT, "max_tokens": 1000}, 400, "max_tokens"),
    ({"prompt": PROMPT, "top_k": 21}, 400, "top_k"),
    ({"prompt": PROMPT, "thumbnail_size": 65}, 400, "thumbnail_size"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": [1, 10 ** 7]}, 400, "outside the vocabulary"),
])
def test_limits_and_bad_requests(http: httpx.Client, body: dict, status: int, needle: str) -> None:
    response = http.post("/v1/attention", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_api_key_required_but_page_open(server: LiveServer) -> None:
    for path in ("/v1/attention", "/v1/logit_lens"):
        assert httpx.post(server.base_url + path, json={"prompt": PROMPT}).status_code == 401
        wrong = httpx.post(server.base_url + path, json={"prompt": PROMPT}, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
    page = httpx.get(server.base_url + "/inspect")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/inspect/inspect.js" in page.text
    script = httpx.get(server.base_url + "/inspect/inspect.js")
    assert script.status_code == 200 and "heatmap" in script.text
    assert "://" not in page.text and "://" not in script.text  # no CDN: works offline


def test_serving_continues_while_inspecting(http: httpx.Client) -> None:
    # Greedy generation of 48 tokens on the eager path, then a logit lens over every layer and position
    # of ~250 tokens, takes seconds here; a short completion sent meanwhile must finish before it does.
    started = threading.Event()

    def inspect() -> float:
        started.set()
        response = post(http, "/v1/logit_lens", prompt="x " * 199, max_tokens=48, top_k=1)
        assert response.status_code == 200, response.text
        return time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(inspect)
        started.wait()
        time.sleep(0.5)  # let the inspection reach its worker thread
        completion = post(http, "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0)
        completed_at = time.monotonic()
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4
        if job.done():
            job.result()  # an inspection that failed says why here
        assert not job.done(), "the inspection finished before the completion: the test proves nothing"
        assert job.result() > completed_at
