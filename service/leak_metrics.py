"""Leak metrics: open files against open streams, bytes held for clients, the oldest unsent event.

A worker that leaks shows it here before it runs out of anything: file descriptors that
outgrow its streams (sockets never closed), bytes piling up in socket buffers (clients that
stopped reading but were never dropped), and an event that has waited too long to be written
(a stream stuck between its inbox and its socket). Everything is read at scrape time; the
per-event path keeps no counter for it.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from .metrics import PREFIX, StreamMetrics

FD_DIRECTORY = Path("/proc/self/fd")


def open_fd_count(directory: Path = FD_DIRECTORY) -> int | None:
    """Open file descriptors of this process; None where /proc cannot tell (not Linux)."""
    try:
        # The listing's own descriptor is open while it is read: not one of ours.
        return max(0, len(os.listdir(directory)) - 1)
    except OSError:
        return None


def open_file_limit() -> int:
    """The soft open-file limit (`ulimit -n`) the worker runs with."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else soft


class LeakCollector:
    """Reads the leak gauges from the open streams and the process at scrape time."""

    def __init__(self, streams: StreamMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._streams = streams
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        """The gauges, freshly read; called by the registry on each scrape."""
        fds = open_fd_count()
        if fds is not None:
            yield _gauge(
                "open_fds",
                "Open file descriptors of the worker (compare with sse_open_streams)",
                fds,
            )
        yield _gauge("open_fds_limit", "The worker's soft open-file limit", open_file_limit())
        buffered = 0
        oldest: float | None = None
        for stream in self._streams.open_streams():
            buffered += stream.buffered_bytes
            since = stream.unsent_since
            if since is not None and (oldest is None or since < oldest):
                oldest = since
        yield _gauge(
            "client_buffered_bytes",
            "Bytes written for stream clients that their sockets have not sent yet",
            buffered,
        )
        yield _gauge(
            "oldest_unsent_event_age_seconds",
            "Age of the oldest event waiting for a stream to write it (0: none waiting)",
            0.0 if oldest is None else max(0.0, self._clock() - oldest),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
