"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

`os.cpu_count()` counts the host's cores; a container limited with `--cpus 2` on a 64-core
host may still run on all 64 (the quota only throttles it), so a worker per counted core
would be 32 processes fighting over two cores' worth of time. The quota is read from the
cgroup v2 `cpu.max` files of this process's cgroup and its ancestors (or cgroup v1's
`cpu.cfs_quota_us`), a few small reads at start-up.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the CPU controller under one of these names.
_V1_CPU_DIRS = ("cpu,cpuacct", "cpu")


def usable_cores() -> int:
    """Cores this process may run on, no more than its cgroup's CPU quota allows (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota_cores(CGROUP_ROOT, _own_cgroup())
    return max(1, min(cores, quota) if quota is not None else cores)


def quota_from_cpu_max(text: str) -> int | None:
    """Whole cores a cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>") allows.

    A fractional quota rounds up: 1.5 cores of time keep two processes busy part time
    better than one fully. None: no quota.
    """
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota_us, period_us = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def cgroup_quota_cores(root: Path, cgroup: str | None) -> int | None:
    """The tightest CPU quota, in whole cores, of `cgroup` and its ancestors under `root`."""
    found: list[int] = []
    if cgroup is not None:
        path = root / cgroup.strip("/")
        for directory in (path, *path.parents):
            if not directory.is_relative_to(root):
                break
            with contextlib.suppress(OSError):
                if (cores := quota_from_cpu_max((directory / "cpu.max").read_text())) is not None:
                    found.append(cores)
    for name in _V1_CPU_DIRS:
        with contextlib.suppress(OSError):
            quota = (root / name / "cpu.cfs_quota_us").read_text().strip()
            period = (root / name / "cpu.cfs_period_us").read_text().strip()
            if (cores := quota_from_cpu_max(f"{quota} {period}")) is not None:
                found.append(cores)
            break
    return min(found) if found else None


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path ("0::/path" in /proc/self/cgroup), if it has one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return None
