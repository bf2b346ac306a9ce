"""Requests aiohttp cannot parse: answered in the JSON error shape, logged as one quiet line.

aiohttp's connection handler (`aiohttp.web_protocol.RequestHandler`) rejects a request it
cannot parse (a bad request line, an over-long or malformed header, an undecodable body)
before any middleware runs. It answered with text quoting the offending bytes and logged the
error at ERROR with a traceback quoting them again: an over-long `Authorization` header put
the bearer token in the log. aiohttp offers no hook for either (aio-libs/aiohttp#3287), so:

- `ProtocolLog` is every connection's `logger`, a documented `RequestHandler` argument set
  through `web.Application(handler_args=...)`, so it applies to any server running the app,
  test servers included. A client's protocol error becomes one line naming the status and a
  fixed reason, never the bytes: INFO, or DEBUG when the app had already answered (a body
  that failed to decode is read again by aiohttp after the handler). Other records pass.
- `JsonErrorRequestHandler` overrides `RequestHandler.handle_error` to answer in the JSON
  error shape with a fitting status (400 or 431). aiohttp builds connection handlers in
  `web.Server.__call__` with no way to choose the class, so `EdgeServer` overrides that and
  `EdgeAppRunner._make_server` builds one; `serving.run_worker` runs the app on that runner.

Connections also get deadlines aiohttp lacks (it closes only idle connections, after its
keep-alive timeout, and nothing bounds a request head that trickles in):

- `JsonErrorRequestHandler` gives a request's line and headers `header_timeout_s` to arrive,
  from the connection's start or from the first byte of a request on a kept-alive
  connection. Late, it answers 408 in the JSON shape and closes; a connection that sent
  nothing at all is closed without a word. Idle kept-alive connections close after
  `keepalive_timeout_s` (aiohttp's own timer, set by `EdgeAppRunner`). The body's deadline
  is the handler's (bodies.py).
- It calls back when it closes, so the acceptor (acceptor.py) knows how many are open.

The second part relies on aiohttp internals (`web.Server._kwargs`, `AppRunner._make_server`,
the `handle_error` signature, parser exceptions chained as `__cause__`, and for the head
deadline `RequestHandler._waiter` (set while it awaits the next request), `_messages` and
`_request_in_progress`), checked against aiohttp 3.14.x; `pyproject.toml` caps aiohttp below
3.15 until it is checked again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from .connection_stats import ConnectionStats
from .errors import MalformedBody, RequestTimeout, body_fault, error_response
from .resources import connection_stats_key, settings_key
from .response_headers import NO_STORE

log = logging.getLogger(__name__)

# aiohttp's message for more than `max_headers` header fields (no exception class of its own).
_TOO_MANY_HEADERS = "Too many headers received"


@dataclass(frozen=True, slots=True)
class Fault:
    """A client's protocol error: how to answer it and whether the app already did."""

    status: int
    code: str
    detail: str
    answered_by_app: bool = False


_HEADERS_TOO_LARGE = Fault(
    431,
    "headers_too_large",
    "the request line or a header field is too long, or there are too many fields",
)
# Checked in order, so a subclass comes before its base.
_FAULTS: tuple[tuple[type[HttpProcessingError], Fault], ...] = (
    # aiohttp reports an over-long request line the same way as an over-long header.
    (LineTooLong, _HEADERS_TOO_LARGE),
    (BadStatusLine, Fault(400, "malformed_request", "the request line is malformed")),
    (InvalidURLError, Fault(400, "malformed_request", "the request target is malformed")),
    (HttpProcessingError, Fault(400, "malformed_request", "the request is not valid HTTP/1.1")),
)


