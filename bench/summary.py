"""The headline figures, one per contestant, each as a ratio to nchan and to the naive design.

Each figure is read from one repetition's results at a time; with `--repeat N` a
contestant's figure is the median of its N values, and ratios are taken between medians
(every repetition ran every contestant, interleaved, so neighbours in time are compared).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .stack import CONTESTANTS, NAIVE, NCHAN_MEMORY, NCHAN_REDIS

Result = dict[str, Any]
REFERENCES = (NCHAN_MEMORY, NCHAN_REDIS, NAIVE)
PACED_RATE = 4000.0  # the 1:1 step whose CPU the table shows, when it was run


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of the table: how to read it from one contestant's rows of one repetition."""

    key: str
    label: str
    scenario: str
    higher_is_better: bool
    read: Callable[[list[Result]], float | None]


def _largest(field: str, by: str) -> Callable[[list[Result]], float | None]:
    """`field` of the row with the largest `by` (e.g. the most idle streams held)."""

    def read(rows: list[Result]) -> float | None:
        return float(max(rows, key=lambda r: r[by])[field]) if rows else None

    return read


def clean(row: Result) -> bool:
    """Nothing missing, nothing out of order, nothing failed, nothing left undelivered."""
    return (
        not row.get("lost") and not row.get("reordered") and not row.get("failure")
        and not row.get("drain_timeout") and not row.get("connect_failures")
    )  # fmt: skip


def _most_clean(rows: list[Result]) -> float | None:
    """The most deliveries/s of any step (paced or flat out) in which nothing went missing."""
    values = [float(r["deliveries_per_s"]) for r in rows if clean(r)]
    return max(values) if values else (0.0 if rows else None)


def _paced_cpu(rows: list[Result]) -> float | None:
    """Server + Redis CPU per 1,000 events of the paced step nearest PACED_RATE."""
    paced = [r for r in rows if r["offered_rate"]]
    if not paced:
        return None
    row = min(paced, key=lambda r: abs(r["offered_rate"] - PACED_RATE))
    return float(row["server_redis_cpu_ms_per_1000"])


def _churn(field: str) -> Callable[[list[Result]], float | None]:
    def read(rows: list[Result]) -> float | None:
        return float(rows[0][field]) if rows and rows[0]["cycles"] else None

    return read


def _churn_clean(row: Result) -> bool:
    return not (row.get("failures") or row.get("missing") or row.get("bad_events"))


FIGURES = (
    Figure("churn_cycles_per_s", "connect → first event → close, cycles/s", "churn", True,
           _churn("cycles_per_s")),
    Figure("churn_worker_cpu_ms", "worker CPU per such cycle, ms", "churn", False,
           _churn("worker_cpu_ms_per_cycle")),
    Figure("churn_server_redis_cpu_ms", "worker + Redis CPU per cycle, ms", "churn", False,
           _churn("server_redis_cpu_ms_per_cycle")),
    Figure("churn_publish_cpu_ms", "… of which the publish path alone, ms", "churn", False,
           _churn("publish_server_redis_cpu_ms_per_event")),
    Figure("idle_stream_pss_kib", "memory per idle stream (PSS), KiB", "capacity", False,
           _largest("worker_pss_kib_per_stream", "connections")),
    Figure("fanout_paced_cpu_ms", "1:1 delivery, worker + Redis CPU per 1,000 events (paced), ms",
           "fanout", False, _paced_cpu),
    Figure("fanout_clean_max", "1:1 delivery, most events/s with nothing missing", "fanout",
           True, _most_clean),
    Figure("broadcast_clean_max", "broadcast, most deliveries/s with nothing missing",
           "broadcast", True, _most_clean),
)  # fmt: skip


def per_repeat(results: list[Result], figure: Figure, target: str) -> list[float]:
    """The figure's value in each repetition that measured it."""
    values = []
    for repeat in sorted({r.get("repeat", 0) for r in results}):
        value = figure.read(_rows(results, figure, target, repeat))
        if value is not None:
            values.append(value)
    return values


