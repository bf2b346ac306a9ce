"""The OpenAPI document's prose: when and why each answer happens (service/openapi.py).

Kept apart from the document's structure so either reads in one screen. Every figure in it is
filled in from the settings or the code's constants where the document is built.
"""

from __future__ import annotations

from .api import DELETED_DATA
from .envelope import FINISH_EVENT, GAP_EVENT, UNAUTHORIZED_EVENT
from .settings import Settings

INFO_TEXT = f"""\
A browser gets a session id, opens an EventSource on `/sse/connect`, and receives every event
published to that session by any backend through any worker. Subscribing needs the
unguessable session id and, with `subscribe_auth = "token"`, a signed token (JWT) whose
`sse.subscribe` claim names the session. The session API (`/sse/sessions/...`) needs a bearer
token: a static publish token, or a signed token whose `sse.publish` claim names the session.

Every error is JSON: `{{"error": "<stable code>", "detail": "<text for people>"}}`. Each response
carries an `X-Request-Id` header (a request may send its own, up to 64 printable characters)
that the worker's log line for the error also names; SSE streams carry it too, in the headers
sent before the first event.

Event ids are positions in the session's log, `<milliseconds>-<sequence>`, strictly increasing.
A client resumes with `Last-Event-ID` and is replayed what it missed, as long as the log
(capped, and expiring with the session) still holds it; otherwise it gets a `{GAP_EVENT}` event
first, and if the session itself is gone the stream ends there and a resume is answered 204.

Each worker limits, per client address, how many session ids it issues and how many demo runs
fresh connects start (429 `rate_limited` with `Retry-After`). Responses carry
`Cache-Control: no-store` unless they say otherwise, and `Vary: Origin`, since CORS answers
echo the origin.

Connections have deadlines: a request's line and headers must arrive within `header_timeout_s`
of the connection's start (or of a kept-alive connection's next request's first byte), a body
within `body_timeout_s`, else the answer is 408 `request_timeout` and the connection closes; an
idle kept-alive connection closes after `keepalive_timeout_s`. A worker holds as many client
connections as its open-file limit minus `fd_reserve`; beyond, a new connection is closed at
once, unanswered (a proxy then tries another worker)."""

SUBSCRIBER_TOKEN_TEXT = (
    "A signed token (JWT: HS256, RS256, ES256 or EdDSA) whose `sse.subscribe` claim lists the "
    "session id or a prefix of it ending in `*`; `exp` required. Checked only with "
    '`subscribe_auth = "token"`; the header wins over the query parameter, which wins over the '
    "cookie."
)


def connect_text(settings: Settings, token_mode: bool) -> str:
    """What a stream is, and when it ends."""
    return (
        "A `text/event-stream` that starts with a `retry:` field and a `: connected` "
        "comment, replays logged events the client has not seen, then relays live ones. "
        f"Idle streams get a `: ping` comment every {settings.heartbeat_interval_s:g} s. "
        "Only events end with a blank line: `retry:` and comments have none of their own, "
        "so clients that hand every block over never see an empty message. "
        f"The stream ends after the `{FINISH_EVENT}` event, right after a `{GAP_EVENT}` event "
        "when the session itself is gone, when the session expires "
        f"(TTL {settings.session_ttl_s:g} s from the last fresh connect), when the client is "
        "too slow to keep up, or when the worker shuts down"
        + (
            f", and when the subscriber's token expires (after an `{UNAUTHORIZED_EVENT}` "
            "event).\n\n"
            if token_mode
            else ".\n\n"
        )
        + "A fresh connect (no resume point) renews the session's TTL"
        + (
            f" and starts a demo run of {settings.producer_event_count} events when none is active."
            if settings.demo_runs
            else "."
        )
    )


def stream_text(settings: Settings) -> str:
    """The events of a stream, and the stream that is only a `retry:`."""
    return (
        "The event stream. Events carry `id:` (their log position), an optional `event:` "
        f"name and `data:` lines. Named events of the service itself: `{FINISH_EVENT}` (last "
        f"event of the session), `{GAP_EVENT}` (data: the resume point, whose successors are "
        f"no longer all in the log) and `{UNAUTHORIZED_EVENT}` (no id; the subscriber's token "
        "expired and the stream ends).\n\n"
        "A request that asks for `text/event-stream` (as EventSource does) while the "
        "worker cannot serve it right now (Redis away or not answering within "
        f"{settings.redis_timeout_s:g} s, the worker full or draining) also gets 200: a "
        f"body of only a `retry:` delay (jittered around {settings.retry_ms} ms) that "
        "ends at once, so the client reconnects instead of giving up."
    )


def finished_text(token_mode: bool) -> str:
    """When a connect is answered 204."""
    return (
        "A resume (a resume point was given) of a session that has nothing more to send: "
        f"the resume point is at or after its `{FINISH_EVENT}`, or the session no longer "
        "exists (expired, deleted, lost with Redis' data). EventSource stops reconnecting."
        + (
            " Also the answer to an EventSource (`Accept: text/event-stream`) whose token is "
            "genuine and names the session but has expired: the reconnect after an "
            f"`{UNAUTHORIZED_EVENT}` event. Open a new EventSource with a fresh token."
            if token_mode
            else ""
        )
    )


def publish_text(max_batch_events: int, idempotency_ttl_s: float) -> str:
    """What a publish does, all or nothing, once."""
    return (
        "Publishes one event (a JSON object) or a batch (a JSON array of 1 to "
        f"{max_batch_events} objects, published in order) to every stream of the session, "
        "on every worker, through the same path as the demo producer: each event is "
        "appended to the session's log and relayed live, so reconnecting clients get it "
        "replayed. A batch is checked as a whole and published whole or not at all, in "
        "one atomic step.\n\n"
        f"An event named `{FINISH_EVENT}` ends every stream of the session after it is "
        "delivered; it may only be the last event of a batch. A finished session takes no "
        "more events (409): nothing published after it could reach a stream.\n\n"
        "A request is never published twice by the service. If Redis does not confirm it "
        "in time, the answer is 503 `outcome_unknown`: it may or may not have been "
        "published. Send an `Idempotency-Key` to make repeating it safe: for "
        f"{idempotency_ttl_s:g} s, the same key and body to the same session "
        "answer the ids of the first publish (with `Idempotent-Replayed: true`) instead "
        "of publishing again.\n\n"
        "Publishing to a session nobody has connected to yet creates it, unless "
        "`require_issued_session` is on (then an unknown session is 404); a deleted "
        "session is not re-created (404)."
    )


DELETE_TEXT = (
    f"Publishes a final `{FINISH_EVENT}` event (data `{DELETED_DATA}`) so every stream of the "
    "session, on every worker, receives it and closes, and removes the session's record, log "
    "and demo-run state, in one step. For a session TTL a tombstone remains: a resume is "
    "answered 204, a publish 404, a repeated DELETE 204. A later fresh connect with the same "
    "id starts a new, empty session (unless `require_issued_session` is on: then 404)."
)
