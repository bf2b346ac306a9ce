"""Results out: a table per scenario, service-to-baseline ratios, JSON, and the latency plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .stack import NAIVE, SERVICE

Result = dict[str, Any]

COLUMNS = {
    "capacity": [
        "target", "connections", "held", "connect_failures", "connect_retries",
        "worker_kib_per_stream",
        "worker_rss_after_mib", "worker_redis_connections", "redis_kib_per_stream",
        "connects_per_s",
    ],
    "fanout": [
        "target", "connections", "offered_rate", "deliveries_per_s", "p50_ms", "p99_ms",
        "max_ms", "lost", "reordered", "worker_cpu_us_per_delivery", "worker_capacity_per_s",
        "connect_failures",
    ],
    "broadcast": [
        "target", "connections", "offered_rate", "deliveries_per_s", "p50_ms", "p99_ms",
        "last_receiver_p99_ms", "lost", "reordered", "worker_cpu_us_per_delivery",
        "worker_capacity_per_s", "connect_failures",
    ],
    "seed": [
        "target", "sessions", "concurrency", "complete", "out_of_order", "sessions_per_s",
        "session_p50_ms", "session_p99_ms", "worker_cpu_ms_per_session",
    ],
}  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_tables(results: list[Result], use_rich: bool) -> None:
    """One table per scenario, in the order the scenarios ran."""
    for scenario, columns in COLUMNS.items():
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        cells = [
            [_cell(r.get(c, "") if c != "offered_rate" else r[c] or "max") for c in columns]
            for r in rows
        ]
        _print_table(scenario, columns, cells, use_rich)
        for r in rows:
            if r.get("failure"):
                print(
                    f"  {r['target']} C={r.get('connections', r.get('sessions'))}: "
                    f"first failure: {r['failure']}"
                )


def _print_table(title: str, columns: list[str], rows: list[list[str]], use_rich: bool) -> None:
    if use_rich:
        from rich.console import Console  # noqa: PLC0415 - optional dependency
        from rich.table import Table  # noqa: PLC0415

        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="left" if column == "target" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


# The latency bound a paced step must keep to count as sustained (the p99 target at 1,000
# events/s is the same 10 ms).
SLO_P99_MS = 10.0


def sustained_rate(results: list[Result], scenario: str, target: str) -> float:
    """Highest paced offered rate `target` delivered in full with p99 under the bound.

    Unpaced steps measure throughput with queues as long as the publisher makes them; this
    is the load a user can put on one worker and still see events within the bound.
    """
    best = 0.0
    for r in results:
        if r["scenario"] != scenario or r["target"] != target or not r["offered_rate"]:
            continue
        kept_up = r["deliveries_per_s"] >= 0.98 * r["offered_rate"] * _fanout_of(r)
        if kept_up and 0 <= r["p99_ms"] < SLO_P99_MS and not r["lost"]:
            best = max(best, float(r["deliveries_per_s"]))
    return best


def _fanout_of(result: Result) -> int:
    """Deliveries per published event: the streams on each session."""
    return max(1, result["connections"] // max(1, result["sessions"]))


def ratios(results: list[Result]) -> dict[str, float]:
    """Service-to-baseline ratios of matching steps measured in this run."""
    out: dict[str, float] = {}

    def pairs(scenario: str, key: str) -> list[tuple[Result, Result]]:
        rows = [r for r in results if r["scenario"] == scenario]
        mine = {r[key]: r for r in rows if r["target"] == SERVICE}
        theirs = {r[key]: r for r in rows if r["target"] == NAIVE}
        return [(mine[k], theirs[k]) for k in mine if k in theirs]

    for ours, naive in pairs("capacity", "connections"):
        if naive["held"] and ours["worker_kib_per_stream"] > 0:
            out[f"capacity C={ours['connections']}: naive/service KiB per stream"] = round(
                naive["worker_kib_per_stream"] / ours["worker_kib_per_stream"], 2
            )
    for scenario in ("fanout", "broadcast"):
        for ours, naive in pairs(scenario, "offered_rate"):
            out.update(
                _delivery_ratios(f"{scenario} rate={ours['offered_rate'] or 'max'}", ours, naive)
            )
    for scenario in ("fanout", "broadcast"):
        sustained = {
            target: sustained_rate(results, scenario, target) for target in (SERVICE, NAIVE)
        }
        if sustained[SERVICE] and sustained[NAIVE]:
            out[f"{scenario}: service/naive events/s sustained at p99 < {SLO_P99_MS:g} ms"] = (
                round(sustained[SERVICE] / sustained[NAIVE], 2)
            )
    for ours, naive in pairs("seed", "sessions"):
        if naive["sessions_per_s"]:
            out["seed: service/naive sessions/s"] = round(
                ours["sessions_per_s"] / naive["sessions_per_s"], 2
            )
    return out


def _delivery_ratios(step: str, ours: Result, naive: Result) -> dict[str, float]:
    out: dict[str, float] = {}
    if naive["deliveries_per_s"]:
        out[f"{step}: service/naive deliveries/s"] = round(
            ours["deliveries_per_s"] / naive["deliveries_per_s"], 2
        )
    if ours["worker_cpu_us_per_delivery"]:
        out[f"{step}: naive/service CPU per delivery"] = round(
            naive["worker_cpu_us_per_delivery"] / ours["worker_cpu_us_per_delivery"], 2
        )
    # Deliveries per worker CPU second: what each design could deliver on a core of its own.
    if naive.get("worker_capacity_per_s"):
        out[f"{step}: service/naive worker capacity"] = round(
            ours["worker_capacity_per_s"] / naive["worker_capacity_per_s"], 2
        )
    return out


def print_ratios(values: dict[str, float]) -> None:
    if values:
        print("\nratios (same run):")
        for name, value in values.items():
            print(f"  {name}: {value}x")


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")


def plot(results: list[Result], path: Path) -> bool:
    """Latency (p50, p99) against delivered events/s, per target; False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed; no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    scenarios = [s for s in ("fanout", "broadcast") if any(r["scenario"] == s for r in results)]
    if not scenarios:
        return False
    figure, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5))
    for axis, scenario in zip(
        [axes] if len(scenarios) == 1 else list(axes), scenarios, strict=True
    ):
        for target, colour in ((SERVICE, "tab:blue"), (NAIVE, "tab:red")):
            rows = sorted(
                (r for r in results if r["scenario"] == scenario and r["target"] == target),
                key=lambda r: r["deliveries_per_s"],
            )
            if not rows:
                continue
            x = [r["deliveries_per_s"] for r in rows]
            axis.plot(x, [r["p99_ms"] for r in rows], "o-", color=colour, label=f"{target} p99")
            axis.plot(x, [r["p50_ms"] for r in rows], "s--", color=colour, alpha=0.6,
                      label=f"{target} p50")  # fmt: skip
        connections = next(r["connections"] for r in results if r["scenario"] == scenario)
        axis.set_title(f"{scenario}, {connections:,} streams, one worker")
        axis.set_xlabel("delivered events per second")
        axis.set_ylabel("publish → receive latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
