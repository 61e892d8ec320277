"""The application factory: `uvicorn --factory app.main:create_app`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine

from app import problems
from app.api import rewards, solitaire, webhooks
from app.api.admin import (
    deliveries,
    funnels,
    groups,
    keys,
    members,
    reports,
    webhook_sources,
    wechat,
)
from app.api.admin import groupbuy as admin_groupbuy
from app.api.admin import referral as admin_referral
from app.api.health import router as health_router
from app.api.member import groupbuy as member_groupbuy
from app.api.member import me, session
from app.api.member.fast import MemberFastPath
from app.clock import Clock, SystemClock
from app.config import Settings, get_settings
from app.console import routes as console
from app.db import WalCheckpointer, engine_for, in_memory
from app.engine.definition import FunnelDefinition
from app.events.dispatch import Dispatcher
from app.events.schemas import openapi_components
from app.events.sources import SourceCache
from app.events.writer import WriterProcess
from app.heap import freeze_startup_heap
from app.limits import BodyLimitMiddleware, RateLimiter
from app.observability import Metrics, RequestLogMiddleware, configure_logging
from app.workers import Workers

DESCRIPTION = """AARRR funnel campaigns for community commerce.

Admin endpoints take the tenant API key as `Authorization: Bearer fw_…`; member endpoints
take a member token. Every error is `application/problem+json` (RFC 9457) with the JSON
path of each field at fault in `errors`."""


def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, engine: Engine | None = None
) -> FastAPI:
    settings = settings or get_settings()
    own_engine = engine is None  # a writer process can open its own only from the settings
    engine = engine or engine_for(settings)  # lazy: nothing connects until the first request
    clock = clock or SystemClock()
    metrics = Metrics()
    workers = Workers(engine, settings, clock, metrics)
    workers.install_gauges()
    dispatcher = Dispatcher(
        engine,
        clock,
        metrics,
        writers=settings.writers,
        max_batch=settings.dispatch_max_batch,
        on_commit=lambda replies: workers.notify() if any(r.actions for r in replies) else None,
        lanes=_writer_processes(settings) if own_engine else None,
    )
    checkpointer = _checkpointer(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        dispatcher.open()
        if checkpointer is not None:
            checkpointer.start()
        freeze_startup_heap()
        stop = asyncio.Event()
        task = asyncio.create_task(workers.run(stop)) if settings.workers == "on" else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task
            dispatcher.close()
            if checkpointer is not None:
                checkpointer.stop()
            engine.dispose()

    app = FastAPI(title="Flywheel", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.engine, app.state.clock = settings, engine, clock
    app.state.metrics, app.state.workers, app.state.dispatcher = metrics, workers, dispatcher
    app.state.sources = SourceCache(engine)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    problems.install(app)
    for router in (
        health_router,
        funnels.router,
        keys.router,
        members.router,
        webhook_sources.router,
        deliveries.router,
        wechat.router,
        webhooks.router,
        me.router,
        session.router,
        member_groupbuy.router,
        admin_groupbuy.router,
        admin_referral.router,
        solitaire.admin,
        solitaire.member,
        groups.router,
        groups.broadcasts,
        rewards.member,
        rewards.admin,
        reports.router,
        console.router,
        console.links,
    ):
        app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    # innermost: inside the body limit and the request log
    app.add_middleware(MemberFastPath)
    app.add_middleware(webhooks.WebhookFastPath)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _writer_processes(settings: Settings) -> list[WriterProcess] | None:
    """A writer process per lane, unless told to write in this process (or the database
    lives only in this process's memory)."""
    if settings.dispatch_mode != "process" or in_memory(settings.database_url):
        return None
    return [WriterProcess(settings, f"flywheel-writer-{i}") for i in range(settings.writers)]


def _checkpointer(engine: Engine, settings: Settings) -> WalCheckpointer | None:
    """A SQLite file's WAL is copied into it by a thread of the service (app.db), whichever
    process writes."""
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name != "sqlite" or in_memory(url) or not settings.sqlite_checkpoint_seconds:
        return None
    return WalCheckpointer(url, settings.sqlite_checkpoint_seconds)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document, plus the funnel definition schema the raw-body routes refer to."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    definition = FunnelDefinition.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definition.pop("$defs", {}))
    components["FunnelDefinition"] = definition
    components.update(openapi_components())
    problems.document(schema)
    app.openapi_schema = schema
    return schema
