"""Probes and scrapes (/health, /ready, /metrics): not counted as request errors, logged only at debug level."""

from __future__ import annotations

import logging

import pytest

from tests.unit.test_service_app import client_for, make_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def error_count(metrics_text: str, code: str) -> float:
    prefix = "kvserve_request_errors_total{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith(prefix) and f'code="{code}"' in line)


async def test_ready_503_while_loading_is_no_error_and_no_info_log(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(None)  # the model is still loading
    with caplog.at_level(logging.INFO, logger="kvserve.request"):
        async with client_for(app) as client:
            for _ in range(3):
                assert (await client.get("/ready")).status_code == 503
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/nowhere")).status_code == 404  # a real client error, for contrast
            metrics = (await client.get("/metrics")).text
    assert error_count(metrics, "503") == 0
    assert error_count(metrics, "404") == 1
    logged = [r.fields["path"] for r in caplog.records if r.name == "kvserve.request"]
    assert logged == ["/nowhere"]


async def test_probes_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvserve.request"):
        async with client_for(make_app(None)) as client:
            await client.get("/ready")
            await client.get("/metrics")
    probes = [(r.levelno, r.fields["path"], r.fields["status"]) for r in caplog.records if r.name == "kvserve.request"]
    assert probes == [(logging.DEBUG, "/ready", 503), (logging.DEBUG, "/metrics", 200)]
