"""`POST /dev/token`: a subscriber token for the demo page, in the embedded mode only.

It shows the token flow without putting a secret in the page: the page asks this endpoint,
as a real page would ask its own backend, and the token is signed with a random key the
process made at start and that dies with it. The route exists only when there is no
`redis_url` (one process, nothing kept, the session API open too), so no deployment that
shares state has it.
"""

from __future__ import annotations

import time

from aiohttp import web

from .errors import InvalidParameter
from .resources import demo_signer_key, settings_key
from .responses import DemoToken
from .sessions import is_valid_session_id
from .tokens import expiry, mint_token

MAX_DEMO_TTL_S = 3600
DEFAULT_DEMO_TTL_S = 30


async def mint_demo_token(request: web.Request) -> web.Response:
    """A token that may subscribe to one session for `ttlS` seconds."""
    settings = request.app[settings_key]
    session_id = request.query.get("sessionId", "")
    if not is_valid_session_id(session_id):
        raise InvalidParameter("'sessionId' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    ttl_s = _ttl_s(request.query.get("ttlS"))
    now = time.time()
    token = mint_token(
        request.app[demo_signer_key],
        subscribe=[session_id],
        ttl_s=ttl_s,
        audience=settings.token_audience,
        issuer=settings.token_issuer,
        now=now,
    )
    body: DemoToken = {
        "token": token,
        "expiresAt": expiry(now, ttl_s),
        "leewayS": settings.token_leeway_s,
        "subscribeAuth": "token" if settings.subscribe_auth == "token" else "open",
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _ttl_s(text: str | None) -> int:
    if text is None:
        return DEFAULT_DEMO_TTL_S
    if not (text.isascii() and text.isdigit() and len(text) <= 4) or not (
        1 <= int(text) <= MAX_DEMO_TTL_S
    ):
        raise InvalidParameter(f"'ttlS' must be a whole number of seconds, 1-{MAX_DEMO_TTL_S}")
    return int(text)
