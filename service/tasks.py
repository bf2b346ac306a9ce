"""Helpers for tasks that have an owner: stop them without swallowing the caller's cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_AFTER_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel `tasks` and wait until they are done.

    A task's own CancelledError is expected and absorbed; if the caller itself is cancelled
    while it waits, that cancellation propagates rather than being lost. The caller's state is
    judged by the wait alone, not by `cancelling()`: aiohttp 3.14 runs the app's cleanup
    inside its main task after cancelling it (SIGTERM), so that count is already above zero
    there and must not cut every cleanup short.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        # TODO(PY312): on 3.11 asyncio.wait_for can swallow a cancellation that races with
        # its inner future (CPython gh-86296), and awaits inside fakeredis do lose one now and
        # then; the task then runs on. Cancelling again until it is done keeps close() bounded.
        while not task.done():
            # Raises CancelledError only if the caller is cancelled during this wait.
            await asyncio.wait([task], timeout=RECANCEL_AFTER_S)
            if not task.done():
                task.cancel()
        if not task.cancelled():
            task.result()  # a task that failed instead of stopping: its error goes up
