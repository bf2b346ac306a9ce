"""Errors a client can cause, and the middleware that renders every error as one JSON shape."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from aiohttp import web
from aiohttp.http_exceptions import (
    ContentLengthError,
    PayloadEncodingError,
    TransferEncodingError,
)
from pydantic import ConfigDict, Field, with_config
from redis.exceptions import RedisError
from typing_extensions import TypedDict

from .redaction import loggable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-Id"


class ServiceError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status = 400
    code = "bad_request"
    # True: the connection closes after the answer, without reading the rest of the request.
    close_connection = False

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidParameter(ServiceError):
    """A query parameter, header or path segment is missing or malformed."""

    code = "invalid_parameter"


class SessionNotFound(ServiceError):
    """The session id was not issued by this service (with `require_issued_session`)."""

    status = 404
    code = "session_not_found"


class TooManyConnections(ServiceError):
    """This worker holds as many streams as it may; try another worker or later."""

    status = 503
    code = "too_many_connections"


class TooManyForSession(ServiceError):
    """This session already has as many streams on this worker as it may."""

    status = 429
    code = "too_many_session_connections"


class RateLimited(ServiceError):
    """This client address asked for more sessions or demo runs than its limit allows."""

    status = 429
    code = "rate_limited"


class RequestTimeout(ServiceError):
    """The request did not arrive within its deadline (`header_timeout_s`, `body_timeout_s`)."""

    status = 408
    code = "request_timeout"
    close_connection = True


class MalformedJson(ServiceError):
    """The request body is not valid UTF-8 JSON."""

    code = "malformed_json"


class MalformedBody(ServiceError):
    """The request body cannot be read or decoded (broken chunked framing, bad compression)."""

    code = "malformed_body"


class InvalidEvent(ServiceError):
    """A published event (or batch) has the wrong shape or a field breaks a rule."""

    code = "invalid_event"


class EventTooLarge(ServiceError):
    """A published event's data is larger than `max_event_bytes`."""

    status = 413
    code = "event_too_large"


class SessionFinished(ServiceError):
    """The session has finished: its streams have ended, so nothing more can reach them."""

    status = 409
    code = "session_finished"


class IdempotencyKeyReused(ServiceError):
    """An `Idempotency-Key` already used for a different request to this session."""

    status = 422
    code = "idempotency_key_reused"


class OutcomeUnknown(ServiceError):
    """Redis did not answer in time after the request was sent: it may or may not have run."""

    status = 503
    code = "outcome_unknown"


class UnsupportedMediaType(ServiceError):
    """The request body is not declared as `application/json`."""

    status = 415
    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    """No bearer token, or not one of the configured ones."""

    status = 401
    code = "unauthorized"


class PublishingDisabled(ServiceError):
    """No publish token is configured, so the session API is switched off."""

    status = 403
    code = "publishing_disabled"


class Unavailable(ServiceError):
    """Redis is unreachable or the worker is shutting down."""

    status = 503
    code = "unavailable"


@with_config(ConfigDict(extra="forbid"))
class ErrorBody(TypedDict):
    """Every error answer: a stable code for programs, a text for people."""

    error: Annotated[str, Field(description="Stable machine-readable code.")]
    detail: Annotated[str, Field(description="Explanation for people.")]


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The single JSON error shape: `{"error": code, "detail": text}`."""
    body: ErrorBody = {"error": code, "detail": detail}
    return web.json_response(body, status=status, headers=headers)


_HTTP_CODES = {
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


request_id_key = web.RequestKey("request_id_key", str)


def request_id_of(request: web.Request) -> str:
    """The caller's `X-Request-Id` if usable, else a new one; the same for the whole request."""
    request_id = request.get(request_id_key)
    if request_id is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")[:64]
        # 32 random hex digits, as uuid4().hex gave, at a quarter of its cost.
        request_id = given if given and given.isprintable() else secrets.token_hex(16)
        request[request_id_key] = request_id
    return request_id


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tag the request with an id; turn any error into the JSON shape, never a traceback."""
    request_id = request_id_of(request)
    try:
        response = await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = _http_error_response(request, error, request_id)
    except Exception as error:
        response = _error_response(request, error, request_id)
        if isinstance(error, ServiceError) and error.close_connection:
            response.headers[REQUEST_ID_HEADER] = request_id
            await _send_and_close(request, response)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def _send_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send `response` now, then close the connection without reading on.

    Left to aiohttp, a connection whose body was not read to its end is read on for up to
    its lingering time (10 s) before it closes: a client trickling its body would hold it.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


def _error_response(request: web.Request, error: Exception, request_id: str) -> web.Response:
    if isinstance(error, web.RequestPayloadError | PayloadEncodingError):
        error = MalformedBody(body_fault(error))
    if isinstance(error, ServiceError):
        log.info(
            "%s %s -> %d %s: %s [request %s]",
            request.method,
            loggable(request.path),
            error.status,
            error.code,
            loggable(error.detail),
            request_id,
        )
        return error_response(error.status, error.code, error.detail, error.headers)
    if isinstance(error, RedisError):
        log.warning(
            "%s %s -> 503, redis unavailable: %s [request %s]",
            request.method,
            loggable(request.path),
            error,
            request_id,
        )
        return error_response(
            503, Unavailable.code, "storage is unavailable, retry shortly", {"Retry-After": "1"}
        )
    log.error(
        "unhandled error in %s %s [request %s]",
        request.method,
        loggable(request.path),
        request_id,
        exc_info=error,
    )
    return error_response(500, "internal_error", f"internal error; quote request id {request_id}")


def _http_error_response(
    request: web.Request, error: web.HTTPException, request_id: str
) -> web.Response:
    code = _HTTP_CODES.get(error.status, "http_error")
    log.info(
        "%s %s -> %d %s [request %s]",
        request.method,
        loggable(request.path),
        error.status,
        code,
        request_id,
    )
    headers = {k: v for k, v in error.headers.items() if k in _KEPT_HTTP_HEADERS}
    return error_response(error.status, code, _http_detail(error), headers)


# Headers of aiohttp's HTTP errors that mean something to the client (405's methods).
_KEPT_HTTP_HEADERS = frozenset({"Allow"})


def body_fault(error: Exception) -> str:
    """Why a body could not be read, in words that never quote the bytes that were sent."""
    # aiohttp's C parser wraps the parser's error in RequestPayloadError; its Python one not.
    cause = error.__cause__ if isinstance(error, web.RequestPayloadError) else error
    if isinstance(cause, TransferEncodingError):
        return "the body's chunked transfer encoding is malformed"
    if isinstance(cause, ContentLengthError):
        return "the body ended before its declared Content-Length"
    return "the body could not be read"


def _http_detail(error: web.HTTPException) -> str:
    """aiohttp's own explanation when it has one (e.g. the body size limit), else the reason."""
    text = error.text or ""
    if text and not text.startswith(f"{error.status}:"):
        return text
    return error.reason
