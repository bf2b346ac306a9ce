"""The compose stack as users run it: the image built from the Dockerfile, docker-compose.yml up
with three workers behind nginx, streams through nginx while a worker is stopped, then down.

Needs root, podman, docker-compose and debootstrap (tests/container_stack.py); skips with the
reason without them, and fails instead under SSE_REQUIRE_REDIS=1 or CI. The first run makes the
base images from Debian packages (a few minutes); later runs reuse them and podman's layer
cache. Stack logs and every command's output stay in the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from container_stack import (
    IMAGE,
    ROOT,
    ApiService,
    Compose,
    HealthPump,
    Podman,
    containers_conf,
    engine_problem,
    host_nofile_limit,
    podman_nproc_limit,
)
from redis_process import require_tool

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NGINX_URL = "http://127.0.0.1:8080"  # the port nginx publishes, inside the namespace
TOKEN = "container-test-token-0123456789"
CLIENTS = 30
EVENTS_PER_RUN = 10
CLIENT_SCRIPT = Path(__file__).resolve().parent / "stream_clients.py"


@dataclass
class RunningStack:
    podman: Podman
    api: ApiService
    compose: Compose
    workdir: Path
    timings_s: dict[str, float] = field(default_factory=dict)

    def clients(self, *args: str, timeout_s: float = 150) -> str:
        """Run tests/stream_clients.py inside the stack's network namespace, to completion."""
        result = subprocess.run(
            self.api.inside([sys.executable, str(CLIENT_SCRIPT), *args]),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def container(self, service: str) -> str:
        [only] = self.podman.containers(service)
        return only

    def inspect(self, container: str, template: str) -> str:
        return self.podman.run("inspect", "--format", template, container).stdout.strip()

    def logs(self, container: str) -> str:
        result = self.podman.run("logs", container)
        return result.stdout + result.stderr


def expected_nofile() -> int:
    """The compose file's limit for workers, or the host's where that is lower."""
    return min(int(COMPOSE["services"]["worker"]["ulimits"]["nofile"]["soft"]), host_nofile_limit())


def write_override(path: Path) -> None:
    """The compose file as it is, but for this run's image and rlimits podman cannot grant here.

    The app services use this run's image tag. Open-file limits above the host's are lowered to
    it; a service that sets `ulimits` loses podman's default process limit, so it gets the one
    podman can grant spelled out.
    """
    services: dict[str, Any] = {}
    for name, service in COMPOSE["services"].items():
        if "profiles" in service:
            continue
        override: dict[str, Any] = {}
        if "build" in service:
            override["image"] = IMAGE
        nofile = service.get("ulimits", {}).get("nofile")
        if nofile:
            files = min(nofile["hard"], host_nofile_limit())
            processes = podman_nproc_limit()
            override["ulimits"] = {
                "nofile": {"soft": files, "hard": files},
                "nproc": {"soft": processes, "hard": processes},
            }
        if override:
            services[name] = override
    path.write_text(yaml.safe_dump({"services": services}))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    problem = engine_problem()
    if problem is not None:
        require_tool(None, problem)
    workdir = tmp_path_factory.mktemp("containers")
    podman = Podman(containers_conf(workdir), workdir / "commands.log")
    timings: dict[str, float] = {}
    started = time.monotonic()
    podman.base_images()
    timings["base images"] = time.monotonic() - started
    podman.build()
    timings["image build"] = time.monotonic() - started - sum(timings.values())
    podman.forget_leftovers()
    api = ApiService(podman, workdir)
    pump = HealthPump(podman)
    env_file = workdir / "stack.env"
    env_file.write_text(f"SSE_PUBLISH_TOKENS={TOKEN}\n")
    override = workdir / "override.yml"
    write_override(override)
    compose = Compose(api, override, env_file, workdir / "commands.log")
    running = RunningStack(podman, api, compose, workdir, timings)
    try:
        api.start()
        pump.start()
        up = time.monotonic()
        compose("up", "--detach", "--no-build", timeout_s=600)
        running.clients("wait", NGINX_URL)
        timings["compose up"] = time.monotonic() - up
        yield running
    finally:
        (workdir / "stack.log").write_text(compose("logs", "--no-color", check=False).stdout)
        down = time.monotonic()
        compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
        timings["compose down"] = time.monotonic() - down
        pump.stop()
        api.stop()
        podman.forget()
        timings["total"] = time.monotonic() - started
        print("container test timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        print(f"container test logs: {workdir}")


def test_stack_runs_three_healthy_workers_with_their_file_limit(stack: RunningStack) -> None:
    workers = stack.podman.containers("worker")
    assert len(workers) == 3, "deploy.replicas was not honoured"
    containers = [
        (service, container)
        for service in ("redis", "worker", "producer", "nginx")
        for container in stack.podman.containers(service)
    ]
    # compose waits only for what others depend on; the rest gets the health pump's next round.
    deadline = time.monotonic() + 60
    for service, container in containers:
        while (health := stack.inspect(container, "{{.State.Health.Status}}")) != "healthy":
            assert health == "starting", (service, health)
            assert time.monotonic() < deadline, (service, health)
            time.sleep(0.5)
    for worker in workers:
        limits = stack.podman.run(
            "exec",
            worker,
            "python",
            "-c",
            "import resource; print(*resource.getrlimit(resource.RLIMIT_NOFILE))",
        ).stdout.split()
        assert limits == [str(expected_nofile())] * 2


def test_publish_api_takes_its_token_from_the_env_file(stack: RunningStack) -> None:
    statuses = json.loads(stack.clients("publish", NGINX_URL, TOKEN))
    assert statuses == {"none": 401, "wrong": 401, "configured": 202}


def test_stopping_a_worker_under_live_streams_loses_no_event(stack: RunningStack) -> None:
    clients = subprocess.Popen(
        stack.api.inside([sys.executable, str(CLIENT_SCRIPT), "run", NGINX_URL, str(CLIENTS)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert clients.stdout is not None
        assert clients.stdout.readline().strip() == "midway"
        victim = stack.podman.containers("worker")[0]
        stopped = time.monotonic()
        stack.podman.run("stop", "--time", "15", victim, timeout_s=60)
        stop_s = time.monotonic() - stopped
        output, errors = clients.communicate(timeout=150)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait()
    assert clients.returncode == 0, errors
    results = json.loads(output)
    logged = logged_ids(stack, [client["session_id"] for client in results])
    for client in results:
        assert client["ids"] == logged[client["session_id"]], client
        assert len(set(client["ids"])) == EVENTS_PER_RUN, client
        assert client["names"] == ["message"] * (EVENTS_PER_RUN - 1) + ["finish"], client
        assert client["data_names_session"], client
        assert not client["refusals"], client
    victim_log = stack.logs(victim)
    ended = len(re.findall(r'"reason": "shutdown"', victim_log))
    print(
        f"stopped a worker holding {ended} streams in {stop_s:.1f}s; "
        f"{sum(c['connects'] - 1 for c in results)} reconnects"
    )
    assert ended > 0, "the stopped worker held no stream"
    assert sum(client["connects"] - 1 for client in results) >= ended
    assert stack.inspect(victim, "{{.State.ExitCode}}") == "0"


def logged_ids(stack: RunningStack, session_ids: list[str]) -> dict[str, list[str]]:
    """Each session's event log in Redis, read in one exec."""
    script = "; ".join(
        f'echo "== {sid}"; redis-cli XRANGE "sse:{{{sid}}}:log" - +' for sid in session_ids
    )
    output = stack.podman.run("exec", stack.container("redis"), "sh", "-c", script).stdout
    logged: dict[str, list[str]] = {}
    current = ""
    for line in output.splitlines():
        if line.startswith("== "):
            current = line[3:]
            logged[current] = []
        elif re.fullmatch(r"\d+-\d+", line):
            logged[current].append(line)
    return logged


def test_redis_keeps_its_data_across_a_restart(stack: RunningStack) -> None:
    redis = stack.container("redis")
    assert stack.podman.run(
        "exec", redis, "redis-cli", "CONFIG", "GET", "appendonly"
    ).stdout.split() == ["appendonly", "yes"]
    stack.podman.run("exec", redis, "redis-cli", "SET", "container-test:probe", "kept")
    stack.podman.run("restart", "--time", "10", redis, timeout_s=60)
    deadline = time.monotonic() + 30
    while stack.podman.run("exec", redis, "redis-cli", "PING", check=False).stdout != "PONG\n":
        assert time.monotonic() < deadline, "redis did not come back"
        time.sleep(0.2)
    value = stack.podman.run("exec", redis, "redis-cli", "GET", "container-test:probe").stdout
    assert value.strip() == "kept"
