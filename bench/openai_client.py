"""A small asyncio client for OpenAI-compatible /v1/completions: streaming with per-token timing, or not."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    """What one completion request did. Times in seconds from when the request was sent."""

    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def sse_data(lines: Iterable[str]) -> Iterable[str]:
    """The payloads of the `data:` lines of an SSE stream (comments, blank lines and other fields dropped)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


async def _aiter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        for payload in sse_data([line]):
            yield payload


def completion_body(model: str, prompt: str | list[int], max_tokens: int, stream: bool,
                    ignore_eos: bool = True, extra: dict | None = None) -> dict:
    """Request body for /v1/completions; greedy, EOS ignored as vLLM's and llama.cpp's extra field asks."""
    body: dict = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                  "stream": stream, "ignore_eos": ignore_eos}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """POST a streaming completion and time each content chunk; token count from the usage chunk if sent."""
    result = RequestResult()
    chunks = 0
    usage_tokens: int | None = None
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return result
            async for payload in _aiter_sse_data(response.aiter_lines()):
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):  # a server that fails after its 200 says so in an event
                    result.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                text = "".join(choice.get("text") or "" for choice in chunk.get("choices") or [])
                if not text:
                    continue  # role-only, finish-only and usage chunks carry no token
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
                result.text += text
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = True
    return result


async def complete(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """POST a non-streaming completion; output tokens from `usage`."""
    result = RequestResult()
    start = time.perf_counter()
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    if response.status_code != 200:
        result.error = f"HTTP {response.status_code}: {response.text[:300]}"
        return result
    data = response.json()
    result.output_tokens = data.get("usage", {}).get("completion_tokens", 0)
    result.text = "".join(choice.get("text") or "" for choice in data.get("choices") or [])
    result.ok = True
    return result


def make_client(concurrency: int, api_key: str | None = None, timeout: float = 600.0) -> httpx.AsyncClient:
    """An AsyncClient with enough connections for `concurrency` requests in flight at once."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout, connect=30.0))


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id the server lists at /v1/models."""
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def base_url_of(url: str) -> str:
    """'http://h:p/v1' or 'http://h:p/' -> 'http://h:p' (both spellings are accepted on the command line)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url
