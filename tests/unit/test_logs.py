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
