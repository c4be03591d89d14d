"""The embedded store: one SQLite file (``persistence.file``, by default
``<node.data_dir>/store.sqlite3``), written behind in batches by one dedicated thread.

On the event loop, :meth:`SqliteStore.put_retained` and :meth:`~SqliteStore.delete_retained` only
record the latest state of a topic in a dict (so it holds at most one entry per retained topic, which
``mqtt.max_retained_messages`` bounds) and arm one timer (``loop.call_later(flush_interval)``) if none
is armed. When it fires the whole dict is handed to the thread, which writes it in one transaction:
a thousand retained updates to ten topics within ``flush_interval`` are ten rows. One write is in
flight at a time; what changes meanwhile waits for the next. A ``kill -9`` loses at most the last
``flush_interval`` (and the write in flight); :meth:`~SqliteStore.close`, at a clean stop, writes
everything first, so a SIGTERM loses nothing.

The file is in WAL mode with ``synchronous=NORMAL``: a commit appends to the write-ahead log without
an fsync (the log is synced at checkpoints), which survives a crash of the process at any moment
(SQLite's guarantee; a power cut may lose the last commits, never consistency). A write that fails
(a full disc) is logged with the file and the reason, counted in :attr:`SqliteStore.write_failures`,
and retried at the next interval, its changes merged under any newer ones.

The schema (``FORMAT_VERSION`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)      -- application = realip-broker, format = 1
    retained(topic TEXT PRIMARY KEY, payload BLOB, qos INTEGER, publisher TEXT,
             properties TEXT /* JSON or NULL */, expires_at REAL /* epoch seconds or NULL */)

:meth:`SqliteStore.open` refuses, with a :class:`~broker.store.base.StoreError` naming the file and
saying what to do, a file that is not an SQLite database, a database of another application, a store
of another format version, and a corrupt one (``PRAGMA quick_check``). It never changes such a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, TypeVar

from broker.core.session import Message
from broker.store.base import StoredMessage, StoreError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``meta.application``: what tells this broker's store from any other SQLite file.
APPLICATION: Final = "realip-broker"
#: ``meta.format``: bumped by any change of the schema (sessions will be format 2).
FORMAT_VERSION: Final = 1

#: Seconds between a change and its write (``persistence.flush_interval``'s default too): what a
#: ``kill -9`` may lose at most, and the window in which changes to one topic are merged.
DEFAULT_FLUSH_INTERVAL: Final = 1.0

#: Seconds :meth:`SqliteStore.close` waits for the last writes: a write of even 100,000 rows takes
#: well under a second, and a stopping broker must not hang on a stuck disc (a dead NFS server).
CLOSE_TIMEOUT: Final = 10.0

#: Milliseconds SQLite waits for a lock held by another connection (an operator's ``sqlite3`` shell
#: in the middle of a write) before a write fails, to be retried at the next interval.
BUSY_TIMEOUT_MS: Final = 5000

#: Problems of ``PRAGMA quick_check`` quoted in the error (it lists up to 100).
QUOTED_PROBLEMS: Final = 3

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE retained ("
    " topic TEXT PRIMARY KEY,"
    " payload BLOB NOT NULL,"
    " qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),"
    " publisher TEXT NOT NULL,"
    " properties TEXT,"
    " expires_at REAL)",
)

_UPSERT: Final = (
    "INSERT INTO retained (topic, payload, qos, publisher, properties, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos,"
    " publisher = excluded.publisher, properties = excluded.properties, expires_at = excluded.expires_at"
)

_WHAT_TO_DO: Final = (
    "move it away (the broker then starts without the retained messages it held) "
    "or point persistence.file elsewhere"
)

#: Pending changes: each topic's latest message (the engine's, converted in the thread), or None for
#: a deletion.
_Batch = dict[str, Message | None]


class _Worker:
    """One daemon thread running the calls it is given, in order. A daemon, unlike a
    ``ThreadPoolExecutor``'s thread, so that a write stuck on a dead disc cannot keep the process
    from exiting after :data:`CLOSE_TIMEOUT`."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((call, future))
        return future

    def stop(self) -> None:
        """The thread ends after the calls already given."""
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the waiting coroutine, raised there
                future.set_exception(exc)
            else:
                future.set_result(result)


