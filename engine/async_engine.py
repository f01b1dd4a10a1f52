"""AsyncEngine: one background thread runs LLMEngine.step() in a loop; asyncio consumers get deltas."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from engine.engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.pooling import EmbeddingParams
from engine.sampling_params import SamplingParams

log = logging.getLogger("kvserve.engine")


class EngineDeadError(RuntimeError):
    """The step loop crashed or was shut down; no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()  # (request_id, prompt, ids, params)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._num_pending = 0

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine], on_step: Callable[[int], None] | None = None) -> AsyncEngine:
        """Build the engine on a new thread that then runs its step loop (see build_then_run); return once built."""
        built: Future[AsyncEngine] = Future()
        threading.Thread(target=cls.build_then_run, args=(build, built), name="kvserve-engine", daemon=True).start()
        async_engine = built.result()
        async_engine.on_step = on_step
        return async_engine

    @classmethod
    def build_then_run(cls, build: Callable[[], LLMEngine], built: Future[AsyncEngine]) -> None:
        """On the calling thread: build the engine, hand it (or the error) to `built`, then run the step loop
        until shutdown.

        Why the same thread: on CPU each thread that runs a parallel torch op keeps its own OpenMP team, and
        with more OpenMP threads alive than cores, libgomp's idle workers stop spin-waiting and sleep, so
        each of the thousands of parallel regions in a step pays a wake-up. A model loaded in one long-lived
        thread and stepped in another halved decode speed (SmolLM2 on 2 cores: 23 vs 42 tok/s at batch 1).
        """
        if not built.set_running_or_notify_cancel():  # the caller gave up (a server stopped while starting)
            return
        try:
            async_engine = cls(build())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            built.set_exception(exc)
            return
        async_engine._thread = threading.current_thread()
        built.set_result(async_engine)
        async_engine._run()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    async def shutdown(self) -> None:
        """Abort everything and stop the loop thread."""
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        stats.num_waiting += self._num_pending
        return stats

    def num_unfinished(self) -> int:
        return len(self._streams)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wakeup.set()

    def check(self, prompt: str | list[int], params: SamplingParams) -> None:
        """Raise the ValueError generate() would raise for this prompt, without queuing anything.

        A server calls it before it answers 200: a streamed response can then start at once, even while
        the request waits in the queue, and invalid requests still get a 4xx.
        """
        self.engine.prepare_prompt(prompt, params)

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams | EmbeddingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step (an embedding request: one, when pooled); closing the
        iterator early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.engine.prepare_prompt(prompt, params)  # ValueError before anything is queued
        if params.structured_output is not None:
            # Compile in a worker thread (GrammarError, a ValueError, if it cannot be enforced): a large schema
            # must not stall the step loop; add_request then finds it in the cache.
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_output)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._num_pending += 1
        self._incoming.put((request_id, prompt, ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # ---- the loop thread ------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call.

        One wake-up of the loop per step instead of one per request: each wake-up is a write to the loop's
        self-pipe and a turn of the loop, which at 64 requests took a share of the two cores from the step.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            target = self._streams.get(output.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _admit(self) -> None:
        while True:
            try:
                request_id, prompt, ids, params = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._num_pending -= 1
            try:
                self.engine.add_request(request_id, prompt, params, prompt_ids=ids)
            except ValueError as exc:
                self._deliver(request_id, exc)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._admit()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                if self.on_step is not None and self.engine.last_step_tokens:
                    self.on_step(self.engine.last_step_tokens)
                self._deliver_step(outputs)
        except BaseException as exc:  # noqa: BLE001 - any crash must reach the waiting requests
            log.exception("engine loop crashed")
            self._error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop crashed: {exc!r}"))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put_nowait(output)
