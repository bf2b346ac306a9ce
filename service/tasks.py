"""Helpers for tasks that have an owner: stop them without swallowing the caller's cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel `tasks` and wait until they are done.

    A task's own CancelledError is expected and absorbed; if the caller itself is being
    cancelled meanwhile, that cancellation is re-raised rather than lost.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