class SqliteStore:
    """Retained messages in one SQLite file (see the module's docstring)."""

    def __init__(self, path: str | Path, *, flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        """``flush_interval``: seconds from a change to its write (> 0).

        Raises:
            ValueError: ``flush_interval`` is not positive.
        """
        if not flush_interval > 0:
            raise ValueError(f"flush_interval {flush_interval!r} is not a positive number of seconds")
        self.path = Path(path)
        self.location = str(self.path)
        self.flush_interval = flush_interval
        #: Transactions committed, rows written (upserts and deletions), failed writes: since made.
        self.transactions = 0
        self.rows_written = 0
        self.write_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        #: Used by the worker thread only.
        self._connection: sqlite3.Connection | None = None
        self._pending: _Batch = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        #: Changes in the write in flight.
        self._writing_size = 0

    def __repr__(self) -> str:
        return f"<SqliteStore {self.location} pending={len(self._pending)}>"

    @property
    def pending(self) -> int:
        """Changes recorded and not yet handed to the thread."""
        return len(self._pending)

    # ------------------------------------------------------------------ the event loop's side

    async def open(self) -> None:
        """Open the file, creating it (mode 0600) with the schema if it is missing or empty.

        Raises:
            StoreError: it cannot be opened or created, is not an SQLite database, is one of another
                application or of another format version, or is corrupt; nothing is changed in it.
            RuntimeError: the store is open already.
        """
        if self._worker is not None:
            raise RuntimeError(f"{self.location}: the store is open already")
        loop = asyncio.get_running_loop()
        worker = _Worker(f"store {self.path.name}")
        try:
            await asyncio.wrap_future(worker.submit(self._open_file), loop=loop)
        except BaseException:
            worker.stop()  # _open_file closed what it opened
            raise
        self._loop, self._worker = loop, worker

    async def load_retained(self) -> list[StoredMessage]:
        """Every retained message in the file, by topic. A row that cannot be read (a hand-edited
        file) is logged, skipped and deleted.

        Raises:
            StoreError: the file cannot be read (corrupt).
            RuntimeError: the store is not open.
        """
        worker = self._require_worker()
        messages, bad = await asyncio.wrap_future(worker.submit(self._read_retained))
        for topic, why in bad:
            logger.warning("%s: retained message on %r unreadable (%s): dropped", self.location, topic, why)
            self.delete_retained(topic)
        return messages

    def put_retained(self, message: Message) -> None:
        """Record the engine's ``message`` as its topic's latest state (converted and written by the
        thread within ``flush_interval``).

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        self._pending[message.topic] = message
        self._schedule()

    def delete_retained(self, topic: str) -> None:
        """Record the deletion of ``topic``'s retained message; written within ``flush_interval``.

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        self._pending[topic] = None
        self._schedule()

    async def flush(self) -> None:
        """Write what is pending now (without waiting for the timer) and return when everything
        handed over before the call is committed.

        Raises:
            StoreError: a write failed (its changes stay pending, retried at the next interval).
            RuntimeError: the store is not open.
        """
        self._require_worker()
        while self._writing is not None:
            await self._wait(self._writing)
        if self._pending:
            self._cancel_timer()
            await self._wait(self._start_write())

    async def close(self) -> None:
        """Write what is pending (waiting up to :data:`CLOSE_TIMEOUT`), then close the file. Safe to
        call twice, and on a store never opened.

        Raises:
            StoreError: what was pending could not be written in time (the store is closed anyway;
                those changes are lost).
        """
        worker = self._worker
        if worker is None:
            return
        error: StoreError | None = None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.flush()
                await asyncio.wrap_future(worker.submit(self._disconnect))
        except StoreError as exc:
            error = exc
        except TimeoutError:
            error = StoreError(
                f"{self.location}: the last writes did not finish within {CLOSE_TIMEOUT:g}s (a stuck disc?)"
            )
        lost = len(self._pending) + (self._writing_size if self._writing is not None else 0)
        self._cancel_timer()
        self._pending = {}
        self._worker = self._loop = None
        if error is not None:
            worker.submit(self._disconnect)  # if the thread ever gets to it
        worker.stop()
        if error is not None:
            raise StoreError(f"{error}; {lost} retained change(s) not saved") from None

    def _require_worker(self) -> _Worker:
        if self._worker is None:
            raise RuntimeError(f"{self.location}: the store is not open")
        return self._worker

    def _schedule(self) -> None:
        if self._timer is None and self._writing is None and self._loop is not None:
            self._timer = self._loop.call_later(self.flush_interval, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._writing is None and self._pending:
            self._start_write()

    def _start_write(self) -> asyncio.Future[None]:
        worker = self._require_worker()
        batch, self._pending = self._pending, {}
        # Both clocks read once per batch: expiry times move from the loop's clock to the wall's.
        loop_now = self._loop.time() if self._loop is not None else 0.0
        write = functools.partial(self._write, batch, loop_now=loop_now, wall_now=time.time())
        future = asyncio.wrap_future(worker.submit(write), loop=self._loop)
        self._writing, self._writing_size = future, len(batch)
        future.add_done_callback(functools.partial(self._written, batch))
        return future

    def _written(self, batch: _Batch, future: asyncio.Future[None]) -> None:
        self._writing = None
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            self.write_failures += 1
            for topic, state in batch.items():  # what changed since is newer: it wins
                self._pending.setdefault(topic, state)
            logger.error(
                "%s: %d retained change(s) not written (%s); retrying in %gs",
                self.location,
                len(batch),
                error or "cancelled",
                self.flush_interval,
            )
        if self._pending:
            self._schedule()

    async def _wait(self, writing: asyncio.Future[None]) -> None:
        # Shielded: a flush given up on (close's timeout) must not cancel the write itself, whose
        # outcome _written needs to know.
        try:
            await asyncio.shield(writing)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.location}: cannot write: {exc}") from None
        except Exception as exc:  # a bug: reported as a failed write, so that a stop still completes
            raise StoreError(f"{self.location}: cannot write: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ the worker thread's side

    def _connect(self) -> sqlite3.Connection:
        """The connection (autocommit: transactions are explicit). A test may wrap it (to trace
        the statements)."""
        return sqlite3.connect(self.path, isolation_level=None)

    def _open_file(self) -> None:
        try:  # created here, not by SQLite, so that it is the broker's alone whatever the umask
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"{self.location}: cannot open the store: {exc.strerror}") from None
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.location}: cannot open the store: {exc}") from None
        try:
            self._check(connection)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _check(self, connection: sqlite3.Connection) -> None:
        """Refuse what is not this broker's store, create the schema in an empty file.

        Raises:
            StoreError: as :meth:`open`.
        """
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            listed = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {row[0] for row in listed}
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        if not tables:
            self._create(connection)
            return
        if "meta" not in tables:
            raise StoreError(
                f"{self.location}: an SQLite database, but not a realip-broker store (its tables: "
                f"{', '.join(sorted(tables))}); {_WHAT_TO_DO}"
            )
        try:
            meta = {str(key): str(value) for key, value in connection.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise self._unreadable(exc) from None
            raise StoreError(
                f"{self.location}: an SQLite database of another application (its meta table is not "
                f"realip-broker's: {exc}); {_WHAT_TO_DO}"
            ) from None
        if meta.get("application") != APPLICATION:
            raise StoreError(
                f"{self.location}: an SQLite database of another application (meta.application is "
                f"{meta.get('application')!r}, not {APPLICATION!r}); {_WHAT_TO_DO}"
            )
        version = meta.get("format")
        if version != str(FORMAT_VERSION):
            newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
            raise StoreError(
                f"{self.location}: a realip-broker store of format {version}, this version reads format "
                f"{FORMAT_VERSION}{' (written by a newer version)' if newer else ''}; run the version that "
                f"wrote it, or {_WHAT_TO_DO}"
            )
        if "retained" not in tables:
            raise StoreError(
                f"{self.location}: a realip-broker store without its retained table; {_WHAT_TO_DO}"
            )
        try:
            problems = [str(row[0]) for row in connection.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        if problems != ["ok"]:
            raise StoreError(
                f"{self.location}: the store is corrupt (quick_check: {'; '.join(problems[:QUOTED_PROBLEMS])}"
                f"{'; ...' if len(problems) > QUOTED_PROBLEMS else ''}); {_WHAT_TO_DO} "
                "(`sqlite3 FILE .recover` may save some of it)"
            )

    def _unreadable(self, exc: sqlite3.DatabaseError) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            return StoreError(f"{self.location}: not an SQLite database ({exc}); {_WHAT_TO_DO}")
        if name == "SQLITE_CORRUPT":
            return StoreError(
                f"{self.location}: the store is corrupt ({exc}); {_WHAT_TO_DO} "
                "(`sqlite3 FILE .recover` may save some of it)"
            )
        return StoreError(f"{self.location}: cannot read the store ({exc}); {_WHAT_TO_DO}")

    @staticmethod
    def _create(connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("application", APPLICATION), ("format", str(FORMAT_VERSION))],
            )
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise

    def _read_retained(self) -> tuple[list[StoredMessage], list[tuple[str, str]]]:
        connection = self._require_connection()
        try:
            rows = connection.execute(
                "SELECT topic, payload, qos, publisher, properties, expires_at FROM retained ORDER BY topic"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        messages: list[StoredMessage] = []
        bad: list[tuple[str, str]] = []
        for row in rows:
            try:
                messages.append(_message(row))
            except ValueError as exc:
                bad.append((str(row[0]), str(exc)))
        return messages, bad

    def _write(self, batch: _Batch, *, loop_now: float, wall_now: float) -> None:
        connection = self._require_connection()
        deletions: list[tuple[str]] = []
        rows = []
        for topic, message in batch.items():
            if message is None:
                deletions.append((topic,))
                continue
            try:
                stored = StoredMessage.from_message(message, loop_now=loop_now, wall_now=wall_now)
                properties = None if stored.properties is None else json.dumps(stored.properties)
            except (TypeError, ValueError) as exc:  # the decoder makes only storable values: a bug
                logger.error("%s: retained message on %r not saved: %s", self.location, topic, exc)
                deletions.append((topic,))  # nor the one it replaced: that one is gone
                continue
            payload, expires_at = stored.payload, stored.expires_at
            rows.append((topic, payload, stored.qos, stored.publisher, properties, expires_at))
        connection.execute("BEGIN")
        try:
            connection.executemany("DELETE FROM retained WHERE topic = ?", deletions)
            connection.executemany(_UPSERT, rows)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        self.transactions += 1
        self.rows_written += len(deletions) + len(rows)

    def _disconnect(self) -> None:
        # The last connection's close checkpoints the write-ahead log into the file and removes it.
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _require_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError(f"{self.location}: the store is not open")
        return self._connection


def _message(row: tuple[Any, ...]) -> StoredMessage:
    """One row (topic, payload, qos, publisher, properties, expires_at) as a :class:`StoredMessage`.

    Raises:
        ValueError: a column of the wrong type (a hand-edited file).
    """
    topic, payload, qos, publisher, properties, expires_at = row
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic {topic!r} is not a topic name")
    if not isinstance(payload, bytes):
        raise ValueError(f"payload of type {type(payload).__name__}, not a BLOB")
    if qos not in (0, 1, 2) or not isinstance(publisher, str):
        raise ValueError(f"qos {qos!r} or publisher {publisher!r} out of range")
    if expires_at is not None and not isinstance(expires_at, int | float):
        raise ValueError(f"expires_at {expires_at!r} is not a time")
    decoded = None
    if properties is not None:
        try:
            decoded = json.loads(properties)
        except (TypeError, ValueError):
            raise ValueError(f"properties {properties!r} are not JSON") from None
        if not isinstance(decoded, dict):
            raise ValueError(f"properties {properties!r} are not a JSON object")
    return StoredMessage(
        topic, payload, int(qos), publisher, decoded, None if expires_at is None else float(expires_at)
    )
