"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from service.chat import chat_prompt
from service.choices import CompletionChoiceBuilder
from service.errors import APIError, error_body
from service.generation import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    Prompt,
    RunOutcome,
    check_token_params,
    fit_context,
    merge,
    run_engine,
    tokenize_prompt,
)
from service.middleware import LOG_FIELDS_KEY, REQUEST_ID_KEY
from service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from service.state import ServerState, get_state
from service.structured import apply_structured_output
from service.tools.request import (
    apply_tools,
    chat_choice_builder,
    chat_options,
    plan_tools,
)
from service.tracing import SPAN_KEY, record_generation

router = APIRouter(tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "invalid request or prompt too long"), (401, "missing or wrong API key"),
                       (404, "unknown model"), (413, "body too large"), (415, "body is not JSON"),
                       (429, "waiting queue full; see Retry-After"), (503, "loading or shutting down"),
                       (504, "request timeout"))
}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"},
                                     "example": 'data: {"id": "...", "choices": [...]}\n\ndata: [DONE]\n\n'}}
CLIENT_CLOSED = 499  # nginx's "client closed request": only the request log and metrics see it


@router.get("/v1/models", response_model=ModelList,
            responses={code: _ERRORS[code] for code in (401, 503)})
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    """The one served model."""
    engine = state.require_engine()
    return ModelList(data=[ModelCard(id=state.model_name, max_model_len=engine.max_model_len)])


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**_ERRORS, 200: {"content": _STREAM_DOC, "description": "JSON, or SSE when stream is true"}})
async def create_completion(body: CompletionRequest, request: Request,
                            state: ServerState = Depends(get_state)) -> Response | CompletionResponse:
    """Text completion of one or more prompts (strings or token ids)."""
    state.check_model(body.model)
    prompts = [fit_context(state, tokenize_prompt(state, p), body.requested_max_tokens, "max_tokens",
                           default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS, zero_allowed=body.echo)
               for p in body.prompts()]
    params = [_sampling_params(state, lambda p=p: body.to_sampling_params(p.max_tokens)) for p in prompts]
    params = await apply_structured_output(state, body, params)
    tokenizer = state.require_engine().tokenizer
    builders = [
        CompletionChoiceBuilder(i * body.n + j, tokenizer, body.logprobs,
                                echo_text=(p.text if p.text is not None else tokenizer.decode(p.token_ids))
                                if body.echo else None,
                                echo_token_ids=p.token_ids if body.echo else None, prompt_only=body.prompt_only)
        for i, p in enumerate(prompts) for j in range(body.n)
    ]
    run = _Run(state, request, prompts, params, f"cmpl-{request.scope[REQUEST_ID_KEY]}")

    def on_output(prompt_index: int, out: RequestOutput) -> list[Any]:
        choices = []
        for choice in out.outputs:
            built = builders[prompt_index * body.n + choice.index].delta(choice, out.prompt_logprobs)
            if built is not None:
                choices.append(built)
        return choices

    def chunk(choices: list[Any], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=run.response_id, model=state.model_name, choices=choices, usage=usage)

    if body.stream:
        return await run.stream(on_output, chunk, body.include_usage, builders)
    if not await run.collect(on_output, builders):
        return Response(status_code=CLIENT_CLOSED)
    return CompletionResponse(id=run.response_id, model=state.model_name,
                              choices=[b.final() for b in builders], usage=run.usage(builders))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**_ERRORS, 200: {"content": _STREAM_DOC, "description": "JSON, or SSE when stream is true"}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: ServerState = Depends(get_state)) -> Response | ChatCompletionResponse:
    """Chat completion: the model's chat template is applied to `messages`."""
    state.check_model(body.model)
    tokenizer = state.require_engine().tokenizer
    plan = plan_tools(body, getattr(tokenizer, "chat_template", None), state.settings.tool_call_parser)
    prompt = fit_context(state, chat_prompt(state, body.messages, chat_options(body, plan)),
                         body.requested_max_tokens, "max_tokens" if body.max_tokens is not None else "max_completion_tokens",
                         default_max_tokens=None)  # the rest of the context, as vLLM does
    params = [_sampling_params(state, lambda: body.to_sampling_params(prompt.max_tokens))]
    params = await apply_tools(state, plan, await apply_structured_output(state, body, params))
    builders = [chat_choice_builder(j, tokenizer, body.logprobs, plan) for j in range(body.n)]
    run = _Run(state, request, [prompt], params, f"chatcmpl-{request.scope[REQUEST_ID_KEY]}")

    def on_output(_: int, out: RequestOutput) -> list[Any]:
        return [built for choice in out.outputs if (built := builders[choice.index].delta(choice)) is not None]

    def chunk(choices: list[Any], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=run.response_id, model=state.model_name, choices=choices, usage=usage)

    if body.stream:
        first = chunk([b.role_chunk() for b in builders])
        return await run.stream(on_output, chunk, body.include_usage, builders, first_chunk=first)
    if not await run.collect(on_output, builders):
        return Response(status_code=CLIENT_CLOSED)
    return ChatCompletionResponse(id=run.response_id, model=state.model_name,
                                  choices=[b.final() for b in builders], usage=run.usage(builders))


