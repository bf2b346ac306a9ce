"""What a log line may show of a request's query: everything but the values of secrets.

A subscriber token may travel in the `access_token` query parameter (for clients that can
set neither a header nor a cookie), and URLs are what logs print. The parameter's name is
compared after percent-decoding and case-folding, as a client could spell it either way.
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


def _is_secret(name: str) -> bool:
    spellings = (unquote(name), unquote_plus(name))
    return any(spelling.strip().casefold() in SECRET_PARAMS for spelling in spellings)
