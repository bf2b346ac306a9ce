"""Command line: `python -m bench churn|capacity|fanout|broadcast|seed|all|table|drain [...]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import math
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from service.loops import uvloop_installed

from . import procs
from .capacity import run_capacity
from .churn import run_churn
from .delivery import DeliveryStep, run_step
from .drain import MODES, DrainSpec, print_drain, run_drain
from .nchan import nginx_binary
from .procs import Pinning
from .progress import Progress
from .report import plot, print_ratios, print_tables, ratios, sustained_ratios, write_json
from .seed import run_seed
from .stack import (
    CONTESTANTS,
    NCHAN,
    RedisServer,
    Worker,
    WorkerConfig,
    bench_redis,
    log_directory,
    missing,
    pin_redis,
    raise_fd_limit,
    start_worker,
    stop_worker,
)
from .summary import summarise, table_lines

SCENARIOS = ("churn", "capacity", "fanout", "broadcast", "seed")
# `table`: the steps behind the summary table, at the sizes it is quoted at.
TABLE: dict[str, dict[str, Any]] = {
    "churn": {},
    "capacity": {"connections": [5000]},
    "fanout": {"connections": [1000], "rates": [4000.0, 0.0]},
    "broadcast": {"connections": [1000], "rates": [0.0]},
}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _rates(text: str) -> list[float]:
    return [0.0 if part == "max" else float(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all", "table", "drain"])
    parser.add_argument(
        "--targets",
        default=",".join(CONTESTANTS),
        help=f"comma-separated contestants (default: {','.join(CONTESTANTS)}; one that "
        "cannot run here is skipped, with the reason)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run everything N times, contestants interleaved (their order rotating); "
        "the summary gives medians",
    )
    parser.add_argument(
        "--connections",
        type=_ints,
        default=None,
        help="capacity: levels (default 1000,5000,10000); fanout/broadcast: "
        "streams (default 1000); seed: sessions (default 2000); drain: streams on the "
        "drained worker (default 5000)",
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
        help="seconds of publishing per paced step, and of each churn step (default 4)",
    )
    parser.add_argument(
        "--max-events",
        type=int,
        # Enough work for CPU time, counted in 10 ms ticks, to be read to a few percent.
        default=200000,
        help="events published in an unpaced ('max') step (default 200000)",
    )
    parser.add_argument(
        "--churn-clients",
        type=int,
        default=100,
        help="churn: clients cycling in parallel (default 100)",
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
        help="event loop of the Python contestants (default: uvloop when installed)",
    )
    parser.add_argument(
        "--server-processes",
        type=int,
        default=1,
        help="worker processes per server: nginx's worker_processes, the service's workers "
        "(default 1)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the servers and their Redis to one core, the load to the others",
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
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="drain: the workers' drain_timeout_s (default 10, the service's default)",
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
        help="sample each Python worker with py-spy; collapsed stacks go to this folder",
    )
    parser.add_argument("--progress", choices=["auto", "rich", "plain", "off"], default="auto")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.profile is not None and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    return args


@contextlib.asynccontextmanager
async def _redis(args: argparse.Namespace, pinning: Pinning) -> AsyncIterator[str]:
    if args.redis_url:
        yield args.redis_url
        return
    server = RedisServer(maxclients=args.maxclients)
    server.start()
    try:
        pin_redis(server, pinning)
        yield server.url
    finally:
        server.stop()


@dataclass(frozen=True, slots=True)
class Run:
    """What every scenario of one repetition shares."""

    args: argparse.Namespace
    targets: list[str]
    redis_url: str
    client: redis.Redis
    log_dir: Path
    progress: Progress
    pinning: Pinning
    sizes: dict[str, Any]  # this scenario's connections/rates (from `table`, else options)

    @contextlib.asynccontextmanager
    async def workers(
        self, config: WorkerConfig, targets: list[str] | None = None
    ) -> AsyncIterator[list[Worker]]:
        """Start the contestants (each in its own process), stop them after the block."""
        started: list[Worker] = []
        try:
            for target in targets or self.targets:
                started.append(
                    await start_worker(
                        target,
                        self.redis_url,
                        replace(config, processes=self.processes),
                        self.log_dir,
                        profile_dir=self.args.profile,
                        pinning=self.pinning,
                    )
                )
            yield started
        finally:
            for worker in started:
                stop_worker(worker)

    @property
    def processes(self) -> int:
        return int(self.args.server_processes)

    def connections(self, default: list[int]) -> list[int]:
        found: list[int] = self.args.connections or self.sizes.get("connections") or default
        return found

    def rates(self, default: list[float]) -> list[float]:
        found: list[float] = self.args.rates or self.sizes.get("rates") or default
        return found


@dataclass
class Outcome:
    """Everything one invocation found."""

    results: list[dict[str, Any]]
    skipped: dict[str, str]
    pinning: Pinning
    redis_pinned: bool
    versions: dict[str, str]


async def run(args: argparse.Namespace, progress: Progress) -> Outcome:
    plan: dict[str, dict[str, Any]] = {args.scenario: {}}
    if args.scenario == "all":
        plan = {scenario: {} for scenario in SCENARIOS}
    elif args.scenario == "table":
        plan = TABLE
    pinning = procs.plan_pinning(args.pin, args.server_processes)
    progress.note(f"pinning: {pinning.describe()}")
    results: list[dict[str, Any]] = []
    async with _redis(args, pinning) as url:
        requested = [t for t in args.targets.split(",") if t]
        skipped = {t: why for t in requested if (why := missing(t, url))}
        for target, why in skipped.items():
            progress.note(f"{target} skipped: {why}")
        targets = [t for t in requested if t not in skipped]
        client = bench_redis(url, max_connections=32)
        try:
            versions = await _versions(client)
            with log_directory() as log_dir:
                for repeat in range(args.repeat):
                    order = rotated(targets, repeat)
                    for scenario, sizes in plan.items():
                        context = Run(args, order, url, client, log_dir, progress, pinning, sizes)
                        await client.flushall()
                        for result in await _RUNNERS[scenario](context):
                            result["repeat"] = repeat
                            results.append(result)
        finally:
            await client.aclose()
    return Outcome(results, skipped, pinning, bool(pinning.active and not args.redis_url), versions)


async def _versions(client: redis.Redis) -> dict[str, str]:
    """The Redis server's version, and the Python libraries' the contestants run on."""
    found = {"redis_server": str((await client.info("server"))["redis_version"])}
    for name in ("aiohttp", "redis", "hiredis", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def _nginx_versions() -> dict[str, str]:
    """nginx's version and, on Debian, the nchan package's."""
    found: dict[str, str] = {}
    nginx = nginx_binary()
    if nginx:
        shown = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        found["nginx"] = shown.stderr.strip().rpartition("/")[2]
    with contextlib.suppress(OSError):
        shown = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if shown.returncode == 0:
            found["libnginx-mod-nchan"] = shown.stdout.strip()
    return found


def rotated(targets: list[str], repeat: int) -> list[str]:
    """The contestants' order in repetition `repeat`: rotated, so none always goes first."""
    shift = repeat % max(1, len(targets))
    return targets[shift:] + targets[:shift]


