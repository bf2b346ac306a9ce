"""Who may use the session API: bearer tokens from settings, compared in constant time.

Subscribing needs only the unguessable session id (as in the original demo); publishing,
ending a session and reading its status need one of `publish_tokens`. With no token
configured the API is switched off (403), except in the embedded default mode (no
`redis_url`), where it is open so the single-process demo works out of the box.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import Enum

from .errors import PublishingDisabled, Unauthorized
from .settings import Settings

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
    if settings.publish_tokens:
        return AccessPolicy.TOKEN
    return AccessPolicy.OPEN if settings.embedded_redis else AccessPolicy.DISABLED


def token_matches(given: str, tokens: tuple[str, ...]) -> bool:
    """True if `given` equals one of `tokens`; every token is compared, each in constant time."""
    given_bytes = given.encode("utf-8", "replace")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given_bytes, token.encode("utf-8"))
    return matched


def authorize(headers: Mapping[str, str], settings: Settings) -> None:
    """Return if the request may use the session API; raise a 401 or 403 ServiceError if not.

    The token itself never appears in an error detail or a log line.
    """
    policy = access_policy(settings)
    if policy is AccessPolicy.OPEN:
        return
    if policy is AccessPolicy.DISABLED:
        raise PublishingDisabled(
            "the session API is disabled: no publish token is configured (publish_tokens)"
        )
    scheme, _, token = headers.get(AUTHORIZATION_HEADER, "").strip().partition(" ")
    if scheme.lower() != _SCHEME or not token.strip():
        raise Unauthorized(
            "a bearer token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    if not token_matches(token.strip(), settings.publish_tokens):
        raise Unauthorized(
            "the bearer token is not valid",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
