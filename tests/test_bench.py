"""The benchmark tool: every scenario runs end to end at a tiny scale against every contestant,
so it cannot rot, and the pieces its figures rest on measure what they claim."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import procs
from bench.__main__ import parse_args, rotated
from bench.churn import Batcher, Counts, one_cycle
from bench.drain import nginx_conf as drain_nginx_conf
from bench.drain import peak_per_bucket
from bench.nchan import nchan_missing, nginx_binary, nginx_config, redis_server_line
from bench.publish import HttpReplies
from bench.stack import NAIVE, Worker
from bench.summary import summarise
from bench.tally import Tally, id_position

from redis_process import require_tool

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--connections", "20", "--rates", "400,max", "--duration", "0.3", "--max-events", "100",
    "--hold", "0", "--concurrency", "20", "--demo-interval-ms", "5", "--churn-clients", "10",
    "--progress", "off",
]  # fmt: skip


def require_nchan() -> None:
    """Skip (or fail where tools are required) without nginx's nchan module."""
    reason = nchan_missing()
    require_tool(None if reason else "nchan", reason or "")


def run_bench(args: list[str], out: Path, timeout_s: float = 200) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, *TINY, "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    document: dict[str, Any] = json.loads(out.read_text())
    document["stdout"] = done.stdout
    return document


def assert_clean(result: dict[str, Any]) -> None:
    """Every stream connected and every event arrived, in order, once."""
    assert result.get("connect_failures", 0) == 0, result
    assert "failure" not in result, result
    scenario = result["scenario"]
    if scenario == "capacity":
        assert result["held"] == 20, result
    elif scenario == "seed":
        assert (result["complete"], result["out_of_order"]) == (20, 0), result
    elif scenario == "churn":
        assert result["cycles"] > 0, result
        assert (result["failures"], result["missing"], result["bad_events"]) == (0, 0, 0)
        # One publish per completed cycle, none lost on the way.
        assert result["published"] >= result["cycles"], result
    else:
        assert (result["lost"], result["reordered"]) == (0, 0), result
        # Each stream's `finish` is published after the measured window.
        measured = result["connections"] * (result["events_per_session"] - 1)
        assert result["deliveries"] == measured, result


# --- end to end ------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_every_scenario_runs_against_the_service_and_the_naive_design(
    redis_url: str, tmp_path: Path
) -> None:
    document = run_bench(["all", "--targets", "sse-fanout,naive", "--redis-url", redis_url],
                         tmp_path / "bench.json")  # fmt: skip
    results = document["results"]
    seen = {(r["scenario"], r["target"]) for r in results}
    assert seen == {
        (scenario, target)
        for scenario in ("churn", "capacity", "fanout", "broadcast", "seed")
        for target in ("sse-fanout", "naive")
    }
    for result in results:
        assert_clean(result)
    capacity = {r["target"]: r for r in results if r["scenario"] == "capacity"}
    # One Redis connection per stream is what the baseline is there to show.
    assert capacity["naive"]["worker_redis_connections"] >= 20
    assert capacity["sse-fanout"]["worker_redis_connections"] < 20
    for row in capacity.values():
        assert row["worker_pss_kib_per_stream"] > 0, row
    # Every headline figure is given as a ratio to the naive design, from the same run.
    summary = document["summary"]
    assert set(summary) >= {"churn_cycles_per_s", "idle_stream_pss_kib", "fanout_clean_max"}
    for entry in summary.values():
        ours, theirs = entry["median"]["sse-fanout"], entry["median"]["naive"]
        assert entry["ratio_to"]["sse-fanout"]["naive"] == pytest.approx(ours / theirs, abs=0.006)
    assert "pinned" in document["pinning"]
    assert document["machine"]["versions"]["redis_server"]
    assert "churn" in document["stdout"]


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_nchan_in_both_stores_runs_every_table_scenario_and_is_compared(
    redis_url: str, tmp_path: Path
) -> None:
    require_nchan()
    targets = ["sse-fanout", "nchan-memory", "nchan-redis"]
    document = run_bench(
        ["table", "--targets", ",".join(targets), "--redis-url", redis_url, "--rates", "max"],
        tmp_path / "bench.json",
    )
    results = document["results"]
    assert document["skipped"] == {}
    seen = {(r["scenario"], r["target"]) for r in results}
    assert seen == {
        (scenario, target)
        for scenario in ("churn", "capacity", "fanout", "broadcast")
        for target in targets
    }
    for result in results:
        assert_clean(result)
    capacity = {r["target"]: r for r in results if r["scenario"] == "capacity"}
    # The Redis flavour really keeps its channels in Redis, the memory flavour does not.
    assert capacity["nchan-redis"]["worker_redis_connections"] > 0
    assert capacity["nchan-memory"]["worker_redis_connections"] == 0
    # nginx runs as a master and a worker; memory is summed over both.
    assert capacity["nchan-memory"]["server_processes"] == 2
    summary = document["summary"]
    assert len(summary) == 8
    for entry in summary.values():
        assert set(entry["ratio_to"]["sse-fanout"]) == {"nchan-memory", "nchan-redis"}, entry


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_the_drain_scenario_compares_all_at_once_with_paced_and_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    require_tool(nginx_binary(), "nginx is not installed (apt-get install nginx)")
    document = run_bench(
        ["drain", "--redis-url", redis_url, "--drain-timeout", "2", "--no-pin"],
        tmp_path / "bench.json",
    )
    drains = {r["mode"]: r for r in document["results"] if r["scenario"] == "drain"}
    assert set(drains) == {"all-at-once", "paced"}
    for result in drains.values():
        assert "failure" not in result, result
        assert result["streams"] == 20
        assert (result["lost"], result["duplicates"], result["unexpected"]) == (0, 0, 0), result
        assert result["never_resumed"] == 0, result
        assert result["all_resumed_s"] <= result["deadline_s"], result
        assert sum(result["reconnects_per_100ms"]) == result["reconnect_attempts"] >= 20
    old, new = drains["all-at-once"], drains["paced"]
    assert old["settings"]["drain_spread"] == "0"
    assert old["peak_reconnects_per_100ms"] > new["peak_reconnects_per_100ms"], (old, new)
    ratio = document["ratios"]["drain peak reconnects per 100 ms: all-at-once/paced"]
    assert ratio == pytest.approx(
        old["peak_reconnects_per_100ms"] / new["peak_reconnects_per_100ms"], abs=0.006
    )
    assert "all-at-once/paced" in document["stdout"]


