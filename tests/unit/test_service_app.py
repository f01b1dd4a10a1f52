"""The app against a scripted fake engine: request timeout, drain abort, loading/dead-engine 503s,
SSE framing. (Live-model behaviour is in tests/integration.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from engine.chat_template import content_text
from engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from service.app import create_app
from service.settings import Settings
from service.state import LoadedModel, ServerState

pytestmark = pytest.mark.anyio  # anyio's pytest plugin (installed with starlette) runs the async tests


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CharTokenizer:
    """One token per character (ids are code points below 1000)."""

    vocab_size = 1000
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **options: object) -> str:
        return "".join(f"[{m['role']}]{content_text(m['content'])}" for m in messages) + (
            "[assistant]" if add_generation_prompt else "")


class FakeEngine:
    """Emits 'x' per step every `delay` seconds until max_tokens; honours abort like the real one."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.is_alive = True
        self.aborted: list[str] = []
        self.running: set[str] = set()

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        metrics = RequestMetrics(arrival_time=0.0)
        self.running.add(request_id)
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(self.delay)
                aborted = request_id in self.aborted
                last = aborted or step == params.max_tokens - 1
                reason = "abort" if aborted else ("length" if last else None)
                outs = [CompletionOutput(index=j, delta_text="" if aborted else "x",
                                         delta_token_ids=[] if aborted else [120], finish_reason=reason)
                        for j in range(params.n)]
                yield RequestOutput(request_id, None, prompt, outs, finished=last, metrics=metrics)
                if last:
                    return
        finally:
            self.running.discard(request_id)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        if params.n > 4:
            raise ValueError(f"n={params.n} is more than max_num_seqs=4")

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_kv_blocks_total=10,
                           num_kv_blocks_used=len(self.running))

    async def shutdown(self) -> None:
        self.is_alive = False


def make_app(engine: FakeEngine | None, **settings: object):
    loaded = LoadedModel(engine, CharTokenizer(), max_model_len=64) if engine is not None else None
    return create_app(Settings(model="fake", **settings), loaded=loaded)


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_request_timeout_aborts_with_504() -> None:
    engine = FakeEngine(delay=0.02)
    async with client_for(make_app(engine, request_timeout=0.2)) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert len(engine.aborted) == 1 and not engine.running


async def test_drain_waits_then_aborts_in_flight() -> None:
    engine = FakeEngine(delay=0.02)
    app = make_app(engine)
    state: ServerState = app.state.kvserve
    async with client_for(app) as client:
        slow = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 60}))
        while not state.in_flight:
            await asyncio.sleep(0.01)
        await state.drain(timeout=0.1)
        response = await slow
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        assert engine.aborted and not state.in_flight
        refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200


async def test_drain_lets_short_requests_finish() -> None:
    engine = FakeEngine(delay=0.01)
    app = make_app(engine)
    state: ServerState = app.state.kvserve
    async with client_for(app) as client:
        quick = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}))
        while not state.in_flight:
            await asyncio.sleep(0.005)
        await state.drain(timeout=10)
        response = await quick
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "xxxxx"
    assert not engine.aborted


async def test_loading_and_dead_engine_are_503() -> None:
    async with client_for(make_app(None)) as client:
        assert (await client.get("/health")).status_code == 200  # alive while loading
        assert (await client.get("/ready")).status_code == 503
        response = await client.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"
    engine = FakeEngine()
    async with client_for(make_app(engine)) as client:
        engine.is_alive = False
        assert (await client.get("/health")).status_code == 503
        assert (await client.post("/v1/completions", json={"prompt": "hi"})).status_code == 503


async def test_sse_framing_and_n_choices() -> None:
    async with client_for(make_app(FakeEngine())) as client:
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["delta"] for c in chunks[0]["choices"]] == [{"role": "assistant", "content": ""}] * 2
    text = {0: "", 1: ""}
    for chunk in chunks[1:-1]:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["delta"].get("content", "")
    assert text == {0: "xxx", 1: "xxx"}
    prompt_tokens = len("[user]hi[assistant]")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


