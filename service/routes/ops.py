"""Operational endpoints: health, readiness, metrics, version (open), tokenize/detokenize (keyed)."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.chat import ChatOptions, chat_prompt
from service.errors import APIError, error_response
from service.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    StatusResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from service.state import ServerState, get_state

router = APIRouter(tags=["operations"])
tokenizer_router = APIRouter(tags=["tokenizer"])

_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "not alive / not ready"}}
_KEYED_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 503)}


def package_version() -> str:
    try:
        return metadata.version("kvserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/health", response_model=StatusResponse, responses=_UNAVAILABLE)
async def health(state: ServerState = Depends(get_state)) -> StatusResponse | JSONResponse:
    """200 while the process runs and the engine loop is alive (or the model is still loading)."""
    if state.load_error is not None:
        return error_response(503, f"model failed to load: {state.load_error}", code="load_failed")
    if state.loaded is not None and not state.loaded.engine.is_alive and not state.draining:
        return error_response(503, "engine loop is not running", code="engine_dead")
    return StatusResponse(status="ok")


@router.get("/ready", response_model=StatusResponse, responses=_UNAVAILABLE)
async def ready(state: ServerState = Depends(get_state)) -> StatusResponse | JSONResponse:
    """200 only when the model is loaded and the server is not draining."""
    if state.ready:
        return StatusResponse(status="ready")
    reason = "draining" if state.draining else ("loading" if state.loaded is None else "engine loop is not running")
    return error_response(503, f"not ready: {reason}", code="not_ready")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus metrics; gauges are read from the engine now."""
    if state.loaded is not None:
        state.metrics.sync_engine_stats(state.loaded.engine.stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """The kvserve version."""
    return VersionResponse(version=package_version())


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse, responses=_KEYED_ERRORS)
async def tokenize(body: TokenizeRequest, state: ServerState = Depends(get_state)) -> TokenizeResponse:
    """Token ids of a prompt, or of messages after the chat template."""
    state.check_model(body.model)
    loaded = state.require_engine()
    if body.messages is not None:
        options = ChatOptions(add_generation_prompt=body.add_generation_prompt)
        ids = chat_prompt(state, body.messages, options).token_ids
    else:
        ids = loaded.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=loaded.max_model_len, tokens=ids,
                            token_strs=[loaded.tokenizer.token_text(t) for t in ids])


@tokenizer_router.post("/detokenize", response_model=DetokenizeResponse, responses=_KEYED_ERRORS)
async def detokenize(body: DetokenizeRequest, state: ServerState = Depends(get_state)) -> DetokenizeResponse:
    """Text of token ids."""
    state.check_model(body.model)
    loaded = state.require_engine()
    bad = [t for t in body.tokens if t >= loaded.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {loaded.tokenizer.vocab_size})",
                       param="tokens")
    return DetokenizeResponse(prompt=loaded.tokenizer.decode(body.tokens))

