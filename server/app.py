"""The FastAPI app: ``create_app(config, engine)``.

``engine`` is either a started vLLM ``AsyncLLM`` (tests, embedding) or a zero-argument callable
that builds one. With a callable, the lifespan starts the build in a worker thread and returns at
once, so the port answers /health (200) and /ready (503) during the 20-40 s an engine takes to
start; the app owns that engine and shuts it down. On shutdown the app stops admitting (503),
gives in-flight requests ``drain_timeout_s`` to finish (uvicorn's graceful shutdown holds the
connections for the same time) and aborts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from server.config import ServerConfig
from server.engine import SpecSetup, build_engine, resolve_spec
from server.errors import install_error_handlers
from server.routes import admin, chat, completions, health, models, observability, tokenize
from server.state import ServerState
from server.swap import Swapper
from vllm_lk import __version__

logger = logging.getLogger(__name__)


class RequestCounter:
    """ASGI middleware: count every HTTP response by route template and status code (the route,
    not the raw path, keeps the label set bounded whatever paths clients send)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            code = status["code"] or 499  # nothing sent: the client left first
            self.state.metrics.requests.labels(endpoint, str(code)).inc()


async def _build(state: ServerState, factory: Callable[[], Any]) -> None:
    started = time.monotonic()
    try:
        engine = await asyncio.to_thread(factory)
    except BaseException as err:  # noqa: BLE001 - recorded; /health turns 503 and the runner exits
        logger.exception("the engine failed to start")
        state.failed = err
        return
    state.owned_engines.append(engine)
    state.attach(engine)
    logger.info("engine started in %.1f s", time.monotonic() - started)


async def _drain(state: ServerState) -> None:
    """Stop admitting, wait for in-flight requests up to the drain timeout, abort what remains."""
    state.draining = True
    deadline = time.monotonic() + state.config.drain_timeout_s
    while state.admission.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.active_requests:
        logger.warning("drain timeout: aborting %d engine requests", len(state.active_requests))
        by_engine: dict[int, tuple[Any, list[str]]] = {}
        for request_id, engine in state.active_requests.items():
            by_engine.setdefault(id(engine), (engine, []))[1].append(request_id)
        for engine, request_ids in by_engine.values():
            with contextlib.suppress(Exception):
                await engine.abort(request_ids)


def _openapi_as_served(app: FastAPI):
    """FastAPI documents a 422 for every body route; this server answers 400 (as OpenAI does), so
    the document says so and nothing else — the schema fuzzer holds the server to it."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(config: ServerConfig, engine: Any, *, spec: SpecSetup | None = None,
               engine_factory: Callable[[SpecSetup], Any] | None = None, drafter_build: Any = None) -> FastAPI:
    """The app over ``engine`` (a started AsyncLLM, or a callable that builds one).
    ``engine_factory(spec)`` builds the engines of drafter swaps (default: ``build_engine``);
    ``drafter_build`` (server.drafter_build.DefaultDrafterBuild) builds a drafter in the
    background once the engine serves, and swaps it in."""
    state = ServerState(config, spec if spec is not None else resolve_spec(config))
    owns_engine = callable(engine)
    swapper = Swapper(state, engine_factory or functools.partial(build_engine, config))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if owns_engine:
            state.spawn(_build(state, engine))
        else:
            state.attach(engine)
        if drafter_build is not None:
            state.spawn(drafter_build.run(state, swapper))
        try:
            yield
        finally:
            if drafter_build is not None:
                drafter_build.stop()
            await _drain(state)
            if swapper.retiring is not None:
                swapper.retiring.cancel()
            for owned in state.owned_engines:  # built here, at start or by drafter swaps
                logger.info("shutting the engine down")
                owned.shutdown()
            if state.capture is not None:
                state.capture.close()

    app = FastAPI(
        title="vllm-lk", version=__version__, lifespan=lifespan,
        description="OpenAI-compatible completions and chat over vLLM with exact speculative decoding; every "
        "response's usage carries the request's speculative stats (drafted, accepted, acceptance length, "
        "per-position acceptance).",
    )
    app.state.server = state
    app.state.swapper = swapper
    install_error_handlers(app)
    for module in (completions, chat, models, tokenize, health, observability):
        app.include_router(module.router)
    if state.admin_key is not None:
        app.include_router(admin.router)
    app.add_middleware(RequestCounter, state=state)
    app.openapi = _openapi_as_served(app)
    return app
