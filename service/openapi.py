"""The OpenAPI 3.1 description of every HTTP endpoint, served at /openapi.json.

What the code knows, the document reads from it: body schemas are generated from the types
that validate requests (submission.py) and type the answers (responses.py); each error answer
is listed by its exception class, so its status and code are the ones the code raises; limits,
rates and id entropy come from the settings and the modules' constants. What is written here
is only prose: when and why each answer happens. `tests/test_openapi.py` checks the rest:
every route is documented and every documented error can be produced.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from . import __version__
from .api import IDEMPOTENCY_KEY
from .auth import AccessPolicy, access_policy
from .bodies import ACCEPTED_ENCODINGS, DecodedBodyTooLarge, UnsupportedEncoding
from .demo_token import DEFAULT_DEMO_TTL_S, MAX_DEMO_TTL_S
from .envelope import EVENT_ID_PATTERN, FINISH_EVENT
from .errors import (
    ErrorBody,
    EventTooLarge,
    IdempotencyKeyReused,
    InvalidEvent,
    InvalidParameter,
    MalformedBody,
    MalformedJson,
    OutcomeUnknown,
    PublishingDisabled,
    RateLimited,
    RequestTimeout,
    ServiceError,
    SessionFinished,
    SessionNotFound,
    TooManyConnections,
    TooManyForSession,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from .openapi_text import (
    DELETE_TEXT,
    INFO_TEXT,
    SUBSCRIBER_TOKEN_TEXT,
    connect_text,
    finished_text,
    publish_text,
    stream_text,
)
from .resources import settings_key
from .responses import (
    Alive,
    DemoToken,
    Failed,
    NotReady,
    Published,
    PublishedIds,
    Ready,
    SessionStatus,
    StreamEvent,
)
from .sessions import BASE62, SESSION_ID_BITS, SESSION_ID_LENGTH, SESSION_ID_PATTERN
from .settings import Settings
from .submission import MAX_BATCH_EVENTS, PublishBody
from .subscribe_auth import ACCESS_TOKEN_PARAM
from .tokens import InsufficientScope, InvalidToken, TokenExpired

# An empty resume point counts as none, as EventSource sends no header before the first id.
RESUME_POINT_PATTERN = f"^({EVENT_ID_PATTERN})?$"
EVENT_ID_EXAMPLE = "1718000000000-0"
JSON = "application/json"

Spec = dict[str, Any]
# One documented error answer: the exception that makes it, and when that happens.
Reason = tuple[type[ServiceError], str]

# Exceptions raised with a header the answer documents, and that header's component.
_ERROR_HEADERS: dict[type[ServiceError], str] = {
    RateLimited: "RetryAfter",
    Unavailable: "RetryAfter",
    OutcomeUnknown: "RetryAfter",
    TooManyConnections: "RetryAfter",
    Unauthorized: "WwwAuthenticate",
    InvalidToken: "WwwAuthenticate",
    TokenExpired: "WwwAuthenticate",
    UnsupportedEncoding: "AcceptEncoding",
}
# The types whose schemas are components, by their own names.
_BODY_TYPES: tuple[Any, ...] = (
    ErrorBody, Published, PublishedIds, SessionStatus, StreamEvent, Alive, Failed, Ready,
    NotReady, DemoToken,
)  # fmt: skip


async def openapi_json(request: web.Request) -> web.Response:
    """This document, as JSON."""
    return web.json_response(build_document(request.app[settings_key]))


@functools.lru_cache(maxsize=4)
def build_document(settings: Settings) -> Spec:
    """The complete OpenAPI document for a worker running with `settings`."""
    schemas: Spec = {}
    publish_body = _schema(PublishBody, schemas)
    for body_type in _BODY_TYPES:
        schemas[body_type.__name__] = _schema(body_type, schemas)
    static = {
        "/metrics": ("This worker's counters, Prometheus text format.", "text/plain"),
        "/docs": ("This document, rendered as a page.", "text/html"),
        "/": ("The browser demo page.", "text/html"),
        "/app.js": ("The demo page's script.", "text/javascript"),
        "/style.css": ("The demo page's style sheet.", "text/css"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sse-fanout",
            "version": __version__,
            "summary": "Server-Sent Events push gateway fanned out over Redis pub/sub.",
            "description": INFO_TEXT,
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
                "post": _publish(settings, publish_body),
            },
            "/healthz": {
                "get": _probe(
                    "healthz",
                    "Liveness: the process answers and has not failed beyond repair",
                    Alive,
                    Failed,
                )
            },
            "/readyz": {
                "get": _probe(
                    "readyz",
                    "Readiness: Redis answers and the shared subscription is connected",
                    Ready,
                    NotReady,
                )
            },
            "/openapi.json": {"get": _static_op("This document.", JSON, {"type": "object"})},
            **{path: {"get": _static_op(*about)} for path, about in static.items()},
            **({"/dev/token": {"post": _demo_token()}} if settings.embedded_redis else {}),
        },
        "components": _components(settings, schemas),
    }


class _SchemaGenerator(GenerateJsonSchema):
    """pydantic's JSON Schema, without the titles it makes up from field names."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        del schema
        return False


