"""The scale-out stack: docker-compose.yml, the Dockerfile and config/nginx.conf, checked
without a container engine, and the same topology run as local processes behind nginx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis as redis_sync
import redis.asyncio as redis
import yaml

from service.__main__ import main as cli_main
from service.sentinel_url import parse_sentinel_url
from service.settings import Settings, load_settings

from app_clients import MakeSettings, StartClient
from redis_process import (
    RedisProcess,
    SentinelProcess,
    require_redis_sentinel,
    require_redis_server,
)
from redis_state import logged_ids
from sse_reader import ReceivedEvent, SSEParser, read_events
from stack_processes import (
    NGINX_CONF,
    ROOT,
    Stack,
    Worker,
    local_nginx_conf,
    nginx_argv,
    require_nginx,
    service_env,
)
from waiting import wait_for

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
APP_SERVICES = ("worker", "producer")


# --- docker-compose.yml, Dockerfile and nginx.conf, without an engine ---


def test_compose_has_the_documented_services() -> None:
    default_stack = {name for name, service in SERVICES.items() if "profiles" not in service}
    assert default_stack == {"redis", "worker", "producer", "nginx"}
    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert SERVICES["nginx"]["image"].startswith("nginx:")
    for name in APP_SERVICES:
        assert SERVICES[name]["build"] == "."
        assert SERVICES[name]["image"] == SERVICES["worker"]["image"]
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["nginx"]["depends_on"]["worker"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["worker", "worker-cluster"])
def test_compose_replicas_are_spelled_out_for_every_implementation(name: str) -> None:
    # podman-compose ignores `replicas` unless `mode: replicated` is written out.
    assert SERVICES[name]["deploy"] == {"mode": "replicated", "replicas": 3}


def test_every_long_running_service_has_a_health_check() -> None:
    long_running = [
        name
        for name, service in SERVICES.items()
        if service.get("restart") == "unless-stopped" or name.startswith("producer")
    ]
    assert {"redis", "worker", "producer", "nginx"} <= set(long_running)
    for name in long_running:
        check = SERVICES[name].get("healthcheck")
        if check is None:  # the image's own HEALTHCHECK applies
            assert SERVICES[name].get("image") == SERVICES["worker"]["image"], name
            assert re.search(r"^HEALTHCHECK .*\n\s+CMD ", DOCKERFILE, re.M), name
            continue
        assert not check.get("disable"), name
        assert check["test"][0] == "CMD", name


@pytest.mark.parametrize("name", ["producer", "producer-cluster"])
def test_producer_health_check_reads_the_file_the_producer_keeps(name: str) -> None:
    service = SERVICES[name]
    settings = load_settings(None, service["environment"])
    _cmd, python, flag, module, path, max_age_s = service["healthcheck"]["test"]
    assert (python, flag, module) == ("python", "-m", "service.health_file")
    assert path == settings.producer_health_file
    # Fresh means touched within max_age_s: a few polls, and a Redis timeout, must fit in it.
    assert float(max_age_s) > 3 * settings.producer_poll_ms / 1000 + settings.redis_timeout_s
    grace_s = float(service["stop_grace_period"].removesuffix("s"))
    assert grace_s > settings.redis_timeout_s


def test_nginx_health_check_asks_a_location_nginx_answers_itself() -> None:
    conf = NGINX_CONF.read_text()
    for name in ("nginx", "nginx-cluster"):
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "wget", "-q", "-O"]
        path = urlsplit(test[-1]).path
        assert re.search(rf"location = {path} \{{\s+access_log off;\s+return 200 ", conf)


def test_compose_file_limits_fit_the_streams_a_worker_admits() -> None:
    worker = load_settings(None, SERVICES["worker"]["environment"])
    nginx_conf = NGINX_CONF.read_text()
    [nginx_files] = re.findall(r"^worker_rlimit_nofile (\d+);", nginx_conf, re.M)
    for name in ("worker", "worker-cluster", "nginx", "nginx-cluster"):
        nofile = SERVICES[name]["ulimits"]["nofile"]
        assert nofile["soft"] == nofile["hard"]
        # A worker holds one descriptor per stream, plus Redis, its listener and the log.
        assert nofile["soft"] >= worker.max_connections + 1000, name
        assert nofile["hard"] >= int(nginx_files), name


def test_redis_keeps_its_data_in_a_volume_with_append_only_persistence() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    [volume] = redis["volumes"]
    name, mount = volume.split(":")
    assert mount == "/data"
    assert name in COMPOSE["volumes"]


def test_publish_tokens_come_from_the_environment_or_the_env_file() -> None:
    example = (ROOT / ".env.example").read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    [assignment] = [line for line in example.splitlines() if line.startswith("SSE_")]
    assert assignment == "SSE_PUBLISH_TOKENS=", "the example holds no token anyone could use"
    for name in ("worker", "worker-cluster"):
        assert SERVICES[name]["environment"]["SSE_PUBLISH_TOKENS"] == "${SSE_PUBLISH_TOKENS:-}"
        # As compose passes it: empty when unset (the session API is off), else the tokens.
        unset = {**SERVICES[name]["environment"], "SSE_PUBLISH_TOKENS": ""}
        assert load_settings(None, unset).publish_tokens == ()
        given = {**unset, "SSE_PUBLISH_TOKENS": "t" * 16 + ",u" + "u" * 16}
        assert len(load_settings(None, given).publish_tokens) == 2
    assert "SSE_PUBLISH_TOKENS" not in SERVICES["producer"]["environment"]


def test_cluster_init_creates_the_cluster_only_once() -> None:
    script = " ".join(SERVICES["redis-cluster-init"]["command"])
    guard, _, create = script.partition("redis-cli --cluster create")
    assert create, "the init no longer creates the cluster"
    assert "cluster info" in guard
    assert "cluster_known_nodes:3" in guard
    assert "exit 0" in guard


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_commands_exist_in_the_cli(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    python, flag, module, *args = SERVICES[name]["command"]
    assert (python, flag, module) == ("python", "-m", "service")
    with pytest.raises(SystemExit) as accepted:
        cli_main([*args, "--help"])
    assert accepted.value.code == 0
    with pytest.raises(SystemExit) as refused:
        cli_main(["no-such-command", "--help"])
    assert refused.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_environment_is_valid_settings(name: str) -> None:
    environment: dict[str, str] = SERVICES[name]["environment"]
    assert all(isinstance(value, str) for value in environment.values()), "quote env values"
    # load_settings refuses unknown SSE_* names and values of the wrong type.
    settings = load_settings(None, environment)
    redis_address = urlsplit(settings.redis_url)
    assert redis_address.hostname in SERVICES
    assert redis_address.port == 6379


CLUSTER_SERVICES = ("worker-cluster", "producer-cluster")


def test_compose_cluster_profile_runs_the_same_stack_on_three_shards() -> None:
    profile = {name for name, svc in SERVICES.items() if "cluster" in svc.get("profiles", ())}
    nodes = {"redis-node-1", "redis-node-2", "redis-node-3"}
    assert profile == nodes | {"redis-cluster-init", "nginx-cluster", *CLUSTER_SERVICES}
    init = SERVICES["redis-cluster-init"]
    assert set(init["depends_on"]) == nodes
    script = " ".join(init["command"])
    assert "--cluster create" in script
    assert all(node in script for node in nodes)
    for name in nodes:
        assert "--cluster-enabled" in SERVICES[name]["command"]
    for name in CLUSTER_SERVICES:
        service = SERVICES[name]
        assert service["command"] == SERVICES[name.removesuffix("-cluster")]["command"]
        settings = load_settings(None, service["environment"])
        assert settings.redis_cluster
        assert urlsplit(settings.redis_url).hostname in nodes
        condition = service["depends_on"]["redis-cluster-init"]["condition"]
        assert condition == "service_completed_successfully"
    # The cluster's nginx reuses nginx.conf: its workers answer to the name "worker".
    assert SERVICES["worker-cluster"]["networks"]["cluster"]["aliases"] == ["worker"]
    assert SERVICES["nginx-cluster"]["volumes"] == SERVICES["nginx"]["volumes"]
    assert SERVICES["nginx-cluster"]["ports"] == ["8081:8080"]


SENTINEL_SERVICES = ("worker-sentinel", "producer-sentinel")
SENTINEL_NODES = ("redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3")
SENTINEL_SERVERS = ("redis-server-1", "redis-server-2")


def sentinel_directives(name: str) -> list[str]:
    """The lines a compose Sentinel writes to its config file before it starts."""
    script = SERVICES[name]["command"][0]
    printed, redirect, start = script.partition(" > ")
    assert redirect, script
    config_path = start.split()[0]
    assert start.endswith(f"exec redis-sentinel {config_path}"), script
    return re.findall(r"'([^']*)'", printed)[1:]  # after printf's '%s\n'


def test_compose_sentinel_profile_runs_the_same_stack_behind_three_sentinels() -> None:
    profile = {name for name, svc in SERVICES.items() if "sentinel" in svc.get("profiles", ())}
    assert profile == {*SENTINEL_SERVERS, *SENTINEL_NODES, "nginx-sentinel", *SENTINEL_SERVICES}
    replica = SERVICES["redis-server-2"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis-server-1", "6379"]
    monitored = set()
    for name in SENTINEL_NODES:
        directives = sentinel_directives(name)
        assert "port 26379" in directives
        assert "sentinel resolve-hostnames yes" in directives  # it monitors by service name
        [monitor] = [line for line in directives if line.startswith("sentinel monitor ")]
        _, _, service_name, host, port, quorum = monitor.split()
        assert (host, port) == ("redis-server-1", "6379")
        # A majority of the three must agree that the primary is down.
        assert int(quorum) == len(SENTINEL_NODES) // 2 + 1
        monitored.add(service_name)
        assert set(SERVICES[name]["depends_on"]) == set(SENTINEL_SERVERS)
    [service_name] = monitored
    for name in SENTINEL_SERVICES:
        service = SERVICES[name]
        assert service["command"] == SERVICES[name.removesuffix("-sentinel")]["command"]
        address = parse_sentinel_url(load_settings(None, service["environment"]).redis_url)
        assert address.sentinels == tuple((node, 26379) for node in SENTINEL_NODES)
        assert address.service_name == service_name
        assert set(service["depends_on"]) == set(SENTINEL_NODES)
    assert SERVICES["worker-sentinel"]["networks"]["sentinel"]["aliases"] == ["worker"]
    assert SERVICES["nginx-sentinel"]["volumes"] == SERVICES["nginx"]["volumes"]
    assert SERVICES["nginx-sentinel"]["ports"] == ["8082:8080"]


@pytest.mark.redis
def test_compose_sentinel_config_is_accepted_by_redis_sentinel(tmp_path: Path) -> None:
    """The compose Sentinel's directives, pointed at a local server, start a Sentinel that
    monitors it with those settings (a misspelt directive would stop it)."""
    server = RedisProcess(require_redis_server(), tmp_path / "server")
    server.start()
    directives = [
        line.replace("redis-server-1 6379", f"127.0.0.1 {server.port}")
        for line in sentinel_directives("redis-sentinel-1")
        if not line.startswith("port ")
    ]
    sentinel = SentinelProcess(
        require_redis_sentinel(), tmp_path / "sentinel", directives=tuple(directives)
    )
    try:
        sentinel.start()
        with redis_sync.Redis(host="127.0.0.1", port=sentinel.port) as client:
            state = client.sentinel_master("mymaster")
        assert (state["ip"], state["port"]) == ("127.0.0.1", server.port)
        assert state["down-after-milliseconds"] == 5000
        assert state["quorum"] == 2
    finally:
        sentinel.stop()
        server.stop()


def test_compose_ports_line_up_with_nginx_and_the_workers() -> None:
    worker = load_settings(None, SERVICES["worker"]["environment"])
    assert worker.host == "0.0.0.0"
    assert worker.producer == "off", "the producer service executes the runs"
    assert SERVICES["worker"]["expose"] == [str(worker.port)]
    conf = NGINX_CONF.read_text()
    assert re.search(rf"^\s*server worker:{worker.port} ", conf, re.M)
    [mapping] = SERVICES["nginx"]["ports"]
    host_port, container_port = mapping.split(":")
    assert host_port == "8080"
    assert re.search(rf"^\s*listen {container_port};$", conf, re.M)
    assert SERVICES["nginx"]["volumes"] == ["./config/nginx.conf:/etc/nginx/nginx.conf:ro"]
    # docker stop waits stop_grace_period before SIGKILL: longer than the drain.
    for name in ("worker", "worker-cluster"):
        grace_s = float(SERVICES[name]["stop_grace_period"].removesuffix("s"))
        assert grace_s > worker.drain_timeout_s


def test_dockerfile_is_slim_multi_stage_and_not_root() -> None:
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert stages == ["python:3.11-slim", "python:3.11-slim"]
    final = DOCKERFILE.split("\nFROM ")[-1]
    assert "apt-get" not in final
    assert "gcc" not in final
    [user] = re.findall(r"^USER (\S+)$", final, re.M)
    assert user not in ("root", "0")
    [cmd] = re.findall(r"^CMD (.+)$", final, re.M)
    assert json.loads(cmd) == SERVICES["worker"]["command"]
    assert "SSE_HOST=0.0.0.0" in final
    # The runtime stage gets the virtualenv and nothing else: the package is installed, with
    # its defaults and page as package data, so no source tree is copied there.
    assert re.findall(r"^COPY .*$", final, re.M) == ["COPY --from=build /opt/venv /opt/venv"]


def test_dockerfile_installs_the_pinned_versions_and_the_package() -> None:
    build = DOCKERFILE.split("\nFROM ")[1]
    assert "--constraint constraints.txt --requirement requirements.txt" in build
    assert "PIP_CONSTRAINT=/src/constraints.txt /opt/venv/bin/pip install --no-deps ." in build
    copied = re.findall(r"^COPY (.+) \S+$", build, re.M)
    sources = {name for line in copied for name in line.split()}
    assert sources == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "LICENSE",
        "service",
        "config",
        "web",
    }
    allowed = (ROOT / ".dockerignore").read_text().split()
    for name in sources:
        assert f"!{name}" in allowed or f"!{name}/" in allowed, name


async def test_dockerfile_healthcheck_passes_only_when_the_worker_answers(
    start_client: StartClient, make_settings: MakeSettings, fake_opener: Any
) -> None:
    [command] = re.findall(r"^\s+CMD (python -c .+)$", DOCKERFILE, re.M)
    client = await start_client(make_settings(), fake_opener)
    port = client.server.port
    assert await _shell_status(command, service_env(port=port)) == 0
    await client.close()
    assert await _shell_status(command, service_env(port=port)) != 0


async def _shell_status(command: str, env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_shell(
        command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(10):
        return await process.wait()


def test_nginx_config_keeps_streams_unbuffered() -> None:
    conf = NGINX_CONF.read_text()
    [connect] = re.findall(r"location = /sse/connect \{(.*?)\}", conf, re.S)
    for directive in ("proxy_buffering off;", "proxy_cache off;", "gzip off;"):
        assert directive in connect
    for directive in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Last-Event-ID $http_last_event_id;",
    ):
        assert directive in conf
    assert re.search(r"^\s*keepalive \d+;", conf, re.M)
    [read_timeout] = re.findall(r"proxy_read_timeout (\d+)s;", connect)
    defaults = Settings()
    assert int(read_timeout) > defaults.session_ttl_s + defaults.heartbeat_interval_s
    assert "proxy_next_upstream error timeout http_503;" in conf


def test_nginx_asks_for_a_stream_once_more_when_its_peer_set_changed() -> None:
    # A 502 ends an EventSource for good; the stream location retries once, afresh, with the
    # same stream settings (tests/test_containers.py stops a worker and sees it happen).
    conf = NGINX_CONF.read_text()
    [connect] = re.findall(r"location = /sse/connect \{(.*?)\}", conf, re.S)
    [again] = re.findall(r"location @connect_again \{(.*?)\}", conf, re.S)
    assert "error_page 502 504 = @connect_again;" in connect
    directives = {line.strip() for line in connect.splitlines() if line.strip().endswith(";")}
    assert {line.strip() for line in again.splitlines() if line.strip()} == directives - {
        "error_page 502 504 = @connect_again;"
    }


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    binary = require_nginx()
    good, bad = tmp_path / "good", tmp_path / "bad"
    for prefix in (good, bad):
        prefix.mkdir()
    (good / "nginx.conf").write_text(local_nginx_conf([18081, 18082, 18083], 18080))
    # The check is not vacuous: the same file with a typo is refused.
    (bad / "nginx.conf").write_text(
        local_nginx_conf([18081], 18080).replace("proxy_buffering off;", "proxy_bufering off;")
    )
    accepted = subprocess.run(
        nginx_argv(binary, good, "-t"), check=False, capture_output=True, timeout=10
    )
    assert accepted.returncode == 0, accepted.stderr.decode()
    refused = subprocess.run(
        nginx_argv(binary, bad, "-t"), check=False, capture_output=True, timeout=10
    )
    assert refused.returncode != 0
    assert b"proxy_bufering" in refused.stderr


# --- the topology as processes: redis-server, 3 workers, a producer, nginx ---

CLIENTS = 50
EVENTS_PER_RUN = 10
STACK_SETTINGS: dict[str, object] = {
    "producer_interval_ms": 300,
    "producer_poll_ms": 100,
    "producer_lease_ms": 1000,
    "retry_ms": 100,
    "drain_timeout_s": 5,
    "session_ttl_s": 30,
    "log_level": "INFO",
}


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    processes = Stack(redis_url, tmp_path, require_nginx(), settings=STACK_SETTINGS)
    try:
        processes.start()
        yield processes
    finally:
        processes.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=10)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        yield session


@dataclass
class Client:
    """One browser-like client: a session id, then a stream it resumes until `finish`."""

    session_id: str = ""
    events: list[ReceivedEvent] = field(default_factory=list)
    connects: int = 0
    refusals: list[int] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        """Follow EventSource: reconnect after `retry` with the last dispatched event's id."""
        self.session_id = await _session_id(http, url)
        retry_s = 0.1
        while not self.events or self.events[-1].event != "finish":
            # As in a browser, the resume point is the id of the last *dispatched* event.
            headers = {"Last-Event-ID": self.events[-1].id} if self.events else {}
            parser = SSEParser()
            try:
                await self._connect(http, url, headers, parser)
            except aiohttp.ClientError as error:
                self.breaks.append(repr(error))
            retry_s = (parser.retry_ms or 100) / 1000
            if not self.events or self.events[-1].event != "finish":
                await asyncio.sleep(retry_s)

    async def _connect(
        self, http: aiohttp.ClientSession, url: str, headers: dict[str, str], parser: SSEParser
    ) -> None:
        params = {"sessionId": self.session_id}
        async with http.get(f"{url}/sse/connect", params=params, headers=headers) as response:
            self.connects += 1
            if response.status != 200:
                self.refusals.append(response.status)
                return
            async for event in read_events(response, parser):
                self.events.append(event)
                if event.event == "finish":
                    return


