"""Signed access tokens (JWT): check one, read which sessions it covers, mint one.

A token's claims:

    {"sse": {"subscribe": ["4fQ1bXo0S7dUe2JkLr9zWa", "room-*"], "publish": ["room-*"]},
     "exp": 1790000000, "iat": 1789999400, "nbf": ..., "aud": ..., "iss": ...}

`sse.subscribe` and `sse.publish` list session ids, or id prefixes ending in `*` (`*` alone
covers every session); either may be left out. `exp` is required; `nbf` and `iat` are
honoured when present; `aud` and `iss` are checked when `token_audience` / `token_issuer` are
set. `token_leeway_s` of clock skew is allowed on each time. Errors never quote the token
nor any part of it, and neither does any log line.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import jwt

from .errors import ServiceError
from .settings import Settings
from .token_keys import ALGORITHMS, KeyRing, SigningKey

CLAIM = "sse"
# Longer than any token this service's claims need; checked before anything is decoded.
MAX_TOKEN_CHARS = 8192
MAX_PATTERNS = 1000
# A session id, or a prefix of one followed by `*`.
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}|[A-Za-z0-9_-]{0,63}\*")
REALM = "sse-fanout"


class Scope(Enum):
    """What a token may be used for, as named in its `sse` claim."""

    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a genuine token allows, and until when."""

    expires_at: float  # the `exp` claim, seconds since the epoch
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    def covers(self, scope: Scope, session_id: str) -> bool:
        """True if the token names `session_id`, or a prefix of it, for `scope`."""
        patterns = self.subscribe if scope is Scope.SUBSCRIBE else self.publish
        for pattern in patterns:
            if pattern.endswith("*"):
                if session_id.startswith(pattern[:-1]):
                    return True
            elif pattern == session_id:
                return True
        return False


def challenge(error: str | None = None, description: str | None = None) -> dict[str, str]:
    """The `WWW-Authenticate` header of RFC 6750 section 3 (descriptions are ours, never input)."""
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{description}"'
    return {"WWW-Authenticate": value}


class InvalidToken(ServiceError):
    """The token is malformed, forged, not (or no longer) valid, or not for this service."""

    status = 401
    code = "invalid_token"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers=challenge("invalid_token", detail))


class TokenExpired(InvalidToken):
    """A genuine token whose `exp` (plus the leeway) has passed; `grant` is what it allowed."""

    code = "token_expired"

    def __init__(self, grant: Grant) -> None:
        super().__init__("the token has expired")
        self.grant = grant


class InsufficientScope(ServiceError):
    """A genuine, current token that does not name this session for this use."""

    status = 403
    code = "insufficient_scope"

    def __init__(self, scope: Scope) -> None:
        detail = f"the token does not grant '{scope.value}' on this session"
        super().__init__(detail, headers=challenge("insufficient_scope", detail))


# PyJWT's errors, in our words: theirs could one day quote a claim.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token is from another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not allowed for its key"),
    (jwt.InvalidKeyError, "the token's key cannot verify it"),
    (jwt.DecodeError, "the token is malformed"),
)


class TokenVerifier:
    """Checks tokens against a key ring and the configured audience, issuer and leeway."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        audience: str = "",
        issuer: str = "",
        leeway_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._audience = audience or None
        self._issuer = issuer or None
        self.leeway_s = leeway_s
        self._clock = clock
        required = ["exp"] + ["aud"] * bool(audience) + ["iss"] * bool(issuer)
        self._options: Any = {
            "require": required,
            "verify_exp": False,  # checked below, so an expired token is still told apart
            "verify_aud": self._audience is not None,
            "enforce_minimum_key_length": True,
        }

    @classmethod
    def from_settings(cls, settings: Settings, keys: KeyRing) -> TokenVerifier:
        """A verifier with the audience, issuer and leeway of `settings`."""
        return cls(
            keys,
            audience=settings.token_audience,
            issuer=settings.token_issuer,
            leeway_s=settings.token_leeway_s,
        )

    @property
    def has_keys(self) -> bool:
        """False when no key is configured, so no token can be genuine."""
        return not self._keys.empty

    def verify(self, token: str) -> Grant:
        """The grant of a genuine, current token; InvalidToken (or TokenExpired) if not."""
        claims = self._decode(token)
        grant = _grant(claims)
        if self._clock() > grant.expires_at + self.leeway_s:
            raise TokenExpired(grant)
        return grant

    def _decode(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken(f"the token is longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"the token's algorithm must be one of {', '.join(ALGORITHMS)}")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the token's key id is malformed")
        candidates = self._keys.candidates(kid, alg)
        if not candidates:
            raise InvalidToken("no key with the token's key id and algorithm is configured")
        error: Exception | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self.leeway_s,
                    options=self._options,
                )
            except jwt.InvalidSignatureError as failed:
                error = failed  # without a kid, another key of the algorithm may verify it
                continue
            except (jwt.PyJWTError, ValueError, TypeError) as failed:
                error = failed
                break
            return claims
        raise InvalidToken(_reason(error)) from None


def _reason(error: Exception | None) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the token lacks the '{error.claim}' claim"
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "the token is not valid"


def _grant(claims: dict[str, Any]) -> Grant:
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidToken("the token's 'exp' must be a number of seconds since the epoch")
    scopes = claims.get(CLAIM, {})
    if not isinstance(scopes, dict):
        raise InvalidToken(f"the token's '{CLAIM}' claim must be an object")
    return Grant(
        expires_at=float(exp),
        subscribe=_patterns(scopes, Scope.SUBSCRIBE),
        publish=_patterns(scopes, Scope.PUBLISH),
    )


def _patterns(scopes: dict[str, Any], scope: Scope) -> tuple[str, ...]:
    value = scopes.get(scope.value, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(v, str) and SESSION_PATTERN.fullmatch(v) for v in value)
    ):
        raise InvalidToken(
            f"the token's '{CLAIM}.{scope.value}' must be a list of session ids or id "
            "prefixes ending in '*'"
        )
    return tuple(value)


def is_session_pattern(text: str) -> bool:
    """True for a session id, or an id prefix followed by `*`."""
    return SESSION_PATTERN.fullmatch(text) is not None


def expiry(now: float, ttl_s: float) -> int:
    """The `exp` of a token minted at `now` for `ttl_s`: whole seconds, never less than asked."""
    return math.ceil(now + ttl_s)


def mint_token(
    key: SigningKey,
    *,
    subscribe: Sequence[str] = (),
    publish: Sequence[str] = (),
    ttl_s: float,
    audience: str = "",
    issuer: str = "",
    now: float | None = None,
) -> str:
    """A token granting `subscribe` and `publish` on sessions (ids or `prefix*`) for `ttl_s`."""
    for pattern in (*subscribe, *publish):
        if not is_session_pattern(pattern):
            raise ValueError(f"not a session id or id prefix ending in '*': {pattern!r}")
    now = time.time() if now is None else now
    scopes: dict[str, list[str]] = {}
    if subscribe:
        scopes[Scope.SUBSCRIBE.value] = list(subscribe)
    if publish:
        scopes[Scope.PUBLISH.value] = list(publish)
    claims: dict[str, Any] = {CLAIM: scopes, "iat": int(now), "exp": expiry(now, ttl_s)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, key.key, algorithm=key.alg, headers={"kid": key.kid})
