"""Fixtures: the shared live server and clients for it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from live_server import API_KEY, LiveServer, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """The shared server: API key required, a short context so 'too long' is cheap to reach."""
    live = start_server("--api-key", API_KEY, "--max-model-len", "512", "--max-request-bytes", "65536",
                        "--max-num-seqs", "8")
    yield live
    assert live.stop() == 0, live.log_text()[-4000:]


@pytest.fixture(scope="session")
def client(server: LiveServer):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as openai_client:
        yield openai_client


@pytest.fixture(scope="session")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as session:
        yield session