async def _session_id(http: aiohttp.ClientSession, url: str) -> str:
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/sse/getSessionId") as response:
                if response.status == 200:
                    return await response.text()
        await asyncio.sleep(0.1)


async def run_clients_and_interrupt(
    stack: Stack, http: aiohttp.ClientSession, interrupt: Worker, signum: signal.Signals
) -> tuple[list[Client], float, float]:
    """50 clients through nginx; once each holds 3 events, signal one worker.

    Returns the clients, the streams the worker had open then, and how long it took to exit.
    """
    clients = [Client() for _ in range(CLIENTS)]
    async with asyncio.timeout(40):
        runs = [asyncio.create_task(c.run(http, stack.url)) for c in clients]
        try:

            async def all_midway() -> bool:
                return min(len(c.events) for c in clients) >= 3

            await wait_for(all_midway, timeout_s=20, interval_s=0.02)
            open_streams = await _open_streams(http, interrupt)
            assert not any(run.done() for run in runs), "a session finished too early"
            signalled = time.monotonic()
            interrupt.send(signum)

            async def exited() -> bool:
                return not interrupt.running

            await wait_for(exited, timeout_s=15, interval_s=0.02)
            exit_s = time.monotonic() - signalled
            await asyncio.gather(*runs)
        finally:
            for run in runs:
                run.cancel()
    return clients, open_streams, exit_s


