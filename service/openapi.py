"""The OpenAPI 3.1 description of every HTTP endpoint, written by hand, served at /openapi.json.

It is built from the settings so the limits and the auth rule it states are this deployment's.
`tests/test_openapi.py` checks that it names every route the app serves and fuzzes the API
against it, so the two cannot drift apart silently.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from . import __version__
from . import resources as r
from .api import IDEMPOTENCY_KEY
from .auth import AccessPolicy, access_policy
from .demo_token import DEFAULT_DEMO_TTL_S, MAX_DEMO_TTL_S
from .envelope import EVENT_ID_PATTERN as EVENT_ID_PATTERN_TEXT
from .envelope import GAP_EVENT, UNAUTHORIZED_EVENT
from .sessions import SESSION_ID_BITS, SESSION_ID_LENGTH, SESSION_ID_PATTERN
from .settings import Settings
from .submission import EVENT_NAME_PATTERN, MAX_BATCH_EVENTS
from .subscribe_auth import ACCESS_TOKEN_PARAM

EVENT_ID_PATTERN = f"^{EVENT_ID_PATTERN_TEXT}$"
# An empty resume point counts as none, as EventSource sends no header before the first id.
RESUME_POINT_PATTERN = f"^({EVENT_ID_PATTERN_TEXT})?$"
EVENT_ID_EXAMPLE = "1718000000000-0"
JSON = "application/json"

Spec = dict[str, Any]


async def openapi_json(request: web.Request) -> web.Response:
    """This document, as JSON."""
    return web.json_response(build_document(request.app[r.settings_key]))


@functools.lru_cache(maxsize=4)
def build_document(settings: Settings) -> Spec:
    """The complete OpenAPI document for a worker running with `settings`."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sse-fanout",
            "version": __version__,
            "summary": "Server-Sent Events push gateway fanned out over Redis pub/sub.",
            "description": _INFO_TEXT,
        },
        "tags": [
            {"name": "stream", "description": "What browsers use: get an id, open the stream."},
            {"name": "sessions", "description": "What backends use: publish, end, inspect."},
            {"name": "operations", "description": "Health probes, this description, the demo."},
        ],
        "paths": {
            "/sse/getSessionId": {
                "get": _get_session_id(settings),
                "head": _head_refused("issue"),
            },
            "/sse/connect": {"get": _connect(settings), "head": _head_refused("connect")},
            "/sse/sessions/{sessionId}": {
                "parameters": [_ref("parameters", "SessionIdPath")],
                "get": _session_status(settings),
                "delete": _delete_session(settings),
            },
            "/sse/sessions/{sessionId}/events": {
                "parameters": [_ref("parameters", "SessionIdPath")],
                "post": _publish(settings),
            },
            "/healthz": {"get": _healthz()},
            "/readyz": {"get": _readyz()},
            "/metrics": {
                "get": _static_op("This worker's counters, Prometheus text format.", "text/plain")
            },
            "/openapi.json": {"get": _static_op("This document.", JSON, {"type": "object"})},
            "/docs": {"get": _static_op("This document, rendered as a page.", "text/html")},
            "/": {"get": _static_op("The browser demo page.", "text/html")},
            "/app.js": {"get": _static_op("The demo page's script.", "text/javascript")},
            "/style.css": {"get": _static_op("The demo page's style sheet.", "text/css")},
            **({"/dev/token": {"post": _demo_token()}} if settings.embedded_redis else {}),
        },
        "components": _components(settings),
    }


