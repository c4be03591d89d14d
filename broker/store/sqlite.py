"""The embedded store: one SQLite file (``persistence.file``, by default
``<node.data_dir>/store.sqlite3``), written behind in batches by one dedicated thread.

On the event loop, ``put_*`` and ``delete_*`` only record the latest state of what changed in dicts
(a retained topic, a session's state, one subscription, one delivery: so they hold at most one entry
per retained topic, subscription and queued or in-flight delivery, which the ``mqtt.*`` limits bound)
and arm one timer (``loop.call_later(flush_interval)``) if none is armed. When it fires, the changed
sessions and deliveries are read (on the loop: they change) and handed with the retained messages to
the thread, which converts the messages and writes everything in one transaction: a thousand retained
updates to ten topics within ``flush_interval`` are ten rows, and a QoS 1 delivery acknowledged
within it is never written at all. One write is in flight at a time; what changes meanwhile waits
for the next. A ``kill -9`` loses at most the last
``flush_interval`` (and the write in flight); :meth:`~SqliteStore.close`, at a clean stop, writes
everything first, so a SIGTERM loses nothing.

The file is in WAL mode with ``synchronous=NORMAL``: a commit appends to the write-ahead log without
an fsync (the log is synced at checkpoints), which survives a crash of the process at any moment
(SQLite's guarantee; a power cut may lose the last commits, never consistency). A write that fails
(a full disc) is logged with the file and the reason, counted in :attr:`SqliteStore.write_failures`,
and retried at the next interval, its changes merged under any newer ones.

The schema (``FORMAT_VERSION`` 2; a format 1 file, retained messages only, gets the session tables
when it is opened)::

    meta(key TEXT PRIMARY KEY, value TEXT)      -- application = realip-broker, format = 2
    retained(topic TEXT PRIMARY KEY, payload BLOB, qos INTEGER, publisher TEXT,
             properties TEXT /* JSON or NULL */, expires_at REAL /* epoch seconds or NULL */)
    sessions(client_id TEXT PRIMARY KEY, state TEXT /* JSON */, will_payload BLOB)
    subscriptions(client_id, topic_filter, qos, no_local, retain_as_published, identifier)
    deliveries(client_id, seq, topic, payload, message_qos, message_retain, publisher, properties,
               expires_at, qos, retain, subscription_ids /* JSON */, packet_id, released)

:meth:`SqliteStore.open` refuses, with a :class:`~broker.store.base.StoreError` naming the file and
saying what to do, a file that is not an SQLite database, a database of another application, a store
of another format version, a corrupt one (``PRAGMA quick_check``), and one another broker has open
(an exclusive ``flock`` held while it is open: two brokers writing one file would each undo the
other). It never changes such a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

from broker.core.session import Delivery, Message, SubOptions
from broker.store.base import (
    SessionState,
    StoredDelivery,
    StoredMessage,
    StoredSession,
    StoredSubscription,
    StoredWill,
    StoreError,
    properties_from_json,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``meta.application``: what tells this broker's store from any other SQLite file.
APPLICATION: Final = "realip-broker"
#: ``meta.format``: bumped by any change of the schema (1: retained messages; 2: sessions too).
FORMAT_VERSION: Final = 2

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

#: What format 2 added to format 1 (run on a format 1 file when it is opened).
_SESSION_SCHEMA: Final = (
    "CREATE TABLE sessions (client_id TEXT PRIMARY KEY, state TEXT NOT NULL, will_payload BLOB)",
    "CREATE TABLE subscriptions ("
    " client_id TEXT NOT NULL,"
    " topic_filter TEXT NOT NULL,"
    " qos INTEGER NOT NULL,"
    " no_local INTEGER NOT NULL,"
    " retain_as_published INTEGER NOT NULL,"
    " identifier INTEGER NOT NULL,"
    " PRIMARY KEY (client_id, topic_filter))",
    "CREATE TABLE deliveries ("
    " client_id TEXT NOT NULL,"
    " seq INTEGER NOT NULL,"
    " topic TEXT NOT NULL,"
    " payload BLOB NOT NULL,"
    " message_qos INTEGER NOT NULL,"
    " message_retain INTEGER NOT NULL,"
    " publisher TEXT NOT NULL,"
    " properties TEXT,"
    " expires_at REAL,"
    " qos INTEGER NOT NULL,"
    " retain INTEGER NOT NULL,"
    " subscription_ids TEXT NOT NULL,"
    " packet_id INTEGER NOT NULL,"
    " released INTEGER NOT NULL,"
    " PRIMARY KEY (client_id, seq))",
)

#: Every table of a format 2 store.
_TABLES: Final = frozenset({"meta", "retained", "sessions", "subscriptions", "deliveries"})

_DELETE_CLIENT: Final = (
    "DELETE FROM sessions WHERE client_id = ?",
    "DELETE FROM subscriptions WHERE client_id = ?",
    "DELETE FROM deliveries WHERE client_id = ?",
)
_UPSERT_SESSION: Final = (
    "INSERT INTO sessions (client_id, state, will_payload) VALUES (?, ?, ?)"
    " ON CONFLICT (client_id) DO UPDATE SET state = excluded.state, will_payload = excluded.will_payload"
)
_UPSERT_SUBSCRIPTION: Final = (
    "INSERT INTO subscriptions (client_id, topic_filter, qos, no_local, retain_as_published, identifier)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (client_id, topic_filter) DO UPDATE SET qos = excluded.qos, no_local = excluded.no_local,"
    " retain_as_published = excluded.retain_as_published, identifier = excluded.identifier"
)
_UPSERT_DELIVERY: Final = (
    "INSERT OR REPLACE INTO deliveries (client_id, seq, topic, payload, message_qos, message_retain,"
    " publisher, properties, expires_at, qos, retain, subscription_ids, packet_id, released)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_UPSERT: Final = (
    "INSERT INTO retained (topic, payload, qos, publisher, properties, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos,"
    " publisher = excluded.publisher, properties = excluded.properties, expires_at = excluded.expires_at"
)

_WHAT_TO_DO: Final = (
    "move it away (the broker then starts without the retained messages and sessions it held) "
    "or point persistence.file elsewhere"
)

#: Pending changes: each topic's latest message (the engine's, converted in the thread), or None for
#: a deletion.
_Batch = dict[str, Message | None]

#: A delivery as read on the loop: (seq, message, qos, retain, subscription ids, packet id, released);
#: its message is converted in the thread.
_DeliveryRow = tuple[int, Message, int, bool, tuple[int, ...], int, bool]


class _Changes:
    """What changed of one client id's session since the last batch: the live objects, read when
    the batch is handed over."""

    __slots__ = ("deliveries", "fresh", "reset", "state", "subscriptions")

    def __init__(self, *, reset: bool = False) -> None:
        #: Delete every row of the client id first (its session ended; a new one may follow).
        self.reset = reset
        #: Write its state row from this (None: the row is not changed, or deleted with ``reset``).
        self.state: SessionState | None = None
        self.subscriptions: dict[str, StoredSubscription | None] = {}
        #: seq -> the delivery, or None to delete its row
        self.deliveries: dict[int, Delivery | None] = {}
        #: Deliveries first kept since the last batch (no row yet: their removal is no write).
        self.fresh: set[int] = set()


class _Snapshot:
    """One client id's changes as handed to the thread (read on the loop, converted there); kept,
    merged under newer ones, when the write fails."""

    __slots__ = ("deliveries", "reset", "state", "subscriptions")

    def __init__(
        self,
        reset: bool,
        state: StoredSession | None,
        subscriptions: dict[str, StoredSubscription | None],
        deliveries: dict[int, _DeliveryRow | None],
    ) -> None:
        self.reset = reset
        self.state = state
        self.subscriptions = subscriptions
        self.deliveries = deliveries

    def under(self, newer: _Snapshot) -> _Snapshot:
        """This (older, not written) and ``newer`` as one: the newer wins where both changed."""
        if newer.reset:
            return newer
        return _Snapshot(
            self.reset,
            newer.state or self.state,
            {**self.subscriptions, **newer.subscriptions},
            {**self.deliveries, **newer.deliveries},
        )


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
        #: client id -> what changed of its session
        self._sessions: dict[str, _Changes] = {}
        #: Session changes of a failed write, written before the next ones.
        self._retry: dict[str, _Snapshot] = {}
        #: The highest ``Delivery.seq`` given.
        self._seq = 0
        #: The open file's descriptor holding the exclusive flock (the worker's).
        self._lock_fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        #: Changes in the write in flight.
        self._writing_size = 0

    def __repr__(self) -> str:
        return f"<SqliteStore {self.location} pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Changes recorded and not yet handed to the thread (a session's counts once per row)."""
        return len(self._pending) + sum(
            (changes.state is not None) + len(changes.subscriptions) + len(changes.deliveries)
            for changes in self._sessions.values()
        )

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

    async def load_sessions(self) -> list[StoredSession]:
        """Every session in the file, with its subscriptions and deliveries (by ``seq``), by client
        id. A session with a row that cannot be read (a hand-edited file) is logged, skipped and
        deleted whole: half a session would deliver the wrong things.

        Raises:
            StoreError: the file cannot be read (corrupt).
            RuntimeError: the store is not open.
        """
        worker = self._require_worker()
        sessions, bad, highest = await asyncio.wrap_future(worker.submit(self._read_sessions))
        self._seq = max(self._seq, highest)
        for client_id, why in bad:
            logger.warning("%s: session of client %r unreadable (%s): dropped", self.location, client_id, why)
            self.delete_session(client_id)
        return sessions

    def stats(self) -> dict[str, int]:
        """Transactions committed, rows written, failed writes, changes pending. Never raises."""
        return {
            "writes": self.transactions,
            "rows_written": self.rows_written,
            "write_failures": self.write_failures,
            "pending": self.pending,
        }

    def _changes(self, client_id: str) -> _Changes:
        changes = self._sessions.get(client_id)
        if changes is None:
            changes = self._sessions[client_id] = _Changes()
            self._schedule()
        return changes

    def put_session(self, state: SessionState) -> None:
        """Record that a session's own state changed; read from ``state`` when the batch is handed
        over.

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        self._changes(state.client_id).state = state

    def delete_session(self, client_id: str) -> None:
        """Record that everything of ``client_id`` goes (what was recorded for it is dropped).

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        self._sessions[client_id] = _Changes(reset=True)
        self._schedule()

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """Record one subscription (its options read now).

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        stored = StoredSubscription.from_options(topic_filter, options)
        self._changes(client_id).subscriptions[topic_filter] = stored

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """Record that one subscription goes.

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        self._changes(client_id).subscriptions[topic_filter] = None

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """Record a delivery (numbered if new), read when the batch is handed over.

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        changes = self._changes(client_id)
        seq = delivery.seq
        if not seq:
            seq = delivery.seq = self._seq = self._seq + 1
            changes.fresh.add(seq)
        changes.deliveries[seq] = delivery

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """Record that a delivery went; one kept since the last batch is just forgotten.

        Raises:
            RuntimeError: the store is not open.
        """
        self._require_worker()
        if not seq:
            return
        changes = self._changes(client_id)
        if seq in changes.fresh:
            changes.fresh.discard(seq)
            changes.deliveries.pop(seq, None)
        else:
            changes.deliveries[seq] = None

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
        if self._pending or self._sessions or self._retry:
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
        lost = self.pending + len(self._retry) + (self._writing_size if self._writing is not None else 0)
        self._cancel_timer()
        self._pending, self._sessions, self._retry = {}, {}, {}
        self._worker = self._loop = None
        if error is not None:
            worker.submit(self._disconnect)  # if the thread ever gets to it
        worker.stop()
        if error is not None:
            raise StoreError(f"{error}; {lost} change(s) not saved") from None

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
        if self._writing is None and (self._pending or self._sessions or self._retry):
            self._start_write()

    def _snapshot(self, loop_now: float, wall_now: float) -> dict[str, _Snapshot]:
        """The pending session changes read now (their objects change on the loop), merged under
        what a failed write left."""
        sessions, self._sessions = self._sessions, {}
        out, self._retry = self._retry, {}
        for client_id, changes in sessions.items():
            state = changes.state
            snapshot = _Snapshot(
                changes.reset,
                None if state is None else state.stored(loop_now=loop_now, wall_now=wall_now),
                changes.subscriptions,
                {
                    seq: None
                    if d is None
                    else (seq, d.message, d.qos, d.retain, d.subscription_ids, d.packet_id, d.released)
                    for seq, d in changes.deliveries.items()
                },
            )
            older = out.get(client_id)
            out[client_id] = snapshot if older is None else older.under(snapshot)
        return out

    def _start_write(self) -> asyncio.Future[None]:
        worker = self._require_worker()
        # Both clocks read once per batch: expiry times move from the loop's clock to the wall's.
        loop_now = self._loop.time() if self._loop is not None else 0.0
        wall_now = time.time()
        batch, self._pending = self._pending, {}
        sessions = self._snapshot(loop_now, wall_now)
        write = functools.partial(self._write, batch, sessions, loop_now=loop_now, wall_now=wall_now)
        future = asyncio.wrap_future(worker.submit(write), loop=self._loop)
        self._writing, self._writing_size = future, len(batch) + len(sessions)
        future.add_done_callback(functools.partial(self._written, batch, sessions))
        return future

    def _written(self, batch: _Batch, sessions: dict[str, _Snapshot], future: asyncio.Future[None]) -> None:
        self._writing = None
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            self.write_failures += 1
            for topic, state in batch.items():  # what changed since is newer: it wins
                self._pending.setdefault(topic, state)
            self._retry = sessions  # newer changes are merged over it by the next _snapshot
            logger.error(
                "%s: %d retained and %d session change(s) not written (%s); retrying in %gs",
                self.location,
                len(batch),
                len(sessions),
                error or "cancelled",
                self.flush_interval,
            )
        if self._pending or self._sessions or self._retry:
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.location}: cannot open the store: {exc.strerror}") from None
        try:
            # Held while the store is open; closed only after SQLite's connection (closing any
            # descriptor of the file would drop SQLite's own POSIX locks on it).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{self.location}: the store is in use by another process (another broker on the same "
                "node.data_dir?); stop it, or point node.data_dir or persistence.file elsewhere"
            ) from None
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            os.close(fd)
            raise StoreError(f"{self.location}: cannot open the store: {exc}") from None
        try:
            self._check(connection)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            os.close(fd)
            raise
        self._connection, self._lock_fd = connection, fd

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
        upgrade = version == "1" and tables == {"meta", "retained"}  # format 1: retained messages only
        if upgrade:
            tables |= _TABLES
            version = str(FORMAT_VERSION)
        if version != str(FORMAT_VERSION):
            newer = version is not None and version.isdigit() and int(version) > FORMAT_VERSION
            raise StoreError(
                f"{self.location}: a realip-broker store of format {version}, this version reads format "
                f"{FORMAT_VERSION}{' (written by a newer version)' if newer else ''}; run the version that "
                f"wrote it, or {_WHAT_TO_DO}"
            )
        if missing := sorted(_TABLES - tables):
            raise StoreError(
                f"{self.location}: a realip-broker store without its {', '.join(missing)} table(s); "
                f"{_WHAT_TO_DO}"
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
        if upgrade:  # checked first: a damaged file is never written
            self._upgrade(connection)

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
        with _transaction(connection, "BEGIN IMMEDIATE"):
            for statement in (*_SCHEMA, *_SESSION_SCHEMA):
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("application", APPLICATION), ("format", str(FORMAT_VERSION))],
            )

    def _upgrade(self, connection: sqlite3.Connection) -> None:
        """Format 1 to 2: the session tables added, in one transaction.

        Raises:
            StoreError: it cannot be written (nothing changed).
        """
        try:
            with _transaction(connection, "BEGIN IMMEDIATE"):
                for statement in _SESSION_SCHEMA:
                    connection.execute(statement)
                connection.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION),))
        except sqlite3.Error as exc:
            raise StoreError(
                f"{self.location}: cannot add the session tables to this format 1 store: {exc}"
            ) from None
        logger.info(
            "%s: store upgraded from format 1 to %d (sessions kept too)", self.location, FORMAT_VERSION
        )

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

    def _read_sessions(self) -> tuple[list[StoredSession], list[tuple[str, str]], int]:
        """The sessions, the client ids of unreadable ones (and why), and the highest ``seq``."""
        connection = self._require_connection()
        try:
            states = connection.execute(
                "SELECT client_id, state, will_payload FROM sessions ORDER BY client_id"
            ).fetchall()
            subscriptions = connection.execute(
                "SELECT client_id, topic_filter, qos, no_local, retain_as_published, identifier"
                " FROM subscriptions ORDER BY client_id, rowid"
            ).fetchall()
            deliveries = connection.execute(
                "SELECT client_id, seq, topic, payload, message_qos, message_retain, publisher, properties,"
                " expires_at, qos, retain, subscription_ids, packet_id, released"
                " FROM deliveries ORDER BY client_id, seq"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        bad: dict[str, str] = {}
        by_client: dict[str, tuple[list[StoredSubscription], list[StoredDelivery]]] = {}
        for row in subscriptions:
            try:
                by_client.setdefault(str(row[0]), ([], []))[0].append(_subscription(row))
            except ValueError as exc:
                bad.setdefault(str(row[0]), f"subscription: {exc}")
        highest = 0
        for row in deliveries:
            try:
                delivery = _delivery(row)
            except ValueError as exc:
                bad.setdefault(str(row[0]), f"delivery: {exc}")
                continue
            by_client.setdefault(str(row[0]), ([], []))[1].append(delivery)
            highest = max(highest, delivery.seq)
        sessions: list[StoredSession] = []
        for client_id, state, will_payload in states:
            try:
                session = _session(client_id, state, will_payload)
            except ValueError as exc:
                bad.setdefault(str(client_id), str(exc))
                continue
            if client_id in bad:
                continue
            subs, kept = by_client.pop(client_id, ([], []))
            sessions.append(replace(session, subscriptions=tuple(subs), deliveries=tuple(kept)))
        for client_id in by_client:  # rows of no session (a hand-edited file)
            bad.setdefault(client_id, "subscriptions or deliveries without a session")
        return sessions, sorted(bad.items()), highest

    def _write(
        self, batch: _Batch, sessions: dict[str, _Snapshot], *, loop_now: float, wall_now: float
    ) -> None:
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
        session_rows = _SessionRows(loop_now, wall_now)
        for client_id, snapshot in sessions.items():
            session_rows.add(client_id, snapshot)
        with _transaction(connection, "BEGIN"):
            connection.executemany("DELETE FROM retained WHERE topic = ?", deletions)
            connection.executemany(_UPSERT, rows)
            session_rows.write(connection)
        self.transactions += 1
        self.rows_written += len(deletions) + len(rows) + session_rows.count

    def _disconnect(self) -> None:
        # The last connection's close checkpoints the write-ahead log into the file and removes it.
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # lets go of the flock

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


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, begin: str) -> Iterator[None]:
    """``begin`` ... COMMIT, or ROLLBACK if the body raises (re-raised)."""
    connection.execute(begin)
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise


class _SessionRows:
    """A batch's session changes as the statements' parameters (built in the thread: each message is
    converted once, however many sessions it went to)."""

    def __init__(self, loop_now: float, wall_now: float) -> None:
        self.loop_now, self.wall_now = loop_now, wall_now
        self.resets: list[tuple[str]] = []
        self.states: list[tuple[str, str, bytes | None]] = []
        self.subscriptions: list[tuple[str, str, int, int, int, int]] = []
        self.unsubscribed: list[tuple[str, str]] = []
        self.deliveries: list[tuple[Any, ...]] = []
        self.delivered: list[tuple[str, int]] = []
        #: id(message) -> its columns (topic ... expires_at), for this batch
        self._messages: dict[int, tuple[Any, ...]] = {}

    @property
    def count(self) -> int:
        """Rows written or deleted (a reset counts one)."""
        rows = (self.resets, self.states, self.subscriptions, self.unsubscribed)
        return sum(len(r) for r in rows) + len(self.deliveries) + len(self.delivered)

    def add(self, client_id: str, snapshot: _Snapshot) -> None:
        if snapshot.reset:
            self.resets.append((client_id,))
        if snapshot.state is not None:
            self.states.append((client_id, *_state_columns(snapshot.state)))
        for topic_filter, subscription in snapshot.subscriptions.items():
            if subscription is None:
                self.unsubscribed.append((client_id, topic_filter))
            else:
                self.subscriptions.append(
                    (
                        client_id,
                        topic_filter,
                        subscription.qos,
                        int(subscription.no_local),
                        int(subscription.retain_as_published),
                        subscription.identifier,
                    )
                )
        for seq, row in snapshot.deliveries.items():
            if row is None:
                self.delivered.append((client_id, seq))
                continue
            _, message, qos, retain, subscription_ids, packet_id, released = row
            columns = self._message(message)
            if columns is None:
                continue
            ids = json.dumps(list(subscription_ids))
            self.deliveries.append(
                (client_id, seq, *columns, qos, int(retain), ids, packet_id, int(released))
            )

    def _message(self, message: Message) -> tuple[Any, ...] | None:
        columns = self._messages.get(id(message))
        if columns is None:
            try:
                stored = StoredMessage.from_message(message, loop_now=self.loop_now, wall_now=self.wall_now)
                properties = None if stored.properties is None else json.dumps(stored.properties)
            except (TypeError, ValueError) as exc:  # the decoder makes only storable values: a bug
                logger.error("queued message on %r not saved: %s", message.topic, exc)
                return None
            columns = self._messages[id(message)] = (
                stored.topic,
                stored.payload,
                stored.qos,
                int(stored.retain),
                stored.publisher,
                properties,
                stored.expires_at,
            )
        return columns

    def write(self, connection: sqlite3.Connection) -> None:
        for statement in _DELETE_CLIENT:
            connection.executemany(statement, self.resets)
        connection.executemany(_UPSERT_SESSION, self.states)
        connection.executemany(
            "DELETE FROM subscriptions WHERE client_id = ? AND topic_filter = ?", self.unsubscribed
        )
        connection.executemany(_UPSERT_SUBSCRIPTION, self.subscriptions)
        connection.executemany("DELETE FROM deliveries WHERE client_id = ? AND seq = ?", self.delivered)
        connection.executemany(_UPSERT_DELIVERY, self.deliveries)


def _state_columns(state: StoredSession) -> tuple[str, bytes | None]:
    """A session's ``state`` (JSON) and ``will_payload`` columns.

    Raises:
        ValueError: a will property value of no property type (a bug).
    """
    will = state.will
    data: dict[str, Any] = {
        "expiry_interval": state.expiry_interval,
        "disconnected_at": state.disconnected_at,
        "owner": state.owner,
        "username": state.username,
        "authenticated": state.authenticated,
        "superuser": state.superuser,
        "ip": state.ip,
        "awaiting_rel": list(state.awaiting_rel),
        "will": None,
    }
    if will is None:
        return json.dumps(data), None
    message = will.message
    data["will"] = {
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
        "publisher": message.publisher,
        "properties": message.properties,
        "expires_at": message.expires_at,
        "delay": will.delay,
        "due_at": will.due_at,
    }
    return json.dumps(data), message.payload


def _optional_time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} {value!r} is not a time")
    return float(value)


def _session(client_id: Any, state: Any, will_payload: Any) -> StoredSession:
    """One ``sessions`` row as a :class:`StoredSession` (without subscriptions and deliveries).

    Raises:
        ValueError: a column of the wrong type (a hand-edited file).
    """
    if not isinstance(client_id, str):
        raise ValueError(f"client id {client_id!r} is not text")
    try:
        data = json.loads(state)
    except (TypeError, ValueError):
        raise ValueError(f"state {state!r} is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"state {state!r} is not a JSON object")
    expiry = data.get("expiry_interval")
    if isinstance(expiry, bool) or not isinstance(expiry, int | float) or expiry < 0:
        raise ValueError(f"expiry_interval {expiry!r} is not a number of seconds")
    awaiting = data.get("awaiting_rel", [])
    if not isinstance(awaiting, list) or not all(isinstance(i, int) and 0 < i < 65536 for i in awaiting):
        raise ValueError(f"awaiting_rel {awaiting!r} is not a list of packet ids")
    texts = {key: data.get(key) for key in ("owner", "username")}
    if not all(value is None or isinstance(value, str) for value in texts.values()):
        raise ValueError(f"owner or username {texts!r} is not text")
    ip = data.get("ip", "")
    if not isinstance(ip, str):
        raise ValueError(f"ip {ip!r} is not text")
    will = None
    if (raw := data.get("will")) is not None:
        will = _will(raw, will_payload)
    return StoredSession(
        client_id,
        float(expiry),
        _optional_time(data.get("disconnected_at"), "disconnected_at"),
        texts["owner"],
        texts["username"],
        bool(data.get("authenticated")),
        bool(data.get("superuser")),
        ip,
        tuple(awaiting),
        will,
    )


def _will(raw: Any, payload: Any) -> StoredWill:
    """A session's will from its ``state`` JSON and ``will_payload``.

    Raises:
        ValueError: as :func:`_session`.
    """
    if not isinstance(raw, dict) or not isinstance(payload, bytes):
        raise ValueError(f"will {raw!r} is not a will")
    topic, qos, publisher = raw.get("topic"), raw.get("qos"), raw.get("publisher", "")
    if not isinstance(topic, str) or not topic or qos not in (0, 1, 2) or not isinstance(publisher, str):
        raise ValueError(f"will topic {topic!r}, qos {qos!r} or publisher {publisher!r} out of range")
    properties = raw.get("properties")
    properties_from_json(properties)  # checked now: a bad one fails here, not at publication
    delay = _optional_time(raw.get("delay", 0), "will delay") or 0.0
    message = StoredMessage(
        topic,
        payload,
        int(qos),
        publisher,
        properties,
        _optional_time(raw.get("expires_at"), "will expires_at"),
        bool(raw.get("retain")),
    )
    return StoredWill(message, delay, _optional_time(raw.get("due_at"), "will due_at"))


def _subscription(row: tuple[Any, ...]) -> StoredSubscription:
    """One ``subscriptions`` row (client id first).

    Raises:
        ValueError: a column of the wrong type (a hand-edited file).
    """
    _, topic_filter, qos, no_local, rap, identifier = row
    if not isinstance(topic_filter, str) or not topic_filter or qos not in (0, 1, 2):
        raise ValueError(f"filter {topic_filter!r} or qos {qos!r} out of range")
    if not isinstance(identifier, int) or not 0 <= identifier < 1 << 28:
        raise ValueError(f"subscription identifier {identifier!r} out of range")
    return StoredSubscription(topic_filter, int(qos), bool(no_local), bool(rap), identifier)


def _delivery(row: tuple[Any, ...]) -> StoredDelivery:
    """One ``deliveries`` row (client id first).

    Raises:
        ValueError: a column of the wrong type (a hand-edited file).
    """
    (_, seq, topic, payload, message_qos, message_retain, publisher, properties, expires_at) = row[:9]
    qos, retain, subscription_ids, packet_id, released = row[9:]
    message = _message((topic, payload, message_qos, publisher, properties, expires_at))
    if not isinstance(seq, int) or seq < 1 or qos not in (0, 1, 2):
        raise ValueError(f"seq {seq!r} or qos {qos!r} out of range")
    if not isinstance(packet_id, int) or not 0 <= packet_id < 65536 or (qos == 0 and packet_id):
        raise ValueError(f"packet id {packet_id!r} out of range")
    try:
        ids = json.loads(subscription_ids)
    except (TypeError, ValueError):
        raise ValueError(f"subscription ids {subscription_ids!r} are not JSON") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"subscription ids {subscription_ids!r} are not a list of numbers")
    return StoredDelivery(
        seq,
        replace(message, retain=bool(message_retain)),
        int(qos),
        bool(retain),
        tuple(ids),
        packet_id,
        bool(released),
    )