async def _open_streams(http: aiohttp.ClientSession, worker: Worker) -> float:
    async with http.get(f"{worker.url}/metrics") as response:
        text = await response.text()
    [value] = re.findall(r"^sse_open_streams (\S+)$", text, re.M)
    return float(value)


async def assert_every_client_got_every_event_once(
    clients: list[Client], redis_client: redis.Redis
) -> None:
    for client in clients:
        ids = [event.id for event in client.events]
        assert len(ids) == EVENTS_PER_RUN, (client.session_id, ids, client.breaks)
        assert ids == await logged_ids(redis_client, client.session_id)
        assert [e.event for e in client.events] == ["message"] * 9 + ["finish"]
        assert all(client.session_id in event.data for event in client.events)


@pytest.mark.redis
@pytest.mark.stack
async def test_kill_9_of_a_worker_loses_no_event(
    stack: Stack,
    http: aiohttp.ClientSession,
    redis_client: redis.Redis,
) -> None:
    victim = stack.workers[0]
    clients, open_streams, _ = await run_clients_and_interrupt(stack, http, victim, signal.SIGKILL)
    print(
        f"killed a worker holding {open_streams:.0f} streams; "
        f"{sum(c.connects - 1 for c in clients)} reconnects"
    )
    try:
        assert open_streams > 0, "the killed worker held no stream"
        reconnected = sum(client.connects - 1 for client in clients)
        assert reconnected >= open_streams
        await assert_every_client_got_every_event_once(clients, redis_client)
    except AssertionError:
        print(stack.logs())
        raise


