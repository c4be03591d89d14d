"""Log lines that a client (or a failing backend) could otherwise repeat without end.

A :class:`Throttle` logs the first occurrence at once, then counts, and logs at most one line
every :data:`LOG_INTERVAL` with the count of what it held back. One per client (the channel's, the
session's) or per backend (an HTTP authenticator, a hosted plugin).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

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
