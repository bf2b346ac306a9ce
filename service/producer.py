"""The demo producer: once per session run, N events at an interval, the last named `finish`.

A run is requested by the first fresh connection of a session (after its subscription is
live). Any producer, in-process or in a separate process, may execute it: it claims the run's
lease (`SET NX PX`), publishes with a fence (it must still own the lease and be at the right
step), and renews the lease as it goes. If its process dies, the lease expires and another
producer, polling the `runs` index, takes the run over at the next unsent event.

The `runs` index is a hint, not the truth: the run's state is. On a cluster the index lives
on one node and each run on its session's node, so the index can lose entries (its node
restarted empty) while runs go on. A producer therefore puts back the runs it executes, and
every run it lets go of unfinished (lease lost, Redis error, a bug, shutdown), for as long
as the run's state says it is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from .envelope import FINISH_EVENT
from .hub import Hub
from .keys import Keys
from .mailbox import Listener
from .publisher import Fence, Published, Publisher, PublishOutcome
from .redis.connections import RedisClient, pipelines_queue
from .replies import reply_text
from .runs import request_run
from .settings import Settings
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

SCAN_BATCH = 100
RETRY_BASE_S = 0.1
RETRY_CAP_S = 2.0

# KEYS: run, lease. ARGV: token, lease_ms.
# Returns false when the run is gone or finished, {-1, pttl} when another producer holds it,
# or {next, count} when the caller now owns it.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return false end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fields = redis.call('HMGET', KEYS[1], 'next', 'count')
  return {tonumber(fields[1]), tonumber(fields[2])}
end
return {-1, redis.call('PTTL', KEYS[2])}
"""

