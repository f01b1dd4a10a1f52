"""create_app(settings): the FastAPI app. The model loads in the background after startup, so
/health answers at once and /ready turns 200 when the engine runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from service.auth import require_api_key
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import RequestContextMiddleware
from service.routes import inspect as inspect_routes
from service.routes import openai as openai_routes
from service.routes import ops as ops_routes
from service.settings import Settings
from service.state import LoadedModel, ServerState

log = logging.getLogger("kvserve.service")


def load_model(settings: Settings, metrics: ServiceMetrics) -> LoadedModel:
    """Build the engine from settings and start its step loop (blocking; run it in a thread)."""
    from engine import AsyncEngine, EngineConfig, LLMEngine

    config = EngineConfig(**settings.engine_config_kwargs())
    async_engine = AsyncEngine.launch(lambda: LLMEngine(settings.model, config, progress=False),
                                      on_step=metrics.observe_step)
    engine = async_engine.engine
    if settings.chat_template is not None:
        engine.tokenizer.set_chat_template(settings.chat_template)
    log.info("engine built", extra={"fields": {"device": engine.device, "dtype": str(engine.dtype).removeprefix("torch."),
                                               "quantization": engine.quantization,
                                               "kv_cache_blocks": len(engine.blocks.blocks)}})
    return LoadedModel(engine=async_engine, tokenizer=engine.tokenizer, max_model_len=engine.max_model_len,
                       grammars=engine.grammars)


def create_app(settings: Settings | None = None, *, loaded: LoadedModel | None = None) -> FastAPI:
    """The kvserve app. `loaded` skips model loading (tests pass a ready engine)."""
    settings = settings or Settings()
    metrics = ServiceMetrics(settings.model_name)
    state = ServerState(settings=settings, metrics=metrics, loaded=loaded)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = None if loaded is not None else asyncio.create_task(_load(state))
        try:
            yield
        finally:
            if not state.draining:
                await state.drain(settings.shutdown_timeout)
            if loader is not None and not loader.done():
                loader.cancel()  # the loading thread itself runs on; the process is exiting
            if state.loaded is not None:
                await state.loaded.engine.shutdown()

    app = FastAPI(title="kvserve", summary="OpenAI-compatible LLM server with a paged KV cache",
                  version=ops_routes.package_version(), lifespan=lifespan)
    app.state.kvserve = state
    install_error_handlers(app)
    keyed = [Depends(require_api_key)]
    app.include_router(openai_routes.router, dependencies=keyed)
    app.include_router(ops_routes.tokenizer_router, dependencies=keyed)
    app.include_router(ops_routes.router)
    app.include_router(inspect_routes.router, dependencies=keyed)
    _document_400_not_422(app)
    app.add_middleware(RequestContextMiddleware, max_request_bytes=settings.max_request_bytes,
                       on_error=metrics.observe_error)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Invalid bodies get 400 here (OpenAI's status), so the schema must not promise FastAPI's 422."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _load(state: ServerState) -> None:
    log.info("loading model", extra={"fields": {"model": state.settings.model}})
    try:
        state.loaded = await asyncio.to_thread(load_model, state.settings, state.metrics)
    except Exception as exc:  # noqa: BLE001 - reported by /health and every request as a 503
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model failed to load", extra={"fields": {"error": state.load_error}})
        return
    log.info("model ready", extra={"fields": {"model": state.model_name,
                                              "max_model_len": state.loaded.max_model_len}})
