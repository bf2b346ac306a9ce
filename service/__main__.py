"""Command line: `python -m service [serve|producer] [--config PATH]`, or `token ...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import socket
import sys
from pathlib import Path

from redis.exceptions import RedisError

from .app import create_app
from .cores import usable_cores
from .drain_pacing import shutdown_grace_s
from .logs import configure_logging
from .loops import new_event_loop
from .open_files import ConnectionBudget, connection_budget, raise_open_file_limit
from .producer_main import require_shared_redis, run_producer
from .serving import run_worker
from .settings import Settings, SettingsError, load_settings
from .startup import StartupError, bind_pool_sockets, bind_sockets, serving_line
from .supervisor import Supervisor, WorkerLink
from .token_cli import mint_command
from .token_keys import load_key_ring

log = logging.getLogger("service")

LISTEN_BACKLOG = 4096
# Python collects cycles after every 700 new container objects by default, so a busy
# worker runs the collector thousands of times a second and each run walks the young
# objects of thousands of streams; per-event objects are freed by reference counting
# anyway. At 5,000 streams this cut the worker's CPU per delivered event by about 17 %
# (`python -m bench fanout`); cyclic garbage just waits a little longer.
GC_THRESHOLDS = (50_000, 10, 10)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen component until it is stopped."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        return mint_command(argv[1:], os.environ)
    parser = argparse.ArgumentParser(
        prog="sse-fanout",
        description=__doc__,
        epilog="`sse-fanout token --help`: mint an access token for sessions.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "producer"],
        help="serve: HTTP worker (default); producer: the demo producer alone",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: the config/service.toml shipped with the package)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="serve: worker processes sharing the port (setting `workers`; default: one per "
        "usable core, or one without a redis_url)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, os.environ)
        if args.workers is not None:
            settings = settings_with_workers(settings, args.workers)
        if args.command == "serve":
            load_key_ring(settings)  # a key file that cannot be used stops the start, named
    except SettingsError as error:
        print(f"sse-fanout: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        if args.command == "producer":
            _produce(settings)
            return 0
        return _serve(settings)
    except (StartupError, RedisError) as error:
        # Start-up failures are the operator's to fix, not the code's: one line, no traceback.
        print(f"sse-fanout: {error}", file=sys.stderr)
        return 1


def _produce(settings: Settings) -> None:
    require_shared_redis(settings)
    with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
        runner.run(run_producer(settings))


def settings_with_workers(settings: Settings, workers: int) -> Settings:
    """`settings` with the `--workers` flag applied (checked like the setting)."""
    try:
        return dataclasses.replace(settings, workers=workers)
    except SettingsError as error:
        raise SettingsError(str(error).replace("setting 'workers'", "--workers", 1)) from None


def worker_count(settings: Settings) -> int:
    """Worker processes to run: as set, else one per usable core (one on the stand-in)."""
    if settings.workers:
        return settings.workers
    return 1 if settings.embedded_redis else usable_cores()


def _serve(settings: Settings) -> int:
    """Serve until told to stop; the exit status."""
    count = worker_count(settings)
    if count > 1:
        return _serve_pool(settings, count)
    budget = connection_budget(raise_open_file_limit(), settings)
    settings = budget.applied(settings)
    sockets = bind_sockets(settings.host, settings.port, LISTEN_BACKLOG)
    try:
        loop = new_event_loop(settings.event_loop)
    except StartupError:
        for sock in sockets:
            sock.close()
        raise
    run_worker(
        create_app(settings),
        loop=loop,
        sockets=sockets,
        # aiohttp's default of 128 pending connections overflows when thousands of clients
        # reconnect at once after another worker drains; the kernel caps it at somaxconn.
        backlog=LISTEN_BACKLOG,
        max_client_connections=budget.connections,
        shutdown_timeout_s=shutdown_grace_s(settings),
        # Called once every socket accepts connections: our one start-up line.
        on_serving=lambda: _say_serving(settings, sockets, loop, budget),
    )
    return 0


def _serve_pool(settings: Settings, count: int) -> int:
    """`count` workers on one port under a supervisor (see supervisor.py); its exit status."""
    budget = connection_budget(raise_open_file_limit(), settings)
    settings = budget.applied(settings)
    probe = new_event_loop(settings.event_loop)  # an unusable choice stops us here, once
    probe.close()
    pool = bind_pool_sockets(settings.host, settings.port, LISTEN_BACKLOG, count)

    def say_serving() -> None:
        line = serving_line(settings, pool[0], probe)  # names the loop the workers run
        log.info("%s; %d worker processes", line, count)
        if (note := budget.lowered_note()) is not None:
            log.warning("%s (each worker)", note)

    try:
        return Supervisor(
            count,
            lambda index, link: _pool_worker(settings, budget, pool, index, link),
            drain_timeout_s=settings.drain_timeout_s,
            release_sockets=lambda: _close_all(pool),
            on_serving=say_serving,
        ).run()
    finally:
        _close_all(pool)


def _pool_worker(
    settings: Settings,
    budget: ConnectionBudget,
    pool: list[list[socket.socket]],
    index: int,
    link: WorkerLink,
) -> int:
    """Worker `index` of a pool, in its own process: serve on its sockets; the exit status."""
    _close_all([sockets for other, sockets in enumerate(pool) if other != index])
    try:
        run_worker(
            create_app(settings),
            loop=new_event_loop(settings.event_loop),
            sockets=pool[index],
            backlog=LISTEN_BACKLOG,
            max_client_connections=budget.connections,
            shutdown_timeout_s=shutdown_grace_s(settings),
            on_serving=link.serving,
        )
    except (StartupError, RedisError) as error:
        link.failed(str(error))  # the supervisor decides whether to tell it and stop
        return 1
    return 0


def _close_all(pool: list[list[socket.socket]]) -> None:
    for sockets in pool:
        for sock in sockets:
            sock.close()


def _say_serving(
    settings: Settings,
    sockets: list[socket.socket],
    loop: asyncio.AbstractEventLoop,
    budget: ConnectionBudget,
) -> None:
    """The start-up line; then, if the open files cannot hold max_connections, a warning."""
    log.info(serving_line(settings, sockets, loop))
    if (note := budget.lowered_note()) is not None:
        log.warning(note)


if __name__ == "__main__":
    sys.exit(main())