def _rows(results: list[Result], figure: Figure, target: str, repeat: int | None) -> list[Result]:
    return [
        r for r in results
        if r["scenario"] == figure.scenario and r["target"] == target
        and (repeat is None or r.get("repeat", 0) == repeat)
    ]  # fmt: skip


def _troubled(results: list[Result], figure: Figure, target: str) -> bool:
    """Whether any of the figure's steps saw a failure or something missing."""
    rows = _rows(results, figure, target, None)
    check = _churn_clean if figure.scenario == "churn" else clean
    return any(not check(r) for r in rows)


def ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 2) if reference else None


def summarise(results: list[Result]) -> dict[str, Any]:
    """Per figure: each contestant's median, its values per repetition, and its ratios."""
    targets = [t for t in CONTESTANTS if any(r["target"] == t for r in results)]
    out: dict[str, Any] = {}
    for figure in FIGURES:
        runs = {t: per_repeat(results, figure, t) for t in targets}
        medians = {t: statistics.median(v) for t, v in runs.items() if v}
        if not medians:
            continue
        ratios = {
            t: {
                ref: ratio(value, medians[ref]) for ref in REFERENCES if ref in medians and ref != t
            }
            for t, value in medians.items()
        }
        out[figure.key] = {
            "label": _label(figure, results),
            "higher_is_better": figure.higher_is_better,
            "median": medians,
            "runs": {t: v for t, v in runs.items() if v},
            "ratio_to": ratios,
            # Contestants with a failure or something missing in a step behind the figure.
            "troubled": [t for t in medians if _troubled(results, figure, t)],
        }
    return out


def _label(figure: Figure, results: list[Result]) -> str:
    if figure.key == "fanout_paced_cpu_ms":
        rates = sorted({r["offered_rate"] for r in results if r["scenario"] == "fanout"} - {0})
        if rates:
            rate = min(rates, key=lambda x: abs(x - PACED_RATE))
            return f"1:1 delivery, worker + Redis CPU per 1,000 events at {rate:,.0f}/s, ms"
    if figure.key == "idle_stream_pss_kib":
        levels = [r["connections"] for r in results if r["scenario"] == "capacity"]
        if levels:
            return f"memory per idle stream (PSS, {max(levels):,} streams), KiB"
    return figure.label


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(entry: dict[str, Any], target: str) -> str:
    if target not in entry["median"]:
        return "-"
    text = _number(entry["median"][target])
    runs = entry["runs"][target]
    if len(runs) > 1:
        text += f" ({_number(min(runs))}–{_number(max(runs))})"
    return text + (" ⚠" if target in entry["troubled"] else "")


def _ratio_cell(entry: dict[str, Any], target: str, references: Iterable[str]) -> str:
    found = entry["ratio_to"].get(target, {})
    parts = [f"{found[ref]:g}× {ref}" for ref in references if found.get(ref) is not None]
    return ", ".join(parts) or "-"


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as a Markdown table: medians (range over repetitions), then ratios."""
    targets = [t for t in CONTESTANTS if any(t in e["median"] for e in summary.values())]
    lines = [
        "| figure | " + " | ".join(targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for entry in summary.values():
        lines.append(f"| {entry['label']} | " + " | ".join(_cell(entry, t) for t in targets) + " |")
    references = [r for r in REFERENCES if r in targets]
    if references and len(targets) > 1:
        lines += [
            "",
            "| ratio (median ÷ median) | " + " | ".join(targets) + " |",
            "|---|" + "---:|" * len(targets),
        ]
        for entry in summary.values():
            lines.append(
                f"| {entry['label']} | "
                + " | ".join(_ratio_cell(entry, t, references) for t in targets)
                + " |"
            )
    if any(entry["troubled"] for entry in summary.values()):
        lines += ["", "⚠ a step behind this figure had a failure or something missing"]
    return lines
