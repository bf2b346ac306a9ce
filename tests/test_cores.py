"""Usable cores: the CPU affinity, capped by a cgroup CPU quota read from its files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cores import cgroup_quota_cores, quota_from_cpu_max, usable_cores


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 cores of time: two workers, each busy part of the time
        ("50000 100000", 1),
        ("0 100000", None),
        ("garbage", None),
        ("", None),
    ],
)
def test_cpu_max_in_whole_cores(text: str, cores: int | None) -> None:
    assert quota_from_cpu_max(text) == cores


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "system.slice").mkdir()
    (tmp_path / "system.slice" / "cpu.max").write_text("300000 100000\n")
    leaf = tmp_path / "system.slice" / "app.service"
    leaf.mkdir()
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota_cores(tmp_path, "/system.slice/app.service") == 3
    assert cgroup_quota_cores(tmp_path, "/") is None
    assert cgroup_quota_cores(tmp_path, None) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota_cores(tmp_path, None) == 4
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota_cores(tmp_path, None) is None


def test_usable_cores_never_exceed_the_affinity() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
