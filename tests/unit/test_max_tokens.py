"""max_tokens when a request gives none (completions 16, chat the rest of the context, both capped by
--max-tokens-default) and max_tokens 0 (prompt scoring with echo), against the scripted fake engine."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_service_app import FakeEngine, client_for, make_app

pytestmark = pytest.mark.anyio

CONTEXT = 64  # make_app's max_model_len; the fake tokenizer has one token per character


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chat_body(**extra: object) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


CHAT_PROMPT_TOKENS = len("[user]hi[assistant]")


@pytest.mark.parametrize(("cap", "completion", "chat"), [
    (None, 16, CONTEXT - CHAT_PROMPT_TOKENS),  # OpenAI's and vLLM's defaults
    (5, 5, 5),
    (100, 16, CONTEXT - CHAT_PROMPT_TOKENS),  # a cap above the defaults changes nothing
])
async def test_defaults_and_the_server_cap(cap: int | None, completion: int, chat: int) -> None:
    settings = {"max_tokens_default": cap} if cap else {}
    async with client_for(make_app(FakeEngine(), **settings)) as client:
        done = (await client.post("/v1/completions", json={"prompt": "abc"})).json()
        chatted = (await client.post("/v1/chat/completions", json=chat_body())).json()
    assert done["usage"]["completion_tokens"] == completion and done["choices"][0]["finish_reason"] == "length"
    assert chatted["usage"]["completion_tokens"] == chat


async def test_default_never_overruns_the_context() -> None:
    async with client_for(make_app(FakeEngine())) as client:
        response = await client.post("/v1/completions", json={"prompt": "p" * (CONTEXT - 5)})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_zero_with_echo_returns_the_prompt_only(stream: bool) -> None:
    engine = FakeEngine()
    async with client_for(make_app(engine)) as client:
        response = await client.post("/v1/completions", json={
            "prompt": "score me", "max_tokens": 0, "echo": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})})
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n")[:-2]]
        text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
        finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
        usage = chunks[-1]["usage"]
    else:
        body = response.json()
        text, finish, usage = body["choices"][0]["text"], [body["choices"][0]["finish_reason"]], body["usage"]
    assert text == "score me" and finish == ["length"]  # the fake engine's "x" is left out
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len("score me")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "logprobs": 2}, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat_body(max_completion_tokens=0), "max_completion_tokens"),
])
async def test_max_tokens_zero_elsewhere_is_a_clear_400(path: str, body: dict, param: str) -> None:
    engine = FakeEngine()
    async with client_for(make_app(engine)) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "at least 1" in error["message"]
    assert not engine.running and not engine.aborted  # refused before reaching the engine
