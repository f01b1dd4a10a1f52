"""A catalogue of bad requests: each gets the right 4xx in OpenAI's error shape; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import API_KEY, SERVED_NAME, LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_COMPLETION = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def completion(**changes: object) -> dict:
    return {**OK_COMPLETION, **changes}


def chat(**changes: object) -> dict:
    return {**OK_CHAT, **changes}


# (id, path, json body, expected status, param named in the error or None)
JSON_CASES = [
    ("temperature-type", "/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("max-tokens-string", "/v1/completions", completion(max_tokens="5"), 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions", chat(max_tokens=-3), 400, "max_tokens"),
    ("max-tokens-zero-chat", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("temperature-high", "/v1/completions", completion(temperature=5.0), 400, "temperature"),
    ("top-p-zero", "/v1/completions", completion(top_p=0.0), 400, "top_p"),
    ("n-zero", "/v1/completions", completion(n=0), 400, "n"),
    ("n-huge", "/v1/completions", completion(n=1000), 400, "n"),
    ("n-bool", "/v1/completions", completion(n=True), 400, "n"),
    ("presence-penalty", "/v1/chat/completions", chat(presence_penalty=3), 400, "presence_penalty"),
    ("logprobs-too-many", "/v1/completions", completion(logprobs=50), 400, "logprobs"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", chat(top_logprobs=2), 400, None),
    ("seed-negative", "/v1/completions", completion(seed=-1), 400, "seed"),
    ("logit-bias-key", "/v1/completions", completion(logit_bias={"abc": 1}), 400, None),
    ("logit-bias-out-of-vocab", "/v1/completions", completion(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("stop-empty", "/v1/completions", completion(stop=[""]), 400, "stop"),
    ("stop-wrong-type", "/v1/completions", completion(stop=5), 400, "stop"),
    ("min-tokens-over-max", "/v1/completions", completion(min_tokens=5, max_tokens=2), 400, None),
    ("stream-options-without-stream", "/v1/completions", completion(stream_options={"include_usage": True}),
     400, None),
    ("empty-prompt", "/v1/completions", completion(prompt=""), 400, "prompt"),
    ("empty-prompt-list", "/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", completion(prompt=12), 400, "prompt"),
    ("prompt-token-out-of-vocab", "/v1/completions", completion(prompt=[1, 2, 10**7]), 400, "prompt"),
    ("prompt-token-negative", "/v1/completions", completion(prompt=[1, -2]), 400, "prompt"),
    ("prompt-missing", "/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("prompt-too-long", "/v1/completions", completion(prompt="word " * 2000), 400, "max_tokens"),
    ("prompt-plus-max-tokens-too-long", "/v1/completions", completion(prompt="hi", max_tokens=10_000), 400,
     "max_tokens"),
    ("messages-empty", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("messages-bad-role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     None),
    ("messages-not-list", "/v1/chat/completions", chat(messages="hello"), 400, "messages"),
    ("suffix", "/v1/completions", completion(suffix="tail"), 400, "suffix"),
    ("both-max-tokens", "/v1/chat/completions", chat(max_completion_tokens=3), 400, None),
    ("body-not-object", "/v1/completions", [1, 2, 3], 400, None),
    ("unknown-model", "/v1/completions", completion(model="gpt-4"), 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", chat(model="nope"), 404, "model"),
    ("tokenize-neither", "/tokenize", {}, 400, None),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [10**8]}, 400, "tokens"),
]


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 and status != 429 else error["type"])
    return error


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in JSON_CASES],
                         ids=[c[0] for c in JSON_CASES])
def test_bad_json_requests(http: httpx.Client, path: str, body: object, status: int, param: str | None) -> None:
    error = assert_error_shape(http.post(path, json=body), status)
    if param is not None:
        assert error["param"] == param or param in error["message"], error


def test_prompt_too_long_says_the_numbers(http: httpx.Client) -> None:
    error = assert_error_shape(http.post("/v1/completions", json=completion(prompt="hi", max_tokens=600)), 400)
    assert "512" in error["message"] and "600" in error["message"]
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("content", "headers", "status"), [
    (b'{"prompt": "Hello", "max_tokens": 2', {"Content-Type": "application/json"}, 400),
    (b"not json at all", {"Content-Type": "application/json"}, 400),
    (b"", {"Content-Type": "application/json"}, 400),
    (b'{"prompt": "Hello"}', {"Content-Type": "text/plain"}, 415),
    (b"prompt=Hello", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
], ids=["truncated-json", "not-json", "empty-body", "text-plain", "form"])
def test_malformed_bodies(http: httpx.Client, content: bytes, headers: dict, status: int) -> None:
    assert_error_shape(http.post("/v1/completions", content=content, headers=headers), status)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = json.dumps(completion(prompt="x" * 70_000)).encode()  # the shared server allows 65536 bytes
    assert_error_shape(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413)


def test_oversized_chunked_body_is_413(http: httpx.Client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error_shape(response, 413)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
                         ids=["missing", "wrong", "not-bearer"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_bad_key_is_401(server: LiveServer, path: str, headers: dict) -> None:
    response = httpx.post(server.base_url + path, json=OK_COMPLETION, headers=headers)
    assert_error_shape(response, 401)


def test_models_needs_key(server: LiveServer) -> None:
    assert_error_shape(httpx.get(f"{server.base_url}/v1/models"), 401)


def test_unknown_path_and_method(http: httpx.Client) -> None:
    assert_error_shape(http.get("/v1/nothing"), 404)
    assert_error_shape(http.get("/v1/completions"), 405)


def test_errors_are_counted_and_server_still_serves(server: LiveServer, http: httpx.Client) -> None:
    before = server.metric("kvserve_request_errors_total", code="400")
    assert_error_shape(http.post("/v1/completions", json=completion(n=0)), 400)
    assert server.metric("kvserve_request_errors_total", code="400") == before + 1
    out = http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 3})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{server.base_url}/health").status_code == 200
