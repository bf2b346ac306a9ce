"""The open-file budget: client connections and streams a worker may hold for its limit."""

from __future__ import annotations

import pytest

from service.open_files import connection_budget
from service.settings import build_settings
from service.startup import StartupError


def test_streams_stay_below_the_connection_cap_when_max_connections_is_higher() -> None:
    settings = build_settings({"max_connections": 20000, "fd_reserve": 256})
    budget = connection_budget(20000, settings)
    assert budget.connections == 20000 - 256
    assert budget.streams == budget.connections - budget.connections // 10
    assert budget.applied(settings).max_connections == budget.streams
    note = budget.lowered_note()
    assert note is not None
    assert "max_connections 20000" in note
    assert f"at most {budget.streams} streams" in note


def test_max_connections_that_fits_is_kept_and_nothing_is_said() -> None:
    settings = build_settings({"max_connections": 5000, "fd_reserve": 256})
    budget = connection_budget(1 << 20, settings)
    assert budget.streams == 5000
    assert budget.connections == (1 << 20) - 256
    assert budget.applied(settings) is settings
    assert budget.lowered_note() is None


def test_a_limit_with_no_room_for_clients_stops_the_start_in_one_line() -> None:
    settings = build_settings({"fd_reserve": 256})
    with pytest.raises(StartupError, match=r"open-file limit \(260\) minus fd_reserve \(256\)"):
        connection_budget(260, settings)
