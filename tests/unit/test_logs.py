"""broker.logs.Throttle: the first line at once, then one summary per interval."""

from __future__ import annotations

import logging

import pytest

from broker import logs

LOGGER = logging.getLogger("tests.throttle")


def test_throttle_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(logs, "_now", lambda: now[0])
    throttle = logs.Throttle()
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        assert throttle.log(LOGGER, logging.WARNING, "down %s", "now")
        now[0] += 1
        assert not throttle.log(LOGGER, logging.WARNING, "down %s", "now")
        now[0] += logs.LOG_INTERVAL - 1.5
        assert not throttle.log(LOGGER, logging.WARNING, "down %s", "now")
        now[0] += 1
        assert throttle.log(LOGGER, logging.WARNING, "still down")
        now[0] += logs.LOG_INTERVAL
        assert throttle.log(LOGGER, logging.WARNING, "again")
        assert not throttle.log(LOGGER, logging.WARNING, "again")
        throttle.flush(LOGGER, "closing")
        throttle.flush(LOGGER, "nothing left")
    assert [r.getMessage() for r in caplog.records] == [
        "down now",
        "still down (2 more like it since the last report)",
        "again",
        "closing: 1 more like it since the last report",
    ]


def test_throttle_table_logs_each_key_once_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(logs, "_now", lambda: now[0])
    table = logs.ThrottleTable()
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for _ in range(20):  # a banned client hammering CONNECT
            table.log(("banned", "203.0.113.9"), LOGGER, logging.WARNING, "refused %s", "203.0.113.9")
        table.log(("banned", "203.0.113.10"), LOGGER, logging.WARNING, "refused %s", "203.0.113.10")
        table.log(("access", "203.0.113.9"), LOGGER, logging.WARNING, "denied %s", "203.0.113.9")
        now[0] += logs.LOG_INTERVAL
        table.log(("banned", "203.0.113.9"), LOGGER, logging.WARNING, "refused %s", "203.0.113.9")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 203.0.113.9",
        "refused 203.0.113.10",
        "denied 203.0.113.9",
        # The sweep forgets quiet keys, logging what they still held back; then the key starts anew.
        "refused 203.0.113.9: 19 more like it since the last report",
        "refused 203.0.113.9",
    ]
    assert len(table) == 1


def test_throttle_table_is_bounded_and_counts_what_it_could_not_track(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(logs, "_now", lambda: now[0])
    table = logs.ThrottleTable(max_keys=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for host in range(1000):  # an attacker cycling through addresses
            table.log(("banned", f"2001:db8::{host:x}"), LOGGER, logging.WARNING, "refused %d", host)
    assert len(table) == 3
    assert table.overflowed == 997
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused 1",
        "refused 2",
        "refused 3 (and others like it: too many addresses to tell apart)",
    ]
    caplog.clear()
    now[0] += logs.LOG_INTERVAL
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        table.log(("banned", "2001:db8::ffff"), LOGGER, logging.WARNING, "refused %s", "again")
    # The quiet keys are swept first, so the new one has room again.
    assert [r.getMessage() for r in caplog.records] == ["refused again"]
    assert len(table) == 1
