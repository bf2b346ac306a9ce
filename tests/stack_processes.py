"""The compose topology as local processes: workers, a producer and nginx on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from redis_process import free_port, require_tool

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "config" / "nginx.conf"
START_TIMEOUT_S = 15.0

# The only two lines of config/nginx.conf a local run changes (its header says so).
UPSTREAM_LINE = re.compile(r"^(?P<indent>[ \t]*)server worker:8080 resolve (?P<rest>.*;)$", re.M)
LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen 8080;$", re.M)


def require_nginx() -> str:
    """The nginx binary (see require_tool)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )
    return require_tool(found, "nginx is not installed (apt-get install nginx)")


def local_nginx_conf(worker_ports: list[int], listen_port: int) -> str:
    """config/nginx.conf with its upstream and listen lines pointed at loopback ports.

    `resolve` is dropped with the host name: Debian's nginx predates it, and a literal
    address has nothing to re-resolve.
    """
    text = NGINX_CONF.read_text()

    def servers(match: re.Match[str]) -> str:
        return "\n".join(
            f"{match['indent']}server 127.0.0.1:{port} {match['rest']}" for port in worker_ports
        )

    text, upstreams = UPSTREAM_LINE.subn(servers, text)
    text, listens = LISTEN_LINE.subn(rf"\g<indent>listen 127.0.0.1:{listen_port};", text)
    assert (upstreams, listens) == (1, 1), "config/nginx.conf no longer has the expected lines"
    return text


def nginx_argv(binary: str, prefix: Path, *options: str, directives: str = "") -> list[str]:
    """nginx on `prefix`/nginx.conf, logging to stderr, its pid file inside `prefix`."""
    return [
        binary,
        "-e",
        "stderr",
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-g",
        f"pid {prefix / 'nginx.pid'}; {directives}",
        *options,
    ]


def service_env(**settings: object) -> dict[str, str]:
    """This environment without any SSE_* variable, plus `settings` as SSE_<KEY>.

    One worker process unless `workers` is given: these processes are watched (signalled,
    killed, their logs read) as the single worker each stands for; test_supervisor.py runs
    pools.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    env.update(
        {f"SSE_{key.upper()}": str(value) for key, value in {"workers": 1, **settings}.items()}
    )
    return env


@dataclass
class Child:
    """A child process whose stdout and stderr go to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within five seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class Worker(Child):
    """`python -m service serve` on its own loopback port."""

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack:
    """redis (given) + N workers + one producer + nginx, like docker-compose.yml."""

    redis_url: str
    workdir: Path
    nginx_binary: str
    worker_count: int = 3
    settings: dict[str, object] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    nginx_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def start(self) -> None:
        common = {"redis_url": self.redis_url, **self.settings}
        for n in range(self.worker_count):
            port = free_port()
            env = service_env(**common, host="127.0.0.1", port=port, producer="off")
            self.workers.append(
                Worker(
                    f"worker{n}",
                    [sys.executable, "-m", "service", "serve"],
                    env,
                    self.workdir / f"worker{n}.log",
                    port=port,
                )
            )
        producer = Child(
            "producer",
            [sys.executable, "-m", "service", "producer"],
            service_env(**common),
            self.workdir / "producer.log",
        )
        self.nginx_port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(
            local_nginx_conf([w.port for w in self.workers], self.nginx_port)
        )
        nginx = Child(
            "nginx",
            nginx_argv(self.nginx_binary, prefix, directives="daemon off;"),
            dict(os.environ),
            self.workdir / "nginx.log",
        )
        self.children = [*self.workers, producer, nginx]
        for child in self.children:
            child.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self.workers:
            self._wait(lambda w=worker: _answers(f"{w.url}/readyz"), worker, deadline)
        self._wait(lambda: "producer running" in producer.log_text(), producer, deadline)
        self._wait(lambda: _answers(f"{self.url}/healthz"), nginx, deadline)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def logs(self) -> str:
        """Every child's log, for a failing test's report."""
        return "\n".join(f"--- {c.name} ---\n{c.log_text()}" for c in self.children)

    def _wait(self, ready: object, child: Child, deadline: float) -> None:
        assert callable(ready)
        while not ready():
            if not child.running:
                raise RuntimeError(f"{child.name} exited:\n{child.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not ready in time:\n{child.log_text()}")
            time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
