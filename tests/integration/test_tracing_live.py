"""A live server started with --otlp-traces-endpoint sends its spans to a small OTLP/HTTP receiver
on 127.0.0.1 (run by this test), decoded with opentelemetry-proto: the caller's trace continues and the
span carries the GenAI attributes."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from live_server import SERVED_NAME, LiveServer, start_server
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


class OtlpHttpReceiver(ThreadingHTTPServer):
    """Accepts OTLP/HTTP protobuf trace exports and keeps (path, decoded request) pairs."""

    def __init__(self) -> None:
        self.exports: list[tuple[str, ExportTraceServiceRequest]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/x-protobuf"
                receiver.exports.append((self.path, ExportTraceServiceRequest.FromString(body)))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def spans(self) -> list[tuple[str, dict, object]]:
        """(path, resource attributes, span) for every span received so far."""
        return [(path, {kv.key: value_of(kv.value) for kv in rs.resource.attributes}, span)
                for path, request in list(self.exports) for rs in request.resource_spans
                for scope in rs.scope_spans for span in scope.spans]


def value_of(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    server = OtlpHttpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def traced_server(receiver: OtlpHttpReceiver) -> Iterator[LiveServer]:
    # The collector's base URL, as operators pass it: kvserve adds OTLP/HTTP's /v1/traces.
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    live = start_server("--otlp-traces-endpoint", endpoint,
                        env={"OTEL_SERVICE_NAME": "kvserve-live-test", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield live
    assert live.stop() == 0, live.log_text()[-4000:]


def test_live_server_exports_the_request_span_over_otlp_http(traced_server: LiveServer,
                                                             receiver: OtlpHttpReceiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5,
            "temperature": 0.5, "top_p": 0.8, "ignore_eos": True}
    reply = httpx.post(f"{traced_server.base_url}/v1/chat/completions", json=body, timeout=120,
                       headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}).json()

    def ours() -> list:
        return [item for item in receiver.spans() if item[2].trace_id.hex() == trace_id]

    deadline = time.monotonic() + 30
    while not ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    ((path, resource, span),) = ours()
    assert path == "/v1/traces"
    assert resource["service.name"] == "kvserve-live-test"
    assert span.parent_span_id.hex() == parent_id and span.name == f"chat {SERVED_NAME}"
    attrs = {kv.key: value_of(kv.value) for kv in span.attributes}
    assert attrs["gen_ai.request.model"] == SERVED_NAME and attrs["gen_ai.request.max_tokens"] == 5
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert attrs["gen_ai.request.top_p"] == pytest.approx(0.8)
    assert attrs["gen_ai.usage.input_tokens"] == reply["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == reply["usage"]["completion_tokens"] == 5
    assert 0 <= attrs["gen_ai.latency.time_in_queue"] < attrs["gen_ai.latency.time_to_first_token"]
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert f'"trace_id": "{trace_id}"' in traced_server.log_text()  # the JSON request log line names it
