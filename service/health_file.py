"""A health signal for a process without an HTTP server (the producer): a file whose
modification time the process refreshes while it can do its work, and the check that reads it.

A file rather than a health port: the producer opens no socket, so there is nothing to bind,
expose or protect, and a container health check only needs to read a time stamp in the
container (`python -m service.health_file PATH MAX_AGE_S`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path


async def keep_fresh(path: Path, interval_s: float, healthy: Callable[[], Awaitable[bool]]) -> None:
    """Until cancelled: every `interval_s`, touch `path` if `healthy()` says so.

    The file is removed when this ends, so a stopped process never looks alive.
    """
    try:
        while True:
            if await healthy():
                _touch(path)
            await asyncio.sleep(interval_s)
    finally:
        _remove(path)


# Synchronous on purpose: setting a time stamp on a local file costs less than the thread hop
# that would hide it from the event loop.
def _touch(path: Path) -> None:
    path.touch()  # an existing file gets the current time as its modification time


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def is_fresh(path: Path, max_age_s: float, now: float | None = None) -> bool:
    """Whether `path` exists and was touched within the last `max_age_s` seconds."""
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - modified <= max_age_s


def main(argv: list[str]) -> int:
    """`python -m service.health_file PATH MAX_AGE_S`: exit 0 when fresh, 1 when not."""
    if len(argv) != 2:
        print("usage: python -m service.health_file PATH MAX_AGE_S", file=sys.stderr)
        return 2
    path, max_age_s = Path(argv[0]), float(argv[1])
    if is_fresh(path, max_age_s):
        return 0
    print(f"{path} is missing or older than {max_age_s:g}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
