"""From validated request to engine outputs: tokenize and check prompts, run engine requests
(with timeout, abort on close, metrics), and merge several prompts' streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.async_engine import EngineDeadError
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from service.errors import APIError
from service.metrics import SUCCESS_REASONS
from service.state import ServerState


@dataclass
class Prompt:
    """One prompt ready for the engine."""

    token_ids: list[int]
    max_tokens: int
    text: str | None = None  # the prompt text, when the client sent text


@dataclass
class RunOutcome:
    """How an engine request ended, filled in as it runs (read by the route after the stream ends)."""

    timed_out: bool = False
    aborted: bool = False
    abort_reason: str | None = None  # one of metrics.ABORT_REASONS once aborted
    finish_reasons: dict[int, str] = field(default_factory=dict)
    first_token_time: float | None = None
    metrics: RequestMetrics | None = None  # the engine's timestamps, once it has answered

    def record_finish(self, state: ServerState, index: int, reason: str) -> None:
        """Count a sample's end once: a success for stop/length, else an abort with its cause."""
        if index in self.finish_reasons:
            return
        self.finish_reasons[index] = reason
        if reason in SUCCESS_REASONS:
            state.metrics.observe_finished_sequence(reason)
            return
        self.aborted = True
        if self.abort_reason is None:
            # The engine ends a request early only when told to: by the request timeout or the drain.
            self.abort_reason = "timeout" if self.timed_out else "shutdown"
        state.metrics.observe_aborted(self.abort_reason)


def tokenize_prompt(state: ServerState, prompt: str | list[int], add_special_tokens: bool = True) -> Prompt:
    """Token ids of a text or id prompt, checked against the vocabulary; max_tokens is set later."""
    tokenizer = state.require_engine().tokenizer
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        text: str | None = prompt
    else:
        ids, text = list(prompt), None
        bad = [t for t in ids if t >= tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {tokenizer.vocab_size})",
                           param="prompt")
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    return Prompt(token_ids=ids, max_tokens=0, text=text)


COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM do


def fit_context(state: ServerState, prompt: Prompt, requested_max_tokens: int | None, param: str, *,
                default_max_tokens: int | None, zero_allowed: bool = False) -> Prompt:
    """Set the prompt's max_tokens: as asked if it fits the context, else 400 with the numbers. Unasked, it is
    `default_max_tokens` (None: the rest of the context), capped by --max-tokens-default and by the room left."""
    max_len = state.require_engine().max_model_len
    n_prompt = len(prompt.token_ids)
    if requested_max_tokens == 0 and not zero_allowed:
        raise APIError(400, f"{param} must be at least 1 (0 is accepted only by /v1/completions with echo: true, "
                            "which returns the prompt, with its logprobs if asked, and generates nothing)", param=param)
    if n_prompt >= max_len:  # even max_tokens 0 needs room: the engine samples one token, then it is dropped
        raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has "
                            f"{n_prompt} tokens, leaving no room for a completion.", param=param,
                       code="context_length_exceeded")
    if requested_max_tokens is None:
        caps = (default_max_tokens, state.settings.max_tokens_default, max_len - n_prompt)
        prompt.max_tokens = min(cap for cap in caps if cap is not None)
    elif n_prompt + requested_max_tokens > max_len:
        raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{n_prompt + requested_max_tokens} tokens ({n_prompt} in the prompt, "
                            f"{requested_max_tokens} for the completion).", param=param,
                       code="context_length_exceeded")
    else:
        prompt.max_tokens = requested_max_tokens
    return prompt


def check_token_params(state: ServerState, params: SamplingParams) -> None:
    """Token ids inside sampling parameters must exist in the vocabulary."""
    vocab = state.require_engine().tokenizer.vocab_size
    for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise APIError(400, f"{name}: token id {bad[0]} is out of range (vocabulary size {vocab})", param=name)


async def run_engine(state: ServerState, request_id: str, prompt: Prompt, params: SamplingParams,
                     outcome: RunOutcome) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one prompt. Closing this iterator (client gone) or the request
    timeout aborts the engine request, which frees its KV blocks."""
    engine = state.require_engine().engine
    loop = asyncio.get_running_loop()
    timer = None
    if state.settings.request_timeout is not None:
        def _expire() -> None:
            outcome.timed_out = True
            engine.abort(request_id)
        timer = loop.call_later(state.settings.request_timeout, _expire)
    state.track(request_id)
    arrival = time.monotonic()
    last_token_at: dict[int, float] = {}
    generated: dict[int, int] = {}
    last: RequestOutput | None = None
    finished = False
    try:
        stream = engine.generate(request_id, prompt.token_ids, params)
        try:
            async for out in stream:
                now = time.monotonic()
                for choice in out.outputs:
                    new = len(choice.delta_token_ids)
                    if new:
                        state.mark_started(request_id)
                        if outcome.first_token_time is None:
                            outcome.first_token_time = now
                        if choice.index in last_token_at:
                            state.metrics.observe_itl(now - last_token_at[choice.index], new)
                        last_token_at[choice.index] = now
                        generated[choice.index] = generated.get(choice.index, 0) + new
                    if choice.finish_reason is not None:
                        outcome.record_finish(state, choice.index, choice.finish_reason)
                last = out
                finished = out.finished
                yield out
                if finished:
                    break
        except ValueError as exc:
            if last is not None:
                raise
            raise APIError(400, str(exc)) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
    finally:
        if timer is not None:
            timer.cancel()
        if not finished:
            engine.abort(request_id)
            # The consumer left before the engine's final output (the client went away, while queued or
            # mid-stream): count the unfinished samples here.
            if outcome.abort_reason is None:
                outcome.abort_reason = "client_disconnected"
            for index in range(params.n):
                outcome.record_finish(state, index, "abort")
        state.untrack(request_id)
        if last is not None:
            outcome.metrics = last.metrics
            state.metrics.observe_request(len(prompt.token_ids), sum(generated.values()), last.metrics,
                                          time.monotonic() - arrival)


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several prompts' streams as (prompt index, output); closing it closes them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
            await queue.put((index, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
