"""A server's processes as one: their CPU, their proportional memory, and core pinning.

A server may be more than one process (nginx runs a master and its workers; a supervised
worker pool runs a supervisor and children), so every figure sums over the process tree
under the pid the bench started. Everything is read from /proc.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

_PROC = Path("/proc")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's children, so none is missed)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in (_PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    """`pid` and every process below it that is alive right now."""
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        if not (_PROC / str(current)).exists():
            continue
        pids.append(current)
        pending += children(current)
    return pids


def cpu_s(pid: int) -> float:
    """User plus system CPU time `pid` has used, in seconds (0 if it is gone)."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU time used so far by `pid` and its live descendants, in seconds."""
    return sum(cpu_s(p) for p in tree(pid))


def parse_rollup(text: str) -> dict[str, int]:
    """The `Name:  value kB` lines of /proc/<pid>/smaps_rollup, in KiB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[name.strip()] = int(parts[0])
    return values


def pss_kib(pid: int) -> int:
    """Proportional set size of `pid` in KiB: shared pages count once across sharers."""
    try:
        return parse_rollup((_PROC / str(pid) / "smaps_rollup").read_text()).get("Pss", 0)
    except OSError:
        return 0


def tree_pss_kib(pid: int) -> int:
    """PSS of `pid` and its live descendants, in KiB (nginx: master plus workers)."""
    return sum(pss_kib(p) for p in tree(pid))


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` (VmRSS), in KiB."""
    with contextlib.suppress(OSError):
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in tree(pid))


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores the servers (and their Redis) get, and which the load generator gets.

    Empty core sets mean nothing is pinned; `reason` then says why.
    """

    server_cores: frozenset[int] = field(default_factory=frozenset)
    generator_cores: frozenset[int] = field(default_factory=frozenset)
    reason: str = ""

    @property
    def active(self) -> bool:
        return bool(self.server_cores)

    def describe(self) -> str:
        if not self.active:
            return f"not pinned: {self.reason}"
        return (
            f"server and its Redis on core {_cores(self.server_cores)}, load generator and "
            f"publisher on core {_cores(self.generator_cores)}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "pinned": self.active,
            "server_cores": sorted(self.server_cores),
            "generator_cores": sorted(self.generator_cores),
            "reason": self.reason,
            "description": self.describe(),
        }


def _cores(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def plan_pinning(wanted: bool, server_cores: int = 1) -> Pinning:
    """Split the cores this process may use: `server_cores` for servers, the rest for load.

    Pinning needs at least one core more than the servers get, and the right to change
    affinity; when either is missing the run goes on unpinned and says why.
    """
    if not wanted:
        return Pinning(reason="--no-pin")
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError) as error:
        return Pinning(reason=f"cannot read CPU affinity ({error})")
    if len(usable) <= server_cores:
        return Pinning(
            reason=f"{len(usable)} usable core(s): need more than {server_cores} to separate "
            "the server from the load generator"
        )
    pinning = Pinning(frozenset(usable[:server_cores]), frozenset(usable[server_cores:]))
    try:
        os.sched_setaffinity(0, pinning.generator_cores)
    except OSError as error:
        return Pinning(reason=f"sched_setaffinity refused ({error})")
    return pinning


def pin_tree(pid: int, cores: frozenset[int]) -> int:
    """Pin every thread of `pid` and of its descendants to `cores`; how many were pinned.

    Threads are pinned one by one (affinity is per thread); processes forked later inherit
    it from their parent.
    """
    pinned = 0
    for process in tree(pid):
        with contextlib.suppress(OSError):
            for task in (_PROC / str(process) / "task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cores)
                    pinned += 1
    return pinned


def affinity(pid: int) -> frozenset[int]:
    """The cores `pid`'s main thread may run on."""
    return frozenset(os.sched_getaffinity(pid))
