"""Who may open a stream. `subscribe_auth = "open"`: whoever knows the session id (the seed's
rule). `"token"`: whoever holds a signed token whose `sse.subscribe` names the session.

The token is read from, in this order: `Authorization: Bearer` (fetch-based clients), the
`access_token` query parameter (clients that can set neither a header nor a cookie; URLs end
up in logs, so this service's logs redact it), and the `token_cookie` cookie (a native
EventSource with `withCredentials`). The first one present is the one checked: an explicit
token wins over an ambient cookie, and a bad one is refused, never skipped.

When the token expires, the open stream sends `event: unauthorized` and ends. EventSource
then reconnects with the same URL and cookie, so the same expired token: that request gets
`204 No Content`, which makes EventSource stop instead of retrying forever, and the page opens
a new EventSource with a fresh token. A request with an expired token that is not an
EventSource's (no `Accept: text/event-stream`) gets the plain 401, so a person with curl
learns why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from .auth import bearer_token
from .errors import Unauthorized
from .resources import settings_key, token_verifier_key
from .tokens import InsufficientScope, InvalidToken, Scope, TokenExpired, challenge

ACCESS_TOKEN_PARAM = "access_token"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True, slots=True)
class StreamAccess:
    """The outcome for one connect: refused with 204, or allowed (until `ends_at`, if set)."""

    stop: bool = False
    ends_at: float | None = None  # seconds since the epoch, the token's exp plus the leeway

    def monotonic_deadline(self) -> float | None:
        """`ends_at` on the `time.monotonic()` clock the stream measures with."""
        if self.ends_at is None:
            return None
        return time.monotonic() + (self.ends_at - time.time())


OPEN = StreamAccess()
STOP = StreamAccess(stop=True)


def check_subscriber(request: web.Request, session_id: str) -> StreamAccess:
    """Allow, stop (204) or refuse (raises a 401 or 403 ServiceError) a connect to `session_id`."""
    if request.app[settings_key].subscribe_auth == "open":
        return OPEN
    token = subscriber_token(request)
    if token is None:
        raise Unauthorized(
            "a token is required: Authorization: Bearer, the "
            f"'{ACCESS_TOKEN_PARAM}' query parameter or the "
            f"'{request.app[settings_key].token_cookie}' cookie",
            headers=challenge(),
        )
    verifier = request.app[token_verifier_key]
    try:
        grant = verifier.verify(token)
    except TokenExpired as expired:
        if expired.grant.covers(Scope.SUBSCRIBE, session_id) and _from_event_source(request):
            return STOP
        raise
    if not grant.covers(Scope.SUBSCRIBE, session_id):
        raise InsufficientScope(Scope.SUBSCRIBE)
    return StreamAccess(ends_at=grant.expires_at + verifier.leeway_s)


def subscriber_token(request: web.Request) -> str | None:
    """The token from the header, else the query parameter, else the cookie; None if none."""
    header = bearer_token(request.headers)
    if header is not None:
        return header
    query = request.query.getall(ACCESS_TOKEN_PARAM, [])
    if len(query) > 1:
        raise InvalidToken(f"the '{ACCESS_TOKEN_PARAM}' query parameter is given more than once")
    if query:
        return query[0]
    return request.cookies.get(request.app[settings_key].token_cookie) or None


def _from_event_source(request: web.Request) -> bool:
    return EVENT_STREAM in request.headers.get("Accept", "")
