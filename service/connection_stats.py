"""Counts of a worker's client connections, kept where they happen and read by the metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ConnectionStats:
    """Open client connections and what was refused or timed out (see acceptor.py)."""

    # The cap on open client connections; None where no acceptor enforces one (tests).
    cap: int | None = None
    open: int = 0
    refused: int = 0
    accept_failures: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
