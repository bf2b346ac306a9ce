"""One log line per HTTP request: method, path and query, status, duration and request id.

The query is logged with secrets redacted and the path with unprintable characters escaped
(see redaction.py): a token in a URL stays out of the log, and a path cannot forge a line.

aiohttp's own access log is switched off (see logs.py) because it cannot carry the request id
or structured fields. A stream's line is written when the stream ends, so its duration is the
stream's lifetime. Probes and scrapes log at DEBUG so they do not drown the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from .errors import Handler, request_id_of
from .redaction import loggable, redacted_query

log = logging.getLogger(__name__)

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# nginx's convention for "the client went away before the response was complete".
CLIENT_CLOSED_STATUS = 499


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time the request and log its outcome once, including when the client goes away."""
    started = time.monotonic()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_STATUS
        raise
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        if log.isEnabledFor(level):
            _log_request(request, level, status, time.monotonic() - started)


def _log_request(request: web.Request, level: int, status: int, duration_s: float) -> None:
    """Build and emit the line; only called when it will be written (redaction is not free)."""
    request_id = request_id_of(request)
    query = loggable(redacted_query(request.rel_url.raw_query_string))
    path = loggable(request.path)
    log.log(
        level,
        "%s %s%s %d %.3fs request=%s",
        request.method,
        path,
        f"?{query}" if query else "",
        status,
        duration_s,
        request_id,
        extra={
            "fields": {
                "method": request.method,
                "path": path,
                "query": query,
                "status": status,
                "duration_s": round(duration_s, 6),
                "request_id": request_id,
            }
        },
    )
