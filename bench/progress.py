"""Progress display: a rich progress bar when rich is installed and the output is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Step(Protocol):
    """Advances one bar."""

    def advance(self, amount: int = 1) -> None: ...


class _Quiet:
    def advance(self, amount: int = 1) -> None:
        del amount


class _Plain:
    """One line per step with a rate-limited count, for logs and pipes."""

    def __init__(self, description: str, total: int) -> None:
        self._description = description
        self._total = total
        self._done = 0
        self._shown_at = 0.0

    def advance(self, amount: int = 1) -> None:
        self._done += amount
        now = time.monotonic()
        if self._done >= self._total or now - self._shown_at > 2.0:
            self._shown_at = now
            print(f"  {self._description}: {self._done}/{self._total}", file=sys.stderr)


class _RichStep:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: int = 1) -> None:
        self._progress.advance(self._task, amount)


class Progress:
    """Hands out one bar per step of a scenario; `mode` is "rich", "plain" or "off"."""

    def __init__(self, mode: str = "auto") -> None:
        if mode == "auto":
            mode = "rich" if _has_rich() and sys.stderr.isatty() else "plain"
        self.mode = mode

    @contextmanager
    def step(self, description: str, total: int) -> Iterator[Step]:
        if self.mode == "off":
            yield _Quiet()
        elif self.mode == "plain":
            print(f"{description} ...", file=sys.stderr)
            yield _Plain(description, total)
        else:
            from rich.progress import (  # noqa: PLC0415 - optional dependency
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress  # noqa: PLC0415

            columns = (
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(),
            )  # fmt: skip
            with RichProgress(*columns, transient=False) as progress:
                yield _RichStep(progress, progress.add_task(description, total=total))

    def note(self, text: str) -> None:
        if self.mode != "off":
            print(text, file=sys.stderr)


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True
