"""Start-up as an operator sees it: one line saying what runs where, and every failure to
start told in one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from service.settings import build_settings
from service.startup import bind_sockets, serving_line

from redis_process import RedisProcess, free_port, require_redis_server
from stack_processes import service_env

# Processes or fuzzing for seconds: left out of the quick loop (README, "Test it").
pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pass-for-tests"
# A run that exits by itself: every failure below happens before anything would serve.
RUN_TIMEOUT_S = 30


def run_service(
    tmp_path: Path, *args: str, python_prelude: str = "", **settings: object
) -> subprocess.CompletedProcess[str]:
    """`sse-fanout ARGS` as a child process, outside the repository, to completion."""
    code = f"{python_prelude}from service.__main__ import main; sys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", f"import sys; {code}"],
        cwd=tmp_path,
        env=service_env(**settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start (asserting there is exactly one)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sse-fanout: ")
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port someone else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_unreachable_redis_is_one_line_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    line = one_line_failure(run_service(tmp_path, "serve", redis_url=url, port=free_port()))
    assert f"cannot reach redis at redis://***@127.0.0.1:{port}/0 (5 attempts" in line
    # The last error, as the event loop words it (asyncio and uvloop differ).
    assert f"Error 111 connecting to 127.0.0.1:{port}." in line
    assert PASSWORD not in line


def test_busy_port_is_one_line(tmp_path: Path, busy_port: int) -> None:
    line = one_line_failure(run_service(tmp_path, "serve", port=busy_port))
    assert (
        line == f"sse-fanout: cannot listen on http://127.0.0.1:{busy_port}: Address already in use"
    )


def test_unresolvable_host_is_one_line(tmp_path: Path) -> None:
    line = one_line_failure(run_service(tmp_path, "serve", host="no-such-host.invalid"))
    assert "cannot listen on no-such-host.invalid:8080: the host name does not resolve" in line


def test_uvloop_asked_for_but_missing_is_one_line(tmp_path: Path) -> None:
    # An import of a module set to None in sys.modules fails, as if it were not installed.
    result = run_service(
        tmp_path,
        "serve",
        event_loop="uvloop",
        port=free_port(),
        python_prelude="sys.modules['uvloop'] = None; ",
    )
    line = one_line_failure(result)
    assert "'event_loop' is \"uvloop\" but uvloop is not installed" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read config file {path}: No such file or directory"),
        ("port = \n", "config file {path} is not valid TOML: Invalid value (at line 1, column 8)"),
        ("port = 'eighty'\n", "setting 'port' must be an integer, got 'eighty'"),
        ("prot = 80\n", "unknown setting 'prot'"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "service.toml"
    if content is not None:
        path.write_text(content)
    line = one_line_failure(run_service(tmp_path, "serve", "--config", str(path)))
    assert line == f"sse-fanout: {expected.format(path=path)}"


def test_producer_without_a_redis_url_refuses_to_start(tmp_path: Path) -> None:
    line = one_line_failure(run_service(tmp_path, "producer"))
    assert "the producer needs a redis_url (SSE_REDIS_URL)" in line


def test_producer_with_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line_failure(run_service(tmp_path, "producer", redis_url=url))
    assert f"cannot reach redis at {url}" in line


# --- successful starts: exactly one line, and it tells the truth ---


@pytest.fixture(scope="module")
def guarded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server that wants a password, so the start-up line has one to hide."""
    server = RedisProcess(
        require_redis_server(),
        tmp_path_factory.mktemp("guarded"),
        extra_args=("--requirepass", PASSWORD),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def started() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes a test starts; each is stopped (SIGTERM, then SIGKILL) at the end."""
    processes: list[asyncio.subprocess.Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def start_and_read_first_line(
    started: list[asyncio.subprocess.Process], tmp_path: Path, *args: str, **settings: object
) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        cwd=tmp_path,
        env=service_env(**settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started.append(process)
    assert process.stderr is not None
    async with asyncio.timeout(20):
        line = (await process.stderr.readline()).decode()
    assert process.returncode is None, line
    return line


@pytest.mark.redis
async def test_worker_says_once_where_it_listens_and_which_redis(
    guarded_redis: RedisProcess, started: list[asyncio.subprocess.Process], tmp_path: Path
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{guarded_redis.port}/0"
    line = await start_and_read_first_line(
        started, tmp_path, "serve", port=0, redis_url=url, producer="off", event_loop="asyncio"
    )
    match = re.search(r" INFO service: serving on http://127\.0\.0\.1:(\d+); (.*)$", line)
    assert match, line
    assert match[2] == (
        f"redis: redis://***@127.0.0.1:{guarded_redis.port}/0; "
        "demo runs left to a separate producer; "
        "session API: off (no publish_tokens; set SSE_PUBLISH_TOKENS); "
        "asyncio event loop"
    )
    assert PASSWORD not in line
    # Port 0 asked the kernel for one: the line names the port that really answers.
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{match[1]}/readyz", timeout=aiohttp.ClientTimeout(total=10)
        ) as response,
    ):
        assert response.status == 200


async def test_embedded_worker_names_the_stand_in(
    started: list[asyncio.subprocess.Process], tmp_path: Path
) -> None:
    line = await start_and_read_first_line(started, tmp_path, "serve", port=0)
    assert re.search(
        r"serving on http://127\.0\.0\.1:\d+; redis: embedded in-process stand-in "
        r"\(this process only, nothing kept\); demo runs executed in this worker; "
        r"session API: open \(embedded mode, no token\); (asyncio|uvloop) event loop$",
        line.rstrip("\n"),
    ), line


@pytest.mark.redis
async def test_producer_says_once_which_redis_and_runs(
    guarded_redis: RedisProcess, started: list[asyncio.subprocess.Process], tmp_path: Path
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{guarded_redis.port}/0"
    line = await start_and_read_first_line(started, tmp_path, "producer", redis_url=url)
    assert re.search(
        r" INFO service\.producer_main: producer running: redis: redis://\*\*\*@127\.0\.0\.1:"
        rf"{guarded_redis.port}/0; demo runs of 10 events 1000 ms apart; "
        r"(asyncio|uvloop) event loop$",
        line.rstrip("\n"),
    ), line
    assert PASSWORD not in line


def test_start_line_counts_tokens_without_showing_them() -> None:
    token = "a-publish-token-never-logged"
    settings = build_settings(
        {"redis_url": "redis://u:pw@redis:6379/0", "publish_tokens": [token, token + "2"]}
    )
    sockets = bind_sockets("127.0.0.1", 0, 8)
    loop = asyncio.new_event_loop()
    try:
        line = serving_line(settings, sockets, loop)
    finally:
        loop.close()
        for sock in sockets:
            sock.close()
    assert "session API: 2 bearer token(s)" in line
    assert "redis: redis://u:***@redis:6379/0" in line
    assert token not in line
    assert ":pw@" not in line
