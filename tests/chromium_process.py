"""Debian's Chromium, headless, driven by Playwright; never a browser Playwright downloads.

Without Chromium (or Playwright) a test that needs it skips, and fails instead when
`SSE_REQUIRE_REDIS=1` or `CI` is set, so CI can never pass it by skipping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis_process import require_tool

try:
    from playwright.async_api import Browser, async_playwright

    HAVE_PLAYWRIGHT = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_PLAYWRIGHT = False

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAUNCH_TIMEOUT_MS = 10_000


def require_chromium() -> str:
    """The Chromium path, when Playwright is there to drive it (see require_tool)."""
    require_tool(
        "playwright" if HAVE_PLAYWRIGHT else None,
        "playwright is not installed (pip install -e '.[test]')",
    )
    return require_tool(
        str(CHROMIUM) if CHROMIUM.exists() else None,
        f"{CHROMIUM} is missing (apt-get install chromium)",
    )


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed on exit."""
    executable = require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            yield launched
        finally:
            await launched.close()