def client_fault(error: BaseException | None) -> Fault | None:
    """The answer to a protocol error the client caused, or None for anything else."""
    if isinstance(error, web.RequestPayloadError):
        # A body that failed while being read, after the app had the request.
        return Fault(400, MalformedBody.code, body_fault(error), answered_by_app=True)
    if isinstance(error, PayloadEncodingError):
        return Fault(400, MalformedBody.code, body_fault(error))
    if isinstance(error, BadHttpMessage) and error.message == _TOO_MANY_HEADERS:
        return _HEADERS_TOO_LARGE
    return next((fault for kind, fault in _FAULTS if isinstance(error, kind)), None)


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, minus the tracebacks and quoted bytes of clients' mistakes."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Pass the record on, unless it reports a client's protocol error: then one line."""
        fault = client_fault(_exception(kwargs.get("exc_info")))
        if fault is None:
            super().log(level, msg, *args, **kwargs)
            return
        # aiohttp names the peer as the only argument of "Error handling request from %s".
        peer = f" from {args[0]}" if len(args) == 1 and isinstance(args[0], str) else ""
        quiet = level <= logging.DEBUG or fault.answered_by_app
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "refused a malformed request%s: %d %s (%s)",
            peer,
            fault.status,
            fault.code,
            fault.detail,
        )


def _exception(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def handler_args() -> dict[str, Any]:
    """What every connection of the app gets: the quiet protocol log, no body decoding.

    Bodies are decoded by the handler that reads them (see bodies.py).
    """
    return {"logger": ProtocolLog(logging.getLogger("aiohttp.server")), "auto_decompress": False}


def _request_timeout_answer(timeout_s: float) -> bytes:
    """A whole 408 response in the JSON error shape, written without a request to answer."""
    detail = f"the request line and headers did not arrive within {timeout_s:g} s"
    body = json.dumps({"error": RequestTimeout.code, "detail": detail}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: {NO_STORE}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it cannot parse in the JSON error shape,
    with a deadline on request heads."""

    __slots__ = ("_head_started", "_head_timer", "_header_timeout_s", "_on_closed", "_stats")

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout_s: float | None = None,
        stats: ConnectionStats | None = None,
        on_closed: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._stats = stats
        self._on_closed = on_closed
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock: the first request's head is due within the header timeout."""
        super().connection_made(transport)
        self._await_head(started=False)

    def data_received(self, data: bytes) -> None:
        """Parse as aiohttp does; a kept-alive connection's next request starts the clock."""
        if data:
            if self._head_timer is not None:
                self._head_started = True
            elif self._waiter is not None and not self._waiter.done():
                self._await_head(started=True)
        super().data_received(data)
        if self._head_timer is not None and self._messages:
            self._stop_head_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Clean up as aiohttp does, then tell whoever counts open connections."""
        self._stop_head_clock()
        try:
            super().connection_lost(exc)
        finally:
            on_closed, self._on_closed = self._on_closed, None
            if on_closed is not None:
                on_closed()

    def _await_head(self, *, started: bool) -> None:
        if self._header_timeout_s is None:
            return
        self._head_started = started
        self._head_timer = self._loop.call_later(self._header_timeout_s, self._head_late)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        """The header timeout passed without a whole request head."""
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        if self._stats is not None:
            self._stats.header_timeouts += 1
        if self._head_started and self._header_timeout_s is not None:
            log.debug("closed a connection whose request head was not complete in time")
            self.transport.write(_request_timeout_answer(self._header_timeout_s))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Log through `ProtocolLog` (aiohttp's own method does), then answer in JSON."""
        # Also raises ConnectionError if part of a response went out already.
        super().handle_error(request, status, exc, message)
        fault = client_fault(exc)
        if fault is not None:
            response = error_response(fault.status, fault.code, fault.detail)
        elif status == 500:
            response = error_response(500, "internal_error", "internal error")
        else:
            phrase = HTTPStatus(status).phrase
            response = error_response(status, "http_error", phrase)
        response.headers["Cache-Control"] = NO_STORE
        response.force_close()
        return response


class EdgeServer(web.Server):
    """aiohttp's low-level server, with `JsonErrorRequestHandler` connections."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout_s: float | None = None,
        stats: ConnectionStats | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._stats = stats

    def __call__(self) -> RequestHandler:
        return self.connection()

    def connection(self, on_closed: Callable[[], None] | None = None) -> JsonErrorRequestHandler:
        """A handler for one new connection; `on_closed` is called once it is closed."""
        return JsonErrorRequestHandler(
            self,
            loop=self._loop,
            header_timeout_s=self._header_timeout_s,
            stats=self._stats,
            on_closed=on_closed,
            **self._kwargs,
        )


class EdgeAppRunner(web.AppRunner):
    """An `AppRunner` whose server is an `EdgeServer`, with the app's connection deadlines."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", app[settings_key].keepalive_timeout_s)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return EdgeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            header_timeout_s=self.app[settings_key].header_timeout_s,
            stats=self.app[connection_stats_key],
            **server._kwargs,
        )
