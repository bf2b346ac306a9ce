"""One connection's life, from an admitted connect to its end log line.

The order matters: the channel is subscribed before the session is attached and its log
read (the first page by the attach script itself; see stream.py), the demo run is queued
only once the subscription is live, and the answer is decided before the response starts:
404 for a session never issued, 204 when nothing more will come (the one status that stops
EventSource), else the stream. Everything the connect path uses is one `StreamServices`,
built once when the app starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiohttp import HttpVersion11, web
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .admission import Admission
from .envelope import parse_event_id
from .errors import REQUEST_ID_HEADER, SessionNotFound, request_id_of
from .hub import Hub
from .jitter import retry_delay_ms
from .keys import Keys
from .mailbox import Listener, StreamEnd
from .metrics import StreamMetrics
from .rate_limit import RateLimits
from .redis.connections import RedisClient
from .runs import request_run
from .sessions import Attachment, AttachStatus, SessionStore
from .settings import Settings
from .stream import REPLAY_FIRST_PAGE, SSE_HEADERS, EventStream, StreamPlan

log = logging.getLogger(__name__)

NOTHING_MORE_HEADERS = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class StreamServices:
    """What a connection needs from its worker, built once at start-up."""

    settings: Settings
    keys: Keys
    redis: RedisClient
    hub: Hub
    sessions: SessionStore
    admission: Admission
    rate_limits: RateLimits
    metrics: StreamMetrics


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A connect as the client asked for it, checked."""

    session_id: str
    last_event_id: str | None
    # When the subscriber's token runs out (a time.monotonic() value); None: never.
    access_ends_at: float | None


async def serve_stream(
    services: StreamServices, request: web.Request, asked: StreamRequest
) -> web.StreamResponse:
    """Admit the connection, attach it, and stream until it ends; or answer 404 or 204.

    Raises Unavailable, TooManyConnections or RedisError only before the response started:
    a stream that started ends on its own terms.
    """
    if may_start_run(services.settings, asked.last_event_id):
        # Refused before any Redis work while this address may start no run (see _register).
        limits = services.rate_limits
        limits.runs.check(limits.address_of(request), "demo runs")
    settings = services.settings
    with services.admission.admit(asked.session_id):
        # One deadline for the subscribe, the attach and the run request: an unresponsive Redis
        # (not down, just silent) fails the connect in bounded time, and the client comes
        # back, maybe to another worker. `_open` lifts it before the response starts. No exit
        # stack and no coroutine of their own: either would be kept while the stream is open.
        deadline = asyncio.timeout(settings.redis_timeout_s)
        try:
            async with (
                deadline,
                services.hub.listen(services.keys.channel(asked.session_id)) as listener,
            ):
                response, stream = await _open(services, request, listener, deadline, asked)
                if stream is not None:
                    await _run(stream, asked.session_id, services.metrics)
                return response
        except TimeoutError:
            if not deadline.expired():
                raise
            raise RedisTimeoutError(
                f"redis did not answer within {settings.redis_timeout_s:g}s"
            ) from None


def may_start_run(settings: Settings, last_event_id: str | None) -> bool:
    """A fresh connect may start a demo run (rate limited per client address)."""
    return last_event_id is None and settings.demo_runs


async def _open(
    services: StreamServices,
    request: web.Request,
    listener: Listener,
    deadline: asyncio.Timeout,
    asked: StreamRequest,
) -> tuple[web.StreamResponse, EventStream | None]:
    """Attach and request the demo run if one is due, within `deadline`, then lift it;
    answer 204 (or raise for 404), or start the response and its stream.

    A function of its own so that the attachment, which holds the log's first page until
    the stream has written it, is not kept for as long as the stream lives.
    """
    settings = services.settings
    attachment = await _register(services, request, asked)
    if attachment.run_needs_producer:
        await request_run(services.redis, services.keys, asked.session_id)
    if deadline.expired():
        # It passed while the last answer was on its way, and a cancellation swallowed on
        # the way (see stream.py, TODO(PY312)) let the answer through: a timeout all the same.
        raise TimeoutError
    deadline.reschedule(None)  # the stream itself has no deadline
    if attachment.status is AttachStatus.UNKNOWN:
        raise SessionNotFound(f"session {asked.session_id!r} was not issued or has expired")
    if attachment.status is AttachStatus.GONE or _already_finished(asked.last_event_id, attachment):
        # Nothing more will come: 204 is the one answer that stops EventSource.
        return web.Response(status=204, headers=NOTHING_MORE_HEADERS), None
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
        session_id=asked.session_id,
        replay_after=attachment.replay_after,
        detect_gap=asked.last_event_id is not None,
        ttl_ms=attachment.ttl_ms,
        retry_ms=retry_delay_ms(settings.retry_ms, settings.retry_spread),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        write_timeout_s=settings.write_timeout_s,
        access_ends_at=asked.access_ends_at,
    )
    stream = EventStream(
        response, listener, services.sessions, plan, request.transport,
        direct_writes=response.chunked, first_page=attachment.first_page,
    )  # fmt: skip
    return response, stream


async def _register(
    services: StreamServices, request: web.Request, asked: StreamRequest
) -> Attachment:
    """Register the connection with its session; a fresh one may start a demo run.

    It holds a run token of its client address until the answer says whether a run started,
    so concurrent connects cannot start more runs than the address has tokens.
    """
    settings, limits = services.settings, services.rate_limits
    holds_token = may_start_run(settings, asked.last_event_id)
    if holds_token:
        limits.runs.take_or_refuse(limits.address_of(request), "demo runs")
    started = False
    try:
        attachment = await services.sessions.attach(
            asked.session_id,
            asked.last_event_id,
            require_issued=settings.require_issued_session,
            start_run_with=settings.producer_event_count if settings.demo_runs else None,
            page_count=REPLAY_FIRST_PAGE,
        )
        started = attachment.run_needs_producer
    finally:
        if holds_token and not started:
            limits.runs.refund(limits.address_of(request))
    return attachment


def _already_finished(last_event_id: str | None, attachment: Attachment) -> bool:
    """A client resuming at or after `finish` gets 204, which stops EventSource reconnecting."""
    if last_event_id is None or attachment.finished_id is None:
        return False
    return parse_event_id(last_event_id) >= parse_event_id(attachment.finished_id)


async def _run(stream: EventStream, session_id: str, metrics: StreamMetrics) -> None:
    """Run the stream; count it while open and when ended, and log why it ended."""
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