def _schema(body_type: Any, components: Spec) -> Spec:
    """`body_type`'s JSON Schema; the named types it uses are added to `components`."""
    schema: Spec = TypeAdapter(body_type).json_schema(
        ref_template="#/components/schemas/{model}", schema_generator=_SchemaGenerator
    )
    components.update(schema.pop("$defs", {}))
    return schema


def _errors(*reasons: Reason) -> Spec:
    """Error answers by status: each names its codes and when they happen."""
    by_status: dict[int, list[Reason]] = {}
    for reason in reasons:
        by_status.setdefault(reason[0].status, []).append(reason)
    return {str(status): _error_answer(group) for status, group in sorted(by_status.items())}


def _error_answer(group: Iterable[Reason]) -> Spec:
    group = list(group)
    answer: Spec = {
        "description": "; ".join(f"`{error.code}`: {why}" for error, why in group),
        "content": {JSON: {"schema": _ref("schemas", ErrorBody.__name__)}},
    }
    headers = {_ERROR_HEADERS.get(error) for error, _ in group} - {None}
    for header in sorted(h for h in headers if h is not None):
        # Required only when every code of the answer sends it.
        always = all(_ERROR_HEADERS.get(error) == header for error, _ in group)
        node = _ref("headers", header) if always else _ref("headers", f"{header}Sometimes")
        answer.setdefault("headers", {})[_HEADER_NAMES[header]] = node
    return answer


_HEADER_NAMES = {
    "RetryAfter": "Retry-After",
    "WwwAuthenticate": "WWW-Authenticate",
    "AcceptEncoding": "Accept-Encoding",
}

_UNAVAILABLE: Reason = (Unavailable, "Redis is unreachable; retry shortly.")


def _rate(settings: Settings, limit: str) -> str:
    rate_per_s: float = getattr(settings, f"{limit}_rate_per_s")
    burst: int = getattr(settings, f"{limit}_burst")
    if rate_per_s == 0:
        return "any rate (this limit is off)"
    return f"{rate_per_s:g} a second after a burst of {burst}"


def _get_session_id(settings: Settings) -> Spec:
    return {
        "tags": ["stream"],
        "operationId": "getSessionId",
        "summary": "Issue a new session id",
        "description": f"A fresh, unguessable id ({SESSION_ID_LENGTH} base-{len(BASE62)} "
        f"characters, {SESSION_ID_BITS} random bits), as plain text. It lives for the session "
        "TTL; a fresh connect renews it.",
        "responses": {
            "200": {
                "description": "The new session id.",
                "headers": {"Cache-Control": _ref("headers", "NoStore")},
                "content": {
                    "text/plain": {
                        "schema": {
                            "type": "string",
                            "pattern": f"^[{BASE62}]{{{SESSION_ID_LENGTH}}}$",
                        }
                    }
                },
            },
            **_errors(
                (
                    RateLimited,
                    "this client address asked this worker for session ids faster "
                    f"than {_rate(settings, 'session')}.",
                ),
                _UNAVAILABLE,
            ),
        },
    }


