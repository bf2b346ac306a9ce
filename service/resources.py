"""What an app owns, under typed keys, and the cleanup contexts that open and close it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from .admission import Admission
from .canary import Canary, CanaryCollector
from .connect import StreamServices
from .connection_stats import ConnectionStats
from .drain_pacing import (
    farewell_frame,
    finished_first,
    finished_sessions,
    pace,
    shutdown_grace_s,
)
from .hub import Hub
from .keys import Keys
from .leak_metrics import LeakCollector
from .mailbox import StreamEnd
from .metrics import ServiceCollector, StreamMetrics, build_registry
from .producer import Producer
from .publisher import Publisher
from .rate_limit import RateLimitCollector, RateLimits
from .redis.connections import RedisClient, RedisOpener
from .sessions import SessionStore
from .settings import Settings
from .token_keys import SigningKey, load_key_ring, new_demo_key, verify_key_of
from .tokens import TokenVerifier
from .wiring import open_core

settings_key = web.AppKey("settings_key", Settings)
redis_opener_key = web.AppKey("redis_opener_key", RedisOpener)
keys_key = web.AppKey("keys_key", Keys)
redis_key: web.AppKey[RedisClient] = web.AppKey("redis_key")
hub_key = web.AppKey("hub_key", Hub)
admission_key = web.AppKey("admission_key", Admission)
sessions_key = web.AppKey("sessions_key", SessionStore)
publisher_key = web.AppKey("publisher_key", Publisher)
producer_key = web.AppKey("producer_key", Producer)
stream_metrics_key = web.AppKey("stream_metrics_key", StreamMetrics)
metrics_registry_key = web.AppKey("metrics_registry_key", CollectorRegistry)
token_verifier_key = web.AppKey("token_verifier_key", TokenVerifier)
demo_signer_key = web.AppKey("demo_signer_key", SigningKey)
rate_limits_key = web.AppKey("rate_limits_key", RateLimits)
connection_stats_key = web.AppKey("connection_stats_key", ConnectionStats)
canary_key = web.AppKey("canary_key", Canary)
stream_services_key = web.AppKey("stream_services_key", StreamServices)


@dataclass(slots=True)
class Lifecycle:
    """Where the worker is in its life; handlers refuse new streams once it drains."""

    draining: bool = False


lifecycle_key = web.AppKey("lifecycle_key", Lifecycle)

log = logging.getLogger(__name__)


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis client, the shared subscription, the publisher, and the embedded producer."""
    settings = app[settings_key]
    keys = app[keys_key]
    embedded = settings.producer == "embedded"
    async with open_core(settings, keys, app[redis_opener_key], with_producer=embedded) as core:
        app[redis_key] = core.redis
        app[sessions_key] = SessionStore(
            core.redis, keys, settings.session_ttl_s, replay_reads=settings.replay_reads
        )
        app[publisher_key] = core.publisher
        app[hub_key] = core.hub
        if core.producer is not None:
            app[producer_key] = core.producer
        yield


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """This app's own metrics registry, reading the hub's, publisher's and streams' counters."""
    streams = StreamMetrics()
    app[stream_metrics_key] = streams
    registry = build_registry(
        ServiceCollector(streams, app[hub_key], app[publisher_key], app[connection_stats_key])
    )
    registry.register(RateLimitCollector(app[rate_limits_key]))
    registry.register(LeakCollector(streams))
    app[metrics_registry_key] = registry
    yield


async def canary_ctx(app: web.Application) -> AsyncIterator[None]:
    """The delivery check behind readiness, and its metrics (after the hub and the registry)."""
    settings = app[settings_key]
    canary = Canary(
        app[hub_key],
        app[redis_key],
        app[keys_key],
        interval_s=settings.canary_interval_s,
        timeout_s=settings.canary_timeout_s,
    )
    await canary.start()
    app[canary_key] = canary
    app[metrics_registry_key].register(CanaryCollector(canary))
    yield
    await canary.close()


async def stream_services_ctx(app: web.Application) -> AsyncIterator[None]:
    """What every connection of this app uses, gathered once (see connect.py)."""
    app[stream_services_key] = StreamServices(
        settings=app[settings_key],
        keys=app[keys_key],
        redis=app[redis_key],
        hub=app[hub_key],
        sessions=app[sessions_key],
        admission=app[admission_key],
        rate_limits=app[rate_limits_key],
        metrics=app[stream_metrics_key],
    )
    yield


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """The keys that verify access tokens (files are read once here; a JWKS file on change).

    In the embedded single-process mode a random demo key is added, for the demo page's
    token flow (demo_token.py); it never exists with a real Redis.
    """
    settings = app[settings_key]
    extra = []
    if settings.embedded_redis:
        app[demo_signer_key] = new_demo_key()
        extra.append(verify_key_of(app[demo_signer_key]))
        if settings.subscribe_auth == "token":
            log.warning(
                "embedded mode: POST /dev/token mints subscriber tokens for anyone; "
                "use a real redis_url for anything but a demo"
            )
    app[token_verifier_key] = TokenVerifier.from_settings(settings, load_key_ring(settings, extra))
    yield


async def drain_streams(app: web.Application) -> None:
    """On shutdown (after the listening sockets closed): end every open stream, paced.

    Each stream returns after what it already queued, writes its own `retry:` and ends
    cleanly; its client reconnects to another worker, resuming with Last-Event-ID. The
    streams end one after another over `drain_spread` x `drain_timeout_s`, so the other
    workers do not get them all back in one instant (see drain_pacing.py). Requests that
    still slip in are refused with 503 (see `Lifecycle`).
    """
    app[lifecycle_key].draining = True
    settings = app[settings_key]
    streams = app[stream_metrics_key].open_streams() if stream_metrics_key in app else ()
    window_s = settings.drain_spread * settings.drain_timeout_s
    log.info("draining: ending %d open streams over %.1fs", len(streams), window_s)
    finished: set[str] = set()
    if streams and redis_key in app:
        finished = await finished_sessions(
            app[redis_key], app[keys_key], {s.session_id for s in streams},
            settings.redis_timeout_s,
        )  # fmt: skip
    await pace(
        finished_first(streams, finished), window_s, lambda: farewell_frame(settings),
        finish_by_s=window_s + shutdown_grace_s(settings),
    )  # fmt: skip
    hub = app.get(hub_key)
    if hub is not None:  # streams still being set up, and the worker's own listeners
        hub.end_listeners(StreamEnd.SHUTDOWN)
