"""Attention inspection: POST /v1/attention, POST /v1/logit_lens and the viewer page at GET /inspect.

The work runs in engine/inspect.py on its own eager path, in a worker thread, one inspection at a
time, so the serving loop keeps stepping while a report is computed. Responses are bounded by
inspect_max_tokens and inspect_max_bytes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import Field, model_validator

from engine.inspect import (
    AttentionQuery,
    InspectionTooLarge,
    InspectionTooLong,
    InspectLimits,
    Inspector,
    LensQuery,
    Tokens,
)
from service.errors import APIError
from service.protocol import ChatMessage, ErrorResponse, StrictModel, TokenId
from service.state import ServerState, get_state

router = APIRouter(tags=["inspection"])

STATIC = Path(__file__).resolve().parent.parent / "static"
MAX_GENERATE = 256  # greedy tokens an inspection may add to the prompt (inspect_max_tokens bounds the total too)
MAX_WAITING = 4  # inspections queued behind the running one before new ones get 429
MAX_LIST = 8192

# "all", "last", "start:stop" (Python slice, negatives allowed), one index or a list of indices
Selection = int | Annotated[list[int], Field(min_length=1, max_length=MAX_LIST)] | Annotated[
    str, Field(pattern=r"^(all|last|-?\d*:-?\d*)$")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "invalid request, or more tokens than inspect_max_tokens"),
                       (401, "missing or wrong API key"), (404, "unknown model"),
                       (413, "response would exceed inspect_max_bytes"), (429, "too many inspections queued"),
                       (503, "loading or shutting down"))
}


class InspectRequest(StrictModel):
    """The sequence to inspect: a prompt (text or token ids) or chat messages, optionally extended greedily."""

    model: str | None = None
    prompt: str | Annotated[list[TokenId], Field(max_length=MAX_LIST)] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="add BOS to a text prompt, as completions do")
    max_tokens: int = Field(0, ge=0, le=MAX_GENERATE, description="greedy tokens to generate and include")
    layers: Selection = "all"
    top_k: int = Field(5, ge=0, le=20)
    precision: int = Field(4, ge=1, le=8, description="decimals of returned weights and probabilities")

    @model_validator(mode="after")
    def _one_input(self) -> InspectRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class AttentionRequest(InspectRequest):
    """POST /v1/attention."""

    heads: Selection = "all"
    query_positions: Selection = "all"
    aggregate: Literal["none", "mean", "max"] = "none"
    include_weights: bool = Field(True, description="false: only entropy, top_k and thumbnails")
    thumbnail_size: int = Field(0, ge=0, le=64, description="also return each map max-pooled to this size")

    def query(self) -> AttentionQuery:
        return AttentionQuery(layers=self.layers, heads=self.heads, query_positions=self.query_positions,
                              aggregate=self.aggregate, top_k=self.top_k, precision=self.precision,
                              include_weights=self.include_weights, thumbnail_size=self.thumbnail_size)


class LogitLensRequest(InspectRequest):
    """POST /v1/logit_lens."""

    positions: Selection = "all"
    top_k: int = Field(5, ge=1, le=20)

    def query(self) -> LensQuery:
        return LensQuery(layers=self.layers, positions=self.positions, top_k=self.top_k, precision=self.precision)


class _Gate:
    """One inspection at a time per app; a few may wait, more get 429."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


def _gate(request: Request) -> _Gate:
    gate = getattr(request.app.state, "kvserve_inspect_gate", None)
    if gate is None:
        gate = request.app.state.kvserve_inspect_gate = _Gate()
    return gate


def _inspector(state: ServerState) -> Inspector:
    loaded = state.require_engine()
    engine = getattr(loaded.engine, "engine", None)  # the LLMEngine inside AsyncEngine
    if engine is None or not hasattr(engine, "model"):
        raise APIError(503, "this server's engine does not support inspection", code="inspection_unavailable")
    limits = InspectLimits(state.settings.inspect_max_tokens, state.settings.inspect_max_bytes)
    return Inspector.from_engine(engine, limits)


