"""Accounting for a chaos test: what each client should have got, what it got, the report row.

A session whose data Redis kept must reach every client complete, once, in order, ending
on `finish`. A session whose data Redis lost must tell each client (`gap`) and end (`finish`
or a 204). Each test's row goes to `REPORT`, which the run prints at its end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from service.envelope import parse_event_id
from service.keys import Keys

from event_source import EventSourceClient, Received
from redis_state import log_entries

KEYS = Keys()


@dataclass
class Truth:
    """What one session should have delivered: its events' keys in order, or only a count."""

    keys: list[str] | None
    count: int
    by: str  # "id": an event is known by its id; "data": by its data (one publish, one event)
    data_lost: bool = False
    logged_twice: int = 0  # events the log holds more than once
    unlogged: int = 0  # accepted events the log does not hold


@dataclass
class Tally:
    """Counts over a set of clients."""

    clients: int = 0
    expected: int = 0
    received: int = 0
    missing: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    gap_clients: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, client: EventSourceClient, truth: Truth) -> None:
        events = client.content()
        keys = [e.id if truth.by == "id" else e.data for e in events]
        unique = set(keys)
        self.clients += 1
        self.expected += truth.count
        self.received += len(unique)
        self.duplicated += len(keys) - len(unique)
        shortfall = max(0, truth.count - len(unique))
        if truth.keys is not None:
            shortfall = max(shortfall, len(set(truth.keys) - unique) + truth.unlogged)
        self.missing += shortfall
        self.duplicated += truth.logged_twice
        self.out_of_order += _out_of_order(events)
        self.gap_clients += client.gaps > 0
        self.ended[client.ended or "silenced"] += 1
        self._check(client, truth, keys)

    def _check(self, client: EventSourceClient, truth: Truth, keys: list[str]) -> None:
        issues = []
        repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
        if repeated:
            issues.append(f"delivered twice: {[k[:12] for k in repeated[:5]]}")
        if truth.data_lost:
            issues += _told_issues(client)
        else:
            issues += _completeness_issues(client, truth, keys)
        if issues:
            self.problems.append(f"{client.session_id}: {'; '.join(issues)}")


def _told_issues(client: EventSourceClient) -> list[str]:
    """Where Redis lost the session's data: a gap event, then an end."""
    issues = []
    if client.gaps == 0:
        issues.append("lost data without a gap event")
    if client.ended not in ("finish", "204"):
        issues.append(f"after data loss ended as {client.ended or 'silenced'}")
    return issues


def _completeness_issues(client: EventSourceClient, truth: Truth, keys: list[str]) -> list[str]:
    """Where Redis kept the session's data: everything, once, in order, then `finish`."""
    issues = []
    if truth.unlogged:
        issues.append(f"{truth.unlogged} accepted events are not in the log")
    if truth.logged_twice:
        issues.append(f"{truth.logged_twice} events logged twice")
    if len(set(keys)) < truth.count:
        issues.append(f"{len(set(keys))} of {truth.count} events")
    if truth.keys is not None and keys != truth.keys:
        missing = [k[:12] for k in truth.keys if k not in set(keys)]
        issues.append(f"not the log ({len(truth.keys)}): missing {missing[:3]}")
    if client.gaps:
        issues.append("gap signalled though Redis kept the data")
    if client.ended != "finish":
        issues.append(f"ended as {client.ended or 'silenced'}")
    return issues


def _out_of_order(events: list[Received]) -> int:
    """Events whose id is lower than one delivered before them (repeats are not counted)."""
    newest = (-1, -1)
    late = 0
    seen: set[str] = set()
    for event in events:
        if event.id in seen:
            continue
        seen.add(event.id)
        position = parse_event_id(event.id)
        if position < newest:
            late += 1
        newest = max(newest, position)
    return late


async def log_truth(
    client: redis.Redis | RedisCluster, session_id: str, after: str = "0-0"
) -> Truth:
    """A session whose log Redis kept: the log (past `after`) is what it should deliver."""
    ids = [entry_id.decode() for entry_id, _ in await log_entries(client, session_id, f"({after}")]
    return Truth(keys=ids, count=len(ids), by="id")


def recovery_s(clients: Iterable[EventSourceClient], injected: float) -> float | None:
    """Fault injected -> delivery resumed for every client still running then."""
    waits = []
    for client in clients:
        if client.ended_at is not None and client.ended_at <= injected:
            continue
        resumed = client.first_after(injected)
        if resumed is None:
            return None
        waits.append(resumed - injected)
    return max(waits, default=0.0)


@dataclass
class FaultRow:
    """One line of the chaos report."""

    fault: str
    tally: Tally
    recovery_s: float | None
    note: str = ""

    HEADER = (
        f"{'fault':<54} {'clients':>7} {'expected':>8} {'received':>8} {'missing':>7} "
        f"{'dup':>4} {'order':>5} {'gap':>4} {'recovery':>8}  ended / note"
    )

    def line(self) -> str:
        t = self.tally
        recovery = "never" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        ended = ", ".join(f"{how}:{n}" for how, n in sorted(t.ended.items()))
        return (
            f"{self.fault:<54} {t.clients:>7} {t.expected:>8} {t.received:>8} "
            f"{t.missing:>7} {t.duplicated:>4} {t.out_of_order:>5} {t.gap_clients:>4} "
            f"{recovery:>8}  {ended}{'; ' + self.note if self.note else ''}"
        )


REPORT: list[FaultRow] = []


def report(row: FaultRow) -> FaultRow:
    """Record the row for the end-of-run table and print it with the test's output."""
    REPORT.append(row)
    print(FaultRow.HEADER)
    print(row.line())
    return row


def report_table() -> list[str]:
    return [FaultRow.HEADER, *(row.line() for row in REPORT)] if REPORT else []


def verdict(row: FaultRow, problems: list[str], logs: Callable[[], str]) -> None:
    """Fail the test with every broken rule named, and the processes' logs printed."""
    problems = [*row.tally.problems, *problems]
    if row.tally.duplicated:
        problems.insert(0, f"{row.tally.duplicated} duplicated events")
    if row.tally.out_of_order:
        problems.insert(0, f"{row.tally.out_of_order} events out of order")
    if problems:
        print(logs())
        counted = Counter(problems)  # clients of one session report the same problem
        shown = "\n  ".join(
            problem if n == 1 else f"{problem} (x{n})" for problem, n in list(counted.items())[:25]
        )
        raise AssertionError(f"{row.fault}: {len(problems)} broken rules\n  {shown}")
