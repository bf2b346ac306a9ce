"""HTTP handlers: read and check the request, call one module, translate the outcome."""

from __future__ import annotations

import functools
import logging

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import sse
from .assets import WEB_FILES_DIR, read_asset
from .connect import NOTHING_MORE_HEADERS, StreamRequest, serve_stream
from .envelope import parse_event_id
from .errors import (
    REQUEST_ID_HEADER,
    InvalidParameter,
    ServiceError,
    TooManyConnections,
    Unavailable,
    request_id_of,
)
from .jitter import retry_delay_ms
from .metrics import CONTENT_TYPE, render
from .resources import (
    canary_key,
    hub_key,
    lifecycle_key,
    metrics_registry_key,
    producer_key,
    rate_limits_key,
    redis_key,
    sessions_key,
    settings_key,
    stream_metrics_key,
    stream_services_key,
)
from .sessions import is_valid_session_id
from .stream import SSE_HEADERS
from .subscribe_auth import check_subscriber

log = logging.getLogger(__name__)

LAST_EVENT_ID_HEADER = "Last-Event-ID"


async def get_session_id(request: web.Request) -> web.Response:
    """Issue a new session id (plain text, as the original demo returns it)."""
    limits = request.app[rate_limits_key]
    limits.sessions.take_or_refuse(limits.address_of(request), "new sessions")
    session_id = await request.app[sessions_key].issue()
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
        if app[lifecycle_key].draining:
            raise Unavailable("this worker is shutting down", headers={"Retry-After": "1"})
        asked = StreamRequest(session_id, last_event_id, access.monotonic_deadline())
        return await serve_stream(app[stream_services_key], request, asked)
    except (Unavailable, TooManyConnections, RedisError) as error:
        # Only raised before the stream's response starts: a stream ends on its own terms.
        if not _reads_event_streams(request):
            raise
        return _come_back_later(request, session_id, error)


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
    settings = app[settings_key]
    delay_ms = retry_delay_ms(settings.retry_ms, settings.retry_spread)
    detail = why.detail if isinstance(why, ServiceError) else str(why)
    log.info(
        "stream of session %s deferred (%s); the client reconnects in %d ms [request %s]",
        session_id,
        detail,
        delay_ms,
        request_id_of(request),
    )
    app[stream_metrics_key].deferred()
    response = web.Response(
        body=sse.retry(delay_ms) + sse.comment("unavailable, reconnect later"),
        headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id_of(request)},
    )
    response.force_close()
    return response


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
    """Liveness: the process answers, and nothing in it has failed beyond repair.

    A hub that stopped on a bug refuses every stream until the worker restarts; saying so
    here lets the orchestrator restart it, where readiness would only route around it.
    """
    if request.app[hub_key].failed:
        return web.json_response(
            {"status": "failed", "problems": ["shared subscription failed; restart the worker"]},
            status=503,
        )
    return web.json_response({"status": "ok"})


async def serve_metrics(request: web.Request) -> web.Response:
    """This worker's counters in the Prometheus text format."""
    body = render(request.app[metrics_registry_key])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers, the shared subscription is connected and delivers (the
    canary's latest round), the producer runs."""
    hub = request.app[hub_key]
    problems = []
    try:
        await request.app[redis_key].ping()
    except RedisError as error:
        # The answer is public; where Redis is and what the driver said go to the log.
        problems.append(_redis_problem(error))
        log.warning("readiness: redis did not answer its ping: %s", error)
    if not hub.connected:
        problems.append("shared subscription is not connected")
    canary = request.app.get(canary_key)
    if canary is not None and (problem := canary.problem) is not None:
        problems.append(problem)
    producer = request.app.get(producer_key)
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
