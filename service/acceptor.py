"""Accepting client connections, never more at once than the open-file budget allows.

aiohttp's sites leave accepting to the event loop. When the descriptor table is full,
asyncio's loop (CPython 3.11, `BaseSelectorEventLoop._accept_connection`) logs an ERROR with
a traceback for each of up to `backlog` failed accept() calls per wake-up and schedules as
many retries: a worker held at its open-file limit by idle connections wrote some 11,000 such
records a second and answered nothing, `/healthz` included. uvloop closes what it cannot
accept, silently. So the worker accepts itself, the same way on both loops: a reader callback
per listening socket takes pending connections in batches and hands each to aiohttp's
connection handler with `loop.connect_accepted_socket`.

- At the cap (`nofile - fd_reserve`, see open_files.py) a connection is accepted and closed
  at once: the client (or the proxy, which then tries another worker) learns at once, the
  descriptor is free again before the next accept, and the kernel's backlog does not fill
  with connections nobody will serve. One WARNING per interval says so.
- If accept() fails anyway (another process ate the system's files, or memory is short),
  accepting pauses for `PAUSE_S` and one WARNING per interval says why, without a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from .connection_stats import ConnectionStats
from .log_throttle import LogThrottle

log = logging.getLogger(__name__)

# Connections taken per wake-up of a listening socket; the rest wait for the next pass of
# the loop, so a burst of connects does not hold up streams that have events to write.
ACCEPT_BATCH = 128
# How long accepting pauses after accept() failed for want of a resource.
PAUSE_S = 0.5
# At most one line per this many seconds for each of the two conditions above.
LOG_INTERVAL_S = 10.0
# accept() failures that concern one connection only (the client gave up, a firewall rule).
_CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})

# Builds the connection handler of an accepted connection; the argument is called once the
# connection is closed.
ProtocolFactory = Callable[[Callable[[], None]], asyncio.Protocol]


class Acceptor:
    """Accepts on `sockets` while fewer than `cap` client connections are open."""

    def __init__(
        self,
        sockets: list[socket.socket],
        make_protocol: ProtocolFactory,
        cap: int,
        stats: ConnectionStats,
    ) -> None:
        self._sockets = sockets
        self._make_protocol = make_protocol
        self._cap = cap
        self._stats = stats
        self._connecting: set[asyncio.Task[None]] = set()
        self._resumes: dict[socket.socket, asyncio.TimerHandle] = {}
        self._refusals_log = LogThrottle(LOG_INTERVAL_S)
        self._failures_log = LogThrottle(LOG_INTERVAL_S)
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Accept on every socket from now on."""
        self._stats.cap = self._cap
        for sock in self._sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def close(self) -> None:
        """Stop accepting and close the listening sockets; connections already open stay."""
        for sock in self._sockets:
            handle = self._resumes.pop(sock, None)
            if handle is not None:
                handle.cancel()
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._connecting:
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _CONNECTION_ERRORS:
                    continue
                self._pause(sock, error)
                return
            if self._stats.open >= self._cap:
                self._refuse(conn)
                continue
            conn.setblocking(False)
            self._stats.open += 1
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _refuse(self, conn: socket.socket) -> None:
        conn.close()
        self._stats.refused += 1
        held = self._refusals_log.admit()
        if held is not None:
            log.warning(
                "at the cap of %d open client connections: refusing new ones "
                "(%d more refused since the last line)",
                self._cap,
                held,
            )

    def _pause(self, sock: socket.socket, error: OSError) -> None:
        """Stop accepting on `sock` for PAUSE_S: the same failure would repeat at once."""
        self._stats.accept_failures += 1
        held = self._failures_log.admit()
        if held is not None:
            log.warning(
                "cannot accept connections: %s (%d client connections open, cap %d); "
                "pausing accepts for %.1fs (%d more failures since the last line)",
                error.strerror or error,
                self._stats.open,
                self._cap,
                PAUSE_S,
                held,
            )
        self._loop.remove_reader(sock.fileno())
        self._resumes[sock] = self._loop.call_later(PAUSE_S, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        del self._resumes[sock]
        self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket) -> None:
        """Hand `conn` to a connection handler; its slot is freed once it is closed."""
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._stats.open -= 1

        try:
            await self._loop.connect_accepted_socket(lambda: self._make_protocol(free), conn)
        except BaseException as error:
            conn.close()
            free()
            if not isinstance(error, Exception):
                raise
            log.debug("an accepted connection could not be set up: %s", error)
