"""Run the worker's app until SIGINT or SIGTERM: `web.run_app`, on the edge's own runner.

`web.run_app` always builds a plain `web.AppRunner`, whose connections answer unparsable
requests in aiohttp's text (see protocol.py), and lets the event loop accept connections
without a cap (see acceptor.py). This is the same life cycle on `EdgeAppRunner`, with the
worker's own `Acceptor` in place of aiohttp's sites: the signal raises `GracefulExit` out of
the loop, the main task is cancelled, stops accepting and runs the runner's cleanup (the
app's `on_shutdown` drain, then its cleanup contexts), and remaining tasks are cancelled
before the loop closes. It follows aiohttp 3.14's `run_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from aiohttp import web

from .acceptor import Acceptor
from .protocol import EdgeAppRunner, EdgeServer
from .resources import connection_stats_key


def run_worker(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop,
    sockets: list[socket.socket],
    backlog: int,
    max_client_connections: int,
    shutdown_timeout_s: float,
    on_serving: Callable[[], None],
) -> None:
    """Serve `app` on listening `sockets` until the process is told to stop, then shut down.

    At most `max_client_connections` are open at once; `on_serving` is called once every
    socket accepts connections.
    """
    asyncio.set_event_loop(loop)
    main = loop.create_task(
        _serve(
            app,
            sockets,
            backlog=backlog,
            max_client_connections=max_client_connections,
            shutdown_timeout_s=shutdown_timeout_s,
            on_serving=on_serving,
        )
    )
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
    *,
    backlog: int,
    max_client_connections: int,
    shutdown_timeout_s: float,
    on_serving: Callable[[], None],
) -> None:
    runner = EdgeAppRunner(
        app,
        handle_signals=True,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout_s,
        access_log=None,
    )
    await runner.setup()
    server = runner.server
    if not isinstance(server, EdgeServer):
        raise TypeError(f"EdgeAppRunner made a {type(server).__name__}, not an EdgeServer")
    for sock in sockets:
        sock.listen(backlog)
    stats = app[connection_stats_key]
    acceptor = Acceptor(sockets, server.connection, max_client_connections, stats)
    try:
        acceptor.start()
        on_serving()
        await asyncio.Future()  # until cancelled on a signal
    finally:
        # Refuse new connections first, as aiohttp's sites would stop, then drain.
        await acceptor.close()
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