@pytest.mark.parametrize(("max_tokens", "status"), [(None, 200), (61, 200), (62, 400)])
async def test_context_limit(max_tokens: int | None, status: int) -> None:
    body = {"prompt": "abc", **({"max_tokens": max_tokens} if max_tokens else {})}  # 3 tokens of 64
    async with client_for(make_app(FakeEngine())) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["usage"]["completion_tokens"] == (max_tokens or 16)  # OpenAI's default


async def test_one_json_log_line_per_request_without_text(caplog: pytest.LogCaptureFixture) -> None:
    from service.logging_setup import JsonFormatter

    for log_text in (False, True):
        caplog.clear()
        with caplog.at_level("INFO", logger="kvserve.request"):
            async with client_for(make_app(FakeEngine(), log_requests_text=log_text)) as client:
                await client.post("/v1/completions", json={"prompt": "secret", "max_tokens": 2})
        records = [r for r in caplog.records if r.name == "kvserve.request"]
        assert len(records) == 1
        line = json.loads(JsonFormatter().format(records[0]))
        assert line["status"] == 200 and line["prompt_tokens"] == 6 and line["completion_tokens"] == 2
        assert {"request_id", "latency_s", "ttft_s"} <= set(line)
        assert ("secret" in json.dumps(line)) is log_text


def test_openapi_promises_400_not_422_and_declares_the_key() -> None:
    schema = make_app(FakeEngine(), api_keys=["k"]).openapi()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
            keyed = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
            assert bool(operation.get("security")) is keyed, path


async def test_stream_timeout_ends_with_an_error_event_and_counts_an_abort() -> None:
    app = make_app(FakeEngine(delay=0.02), request_timeout=0.2)
    async with client_for(app) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True})
    assert response.status_code == 200  # the stream starts before the engine has produced anything
    events = response.text.split("\n\n")
    assert events[-2] == "data: [DONE]"
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "timeout"
    metrics = app.state.kvserve.metrics.render().decode()
    assert 'kvserve_request_aborted_total{model="fake",reason="timeout"} 1.0' in metrics
    assert 'kvserve_request_success_total{finish_reason="length",model="fake"} 0.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
async def test_what_the_engine_refuses_is_400_before_any_stream(stream: bool) -> None:
    async with client_for(make_app(FakeEngine())) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 5,
                                                              "stream": stream})
    assert response.status_code == 400 and "max_num_seqs" in response.json()["error"]["message"]


async def test_unexpected_error_is_500_that_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise RuntimeError("tokenizer bug")

    monkeypatch.setattr(CharTokenizer, "encode", broken)
    transport = httpx.ASGITransport(app=make_app(FakeEngine()), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert response.headers["connection"] == "close"  # uvicorn drops it after an unhandled error: say so


@pytest.mark.parametrize("body", [b'{"prompt": ', b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "n": 0}'])
async def test_without_a_key_the_body_is_never_looked_at(body: bytes) -> None:
    async with client_for(make_app(FakeEngine(), api_keys=["k"])) as client:
        response = await client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["connection"] == "close"
        page = await client.get("/inspect")  # the viewer page itself is open; it sends the key
        assert page.status_code == 200
        keyed = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                  headers={"Authorization": "Bearer k"})
        assert keyed.status_code == 200


async def test_a_response_before_the_body_was_read_closes_the_connection() -> None:
    async with client_for(make_app(FakeEngine())) as client:
        unread = await client.post("/v1/nowhere", json={"prompt": "hi"})  # 404: the body is never read
        read = await client.post("/tokenize", json={"prompt": "hi"})
    assert unread.status_code == 404 and unread.headers["connection"] == "close"
    assert read.status_code == 200 and "connection" not in read.headers
