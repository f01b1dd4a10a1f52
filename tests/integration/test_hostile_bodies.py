"""Hostile bodies on a live server: text that is not valid Unicode, messages without content and empty
prompts get a 400 naming the field and leave the keep-alive connection usable; a body that arrives too
slowly gets 408; without a valid key, 401 comes before the body is read."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from live_server import API_KEY, LiveServer, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
BAD = "\\ud800"  # a lone surrogate, as the JSON escape a client sends
BODY_TIMEOUT_S = 2


def raw(template: str) -> bytes:
    """A JSON body with BAD spliced in (json.dumps would refuse to produce it)."""
    return template.replace("BAD", BAD).encode()


# (id, path, body, the field the error must name)
SURROGATE_CASES = [
    ("chat-content", "/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "hi BAD"}]}'),
     "messages.0.content"),
    ("chat-content-part", "/v1/chat/completions",
     raw('{"messages": [{"role": "user", "content": [{"type": "text", "text": "BAD"}]}]}'), "messages.0.content"),
    ("chat-name", "/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "hi", "name": "BAD"}]}'),
     "messages.0.name"),
    ("chat-stop", "/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "hi"}], "stop": "BAD"}'),
     "stop"),
    ("chat-user", "/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "hi"}], "user": "BAD"}'),
     "user"),
    ("completion-prompt", "/v1/completions", raw('{"prompt": "BAD", "max_tokens": 2}'), "prompt"),
    ("completion-prompt-list", "/v1/completions", raw('{"prompt": ["ok", "BAD"], "max_tokens": 2}'), "prompt"),
    ("completion-stop-list", "/v1/completions", raw('{"prompt": "hi", "stop": ["ok", "BAD"]}'), "stop"),
    ("completion-model", "/v1/completions", raw('{"prompt": "hi", "model": "BAD"}'), "model"),
    ("completion-logit-bias-key", "/v1/completions", raw('{"prompt": "hi", "logit_bias": {"BAD": 1}}'),
     "logit_bias"),
    ("tokenize-prompt", "/tokenize", raw('{"prompt": "BAD"}'), "prompt"),
    ("tokenize-messages", "/tokenize", raw('{"messages": [{"role": "system", "content": "BAD"}]}'),
     "messages.0.content"),
    ("detokenize-model", "/detokenize", raw('{"tokens": [1, 2], "model": "BAD"}'), "model"),
    ("attention-prompt", "/v1/attention", raw('{"prompt": "a BAD b"}'), "prompt"),
    ("attention-messages", "/v1/attention", raw('{"messages": [{"role": "user", "content": "BAD"}]}'),
     "messages.0.content"),
    ("logit-lens-prompt", "/v1/logit_lens", raw('{"prompt": "BAD"}'), "prompt"),
]

# (id, path, body, the field the error must name)
EMPTY_CASES = [
    ("user-without-content", "/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 2},
     "messages.0"),
    ("user-content-null", "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0"),
    ("system-content-null", "/v1/chat/completions",
     {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]}, "messages.0"),
    ("tokenize-user-without-content", "/tokenize", {"messages": [{"role": "user"}]}, "messages.0"),
    ("prompt-empty-list", "/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("prompt-empty-id-list", "/v1/completions", {"prompt": [[]], "max_tokens": 2}, "prompt"),
    ("prompt-empty-string-in-list", "/v1/completions", {"prompt": ["hi", ""], "max_tokens": 2}, "prompt"),
]


def connect(server: LiveServer, timeout: float = 60) -> http.client.HTTPConnection:
    url = urlsplit(server.base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


def assert_openai_error(response: http.client.HTTPResponse, data: bytes, status: int) -> dict:
    assert response.status == status, data[:500]
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def assert_connection_still_serves(conn: http.client.HTTPConnection) -> None:
    """The next request goes over the same socket and is answered."""
    sock = conn.sock
    assert sock is not None, "the server closed the keep-alive connection"
    response, data = exchange(conn, "GET", "/v1/models", headers=AUTH)
    assert response.status == 200, data[:300]
    assert conn.sock is sock


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in SURROGATE_CASES],
                         ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_400_naming_the_field(server: LiveServer, path: str, body: bytes,
                                                param: str | None) -> None:
    conn = connect(server)
    try:
        response, data = exchange(conn, "POST", path, body, AUTH)
        error = assert_openai_error(response, data, 400)
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param), error
        assert "surrogate" in error["message"] or "unicode" in error["message"].lower(), error
        assert response.getheader("connection") != "close"
        assert_connection_still_serves(conn)
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_missing_text_is_400(server: LiveServer, path: str, body: dict, param: str) -> None:
    conn = connect(server)
    try:
        response, data = exchange(conn, "POST", path, json.dumps(body).encode(), AUTH)
        error = assert_openai_error(response, data, 400)
        assert error["param"] is not None and error["param"].startswith(param), error
        assert_connection_still_serves(conn)
    finally:
        conn.close()


def test_assistant_turn_may_have_null_content(server: LiveServer) -> None:
    """As in OpenAI's API: an assistant turn may leave `content` null when it carries tool calls."""
    conn = connect(server)
    try:
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        body = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": None, "tool_calls": [call]}]}
        response, data = exchange(conn, "POST", "/tokenize", json.dumps(body).encode(), AUTH)
        assert response.status == 200 and json.loads(data)["count"] > 0
    finally:
        conn.close()