def _sampling_params(state: ServerState, make: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        params = make()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    check_token_params(state, params)
    return params


class _Run:
    """One API request's engine requests (one per prompt) and how their outputs reach the client."""

    def __init__(self, state: ServerState, request: Request, prompts: list[Prompt], params: list[SamplingParams],
                 response_id: str) -> None:
        state.admit(len(prompts))
        engine = state.require_engine().engine
        for prompt, sampling in zip(prompts, params, strict=True):
            try:
                engine.check(prompt.token_ids, sampling)  # what the engine would refuse is a 400 now
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
        self.state, self.request, self.prompts, self.params = state, request, prompts, params
        self.response_id = response_id
        self.outcomes = [RunOutcome() for _ in prompts]
        self.log: dict[str, Any] = request.scope.setdefault(LOG_FIELDS_KEY, {})
        self.started = time.monotonic()

    def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        rid = self.request.scope[REQUEST_ID_KEY]
        streams = [run_engine(self.state, f"{rid}-{i}", p, sp, o)
                   for i, (p, sp, o) in enumerate(zip(self.prompts, self.params, self.outcomes, strict=True))]
        return merge(streams)

    def usage(self, builders: list[Any]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(b.token_ids) for b in builders)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def _failure(self) -> APIError | None:
        """The error to report when some engine request did not finish normally."""
        if any(o.timed_out for o in self.outcomes):
            return APIError(504, f"request timed out after {self.state.settings.request_timeout} s")
        if any(o.aborted for o in self.outcomes):
            return APIError(503, "request aborted: server is shutting down", code="shutting_down")
        return None

    def _finish_log(self, builders: list[Any] | None = None, streamed: bool = False) -> None:
        firsts = [o.first_token_time for o in self.outcomes if o.first_token_time is not None]
        self.log["ttft_s"] = round(min(firsts) - self.started, 4) if firsts else None
        abort_reasons = [o.abort_reason for o in self.outcomes if o.abort_reason is not None]
        if abort_reasons:
            self.log["aborted"] = abort_reasons[0]
        if builders is not None:
            usage = self.usage(builders)
            self.log.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            self.log["finish_reasons"] = [b.finish_reason for b in builders]
            if self.state.settings.log_requests_text:
                self.log["prompts"] = [p.text for p in self.prompts]
                self.log["completions"] = [b.text for b in builders]
            if SPAN_KEY in self.request.scope:  # tracing is on
                self._trace(usage, [b.finish_reason for b in builders], min(firsts, default=None), streamed)

    def _trace(self, usage: UsageInfo, finish_reasons: list[str | None], first_token_time: float | None,
               streamed: bool) -> None:
        waits = [o.metrics.first_scheduled_time - o.metrics.arrival_time for o in self.outcomes
                 if o.metrics is not None and o.metrics.first_scheduled_time is not None]
        chat = self.request.scope["path"].endswith("/chat/completions")
        record_generation(self.request.scope, operation="chat" if chat else "text_completion",
                          model=self.state.model_name, params=self.params[0], stream=streamed,
                          response_id=self.response_id,
                          prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                          finish_reasons=finish_reasons, started=self.started, first_token_time=first_token_time,
                          queue_time=min(waits, default=None))

    async def collect(self, on_output: Callable[[int, RequestOutput], list[Any]], builders: list[Any]) -> bool:
        """Run to completion (True); a client that disconnects meanwhile aborts the engine requests (False)."""

        async def consume() -> None:
            outputs = self._outputs()
            try:
                async for index, out in outputs:
                    on_output(index, out)
            finally:
                await outputs.aclose()

        completed = await _until_disconnect(self.request, consume())
        self._finish_log(builders)
        if not completed:
            return False
        failure = self._failure()
        if failure is not None:
            raise failure
        return True

    async def stream(self, on_output: Callable[[int, RequestOutput], list[Any]],
                     make_chunk: Callable[..., BaseModel], include_usage: bool, builders: list[Any],
                     first_chunk: BaseModel | None = None) -> StreamingResponse:
        """An SSE response that starts at once, while the request may still wait in the queue: the client
        has its headers, and one that leaves before its first token is noticed (Starlette watches for the
        disconnect) and its engine request aborted. Errors after the start arrive as an error event."""

        async def events() -> AsyncIterator[str]:
            outputs = self._outputs()
            try:
                if first_chunk is not None:
                    yield _sse(first_chunk)
                try:
                    async for index, out in outputs:
                        choices = on_output(index, out)
                        if choices:
                            yield _sse(make_chunk(choices))
                    failure = self._failure()
                except APIError as exc:
                    failure = exc
                if failure is not None:
                    yield f"data: {_json(error_body(failure.status, failure.message, code=failure.code))}\n\n"
                elif include_usage:
                    yield _sse(make_chunk([], usage=self.usage(builders)))
                yield "data: [DONE]\n\n"
            finally:
                await outputs.aclose()
                self._finish_log(builders, streamed=True)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_disconnect(request: Request, work: Awaitable[None]) -> bool:
    """Await `work` (True), cancelling it if the client disconnects first (False)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # re-raise what the work raised
    return True


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
