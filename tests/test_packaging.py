"""The package as users install it: an sdist, a wheel built from that sdist, installed into a
fresh venv outside the repository, runs `sse-fanout serve` with no source tree in sight."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sse_reader import collect
from stack_processes import ROOT, service_env

# Processes or fuzzing for seconds: left out of the quick loop (README, "Test it").
pytestmark = pytest.mark.slow

CONSTRAINTS = ROOT / "constraints.txt"
COMMAND_TIMEOUT_S = 300


@dataclass(frozen=True)
class Installed:
    """A venv holding the built wheel and the pinned dependencies, nothing else."""

    venv: Path
    sdist: Path
    wheel: Path

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "sse-fanout"


def run(*argv: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env() -> dict[str, str]:
    """No SSE_* setting and no PYTHONPATH: nothing may point back at the checkout."""
    env = service_env()
    env.pop("SSE_WORKERS")
    env.pop("PYTHONPATH", None)
    return env


def wheelhouse_for(wheel: Path, workdir: Path) -> Path:
    """The wheel's pinned dependencies as files, downloaded once per constraints and pyproject.

    Kept in the user's cache so a rerun installs offline in seconds; the venv itself is new
    every time and gets only what the wheel declares.
    """
    digest = hashlib.sha256(CONSTRAINTS.read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    house = cache / "sse-fanout" / f"wheelhouse-{digest.hexdigest()[:16]}"
    if not (house / "complete").exists():
        house.mkdir(parents=True, exist_ok=True)
        run(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            house,
            "--constraint",
            CONSTRAINTS,
            wheel,
            cwd=workdir,
        )
        (house / "complete").touch()
    return house


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    workdir = tmp_path_factory.mktemp("packaging")
    dist = workdir / "dist"
    # `build` makes the sdist, then the wheel from the unpacked sdist: the wheel proves the
    # sdist carries everything a working install needs.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT, cwd=workdir)
    [sdist] = dist.glob("sse_fanout-*.tar.gz")
    [wheel] = dist.glob("sse_fanout-*.whl")
    venv = workdir / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=workdir)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        wheelhouse_for(wheel, workdir),
        wheel,
        cwd=workdir,
    )
    return Installed(venv, sdist, wheel)


def test_constraints_pin_every_dependency_within_its_range() -> None:
    """The image, CI and the README's commands install with -c constraints.txt: a dependency
    left out of it would float, one pinned outside pyproject's range would not install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        canonicalize_name(name): Version(version)
        for name, version in (
            line.split("==")
            for line in CONSTRAINTS.read_text().splitlines()
            if line and not line.startswith("#")
        )
    }
    for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt (tools/refresh-constraints.sh)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_sdist_and_wheel_carry_the_defaults_the_page_and_the_license(
    installed: Installed,
) -> None:
    with tarfile.open(installed.sdist) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "config/service.toml",
        "web/index.html",
        "web/app.js",
        "web/style.css",
        "LICENSE",
        "constraints.txt",
        "pyproject.toml",
    } <= in_sdist
    assert not any(name.startswith(("tests/", ".venv/", "bench/")) for name in in_sdist)
    shipped = {
        "service/data/config/service.toml",
        "service/data/web/index.html",
        "service/data/web/app.js",
        "service/data/web/style.css",
    }
    with zipfile.ZipFile(installed.wheel) as wheel:
        in_wheel = set(wheel.namelist())
        assert shipped <= in_wheel
        for name in shipped:
            assert wheel.read(name) == (ROOT / name.removeprefix("service/data/")).read_bytes()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in in_wheel)


def test_the_venv_holds_only_the_wheel_and_its_dependencies(
    installed: Installed, tmp_path: Path
) -> None:
    where = run(
        installed.venv / "bin" / "python",
        "-c",
        "import service, sys; print(service.__file__); print(sys.prefix)",
        cwd=tmp_path,
    )
    module, prefix = where.split()
    assert Path(module).is_relative_to(installed.venv), "service was imported from elsewhere"
    assert Path(prefix) == installed.venv
    probe = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import pytest"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode != 0, "the test venv's packages leak into the installed one"


class Server:
    """The installed `sse-fanout serve`, outside the repository, on a port it picked."""

    def __init__(self, installed: Installed, cwd: Path, *args: str, **settings: object) -> None:
        self.argv = [str(installed.script), "serve", *args]
        self.cwd = cwd
        env = _clean_env()
        env.update({f"SSE_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""

    async def __aenter__(self) -> Server:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            self.url = await self._serving_url()
        except BaseException:
            await self.__aexit__()  # a failed start must not leave the server running
            raise
        return self

    async def _serving_url(self) -> str:
        """The address in the start-up line (other lines before it are allowed here)."""
        assert self.process is not None
        assert self.process.stderr is not None
        seen = []
        async with asyncio.timeout(30):
            while line := (await self.process.stderr.readline()).decode():
                seen.append(line)
                if match := re.search(r"serving on (http://127\.0\.0\.1:\d+)[;,]", line):
                    return match[1]
        raise AssertionError(f"the installed server exited: {''.join(seen)}")

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def stream_a_run(http: aiohttp.ClientSession, url: str) -> list[tuple[str, str]]:
    async with http.get(f"{url}/sse/getSessionId") as response:
        assert response.status == 200
        session_id = await response.text()
    async with http.get(f"{url}/sse/connect", params={"sessionId": session_id}) as response:
        assert response.status == 200
        events = await collect(response, timeout_s=20)
    assert all(session_id in event.data for event in events)
    return [(event.event, event.id) for event in events]


async def test_installed_console_script_streams_a_run_and_serves_the_page(
    installed: Installed, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Only the port and the pace differ from the packaged defaults.
    async with Server(installed, tmp_path, port=0, producer_interval_ms=20) as server:
        events = await stream_a_run(http, server.url)
        assert [name for name, _ in events] == ["message"] * 9 + ["finish"]
        assert len({event_id for _, event_id in events}) == 10
        for path, source in (
            ("/", "web/index.html"),
            ("/app.js", "web/app.js"),
            ("/style.css", "web/style.css"),
        ):
            async with http.get(f"{server.url}{path}") as response:
                assert response.status == 200, path
                assert await response.read() == (ROOT / source).read_bytes()
        async with http.get(f"{server.url}/docs") as response:
            assert response.status == 200


async def test_config_option_overrides_the_packaged_defaults(
    installed: Installed, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = tmp_path / "mine.toml"
    config.write_text("port = 0\nproducer_event_count = 3\nproducer_interval_ms = 20\n")
    async with Server(installed, tmp_path, "--config", str(config)) as server:
        events = await stream_a_run(http, server.url)
        assert [name for name, _ in events] == ["message", "message", "finish"]
