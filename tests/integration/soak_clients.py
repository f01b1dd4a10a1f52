"""The clients of the soak test (test_soak.py). Each request behaves one way: reads its stream to the end
(quickly or slowly), leaves as soon as its headers arrive (usually still queued), leaves mid-stream,
gives up after a short timeout, or sends a bad body; and reports how it ended."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

# How a request can end. A well-behaved client must get its tokens, a 429 or an error event.
TOKENS, BUSY, ERROR_EVENT = "tokens", "429", "error_event"
LEFT_AT_HEADERS, LEFT_MID_STREAM, GAVE_UP, REJECTED = "left_at_headers", "left_mid_stream", "gave_up", "4xx"
SERVER_ERROR, BROKEN = "5xx", "broken"

MAX_TOKENS = (4, 16)  # short generations: the point is the traffic's shape, not its length
PROMPTS = ["Tell me about llamas.", "Write a haiku about the sea.", "What is a paged KV cache?",
           "Count from one to twenty:", "Name three rivers in Europe."]


@dataclass
class Outcome:
    behaviour: str
    result: str
    status: int | None = None
    detail: str = ""


def _body(rng: random.Random, stream: bool) -> tuple[str, dict]:
    max_tokens = rng.randint(*MAX_TOKENS)
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                    "stream": stream}


def _status_outcome(behaviour: str, status: int, text: str) -> Outcome:
    """The outcome of a response that did not start a stream."""
    if status == 429:
        return Outcome(behaviour, BUSY, status)
    if status >= 500:
        return Outcome(behaviour, SERVER_ERROR, status, text[:300])
    return Outcome(behaviour, BROKEN, status, f"unexpected status: {text[:300]}")


async def stream(client: httpx.AsyncClient, rng: random.Random, behaviour: str) -> Outcome:
    """read / slow_read: to the end; leave_at_headers: close on the headers; leave_mid_stream: after 1-3 events."""
    path, body = _body(rng, stream=True)
    leave_after = rng.randint(1, 3) if behaviour == "leave_mid_stream" else None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _status_outcome(behaviour, response.status_code, response.text)
        if behaviour == "leave_at_headers":
            return Outcome(behaviour, LEFT_AT_HEADERS, 200)
        events, finished = 0, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":  # its tokens: every choice ended on stop or length (EOS may come first)
                if finished:
                    return Outcome(behaviour, TOKENS, 200)
                return Outcome(behaviour, BROKEN, 200, "[DONE] before a finish reason")
            event = json.loads(payload)
            if "error" in event:
                return Outcome(behaviour, ERROR_EVENT, 200, str(event["error"].get("code")))
            for choice in event.get("choices", []):
                finished |= choice.get("finish_reason") in ("stop", "length")
            events += 1
            if leave_after is not None and events >= leave_after and not finished:
                return Outcome(behaviour, LEFT_MID_STREAM, 200)
            if behaviour == "slow_read":
                await asyncio.sleep(0.25)
        return Outcome(behaviour, BROKEN, 200, "the stream ended without [DONE]")


async def plain(client: httpx.AsyncClient, rng: random.Random, behaviour: str) -> Outcome:
    """A non-streamed request, read to the end."""
    path, body = _body(rng, stream=False)
    response = await client.post(path, json=body)
    if response.status_code != 200:
        return _status_outcome(behaviour, response.status_code, response.text)
    choice = response.json()["choices"][0]
    ok = choice.get("finish_reason") in ("stop", "length")
    return Outcome(behaviour, TOKENS if ok else BROKEN, 200, "" if ok else response.text[:300])


async def give_up(client: httpx.AsyncClient, rng: random.Random, behaviour: str) -> Outcome:
    """A client with a short timeout (0.2-3 s): it leaves while queued or generating, or finishes in time."""
    patience = rng.uniform(0.2, 3.0)
    stream = rng.random() < 0.5
    path, body = _body(rng, stream=stream)
    try:  # a deadline on the whole exchange (httpx's timeouts bound each read, not the total)
        response = await asyncio.wait_for(client.post(path, json=body), patience)
    except TimeoutError:
        return Outcome(behaviour, GAVE_UP)
    if response.status_code != 200:
        return _status_outcome(behaviour, response.status_code, response.text)
    if stream and '"error"' in response.text:
        return Outcome(behaviour, ERROR_EVENT, 200)
    return Outcome(behaviour, TOKENS, 200)


BAD_BODIES: list[tuple[str, bytes, str]] = [  # (name, body, content type); each must get a 4xx
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "stream": true}',
     "application/json"),
    ("malformed-json", b'{"prompt": "Hello", "max_tokens": 2', "application/json"),
    ("user-without-content", b'{"messages": [{"role": "user"}], "stream": true}', "application/json"),
    ("empty-prompt-list", b'{"prompt": [], "stream": true}', "application/json"),
    # (Unknown fields are ignored, as OpenAI does, so they are not bad bodies.)
    ("wrong-type", b'{"prompt": "hi", "max_tokens": "many"}', "application/json"),
    ("too-long", json.dumps({"prompt": "hi", "max_tokens": 10**6}).encode(), "application/json"),
    ("not-json", b"prompt=hi", "application/x-www-form-urlencoded"),
]


async def bad_body(client: httpx.AsyncClient, rng: random.Random, behaviour: str) -> Outcome:
    name, content, content_type = rng.choice(BAD_BODIES)
    path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
    response = await client.post(path, content=content, headers={"Content-Type": content_type})
    if 400 <= response.status_code < 500 and response.status_code != 429:
        return Outcome(f"{behaviour}:{name}", REJECTED, response.status_code)
    return _status_outcome(f"{behaviour}:{name}", response.status_code, response.text)


async def unfinished_body(base_url: str, rng: random.Random, behaviour: str) -> Outcome:
    """Announces a longer body than it sends: the server must answer 408 once its body deadline passes."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
                "Content-Length: 500\r\n\r\n")
        writer.write(head.encode() + b'{"prompt": "never finished')
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 120)
    finally:
        writer.close()
    parts = status_line.decode(errors="replace").split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    if status == 408:
        return Outcome(behaviour, REJECTED, status)
    return Outcome(behaviour, SERVER_ERROR if status and status >= 500 else BROKEN, status, status_line.decode())


BEHAVIOURS = [  # (behaviour, weight)
    ("read", 30), ("slow_read", 10), ("leave_at_headers", 15), ("leave_mid_stream", 10), ("give_up", 12),
    ("plain", 10), ("bad_body", 10), ("unfinished_body", 3),
]


async def one_request(client: httpx.AsyncClient, base_url: str, rng: random.Random) -> Outcome:
    """One request with a behaviour drawn from BEHAVIOURS; transport errors are outcomes too."""
    behaviour = rng.choices([b for b, _ in BEHAVIOURS], weights=[w for _, w in BEHAVIOURS])[0]
    try:
        if behaviour in ("read", "slow_read", "leave_at_headers", "leave_mid_stream"):
            return await stream(client, rng, behaviour)
        if behaviour == "plain":
            return await plain(client, rng, behaviour)
        if behaviour == "give_up":
            return await give_up(client, rng, behaviour)
        if behaviour == "bad_body":
            return await bad_body(client, rng, behaviour)
        return await unfinished_body(base_url, rng, behaviour)
    except (TimeoutError, httpx.HTTPError, OSError) as exc:
        return Outcome(behaviour, BROKEN, None, f"{type(exc).__name__}: {exc}")
