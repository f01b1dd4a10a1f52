"""What the routes share: settings, metrics, the engine once loaded, and the drain state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("kvserve.service")


class AsyncEngineLike(Protocol):
    """What the service needs of engine.AsyncEngine (a fake in unit tests)."""

    is_alive: bool

    def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[
        RequestOutput]: ...

    def check(self, prompt: str | list[int], params: SamplingParams) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


@dataclass
class LoadedModel:
    """The running engine with what the routes need beside it."""

    engine: AsyncEngineLike
    tokenizer: Any  # engine.tokenizer.Tokenizer
    max_model_len: int
    embedding_size: int | None = None  # the hidden size: the length of /v1/embeddings vectors
    grammars: Any = None  # engine.grammar.GrammarCompiler: the service compiles structured outputs with it


@dataclass
class ServerState:
    """One per app, at app.state.kvserve."""

    settings: Settings
    metrics: ServiceMetrics
    loaded: LoadedModel | None = None
    load_error: str | None = None
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)
    # engine request id -> whether it has produced its first token (False: still queued or prefilling)
    in_flight: dict[str, bool] = field(default_factory=dict)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def ready(self) -> bool:
        return self.loaded is not None and not self.draining and self.loaded.engine.is_alive

    def require_engine(self) -> LoadedModel:
        """The loaded model, or a 503 while loading, draining or after the engine loop died."""
        if self.draining:
            raise APIError(503, "server is shutting down", code="shutting_down")
        if self.loaded is None:
            reason = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            raise APIError(503, reason, code="model_loading", headers={"Retry-After": "5"})
        if not self.loaded.engine.is_alive:
            raise APIError(503, "engine loop is not running", code="engine_dead")
        return self.loaded

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is omitted or names the served model."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def admit(self, num_requests: int) -> None:
        """429 when the queue of not-yet-started requests is full (max_waiting_requests)."""
        engine = self.require_engine().engine
        queued = sum(1 for started in self.in_flight.values() if not started)
        waiting = max(queued, engine.stats().num_waiting)
        if waiting >= self.settings.max_waiting_requests:
            raise APIError(429, f"too many requests waiting ({waiting}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})

    def track(self, request_id: str) -> None:
        self.in_flight[request_id] = False
        self._idle.clear()

    def mark_started(self, request_id: str) -> None:
        if request_id in self.in_flight:
            self.in_flight[request_id] = True

    def untrack(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)
        if not self.in_flight:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to `timeout` s, then abort the rest."""
        self.draining = True
        if self.in_flight:
            log.info("draining", extra={"fields": {"in_flight": len(self.in_flight), "timeout_s": timeout}})
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown timeout reached; aborting", extra={"fields": {"aborted": len(self.in_flight)}})
                if self.loaded is not None:
                    for request_id in list(self.in_flight):
                        self.loaded.engine.abort(request_id)
                # Give handlers a moment to send their final (aborted) responses.
                try:
                    await asyncio.wait_for(self._idle.wait(), 5.0)
                except TimeoutError:
                    pass


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's ServerState."""
    return request.app.state.kvserve
