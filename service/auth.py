"""Who may use the session API: static bearer tokens, or signed tokens scoped to sessions.

Publishing, ending a session and reading its status need one of `publish_tokens` (compared
in constant time) or a signed token (service/tokens.py) whose `sse.publish` names the
session. With neither configured the API is switched off (403), except in the embedded
default mode (no `redis_url`), where it is open so the single-process demo works out of the
box. Who may subscribe is subscribe_auth.py's business.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import Enum

from aiohttp import web

from .errors import PublishingDisabled, Unauthorized
from .resources import settings_key, token_verifier_key
from .settings import Settings
from .tokens import InsufficientScope, Scope

AUTHORIZATION_HEADER = "Authorization"
_SCHEME = "bearer"
_CHALLENGE = 'Bearer realm="sse-fanout"'


class AccessPolicy(Enum):
    """How the session API is guarded in this deployment."""

    TOKEN = "token"
    OPEN = "open"
    DISABLED = "disabled"


def access_policy(settings: Settings) -> AccessPolicy:
    """Tokens if any are configured; otherwise open only in embedded mode."""
    if settings.publish_tokens or settings.token_keys_configured:
        return AccessPolicy.TOKEN
    return AccessPolicy.OPEN if settings.embedded_redis else AccessPolicy.DISABLED


def token_matches(given: str, tokens: tuple[str, ...]) -> bool:
    """True if `given` equals one of `tokens`; every token is compared, each in constant time."""
    given_bytes = given.encode("utf-8", "replace")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given_bytes, token.encode("utf-8"))
    return matched


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of `Authorization: Bearer <token>` ('' if empty), None for any other header."""
    scheme, _, token = headers.get(AUTHORIZATION_HEADER, "").strip().partition(" ")
    return token.strip() if scheme.lower() == _SCHEME else None


def authorize(request: web.Request) -> None:
    """Return if the request may use the session API on its session; raise 401 or 403 if not.

    The token itself never appears in an error detail or a log line.
    """
    settings = request.app[settings_key]
    policy = access_policy(settings)
    if policy is AccessPolicy.OPEN:
        return
    if policy is AccessPolicy.DISABLED:
        raise PublishingDisabled(
            "the session API is disabled: no publish token or token key is configured "
            "(publish_tokens, token_hs256_secrets, token_public_keys, token_jwks_path)"
        )
    token = bearer_token(request.headers)
    if not token:
        raise Unauthorized(
            "a bearer token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    if token_matches(token, settings.publish_tokens):
        return
    if settings.token_keys_configured and token.count(".") == 2:
        grant = request.app[token_verifier_key].verify(token)  # 401 unless genuine, current
        if not grant.covers(Scope.PUBLISH, request.match_info["sessionId"]):
            raise InsufficientScope(Scope.PUBLISH)
        return
    raise Unauthorized(
        "the bearer token is not valid",
        headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
    )
