"""The landing page's model rows while loading and once served, with the name escaped."""

from __future__ import annotations

import pytest

from service.app import create_app
from service.settings import Settings
from service.state import LoadedModel
from tests.unit.test_service_app import CharTokenizer, FakeEngine, client_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_home_while_loading_and_when_ready() -> None:
    name = "<b>odd</b> 'name'"
    loading = create_app(Settings(model="m", served_model_name=name))
    ready = create_app(Settings(model="m", served_model_name=name, api_keys=["k"]),
                       loaded=LoadedModel(FakeEngine(), CharTokenizer(), max_model_len=64))
    async with client_for(loading) as client:
        page = (await client.get("/")).text
    assert "&lt;b&gt;odd&lt;/b&gt;" in page and "<b>odd" not in page
    assert "loading" in page and "known once loaded" in page and "Bearer KEY" not in page
    async with client_for(ready) as client:
        response = await client.get("/")  # open, though the API needs a key
        icon = await client.get("/favicon.ico")
    assert response.status_code == 200 and "64 tokens" in response.text and "Bearer KEY" in response.text
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
