"""Run the app under uvicorn with kvserve's SIGTERM drain: readiness goes false and new requests
get 503 at once, in-flight requests finish (up to shutdown_timeout, then abort), exit status 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from concurrent.futures import Future
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.app import create_app
from service.settings import Settings
from service.state import ServerState

if TYPE_CHECKING:
    from engine import AsyncEngine

log = logging.getLogger("kvserve.service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains before uvicorn's own shutdown starts."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.kvserve_state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None:
            super().handle_exit(sig, frame)  # Ctrl-C: uvicorn's behaviour
            return
        if self.kvserve_state.draining:
            self.should_exit = True  # a second SIGTERM: stop waiting
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it at exit and the status would not be 0.
        self.kvserve_state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        log.info("SIGTERM: draining", extra={"fields": {"in_flight": len(self.kvserve_state.in_flight)}})
        await self.kvserve_state.drain(self.kvserve_state.settings.shutdown_timeout)
        self.should_exit = True


def run_server(settings: Settings, loading: Future[AsyncEngine] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. `loading`: the model's load, when the caller started it already."""
    app = create_app(settings, loading=loading)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    DrainingServer(config, app.state.kvserve).run()
