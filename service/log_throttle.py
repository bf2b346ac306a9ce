"""At most one log line per interval for a condition a client can repeat at will."""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    """Lets one line through per `interval_s` and counts the ones it held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_at: float | None = None
        self._held = 0

    def admit(self) -> int | None:
        """None: stay quiet. Else log now; the number is how many were held back since."""
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next_at = now + self._interval_s
        return held
