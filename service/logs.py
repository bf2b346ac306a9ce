"""Logging configuration: plain lines for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from typing import Any
from urllib.parse import urlsplit

from .settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Structured fields a caller passed as `extra={"fields": {...}}` (e.g. the access log).
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(settings: Settings) -> dict[str, Any]:
    """A dictConfig for the root logger at the configured level and format."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if settings.log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"level": settings.log_level.upper(), "handlers": ["stderr"]},
        # aiohttp's access log repeats what our per-request and per-stream lines say.
        "loggers": {"aiohttp.access": {"level": "WARNING"}},
    }


def configure_logging(settings: Settings) -> None:
    """Apply `logging_config` to the process."""
    logging.config.dictConfig(logging_config(settings))


def redacted_url(url: str) -> str:
    """The URL without its passwords (user info, a `password=` or `sentinel_password=` query
    field), for logs."""
    parts = urlsplit(url)
    redacted = url
    user_info, at, host = parts.netloc.rpartition("@")
    if at:
        # Without a colon the user info may be the password alone (`redis://secret@host`):
        # only a name followed by a colon is known to be a name.
        user, colon, _ = user_info.partition(":")
        hidden = f"{user}:***@{host}" if user and colon else f"***@{host}"
        redacted = redacted.replace(parts.netloc, hidden, 1)
    if parts.query:
        query = _PASSWORD_FIELD.sub(r"\1***", parts.query)
        redacted = redacted.replace(f"?{parts.query}", f"?{query}", 1)
    return redacted


_PASSWORD_FIELD = re.compile(r"(?i)((?:^|&)(?:sentinel_)?password=)[^&]*")
