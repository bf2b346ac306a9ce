"""Waiting on a condition, never on a clock: poll until it holds or the deadline passes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, interval_s: float = 0.01
) -> None:
    """Poll `condition` until it holds; fail the test if the deadline passes first."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - the condition lives in another process
            await asyncio.sleep(interval_s)
