"""Redis reply values as text: redis-py hands back bytes unless the client decodes replies."""

from __future__ import annotations


def reply_text(value: bytes | str | int) -> str:
    """`value` as text: bytes decoded as UTF-8, a string as it is, a number in decimal."""
    return value.decode() if isinstance(value, bytes) else str(value)
