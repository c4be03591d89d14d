"""The audit log: one JSON object per line, naming the real client and the proxy it came through.

Events: ``connected``, ``disconnected`` (with ``reason``), ``refused`` (``reason``: access, banned,
a per-address limit, a PROXY or forwarded-header error code...), ``auth_failed`` (the real address
first: ``examples/fail2ban`` reads it), ``kicked``, ``ban_added``, ``ban_deleted``, ``user_added``,
``user_updated``, ``user_deleted``, ``config_reloaded``, ``config_reload_failed``. Every
record has ``ts`` (ISO 8601, UTC, milliseconds) and ``event``; client records add ``listener``,
``clientid`` and ``username`` where known, ``ip``/``port`` (the real client), ``proxy_ip``/
``proxy_port`` and ``address_source``.

The file is opened in append mode and reopened when it is moved or removed (logrotate's default
``create`` mode), like :class:`logging.handlers.WatchedFileHandler`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from listeners.address import ClientAddress

logger = logging.getLogger(__name__)


def iso8601(timestamp: float) -> str:
    """``2026-11-27T03:36:05.011+00:00``: the form of every time in audit records and the API."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def address_fields(address: ClientAddress | None) -> dict[str, Any]:
    """The address part of a record."""
    if address is None:
        return {}
    return {
        "ip": address.ip,
        "port": address.port,
        "proxy_ip": address.proxy_ip,
        "proxy_port": address.proxy_port,
        "address_source": address.source.value,
    }


class AuditLog:
    """Appends audit records to a file; a no-op when ``path`` is empty."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether records are written."""
        return bool(self.path)

    def open(self) -> None:
        """Open (or create, mode 0600) the file.

        Raises:
            OSError: it cannot be opened.
        """
        if not self.path:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._inode = fd, (stat.st_dev, stat.st_ino)

    def _reopen_if_rotated(self) -> None:
        try:
            stat = os.stat(self.path)
            current: tuple[int, int] | None = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            current = None
        if current != self._inode:
            self.open()

    def write(self, event: str, **fields: Any) -> None:
        """Append one record. Never raises: a failing audit log is reported, not fatal."""
        if not self.path:
            return
        record = {
            "ts": iso8601(time.time()),
            "event": event,
        }
        record.update((key, value) for key, value in fields.items() if value is not None)
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            self._reopen_if_rotated()
            assert self._fd is not None
            os.write(self._fd, line)
            self._failed = False
        except OSError as exc:
            if not self._failed:  # say it once, not once per record
                logger.error("audit.file %s: cannot write: %s", self.path, exc.strerror)
            self._failed = True

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
