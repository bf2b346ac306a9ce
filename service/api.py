"""The session API for backends: publish events, end a session, read its status.

Events go through `Publisher.publish`, the same path the demo producer uses, so replay,
fan-out and `Last-Event-ID` resume behave identically for both.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from . import resources as r
from .auth import authorize
from .bodies import decode_body
from .envelope import FINISH_EVENT
from .errors import InvalidParameter, SessionNotFound, UnsupportedMediaType
from .sessions import is_valid_session_id
from .submission import parse_body
from .topology import subscriber_count

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
DELETED_DATA = "session deleted"


async def publish_events(request: web.Request) -> web.Response:
    """Publish one event (JSON object) or a batch (JSON array) to every stream of a session."""
    settings = request.app[r.settings_key]
    authorize(request.headers, settings)
    session_id = _session_id(request)
    if request.content_type != JSON_TYPE:
        raise UnsupportedMediaType(f"the body must be {JSON_TYPE}")
    decoded = decode_body(
        await request.read(), request.headers.get("Content-Encoding", ""), settings.max_body_bytes
    )
    submissions, batch = parse_body(decoded, settings.max_event_bytes)
    if settings.require_issued_session and not await _session_exists(request, session_id):
        raise SessionNotFound(f"session {session_id!r} was not issued or has expired")
    publisher = request.app[r.publisher_key]
    ids = []
    for submission in submissions:
        published = await publisher.publish(session_id, submission.event, submission.data)
        ids.append(published.event_id)
    log.info("published %d event(s) to session %s via the API", len(ids), session_id)
    body: dict[str, Any] = {"ids": ids} if batch else {"id": ids[0]}
    return web.json_response(body, status=202)


async def delete_session(request: web.Request) -> web.Response:
    """End a session: its streams get a final `finish` event and close; its keys are removed."""
    authorize(request.headers, request.app[r.settings_key])
    session_id = _session_id(request)
    if not await _session_exists(request, session_id):
        raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
    keys, redis = request.app[r.keys_key], request.app[r.redis_key]
    # The finish goes out first, so every worker's streams of the session end on it.
    await request.app[r.publisher_key].publish(session_id, FINISH_EVENT, DELETED_DATA)
    # The session's keys share one hash slot; the runs index lives elsewhere, so two commands.
    await redis.delete(*keys.session_keys(session_id))
    await redis.zrem(keys.runs, session_id)
    log.info("session %s deleted via the API", session_id)
    return web.Response(status=204)


async def session_status(request: web.Request) -> web.Response:
    """TTL left, subscribed workers, local streams, whether it finished, its newest event id."""
    authorize(request.headers, request.app[r.settings_key])
    session_id = _session_id(request)
    keys = request.app[r.keys_key]
    channel = keys.channel(session_id)
    redis = request.app[r.redis_key]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.pttl(keys.session(session_id))
        pipe.hget(keys.session(session_id), "finished")
        pipe.xrevrange(keys.log(session_id), count=1)
        ttl_ms, finished, newest = await pipe.execute()
    subscribers = await subscriber_count(redis, channel)
    if ttl_ms == -2:
        raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
    return web.json_response(
        {
            "sessionId": session_id,
            "ttlMs": ttl_ms if ttl_ms >= 0 else None,
            "subscribers": subscribers,
            "localStreams": request.app[r.hub_key].listeners_of(channel),
            "finished": finished is not None,
            "lastEventId": _text(newest[0][0]) if newest else None,
        }
    )


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["sessionId"]
    if not is_valid_session_id(session_id):
        raise InvalidParameter("'sessionId' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return session_id


async def _session_exists(request: web.Request, session_id: str) -> bool:
    keys = request.app[r.keys_key]
    found: int = await request.app[r.redis_key].exists(
        keys.session(session_id), keys.log(session_id)
    )
    return found > 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
