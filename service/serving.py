"""Run the worker's app until SIGINT or SIGTERM: `web.run_app`, on the edge's own runner.

`web.run_app` always builds a plain `web.AppRunner`, whose connections answer unparsable
requests in aiohttp's text (see protocol.py). This is the same life cycle on `EdgeAppRunner`:
the signal raises `GracefulExit` out of the loop, the main task is cancelled and runs the
runner's cleanup (the app's `on_shutdown` drain, then its cleanup contexts), and remaining
tasks are cancelled before the loop closes. It follows aiohttp 3.14's `run_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from aiohttp import web

from .protocol import EdgeAppRunner

# run_app's default: idle keep-alive connections close after this long.
KEEPALIVE_TIMEOUT_S = 75.0


def run_worker(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop,
    sockets: list[socket.socket],
    backlog: int,
    shutdown_timeout_s: float,
    on_serving: Callable[[], None],
) -> None:
    """Serve `app` on listening `sockets` until the process is told to stop, then shut down.

    `on_serving` is called once every socket accepts connections.
    """
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, sockets, backlog, shutdown_timeout_s, on_serving))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


async def _serve(
    app: web.Application,
    sockets: list[socket.socket],
    backlog: int,
    shutdown_timeout_s: float,
    on_serving: Callable[[], None],
) -> None:
    runner = EdgeAppRunner(
        app,
        handle_signals=True,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        access_log=None,
    )
    await runner.setup()
    try:
        for sock in sockets:
            # asyncio listens on each socket again, with this backlog.
            await web.SockSite(runner, sock, backlog=backlog).start()
        on_serving()
        await asyncio.Future()  # until cancelled on a signal
    finally:
        await runner.cleanup()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