@pytest.mark.redis
@pytest.mark.stack
async def test_sigterm_drains_a_worker_under_load_without_loss(
    stack: Stack,
    http: aiohttp.ClientSession,
    redis_client: redis.Redis,
) -> None:
    draining = stack.workers[0]
    clients, open_streams, exit_s = await run_clients_and_interrupt(
        stack, http, draining, signal.SIGTERM
    )
    print(
        f"drained a worker holding {open_streams:.0f} streams in {exit_s:.3f}s; "
        f"{sum(c.connects - 1 for c in clients)} reconnects"
    )
    try:
        assert draining.process is not None
        assert draining.process.returncode == 0
        assert exit_s < float(str(STACK_SETTINGS["drain_timeout_s"]))
        assert open_streams > 0, "the drained worker held no stream"
        # The drain is paced: a stream whose run finishes meanwhile ends with its `finish`.
        after_signal = draining.log_text().partition("draining: ending")[2]
        ended = after_signal.count("reason=shutdown") + after_signal.count("reason=finished")
        assert ended == open_streams
        # Streams ended cleanly, and nginx sent every retry past the departing worker.
        assert all(not client.refusals for client in clients)
        await assert_every_client_got_every_event_once(clients, redis_client)
    except AssertionError:
        print(f"worker exited after {exit_s:.2f}s")
        print(stack.logs())
        raise
