"""The session API for backends: publish events, end a session, read its status.

Events go through `Publisher.publish`, the same path the demo producer uses, so replay,
fan-out and `Last-Event-ID` resume behave identically for both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from aiohttp import web

from .auth import authorize
from .bodies import decode_body, read_body
from .envelope import FINISH_EVENT
from .errors import (
    IdempotencyKeyReused,
    InvalidEvent,
    InvalidParameter,
    OutcomeUnknown,
    SessionFinished,
    SessionNotFound,
    UnsupportedMediaType,
)
from .publisher import BatchOutcome, IdempotencyRecord, PublishedBatch, SessionEnd
from .redis.once import OutcomeUnknown as OutcomeUnknownError
from .redis.topology import subscriber_count
from .replies import reply_text
from .resources import (
    connection_stats_key,
    hub_key,
    keys_key,
    publisher_key,
    redis_key,
    settings_key,
)
from .responses import Published, PublishedIds, SessionStatus
from .sessions import is_valid_session_id
from .submission import parse_body

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
DELETED_DATA = "session deleted"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_KEY_MAX = 128
IDEMPOTENCY_KEY = re.compile(f"[A-Za-z0-9_.:+/=-]{{1,{IDEMPOTENCY_KEY_MAX}}}")


async def publish_events(request: web.Request) -> web.Response:
    """Publish one event (JSON object) or a batch (JSON array) to every stream of a session.

    The batch is published whole or not at all, and never twice: with an `Idempotency-Key`
    a repeated request answers the ids of the first; a request whose outcome Redis left
    unknown is answered 503 `outcome_unknown`, for the caller to repeat with its key.
    """
    settings = request.app[settings_key]
    authorize(request)
    session_id = _session_id(request)
    key = _idempotency_key(request)
    if request.content_type != JSON_TYPE:
        raise UnsupportedMediaType(f"the body must be {JSON_TYPE}")
    raw = await read_body(request, settings.body_timeout_s, request.app[connection_stats_key])
    decoded = decode_body(raw, request.headers.get("Content-Encoding", ""), settings.max_body_bytes)
    submissions, batch = parse_body(decoded, settings.max_event_bytes)
    if any(s.event == FINISH_EVENT for s in submissions[:-1]):
        raise InvalidEvent(
            f"'{FINISH_EVENT}' ends the session's streams: it may only be the last event"
        )
    events = [(s.event, s.data) for s in submissions]
    record = None
    if key is not None:
        ttl_ms = max(1, round(settings.idempotency_ttl_s * 1000))
        record = IdempotencyRecord(key, _digest(events, batch), ttl_ms)
    try:
        result = await request.app[publisher_key].publish_batch(
            session_id, events, require_issued=settings.require_issued_session, record=record
        )
    except OutcomeUnknownError:
        retry = (
            "repeat the request with the same Idempotency-Key to learn its ids"
            if key
            else "send an Idempotency-Key to make a repeated request safe"
        )
        raise OutcomeUnknown(
            f"redis did not confirm in time; the events may or may not be published: {retry}",
            headers={"Retry-After": "1"},
        ) from None
    _check_outcome(result, session_id)
    headers = {}
    if result.outcome is BatchOutcome.REPLAYED:
        headers[REPLAYED_HEADER] = "true"
        log.info("answered a repeated publish to session %s with its first ids", session_id)
    else:
        log.info("published %d event(s) to session %s via the API", len(events), session_id)
    return web.json_response(_answer(result.ids, batch), status=202, headers=headers)


def _answer(ids: list[str], batch: bool) -> Published | PublishedIds:
    """A batch answers its ids in order; a single event, its one id."""
    if batch:
        return {"ids": ids}
    return {"id": ids[0]}


def _check_outcome(result: PublishedBatch, session_id: str) -> None:
    outcome = result.outcome
    if outcome is BatchOutcome.KEY_REUSED:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different request to this session"
        )
    if outcome is BatchOutcome.FINISHED:
        raise SessionFinished(
            f"session {session_id!r} has finished (its streams ended with 'finish'); "
            "nothing more can reach them"
        )
    if outcome is BatchOutcome.DELETED:
        raise SessionNotFound(f"session {session_id!r} was deleted")
    if outcome is BatchOutcome.UNKNOWN_SESSION:
        raise SessionNotFound(f"session {session_id!r} was not issued or has expired")


def _idempotency_key(request: web.Request) -> str | None:
    values = request.headers.getall(IDEMPOTENCY_KEY_HEADER, [])
    if not values:
        return None
    if len(values) != 1 or not IDEMPOTENCY_KEY.fullmatch(values[0]):
        raise InvalidParameter(
            f"'{IDEMPOTENCY_KEY_HEADER}' must be given once, as 1-{IDEMPOTENCY_KEY_MAX} "
            "characters of A-Z, a-z, 0-9, '_', '-', '.', ':', '+', '/' or '='"
        )
    return values[0]


def _digest(events: list[tuple[str, str]], batch: bool) -> str:
    """What tells one request from another under the same key: its events and its shape."""
    text = json.dumps([batch, events], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


async def delete_session(request: web.Request) -> web.Response:
    """End a session: its streams get a final `finish` event and close; its keys are removed.

    A tombstone stays for a session TTL: resumes are answered 204, publishes do not re-create
    the session, and a repeated DELETE (a retry) is answered 204 again.
    """
    authorize(request)
    session_id = _session_id(request)
    keys, redis = request.app[keys_key], request.app[redis_key]
    try:
        ended = await request.app[publisher_key].end_session(session_id, DELETED_DATA)
    except OutcomeUnknownError:
        raise OutcomeUnknown(
            "redis did not confirm in time; repeat the request: it answers 204 once the "
            "session is gone",
            headers={"Retry-After": "1"},
        ) from None
    if ended is SessionEnd.MISSING:
        raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
    # The runs index lives on another slot: its own command, harmless to repeat.
    await redis.zrem(keys.runs, session_id)
    if ended is SessionEnd.DELETED:
        log.info("session %s deleted via the API", session_id)
    return web.Response(status=204)


async def session_status(request: web.Request) -> web.Response:
    """TTL left, subscribed workers, local streams, whether it finished, its newest event id."""
    authorize(request)
    session_id = _session_id(request)
    keys = request.app[keys_key]
    channel = keys.channel(session_id)
    redis = request.app[redis_key]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.pttl(keys.session(session_id))
        pipe.hget(keys.session(session_id), "finished")
        pipe.xrevrange(keys.log(session_id), count=1)
        ttl_ms, finished, newest = await pipe.execute()
    subscribers = await subscriber_count(redis, channel)
    if ttl_ms == -2:
        raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
    status: SessionStatus = {
        "sessionId": session_id,
        "ttlMs": ttl_ms if ttl_ms >= 0 else None,
        "subscribers": subscribers,
        "localStreams": request.app[hub_key].listeners_of(channel),
        "finished": finished is not None,
        "lastEventId": reply_text(newest[0][0]) if newest else None,
    }
    return web.json_response(status)


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["sessionId"]
    if not is_valid_session_id(session_id):
        raise InvalidParameter("'sessionId' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return session_id
