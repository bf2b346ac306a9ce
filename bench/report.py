"""Results out: a table per scenario, ratios to nchan and the naive design, JSON, a plot."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from .stack import CONTESTANTS, NAIVE, NCHAN_MEMORY, NCHAN_REDIS, SERVICE

Result = dict[str, Any]

COLUMNS = {
    "churn": [
        "target", "repeat", "clients", "cycles", "cycles_per_s", "cycle_p50_ms", "cycle_p99_ms",
        "failures", "missing", "worker_cpu_ms_per_cycle", "server_redis_cpu_ms_per_cycle",
        "publish_server_redis_cpu_ms_per_event", "server_core_share", "generator_core_share",
    ],
    "capacity": [
        "target", "repeat", "connections", "held", "connect_failures", "connect_retries",
        "worker_pss_kib_per_stream", "worker_kib_per_stream", "worker_pss_after_mib",
        "worker_redis_connections", "redis_kib_per_stream", "connects_per_s",
    ],
    "fanout": [
        "target", "repeat", "connections", "offered_rate", "deliveries_per_s", "p50_ms",
        "p99_ms", "max_ms", "lost", "reordered", "worker_cpu_us_per_delivery",
        "server_redis_cpu_ms_per_1000", "worker_capacity_per_s", "connect_failures",
    ],
    "broadcast": [
        "target", "repeat", "connections", "offered_rate", "deliveries_per_s", "p50_ms",
        "p99_ms", "last_receiver_p99_ms", "lost", "reordered", "worker_cpu_us_per_delivery",
        "server_redis_cpu_ms_per_1000", "worker_capacity_per_s", "connect_failures",
    ],
    "seed": [
        "target", "repeat", "sessions", "concurrency", "complete", "out_of_order",
        "sessions_per_s", "session_p50_ms", "session_p99_ms", "worker_cpu_ms_per_session",
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
    repeated = len({r.get("repeat", 0) for r in results}) > 1
    for scenario, all_columns in COLUMNS.items():
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        columns = [c for c in all_columns if repeated or c != "repeat"]
        cells = [
            [_cell(r.get(c, "") if c != "offered_rate" else r[c] or "max") for c in columns]
            for r in rows
        ]
        _print_table(scenario, columns, cells, use_rich)
        for r in rows:
            if r.get("failure"):
                step = _step_label(scenario, [r.get(k) for k in STEP_KEYS[scenario]])
                print(f"  {r['target']} {step}: first failure: {r['failure']}")


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
    return max(1, int(result["connections"]) // max(1, int(result["sessions"])))


# Per scenario: what identifies a step, and the figures compared between contestants.
STEP_KEYS = {
    "churn": ("clients",),
    "capacity": ("connections",),
    "fanout": ("connections", "offered_rate"),
    "broadcast": ("connections", "offered_rate"),
    "seed": ("sessions",),
}
COMPARED = {
    "churn": ("cycles_per_s", "worker_cpu_ms_per_cycle", "server_redis_cpu_ms_per_cycle"),
    "capacity": ("worker_pss_kib_per_stream",),
    "fanout": ("deliveries_per_s", "worker_cpu_us_per_delivery", "server_redis_cpu_ms_per_1000"),
    "broadcast": (
        "deliveries_per_s", "worker_cpu_us_per_delivery", "server_redis_cpu_ms_per_1000",
    ),
    "seed": ("sessions_per_s", "worker_cpu_ms_per_session"),
}  # fmt: skip
REFERENCES = (NCHAN_MEMORY, NCHAN_REDIS, NAIVE)


def median_steps(results: list[Result]) -> dict[tuple[Any, ...], Result]:
    """Each (scenario, step, contestant) once: compared figures are medians over repeats."""
    grouped: dict[tuple[Any, ...], list[Result]] = {}
    for r in results:
        key = (r["scenario"], *(r.get(k) for k in STEP_KEYS[r["scenario"]]), r["target"])
        grouped.setdefault(key, []).append(r)
    out = {}
    for key, rows in grouped.items():
        merged = dict(rows[0])
        for name in COMPARED[rows[0]["scenario"]]:
            values = [float(r[name]) for r in rows if name in r]
            if values:
                merged[name] = statistics.median(values)
        out[key] = merged
    return out


def ratios(results: list[Result]) -> dict[str, float]:
    """Every contestant's figures divided by nchan's and the naive design's, step by step.

    Names read `<scenario> <step>: <figure>: <contestant>/<reference>`.
    """
    steps = median_steps(results)
    out: dict[str, float] = {}
    for (scenario, *step, target), row in steps.items():
        label = _step_label(scenario, step)
        for reference in REFERENCES:
            theirs = steps.get((scenario, *step, reference))
            if reference == target or theirs is None:
                continue
            for name in COMPARED[scenario]:
                if theirs.get(name) and name in row:
                    out[f"{label}: {name}: {target}/{reference}"] = round(
                        row[name] / theirs[name], 2
                    )
    return out


def _step_label(scenario: str, step: list[Any]) -> str:
    parts = [
        f"{key}={'max' if key == 'offered_rate' and not value else _cell(value)}"
        for key, value in zip(STEP_KEYS[scenario], step, strict=True)
    ]
    return f"{scenario} {' '.join(parts)}"


def sustained_ratios(results: list[Result]) -> dict[str, float]:
    """Events/s each contestant sustained at p99 under the bound, over nchan's and naive's."""
    out: dict[str, float] = {}
    for scenario in ("fanout", "broadcast"):
        sustained = {t: sustained_rate(results, scenario, t) for t in CONTESTANTS}
        for target, value in sustained.items():
            for reference in REFERENCES:
                if reference != target and value and sustained[reference]:
                    out[
                        f"{scenario}: events/s sustained at p99 < {SLO_P99_MS:g} ms: "
                        f"{target}/{reference}"
                    ] = round(value / sustained[reference], 2)
    return out


def print_ratios(values: dict[str, float], target: str = SERVICE) -> None:
    """The ratios of one contestant (all of them are in the JSON)."""
    shown = {name: value for name, value in values.items() if f": {target}/" in name}
    if shown:
        print(f"\n{target}'s ratios (same run; all contestants' in --json):")
        for name, value in shown.items():
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
        colours = ("tab:blue", "tab:green", "tab:olive", "tab:red")
        for target, colour in zip(CONTESTANTS, colours, strict=True):
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