def _prompt(state: ServerState, body: InspectRequest) -> tuple[str | list[int], bool]:
    """The prompt and whether to add special tokens; messages go through the chat template."""
    if body.messages is None:
        return body.prompt, body.add_special_tokens
    tokenizer = state.require_engine().tokenizer
    if not getattr(tokenizer, "has_chat_template", True):
        raise APIError(400, "this model has no chat template; send a prompt", param="messages")
    try:
        return tokenizer.apply_chat_template([m.as_template_dict() for m in body.messages]), False
    except ValueError as exc:
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc


def _in_own_thread(work: Callable[[], bytes]) -> asyncio.Future:
    """Run `work` on a new thread that ends with it, not on asyncio's pool, whose threads live on.

    A live thread that has run parallel torch ops keeps an OpenMP team, and that slows the engine's step
    thread for as long as it lives (see AsyncEngine.launch); a finished thread gives its team back.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: bytes | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def body() -> None:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="kvserve-inspect", daemon=True).start()
    return future


async def _run(request: Request, state: ServerState, body: InspectRequest, kind: str,
               report: Callable[[Inspector, Tokens], dict]) -> Response:
    """Tokenize, compute the report and serialize it in a worker thread, one inspection at a time."""
    state.check_model(body.model)
    inspector = _inspector(state)
    prompt, add_special = _prompt(state, body)

    def work() -> bytes:
        toks = inspector.tokens(prompt, body.max_tokens, add_special)
        payload = {"object": kind, "model": state.model_name, "model_info": inspector.facts, "text": toks.text,
                   "tokens": toks.spans, "num_prompt_tokens": toks.num_prompt_tokens, **report(inspector, toks)}
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > inspector.limits.max_bytes:
            raise InspectionTooLarge(f"the response is {len(data)} bytes, over the limit of "
                                     f"{inspector.limits.max_bytes} bytes (inspect_max_bytes); select fewer "
                                     "layers, heads or positions")
        return data

    gate = _gate(request)
    if gate.lock.locked() and gate.waiting >= MAX_WAITING:
        raise APIError(429, f"{MAX_WAITING} inspections are already waiting; retry later", code="inspect_busy",
                       headers={"Retry-After": "2"})
    gate.waiting += 1
    try:
        await gate.lock.acquire()
    finally:
        gate.waiting -= 1
    job = _in_own_thread(work)
    # The lock is released when the thread ends, not when a disconnected client cancels this handler,
    # so two inspections never run at once.
    job.add_done_callback(lambda done: (gate.lock.release(), done.cancelled() or done.exception()))
    try:
        data = await asyncio.shield(job)
    except InspectionTooLong as exc:
        raise APIError(400, str(exc), param="prompt", code="inspect_too_many_tokens") from exc
    except InspectionTooLarge as exc:
        raise APIError(413, str(exc), code="inspect_response_too_large") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    return Response(data, media_type="application/json")


@router.post("/v1/attention", responses={**_ERRORS, 200: {"description": "attention report (see the docs)"}})
async def attention(body: AttentionRequest, request: Request, state: ServerState = Depends(get_state)) -> Response:
    """Attention weights as [layer][head][query][key] (after softmax), per-head entropy and top-k keys."""
    return await _run(request, state, body, "attention", lambda insp, toks: insp.attention(toks, body.query()))


@router.post("/v1/logit_lens", responses={**_ERRORS, 200: {"description": "logit-lens report (see the docs)"}})
async def logit_lens(body: LogitLensRequest, request: Request, state: ServerState = Depends(get_state)) -> Response:
    """Top-k next-token predictions of each layer's residual stream through the final norm and LM head."""
    return await _run(request, state, body, "logit_lens", lambda insp, toks: insp.logit_lens(toks, body.query()))


_PAGE_FILES = {"/inspect": ("inspect.html", "text/html"), "/inspect/inspect.js": ("inspect.js", "text/javascript"),
               "/inspect/inspect.css": ("inspect.css", "text/css")}


def _page_endpoint(name: str, media_type: str) -> Callable:
    async def serve(_: Request) -> FileResponse:
        return FileResponse(STATIC / name, media_type=media_type, headers={"Cache-Control": "no-cache"})
    return serve


# The page and its assets are plain Starlette routes: include_router(..., dependencies=[api key]) adds
# dependencies to API routes only, so a browser can open the page; the page then sends the key itself.
for _path, (_name, _media) in _PAGE_FILES.items():
    router.add_route(_path, _page_endpoint(_name, _media), methods=["GET"], include_in_schema=False)
