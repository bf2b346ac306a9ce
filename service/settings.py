"""Settings: one frozen dataclass, read from a TOML file and overridden by `SSE_*` variables."""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .assets import DEFAULT_CONFIG, read_asset

ENV_PREFIX = "SSE_"


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or is out of range; the message names it."""


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
    listener_queue_size: int = 256
    log_maxlen: int = 1000
    max_connections: int = 20000
    max_connections_per_session: int = 100
    cors_origins: tuple[str, ...] = ("*",)
    demo_runs: bool = True
    producer: str = "embedded"
    producer_event_count: int = 10
    producer_interval_ms: int = 1000
    producer_lease_ms: int = 5000
    producer_poll_ms: int = 1000
    drain_timeout_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "plain"
    event_loop: str = "auto"
    publish_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_event_bytes: int = 256 * 1024
    max_body_bytes: int = 1024 * 1024
    idempotency_ttl_s: float = 600.0

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
        ):
            _require(name, getattr(self, name) >= 1, "must be at least 1")
        for name in (
            "session_ttl_s",
            "heartbeat_interval_s",
            "redis_timeout_s",
            "idempotency_ttl_s",
        ):
            _require(name, getattr(self, name) > 0, "must be positive")
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
        _require("retry_ms", self.retry_ms >= 0, "must not be negative")
        _require("producer_interval_ms", self.producer_interval_ms >= 0, "must not be negative")
        _require("drain_timeout_s", self.drain_timeout_s >= 0, "must not be negative")
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
        _require(
            "publish_tokens",
            all(len(t) >= 16 for t in self.publish_tokens),
            "each token must be at least 16 characters",
        )

    @property
    def embedded_redis(self) -> bool:
        """True when no Redis URL is configured and the in-process stand-in is used."""
        return self.redis_url == ""


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


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


_SECRET_SETTINGS = frozenset({"publish_tokens"})


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))