# ---- on a server with a short body deadline ----

@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    live = start_server("--api-key", API_KEY, "--request-body-timeout", str(BODY_TIMEOUT_S), "--max-model-len", "512")
    yield live
    live.stop()


def open_socket(server: LiveServer) -> socket.socket:
    url = urlsplit(server.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def request_head(path: str, content_length: int, key: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {content_length}"]
    if key:
        lines.append(f"Authorization: Bearer {API_KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[http.client.HTTPResponse, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, response.read()


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_body_that_never_completes_gets_408_and_close(guarded: LiveServer) -> None:
    with open_socket(guarded) as sock:
        sock.sendall(request_head("/v1/completions", 200) + b'{"prompt": "hi"')  # 185 bytes never come
        started = time.monotonic()
        response, data = read_response(sock)
        waited = time.monotonic() - started
        assert_openai_error(response, data, 408)
        assert response.getheader("connection") == "close"
        assert BODY_TIMEOUT_S - 0.5 <= waited < BODY_TIMEOUT_S + 20
        assert closed_by_server(sock)


def test_body_trickling_in_gets_408(guarded: LiveServer) -> None:
    body = json.dumps({"prompt": "x" * 400, "max_tokens": 1}).encode()
    with open_socket(guarded) as sock:
        sock.sendall(request_head("/v1/completions", len(body)))
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.25 s: the whole body would take ~100 s
            for byte in body:
                if stop.wait(0.25):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            response, data = read_response(sock)
        finally:
            stop.set()
            sender.join(5)
        assert_openai_error(response, data, 408)


def test_body_in_pauses_within_the_deadline_is_served(guarded: LiveServer) -> None:
    body = json.dumps({"prompt": "Hello there"}).encode()
    with open_socket(guarded) as sock:
        sock.sendall(request_head("/tokenize", len(body)) + body[:5])
        time.sleep(BODY_TIMEOUT_S / 4)
        sock.sendall(body[5:])
        response, data = read_response(sock)
        assert response.status == 200 and json.loads(data)["count"] > 0


def test_long_generation_is_not_cut_by_the_body_deadline(guarded: LiveServer) -> None:
    """Only the body is bounded: waiting for a disconnect during a long generation is not."""
    conn = connect(guarded, timeout=120)
    try:
        body = {"prompt": "Count:", "max_tokens": 120, "ignore_eos": True}
        started = time.monotonic()
        response, data = exchange(conn, "POST", "/v1/completions", json.dumps(body).encode(), AUTH)
        assert response.status == 200, data[:300]
        assert json.loads(data)["usage"]["completion_tokens"] == 120
        if time.monotonic() - started < BODY_TIMEOUT_S:
            pytest.skip("the generation was quicker than the body deadline; nothing to show")
    finally:
        conn.close()


@pytest.mark.parametrize("body", [b'{"prompt": "Hello", "max_tokens": 2', raw('{"prompt": "BAD"}'),
                                  b'{"prompt": "Hello", "n": 0}'],
                         ids=["malformed-json", "lone-surrogate", "invalid-value"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
def test_no_key_is_401_before_the_body_is_parsed(guarded: LiveServer, body: bytes, headers: dict) -> None:
    conn = connect(guarded)
    try:
        response, data = exchange(conn, "POST", "/v1/completions", body,
                                  {"Content-Type": "application/json", **headers})
        error = assert_openai_error(response, data, 401)
        assert error["code"] == "invalid_api_key"
    finally:
        conn.close()


def test_no_key_is_401_without_waiting_for_the_body(guarded: LiveServer) -> None:
    with open_socket(guarded) as sock:
        sock.sendall(request_head("/v1/chat/completions", 5000, key=False))  # and no body at all
        started = time.monotonic()
        response, data = read_response(sock)
        assert time.monotonic() - started < BODY_TIMEOUT_S  # not the body deadline's 408
        assert_openai_error(response, data, 401)
        assert response.getheader("connection") == "close" and closed_by_server(sock)


def test_open_routes_need_no_key(guarded: LiveServer) -> None:
    conn = connect(guarded)
    try:
        for path in ("/health", "/ready", "/version", "/inspect"):
            response, _ = exchange(conn, "GET", path)
            assert response.status == 200, path
    finally:
        conn.close()
