"""The broker's own log: where it goes and in which form (``log``), its level at run time, and
the lines that a client (or a failing backend) could otherwise repeat without end.

A :class:`Throttle` logs the first occurrence at once, then counts, and logs at most one line
every :data:`LOG_INTERVAL` with the count of what it held back. One per client (the channel's, the
session's) or per backend (an HTTP authenticator, a hosted plugin). A :class:`ThrottleTable` keeps
one per key for what has no object of its own to hang it on: refusals, per (reason, client address),
so that a banned client hammering CONNECT logs one line, then one summary per interval.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Hashable
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

    def idle(self, now: float) -> bool:
        """Whether the last line is :data:`LOG_INTERVAL` old (the next occurrence is logged)."""
        return self._last is None or now - self._last >= LOG_INTERVAL

    def flush(self, logger: logging.Logger, what: str) -> None:
        """Log what is still held back (when its source closes). Never raises."""
        if self._suppressed:
            logger.warning("%s: %d more like it since the last report", what, self._suppressed)
            self._suppressed = 0


#: Keys a :class:`ThrottleTable` tracks at most: refusals are keyed by client address, which an
#: attacker chooses (IPv6 gives it plenty), so the table must not grow with them. 10,000 entries are
#: a few MiB at most.
MAX_THROTTLED_KEYS: Final = 10_000


class ThrottleTable:
    """A :class:`Throttle` per key (a refusal's reason and client address), bounded.

    A key's first occurrence is logged at once; repeats within :data:`LOG_INTERVAL` are counted,
    and the next line after it says how many were held back. Keys quiet for an interval are swept
    (at most once per interval, on the next line, or by :meth:`sweep`), each logging what it still
    held back. When ``max_keys`` keys are busy, the lines of new keys share one overflow throttle
    (and are counted in :attr:`overflowed`): the log stays bounded, the metrics stay exact.
    """

    __slots__ = ("_entries", "_max_keys", "_overflow", "_swept", "overflowed")

    def __init__(self, max_keys: int = MAX_THROTTLED_KEYS) -> None:
        self._entries: dict[Hashable, tuple[Throttle, logging.Logger, str]] = {}
        self._max_keys = max_keys
        self._overflow = Throttle()
        self._swept = _now()
        #: Lines of keys that found the table full (sent to the overflow throttle).
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self._entries)

    def log(self, key: Hashable, logger: logging.Logger, level: int, message: str, *args: Any) -> bool:
        """Log ``message % args`` on ``logger`` at ``level`` unless ``key`` logged one within
        :data:`LOG_INTERVAL` (then count it); whether it was logged. Never raises."""
        if _now() - self._swept >= LOG_INTERVAL:
            self.sweep()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_keys:
                self.overflowed += 1
                return self._overflow.log(
                    logger, level, message + " (and others like it: too many addresses to tell apart)", *args
                )
            try:
                what = message % args
            except (TypeError, ValueError):  # logging reports a bad format itself, below
                what = message
            entry = self._entries[key] = (Throttle(), logger, what)
        return entry[0].log(logger, level, message, *args)

    def sweep(self) -> None:
        """Forget the keys that logged nothing for :data:`LOG_INTERVAL`, each logging what it still
        held back. Never raises."""
        now = self._swept = _now()
        idle = [key for key, (throttle, _, _) in self._entries.items() if throttle.idle(now)]
        for key in idle:
            throttle, logger, what = self._entries.pop(key)
            throttle.flush(logger, what)
