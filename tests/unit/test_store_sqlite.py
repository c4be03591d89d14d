"""The SQLite store: round trips, write-behind batching, deletions, flush and close, refused files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.core.session import Delivery, Message, SubOptions
from broker.store.base import (
    StoredMessage,
    StoredSession,
    StoredSubscription,
    StoredWill,
    StoreError,
    properties_from_json,
    properties_to_json,
)
from broker.store.sqlite import APPLICATION, FORMAT_VERSION, SqliteStore
from tests.unit.test_layers import REPO, imports_in, top

#: A flush interval no test waits for: only flush() and close() write.
NEVER = 3600.0

PROPERTIES: dict[str, Any] = {
    "payload_format_indicator": 1,
    "content_type": "application/octet-stream",
    "response_topic": "replies/1",
    "correlation_data": b"\x00\xff\x10binary",
    "user_property": [("origin", "sensor"), ("origin", "twice"), ("", "")],
}


class TracedStore(SqliteStore):
    """Records every statement its connection runs (``executemany`` traces each row's run)."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.statements: list[str] = []

    def _connect(self) -> sqlite3.Connection:
        connection = super()._connect()
        connection.set_trace_callback(self.statements.append)
        return connection


def retained(topic: str, payload: bytes, qos: int, **kwargs: Any) -> Message:
    """A retained message as the engine hands it over."""
    return Message(topic, payload, qos, True, **kwargs)


async def opened(path: Path, **kwargs: Any) -> SqliteStore:
    store = SqliteStore(path, flush_interval=kwargs.pop("flush_interval", NEVER), **kwargs)
    await store.open()
    return store


async def reloaded(path: Path) -> dict[str, StoredMessage]:
    """What a fresh store on ``path`` loads (then closed)."""
    store = await opened(path)
    try:
        return {message.topic: message for message in await store.load_retained()}
    finally:
        await store.close()


def rows(path: Path) -> list[tuple[Any, ...]]:
    """The retained table as another process sees it (read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT topic, payload FROM retained ORDER BY topic").fetchall()


# ------------------------------------------------------------------------------------------ round trips


def test_a_message_converts_both_ways_with_binary_properties_and_expiry() -> None:
    payload = bytes(range(256)) * 3
    message = retained(
        "a/b", payload, 2, publisher="publisher-1", properties=dict(PROPERTIES), expires_at=1_030.0
    )
    stored = StoredMessage.from_message(message, loop_now=1_000.0, wall_now=1_700_000_000.0)
    assert stored.expires_at == 1_700_000_030.0
    assert stored.properties is not None
    assert stored.properties["correlation_data"] == {"__bytes__": "AP8QYmluYXJ5"}
    assert stored.properties["user_property"] == [["origin", "sensor"], ["origin", "twice"], ["", ""]]
    # Back on another loop clock (a new process), 10 s later in wall time: 20 s left.
    back = stored.to_message(loop_now=5.0, wall_now=1_700_000_010.0)
    assert back is not None
    assert (back.topic, back.payload, back.qos, back.retain, back.publisher) == (
        "a/b",
        payload,
        2,
        True,
        "publisher-1",
    )
    assert back.properties == PROPERTIES  # bytes are bytes again, user properties tuples, in order
    assert back.expires_at == pytest.approx(25.0)


async def test_a_message_round_trips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    loop = asyncio.get_running_loop()
    payload = bytes(range(256)) * 3
    store = await opened(path)
    store.put_retained(
        retained("a/b", payload, 2, publisher="p-1", properties=dict(PROPERTIES), expires_at=loop.time() + 30)
    )
    store.put_retained(retained("plain", b"x", 0))
    await store.close()

    loaded = await reloaded(path)
    assert sorted(loaded) == ["a/b", "plain"]
    assert loaded["plain"] == StoredMessage("plain", b"x", 0)
    stored = loaded["a/b"]
    assert (stored.payload, stored.qos, stored.publisher) == (payload, 2, "p-1")
    assert stored.expires_at == pytest.approx(time.time() + 30, abs=2)  # wall-clock time in the file
    back = stored.to_message(loop_now=loop.time(), wall_now=time.time())
    assert back is not None
    assert back.properties == PROPERTIES
    assert back.expires_at == pytest.approx(loop.time() + 30, abs=2)


def test_a_message_that_expired_meanwhile_is_not_brought_back() -> None:
    stored = StoredMessage("t", b"x", 1, expires_at=100.0)
    assert stored.to_message(loop_now=0.0, wall_now=100.0) is None
    assert stored.to_message(loop_now=0.0, wall_now=99.0) is not None
    assert StoredMessage("t", b"x", 1).to_message(loop_now=0.0, wall_now=1e12) is not None


def test_property_values_of_no_property_type_are_refused() -> None:
    with pytest.raises(ValueError, match="property content_type: a float value cannot be stored"):
        properties_to_json({"content_type": 1.5})
    assert properties_to_json({}) is None
    assert properties_to_json(None) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"correlation_data": {"__bytes__": "not base64!"}}, "not base64"),
        ({"correlation_data": {"other": "AA=="}}, "is not a"),
        ({"user_property": [["only one"]]}, "not a list of string pairs"),
        ({"content_type": 1.5}, "not a property value"),
        (["a list"], "not a mapping"),
    ],
)
def test_damaged_properties_are_refused(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        properties_from_json(data)


# ------------------------------------------------------------------------------------------- batching


async def test_a_thousand_puts_to_ten_topics_are_one_transaction_of_ten_rows(tmp_path: Path) -> None:
    store = TracedStore(tmp_path / "store.sqlite3", flush_interval=NEVER)
    await store.open()
    store.statements.clear()
    for index in range(1_000):
        store.put_retained(retained(f"topic/{index % 10}", b"%d" % index, 1))
    assert store.pending == 10
    await store.flush()
    assert store.statements[0] == "BEGIN"
    assert store.statements[-1] == "COMMIT"
    assert [s.split()[0] for s in store.statements[1:-1]] == ["INSERT"] * 10
    assert (store.transactions, store.rows_written) == (1, 10)
    assert rows(store.path) == [(f"topic/{n}", b"%d" % (990 + n)) for n in range(10)]  # the latest
    await store.close()


async def test_the_timer_writes_without_a_flush(tmp_path: Path) -> None:
    store = await opened(tmp_path / "store.sqlite3", flush_interval=0.05)
    store.put_retained(retained("t", b"one", 0))
    store.put_retained(retained("t", b"two", 0))
    async with asyncio.timeout(5):
        while not store.transactions:
            await asyncio.sleep(0.01)
    assert (store.transactions, store.rows_written, store.pending) == (1, 1, 0)
    assert rows(store.path) == [("t", b"two")]
    await store.close()


async def test_changes_during_a_write_wait_for_the_next(tmp_path: Path) -> None:
    store = await opened(tmp_path / "store.sqlite3")
    store.put_retained(retained("a", b"1", 0))
    flushing = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)  # the write of "a" is in the thread
    store.put_retained(retained("b", b"2", 0))
    await flushing
    await store.flush()
    assert store.transactions == 2
    assert rows(store.path) == [("a", b"1"), ("b", b"2")]
    await store.close()


# ------------------------------------------------------------------------------------------- deletions


async def test_deleted_topics_stay_deleted(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = TracedStore(path, flush_interval=NEVER)
    await store.open()
    for topic in ("a", "b", "c"):
        store.put_retained(retained(topic, topic.encode(), 0))
    await store.flush()
    store.statements.clear()
    store.delete_retained("a")
    store.put_retained(retained("c", b"new", 0))
    store.delete_retained("c")  # the latest state wins: deleted
    store.delete_retained("never-there")
    await store.flush()
    assert sorted(s.split()[0] for s in store.statements[1:-1]) == ["DELETE"] * 3
    await store.close()
    assert list(await reloaded(path)) == ["b"]


async def test_a_message_that_cannot_be_stored_deletes_its_topic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await opened(tmp_path / "store.sqlite3")
    store.put_retained(retained("t", b"old", 0))
    store.put_retained(retained("u", b"kept", 0))
    await store.flush()
    store.put_retained(retained("t", b"new", 0, properties={"content_type": 1.5}))  # no such value type
    await store.flush()
    assert (
        "retained message on 't' not saved: property content_type: a float value cannot be stored"
        in caplog.text
    )
    assert rows(store.path) == [("u", b"kept")]  # not the old one either: the engine replaced it
    await store.close()


# ---------------------------------------------------------------------------------------- flush, close


async def test_close_writes_what_is_pending_and_reopening_finds_it(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = await opened(path)
    store.put_retained(retained("kept", b"at close", 1))
    assert store.transactions == 0
    await store.close()
    assert store.transactions == 1
    await store.close()  # twice: nothing happens
    assert not Path(f"{path}-wal").exists()  # the log was checkpointed into the file
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    await store.open()  # the same object again
    assert [m.topic for m in await store.load_retained()] == ["kept"]
    store.put_retained(retained("second", b"life", 0))
    await store.close()
    assert sorted(await reloaded(path)) == ["kept", "second"]


async def test_a_store_not_opened_refuses_changes_and_closes_quietly(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    with pytest.raises(RuntimeError, match="not open"):
        store.put_retained(retained("t", b"x", 0))
    with pytest.raises(RuntimeError, match="not open"):
        store.delete_retained("t")
    await store.close()
    with pytest.raises(ValueError, match="flush_interval"):
        SqliteStore(tmp_path / "x", flush_interval=0)


class FailingOnce(SqliteStore):
    """Its first write fails as a full disc would."""

    failed = False

    def _write(self, batch: Any, sessions: Any, **clocks: float) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        super()._write(batch, sessions, **clocks)


async def test_a_failed_write_is_kept_and_retried_under_newer_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingOnce(tmp_path / "store.sqlite3", flush_interval=NEVER)
    await store.open()
    store.put_retained(retained("a", b"old", 0))
    store.put_retained(retained("b", b"b", 0))
    with pytest.raises(StoreError, match=r"store\.sqlite3: cannot write: database or disk is full"):
        await store.flush()
    assert "2 retained and 0 session change(s) not written (database or disk is full)" in caplog.text
    assert (store.write_failures, store.pending) == (1, 2)
    store.put_retained(retained("a", b"new", 0))  # newer than the failed batch: it wins
    await store.flush()
    assert rows(store.path) == [("a", b"new"), ("b", b"b")]
    await store.close()


# ---------------------------------------------------------------------------------------- refused files


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.execute("INSERT INTO users VALUES ('alice')")
    connection.close()


def _other_application(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        connection.execute("INSERT INTO meta VALUES ('application', 'someone-else')")
    connection.close()


def _other_meta(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE meta (id INTEGER, blob BLOB)")
    connection.close()


def _newer_format(path: Path) -> None:
    asyncio.run(_make_store(path))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'format'", (str(FORMAT_VERSION + 1),))
    connection.close()


async def _make_store(path: Path, count: int = 1) -> None:
    store = await opened(path)
    for index in range(count):
        store.put_retained(retained(f"t/{index}", os.urandom(400), 1))
    await store.close()


def _corrupt(path: Path) -> None:
    asyncio.run(_make_store(path, 300))  # many pages
    data = bytearray(path.read_bytes())
    data[4096 : 3 * 4096] = b"\xab" * (2 * 4096)  # the header intact, b-tree pages garbage
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_text("retained: yes\n" * 50), "not an SQLite database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84), "not an SQLite database"),
        (_foreign, r"an SQLite database, but not a realip-broker store \(its tables: users\)"),
        (_other_application, "another application \\(meta.application is 'someone-else'"),
        (_other_meta, "another application \\(its meta table is not realip-broker's"),
        (_newer_format, f"format {FORMAT_VERSION + 1}, this version reads format 2 \\(written by a newer"),
        (_corrupt, "the store is corrupt"),
    ],
    ids=["text", "bad-header", "foreign", "other-application", "other-meta", "newer-format", "corrupt"],
)
async def test_a_file_that_is_not_our_store_is_refused_and_left_unchanged(
    tmp_path: Path, make: Any, problem: str
) -> None:
    path = tmp_path / "odd.sqlite3"
    await asyncio.to_thread(make, path)
    before = path.read_bytes()
    store = SqliteStore(path)
    with pytest.raises(StoreError, match=problem) as raised:
        await store.open()
    message = str(raised.value)
    assert message.startswith(f"{path}: ")  # names the file
    assert "move it away" in message  # and says what to do
    assert path.read_bytes() == before
    await store.close()


async def test_a_directory_or_an_unwritable_place_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=f"{tmp_path}: cannot open the store: Is a directory"):
        await SqliteStore(tmp_path).open()
    missing = tmp_path / "missing" / "store.sqlite3"
    with pytest.raises(StoreError, match=f"{missing}: cannot open the store: No such file or directory"):
        await SqliteStore(missing).open()


async def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    path.touch()
    await _make_store(path)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()
    assert meta == {"application": APPLICATION, "format": str(FORMAT_VERSION)}
    assert journal == "wal"


async def test_an_unreadable_row_is_dropped_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    await _make_store(path, 2)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE retained SET properties = '{not json' WHERE topic = 't/0'")
    connection.close()
    assert sorted(await reloaded(path)) == ["t/1"]
    assert (
        "retained message on 't/0' unreadable (properties '{not json' are not JSON): dropped" in caplog.text
    )
    assert sorted(await reloaded(path)) == ["t/1"]
    assert [row[0] for row in rows(path)] == ["t/1"]


# ------------------------------------------------------------------------------------------ the layer


def test_the_store_imports_only_the_stdlib_the_core_and_the_errors() -> None:
    allowed = ("broker.core", "broker.errors", "broker.store")
    wrong = sorted(
        f"{path.name}: {name}"
        for path in sorted((REPO / "broker" / "store").glob("*.py"))
        for name in imports_in(path)
        if top(name) not in sys.stdlib_module_names and not name.startswith(allowed)
    )
    assert wrong == []


# ---------------------------------------------------------------------------------------- sessions


class State:
    """A session's own state as the engine hands it over (read when the batch is handed over)."""

    def __init__(self, client_id: str, **fields: Any) -> None:
        self.client_id = client_id
        self.fields = fields

    def stored(self, *, loop_now: float, wall_now: float) -> StoredSession:
        return StoredSession(self.client_id, **self.fields)


def delivery(topic: str, qos: int, *, packet_id: int = 0, released: bool = False) -> Delivery:
    made = Delivery(Message(topic, topic.encode(), 2, False, "pub", {"content_type": "t"}), qos, True, (3, 9))
    made.packet_id, made.released = packet_id, released
    return made


async def sessions_in(path: Path) -> list[StoredSession]:
    store = await opened(path)
    try:
        return await store.load_sessions()
    finally:
        await store.close()


async def test_a_session_round_trips_whole_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = await opened(path)
    wall = time.time()
    will = StoredWill(
        StoredMessage("wills/a", b"\x00bye", 1, "a", {"user_property": [["k", "v"]]}, None, True), 5.0
    )
    state = State(
        "a",
        expiry_interval=600.0,
        disconnected_at=wall,
        owner="alice",
        username="alice",
        authenticated=True,
        ip="192.0.2.7",
        awaiting_rel=(7, 9),
        will=will,
    )
    store.put_session(state)
    store.put_subscription("a", "orders/#", SubOptions(1, no_local=True, identifier=4))
    store.put_subscription("a", "$share/g/jobs", SubOptions(2, retain_as_published=True))
    queued, flying, released = delivery("q", 1), delivery("f", 1, packet_id=5), delivery("r", 2, packet_id=6)
    for made in (flying, released, queued):
        store.put_delivery("a", made)
    assert (flying.seq, released.seq, queued.seq) == (1, 2, 3)  # numbered in arrival order
    released.released = True  # changed after being handed over: what is written is read later
    store.put_delivery("a", released)
    await store.close()

    [back] = await sessions_in(path)
    assert back.client_id == "a"
    assert (back.expiry_interval, back.disconnected_at, back.owner, back.ip) == (
        600.0,
        wall,
        "alice",
        "192.0.2.7",
    )
    assert (back.authenticated, back.superuser, back.awaiting_rel, back.will) == (True, False, (7, 9), will)
    assert back.subscriptions == (
        StoredSubscription("orders/#", 1, no_local=True, identifier=4),
        StoredSubscription("$share/g/jobs", 2, retain_as_published=True),
    )
    assert [(d.seq, d.message.topic, d.qos, d.packet_id, d.released) for d in back.deliveries] == [
        (1, "f", 1, 5, False),
        (2, "r", 2, 6, True),
        (3, "q", 1, 0, False),
    ]
    kept = back.deliveries[0]
    assert (kept.retain, kept.subscription_ids, kept.message.retain, kept.message.qos) == (
        True,
        (3, 9),
        False,
        2,
    )
    assert kept.message.properties == {"content_type": "t"}
    # Numbering goes on after the highest kept.
    store = await opened(path)
    await store.load_sessions()
    later = delivery("later", 1)
    store.put_delivery("a", later)
    assert later.seq == 4
    await store.close()


async def test_a_delivery_acknowledged_within_a_batch_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = TracedStore(path, flush_interval=NEVER)
    await store.open()
    store.put_session(State("a", expiry_interval=60.0))
    quick = delivery("quick", 1, packet_id=1)
    store.put_delivery("a", quick)
    store.delete_delivery("a", quick.seq)  # its PUBACK came before the batch was handed over
    slow = delivery("slow", 1, packet_id=2)
    store.put_delivery("a", slow)
    await store.flush()
    assert store.rows_written == 2  # the session and "slow"
    assert not any("quick" in statement for statement in store.statements)
    store.delete_delivery("a", slow.seq)  # written before: deleted now
    await store.close()
    [back] = await sessions_in(path)
    assert back.deliveries == ()


async def test_a_session_deleted_and_started_again_within_a_batch_keeps_only_the_new_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.sqlite3"
    store = await opened(path)
    store.put_session(State("a", expiry_interval=60.0))
    store.put_subscription("a", "old/#", SubOptions(1))
    store.put_delivery("a", delivery("old", 1))
    await store.flush()
    store.delete_session("a")  # clean start
    store.put_session(State("a", expiry_interval=30.0))
    store.put_subscription("a", "new/#", SubOptions(0))
    store.delete_session("b")  # never kept: nothing to do
    await store.close()
    [back] = await sessions_in(path)
    assert (back.expiry_interval, back.subscriptions, back.deliveries) == (
        30.0,
        (StoredSubscription("new/#", 0),),
        (),
    )


async def test_failed_session_writes_are_retried_under_newer_changes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = FailingOnce(path, flush_interval=NEVER)
    await store.open()
    store.put_session(State("a", expiry_interval=60.0))
    store.put_subscription("a", "x", SubOptions(1))
    store.put_subscription("a", "y", SubOptions(1))
    with pytest.raises(StoreError, match="database or disk is full"):
        await store.flush()
    store.delete_subscription("a", "y")  # newer than the failed write: it wins
    store.put_session(State("b", expiry_interval=5.0))
    await store.close()
    back = {session.client_id: session for session in await sessions_in(path)}
    assert sorted(back) == ["a", "b"]
    assert back["a"].subscriptions == (StoredSubscription("x", 1),)


async def test_a_format_1_store_gets_the_session_tables_and_keeps_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"

    def format_1() -> None:
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        connection.execute(
            "CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,"
            " publisher TEXT NOT NULL, properties TEXT, expires_at REAL)"
        )
        connection.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("application", APPLICATION), ("format", "1")]
        )
        connection.execute("INSERT INTO retained VALUES ('kept', x'01', 1, '', NULL, NULL)")
        connection.commit()
        connection.close()

    await asyncio.to_thread(format_1)
    assert [m.payload for m in (await reloaded(path)).values()] == [b"\x01"]
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchall() == [("2",)]
    connection.close()
    assert await sessions_in(path) == []


async def test_a_second_broker_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    first = await opened(path)
    try:
        with pytest.raises(StoreError, match=r"store\.sqlite3: the store is in use by another process"):
            await opened(path)
    finally:
        await first.close()
    await (await opened(path)).close()  # let go at close


async def test_an_unreadable_session_is_dropped_whole_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    store = await opened(path)
    store.put_session(State("good", expiry_interval=60.0))
    store.put_session(State("bad", expiry_interval=60.0))
    store.put_delivery("bad", delivery("d", 1))
    await store.close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE deliveries SET qos = 7")
    connection.execute("INSERT INTO subscriptions VALUES ('orphan', 'f', 0, 0, 0, 0)")
    connection.commit()
    connection.close()
    store = await opened(path)
    assert [s.client_id for s in await store.load_sessions()] == ["good"]
    await store.close()
    assert (
        "session of client 'bad' unreadable (delivery: seq 1 or qos 7 out of range): dropped" in caplog.text
    )
    assert "session of client 'orphan' unreadable" in caplog.text
    assert [s.client_id for s in await sessions_in(path)] == ["good"]  # deleted, not found again