_INFO_TEXT = """\
A browser gets a session id, opens an EventSource on `/sse/connect`, and receives every event
published to that session by any backend through any worker. Subscribing needs the
unguessable session id and, with `subscribe_auth = "token"`, a signed token (JWT) whose
`sse.subscribe` claim names the session. The session API (`/sse/sessions/...`) needs a bearer
token: a static publish token, or a signed token whose `sse.publish` claim names the session.

Every error is JSON: `{"error": "<stable code>", "detail": "<text for people>"}`. Each response
carries an `X-Request-Id` header (a request may send its own, up to 64 printable characters)
that the worker's log line for the error also names; SSE streams carry it too, in the headers
sent before the first event.

Event ids are positions in the session's log, `<milliseconds>-<sequence>`, strictly increasing.
A client resumes with `Last-Event-ID` and is replayed what it missed, as long as the log (capped,
and expiring with the session) still holds it; otherwise it gets a `gap` event first, and if the
session itself is gone the stream ends there and a resume is answered 204.

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


def _get_session_id(settings: Settings) -> Spec:
    return {
        "tags": ["stream"],
        "operationId": "getSessionId",
        "summary": "Issue a new session id",
        "description": f"A fresh, unguessable id ({SESSION_ID_LENGTH} base-62 characters, "
        f"{SESSION_ID_BITS} random bits), as plain text. It lives for the session TTL; a fresh "
        "connect renews it.",
        "responses": {
            "200": {
                "description": "The new session id.",
                "headers": {"Cache-Control": _ref("headers", "NoStore")},
                "content": {
                    "text/plain": {
                        "schema": {
                            "type": "string",
                            "pattern": f"^[0-9A-Za-z]{{{SESSION_ID_LENGTH}}}$",
                        }
                    }
                },
            },
            "429": _error(
                "`rate_limited`: this client address asked this worker for session ids faster "
                f"than {_rate(settings, 'session')}.",
                retry_after=True,
            ),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _connect(settings: Settings) -> Spec:
    token_mode = settings.subscribe_auth == "token"
    return {
        **({"security": _SUBSCRIBER_SECURITY} if token_mode else {}),
        "tags": ["stream"],
        "operationId": "connect",
        "summary": "Open the session's event stream",
        "description": (
            "A `text/event-stream` that starts with a `retry:` field and a `: connected` "
            "comment, replays logged events the client has not seen, then relays live ones. "
            f"Idle streams get a `: ping` comment every {settings.heartbeat_interval_s:g} s. "
            "Only events end with a blank line: `retry:` and comments have none of their own, "
            "so clients that hand every block over never see an empty message. "
            "The stream ends after the `finish` event, right after a `gap` event when the "
            "session itself is gone, when the session expires "
            f"(TTL {settings.session_ttl_s:g} s from the last fresh connect), when the client is "
            "too slow to keep up, or when the worker shuts down"
            + (", and when the subscriber's token expires (after an `unauthorized` event).\n\n"
               if token_mode else ".\n\n")
            + "A fresh connect (no resume point) renews the session's TTL"
            + (" and starts a demo run of "
               f"{settings.producer_event_count} events when none is active."
               if settings.demo_runs else ".")
        ),
        "parameters": [
            {
                "name": "sessionId",
                "in": "query",
                "required": True,
                "description": "The session to follow. Given exactly once.",
                "schema": {"type": "string", "pattern": SESSION_ID_PATTERN.pattern},
            },
            {
                "name": "lastEventId",
                "in": "query",
                "required": False,
                "description": "Resume point for clients that cannot set headers; the "
                "`Last-Event-ID` header wins when both are present.",
                "schema": {"type": "string", "pattern": RESUME_POINT_PATTERN},
                "example": EVENT_ID_EXAMPLE,
            },
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume point, sent by EventSource when it reconnects: events "
                "after this id are replayed from the log.",
                "schema": {"type": "string", "pattern": RESUME_POINT_PATTERN},
                "example": EVENT_ID_EXAMPLE,
            },
        ],
        "responses": {
            "200": {
                "description": "The event stream. Events carry `id:` (their log position), an "
                "optional `event:` name and `data:` lines. Named events of the service itself: "
                "`finish` (last event of the session), `gap` (data: the resume point, whose "
                f"successors are no longer all in the log) and `{UNAUTHORIZED_EVENT}` (no id; "
                "the subscriber's token expired and the stream ends).\n\n"
                "A request that asks for `text/event-stream` (as EventSource does) while the "
                "worker cannot serve it right now (Redis away or not answering within "
                f"{settings.redis_timeout_s:g} s, the worker full or draining) also gets 200: a "
                f"body of only a `retry:` delay (jittered around {settings.retry_ms} ms) that "
                "ends at once, so the client reconnects instead of giving up.",
                "headers": {
                    "X-Request-Id": _ref("headers", "RequestId"),
                    "Cache-Control": _ref("headers", "NoStore"),
                },
                "content": {"text/event-stream": {"schema": _ref("schemas", "StreamEvent")}},
            },
            "204": {
                "description": "A resume (a resume point was given) of a session that has "
                "nothing more to send: the resume point is at or after its `finish`, or the "
                "session no longer exists (expired, deleted, lost with Redis' data). "
                "EventSource stops reconnecting."
                + (" Also the answer to an EventSource (`Accept: text/event-stream`) whose "
                   "token is genuine and names the session but has expired: the reconnect "
                   "after an `unauthorized` event. Open a new EventSource with a fresh token."
                   if token_mode else ""),
                "headers": {"Cache-Control": _ref("headers", "NoStore")},
            },
            "400": _error("`invalid_parameter`: `sessionId` missing, repeated or malformed, "
                          "or a malformed resume point."),
            **(_subscriber_errors() if token_mode else {}),
            "404": _error("`session_not_found`: a fresh connect to an id that was not issued "
                          "or has expired (only with `require_issued_session`)."),
            "429": {
                **_error(
                    "`too_many_session_connections`: this session already has "
                    f"{settings.max_connections_per_session} streams on this worker; "
                    "`rate_limited` (with `Retry-After`): a fresh connect from a client address "
                    f"that started demo runs on this worker faster than {_rate(settings, 'run')} "
                    "(resumes are never limited)."
                ),
                "headers": {
                    "Retry-After": {
                        "description": "Seconds to wait; sent with `rate_limited`.",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    }
                },
            },
            "503": _error(
                "Only to clients that do not ask for `text/event-stream`: "
                "`too_many_connections`: this worker holds "
                f"{settings.max_connections} streams; `unavailable`: Redis is unreachable or "
                "the worker is shutting down.",
                retry_after=True,
            ),
        },
    }


def _rate(settings: Settings, limit: str) -> str:
    rate_per_s: float = getattr(settings, f"{limit}_rate_per_s")
    burst: int = getattr(settings, f"{limit}_burst")
    if rate_per_s == 0:
        return "any rate (this limit is off)"
    return f"{rate_per_s:g} a second after a burst of {burst}"


def _head_refused(operation: str) -> Spec:
    return {
        "tags": ["stream"],
        "operationId": f"{operation}Head",
        "summary": "HEAD is refused",
        "description": "Answering HEAD would have the side effects of GET (a stored session, "
        "a demo run) for a response without a body, so it is refused before any handler runs.",
        "responses": {
            "405": {
                "description": "`method_not_allowed` (no body, as for any HEAD).",
                "headers": {
                    "Allow": {
                        "description": "The methods the path accepts.",
                        "required": True,
                        "schema": {"type": "string", "pattern": "GET"},
                    }
                },
            }
        },
    }


def _publish(settings: Settings) -> Spec:
    return {
        "tags": ["sessions"],
        "operationId": "publishEvents",
        "summary": "Publish events to a session",
        "description": (
            "Publishes one event (a JSON object) or a batch (a JSON array of 1 to "
            f"{MAX_BATCH_EVENTS} objects, published in order) to every stream of the session, "
            "on every worker, through the same path as the demo producer: each event is "
            "appended to the session's log and relayed live, so reconnecting clients get it "
            "replayed. A batch is checked as a whole and published whole or not at all, in "
            "one atomic step.\n\n"
            "An event named `finish` ends every stream of the session after it is delivered; "
            "it may only be the last event of a batch. A finished session takes no more "
            "events (409): nothing published after `finish` could reach a stream.\n\n"
            "A request is never published twice by the service. If Redis does not confirm it "
            "in time, the answer is 503 `outcome_unknown`: it may or may not have been "
            "published. Send an `Idempotency-Key` to make repeating it safe: for "
            f"{settings.idempotency_ttl_s:g} s, the same key and body to the same session "
            "answer the ids of the first publish (with `Idempotent-Replayed: true`) instead "
            "of publishing again.\n\n"
            "Publishing to a session nobody has connected to yet creates it, unless "
            "`require_issued_session` is on (then an unknown session is 404); a deleted "
            "session is not re-created (404)."
        ),
        "security": _security(settings),
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "The caller's name for this request, to repeat it safely.",
                "schema": {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY.pattern}$"},
                "example": "order-7781-paid",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": {
                        "oneOf": [
                            _ref("schemas", "EventIn"),
                            {
                                "type": "array",
                                "items": _ref("schemas", "EventIn"),
                                "minItems": 1,
                                "maxItems": MAX_BATCH_EVENTS,
                            },
                        ]
                    },
                    "examples": {
                        "single": {"value": {"event": "payment", "data": {"status": "paid"}}},
                        "batch": {
                            "value": [{"data": "step 1"}, {"event": "finish", "data": "done"}]
                        },
                    },
                }
            },
        },
        "responses": {
            "202": {
                "description": "Published (or, for a repeated `Idempotency-Key`, published "
                "before). A single event answers `{\"id\"}`, a batch `{\"ids\"}` in the "
                "order given.",
                "headers": {
                    "Idempotent-Replayed": {
                        "description": "`true` when these are the ids of an earlier publish.",
                        "schema": {"type": "string", "enum": ["true"]},
                    }
                },
                "content": {
                    JSON: {
                        "schema": {
                            "oneOf": [
                                _ref("schemas", "Published"),
                                _ref("schemas", "PublishedBatch"),
                            ]
                        }
                    }
                },
            },
            "400": _error("`invalid_parameter`: malformed `sessionId` or `Idempotency-Key`; "
                          "`malformed_body`: the body cannot be read or decoded with its "
                          "`Content-Encoding`; `malformed_json`: the body is not UTF-8 JSON, or "
                          "holds a number out of range; `invalid_event`: wrong shape, an unknown "
                          "field, a client-chosen `id`, a bad event name, a batch size outside "
                          f"1-{MAX_BATCH_EVENTS}, or a `finish` that is not last. A bad batch "
                          "publishes nothing."),
            **_auth_errors(),
            "404": _error("`session_not_found`: the session was deleted, or (only with "
                          "`require_issued_session`) never issued or expired."),
            "409": _error("`session_finished`: the session has finished; nothing published "
                          "now could reach a stream."),
            "422": _error("`idempotency_key_reused`: the `Idempotency-Key` was used for a "
                          "different request to this session."),
            "408": _error(
                f"`request_timeout`: the body did not arrive within {settings.body_timeout_s:g} "
                "s; the connection is closed."
            ),
            "413": _error(
                f"`payload_too_large`: the body exceeds {settings.max_body_bytes} bytes (also "
                "once decoded); "
                f"`event_too_large`: an event's data exceeds {settings.max_event_bytes} bytes "
                "(UTF-8, after serializing non-string data)."
            ),
            "415": {
                **_error(
                    "`unsupported_media_type`: the body is not `application/json`, or its "
                    "`Content-Encoding` is not `gzip` or `deflate` (then `Accept-Encoding` "
                    "lists those)."
                ),
                "headers": {
                    "Accept-Encoding": {
                        "description": "Sent when the `Content-Encoding` was the problem.",
                        "schema": {"type": "string"},
                    }
                },
            },
            "503": _error(
                "`unavailable`: Redis is unreachable, nothing was published; "
                "`outcome_unknown`: Redis did not confirm in time, the events may or may not "
                "have been published (repeat with the same `Idempotency-Key` to find out).",
                retry_after=True,
            ),
        },
    }


def _delete_session(settings: Settings) -> Spec:
    return {
        "tags": ["sessions"],
        "operationId": "deleteSession",
        "summary": "End a session",
        "description": "Publishes a final `finish` event (data `session deleted`) so every "
        "stream of the session, on every worker, receives it and closes, and removes the "
        "session's record, log and demo-run state, in one step. For a session TTL a "
        "tombstone remains: a resume is answered 204, a publish 404, a repeated DELETE 204. "
        "A later fresh connect with the same id starts a new, empty session (unless "
        "`require_issued_session` is on: then 404).",
        "security": _security(settings),
        "responses": {
            "204": {"description": "The session ended and its data is gone (or it was "
                    "deleted a moment ago)."},
            "400": _error("`invalid_parameter`: malformed `sessionId`."),
            **_auth_errors(),
            "404": _error("`session_not_found`: no such session (never existed or expired)."),
            "503": _error(
                "`unavailable`: Redis is unreachable, nothing was done; `outcome_unknown`: "
                "Redis did not confirm in time (repeat the request: it answers 204 once the "
                "session is gone).",
                retry_after=True,
            ),
        },
    }


def _session_status(settings: Settings) -> Spec:
    return {
        "tags": ["sessions"],
        "operationId": "getSessionStatus",
        "summary": "Read a session's status",
        "description": "Guarded by the same token as publishing, since it reveals activity.",
        "security": _security(settings),
        "responses": {
            "200": {
                "description": "The session's state now.",
                "content": {JSON: {"schema": _ref("schemas", "SessionStatus")}},
            },
            "400": _error("`invalid_parameter`: malformed `sessionId`."),
            **_auth_errors(),
            "404": _error("`session_not_found`: no such session (never existed or expired)."),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _healthz() -> Spec:
    return {
        "tags": ["operations"],
        "operationId": "healthz",
        "summary": "Liveness: the process answers",
        "responses": {
            "200": {
                "description": "Alive.",
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        }
                    }
                },
            }
        },
    }


def _readyz() -> Spec:
    return {
        "tags": ["operations"],
        "operationId": "readyz",
        "summary": "Readiness: Redis answers and the shared subscription is connected",
        "responses": {
            "200": {
                "description": "Ready; `listeners` is the number of streams open on this worker.",
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["status", "listeners"],
                            "properties": {
                                "status": {"const": "ready"},
                                "listeners": {"type": "integer", "minimum": 0},
                            },
                        }
                    }
                },
            },
            "503": {
                "description": "Not ready; `problems` says why.",
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["status", "problems"],
                            "properties": {
                                "status": {"const": "unavailable"},
                                "problems": {"type": "array", "items": {"type": "string"}},
                            },
                        }
                    }
                },
            },
        },
    }


def _static_op(summary: str, media_type: str, schema: Spec | None = None) -> Spec:
    return {
        "tags": ["operations"],
        "summary": summary,
        "responses": {
            "200": {
                "description": summary,
                "content": {media_type: {"schema": schema or {"type": "string"}}},
            }
        },
    }


def _security(settings: Settings) -> list[Spec]:
    # In the embedded default mode without tokens the API is open: anonymous access is allowed.
    if access_policy(settings) is AccessPolicy.OPEN:
        return [{}, {"bearerAuth": []}]
    return [{"bearerAuth": []}]


def _auth_errors() -> Spec:
    return {
        "401": _ref("responses", "Unauthorized"),
        "403": _error("`publishing_disabled`: no publish token or token key is configured and "
                      "Redis is external, so the session API is off; `insufficient_scope`: a "
                      "genuine signed token whose `sse.publish` does not name the session."),
    }


_SUBSCRIBER_SECURITY: list[Spec] = [
    {"subscriberBearer": []},
    {"subscriberQuery": []},
    {"subscriberCookie": []},
]


def _subscriber_errors() -> Spec:
    return {
        "401": _ref("responses", "Unauthorized"),
        "403": _error("`insufficient_scope`: a genuine, current token whose `sse.subscribe` "
                      "does not name the session."),
    }


def _demo_token() -> Spec:
    return {
        "tags": ["operations"],
        "operationId": "mintDemoToken",
        "summary": "A subscriber token for the demo page (embedded mode only)",
        "description": "Exists only without a `redis_url`: the single-process demo, whose "
        "session API is open too. Signs with a random key made at start, so the demo page can "
        "show the token flow without a secret in the page. A real page gets its token from "
        "its own backend instead.",
        "parameters": [
            {
                "name": "sessionId",
                "in": "query",
                "required": True,
                "schema": {"type": "string", "pattern": SESSION_ID_PATTERN.pattern},
            },
            {
                "name": "ttlS",
                "in": "query",
                "required": False,
                "description": f"Lifetime in seconds (default {DEFAULT_DEMO_TTL_S}).",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DEMO_TTL_S},
            },
        ],
        "responses": {
            "200": {
                "description": "The token, when it expires, the leeway the worker allows, and "
                "whether this worker checks subscriber tokens at all.",
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["token", "expiresAt", "leewayS", "subscribeAuth"],
                            "additionalProperties": False,
                            "properties": {
                                "token": {"type": "string"},
                                "expiresAt": {"type": "integer"},
                                "leewayS": {"type": "number", "minimum": 0},
                                "subscribeAuth": {"enum": ["open", "token"]},
                            },
                        }
                    }
                },
            },
            "400": _error("`invalid_parameter`: a malformed `sessionId`, or `ttlS` outside "
                          f"1-{MAX_DEMO_TTL_S}."),
        },
    }


def _error(description: str, *, retry_after: bool = False) -> Spec:
    response: Spec = {
        "description": description,
        "content": {JSON: {"schema": _ref("schemas", "Error")}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": _ref("headers", "RetryAfter")}
    return response


def _ref(kind: str, name: str) -> Spec:
    return {"$ref": f"#/components/{kind}/{name}"}


_SUBSCRIBER_TOKEN_TEXT = (
    "A signed token (JWT: HS256, RS256, ES256 or EdDSA) whose `sse.subscribe` claim lists the "
    "session id or a prefix of it ending in `*`; `exp` required. Checked only with "
    '`subscribe_auth = "token"`; the header wins over the query parameter, which wins over the '
    "cookie."
)


def _components(settings: Settings) -> Spec:
    return {
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the configured `publish_tokens` (`SSE_PUBLISH_TOKENS`), "
                "or a signed token (JWT) whose `sse.publish` claim names the session. Without "
                "either configured, the session API answers 403, except in the embedded default "
                "mode (no `redis_url`), where it is open.",
            },
            "subscriberBearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": _SUBSCRIBER_TOKEN_TEXT + " For fetch-based clients.",
            },
            "subscriberQuery": {
                "type": "apiKey",
                "in": "query",
                "name": ACCESS_TOKEN_PARAM,
                "description": _SUBSCRIBER_TOKEN_TEXT + " For clients that can set neither a "
                "header nor a cookie. URLs get logged by proxies; this service's own logs "
                "redact the parameter.",
            },
            "subscriberCookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": settings.token_cookie,
                "description": _SUBSCRIBER_TOKEN_TEXT + " For a native EventSource with "
                "`withCredentials` (credentialed CORS from another origin).",
            },
        },
        "parameters": {
            "SessionIdPath": {
                "name": "sessionId",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": SESSION_ID_PATTERN.pattern},
            }
        },
        "headers": {
            "NoStore": {
                "description": "`no-store`: the answer belongs to this client; no cache may keep "
                "it. Every response without a policy of its own carries it.",
                "required": True,
                "schema": {"const": "no-store"},
            },
            "RequestId": {
                "description": "The request's id, taken from the request or generated; the "
                "worker's log lines for the request name it.",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 64},
            },
            "RetryAfter": {
                "description": "Seconds to wait before retrying.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        },
        "responses": {
            "Unauthorized": {
                "description": "`unauthorized`: no token, or not a valid static one; "
                "`invalid_token`: a signed token that is malformed, forged, not yet valid, for "
                "another audience or issuer, or signed with an unknown key or algorithm; "
                "`token_expired`. `WWW-Authenticate` says the same in RFC 6750 terms "
                '(`error="invalid_token"`, `error_description`).',
                "headers": {
                    "WWW-Authenticate": {
                        "required": True,
                        "schema": {"type": "string", "pattern": "^Bearer "},
                    }
                },
                "content": {JSON: {"schema": _ref("schemas", "Error")}},
            },
            "Unavailable": _error(
                "`unavailable`: Redis is unreachable; retry shortly.", retry_after=True
            ),
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "additionalProperties": False,
                "properties": {
                    "error": {"type": "string", "description": "Stable machine-readable code."},
                    "detail": {"type": "string", "description": "Explanation for people."},
                },
            },
            "EventIn": {
                "type": "object",
                "required": ["data"],
                "additionalProperties": False,
                "description": "One event. A client-chosen `id` is refused with 400: event ids "
                "are log positions assigned on publish.",
                "properties": {
                    "event": {
                        "type": "string",
                        "pattern": EVENT_NAME_PATTERN,
                        "not": {"enum": [GAP_EVENT, UNAUTHORIZED_EVENT]},
                        "description": "The event name (EventSource `addEventListener` type). "
                        "Omit it for an unnamed `message` event. `finish` ends the session's "
                        f"streams; `{GAP_EVENT}` and `{UNAUTHORIZED_EVENT}` are reserved for the "
                        "service.",
                    },
                    "data": {
                        "description": "A string is sent as-is (any text; line breaks become "
                        "several `data:` lines and arrive as LF). Any other JSON value is sent "
                        "as compact JSON text. At most "
                        f"{settings.max_event_bytes} bytes of UTF-8.",
                    },
                },
            },
            "StreamEvent": {
                "type": "object",
                "description": "One event of a stream, as its fields (`id:`, `event:`, `data:` "
                "lines joined by LF, `retry:`). Comments (`: connected`, `: ping`) are not events.",
                "properties": {
                    "id": _ref("schemas", "EventId"),
                    "event": {"type": "string", "pattern": EVENT_NAME_PATTERN},
                    "data": {"type": "string"},
                    "retry": {"type": "integer", "minimum": 0},
                },
            },
            "Published": {
                "type": "object",
                "required": ["id"],
                "additionalProperties": False,
                "properties": {"id": _ref("schemas", "EventId")},
            },
            "PublishedBatch": {
                "type": "object",
                "required": ["ids"],
                "additionalProperties": False,
                "properties": {"ids": {"type": "array", "items": _ref("schemas", "EventId")}},
            },
            "EventId": {
                "type": "string",
                "pattern": EVENT_ID_PATTERN,
                "description": "Log position `<milliseconds>-<sequence>`; the SSE `id:`.",
            },
            "SessionStatus": {
                "type": "object",
                "required": [
                    "sessionId", "ttlMs", "subscribers", "localStreams", "finished", "lastEventId"
                ],
                "additionalProperties": False,
                "properties": {
                    "sessionId": {"type": "string"},
                    "ttlMs": {
                        "type": ["integer", "null"],
                        "description": "Milliseconds until the session expires (null: never).",
                    },
                    "subscribers": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Workers subscribed to the session's channel (Redis "
                        "PUBSUB NUMSUB): each worker subscribes once however many streams it has.",
                    },
                    "localStreams": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Streams of the session open on the worker that answered.",
                    },
                    "finished": {
                        "type": "boolean",
                        "description": "A `finish` event was published in the current run.",
                    },
                    "lastEventId": {
                        "oneOf": [_ref("schemas", "EventId"), {"type": "null"}],
                        "description": "The newest logged event id, or null if none.",
                    },
                },
            },
        },
    }
