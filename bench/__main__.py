"""Command line: `python -m bench capacity|fanout|broadcast|seed|all [options]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import platform
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from service.loops import uvloop_installed

from .capacity import run_capacity
from .delivery import DeliveryStep, run_step
from .progress import Progress
from .report import plot, print_ratios, print_tables, ratios, write_json
from .seed import run_seed
from .stack import (
    NAIVE,
    SERVICE,
    RedisServer,
    Worker,
    WorkerConfig,
    bench_redis,
    log_directory,
    raise_fd_limit,
    start_worker,
    stop_worker,
)

SCENARIOS = ("capacity", "fanout", "broadcast", "seed")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _rates(text: str) -> list[float]:
    return [0.0 if part == "max" else float(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument(
        "--targets",
        default=f"{SERVICE},{NAIVE}",
        help="comma-separated: sse-fanout, naive (default: both)",
    )
    parser.add_argument(
        "--connections",
        type=_ints,
        default=None,
        help="capacity: levels (default 1000,5000,10000); fanout/broadcast: "
        "streams (default 1000); seed: sessions (default 2000)",
    )
    parser.add_argument(
        "--rates",
        type=_rates,
        default=None,
        help="fanout events/s over all sessions (default 1000,4000,8000,16000,32000,"
        "48000,max); broadcast events/s on the one session (default 5,20,50,100,max)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="seconds of publishing per paced step (default 4)",
    )
    parser.add_argument(
        "--max-events",
        type=int,
        # Enough work for CPU time, counted in 10 ms ticks, to be read to a few percent.
        default=200000,
        help="events published in an unpaced ('max') step (default 200000)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=200, help="seed: clients in flight at once (default 200)"
    )
    parser.add_argument(
        "--demo-interval-ms",
        type=int,
        default=20,
        help="seed: the demo producer's interval (default 20)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=2.0,
        help="capacity: seconds to hold the streams before measuring",
    )
    parser.add_argument(
        "--worker-loop",
        choices=["asyncio", "uvloop"],
        default="uvloop" if uvloop_installed() else "asyncio",
        help="event loop of both targets' workers (default: uvloop when installed)",
    )
    parser.add_argument(
        "--redis-url", default=None, help="use this Redis (flushed!) instead of starting one"
    )
    parser.add_argument(
        "--maxclients",
        type=int,
        default=10000,
        help="maxclients of the redis-server the bench starts (default 10000)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the latency-vs-load PNG here (needs matplotlib)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample each worker with py-spy; collapsed stacks go to this folder",
    )
    parser.add_argument("--progress", choices=["auto", "rich", "plain", "off"], default="auto")
    return parser.parse_args(argv)


@contextlib.asynccontextmanager
async def _redis(args: argparse.Namespace) -> AsyncIterator[str]:
    if args.redis_url:
        yield args.redis_url
        return
    server = RedisServer(maxclients=args.maxclients)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass(frozen=True, slots=True)
class Run:
    """What every scenario of one invocation shares."""

    args: argparse.Namespace
    targets: list[str]
    redis_url: str
    client: redis.Redis
    log_dir: Path
    progress: Progress

    @contextlib.asynccontextmanager
    async def workers(
        self, config: WorkerConfig, targets: list[str] | None = None
    ) -> AsyncIterator[list[Worker]]:
        """Start the targets (each in its own process), stop them after the block."""
        started: list[Worker] = []
        try:
            for target in targets or self.targets:
                started.append(
                    await start_worker(
                        target, self.redis_url, config, self.log_dir, self.args.profile
                    )
                )
            yield started
        finally:
            for worker in started:
                stop_worker(worker)


async def run(args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    targets = [t for t in args.targets.split(",") if t]
    results: list[dict[str, Any]] = []
    async with _redis(args) as url:
        client = bench_redis(url, max_connections=32)
        try:
            with log_directory() as log_dir:
                context = Run(args, targets, url, client, log_dir, progress)
                for scenario in scenarios:
                    await client.flushall()
                    results += await _RUNNERS[scenario](context)
        finally:
            await client.aclose()
    return results


async def _capacity(run: Run) -> list[dict[str, Any]]:
    results = []
    for connections in run.args.connections or [1000, 5000, 10000]:
        for target in run.targets:
            config = WorkerConfig(max_connections=connections + 10, loop=run.args.worker_loop)
            async with run.workers(config, [target]) as (worker,):
                results.append(
                    await run_capacity(connections, worker, run.client, run.progress, run.args.hold)
                )
            await run.client.flushall()
    return results


async def _delivery(run: Run, fanout: bool) -> list[dict[str, Any]]:
    args = run.args
    results = []
    # Paced steps up to and past where the naive design stops keeping p99 under 10 ms.
    default_rates = [1000, 4000, 8000, 16000, 32000, 48000, 0] if fanout else [5, 20, 50, 100, 0]
    for connections in args.connections or [1000]:
        config = WorkerConfig(max_connections=connections + 10, loop=args.worker_loop)
        async with run.workers(config) as workers:
            for rate in args.rates or default_rates:
                sessions = connections if fanout else 1
                if rate:
                    events = math.ceil(rate * args.duration / sessions)
                else:
                    events = math.ceil(args.max_events / connections)
                step = DeliveryStep(
                    "fanout" if fanout else "broadcast",
                    sessions=sessions,
                    streams_per_session=1 if fanout else connections,
                    events=max(2, events),
                    rate=rate,
                )
                # Targets alternate step by step, so each ratio compares neighbours in time.
                for worker in workers:
                    results.append(
                        await run_step(step, worker, run.client, run.redis_url, run.progress)
                    )
    return results


async def _fanout(run: Run) -> list[dict[str, Any]]:
    return await _delivery(run, fanout=True)


async def _broadcast(run: Run) -> list[dict[str, Any]]:
    return await _delivery(run, fanout=False)


async def _seed(run: Run) -> list[dict[str, Any]]:
    results = []
    for sessions in run.args.connections or [2000]:
        config = WorkerConfig(
            max_connections=sessions + 10,
            demo_runs=True,
            demo_interval_ms=run.args.demo_interval_ms,
            loop=run.args.worker_loop,
        )
        async with run.workers(config) as workers:
            for worker in workers:
                results.append(await run_seed(sessions, run.args.concurrency, worker, run.progress))
    return results


_RUNNERS = {"capacity": _capacity, "fanout": _fanout, "broadcast": _broadcast, "seed": _seed}


def _event_loop_factory() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional: the generator is lighter on it
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    progress = Progress(args.progress)
    factory = _event_loop_factory()
    started = time.time()
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(args, progress))
    print_tables(results, use_rich=progress.mode == "rich")
    found = ratios(results)
    print_ratios(found)
    if args.json:
        write_json(args.json, {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": _cpus(), "generator_loop": "uvloop" if factory else "asyncio",
                        "fd_limit": fd_limit},
            "results": results,
            "ratios": found,
        })  # fmt: skip
    if args.plot:
        plot(results, args.plot)
    return 0


def _cpus() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
