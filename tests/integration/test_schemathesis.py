"""schemathesis against the live server's /openapi.json: generated requests to every operation in the
schema never get a 5xx. Run it alone with `pytest tests/integration/test_schemathesis.py`."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import API_KEY, LiveServer
from schemathesis import GenerationMode

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/attention", "/v1/logit_lens")
# Every endpoint the README lists; the schema must hold them all (and the test covers whatever it holds).
ENDPOINTS = {"GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
             "POST /detokenize", "POST /v1/attention", "POST /v1/logit_lens", "GET /health", "GET /ready",
             "GET /metrics", "GET /version"}
MAX_EXAMPLES = 30


def operations(base_url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def bound_generation(body: object) -> None:
    """Keep generated completions short: the point is the server's answers, not long generations."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
            body[key] = 4
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2
    if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) and body["n"] > 2:
        body["n"] = 2


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(server: LiveServer, mode: GenerationMode) -> None:
    # schemathesis's own pytest plugin does not run under this pytest; drive its strategies with hypothesis.
    checked = []
    all_operations = operations(server.base_url)
    assert ENDPOINTS <= {op.label for op in all_operations}
    for operation in all_operations:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            if case.path in GENERATION_PATHS:
                bound_generation(case.body)
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
            label = f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
            assert response.status_code < 500, label
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, label

        try:
            run()
        except Unsatisfiable:
            # Operations without parameters or body (GET /health ...) have no invalid input to generate.
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
            continue
        checked.append(operation.label)
    skipped = {op.label for op in all_operations} - set(checked)
    # Only GETs without parameters have no invalid input, and only they may go unchecked.
    assert all(label.startswith("GET ") for label in skipped), skipped
    if mode is GenerationMode.POSITIVE:
        assert not skipped, skipped
