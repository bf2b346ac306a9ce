"""The `redis+sentinel://` form of `redis_url`: which Sentinels to ask for which primary.

    redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/service[/db]
        [?sentinel_username=name&sentinel_password=secret]

The user and password are the Redis servers' (primary and replicas); Sentinels often have a
password of their own, or none, so theirs go in the query. A port defaults to 26379, the db
to 0. Parsing is pure, so a bad URL is refused when settings are read, naming the part that
is wrong and never echoing a password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

SCHEME = "redis+sentinel://"
DEFAULT_SENTINEL_PORT = 26379
EXAMPLE = "redis+sentinel://host:26379,host2:26379/mymaster/0"
_QUERY_KEYS = frozenset({"sentinel_username", "sentinel_password"})
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HOST = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """Where the Sentinels are, which primary to ask them for, and how to log in."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names Sentinels rather than one server or a cluster node."""
    return url.startswith(SCHEME)


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The parts of a `redis+sentinel://` URL; ValueError saying what is wrong otherwise."""
    if not is_sentinel_url(url):
        raise ValueError(f"must start with {SCHEME}")
    rest = url[len(SCHEME) :]
    if "#" in rest:
        raise ValueError("must not have a fragment ('#')")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    if not slash or not path:
        raise ValueError(f"must name the monitored service after the hosts, e.g. {EXAMPLE}")
    username, password = _credentials(credentials) if at else (None, None)
    sentinel_username, sentinel_password = _query(query)
    return SentinelAddress(
        sentinels=tuple(_host_port(part) for part in hosts.split(",")),
        service_name=_service(path),
        db=_db(path),
        username=username,
        password=password,
        sentinel_username=sentinel_username,
        sentinel_password=sentinel_password,
    )


def _credentials(text: str) -> tuple[str | None, str | None]:
    user, colon, password = text.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # an IPv6 address: [::1]:26379
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or not host or (port_text and not port_text.startswith(":")):
            raise ValueError(f"has a malformed IPv6 Sentinel address {text!r}")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
        if not _HOST.fullmatch(host):
            raise ValueError(f"needs Sentinel addresses as host[:port] separated by commas, "
                             f"got {text!r}")  # fmt: skip
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"has an invalid Sentinel port in {text!r}")
    return host, int(port_text)


def _service(path: str) -> str:
    service = path.split("/", maxsplit=1)[0]
    if not _SERVICE_NAME.fullmatch(service):
        raise ValueError(
            f"must name the monitored service (letters, digits, '.', '_', '-') after the "
            f"hosts, e.g. {EXAMPLE}"
        )
    return service


def _db(path: str) -> int:
    parts = path.split("/")
    if len(parts) == 1 or parts[1] == "":
        if len(parts) > 2:
            raise ValueError("must end with /service or /service/db")
        return 0
    if len(parts) > 2 or not parts[1].isdigit():
        raise ValueError("must end with /service or /service/db (db a number)")
    return int(parts[1])


def _query(query: str) -> tuple[str | None, str | None]:
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []
    values: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise ValueError(f"has an unknown parameter {key!r} (known: {sorted(_QUERY_KEYS)})")
        if key in values:
            raise ValueError(f"has the parameter {key!r} twice")
        values[key] = value
    return values.get("sentinel_username") or None, values.get("sentinel_password") or None
