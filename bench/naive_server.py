"""BASELINE, not the service: the naive design, one Redis pub/sub connection per SSE client.

This is how most tutorials write an SSE endpoint over Redis: every request opens its own
subscription, reads messages one by one, and formats and writes each one for its client.
It exists only so `python -m bench` can measure sse-fanout against it in the same run; the
service never imports it. It speaks the same channels and payloads as the service (so the
same publisher drives both) and confirms its subscription before answering, so it loses no
events that were published after its stream started.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from service.keys import Keys

redis_key = web.AppKey("redis_key", redis.Redis)
demo_interval_key = web.AppKey("demo_interval_key", int)
KEYS = Keys()
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DEMO_EVENTS = 10


async def get_session_id(request: web.Request) -> web.Response:
    del request
    return web.Response(text=secrets.token_urlsafe(16), content_type="text/plain")


async def connect(request: web.Request) -> web.StreamResponse:
    session_id = request.query["sessionId"]
    channel = KEYS.channel(session_id)
    client = request.app[redis_key]
    pubsub: Any = client.pubsub()  # takes a connection of its own from the unbounded pool
    demo: asyncio.Task[None] | None = None
    try:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=5.0)  # the subscribe confirmation
        interval_ms = request.app[demo_interval_key]
        if interval_ms:
            demo = asyncio.create_task(_demo_run(client, channel, session_id, interval_ms))
        response = web.StreamResponse(headers=HEADERS)
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            event_id, event, data = message["data"].decode().split("\n", 2)
            frame = f"id: {event_id}\n"
            if event:
                frame += f"event: {event}\n"
            frame += "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"
            await response.write(frame.encode())
            if event == "finish":
                break
        return response
    finally:
        if demo is not None:
            demo.cancel()
        await pubsub.aclose()


async def _demo_run(client: redis.Redis, channel: str, session_id: str, interval_ms: int) -> None:
    """The seed's ten events, published by the request's own task as tutorials do."""
    for seq in range(DEMO_EVENTS):
        await asyncio.sleep(interval_ms / 1000)
        event = "finish" if seq == DEMO_EVENTS - 1 else ""
        now = time.strftime("%H:%M:%S")
        payload = f"{int(time.time() * 1000)}-{seq}\n{event}\nserver time: {now} id: {session_id}"
        await client.publish(channel, payload)


async def healthz(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok"})


def create_app(redis_url: str, demo_interval_ms: int) -> web.Application:
    async def redis_ctx(app: web.Application) -> Any:
        # Unbounded, as the pool was before redis-py 8 (which stops at 100 by default): the
        # design needs one connection per open stream.
        app[redis_key] = redis.Redis.from_url(redis_url, max_connections=2**31)
        yield
        await app[redis_key].aclose()

    app = web.Application()
    app[demo_interval_key] = demo_interval_ms
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/sse/getSessionId", get_session_id)
    app.router.add_get("/sse/connect", connect)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--demo-interval-ms", type=int, default=0)
    args = parser.parse_args()
    loop = None
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional

        loop = uvloop.new_event_loop()
    web.run_app(
        create_app(args.redis_url, args.demo_interval_ms),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1,
        handler_cancellation=True,
        loop=loop,
    )


if __name__ == "__main__":
    main()
