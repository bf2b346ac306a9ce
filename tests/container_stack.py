"""docker-compose.yml in real containers, on machines without a Docker daemon or a registry.

podman builds the project's Dockerfile (on base images made from Debian packages by
tools/containers/base-images.sh) and serves a Docker-compatible API that docker-compose
drives. That API server runs in a network namespace of its own (`unshare --net`): the
stack's networks, and the port nginx publishes, exist only in there, so nothing touches the
host's network, and clients reach the stack by entering the namespace (`nsenter`).
See tools/containers/README.md for the same steps by hand.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools" / "containers"
# Several checkouts may run this test at once on one machine: each run has its own compose
# project and image tag (the override file points the app services at it), named after its
# process so a later run can tell an interrupted run's leftovers from a live run's stack.
PROJECT_PREFIX = "ssefanoutct"
PROJECT = f"{PROJECT_PREFIX}{os.getpid()}"
PROJECT_LABEL = f"label=com.docker.compose.project={PROJECT}"
IMAGE = f"localhost/sse-fanout:test-{os.getpid()}"
NEEDED = ("podman", "runc", "docker-compose", "debootstrap", "unshare", "nsenter", "ip")
APT_PACKAGES = (
    "podman runc containernetworking-plugins "
    "golang-github-containernetworking-plugin-dnsname debootstrap docker-compose "
    "iproute2"
)
# podman 4.3 runs HEALTHCHECKs from systemd timers; without systemd nothing would run them.
HEALTH_PUMP_INTERVAL_S = 2.0
PODMAN_NPROC = 32768


def engine_problem() -> str | None:
    """Why containers cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "the container test needs root (podman, debootstrap, network namespaces)"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install {APT_PACKAGES})"
    probe = subprocess.run(
        ["unshare", "--net", "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip()}"
    return None


def containers_conf(workdir: Path) -> Path:
    """podman settings for this machine: runc, and default rlimits within the host's own.

    podman gives every container default rlimits and fails when they exceed its own hard
    limits, which sandboxed hosts keep low; the machine's /etc/containers stays untouched.
    """
    nofile, nproc = host_nofile_limit(), podman_nproc_limit()
    limits = [f'"nofile={nofile}:{nofile}"', f'"nproc={nproc}:{nproc}"']
    path = workdir / "containers.conf"
    path.write_text(
        "[containers]\n"
        f"default_ulimits = [{', '.join(limits)}]\n"
        "[engine]\n"
        "# crun 1.8 (Debian 12) rejects some hosts' hybrid cgroup layout; runc copes.\n"
        'runtime = "runc"\n'
    )
    return path


def _cap(limit: int) -> int:
    return 1048576 if limit == resource.RLIM_INFINITY else min(limit, 1048576)


def host_nofile_limit() -> int:
    """The highest open-file limit a container may get here."""
    return _cap(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def podman_nproc_limit() -> int:
    """The highest process limit a container may get: podman 4.3 lowers its own to 32768."""
    return min(_cap(resource.getrlimit(resource.RLIMIT_NPROC)[1]), PODMAN_NPROC)


@dataclass
class Podman:
    """The podman CLI with this test's settings."""

    conf: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf), "BUILDAH_FORMAT": "docker"}

    def run(
        self, *args: str, timeout_s: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS`; its output is also appended to the log."""
        return _run(["podman", *args], self.env, self.log, timeout_s, check)

    def base_images(self) -> None:
        """The registry images the project names, made locally (cached; see the script)."""
        _run(["bash", str(TOOLS / "base-images.sh")], self.env, self.log, 1200, True)

    def build(self) -> None:
        """The project's Dockerfile, as `docker build` would build it (host network for pip)."""
        self.run(
            "build",
            "--pull=never",
            "--network=host",
            "--format=docker",
            "--tag",
            IMAGE,
            str(ROOT),
            timeout_s=900,
        )

    def containers(self, service: str) -> list[str]:
        """Ids of the running containers of a compose service of this project."""
        listed = self.run(
            "ps",
            "--quiet",
            "--filter",
            PROJECT_LABEL,
            "--filter",
            f"label=com.docker.compose.service={service}",
        )
        return listed.stdout.split()

    def forget_leftovers(self) -> None:
        """Remove what runs of this test whose process is gone left behind."""
        listed = self.run(
            "ps",
            "--all",
            "--filter",
            "label=com.docker.compose.project",
            "--format",
            '{{.ID}} {{index .Labels "com.docker.compose.project"}}',
        )
        stale = {
            project
            for _, project in (line.split() for line in listed.stdout.splitlines())
            if project.startswith(PROJECT_PREFIX) and not _alive(project)
        }
        for project in stale:
            self.forget(project)

    def forget(self, project: str = PROJECT) -> None:
        """Remove a compose project's containers, networks and volumes, and its image tag."""
        label = f"label=com.docker.compose.project={project}"
        ids = self.run("ps", "--all", "--quiet", "--filter", label).stdout.split()
        if ids:
            self.run("rm", "--force", "--volumes", *ids, check=False)
        for kind in ("network", "volume"):
            names = self.run(kind, "ls", "--quiet", "--filter", label, check=False).stdout.split()
            if names:
                self.run(kind, "rm", "--force", *names, check=False)
        pid = project.removeprefix(PROJECT_PREFIX)
        self.run("rmi", f"localhost/sse-fanout:test-{pid}", check=False)


def _alive(project: str) -> bool:
    pid = project.removeprefix(PROJECT_PREFIX)
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


@dataclass
class ApiService:
    """`podman system service` in a fresh network namespace, and commands run inside it."""

    podman: Podman
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "podman.sock"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with self.podman.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "unshare",
                    "--net",
                    "--",
                    "sh",
                    "-c",
                    f'ip link set lo up && exec podman system service --time=0 "unix://{self.socket}"',
                ],
                env=self.podman.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not start; see {self.podman.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def inside(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run in the service's network namespace."""
        assert self.process is not None
        return ["nsenter", f"--net=/proc/{self.process.pid}/ns/net", "--", *argv]


@dataclass
class Compose:
    """docker-compose on the repository's compose file plus a test override."""

    api: ApiService
    override: Path
    env_file: Path
    log: Path

    def __call__(
        self, *args: str, timeout_s: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            "docker-compose",
            "--project-name",
            PROJECT,
            "--project-directory",
            str(ROOT),
            "--file",
            str(ROOT / "docker-compose.yml"),
            "--file",
            str(self.override),
            "--env-file",
            str(self.env_file),
            *args,
        ]
        env = {
            **self.api.podman.env,
            "DOCKER_HOST": f"unix://{self.api.socket}",
            "COMPOSE_HTTP_TIMEOUT": "300",
        }
        return _run(argv, env, self.log, timeout_s, check)


@dataclass
class HealthPump:
    """Runs every container's health check every few seconds, as systemd timers would."""

    podman: Podman
    interval_s: float = HEALTH_PUMP_INTERVAL_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._pump, name="health-pump", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _pump(self) -> None:
        while not self._stop.wait(self.interval_s):
            listed = subprocess.run(
                ["podman", "ps", "--filter", PROJECT_LABEL, "--format", "{{.ID}} {{.Status}}"],
                env=self.podman.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            checks = [
                subprocess.Popen(
                    ["podman", "healthcheck", "run", line.split()[0]],
                    env=self.podman.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for line in listed.stdout.splitlines()
                if "(" in line  # "Up 3s (healthy)"
            ]
            for check in checks:
                try:
                    check.wait(60)
                except subprocess.TimeoutExpired:
                    check.kill()
                    check.wait()


def _run(
    argv: list[str], env: dict[str, str], log: Path, timeout_s: float, check: bool
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}[exit {result.returncode}]\n")
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:3])} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result
