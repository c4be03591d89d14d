"""The broker's own log: where it goes and in which form (``log``), its level at run time, and
the lines that a client (or a failing backend) could otherwise repeat without end.

A :class:`Throttle` logs the first occurrence at once, then counts, and logs at most one line
every :data:`LOG_INTERVAL` with the count of what it held back. One per client (the channel's, the
session's) or per backend (an HTTP authenticator, a hosted plugin).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final

#: ``text``: what an operator reads in a terminal; ``%r`` in messages keeps client-chosen values on
#: one line.
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC, ms), ``level``, ``logger``, ``msg`` (and
    ``exc`` with a traceback). Control characters a client chose are escaped by JSON itself."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line. Never raises (a message that cannot be formatted is
        logged as logging itself would report it)."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, form: str = "text", file: str = "") -> None:
    """Send the broker's log to stderr or ``file`` (appended to, reopened when logrotate moves it)
    as ``form`` (``text`` or ``json``), at ``level``.

    Raises:
        OSError: ``file`` cannot be opened.
    """
    handler: logging.Handler = (
        logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        if file
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(handlers=[handler], force=True)
    set_level(level)


def set_level(level: str) -> None:
    """Change the level at run time (``ctl log set-level``); websockets' own chatter only at debug.

    Raises:
        ValueError: not debug, info, warning or error.
    """
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{level!r} is not one of debug, info, warning, error")
    value = getattr(logging, level.upper())
    logging.getLogger().setLevel(value)
    logging.getLogger("websockets").setLevel(logging.DEBUG if value <= logging.DEBUG else logging.WARNING)


def current_level() -> str:
    """The level in force (``debug``, ``info``...)."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


#: Seconds between two log lines about the same repeated condition.
LOG_INTERVAL: Final = 10.0

#: The clock (a module attribute, so that tests can move it).
_now = time.monotonic


class Throttle:
    """Logs once, then at most every :data:`LOG_INTERVAL` with a count (slotted: one per client)."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last: float | None = None
        self._suppressed = 0

    def log(self, logger: logging.Logger, level: int, message: str, *args: Any) -> bool:
        """Log ``message % args`` on ``logger``, or count it; whether it was logged. Never raises."""
        now = _now()
        if self._last is not None and now - self._last < LOG_INTERVAL:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more like it since the last report)"
            args = (*args, self._suppressed)
        self._last, self._suppressed = now, 0
        logger.log(level, message, *args)
        return True

    def flush(self, logger: logging.Logger, what: str) -> None:
        """Log what is still held back (when its source closes). Never raises."""
        if self._suppressed:
            logger.warning("%s: %d more like it since the last report", what, self._suppressed)
            self._suppressed = 0