def _connect(settings: Settings) -> Spec:
    token_mode = settings.subscribe_auth == "token"
    return {
        **({"security": _SUBSCRIBER_SECURITY} if token_mode else {}),
        "tags": ["stream"],
        "operationId": "connect",
        "summary": "Open the session's event stream",
        "description": connect_text(settings, token_mode),
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
                "description": stream_text(settings),
                "headers": {
                    "X-Request-Id": _ref("headers", "RequestId"),
                    "Cache-Control": _ref("headers", "NoStore"),
                },
                "content": {"text/event-stream": {"schema": _ref("schemas", StreamEvent.__name__)}},
            },
            "204": {
                "description": finished_text(token_mode),
                "headers": {"Cache-Control": _ref("headers", "NoStore")},
            },
            **_errors(
                (
                    InvalidParameter,
                    "`sessionId` missing, repeated or malformed, or a malformed resume point.",
                ),
                *(_SUBSCRIBER_ERRORS if token_mode else ()),
                (
                    SessionNotFound,
                    "a fresh connect to an id that was not issued or has "
                    "expired (only with `require_issued_session`).",
                ),
                (
                    TooManyForSession,
                    "this session already has "
                    f"{settings.max_connections_per_session} streams on this worker.",
                ),
                (
                    RateLimited,
                    "a fresh connect from a client address that started demo runs "
                    f"on this worker faster than {_rate(settings, 'run')} (resumes are never "
                    "limited).",
                ),
                (
                    TooManyConnections,
                    f"this worker holds {settings.max_connections} streams "
                    "(only to clients that do not ask for `text/event-stream`).",
                ),
                (
                    Unavailable,
                    "Redis is unreachable or the worker is shutting down (only to "
                    "clients that do not ask for `text/event-stream`).",
                ),
            ),
        },
    }


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


def _publish(settings: Settings, body: Spec) -> Spec:
    return {
        "tags": ["sessions"],
        "operationId": "publishEvents",
        "summary": "Publish events to a session",
        "description": publish_text(MAX_BATCH_EVENTS, settings.idempotency_ttl_s),
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
                    "schema": body,
                    "examples": {
                        "single": {"value": {"event": "payment", "data": {"status": "paid"}}},
                        "batch": {
                            "value": [{"data": "step 1"}, {"event": FINISH_EVENT, "data": "done"}]
                        },
                    },
                }
            },
        },
        "responses": {
            "202": {
                "description": "Published (or, for a repeated `Idempotency-Key`, published "
                'before). A single event answers `{"id"}`, a batch `{"ids"}` in the '
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
                                _ref("schemas", Published.__name__),
                                _ref("schemas", PublishedIds.__name__),
                            ]
                        }
                    }
                },
            },
            **_errors(
                (InvalidParameter, "malformed `sessionId` or `Idempotency-Key`."),
                (MalformedBody, "the body cannot be read or decoded with its `Content-Encoding`."),
                (MalformedJson, "the body is not UTF-8 JSON, or holds a number out of range."),
                (
                    InvalidEvent,
                    "wrong shape, an unknown field, a client-chosen `id`, a bad or "
                    f"reserved event name, a batch size outside 1-{MAX_BATCH_EVENTS}, or a "
                    f"`{FINISH_EVENT}` that is not last. A bad batch publishes nothing.",
                ),
                *_SESSION_API_ERRORS,
                (
                    SessionNotFound,
                    "the session was deleted, or (only with "
                    "`require_issued_session`) never issued or expired.",
                ),
                (
                    RequestTimeout,
                    f"the body did not arrive within {settings.body_timeout_s:g} "
                    "s; the connection is closed.",
                ),
                (
                    SessionFinished,
                    "the session has finished; nothing published now could reach a stream.",
                ),
                (
                    DecodedBodyTooLarge,
                    f"the body exceeds {settings.max_body_bytes} bytes (also once decoded).",
                ),
                (
                    EventTooLarge,
                    f"an event's data exceeds {settings.max_event_bytes} bytes "
                    "(UTF-8, after serializing non-string data).",
                ),
                (UnsupportedMediaType, "the body is not `application/json`."),
                (
                    UnsupportedEncoding,
                    "its `Content-Encoding` is not one of "
                    f"{ACCEPTED_ENCODINGS} (`Accept-Encoding` lists those).",
                ),
                (
                    IdempotencyKeyReused,
                    "the `Idempotency-Key` was used for a different request to this session.",
                ),
                (Unavailable, "Redis is unreachable, nothing was published."),
                (
                    OutcomeUnknown,
                    "Redis did not confirm in time, the events may or may not "
                    "have been published (repeat with the same `Idempotency-Key` to find out).",
                ),
            ),
        },
    }