async def _churn(run: Run) -> list[dict[str, Any]]:
    results = []
    config = WorkerConfig(
        max_connections=run.args.churn_clients * 4 + 100, loop=run.args.worker_loop
    )
    async with run.workers(config) as workers:
        for worker in workers:
            churned = await run_churn(
                worker,
                run.client,
                run.redis_url,
                run.progress,
                clients=run.args.churn_clients,
                duration_s=run.args.duration,
            )
            results.append(churned)
    return results


async def _capacity(run: Run) -> list[dict[str, Any]]:
    results = []
    for connections in run.connections([1000, 5000, 10000]):
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
    for connections in run.connections([1000]):
        config = WorkerConfig(max_connections=connections + 10, loop=args.worker_loop)
        async with run.workers(config) as workers:
            for rate in run.rates([float(r) for r in default_rates]):
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
                # Contestants alternate step by step, so each ratio compares neighbours in time.
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
    # The seed flow is the service's own (getSessionId, a demo run); nchan has neither.
    targets = [t for t in run.targets if t not in NCHAN]
    if not targets:
        return []
    results = []
    for sessions in run.connections([2000]):
        config = WorkerConfig(
            max_connections=sessions + 10,
            demo_runs=True,
            demo_interval_ms=run.args.demo_interval_ms,
            loop=run.args.worker_loop,
        )
        async with run.workers(config, targets) as workers:
            for worker in workers:
                results.append(await run_seed(sessions, run.args.concurrency, worker, run.progress))
    return results


async def _drain(run: Run) -> list[dict[str, Any]]:
    # The service's own drain, old behaviour against new: no other contestant drains.
    results = []
    for streams in run.connections([5000]):
        for mode in MODES:
            spec = DrainSpec(
                mode,
                streams,
                run.redis_url,
                run.args.worker_loop,
                run.pinning,
                drain_timeout_s=run.args.drain_timeout,
            )
            results.append(await run_drain(spec, run.client, run.log_dir, run.progress))
            await run.client.flushall()
    return results


_RUNNERS: dict[str, Callable[[Run], Awaitable[list[dict[str, Any]]]]] = {
    "churn": _churn,
    "capacity": _capacity,
    "fanout": _fanout,
    "broadcast": _broadcast,
    "seed": _seed,
    "drain": _drain,
}


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
    started, load_before = time.time(), _load_average()
    with asyncio.Runner(loop_factory=factory) as runner:
        outcome = runner.run(run(args, progress))
    drained = [r for r in outcome.results if r["scenario"] == "drain"]
    results = [r for r in outcome.results if r["scenario"] != "drain"]
    print_tables(results, use_rich=progress.mode == "rich")
    found = {**ratios(results), **sustained_ratios(results)}
    print_ratios(found)
    if drained:
        found.update(print_drain(drained))
    summary = summarise(results)
    if results:
        print(f"\nsummary ({_runs(args.repeat)}; {outcome.pinning.describe()}):")
        print("\n".join(table_lines(summary)))
    for target, why in outcome.skipped.items():
        print(f"{target} skipped: {why}")
    if args.json:
        write_json(args.json, {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": _cpus(), "generator_loop": "uvloop" if factory else "asyncio",
                        "fd_limit": fd_limit, "load_average_before": load_before,
                        "load_average_after": _load_average(),
                        "versions": {**outcome.versions, **_nginx_versions()}},
            "pinning": {**outcome.pinning.as_dict(), "redis_pinned": outcome.redis_pinned},
            "skipped": outcome.skipped,
            "results": results + drained,
            "ratios": found,
            "summary": summary,
        })  # fmt: skip
    if args.plot:
        plot(results, args.plot)
    return 0


def _runs(repeat: int) -> str:
    return "one run" if repeat == 1 else f"medians of {repeat} interleaved runs, range in brackets"


def _load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def _cpus() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
