"""The benchmark tool runs every scenario end to end at a tiny scale, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.redis

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_every_scenario_runs_against_both_targets_without_loss(
    redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--redis-url", redis_url,
         "--connections", "20", "--rates", "400,max", "--duration", "0.2",
         "--max-events", "100", "--hold", "0", "--concurrency", "20",
         "--demo-interval-ms", "5", "--progress", "off", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    seen = {(r["scenario"], r["target"]) for r in results}
    assert seen == {
        (scenario, target)
        for scenario in ("capacity", "fanout", "broadcast", "seed")
        for target in ("sse-fanout", "naive")
    }
    for result in results:
        assert result.get("connect_failures", 0) == 0, result
        assert "failure" not in result, result
        if result["scenario"] == "capacity":
            assert result["held"] == 20, result
        elif result["scenario"] == "seed":
            assert (result["complete"], result["out_of_order"]) == (20, 0), result
        else:
            assert (result["lost"], result["reordered"]) == (0, 0), result
            # Each stream's `finish` ends it after the measured window.
            measured = result["connections"] * (result["events_per_session"] - 1)
            assert result["deliveries"] == measured, result
    capacity = {r["target"]: r for r in results if r["scenario"] == "capacity"}
    # One Redis connection per stream is what the baseline is there to show.
    assert capacity["naive"]["worker_redis_connections"] >= 20
    assert capacity["sse-fanout"]["worker_redis_connections"] < 20
    assert "capacity" in done.stdout
