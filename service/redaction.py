"""What a log line may show of what a client sent: no secret, and nothing unprintable.

A subscriber token may travel in the `access_token` query parameter (for clients that can
set neither a header nor a cookie), and URLs are what logs print. The parameter's name is
compared after percent-decoding and case-folding, as a client could spell it either way.

A value a client chose (a decoded path, a header, a JSON field name) could carry CR/LF to
start a forged line, or terminal escapes and bidi overrides to hide one: every such value
goes through `loggable` before it reaches a log line.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

SECRET_PARAMS = frozenset({"access_token"})
REDACTED = "[redacted]"
# A query is logged up to this length (after redaction), so one line stays one readable line.
MAX_LOGGED_QUERY_CHARS = 512
# `&` separates parameters; `;` too for some parsers, so it is treated as one here as well.
_SEPARATORS = re.compile(r"([&;])")


def redacted_query(raw_query: str) -> str:
    """`raw_query` (still percent-encoded) with every secret parameter's value replaced."""
    parts = _SEPARATORS.split(raw_query)
    for index, part in enumerate(parts):
        name = part.partition("=")[0]
        if _is_secret(name):
            parts[index] = f"{name}={REDACTED}"
    query = "".join(parts)
    if len(query) > MAX_LOGGED_QUERY_CHARS:
        return query[:MAX_LOGGED_QUERY_CHARS] + "…"
    return query


def loggable(text: str) -> str:
    """`text` with every unprintable character (and the backslash) as a Python-style escape."""
    if text.isprintable() and "\\" not in text:
        return text  # nearly every value: no copy
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_NAMED_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _is_secret(name: str) -> bool:
    spellings = (unquote(name), unquote_plus(name))
    return any(spelling.strip().casefold() in SECRET_PARAMS for spelling in spellings)
