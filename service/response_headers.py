"""Headers that depend on who asks, set on every response: caching and `Vary: Origin`.

Session ids, stream replies and error answers belong to one client, and a shared cache must
not hand them to another: a response without a `Cache-Control` of its own gets `no-store`
(the demo page's static files set theirs). CORS answers echo the request's `Origin`, so
every response says it varies by it, or a cache could serve one origin's answer to another.
"""

from __future__ import annotations

from aiohttp import web

NO_STORE = "no-store"


async def set_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: the defaults above, keeping what a handler chose."""
    del request
    response.headers.setdefault("Cache-Control", NO_STORE)
    vary = response.headers.get("Vary", "")
    if "origin" not in {v.strip().lower() for v in vary.split(",")}:
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
