"""OpenTelemetry tracing in-process: spans from a real (tiny) engine caught by the SDK's in-memory
exporter, an OTLP/gRPC export to a receiver on 127.0.0.1, and no SDK import while tracing is off.
(The OTLP/HTTP export from a live server is tests/integration/test_tracing_live.py.)"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from helpers.tiny_engine import make_tiny_model_dir
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from test_service_app import CharTokenizer, FakeEngine

from service.app import create_app
from service.settings import Settings
from service.state import LoadedModel
from service.tracing import build_tracer_provider

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = Path(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def traced(tiny_dir: str) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    """A traced app over the tiny model, its lifespan running (the model loads as in `kvserve serve`)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(model=tiny_dir, served_model_name="tiny", quantization="none"),
                     tracer_provider=provider)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "tiny model did not load"
            time.sleep(0.1)
        yield client, exporter


def finished_spans(exporter: InMemorySpanExporter) -> list:
    spans = list(exporter.get_finished_spans())
    exporter.clear()
    return spans


def test_span_continues_the_callers_trace_with_genai_attributes(traced, caplog: pytest.LogCaptureFixture) -> None:
    client, exporter = traced
    exporter.clear()
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 6,
            "temperature": 0.7, "top_p": 0.9, "seed": 3, "ignore_eos": True}
    with caplog.at_level(logging.INFO, logger="kvserve.request"):
        response = client.post("/v1/chat/completions", json=body,
                               headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert response.status_code == 200, response.text
    reply = response.json()
    (span,) = finished_spans(exporter)
    assert span.name == "chat tiny" and span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id and span.parent.is_remote
    attrs = span.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == "tiny"
    assert attrs["gen_ai.request.max_tokens"] == 6 and attrs["gen_ai.request.seed"] == 3
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert attrs["gen_ai.usage.input_tokens"] == reply["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == reply["usage"]["completion_tokens"] == 6
    assert list(attrs["gen_ai.response.finish_reasons"]) == ["length"]
    assert attrs["gen_ai.response.id"] == reply["id"] and attrs["gen_ai.request.stream"] is False
    assert attrs["http.response.status_code"] == 200
    duration = (span.end_time - span.start_time) / 1e9
    queue, ttft = attrs["gen_ai.latency.time_in_queue"], attrs["gen_ai.latency.time_to_first_token"]
    assert 0 <= queue < ttft <= attrs["gen_ai.latency.e2e"] <= duration
    assert "gen_ai.response.time_to_first_chunk" not in attrs  # defined for streamed responses only
    # The request's log line names the trace.
    (line,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("path") == "/v1/chat/completions"]
    assert line["trace_id"] == trace_id


def test_streamed_completion_starts_a_new_trace(traced) -> None:
    client, exporter = traced
    exporter.clear()
    body = {"prompt": "Hello world", "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    (span,) = finished_spans(exporter)
    assert span.name == "text_completion tiny" and span.parent is None
    attrs = span.attributes
    assert attrs["gen_ai.request.stream"] is True and attrs["gen_ai.usage.output_tokens"] == 4
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] == attrs["gen_ai.latency.time_to_first_token"]
    assert len(events) >= 2  # chunks, then usage


def test_unsampled_caller_and_probes_record_nothing_and_errors_are_marked(traced) -> None:
    client, exporter = traced
    exporter.clear()
    # Flags 00: the caller decided not to sample this trace; the default ParentBased sampler follows it.
    unsampled = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"
    ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"traceparent": unsampled})
    assert ok.status_code == 200
    for probe in ("/health", "/ready", "/metrics"):
        assert client.get(probe).status_code == 200
    assert finished_spans(exporter) == []

    bad = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": -1})
    assert bad.status_code == 400
    (span,) = finished_spans(exporter)
    assert span.name == "POST /v1/completions"  # never reached the engine: no GenAI attributes
    assert span.attributes["error.type"] == "400" and "gen_ai.operation.name" not in span.attributes
    assert span.status.status_code != StatusCode.ERROR  # a client error is not the server's (HTTP semconv)


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_grpc_export_from_the_env_configured_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "kvserve-grpc-test")
        loaded = LoadedModel(FakeEngine(), CharTokenizer(), max_model_len=64)
        app = create_app(Settings(model="fake", otlp_traces_endpoint=f"http://127.0.0.1:{port}"), loaded=loaded)
        with TestClient(app) as client:
            assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        # Leaving the client ran the app's shutdown, which flushes the batched spans.
    finally:
        server.stop(grace=None)
    spans = [(resource_spans.resource, span) for request in receiver.requests
             for resource_spans in request.resource_spans for scope in resource_spans.scope_spans
             for span in scope.spans]
    ((resource, span),) = spans
    service = {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"]
    assert service == "kvserve-grpc-test" and span.name == "text_completion fake"
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["gen_ai.usage.output_tokens"].int_value == 3


def test_unknown_protocol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json.*not supported"):
        build_tracer_provider("http://127.0.0.1:4318")


def test_tracing_off_imports_no_sdk_and_adds_no_middleware() -> None:
    script = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "from service.tracing import TracingMiddleware\n"
        "app = create_app(Settings())\n"
        "assert not any(m.cls is TracingMiddleware for m in app.user_middleware)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
