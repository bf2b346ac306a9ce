"""Settings: one frozen dataclass, read from a TOML file and overridden by `SSE_*` variables."""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .assets import DEFAULT_CONFIG, read_asset
from .sentinel_url import SCHEME as SENTINEL_SCHEME
from .sentinel_url import is_sentinel_url, parse_sentinel_url

ENV_PREFIX = "SSE_"
MAX_DRAIN_SPREAD = 0.9
# Open files a worker needs besides client connections, at the very least: the listening
# sockets, the event loop's own, standard streams, a few Redis connections.
MIN_FD_RESERVE = 32


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or is out of range; the message names it."""


class StartupError(Exception):
    """The process cannot start (Redis unreachable, port busy, ...); the message is the whole
    story, printed as one line. Defined here, with SettingsError, so that the modules raising it
    need import nothing that imports them."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a worker or producer needs to know; see config/service.toml for each key."""

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str = ""
    redis_timeout_s: float = 2.0
    redis_max_connections: int = 3
    redis_cluster: bool = False
    key_prefix: str = "sse"
    session_ttl_s: float = 60.0
    require_issued_session: bool = False
    heartbeat_interval_s: float = 15.0
    retry_ms: int = 2000
    # Each stream's `retry:` is drawn from retry_ms x (1 +- retry_spread); see jitter.py.
    retry_spread: float = 0.5
    listener_queue_size: int = 256
    log_maxlen: int = 1000
    max_connections: int = 20000
    max_connections_per_session: int = 100
    # Client connections: deadlines, and open files kept for other uses (see open_files.py).
    header_timeout_s: float = 5.0
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    fd_reserve: int = 256
    cors_origins: tuple[str, ...] = ("*",)
    cors_credentials: bool = False
    trusted_proxies: tuple[str, ...] = ()
    session_rate_per_s: float = 10.0
    session_burst: int = 100
    run_rate_per_s: float = 2.0
    run_burst: int = 50
    rate_limit_addresses: int = 10_000
    ipv6_client_prefix: int = 64
    demo_runs: bool = True
    producer: str = "embedded"
    producer_event_count: int = 10
    producer_interval_ms: int = 1000
    producer_lease_ms: int = 5000
    producer_poll_ms: int = 1000
    run_idle_timeout_s: float = 5.0
    producer_health_file: str = ""
    drain_timeout_s: float = 10.0
    # Paced drain (drain_pacing.py): the part of drain_timeout_s over which streams are ended,
    # and the event, if any, each stream gets last.
    drain_spread: float = 0.5
    drain_event: str = ""
    # Readiness proves delivery: a canary through each pub/sub connection (see canary.py).
    canary_interval_s: float = 2.0
    canary_timeout_s: float = 1.0
    log_level: str = "INFO"
    log_format: str = "plain"
    event_loop: str = "auto"
    # Worker processes sharing the port; 0: one per usable core (see service/supervisor.py).
    workers: int = 0
    publish_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_event_bytes: int = 256 * 1024
    max_body_bytes: int = 1024 * 1024
    idempotency_ttl_s: float = 600.0
    write_timeout_s: float = 10.0
    replay_reads: int = 1
    # Signed access tokens (JWT): who may subscribe and publish. See service/tokens.py.
    subscribe_auth: str = "open"
    token_cookie: str = "sse_token"
    token_hs256_secrets: tuple[str, ...] = field(default=(), repr=False)
    token_public_keys: tuple[str, ...] = ()
    token_jwks_path: str = ""
    token_jwks_check_s: float = 2.0
    token_audience: str = ""
    token_issuer: str = ""
    token_leeway_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "listener_queue_size",
            "redis_max_connections",
            "log_maxlen",
            "max_connections",
            "max_connections_per_session",
            "producer_event_count",
            "producer_lease_ms",
            "producer_poll_ms",
            "max_event_bytes",
            "max_body_bytes",
            "session_burst",
            "run_burst",
            "rate_limit_addresses",
            "replay_reads",
        ):
            _require(name, getattr(self, name) >= 1, "must be at least 1")
        for name in (
            "session_ttl_s",
            "heartbeat_interval_s",
            "redis_timeout_s",
            "idempotency_ttl_s",
            "write_timeout_s",
            "header_timeout_s",
            "keepalive_timeout_s",
            "body_timeout_s",
            "canary_interval_s",
            "canary_timeout_s",
        ):
            _require(name, getattr(self, name) > 0, "must be positive")
        _require(
            "fd_reserve",
            self.fd_reserve >= MIN_FD_RESERVE,
            f"must be at least {MIN_FD_RESERVE} (Redis connections, logs and key files)",
        )
        _require("port", self.port >= 0, "must not be negative (0: any free port)")
        _require("port", self.port <= 65535, "must be at most 65535")
        _require(
            "redis_cluster",
            not self.redis_cluster or bool(self.redis_url),
            "needs a redis_url (any node of the cluster)",
        )
        _require(
            "redis_max_connections",
            self.redis_max_connections >= 2,
            "must be at least 2 (one is held by the shared subscription)",
        )
        _require(
            "replay_reads",
            self.replay_reads == 1 or self.replay_reads <= self.redis_max_connections - 2,
            "must leave a Redis connection for attaches: 1, or at most redis_max_connections - 2",
        )
        _require("retry_ms", self.retry_ms >= 0, "must not be negative")
        _require("workers", self.workers >= 0, "must not be negative (0: one per usable core)")
        _require(
            "workers",
            self.workers <= 1 or not self.embedded_redis,
            "above 1 needs a redis_url: the embedded stand-in lives inside one process, "
            "so its workers would not share sessions or events",
        )
        _require(
            "retry_spread", 0 <= self.retry_spread <= 1, "must be between 0 and 1 (a fraction)"
        )
        _require("producer_interval_ms", self.producer_interval_ms >= 0, "must not be negative")
        _require("drain_timeout_s", self.drain_timeout_s >= 0, "must not be negative")
        _require(
            "drain_spread",
            0 <= self.drain_spread <= MAX_DRAIN_SPREAD,
            f"must be between 0 and {MAX_DRAIN_SPREAD} (the rest of drain_timeout_s is left "
            "for the last streams to finish)",
        )
        _require(
            "drain_event",
            self.drain_event == ""
            or (
                _EVENT_NAME.fullmatch(self.drain_event) is not None
                and self.drain_event not in _NOT_DRAIN_EVENTS
            ),
            "must be empty (none) or an event name of 1-64 of A-Z, a-z, 0-9, '_', '-', '.', "
            f"other than {', '.join(sorted(_NOT_DRAIN_EVENTS))}",
        )
        _require("run_idle_timeout_s", self.run_idle_timeout_s >= 0, "must not be negative")
        _require("producer", self.producer in ("embedded", "off"), "must be 'embedded' or 'off'")
        _require("log_format", self.log_format in ("plain", "json"), "must be 'plain' or 'json'")
        _require(
            "event_loop",
            self.event_loop in ("auto", "uvloop", "asyncio"),
            "must be 'auto', 'uvloop' or 'asyncio'",
        )
        _require(
            "log_level", self.log_level.upper() in _LOG_LEVELS, f"must be one of {_LOG_LEVELS}"
        )
        _require(
            "key_prefix",
            bool(self.key_prefix) and "{" not in self.key_prefix,
            "must be non-empty and free of '{'",
        )
        _require(
            "redis_url",
            self.redis_url == "" or self.redis_url.startswith(_REDIS_SCHEMES),
            f"must be empty (embedded) or start with one of {_REDIS_SCHEMES}",
        )
        if is_sentinel_url(self.redis_url):
            self._check_sentinel_url()
        _require(
            "publish_tokens",
            all(len(t) >= 16 for t in self.publish_tokens),
            "each token must be at least 16 characters",
        )
        _check_token_settings(self)
        _check_edge(self)

    def _check_sentinel_url(self) -> None:
        try:
            parse_sentinel_url(self.redis_url)
        except ValueError as error:
            raise SettingsError(f"setting 'redis_url' (a Sentinel URL) {error}") from None
        _require(
            "redis_cluster",
            not self.redis_cluster,
            "cannot be combined with a redis+sentinel:// redis_url (Sentinel or Cluster)",
        )

    @property
    def embedded_redis(self) -> bool:
        """True when no Redis URL is configured and the in-process stand-in is used."""
        return self.redis_url == ""

    @property
    def token_keys_configured(self) -> bool:
        """True when any key to verify signed tokens is configured (the demo key aside)."""
        return bool(self.token_hs256_secrets or self.token_public_keys or self.token_jwks_path)


