"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.protocol import ErrorInfo, ErrorResponse
from service.unicode_text import escape

log = logging.getLogger("kvserve.service")

_DEFAULT_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                  408: "request_timeout",
                  413: "request_too_large", 415: "unsupported_media_type", 429: "rate_limit_exceeded",
                  500: "internal_error", 503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    """Raised by handlers; turned into an error response with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _DEFAULT_CODES.get(status)
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error response."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    # Messages may quote client text (an unknown field's name...): escape what UTF-8 cannot carry.
    info = ErrorInfo(message=escape(message), type=kind, param=escape(param) if param is not None else None,
                     code=code or _DEFAULT_CODES.get(status))
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error JSONResponse in the OpenAI shape."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as (message, param) a client can act on."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # A union reports each branch it tried; a validator's own complaint (value_error, or pydantic's own
    # string_unicode) explains what to fix: the content part holding a lone surrogate, not "content is
    # not a string".
    first = next((e for e in errors if e.get("type") in ("value_error", "string_unicode")), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Unions report the branch tried ("str", "list[int]") in loc; those are noise for a client.
    loc = [p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"missing required parameter: {param}", param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the OpenAI error shape (400, not FastAPI's 422, for bad bodies)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            default = HTTPStatus(exc.status_code).phrase
        except ValueError:
            default = "error"
        message = exc.detail if isinstance(exc.detail, str) else default
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        # Starlette re-raises after this response and uvicorn then drops the connection: say so.
        return error_response(500, "internal server error", headers={"Connection": "close"})