# KEYS: lease, run. ARGV: token.
# Deletes the lease only while the caller still holds it; answers the run's state (or false).
_LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('HGET', KEYS[2], 'state')
"""

# KEYS: runs. ARGV: session id, score ('' = any score a listing set, not a request).
# Drops an entry of the runs index unless it changed meanwhile: a request made since (a new
# run of the same session, a run let go of) must survive the removal of the one before.
_UNLIST = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
if ARGV[2] == '' then
  if tonumber(score) < 0 then return 0 end
elseif tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: run, lease. ARGV: token.
# Parks a run nobody listens to: it stays where it stopped, for a resume to wake it.
_PARK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'parked')
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: lease. ARGV: token, lease_ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def demo_event(session_id: str, seq: int, count: int, now: datetime) -> tuple[str, str]:
    """Event name and data of step `seq` of `count`, worded as the original demo words them."""
    clock = now.strftime("%H:%M:%S.%f")
    if seq == count - 1:
        return FINISH_EVENT, f"server time: {clock} 结束: {session_id}"
    return "", f"server time: {clock} id: {session_id}"


class Producer:
    """Executes demo runs: claims them, publishes their events, survives other producers' deaths."""

    def __init__(
        self,
        redis: RedisClient,
        hub: Hub,
        *,
        publisher: Publisher,
        keys: Keys,
        settings: Settings,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self._redis = redis
        self._hub = hub
        self._publisher = publisher
        self._keys = keys
        self._interval_s = settings.producer_interval_ms / 1000
        self._lease_ms = settings.producer_lease_ms
        self._poll_s = settings.producer_poll_ms / 1000
        self._clock = clock
        self._token_prefix = secrets.token_hex(8)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._let_go_script = redis.register_script(_LET_GO)
        self._unlist_script = redis.register_script(_UNLIST)
        self._park = redis.register_script(_PARK)
        self._idle_s = settings.run_idle_timeout_s
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._tokens: dict[str, str] = {}
        # Runs let go of unfinished whose return to the index failed: retried at each scan.
        self._adrift: dict[str, str] = {}
        self._own_runs_listed_at_ms = 0
        # Runs of ours that need no producer any more (finished, parked): never listed again.
        # The lock orders their removal from the index after any listing already under way.
        self._unlisted: set[str] = set()
        self._listing = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._scan_problem: str | None = None
        self.events_published = 0

    async def start(self) -> None:
        """Start the claim loop; it is live (subscribed to wake-ups) when this returns."""
        ready = asyncio.get_running_loop().create_future()
        self._loop_task = asyncio.create_task(self._claim_loop(ready), name="producer")
        self._loop_task.add_done_callback(lambda _: ready.cancel())  # never left waiting
        await ready

    async def close(self) -> None:
        """Stop claiming, cancel running runs and hand them back to the other producers.

        Handing a run back (deleting its lease while still ours, then waking producers) lets
        another producer resume it at once instead of after the lease expires.
        """
        held = {**self._adrift, **self._tokens}
        await cancel_and_wait([self._loop_task, *self._runs.values()])
        self._runs.clear()
        self._loop_task = None
        for session_id, token in held.items():
            try:
                if await self._let_go(session_id, token):
                    log.info("handed back run of session %s", session_id)
            except RedisError as error:
                log.warning(
                    "could not hand back run of session %s (its lease will expire): %s",
                    session_id,
                    error,
                )
        self._adrift.clear()

    async def _let_go(self, session_id: str, token: str) -> bool:
        """Release the run's lease if still ours and, if the run is active, request it again.

        True when the run was requested again: the index holds it and producers were woken.
        """
        k = self._keys
        state = await self._let_go_script(
            keys=[k.lease(session_id), k.run(session_id)], args=[token]
        )
        active = state is not None and reply_text(state) == "active"
        if active:
            await request_run(self._redis, k, session_id)
        self._adrift.pop(session_id, None)
        return active

    async def _let_go_unfinished(self, session_id: str, token: str) -> None:
        """Make a run this producer stopped executing findable again (later, if Redis fails)."""
        try:
            if await self._let_go(session_id, token):
                log.info("run of session %s requested again", session_id)
        except RedisError as error:
            self._adrift[session_id] = token
            log.warning(
                "run of session %s is requested again once Redis answers: %s", session_id, error
            )

    @property
    def active_runs(self) -> int:
        """Runs this producer is executing now."""
        return len(self._runs)

    @property
    def problem(self) -> str | None:
        """Why this producer cannot execute runs now, or None while it can (for readiness)."""
        if self._loop_task is None or self._loop_task.done():
            return "the demo producer is not running"
        return self._scan_problem

    async def _claim_loop(self, ready: asyncio.Future[None]) -> None:
        """Claim due runs whenever woken or polled, for as long as the producer runs.

        Nothing but cancellation ends it: a lost wake-up subscription (a hub reconnect, a
        drain, a failed hub) or a failed scan is logged, and the loop polls the runs index
        until it can subscribe again. A dead loop would leave every later run waiting.
        """
        failures = 0
        while True:
            try:
                async with self._hub.listen(self._keys.producer_wake, coalescing=True) as wake:
                    if not ready.done():
                        ready.set_result(None)
                    failures = 0
                    await self._claim_while_subscribed(wake)
                why = f"it ended ({wake.ended.value if wake.ended else 'unknown'})"
            except RedisError as error:  # HubClosedError included
                if not ready.done():
                    ready.set_exception(error)  # the app cannot start without its producer
                    return
                why = str(error)
            failures += 1
            delay_s = min(self._poll_s, RETRY_BASE_S * 2**failures)
            log.log(
                logging.INFO if why.endswith("(shutdown)") else logging.WARNING,
                "producer lost its wake-up subscription: %s; polling, subscribing again in %.1fs",
                why,
                delay_s,
            )
            await self._scan()
            await asyncio.sleep(delay_s)

    async def _claim_while_subscribed(self, wake: Listener) -> None:
        while wake.ended is None:
            if await self._scan():
                continue  # a full batch: more runs may be due, look again at once
            await wake.take(self._poll_s)  # a wake-up, or the poll interval

    async def _scan(self) -> bool:
        """One scan for due runs; True when it found a full batch. Errors are logged, not raised."""
        try:
            full = await self._claim_due_runs()
        except RedisError as error:
            log.warning("producer could not scan for runs: %s", error)
            return False
        except Exception:
            # A bug, not an outage: say so loudly, report not ready, and keep trying.
            log.exception("producer scan failed")
            self._scan_problem = "the demo producer cannot scan for runs (see the log)"
            return False
        self._scan_problem = None
        return full

    async def _claim_due_runs(self) -> bool:
        """Claim every due run not already ours, in one round trip for the lot where possible.

        A burst of new sessions wakes the producers with hundreds of runs due at once.
        Returns True when a full batch was due (more may be waiting).
        """
        now_ms = int(time.time() * 1000)
        await self._list_again(now_ms)
        due: list[tuple[bytes, float]] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self._keys.runs, "-inf", now_ms, 0, SCAN_BATCH, withscores=True
        )
        scores = {reply_text(raw): score for raw, score in due}
        session_ids = [s for s in scores if s not in self._runs]
        if not session_ids:
            return False
        tokens = [f"{self._token_prefix}:{secrets.token_hex(8)}" for _ in session_ids]
        replies = await self._claim_all(session_ids, tokens)
        gone: list[str] = []
        look_again: dict[str, int] = {}
        for session_id, token, reply in zip(session_ids, tokens, replies, strict=True):
            if reply is None:
                gone.append(session_id)
                continue
            first, second = int(reply[0]), int(reply[1])
            if first < 0:
                # Someone else runs it; look again when their lease would have run out.
                look_again[session_id] = now_ms + max(second, 0)
                continue
            look_again[session_id] = now_ms + self._lease_ms
            self._start(session_id, token, first, second)
        for session_id in gone:  # unless requested again since
            await self._unlist_script(
                keys=[self._keys.runs], args=[session_id, repr(scores[session_id])]
            )
        if look_again:
            await self._redis.zadd(self._keys.runs, look_again, xx=True)
        return len(due) == SCAN_BATCH

    async def _list_again(self, now_ms: int) -> None:
        """Put back in the index the runs let go of earlier and, now and then, our own runs.

        Our own entries are added only where missing (the index lost them), due when our
        lease would have lapsed, so that another producer takes a run over if we die.
        """
        for session_id, token in list(self._adrift.items()):
            await self._let_go(session_id, token)
        if now_ms < self._own_runs_listed_at_ms + self._lease_ms // 2:
            return
        async with self._listing:
            listed = {s: now_ms + self._lease_ms for s in self._runs if s not in self._unlisted}
            if listed:
                await self._redis.zadd(self._keys.runs, listed, nx=True)
            self._own_runs_listed_at_ms = now_ms

    async def _unlist(self, session_id: str) -> None:
        """Drop a run of ours that needs no producer from the index (if this fails, a scan does)."""
        async with self._listing:
            self._unlisted.add(session_id)
            with contextlib.suppress(RedisError):
                await self._unlist_script(keys=[self._keys.runs], args=[session_id, ""])

    async def _claim_all(self, session_ids: list[str], tokens: list[str]) -> list[Any]:
        k = self._keys
        calls: list[tuple[list[str], list[str | int]]] = [
            ([k.run(session_id), k.lease(session_id)], [token, self._lease_ms])
            for session_id, token in zip(session_ids, tokens, strict=True)
        ]
        if pipelines_queue(self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                await self._claim(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())
        # On a cluster the runs live on different shards: claim them side by side, queued.
        return list(
            await asyncio.gather(*(self._claim(keys=keys, args=args) for keys, args in calls))
        )

    def _start(self, session_id: str, token: str, first: int, count: int) -> None:
        self._adrift.pop(session_id, None)  # ours again
        if first > 0:
            log.info("taking over run of session %s at event %d/%d", session_id, first + 1, count)
        self._tokens[session_id] = token
        self._runs[session_id] = asyncio.create_task(
            self._execute(session_id, token, first, count), name=f"run-{session_id}"
        )

    async def _execute(self, session_id: str, token: str, first: int, count: int) -> None:
        """Execute the run; if it stops unfinished, make it findable for the next producer."""
        try:
            if not await self._execute_logging_errors(session_id, token, first, count):
                await self._let_go_unfinished(session_id, token)
        finally:
            self._unlisted.discard(session_id)
            self._runs.pop(session_id, None)
            self._tokens.pop(session_id, None)

    async def _execute_logging_errors(
        self, session_id: str, token: str, first: int, count: int
    ) -> bool:
        """Execute the run; False when it stopped unfinished."""
        try:
            return await self._execute_steps(session_id, token, first, count)
        except RedisError as error:
            # The run's state is in Redis: a producer (maybe this one) resumes it later.
            log.warning("run of session %s interrupted: %s", session_id, error)
        except Exception:
            # A bug: say why it stopped; the run is handed on as if its lease had lapsed.
            log.exception("run of session %s failed", session_id)
        return False

    async def _execute_steps(self, session_id: str, token: str, first: int, count: int) -> bool:
        """Publish the run's events from `first`; False when it lost the run midway."""
        unheard_since: float | None = None  # the first of the latest publishes nobody heard
        for seq in range(first, count):
            event, data = demo_event(session_id, seq, count, self._clock())
            fence = Fence(token=token, seq=seq, lease_ms=self._lease_ms)
            published = await self._publish_until_redis_answers(session_id, event, data, fence)
            if published.outcome is PublishOutcome.SESSION_DELETED:
                log.info("run of session %s ended: the session was deleted", session_id)
                return True
            if published.outcome is PublishOutcome.LEASE_LOST:
                log.warning("run of session %s lost its lease at event %d", session_id, seq)
                return False
            self.events_published += 1
            if seq == count - 1:
                break
            if published.outcome is PublishOutcome.PUBLISHED:
                unheard_since = None if published.heard else unheard_since or time.monotonic()
            if self._idle(unheard_since):
                return await self._park_run(session_id, token, seq + 1, count)
            await self._wait_holding_lease(session_id, token)
        log.info("run of session %s finished", session_id)
        await self._unlist(session_id)
        return True

    def _idle(self, unheard_since: float | None) -> bool:
        """Nobody has heard the run's publishes for `run_idle_timeout_s` (0: never idle).

        Counted over publishes that went out, so a Redis outage is not taken for silence.
        """
        return (
            unheard_since is not None
            and self._idle_s > 0
            and time.monotonic() - unheard_since >= self._idle_s
        )

    async def _park_run(self, session_id: str, token: str, next_seq: int, count: int) -> bool:
        """Stop a run nobody listens to; a resume of the session makes it go on from here.

        False when it could not be parked (the lease was lost, Redis failed): the run is
        still active, to be taken over, and parked there if nobody listens still.
        """
        k = self._keys
        try:
            if not await self._park(keys=[k.run(session_id), k.lease(session_id)], args=[token]):
                return False
        except RedisError as error:
            log.warning("could not park the run of session %s: %s", session_id, error)
            return False
        log.info(
            "run of session %s parked at event %d/%d: no listener for %gs",
            session_id,
            next_seq + 1,
            count,
            self._idle_s,
        )
        await self._unlist(session_id)
        return True

    async def _publish_until_redis_answers(
        self, session_id: str, event: str, data: str, fence: Fence
    ) -> Published:
        """Publish one event, pausing while Redis is away; the fence makes retries safe."""
        delay_s = RETRY_BASE_S
        while True:
            try:
                published = await self._publisher.publish(session_id, event, data, fence)
            except RedisError as error:
                log.warning(
                    "run of session %s paused at event %d: %s; retrying in %.1fs",
                    session_id,
                    fence.seq,
                    error,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(RETRY_CAP_S, delay_s * 2)
                continue
            return published

    async def _wait_holding_lease(self, session_id: str, token: str) -> None:
        """Sleep one interval, renewing the lease if the interval is long compared to it."""
        remaining_s = self._interval_s
        renew_every_s = self._lease_ms / 3000
        while remaining_s > renew_every_s:
            await asyncio.sleep(renew_every_s)
            remaining_s -= renew_every_s
            try:
                await self._renew(keys=[self._keys.lease(session_id)], args=[token, self._lease_ms])
            except RedisError as error:
                log.info("could not renew the lease of session %s: %s", session_id, error)
        await asyncio.sleep(remaining_s)
