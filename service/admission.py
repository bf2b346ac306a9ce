"""Admission control for streams: how many one worker holds, in all and per session.

Counted from the moment a connect request is admitted, not once its stream is running, so a
burst of connects cannot overshoot the limits while its subscriptions are being set up.
"""

from __future__ import annotations

from collections import Counter

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

    def admit(self, session_id: str) -> Place:
        """Hold a place for one stream of `session_id` for the duration of a `with` block.

        Refused (TooManyConnections, TooManyForSession) when the worker or the session is full.
        """
        if self._total >= self._max_streams:
            raise TooManyConnections(
                "this worker is at its connection limit", headers={"Retry-After": "1"}
            )
        if self._per_session[session_id] >= self._max_per_session:
            raise TooManyForSession("too many open streams for this session")
        self._total += 1
        self._per_session[session_id] += 1
        return Place(self, session_id)

    def _leave(self, session_id: str) -> None:
        self._total -= 1
        self._per_session[session_id] -= 1
        if not self._per_session[session_id]:
            del self._per_session[session_id]


class Place:
    """One admitted stream's place, given back when its block ends.

    A slotted object, not a generator context manager: it is kept for as long as the stream
    is open, and a suspended generator with its frame costs about 300 bytes more a stream.
    """

    __slots__ = ("_admission", "_session_id")

    def __init__(self, admission: Admission, session_id: str) -> None:
        self._admission = admission
        self._session_id = session_id

    def __enter__(self) -> None:
        """The place is taken already, by `Admission.admit`."""

    def __exit__(self, *exc_info: object) -> None:
        """Give the place back."""
        self._admission._leave(self._session_id)
