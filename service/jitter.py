"""Spread reconnects: every client told to come back gets a delay of its own.

A deploy, a crashed worker or a Redis blip sends every client of a worker away at the same
moment; told the same delay, they would all come back at the same moment too, and the next
worker would take the whole crowd in one burst. So the `retry:` each stream announces is
drawn from `retry_ms` +- `retry_spread`, and every `Retry-After` a 429 or 503 carries is
drawn from the declared wait up to `retry_spread` more (never less: a rate limit's wait is
what its bucket needs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable

from aiohttp import web

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]

RETRY_AFTER_HEADER = "Retry-After"
# The statuses whose Retry-After says "come back later" rather than a redirect's wait.
_SPREAD_STATUSES = frozenset({429, 503})


def retry_delay_ms(retry_ms: int, spread: float, rng: random.Random | None = None) -> int:
    """A `retry:` delay drawn uniformly from retry_ms x [1 - spread, 1 + spread]."""
    if spread <= 0 or retry_ms <= 0:
        return retry_ms
    draw = (rng or _RANDOM).uniform(1 - spread, 1 + spread)
    return max(0, round(retry_ms * draw))


def retry_after_s(declared_s: int, spread: float, rng: random.Random | None = None) -> int:
    """A `Retry-After` in whole seconds (RFC 9110), at least 1 and at least `declared_s`,
    drawn uniformly up to `declared_s` x (1 + spread), rounded up."""
    low = max(1, declared_s)
    high = max(low, math.ceil(low * (1 + spread)))
    return low if high == low else (rng or _RANDOM).randint(low, high)


def jitter_retry_after(spread: float) -> ResponseHook:
    """An `on_response_prepare` hook: spread the Retry-After of every 429 and 503 answer.

    One place for all of them (admission, drain, Redis away, rate limits, publishes whose
    outcome is unknown), so no code path hands a crowd one common wait. The spread is
    given by the app factory, so this module needs nothing of the app's resources.
    """

    async def spread_retry_after(request: web.Request, response: web.StreamResponse) -> None:
        del request
        declared = response.headers.get(RETRY_AFTER_HEADER)
        if response.status not in _SPREAD_STATUSES or declared is None or not declared.isdigit():
            return  # an HTTP date, or none: left as it is
        response.headers[RETRY_AFTER_HEADER] = str(retry_after_s(int(declared), spread))

    return spread_retry_after


# Draws need no secrecy, only independence between clients; tests pass a seeded generator.
_RANDOM = random.Random()
