"""HTTP handlers: read and check the request, call one module, translate the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time

from aiohttp import HttpVersion11, web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import resources as r
from . import sse
from .assets import WEB_FILES_DIR, read_asset
from .envelope import parse_event_id
from .errors import (
    REQUEST_ID_HEADER,
    InvalidParameter,
    ServiceError,
    SessionNotFound,
    TooManyConnections,
    Unavailable,
    request_id_of,
)
from .mailbox import Listener, StreamEnd
from .metrics import CONTENT_TYPE, StreamMetrics, render
from .producer import request_run
from .sessions import Attachment, AttachStatus, is_valid_session_id
from .stream import SSE_HEADERS, EventStream, StreamPlan
from .subscribe_auth import StreamAccess, check_subscriber

log = logging.getLogger(__name__)

LAST_EVENT_ID_HEADER = "Last-Event-ID"
NOTHING_MORE_HEADERS = {"Cache-Control": "no-store"}


async def get_session_id(request: web.Request) -> web.Response:
    """Issue a new session id (plain text, as the original demo returns it)."""
    limits = request.app[r.rate_limits_key]
    limits.sessions.take_or_refuse(limits.address_of(request), "new sessions")
    session_id = await request.app[r.sessions_key].issue()
    return web.Response(text=session_id, content_type="text/plain")


async def connect(request: web.Request) -> web.StreamResponse:
    """Stream a session's events: replay what the client missed, then live until the end.

    A condition that passes (Redis away or slow, the worker full or draining) is answered,
    to EventSource, with a stream that only says when to come back: any other status than
    200 would make it give up for good. Other clients get 503 with Retry-After.
    """
    app = request.app
    session_id = _session_id(request)
    last_event_id = _last_event_id(request)
    access = check_subscriber(request, session_id)
    if access.stop:
        # An expired token's reconnect: EventSource stops.
        return web.Response(status=204, headers=NOTHING_MORE_HEADERS)
    try:
        if app[r.lifecycle_key].draining:
            raise Unavailable("this worker is shutting down", headers={"Retry-After": "1"})
        if _may_start_run(request, last_event_id):
            # Refused before any Redis work while this address may start no run (see _register).
            limits = app[r.rate_limits_key]
            limits.runs.check(limits.address_of(request), "demo runs")
        with app[r.admission_key].admit(session_id):
            return await _serve_stream(request, session_id, last_event_id, access)
    except (Unavailable, TooManyConnections, RedisError) as error:
        # Only raised before the stream's response starts: a stream ends on its own terms.
        if not _reads_event_streams(request):
            raise
        return _come_back_later(request, session_id, error)


async def _serve_stream(
    request: web.Request, session_id: str, last_event_id: str | None, access: StreamAccess
) -> web.StreamResponse:
    app = request.app
    settings = app[r.settings_key]
    async with contextlib.AsyncExitStack() as held:
        listener, attachment = await _attach(request, held, session_id, last_event_id)
        if attachment.status is AttachStatus.UNKNOWN:
            raise SessionNotFound(f"session {session_id!r} was not issued or has expired")
        if attachment.status is AttachStatus.GONE or _already_finished(last_event_id, attachment):
            # Nothing more will come: 204 is the one answer that stops EventSource.
            return web.Response(status=204, headers=NOTHING_MORE_HEADERS)
        response = web.StreamResponse(
            headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id_of(request)}
        )
        if request.version == HttpVersion11:
            # Chunked by choice, not by default, so the stream may write pre-framed chunks.
            response.enable_chunked_encoding()
        else:
            # An unframed body ends only when the connection does, keep-alive asked or not.
            response.force_close()
        await response.prepare(request)
        plan = StreamPlan(
            session_id=session_id,
            replay_after=attachment.replay_after,
            detect_gap=last_event_id is not None,
            ttl_ms=attachment.ttl_ms,
            retry_ms=settings.retry_ms,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            write_timeout_s=settings.write_timeout_s,
            access_ends_at=access.monotonic_deadline(),
        )
        stream = EventStream(
            response, listener, app[r.sessions_key], plan, request.transport,
            direct_writes=response.chunked,
        )  # fmt: skip
        await _run_stream(stream, session_id, app[r.stream_metrics_key])
        return response


async def _attach(
    request: web.Request,
    held: contextlib.AsyncExitStack,
    session_id: str,
    last_event_id: str | None,
) -> tuple[Listener, Attachment]:
    """Subscribe, register, and request the demo run if one is due, within redis_timeout_s.

    One deadline for the lot: an unresponsive Redis (not down, just silent) fails the
    connect in bounded time, and the client comes back, maybe to another worker.
    """
    app = request.app
    settings, keys = app[r.settings_key], app[r.keys_key]
    try:
        async with asyncio.timeout(settings.redis_timeout_s):
            listener = await held.enter_async_context(
                app[r.hub_key].listen(keys.channel(session_id))
            )
            attachment = await _register(request, session_id, last_event_id)
            if attachment.run_needs_producer:
                await request_run(app[r.redis_key], keys, session_id)
    except TimeoutError:
        raise RedisTimeoutError(
            f"redis did not answer within {settings.redis_timeout_s:g}s"
        ) from None
    return listener, attachment


async def _register(request: web.Request, session_id: str, last_event_id: str | None) -> Attachment:
    """Register the connection with its session; a fresh one may start a demo run.

    It holds a run token of its client address until the answer says whether a run started,
    so concurrent connects cannot start more runs than the address has tokens.
    """
    app = request.app
    settings, limits = app[r.settings_key], app[r.rate_limits_key]
    holds_token = _may_start_run(request, last_event_id)
    if holds_token:
        limits.runs.take_or_refuse(limits.address_of(request), "demo runs")
    started = False
    try:
        attachment = await app[r.sessions_key].attach(
            session_id,
            last_event_id,
            require_issued=settings.require_issued_session,
            start_run_with=settings.producer_event_count if settings.demo_runs else None,
        )
        started = attachment.run_needs_producer
    finally:
        if holds_token and not started:
            limits.runs.refund(limits.address_of(request))
    return attachment


def _reads_event_streams(request: web.Request) -> bool:
    """The client asked for an event stream, as EventSource does (`Accept`)."""
    return any("text/event-stream" in value for value in request.headers.getall("Accept", []))


def _come_back_later(request: web.Request, session_id: str, why: Exception) -> web.Response:
    """An event stream that only says when to reconnect, then ends.

    EventSource treats any status but 200 as fatal; a 200 that ends at once makes it
    reconnect after the `retry:` delay, keeping its Last-Event-ID. The delay is jittered
    around `retry_ms`, so a crowd turned away together does not come back together.
    """
    app = request.app
    delay_ms = round(app[r.settings_key].retry_ms * random.uniform(0.5, 1.5))
    detail = why.detail if isinstance(why, ServiceError) else str(why)
    log.info(
        "stream of session %s deferred (%s); the client reconnects in %d ms [request %s]",
        session_id,
        detail,
        delay_ms,
        request_id_of(request),
    )
    app[r.stream_metrics_key].deferred()
    response = web.Response(
        body=sse.retry(delay_ms) + sse.comment("unavailable, reconnect later"),
        headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id_of(request)},
    )
    response.force_close()
    return response


async def _run_stream(stream: EventStream, session_id: str, metrics: StreamMetrics) -> None:
    started = time.monotonic()
    reason = StreamEnd.CLIENT_GONE
    metrics.opened(stream)
    try:
        reason = await stream.run()
    except ConnectionResetError:
        reason = StreamEnd.CLIENT_GONE
    except RedisError as error:
        reason = StreamEnd.HUB_FAILED
        log.warning("stream of session %s lost redis: %s", session_id, error)
    finally:
        if reason is StreamEnd.CLIENT_GONE and stream.dropped_as_slow:
            reason = StreamEnd.SLOW  # the worker cut the connection, not the client
        metrics.closed(stream, reason)
        duration_s = time.monotonic() - started
        log.info(
            "stream end session=%s reason=%s events=%d replayed=%d duration=%.2fs",
            session_id,
            reason.value,
            stream.events_sent,
            stream.events_replayed,
            duration_s,
            extra={
                "fields": {
                    "session": session_id,
                    "reason": reason.value,
                    "events": stream.events_sent,
                    "replayed": stream.events_replayed,
                    "duration_s": round(duration_s, 6),
                }
            },
        )


def _may_start_run(request: web.Request, last_event_id: str | None) -> bool:
    """A fresh connect may start a demo run (rate limited per client address)."""
    return last_event_id is None and request.app[r.settings_key].demo_runs


def _session_id(request: web.Request) -> str:
    values = request.query.getall("sessionId", [])
    if len(values) != 1:
        raise InvalidParameter("query parameter 'sessionId' is required exactly once")
    if not is_valid_session_id(values[0]):
        raise InvalidParameter("'sessionId' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return values[0]


def _last_event_id(request: web.Request) -> str | None:
    """The resume point: the `Last-Event-ID` header, else the `lastEventId` query parameter.

    Both are checked when both are sent, so a malformed value is never silently ignored.
    """
    header = _event_id_or_none(request.headers.get(LAST_EVENT_ID_HEADER), "'Last-Event-ID'")
    query = _event_id_or_none(request.query.get("lastEventId"), "'lastEventId'")
    return header or query


def _event_id_or_none(text: str | None, name: str) -> str | None:
    # An empty value means "no resume point", as EventSource sends before its first id.
    if not text:
        return None
    try:
        parse_event_id(text)
    except ValueError:
        raise InvalidParameter(
            f"{name} must be an event id of the form <milliseconds>-<sequence>"
        ) from None
    return text


def _already_finished(last_event_id: str | None, attachment: Attachment) -> bool:
    """A client resuming at or after `finish` gets 204, which stops EventSource reconnecting."""
    if last_event_id is None or attachment.finished_id is None:
        return False
    return parse_event_id(last_event_id) >= parse_event_id(attachment.finished_id)


# The demo page and its assets, served from fixed names only; the page refers to them (and to
# the API) with relative URLs, so web/ also works as-is from any static server or a file.
WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


async def index(request: web.Request) -> web.Response:
    """The browser demo page."""
    del request
    return _web_file("index.html")


async def web_asset(request: web.Request) -> web.Response:
    """A script or style sheet of the demo page (the route admits only names in WEB_FILES)."""
    return _web_file(request.match_info["name"])


def _web_file(name: str) -> web.Response:
    return web.Response(
        body=_web_file_bytes(name),
        headers={"Content-Type": WEB_FILES[name], "Cache-Control": "no-cache"},
    )


@functools.cache
def _web_file_bytes(name: str) -> bytes:
    # Package data (or the checkout's web/), read once: a few kilobytes that never change
    # while the process runs.
    return read_asset(f"{WEB_FILES_DIR}/{name}")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    del request
    return web.json_response({"status": "ok"})


async def serve_metrics(request: web.Request) -> web.Response:
    """This worker's counters in the Prometheus text format."""
    body = render(request.app[r.metrics_registry_key])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers, the shared subscription is connected, the producer runs."""
    hub = request.app[r.hub_key]
    problems = []
    try:
        await request.app[r.redis_key].ping()
    except RedisError as error:
        # The answer is public; where Redis is and what the driver said go to the log.
        problems.append(_redis_problem(error))
        log.warning("readiness: redis did not answer its ping: %s", error)
    if not hub.connected:
        problems.append("shared subscription is not connected")
    producer = request.app.get(r.producer_key)
    if producer is not None and (problem := producer.problem) is not None:
        problems.append(problem)
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready", "listeners": hub.listener_count})


def _redis_problem(error: RedisError) -> str:
    """A readiness reason: the kind of Redis failure, never its message."""
    if isinstance(error, RedisTimeoutError):
        return "redis: timeout"
    if isinstance(error, RedisConnectionError):
        return "redis: unreachable"
    return "redis: error"
