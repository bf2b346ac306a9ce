"""Apps built by the production factory and the test clients that talk to them: the types
the `make_settings` and `start_client` fixtures hand out, and the settings they start from."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.test_utils import TestClient

from service.redis.connections import RedisOpener
from service.settings import Settings

# A client on an app from `create_app`: `client.app` is that app.
AppClient = TestClient[web.Request, web.Application]

# Fast, test-friendly defaults; each test overrides what it is about.
FAST_SETTINGS: dict[str, Any] = {
    "producer_interval_ms": 20,
    "producer_poll_ms": 100,
    "producer_lease_ms": 1000,
    "session_ttl_s": 30.0,
    "retry_ms": 500,
    # Exact `retry:` bytes and Retry-After values; test_jitter.py covers the spread.
    "retry_spread": 0.0,
}


class MakeSettings(Protocol):
    """Settings from the fast defaults plus the keyword overrides given."""

    def __call__(self, **overrides: Any) -> Settings: ...


class StartClient(Protocol):
    """Start an app for `settings` (its Redis opened by `open_client`) and return a client;
    `client_kwargs` go to aiohttp's test client (a connector, say)."""

    def __call__(
        self, settings: Settings, open_client: RedisOpener = ..., /, **client_kwargs: Any
    ) -> Awaitable[AppClient]: ...
