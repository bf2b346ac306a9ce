"""The producer's health signal: a file it keeps fresh only while it can deliver, and the check
the compose file runs on it (`python -m service.health_file PATH MAX_AGE_S`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.health_file import is_fresh, keep_fresh

from redis_process import RedisProcess, require_redis_server
from stack_processes import service_env
from waiting import wait_for

MAX_AGE_S = 1.0


def check(path: Path, max_age_s: float = MAX_AGE_S) -> int:
    """The compose health check's exit status."""
    return subprocess.run(
        [sys.executable, "-m", "service.health_file", str(path), str(max_age_s)],
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_freshness_is_the_age_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    assert not is_fresh(path, 10)
    path.touch()
    os.utime(path, (time.time() - 5, time.time() - 5))
    assert is_fresh(path, 10)
    assert not is_fresh(path, 4)
    assert check(path, 10) == 0
    assert check(path, 4) == 1
    assert check(tmp_path / "missing", 10) == 1


async def test_file_is_touched_only_while_healthy_and_removed_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    healthy = asyncio.Event()
    healthy.set()
    beats = 0

    async def probe() -> bool:
        nonlocal beats
        beats += 1
        return healthy.is_set()

    task = asyncio.create_task(keep_fresh(path, 0.01, probe))

    async def touched() -> bool:
        return path.exists()

    await wait_for(touched)
    healthy.clear()
    stale_since = path.stat().st_mtime
    seen = beats

    async def probed_five_more_times() -> bool:
        return beats >= seen + 5

    await wait_for(probed_five_more_times)
    assert path.stat().st_mtime == stale_since, "touched while unhealthy"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not path.exists()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server this test may stop and start again."""
    server = RedisProcess(require_redis_server(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def wait_for_check(path: Path, status: int) -> None:
    async def answers() -> bool:
        return await asyncio.to_thread(check, path) == status

    await wait_for(answers, timeout_s=20, interval_s=0.1)


@pytest.mark.redis
async def test_producer_process_is_healthy_only_while_redis_answers(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    path = tmp_path / "producer.alive"
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "producer",
        env=service_env(
            redis_url=own_redis.url,
            producer_health_file=path,
            producer_poll_ms=100,
            redis_timeout_s=0.5,
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_check(path, 0)
        own_redis.kill()
        await wait_for_check(path, 1)
        own_redis.start()
        await wait_for_check(path, 0)
    finally:
        producer.terminate()
        async with asyncio.timeout(15):
            await producer.wait()
    assert producer.returncode == 0
    assert not path.exists(), "a stopped producer must not look alive"
