"""OpenTelemetry tracing, off unless `--otlp-traces-endpoint` is set: then every HTTP request (probes
aside) gets a SERVER span, continuing the caller's W3C `traceparent`, and completions carry the GenAI
semantic-convention attributes. The SDK is imported only when tracing is on (the `tracing` extra);
when off, the routes' one call here is a dictionary lookup."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from engine.sampling_params import SamplingParams

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

SPAN_KEY = "kvserve.span"  # scope key: the request's span, present only while tracing is on
_UNTRACED_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapes: a span every few seconds is noise
_PROTOCOLS = ("http/protobuf", "grpc")


def build_tracer_provider(endpoint: str) -> Any:
    """An SDK TracerProvider exporting to `endpoint` by OTLP, configured by the standard OTEL_* variables:
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or OTEL_EXPORTER_OTLP_PROTOCOL; http/protobuf or grpc),
    OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_TRACES_HEADERS,
    OTEL_BSP_* (batching), ..."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    if protocol not in _PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={protocol!r} is not supported; use one of {_PROTOCOLS}")
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ValueError(f"--otlp-traces-endpoint needs the OpenTelemetry SDK and OTLP exporters: "
                         f"pip install 'kvserve[tracing]' ({exc})") from exc
    if protocol == "http/protobuf" and urlsplit(endpoint).path in ("", "/"):
        # A collector's base URL (http://collector:4318), as the OTEL_EXPORTER_OTLP_ENDPOINT convention has it.
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "kvserve"}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class TracingMiddleware:
    """One SERVER span per HTTP request, a child of the caller's `traceparent` when it sends one."""

    def __init__(self, app: ASGIApp, *, tracer_provider: Any, log_fields_key: str) -> None:
        from opentelemetry import propagate, trace

        self.app = app
        self.tracer = tracer_provider.get_tracer("kvserve")
        self.log_fields_key = log_fields_key
        self._extract, self._use_span, self._trace = propagate.extract, trace.use_span, trace

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in _UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        trace = self._trace
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope.get("method", ""), scope.get("path", "")
        span = self.tracer.start_span(f"{method} {path}", context=self._extract(headers), kind=trace.SpanKind.SERVER,
                                      attributes={"http.request.method": method, "url.path": path})
        scope[SPAN_KEY] = span
        context = span.get_span_context()
        if context.is_valid and self.log_fields_key in scope:
            # The request's log line names its trace, so logs and traces join up.
            scope[self.log_fields_key]["trace_id"] = trace.format_trace_id(context.trace_id)
        status = {"code": 0}

        async def send_and_note_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self._use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
            await self.app(scope, receive, send_and_note_status)
            span.set_attribute("http.response.status_code", status["code"])
            if status["code"] >= 400:
                span.set_attribute("error.type", str(status["code"]))
            if status["code"] >= 500:
                span.set_status(trace.StatusCode.ERROR)


def record_generation(scope: Scope, *, operation: str, model: str, params: SamplingParams, stream: bool, response_id: str, prompt_tokens: int,
                      completion_tokens: int, finish_reasons: Sequence[str | None], started: float,
                      first_token_time: float | None, queue_time: float | None) -> None:
    """Put a completion's GenAI attributes on its request's span (nothing when tracing is off). `params`
    are the first prompt's; `model` is the served one (the only name a request may ask for). Times are
    time.monotonic() values; durations go out in seconds."""
    span = scope.get(SPAN_KEY)
    if span is None:
        return
    span.update_name(f"{operation} {model}")
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.response.id": response_id,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.stream": stream,
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": completion_tokens,
        "gen_ai.response.finish_reasons": [reason or "abort" for reason in finish_reasons],
        # vLLM's latency attributes (its tracing), which LLM trace views already know.
        "gen_ai.latency.e2e": time.monotonic() - started,
    }
    optional = {"gen_ai.request.max_tokens": params.max_tokens,
                "gen_ai.request.top_k": params.top_k if params.top_k > 0 else None,
                "gen_ai.request.seed": params.seed,
                "gen_ai.request.choice.count": params.n if params.n != 1 else None,
                "gen_ai.request.frequency_penalty": params.frequency_penalty or None,
                "gen_ai.request.presence_penalty": params.presence_penalty or None,
                "gen_ai.request.stop_sequences": list(params.stop) or None,
                "gen_ai.latency.time_in_queue": queue_time}
    if first_token_time is not None:
        optional["gen_ai.latency.time_to_first_token"] = first_token_time - started
        if stream:  # the GenAI conventions' name for it, defined for streamed responses
            optional["gen_ai.response.time_to_first_chunk"] = first_token_time - started
    attributes.update({key: value for key, value in optional.items() if value is not None})
    span.set_attributes(attributes)