# --- Signed access tokens: the forms of the key settings ---

SUBSCRIBE_AUTH_MODES = ("open", "token")
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256", "EdDSA")
# A key id as it appears in a token's `kid` header and in the key settings.
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# 256 bits, the size of the HS256 digest (RFC 7518 section 3.2 asks for at least that).
MIN_HS256_SECRET_BYTES = 32
# RFC 6265 cookie-name characters (an HTTP token).
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One configured verification key: its id, its algorithm, and a secret or a PEM path."""

    kid: str
    alg: str
    value: str = field(repr=False)


def key_entries(settings: Settings) -> list[KeyEntry]:
    """The keys of `token_hs256_secrets` ("kid:secret") and `token_public_keys` ("kid:ALG:path")."""
    entries = []
    for text in settings.token_hs256_secrets:
        kid, sep, secret = text.partition(":")
        _require(
            "token_hs256_secrets",
            bool(sep) and KEY_ID_PATTERN.fullmatch(kid) is not None,
            "entries must read 'kid:secret' (kid: 1-64 of A-Z, a-z, 0-9, '.', '_', '-')",
        )
        _require(
            "token_hs256_secrets",
            len(secret.encode()) >= MIN_HS256_SECRET_BYTES,
            f"secret of key {kid!r} must be at least {MIN_HS256_SECRET_BYTES} bytes",
        )
        entries.append(KeyEntry(kid, "HS256", secret))
    for text in settings.token_public_keys:
        kid, _, rest = text.partition(":")
        alg, sep, path = rest.partition(":")
        _require(
            "token_public_keys",
            bool(sep and path)
            and KEY_ID_PATTERN.fullmatch(kid) is not None
            and alg in ASYMMETRIC_ALGORITHMS,
            f"entries must read 'kid:ALG:path/to/public.pem' with ALG one of "
            f"{', '.join(ASYMMETRIC_ALGORITHMS)}, got {text!r}",
        )
        entries.append(KeyEntry(kid, alg, path))
    kids = [entry.kid for entry in entries]
    duplicated = sorted({kid for kid in kids if kids.count(kid) > 1})
    _require("token_public_keys", not duplicated, f"key ids must be unique: {duplicated}")
    return entries


def _check_token_settings(settings: Settings) -> None:
    _require(
        "subscribe_auth",
        settings.subscribe_auth in SUBSCRIBE_AUTH_MODES,
        f"must be one of {SUBSCRIBE_AUTH_MODES}",
    )
    _require(
        "subscribe_auth",
        settings.subscribe_auth == "open"
        or settings.token_keys_configured
        or settings.embedded_redis,
        "'token' needs a key to verify tokens with: token_hs256_secrets, token_public_keys "
        "or token_jwks_path",
    )
    _require(
        "token_cookie",
        _COOKIE_NAME.fullmatch(settings.token_cookie) is not None,
        "must be a cookie name: 1-64 letters, digits or !#$%&'*+.^_`|~-",
    )
    _require("token_leeway_s", settings.token_leeway_s >= 0, "must not be negative")
    _require("token_jwks_check_s", settings.token_jwks_check_s > 0, "must be positive")
    key_entries(settings)


def _check_edge(settings: Settings) -> None:
    """CORS, rate limits and trusted proxies."""
    for name in ("session_rate_per_s", "run_rate_per_s"):
        _require(name, getattr(settings, name) >= 0, "must not be negative (0: no limit)")
    _require(
        "ipv6_client_prefix",
        1 <= settings.ipv6_client_prefix <= 128,
        "must be 1 to 128 (the bits of an IPv6 address that name one client)",
    )
    bad_origins = [o for o in settings.cors_origins if o != "*" and not _ORIGIN.fullmatch(o)]
    _require(
        "cors_origins",
        not bad_origins,
        f"holds {bad_origins[:1]!r}: each must be '*' or an origin such as "
        "'https://app.example' or 'http://localhost:3000' (scheme, host, port; no path)",
    )
    _require(
        "cors_credentials",
        not (settings.cors_credentials and "*" in settings.cors_origins),
        "cannot be true while cors_origins allows '*': browsers refuse credentials from a "
        "wildcard; list the origins that may send them",
    )
    for network in settings.trusted_proxies:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise SettingsError(
                f"setting 'trusted_proxies' holds {network!r}, which is not an IP address or "
                "network (e.g. '10.0.0.5' or '172.16.0.0/12')"
            ) from None


# An origin as browsers send it: scheme://host[:port], no path, no trailing slash.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#@]+")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A drain event must not pass for an application's message, an EventSource event of its own,
# or an event the service gives a meaning (finish, gap, unauthorized).
_NOT_DRAIN_EVENTS = frozenset({"message", "open", "error", "finish", "gap", "unauthorized"})
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)


def _require(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise SettingsError(f"setting {name!r} {problem}")


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The TOML file at `path` (default: the shipped config/service.toml), overridden by
    `SSE_<KEY>` in `environ`."""
    source = str(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = path.read_bytes() if path is not None else read_asset(DEFAULT_CONFIG)
    except OSError as error:
        reason = error.strerror or str(error)
        raise SettingsError(f"cannot read config file {source}: {reason}") from error
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"config file {source} is not valid TOML: {error}") from error
    settings = build_settings(values)
    from_env = {
        key[len(ENV_PREFIX) :].lower(): text
        for key, text in (environ or {}).items()
        if key.startswith(ENV_PREFIX)
    }
    hints = typing.get_type_hints(Settings)
    parsed: dict[str, Any] = {}
    for name, text in from_env.items():
        if name not in hints:
            raise SettingsError(f"unknown setting {name!r} (from {ENV_PREFIX}{name.upper()})")
        parsed[name] = _parse_text(name, hints[name], text)
    return build_settings({**_as_dict(settings), **parsed})


def build_settings(values: Mapping[str, Any]) -> Settings:
    """Type-check `values` against the Settings fields and build the dataclass."""
    hints = typing.get_type_hints(Settings)
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if name not in hints:
            raise SettingsError(f"unknown setting {name!r}")
        checked[name] = _check_type(name, hints[name], value)
    return Settings(**checked)


def _as_dict(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def _check_type(name: str, hint: Any, value: Any) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SettingsError(f"setting {name!r} must be {_describe(hint)}, got {_shown(name, value)}")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_text(name: str, hint: Any, text: str) -> Any:
    """Parse an environment variable's text into the field's type."""
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(text)
            return lowered in _TRUE
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise SettingsError(
            f"setting {name!r} (from {ENV_PREFIX}{name.upper()}) must be {_describe(hint)}, "
            f"got {_shown(name, text)}"
        ) from None
    if typing.get_origin(hint) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _shown(name: str, value: Any) -> str:
    """Secrets never appear in error messages."""
    return "<hidden>" if name in _SECRET_SETTINGS else repr(value)


_SECRET_SETTINGS = frozenset({"publish_tokens", "token_hs256_secrets"})


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))
