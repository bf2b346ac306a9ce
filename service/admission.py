"""Admission control for streams: how many one worker holds, in all and per session.

Counted from the moment a connect request is admitted, not once its stream is running, so a
burst of connects cannot overshoot the limits while its subscriptions are being set up.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from .errors import TooManyConnections, TooManyForSession


class Admission:
    """Admits a stream if the worker and its session are below their limits."""

    def __init__(self, max_streams: int, max_streams_per_session: int) -> None:
        self._max_streams = max_streams
        self._max_per_session = max_streams_per_session
        self._per_session: Counter[str] = Counter()
        self._total = 0

    @property
    def admitted(self) -> int:
        """Streams admitted and not yet ended."""
        return self._total

    @contextlib.contextmanager
    def admit(self, session_id: str) -> Iterator[None]:
        """Hold a place for one stream of `session_id` for the duration of the block."""
        if self._total >= self._max_streams:
            raise TooManyConnections(
                "this worker is at its connection limit", headers={"Retry-After": "1"}
            )
        if self._per_session[session_id] >= self._max_per_session:
            raise TooManyForSession("too many open streams for this session")
        self._total += 1
        self._per_session[session_id] += 1
        try:
            yield
        finally:
            self._total -= 1
            self._per_session[session_id] -= 1
            if not self._per_session[session_id]:
                del self._per_session[session_id]
