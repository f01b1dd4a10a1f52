"""ASGI middleware around every HTTP request: request id, body limits, content type, error
counting and the one JSON log line per request."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException

from service.errors import error_body
from service.logging_setup import REQUEST_LOGGER

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOG_FIELDS_KEY = "kvserve.log"  # scope key: dict handlers fill with token counts and latencies
REQUEST_ID_KEY = "kvserve.request_id"
# Probes and scrapes, every few seconds from kubelets and Prometheus: kept out of the error counts, and logged
# only at debug level, so they neither drown the request log nor raise alerts while the model loads.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})

request_log = logging.getLogger(REQUEST_LOGGER)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestContextMiddleware:
    """Outermost middleware: everything a request needs before and after the routes see it."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int, on_error: Callable[[int], None]) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming_id = headers.get("x-request-id", "")
        request_id = incoming_id if 0 < len(incoming_id) <= 64 and incoming_id.isprintable() else uuid.uuid4().hex
        fields: dict[str, Any] = {}
        scope[LOG_FIELDS_KEY] = fields
        scope[REQUEST_ID_KEY] = request_id
        status_holder = {"status": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            rejection = self._reject(scope, headers)
            if rejection is not None:
                await self._send_error(send_wrapper, *rejection)
            else:
                await self.app(scope, self._limited_receive(receive), send_wrapper)
        finally:
            status = status_holder["status"] or 500
            probe = scope.get("path") in PROBE_PATHS
            if status >= 400 and not probe:  # /ready's 503 while loading is an answer, not a failed request
                self.on_error(status)
            self._log(scope, request_id, status, start, fields, level=logging.DEBUG if probe else logging.INFO)

    def _reject(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) for requests refused on their headers alone."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "invalid Content-Length header"
            if int(length) > self.max_request_bytes:
                return 413, f"request body of {length} bytes exceeds the limit of {self.max_request_bytes} bytes"
        has_body = (length is not None and int(length) > 0) or "transfer-encoding" in headers
        content_type = headers.get("content-type")
        if has_body and content_type is not None and not _is_json(content_type):
            return 415, f"Content-Type must be application/json, got {content_type!r}"
        return None

    def _limited_receive(self, receive: Receive) -> Receive:
        """Counts body bytes as they arrive, for bodies sent without Content-Length."""
        received = 0

        async def wrapped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    # FastAPI re-raises HTTPException from body reading; the error handler shapes it.
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_request_bytes} bytes")
            return message

        return wrapped

    @staticmethod
    async def _send_error(send: Send, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        # Refused on its headers, the body is never read: close rather than wait for it.
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: Scope, request_id: str, status: int, start: float, fields: dict[str, Any], level: int) -> None:
        if not request_log.isEnabledFor(level):
            return
        line = {"request_id": request_id, "method": scope.get("method"), "path": scope.get("path", ""),
                "status": status, "latency_s": round(time.monotonic() - start, 4), **fields}
        request_log.log(level, "request", extra={"fields": line})
