"""What a process checks and says as it starts: its listening sockets, opened before anything
else; the one line saying it is up; and StartupError, a failure told in one line."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from .auth import AccessPolicy, access_policy
from .logs import redacted_url
from .sentinel_url import is_sentinel_url
from .settings import Settings, StartupError

__all__ = [
    "StartupError",
    "bind_pool_sockets",
    "bind_sockets",
    "producer_line",
    "serving_line",
]


def bind_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as asyncio would open them.

    Opened before Redis is touched, so a busy port or an unknown host stops the process at
    once, with one line, instead of after the app started up and had to be torn down again.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise StartupError(
            f"cannot listen on {host}:{port}: the host name does not resolve ({error.strerror})"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sockets.append(_listen(family, kind, proto, address, backlog, reuse_port=False))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_pool_sockets(
    host: str, port: int, backlog: int, workers: int
) -> list[list[socket.socket]]:
    """For each of `workers` processes, its own listening sockets on the same addresses.

    Every socket has SO_REUSEPORT, so the kernel spreads new connections evenly over the
    workers. Other processes could join such a group unnoticed, so the addresses are first
    bound without it: a port someone already uses stops the start here, as with one worker.
    """
    probe = bind_sockets(host, port, 1)
    addresses = [(sock.family, sock.type, sock.proto, sock.getsockname()) for sock in probe]
    for sock in probe:
        sock.close()
    pool: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            pool.append([])
            for family, kind, proto, address in addresses:
                pool[-1].append(_listen(family, kind, proto, address, backlog, reuse_port=True))
    except BaseException:
        for sockets in pool:
            for sock in sockets:
                sock.close()
        raise
    return pool


def _listen(
    family: int, kind: int, proto: int, address: tuple[Any, ...], backlog: int, *, reuse_port: bool
) -> socket.socket:
    """One non-blocking listening socket on `address`; StartupError, in one line, if it is taken."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One socket per family, as asyncio does: "::" must not also claim IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as error:
            raise StartupError(f"cannot listen on {_http_url(address)}: {error.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def serving_line(
    settings: Settings, sockets: list[socket.socket], loop: asyncio.AbstractEventLoop
) -> str:
    """The line a worker logs once it accepts connections."""
    addresses = ", ".join(_http_url(sock.getsockname()) for sock in sockets)
    producer = (
        "demo runs executed in this worker"
        if settings.producer == "embedded"
        else "demo runs left to a separate producer"
    )
    return (
        f"serving on {addresses}; {redis_description(settings)}; {producer}; "
        f"{_session_api(settings)}; {_loop_name(loop)}"
    )


def _session_api(settings: Settings) -> str:
    policy = access_policy(settings)
    if policy is AccessPolicy.TOKEN:
        return f"session API: {len(settings.publish_tokens)} bearer token(s)"
    if policy is AccessPolicy.OPEN:
        return "session API: open (embedded mode, no token)"
    return "session API: off (no publish_tokens; set SSE_PUBLISH_TOKENS)"


def producer_line(settings: Settings, loop: asyncio.AbstractEventLoop) -> str:
    """The line a producer process logs once it watches for runs."""
    return (
        f"producer running: {redis_description(settings)}; demo runs of "
        f"{settings.producer_event_count} events {settings.producer_interval_ms} ms apart; "
        f"{_loop_name(loop)}"
    )


def redis_description(settings: Settings) -> str:
    """Which Redis the process uses, never with its password."""
    if settings.embedded_redis:
        return "redis: embedded in-process stand-in (this process only, nothing kept)"
    kind = "redis cluster" if settings.redis_cluster else "redis"
    if is_sentinel_url(settings.redis_url):
        kind = "redis primary named by sentinels"
    return f"{kind}: {redacted_url(settings.redis_url)}"


def _http_url(address: tuple[object, ...]) -> str:
    host, port = str(address[0]), address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return f"{type(loop).__module__.partition('.')[0]} event loop"
