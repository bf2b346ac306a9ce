"""The worker's open-file budget: how many client connections and streams it may hold.

Every client connection is an open file, and so is every Redis connection, log and key file.
A worker that ran out of them could not accept a connection, not even a `/healthz` probe, and
asyncio logged an ERROR with a traceback for each failed accept(). So at start the soft
`RLIMIT_NOFILE` is raised to the hard limit, `fd_reserve` files are kept for everything but
clients, and the rest is the cap on open client connections of any kind (acceptor.py
refuses connections beyond it). Streams are held below that cap, so that past
`max_connections` a stream request still reaches the worker and gets its answer, and probes
and publishes still find room.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
from dataclasses import dataclass

from .settings import Settings
from .startup import StartupError

# An unlimited soft limit (never seen on Linux, where NOFILE is capped by fs.nr_open) counts
# as this many.
UNLIMITED_FILES = 1 << 20
# Client connections below which a worker is not worth starting.
MIN_CLIENT_CONNECTIONS = 16
# Of the client connection cap, this part is never taken by streams.
NON_STREAM_SHARE = 10


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one, as far as allowed; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft < hard):
        # Refused when the hard limit is above fs.nr_open: then the soft one stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """What one worker may hold, given its open-file limit."""

    open_files: int
    connections: int
    streams: int
    lowered_from: int | None = None

    def applied(self, settings: Settings) -> Settings:
        """`settings` with `max_connections` no higher than the open files allow."""
        if self.lowered_from is None:
            return settings
        return dataclasses.replace(settings, max_connections=self.streams)

    def lowered_note(self) -> str | None:
        """The start-up line saying `max_connections` was lowered, if it was."""
        if self.lowered_from is None:
            return None
        return (
            f"max_connections {self.lowered_from} is more than the open-file limit allows "
            f"(ulimit -n {self.open_files}, fd_reserve {self.open_files - self.connections}: "
            f"{self.connections} client connections); admitting at most {self.streams} "
            "streams; raise the limit or lower max_connections"
        )


def connection_budget(open_files: int, settings: Settings) -> ConnectionBudget:
    """The budget for a worker with `open_files` files; a StartupError if too small."""
    connections = open_files - settings.fd_reserve
    if connections < MIN_CLIENT_CONNECTIONS:
        raise StartupError(
            f"the open-file limit ({open_files}) minus fd_reserve ({settings.fd_reserve}) "
            f"leaves fewer than {MIN_CLIENT_CONNECTIONS} client connections; raise "
            "`ulimit -n` (LimitNOFILE=, ulimits.nofile) or lower fd_reserve"
        )
    room = connections - max(1, connections // NON_STREAM_SHARE)
    if settings.max_connections <= room:
        return ConnectionBudget(open_files, connections, settings.max_connections)
    return ConnectionBudget(open_files, connections, room, lowered_from=settings.max_connections)
