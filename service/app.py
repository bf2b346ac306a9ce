"""The application factory: assembles settings, resources, routes, CORS and middleware."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from . import api, demo_token, docs_page, handlers, openapi
from .access_log import access_log_middleware
from .admission import Admission
from .connection_stats import ConnectionStats
from .errors import error_middleware
from .http_version import http_version_middleware
from .jitter import jitter_retry_after
from .keys import Keys
from .protocol import handler_args
from .rate_limit import RateLimits
from .redis.connections import RedisOpener, open_redis
from .resources import (
    Lifecycle,
    admission_key,
    canary_ctx,
    connection_stats_key,
    core_ctx,
    drain_streams,
    keys_key,
    lifecycle_key,
    metrics_ctx,
    rate_limits_key,
    redis_opener_key,
    settings_key,
    stream_services_ctx,
    tokens_ctx,
)
from .response_headers import set_response_headers
from .settings import Settings


def create_app(settings: Settings, open_client: RedisOpener = open_redis) -> web.Application:
    """Build the worker's app; resources open on startup and close on cleanup, in reverse.

    `open_client` is the seam tests use to put several apps on one shared in-memory Redis.
    """
    app = web.Application(
        middlewares=[access_log_middleware, error_middleware, http_version_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args=handler_args(),
    )
    app[settings_key] = settings
    app[redis_opener_key] = open_client
    app[keys_key] = Keys(settings.key_prefix)
    app[lifecycle_key] = Lifecycle()
    app[admission_key] = Admission(settings.max_connections, settings.max_connections_per_session)
    app[rate_limits_key] = RateLimits.from_settings(settings)
    app[connection_stats_key] = ConnectionStats()
    app.cleanup_ctx.append(tokens_ctx)
    app.cleanup_ctx.append(core_ctx)
    app.cleanup_ctx.append(metrics_ctx)
    app.cleanup_ctx.append(canary_ctx)
    app.cleanup_ctx.append(stream_services_ctx)
    app.on_shutdown.append(drain_streams)
    _add_routes(app, settings)
    return app


def _add_routes(app: web.Application, settings: Settings) -> None:
    cors = aiohttp_cors.setup(
        app,
        defaults={
            origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
                # Never with "*": settings refuse that combination.
                allow_credentials=settings.cors_credentials,
                expose_headers="*",
                allow_headers="*",
                allow_methods=["GET", "POST", "DELETE"],
            )
            for origin in settings.cors_origins
        },
    )
    routes = [
        # No HEAD on these: answering one would issue a session or start a run, and a stream's
        # direct socket writes would put a body after the head (see stream.py): 405 instead.
        web.get("/sse/getSessionId", handlers.get_session_id, allow_head=False),
        web.get("/sse/connect", handlers.connect, allow_head=False),
        web.get("/", handlers.index),
        web.get(r"/{name:app\.js|style\.css}", handlers.web_asset),
        web.get("/healthz", handlers.healthz),
        web.get("/readyz", handlers.readyz),
        web.get("/metrics", handlers.serve_metrics),
        web.post("/sse/sessions/{sessionId}/events", api.publish_events),
        web.get("/sse/sessions/{sessionId}", api.session_status),
        web.delete("/sse/sessions/{sessionId}", api.delete_session),
        web.get("/openapi.json", openapi.openapi_json),
        web.get("/docs", docs_page.docs),
    ]
    if settings.embedded_redis:
        routes.append(web.post("/dev/token", demo_token.mint_demo_token))
    for route in app.router.add_routes(routes):
        cors.add(route)
    app.on_response_prepare.append(set_response_headers)
    app.on_response_prepare.append(jitter_retry_after(settings.retry_spread))
