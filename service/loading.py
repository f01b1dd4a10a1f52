"""Loading the model: on the engine's own thread, started by `kvserve serve` before the web stack is imported.

The engine thread imports torch and builds, packs and warms up the model, largely in native code that
releases the GIL, while the main thread imports FastAPI and the routes and starts uvicorn; one after the
other they took 2.1 s of a 2-core machine's start. So this module imports nothing heavy at its top.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

from service.settings import Settings

if TYPE_CHECKING:
    from engine import AsyncEngine, LLMEngine

log = logging.getLogger("kvserve.service")


def start_loading(settings: Settings) -> Future[AsyncEngine]:
    """Start the engine thread: it builds the engine, resolves the future with it (or the error), then steps it."""
    built: Future[AsyncEngine] = Future()

    def load_then_run() -> None:
        try:
            from engine import AsyncEngine
        except BaseException as exc:  # noqa: BLE001 - handed to the server, which reports it
            if built.set_running_or_notify_cancel():
                built.set_exception(exc)
            return
        AsyncEngine.build_then_run(lambda: build_engine(settings), built)

    threading.Thread(target=load_then_run, name="kvserve-engine", daemon=True).start()
    return built


def build_engine(settings: Settings) -> LLMEngine:
    """The engine the settings describe, warmed up (run it on the thread that will step the engine)."""
    from engine import EngineConfig, LLMEngine
    from engine.warmup import warm_up

    engine = LLMEngine(settings.model, EngineConfig(**settings.engine_config_kwargs()), progress=False)
    if settings.chat_template is not None:
        engine.tokenizer.set_chat_template(settings.chat_template)
    # Before /ready says yes, so the first client's request is not the one paying for cold kernels.
    seconds = warm_up(engine)
    engine.make_kv_cache_resident()
    log.info("engine built and warmed up", extra={"fields": {
        "device": engine.device, "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": engine.quantization, "kv_cache_blocks": len(engine.blocks.blocks),
        # as chosen for the kernels where --speculative-config leaves it (engine/speculative.py: for_kernels)
        "speculative_config": engine.speculative and dataclasses.asdict(engine.speculative),
        "warmup_s": round(seconds, 3)}})
    return engine
