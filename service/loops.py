"""The event loop a process runs on: uvloop when configured or, with "auto", when installed.

Much of a delivery is event-loop work (a wake-up, a timer, a socket write), which uvloop does
in C; docs/benchmarks.md has the measured difference. uvloop stays optional (the `bench`
extra) because the gain is moderate and it is not available everywhere. The service behaves
the same on either loop; the tests run on asyncio's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging

from .settings import StartupError

log = logging.getLogger(__name__)


def uvloop_installed() -> bool:
    """True when the optional uvloop package can be imported."""
    return importlib.util.find_spec("uvloop") is not None


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """A fresh loop for `choice` ("auto", "uvloop" or "asyncio"); StartupError when
    "uvloop" is asked for and not installed."""
    if choice == "uvloop" and not uvloop_installed():
        raise StartupError(
            "setting 'event_loop' is \"uvloop\" but uvloop is not installed "
            '(pip install uvloop, or set event_loop = "auto")'
        )
    if choice == "uvloop" or (choice == "auto" and uvloop_installed()):
        import uvloop  # noqa: PLC0415 - optional dependency, loaded only when used

        log.debug("running on uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()