def _delete_session(settings: Settings) -> Spec:
    return {
        "tags": ["sessions"],
        "operationId": "deleteSession",
        "summary": "End a session",
        "description": DELETE_TEXT,
        "security": _security(settings),
        "responses": {
            "204": {
                "description": "The session ended and its data is gone (or it was "
                "deleted a moment ago)."
            },
            **_errors(
                (InvalidParameter, "malformed `sessionId`."),
                *_SESSION_API_ERRORS,
                (SessionNotFound, "no such session (never existed or expired)."),
                (Unavailable, "Redis is unreachable, nothing was done."),
                (
                    OutcomeUnknown,
                    "Redis did not confirm in time (repeat the request: it "
                    "answers 204 once the session is gone).",
                ),
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
            "200": _json_answer("The session's state now.", SessionStatus),
            **_errors(
                (InvalidParameter, "malformed `sessionId`."),
                *_SESSION_API_ERRORS,
                (SessionNotFound, "no such session (never existed or expired)."),
                _UNAVAILABLE,
            ),
        },
    }


def _probe(operation: str, summary: str, ok: Any, not_ok: Any = None) -> Spec:
    responses = {"200": _json_answer(ok.__doc__, ok)}
    if not_ok is not None:
        responses["503"] = _json_answer(not_ok.__doc__, not_ok)
    return {
        "tags": ["operations"],
        "operationId": operation,
        "summary": summary,
        "responses": responses,
    }


def _json_answer(description: str, body_type: Any) -> Spec:
    return {
        "description": description,
        "content": {JSON: {"schema": _ref("schemas", body_type.__name__)}},
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


_TOKEN_REFUSED: tuple[Reason, ...] = (
    (Unauthorized, "no token, or not a valid static one."),
    (
        InvalidToken,
        "a signed token that is malformed, forged, not yet valid, for another "
        "audience or issuer, or signed with an unknown key or algorithm. `WWW-Authenticate` "
        'says the same in RFC 6750 terms (`error="invalid_token"`, `error_description`).',
    ),
    (TokenExpired, "a genuine token whose `exp` (plus the leeway) has passed."),
)
_SESSION_API_ERRORS: tuple[Reason, ...] = (
    *_TOKEN_REFUSED,
    (
        PublishingDisabled,
        "no publish token or token key is configured and Redis is external, "
        "so the session API is off.",
    ),
    (InsufficientScope, "a genuine signed token whose `sse.publish` does not name the session."),
)
_SUBSCRIBER_ERRORS: tuple[Reason, ...] = (
    *_TOKEN_REFUSED,
    (
        InsufficientScope,
        "a genuine, current token whose `sse.subscribe` does not name the session.",
    ),
)
_SUBSCRIBER_SECURITY: list[Spec] = [
    {"subscriberBearer": []},
    {"subscriberQuery": []},
    {"subscriberCookie": []},
]


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
            "200": _json_answer(DemoToken.__doc__ or "", DemoToken),
            **_errors(
                (
                    InvalidParameter,
                    f"a malformed `sessionId`, or `ttlS` outside 1-{MAX_DEMO_TTL_S}.",
                ),
            ),
        },
    }


def _ref(kind: str, name: str) -> Spec:
    return {"$ref": f"#/components/{kind}/{name}"}


def _header(description: str, schema: Spec, *, required: bool = True) -> Spec:
    return {"description": description, "required": required, "schema": schema}


def _components(settings: Settings, schemas: Spec) -> Spec:
    retry_after = ("Seconds to wait before retrying.", {"type": "string", "pattern": "^[0-9]+$"})
    challenge = ("The refusal in RFC 6750 terms.", {"type": "string", "pattern": "^Bearer "})
    encodings = ("The encodings this worker decodes.", {"type": "string"})
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
                "description": SUBSCRIBER_TOKEN_TEXT + " For fetch-based clients.",
            },
            "subscriberQuery": {
                "type": "apiKey",
                "in": "query",
                "name": ACCESS_TOKEN_PARAM,
                "description": SUBSCRIBER_TOKEN_TEXT + " For clients that can set neither a "
                "header nor a cookie. URLs get logged by proxies; this service's own logs "
                "redact the parameter.",
            },
            "subscriberCookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": settings.token_cookie,
                "description": SUBSCRIBER_TOKEN_TEXT + " For a native EventSource with "
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
            "NoStore": _header(
                "`no-store`: the answer belongs to this client; no cache may keep it. Every "
                "response without a policy of its own carries it.",
                {"const": "no-store"},
            ),
            "RequestId": _header(
                "The request's id, taken from the request or generated; the worker's log "
                "lines for the request name it.",
                {"type": "string", "minLength": 1, "maxLength": 64},
            ),
            "RetryAfter": _header(*retry_after),
            "RetryAfterSometimes": _header(*retry_after, required=False),
            "WwwAuthenticate": _header(*challenge),
            "WwwAuthenticateSometimes": _header(*challenge, required=False),
            "AcceptEncoding": _header(*encodings),
            "AcceptEncodingSometimes": _header(*encodings, required=False),
        },
        "schemas": schemas,
    }
