"""create_app(settings): the FastAPI app. The model loads in the background after startup, so
/health answers at once and /ready turns 200 when the engine runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from service.auth import require_api_key
from service.errors import install_error_handlers
from service.guards import ApiKeyGate, BodyDeadline
from service.loading import start_loading
from service.metrics import ServiceMetrics
from service.middleware import LOG_FIELDS_KEY, RequestContextMiddleware
from service.routes import embeddings as embeddings_routes
from service.routes import home as home_routes
from service.routes import inspect as inspect_routes
from service.routes import openai as openai_routes
from service.routes import ops as ops_routes
from service.settings import Settings
from service.state import LoadedModel, ServerState
from service.tracing import TracingMiddleware, build_tracer_provider

if TYPE_CHECKING:
    from engine import AsyncEngine

log = logging.getLogger("kvserve.service")


def loaded_model(async_engine: AsyncEngine, metrics: ServiceMetrics) -> LoadedModel:
    """What the routes need of a built engine; its steps feed the metrics from now on."""
    async_engine.on_step = metrics.observe_step
    engine = async_engine.engine
    return LoadedModel(engine=async_engine, tokenizer=engine.tokenizer, max_model_len=engine.max_model_len,
                       embedding_size=engine.model_config.hidden_size, grammars=engine.grammars)


def create_app(settings: Settings | None = None, *, loaded: LoadedModel | None = None,
               loading: Future[AsyncEngine] | None = None, tracer_provider: Any = None) -> FastAPI:
    """The kvserve app. `loaded` skips model loading (tests pass a ready engine); `loading` is a load already
    started (service.loading.start_loading), else the app starts one at startup; `tracer_provider` (an
    OpenTelemetry SDK TracerProvider) turns tracing on with it instead of --otlp-traces-endpoint's."""
    settings = settings or Settings()
    owns_provider = tracer_provider is None and settings.otlp_traces_endpoint is not None
    if owns_provider:
        tracer_provider = build_tracer_provider(settings.otlp_traces_endpoint)
    metrics = ServiceMetrics(settings.model_name)
    state = ServerState(settings=settings, metrics=metrics, loaded=loaded)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = None if loaded is not None else asyncio.create_task(_load(state, loading))
        try:
            yield
        finally:
            if not state.draining:
                await state.drain(settings.shutdown_timeout)
            if loader is not None and not loader.done():
                loader.cancel()  # the loading thread itself runs on; the process is exiting
            if state.loaded is not None:
                await state.loaded.engine.shutdown()
            if owns_provider:
                await asyncio.to_thread(tracer_provider.shutdown)  # sends the spans still batched

    # FastAPI's /docs loads Swagger UI from a CDN; fastapi-offline serves the copy it ships. No /redoc: ReDoc
    # fetches its logo from its CDN whatever the options, and Swagger UI shows the same schema.
    app = FastAPIOffline(title="kvserve", summary="OpenAI-compatible LLM server with a paged KV cache",
                         version=ops_routes.package_version(), lifespan=lifespan, favicon_url="/favicon.svg",
                         static_url="/docs-static", redoc_url=None)
    app.state.kvserve = state
    install_error_handlers(app)
    keyed_routers = (openai_routes.router, embeddings_routes.router, ops_routes.tokenizer_router,
                     inspect_routes.router)
    for router in keyed_routers:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(ops_routes.router)
    app.include_router(home_routes.router)
    _document_400_not_422(app)
    # Starlette runs the last added outermost: context (ids, limits, log), then the key, then the body
    # deadline, then tracing (inside RequestContextMiddleware, so its log line gets the trace id).
    if tracer_provider is not None:
        app.add_middleware(TracingMiddleware, tracer_provider=tracer_provider, log_fields_key=LOG_FIELDS_KEY)
    app.add_middleware(BodyDeadline, timeout=settings.request_body_timeout)
    # API routes only: the inspect page and its assets stay open (the page sends the key itself).
    keyed_routes = [route for router in keyed_routers for route in router.routes if isinstance(route, APIRoute)]
    app.add_middleware(ApiKeyGate, routes=keyed_routes, keys=settings.api_keys)
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


async def _load(state: ServerState, loading: Future[AsyncEngine] | None) -> None:
    log.info("loading model", extra={"fields": {"model": state.settings.model}})
    try:
        engine = await asyncio.wrap_future(loading or start_loading(state.settings))
        state.loaded = loaded_model(engine, state.metrics)
    except Exception as exc:  # noqa: BLE001 - reported by /health and every request as a 503
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model failed to load", extra={"fields": {"error": state.load_error}})
        return
    log.info("model ready", extra={"fields": {"model": state.model_name,
                                              "max_model_len": state.loaded.max_model_len}})
