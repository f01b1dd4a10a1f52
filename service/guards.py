"""ASGI guards that act before a route reads the request body: the API key check (401 first, whatever
the body) and a deadline for the body to arrive (408, so a client cannot hold a request open by sending
its body slowly or never)."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import bearer_token, key_error
from service.errors import error_response

CLOSE = {"Connection": "close"}


def has_body(headers: Headers) -> bool:
    """Whether the request announces a body (which a response sent before reading it leaves unread)."""
    length = headers.get("content-length", "0")
    return "transfer-encoding" in headers or not length.isdigit() or int(length) > 0


class ApiKeyGate:
    """401 for a request to a keyed route without a valid key, before its body is read or validated.
    `routes` are the routes included with the require_api_key dependency (which checks again, later)."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute], keys: list[str]) -> None:
        self.app = app
        self.routes = routes
        self.keys = keys

    def _is_keyed(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not self._is_keyed(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = key_error(bearer_token(headers.get("authorization")), self.keys)
        if error is None:
            await self.app(scope, receive, send)
            return
        # The body stays unread: close the connection rather than wait for (or parse) what follows.
        extra = CLOSE if has_body(headers) else {}
        response = error_response(error.status, error.message, code=error.code, headers={**(error.headers or {}), **extra})
        await response(scope, receive, send)


class BodyDeadline:
    """The request body must be complete within `timeout` seconds of the headers; else 408 and the
    connection is closed. Reads after the body (waiting for a disconnect) are not bounded. A response
    sent before an announced body was read (404, 405...) closes the connection too: the server would
    otherwise keep reading whatever the client trickles in."""

    def __init__(self, app: ASGIApp, *, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_complete = False

        async def bounded_receive() -> Message:
            nonlocal body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                # FastAPI re-raises an HTTPException from reading the body; the error handler shapes it.
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s "
                                         "(request_body_timeout)", headers=CLOSE) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        announced_body = has_body(Headers(scope=scope))

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and announced_body and not body_complete:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, bounded_receive, closing_send)
