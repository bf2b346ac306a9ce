"""The chaos suite: every fault ends with each event delivered once, or the client told and done.

Each test drives real processes (redis-server or a cluster, workers, producers, nginx) with
EventSource-like clients (`chaos_harness`), injects one fault, and checks the pass rule: no
duplicate ever; no loss where Redis kept its data; where it lost data, every client gets
`gap` and then ends (on `finish` or a 204) in bounded time; every worker goes back to no open
stream and about its idle memory; `/readyz` says "not ready" while a worker cannot deliver
and "ready" again once it can. Each test prints its row of the report the run ends with.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from chaos_harness import (
    API_ROLE,
    DEMO_ROLE,
    KEYS,
    Deployment,
    Lab,
    metric,
    rss_bytes,
    wait_until,
)
from chaos_report import FaultRow, recovery_s, report, verdict
from chaos_workload import Workload, new_session_id
from event_source import AUTH, ApiPublisher, EventSourceClient, NonReader
from redis_process import require_redis_server
from stack_processes import Worker, require_nginx

pytestmark = [pytest.mark.redis, pytest.mark.chaos, pytest.mark.timeout(180)]

TARGETS = pytest.mark.parametrize("target", ["single", "cluster"])
CLIENTS = 50
# Long enough for every client to reconnect, catch up and reach `finish` after any fault.
SETTLE_S = 30.0
# Readiness may lag a fault by one Redis command timeout (1 s) and a probe's own latency.
READINESS_GRACE_S = 1.5


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    chaos_lab = Lab(tmp_path, require_redis_server())
    try:
        yield chaos_lab
    finally:
        await chaos_lab.close()


async def deployment_for(lab: Lab, target: str) -> Deployment:
    return await lab.cluster() if target == "cluster" else await lab.single()


async def mixed_workload(lab: Lab, deployment: Deployment) -> Workload:
    """25 demo runs on a worker with its embedded producer, 25 API-fed sessions on another."""
    stack = await lab.stack(deployment, workers=2, roles=[DEMO_ROLE, API_ROLE])
    demo, api = stack.worker_processes
    work = Workload(stack, lab.http(), demo_urls=[demo.url], api_url=api.url)
    await work.start(demo=CLIENTS // 2, api=CLIENTS // 2)
    await work.midway()
    return work


async def conclude(
    lab: Lab,
    work: Workload,
    deployment: Deployment,
    fault: str,
    *,
    lost: Callable[[str], bool] = lambda _: False,
    note: str = "",
    extra: list[str] | None = None,
) -> None:
    """Let the clients finish, count, print the row and apply the pass rule."""
    await work.settle(SETTLE_S)
    tally = await work.account(deployment, lost)
    problems = [*work.problems, *(extra or [])]
    problems += await work.idle_problems()
    await work.stop_probes()
    problems += work.readiness_problems(READINESS_GRACE_S)
    note = "; ".join([f"rss +{work.rss_growth / 2**20:.0f} MiB", *([note] if note else [])])
    row = report(
        FaultRow(
            f"{fault} [{deployment_name(deployment)}]",
            tally,
            recovery_s(work.clients, work.injected),
            note,
        )
    )
    verdict(row, problems, lab.logs)


def deployment_name(deployment: Deployment) -> str:
    return "cluster" if deployment.cluster else "single"


# --- Redis faults ---


@TARGETS
async def test_redis_sigkill_and_restart_with_its_data(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    await deployment.persist()
    work = await mixed_workload(lab, deployment)
    work.fault_started()
    restarted = await deployment.kill_and_restart(
        deployment.nodes[:1], keep_data=True, down_s=0.5 if deployment.cluster else 2.5
    )
    # One node of three down is a partial outage: readiness is only held to "ready" after.
    work.fault_ended(outage_until=None if deployment.cluster else restarted)
    await conclude(
        lab,
        work,
        deployment,
        "redis SIGKILL, restart with data",
        note="1 of 3 nodes" if deployment.cluster else "",
    )


@TARGETS
async def test_redis_sigkill_and_restart_empty(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    work = await mixed_workload(lab, deployment)
    # On a cluster, the node that also holds the index of runs in progress.
    victim = await deployment.node_of_key(KEYS.runs)
    on_victim = {
        c.session_id for c in work.clients if await deployment.node_of(c.session_id) is victim
    }
    work.fault_started()
    restarted = await deployment.kill_and_restart(
        [victim], keep_data=False, down_s=0.5 if deployment.cluster else 2.5
    )
    work.fault_ended(outage_until=None if deployment.cluster else restarted)
    where = "the node of the runs index; " if deployment.cluster else ""
    await conclude(
        lab,
        work,
        deployment,
        "redis SIGKILL, restart empty",
        lost=on_victim.__contains__,
        note=f"{where}{len(on_victim)} sessions lost their data",
    )


@TARGETS
async def test_redis_stalled_longer_than_the_command_timeout(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    work = await mixed_workload(lab, deployment)
    work.fault_started()
    back = await deployment.stall(2.5)  # the workers' redis_timeout_s is 1.0
    work.fault_ended(outage_until=back)
    await conclude(lab, work, deployment, "redis busy script 2.5s (timeout 1s)")


@TARGETS
async def test_redis_client_pause(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    work = await mixed_workload(lab, deployment)
    work.fault_started()
    unpaused = await deployment.pause(2.5)
    await asyncio.sleep(max(0.0, unpaused - time.monotonic()))  # the pause runs its course
    work.fault_ended(outage_until=unpaused)
    await conclude(lab, work, deployment, "CLIENT PAUSE 2.5s ALL")


@TARGETS
async def test_redis_kills_every_pubsub_connection(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    work = await mixed_workload(lab, deployment)
    work.fault_started()
    killed = await deployment.kill_pubsub()
    work.fault_ended()
    await conclude(
        lab, work, deployment, "CLIENT KILL TYPE pubsub", note=f"{killed} connections cut"
    )


# --- Process faults ---


@pytest.mark.stack
@TARGETS
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_worker_killed_mid_run_behind_nginx(
    lab: Lab, signum: signal.Signals, target: str
) -> None:
    deployment = await deployment_for(lab, target)
    stack = await lab.stack(
        deployment, workers=3, embedded_producer=False, producers=1, nginx_binary=require_nginx()
    )
    work = Workload(stack, lab.http(), demo_urls=[stack.url])
    await work.start(demo=CLIENTS, api=0)
    await work.midway()
    victim = stack.worker_processes[0]
    streams = await _open_streams(work, victim)
    work.fault_started()
    victim.send(signum)
    await wait_until(lambda: not victim.running, 15, f"{victim.name} to exit")
    work.fault_ended()
    extra = [] if streams else [f"{victim.name} held no stream when it was signalled"]
    await conclude(
        lab,
        work,
        deployment,
        f"worker {signum.name} mid-run (nginx)",
        note=f"victim held {streams} streams",
        extra=extra,
    )


async def _open_streams(work: Workload, worker: Worker) -> int:
    return round(await metric(work.http, worker, "sse_open_streams"))


@TARGETS
async def test_producer_sigkill_mid_run(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    stack = await lab.stack(deployment, workers=2, embedded_producer=False, producers=1)
    work = Workload(stack, lab.http(), demo_urls=stack.client_urls())
    await work.start(demo=CLIENTS, api=0)
    await work.midway()
    # A second producer joins while the first holds every run, then the first dies.
    standby = stack.add_producer()
    await stack.wait_producer(standby)
    work.fault_started()
    stack.producer_processes[0].send(signal.SIGKILL)
    work.fault_ended()
    await conclude(lab, work, deployment, "producer SIGKILL mid-run (standby takes over)")


# --- Load faults ---

BURST = 1000
EVENTS_AFTER_BURST = 1


@TARGETS
async def test_burst_of_simultaneous_fresh_connects(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    stack = await lab.stack(deployment, workers=1, roles=[DEMO_ROLE])
    work = Workload(stack, lab.http(), demo_urls=[stack.url])
    work.fault_started()
    await work.start(demo=BURST, api=0)
    await work.midway(events=EVENTS_AFTER_BURST, timeout_s=SETTLE_S)
    work.fault_ended()  # the burst is over once every stream delivers
    # Sessions that start after the burst must run as well.
    later = [EventSourceClient(stack.url, new_session_id()) for _ in range(CLIENTS)]
    await work.add_clients(later)
    await conclude(
        lab,
        work,
        deployment,
        f"burst of {BURST} fresh connects",
        note=f"then {CLIENTS} more sessions",
    )


STORM = 100
WRITE_TIMEOUT_S = 2.0
LOG_EVENTS = 1000
LOG_EVENT_BYTES = 2048


@TARGETS
async def test_storm_of_resumes_of_a_full_log(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    stack = await lab.stack(
        deployment,
        workers=1,
        roles=[API_ROLE],
        settings={"log_maxlen": 2 * LOG_EVENTS, "max_connections_per_session": 10 * STORM},
    )
    http = lab.http()
    # A first storm raises the allocator's high-water mark once; the counted one after it
    # must leave the worker's memory where the first did (more would be held per storm).
    warm_up = Workload(stack, http, api_url=stack.url)
    await _storm(warm_up, stack.url)
    await warm_up.settle(SETTLE_S)
    extra = [
        f"first storm: {n} clients ended as {how}"
        for how, n in Counter(c.ended or "silenced" for c in warm_up.api).items()
        if how != "finish"
    ]
    work = Workload(stack, http, api_url=stack.url)
    await work.watch(stack.worker_processes)
    await _storm(work, stack.url)
    await conclude(
        lab,
        work,
        deployment,
        f"{STORM} resumes of a {LOG_EVENTS}x2KB log",
        note="after a first storm",
        extra=extra,
    )


async def _storm(work: Workload, url: str) -> None:
    """STORM clients resume a full log at once; `finish` follows once they replayed it."""
    session_id = new_session_id()
    first_id = await _fill_log(work.http, url, session_id, LOG_EVENTS, LOG_EVENT_BYTES)
    publisher = work.publisher = ApiPublisher(work.http, url)
    publisher.accepted[session_id] = [_padded(k, LOG_EVENT_BYTES) for k in range(LOG_EVENTS)]
    work.api = [EventSourceClient(url, session_id, last_event_id=first_id) for _ in range(STORM)]
    work.fault_started()
    await work.add_api_clients()
    await work.wait_for(
        lambda c: len(c.content()) >= LOG_EVENTS - 1, SETTLE_S, "every resume to replay the log"
    )
    work.fault_ended()
    await publisher.publish(session_id, "end", "finish")


def _padded(k: int, size: int) -> str:
    return f"{k}:".ljust(size, "x")


async def _fill_log(
    http: aiohttp.ClientSession, url: str, session_id: str, count: int, size: int
) -> str:
    """Publish `count` events of `size` bytes in batches; the first event's id."""
    ids: list[str] = []
    for start in range(0, count, 100):
        batch = [{"data": _padded(k, size)} for k in range(start, min(count, start + 100))]
        async with http.post(
            f"{url}/sse/sessions/{session_id}/events", json=batch, headers=AUTH
        ) as response:
            assert response.status == 202, await response.text()
            ids += (await response.json())["ids"]
    return ids[0]