def test_reconnects_are_counted_per_100_ms_from_the_signal() -> None:
    peak, buckets = peak_per_bucket([10.0, 10.05, 10.12, 10.13, 10.14, 10.35], start=10.0)
    assert buckets == [2, 3, 0, 1]
    assert peak == 3
    assert peak_per_bucket([], start=0.0) == (0, [])


def test_nginx_accepts_the_drain_scenario_config(tmp_path: Path) -> None:
    nginx = require_tool(nginx_binary(), "nginx is not installed (apt-get install nginx)")
    config = tmp_path / "nginx.conf"
    config.write_text(drain_nginx_conf([18001, 18002, 18003], 18000))
    text = config.read_text()
    assert text.count("server 127.0.0.1:1800") == 3
    assert "access_log off;" in text
    checked = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", "stderr",
         "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_repetitions_rotate_the_contestants_so_none_always_goes_first() -> None:
    targets = ["a", "b", "c"]
    orders = [rotated(targets, k) for k in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_profiling_without_py_spy_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no py-spy on it
    with pytest.raises(SystemExit) as refused:
        parse_args(["churn", "--profile", str(tmp_path / "profiles")])
    assert refused.value.code == 2
    assert "--profile needs py-spy" in capsys.readouterr().err
    assert not (tmp_path / "profiles").exists()


@pytest.mark.redis
def test_a_contestant_that_cannot_run_is_skipped_with_its_reason(
    redis_url: str, tmp_path: Path
) -> None:
    document = run_bench(
        ["capacity", "--targets", "naive,nchan-nonesuch", "--redis-url", redis_url,
         "--repeat", "2"],
        tmp_path / "bench.json",
    )  # fmt: skip
    assert "nchan-nonesuch" in document["skipped"]
    assert "unknown contestant" in document["skipped"]["nchan-nonesuch"]
    assert "nchan-nonesuch skipped" in document["stdout"]
    assert [(r["target"], r["repeat"]) for r in document["results"]] == [("naive", 0), ("naive", 1)]
    # With repetitions, the summary gives each run's value and their median.
    memory = document["summary"]["idle_stream_pss_kib"]
    assert len(memory["runs"]["naive"]) == 2


# --- churn's checks ----------------------------------------------------------------------


class _FakeServer:
    """Answers any GET with event-stream headers, then does what the test asks."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.published: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hi\n\n")
        if self.mode == "close":
            writer.close()
            return
        self.writers.append(writer)
        await reader.read()  # until the client hangs up
        writer.close()

    def publish(self, session_ids: list[str]) -> None:
        """The bench's publisher, as far as the server can tell."""
        data = b"0 1" if self.mode == "right" else b"5 1"
        for writer in self.writers:
            writer.write(b"id: 17-0\ndata: " + data + b"\n\n")
        self.published += session_ids

    async def __aenter__(self) -> Worker:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Worker(NAIVE, cast(Any, None), port, Path("/nonexistent"))

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()


async def test_a_churn_cycle_counts_the_published_event() -> None:
    fake = _FakeServer("right")
    async with fake as worker:
        counts = Counts()
        await asyncio.wait_for(one_cycle(worker, Batcher(fake.publish), counts), 10)
    assert (counts.cycles, counts.failures, counts.missing, counts.bad_events) == (1, 0, 0, 0)
    assert len(fake.published) == 1  # published once its headers were in


async def test_a_churn_cycle_whose_stream_ends_without_its_event_is_missing() -> None:
    fake = _FakeServer("close")
    async with fake as worker:
        counts = Counts()
        await asyncio.wait_for(one_cycle(worker, Batcher(fake.publish), counts), 10)
    assert (counts.cycles, counts.missing, counts.failures) == (0, 1, 1)
    assert "ended before its first event" in counts.failure


async def test_a_churn_cycle_that_gets_another_event_counts_it_as_bad() -> None:
    fake = _FakeServer("wrong")
    async with fake as worker:
        counts = Counts()
        await asyncio.wait_for(one_cycle(worker, Batcher(fake.publish), counts), 10)
    assert counts.bad_events == 1
    assert "unexpected first event" in counts.failure


# --- parsing and arithmetic -------------------------------------------------------------


def _http_reply(status: int, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d X\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: keep-alive\r\n\r\n%b" % (status, len(body), body)
    )


@given(
    replies=st.lists(
        st.tuples(st.sampled_from([201, 202, 403, 500]), st.binary(max_size=120)),
        min_size=1, max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)  # fmt: skip
def test_pipelined_http_replies_are_counted_however_the_bytes_are_split(
    replies: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(_http_reply(status, body) for status, body in replies)
    parser, got = HttpReplies(), []
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    for start, stop in itertools.pairwise(points):
        parser.feed(wire[start:stop])
        while (status := parser.gets()) is not False:
            got.append(status)
    assert got == [status for status, _ in replies]


def test_ids_of_both_designs_compare_in_order() -> None:
    assert id_position(b"1795606792126-0") < id_position(b"1795606792126-1")
    assert id_position(b"1796041548:9") < id_position(b"1796041549:0")
    for bad in (b"", b"abc", b"1-x", b"1:y"):
        with pytest.raises(ValueError, match="invalid literal"):
            id_position(bad)


async def test_the_tally_counts_an_nchan_id_going_backwards() -> None:
    tally = Tally(streams=1, events_per_stream=3)

    class _Stream:
        tag = 0

    stream = cast(Any, _Stream())
    tally.sink(stream, b"1796041548:1", b"", b"0 1")
    tally.sink(stream, b"1796041548:0", b"", b"1 1")  # an older id on a newer event
    assert tally.reordered == 1


def test_the_summary_takes_medians_over_repeats_then_their_ratios() -> None:
    def churn(target: str, repeat: int, rate: float, missing: int = 0) -> dict[str, Any]:
        return {
            "scenario": "churn", "target": target, "repeat": repeat, "cycles": 10,
            "cycles_per_s": rate, "worker_cpu_ms_per_cycle": 1.0,
            "server_redis_cpu_ms_per_cycle": 1.0,
            "publish_server_redis_cpu_ms_per_event": 0.1, "failures": missing,
            "missing": missing, "bad_events": 0,
        }  # fmt: skip

    def fanout(target: str, rate: float, delivered: float, lost: int) -> dict[str, Any]:
        return {
            "scenario": "fanout", "target": target, "repeat": 0, "offered_rate": rate,
            "deliveries_per_s": delivered, "server_redis_cpu_ms_per_1000": 50.0, "lost": lost,
            "reordered": 0,
        }  # fmt: skip

    results = [
        *(churn("sse-fanout", k, v) for k, v in enumerate([100.0, 300.0, 200.0])),
        *(churn("nchan-memory", k, v) for k, v in enumerate([1000.0, 900.0, 1100.0])),
        churn("naive", 0, 50.0),
        churn("naive", 1, 60.0, missing=1),
        churn("naive", 2, 40.0),
        fanout("sse-fanout", 4000, 3990, 0),
        fanout("sse-fanout", 0, 50000, 3),
        fanout("naive", 4000, 3995, 0),
        fanout("naive", 0, 20000, 0),
    ]
    summary = summarise(results)
    cycles = summary["churn_cycles_per_s"]
    assert cycles["median"] == {"sse-fanout": 200.0, "nchan-memory": 1000.0, "naive": 50.0}
    assert cycles["ratio_to"]["sse-fanout"] == {"nchan-memory": 0.2, "naive": 4.0}
    assert cycles["troubled"] == ["naive"]
    # A step that lost events does not count as clean throughput: the paced one does.
    clean = summary["fanout_clean_max"]
    assert clean["median"] == {"sse-fanout": 3990.0, "naive": 20000.0}
    assert clean["troubled"] == ["sse-fanout"]
    assert "churn_publish_cpu_ms" in summary
    assert "idle_stream_pss_kib" not in summary  # no capacity step ran


def test_redis_urls_are_handed_to_nchan_with_their_port_and_database() -> None:
    assert redis_server_line("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"
    assert redis_server_line("redis://:pw@localhost/3") == "redis://:pw@localhost:6379/3"
    with pytest.raises(ValueError, match="redis://"):
        redis_server_line("unix:///tmp/redis.sock")


def test_nchan_without_its_module_says_what_to_install(tmp_path: Path) -> None:
    reason = nchan_missing(tmp_path / "ngx_nchan_module.so")
    assert reason is not None
    assert "libnginx-mod-nchan" in reason


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_nginx_accepts_the_generated_config(store: str, tmp_path: Path) -> None:
    require_nchan()
    nginx = nginx_binary()
    assert nginx is not None
    config = tmp_path / "nginx.conf"
    redis_url = "redis://127.0.0.1:6379/0" if store == "redis" else None
    config.write_text(
        nginx_config(port=1, workdir=tmp_path, max_connections=1024, redis_url=redis_url)
    )
    checked = subprocess.run(
        [nginx, "-t", "-c", str(config), "-p", str(tmp_path), "-e", str(tmp_path / "e.log")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert ("nchan_redis_pass" in config.read_text()) == (store == "redis")


# --- processes: memory, CPU and pinning over a tree --------------------------------------

_CHILD = "import time; x = b'x' * (30 << 20); time.sleep(60)"
_PARENT = f"""
import subprocess, sys, threading, time
child = subprocess.Popen([sys.executable, "-c", {_CHILD!r}])
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def process_tree() -> Any:
    """A process with a thread and a child holding 30 MiB: (parent pid, child pid)."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 20
        while procs.pss_kib(child) < 30 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield parent.pid, child
    finally:
        for pid in procs.tree(parent.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_memory_and_cpu_are_summed_over_the_process_tree(process_tree: Any) -> None:
    parent, child = process_tree
    assert procs.tree(parent) == [parent, child]
    # The child's 30 MiB counts toward the tree, not toward the parent alone.
    assert procs.tree_pss_kib(parent) - procs.pss_kib(parent) >= 30 * 1024
    assert procs.tree_cpu_s(parent) >= procs.cpu_s(parent)
    assert procs.parse_rollup("Rss:   12 kB\nPss:    7 kB\nbogus\n") == {"Rss": 12, "Pss": 7}


def test_pinning_reaches_every_thread_of_every_process(process_tree: Any) -> None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("pinning needs two usable cores to show anything")
    parent, child = process_tree
    target = frozenset(usable[-1:])
    pinned = procs.pin_tree(parent, target)
    tasks = [
        int(task.name) for pid in (parent, child) for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    assert pinned == len(tasks) >= 3  # the parent's two threads and the child
    assert all(os.sched_getaffinity(task) == target for task in tasks)


def test_pinning_says_why_it_could_not_pin() -> None:
    assert procs.plan_pinning(False).describe() == "not pinned: --no-pin"
    usable = len(os.sched_getaffinity(0))
    too_few = procs.plan_pinning(True, server_cores=usable)
    assert not too_few.active
    assert f"{usable} usable core(s)" in too_few.reason