async def test_clients_that_never_read(lab: Lab) -> None:
    deployment = await lab.single()
    stack = await lab.stack(
        deployment,
        workers=2,
        roles=[DEMO_ROLE, API_ROLE],
        settings={"write_timeout_s": WRITE_TIMEOUT_S},
    )
    demo, api = stack.worker_processes
    http = lab.http()
    replayed, live = new_session_id(), new_session_id()
    first_id = await _fill_log(http, api.url, replayed, 1000, 8192)  # an 8 MiB log
    work = Workload(stack, http, demo_urls=[demo.url], api_url=api.url)
    await work.start(demo=CLIENTS // 2, api=CLIENTS // 2)
    stalled = [NonReader() for _ in range(20)]
    try:
        for n, reader in enumerate(stalled):
            await reader.open(api.url, *((replayed, first_id) if n % 2 else (live,)))
        work.fault_started()
        await _fill_log(http, api.url, live, 600, 4096)  # more than a stream's inbox holds
        work.fault_ended()
        peak = rss_bytes(api)
        # Both sessions end. The stalled clients keep their sockets open: the worker must let
        # go of them on its own, at the latest when a write has waited WRITE_TIMEOUT_S.
        assert work.publisher is not None
        for session_id in (replayed, live):
            await work.publisher.publish(session_id, "end", "finish")
        await conclude(
            lab,
            work,
            deployment,
            "20 clients that never read",
            note=f"api worker peak {peak / 2**20:.0f} MiB",
        )
    finally:
        for reader in stalled:
            reader.close()


FLOOD = 1000


@TARGETS
async def test_publish_flood_to_one_session(lab: Lab, target: str) -> None:
    deployment = await deployment_for(lab, target)
    stack = await lab.stack(
        deployment,
        workers=1,
        roles=[API_ROLE],
        settings={"log_maxlen": 5 * FLOOD, "max_connections_per_session": 10 * CLIENTS},
    )
    http = lab.http()
    session_id = new_session_id()
    publisher = ApiPublisher(http, stack.url)
    work = Workload(stack, http, api_url=stack.url, publisher=publisher)
    await work.watch(stack.worker_processes)
    work.api = [EventSourceClient(stack.url, session_id) for _ in range(CLIENTS)]
    await work.add_api_clients()
    await wait_until(lambda: all(c.connects for c in work.api), 20, "every client to connect")
    work.fault_started()
    queue = iter(range(FLOOD))

    async def sender() -> None:
        for k in queue:
            await publisher.publish(session_id, str(k))

    await asyncio.gather(*(sender() for _ in range(32)))
    work.fault_ended()
    await publisher.publish(session_id, "end", "finish")
    await conclude(
        lab,
        work,
        deployment,
        f"flood of {FLOOD} API publishes, 1 session",
        note=f"{sum(publisher.retries.values())} publish retries",
    )
