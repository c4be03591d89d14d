"""Retained messages survive restarts: the real broker stopped (SIGTERM, kill -9) and started again
on the same working directory, with real clients; a store file that is not the broker's stops it."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_mqtt5 import V5Clients
from tests.routes import Route
from tests.support import WAIT, BrokerProcess, Clients, broker_config, listener_config, wait_until
from tests.unit.test_store_sqlite import _corrupt

BrokerFactory = Callable[..., BrokerProcess]
Restart = Callable[..., BrokerProcess]

#: The store's file in a broker's working directory (node.data_dir "data", the default file name).
STORE = Path("data") / "store.sqlite3"


def config(**persistence: Any) -> dict[str, Any]:
    return broker_config(tcp={"default": listener_config()}, persistence=persistence)


@pytest.fixture
def restart() -> Iterator[Restart]:
    """Start the broker again on a stopped one's working directory (its data dir, its store)."""
    started: list[BrokerProcess] = []

    def again(broker: BrokerProcess) -> BrokerProcess:
        assert broker.proc.poll() is not None, "stop it first"
        replacement = BrokerProcess(yaml.safe_load(broker.config_path.read_text()), broker.workdir)
        started.append(replacement)
        return replacement.wait_ready()

    yield again
    for broker in started:
        if broker.proc.poll() is None:
            broker.stop()


def retained(clients: Clients, broker: BrokerProcess, topic_filter: str, count: int) -> dict[str, bytes]:
    """The retained messages a new subscriber to ``topic_filter`` gets (exactly ``count`` of them)."""
    subscriber = clients.new(f"late-{broker.port('tcp:default')}").connect(
        "127.0.0.1", broker.port("tcp:default")
    )
    subscriber.subscribe(topic_filter, 1)
    got = {}
    for _ in range(count):
        message = subscriber.expect()
        assert message.retain
        got[message.topic] = message.payload
    subscriber.expect_nothing()
    subscriber.close()
    return got


def stored_topics(broker: BrokerProcess) -> list[str]:
    """The topics in the store's file, read as another process would (read-only, while it runs)."""
    path = broker.workdir / STORE
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [row[0] for row in connection.execute("SELECT topic FROM retained ORDER BY topic")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        connection.close()


def test_retained_messages_survive_a_clean_restart_and_cleared_ones_stay_cleared(
    start_broker: BrokerFactory, restart: Restart, clients: Clients
) -> None:
    broker = start_broker(config(flush_interval="1h"))  # only the stop can write them
    publisher = clients.new("publisher").connect("127.0.0.1", broker.port("tcp:default"))
    publisher.publish("state/lamp", b"on", qos=1, retain=True)
    publisher.publish("state/raw", bytes(range(256)), qos=0, retain=True)
    publisher.publish("state/door", b"open", qos=1, retain=True)
    publisher.publish("state/door", b"", qos=1, retain=True)  # cleared [MQTT-3.3.1-10]
    publisher.publish("state/lamp", b"off", qos=1, retain=True)  # the latest wins
    publisher.close()
    assert stored_topics(broker) == []  # all pending, in memory
    assert broker.stop() == 0  # SIGTERM: the store is closed after the last connection, written first

    again = restart(broker)
    again.wait_for_log(r"2 retained message\(s\) restored from data/store\.sqlite3")
    assert retained(clients, again, "state/#", 2) == {"state/lamp": b"off", "state/raw": bytes(range(256))}
    # Cleared after a restart: still cleared after the next one.
    clients.new("clearer").connect("127.0.0.1", again.port("tcp:default")).publish(
        "state/raw", b"", qos=1, retain=True
    )
    assert again.stop() == 0
    third = restart(again)
    assert retained(clients, third, "state/#", 1) == {"state/lamp": b"off"}


def test_mqtt5_properties_and_expiry_survive_a_restart(start_broker: BrokerFactory, restart: Restart) -> None:
    broker = start_broker(config())
    v5 = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        publisher = v5.connect("v5-publisher")
        assert v5.connack(publisher)[0] == 0
        sent = {
            "UserProperty": [("origin", "sensor-7"), ("origin", "again")],
            "CorrelationData": b"\x00\x01\xff",
            "ContentType": "application/json",
            "PayloadFormatIndicator": 1,
            "MessageExpiryInterval": 3600,
        }
        # PUBACK 0x10, no matching subscribers: nobody subscribes yet, the broker keeps them.
        assert publisher.publish("v5/state", b"{}", qos=1, retain=True, **sent) == 0x10
        assert (
            publisher.publish("v5/short", b"soon gone", qos=1, retain=True, MessageExpiryInterval=1) == 0x10
        )
        expires = time.monotonic() + 1.0
    finally:
        v5.close_all()
    assert broker.stop() == 0
    time.sleep(max(0.0, expires - time.monotonic()))  # its known deadline, not a guess: expired while down

    again = restart(broker)
    again.wait_for_log(r"1 stored retained message\(s\) dropped: 1 expired")
    v5 = V5Clients(Route(again, again.port("tcp:default")))
    try:
        subscriber = v5.connect("v5-subscriber")
        assert v5.connack(subscriber)[0] == 0
        assert subscriber.subscribe("v5/#", 1) == [1]
        got = subscriber.expect()
        subscriber.expect_nothing()
    finally:
        v5.close_all()
    assert (got.topic, got.payload, got.retain) == ("v5/state", b"{}", True)
    expiry = got.properties.pop("MessageExpiryInterval")
    assert 3500 < expiry <= 3600  # the time left, counted across the restart
    assert got.properties == {
        "UserProperty": [("origin", "sensor-7"), ("origin", "again")],
        "CorrelationData": "0001ff",  # paho's json() shows binary values in hex
        "ContentType": "application/json",
        "PayloadFormatIndicator": 1,
    }


def test_kill_9_after_the_flush_interval_loses_nothing(
    start_broker: BrokerFactory, restart: Restart, clients: Clients
) -> None:
    broker = start_broker(config(flush_interval="200ms"))
    publisher = clients.new("publisher").connect("127.0.0.1", broker.port("tcp:default"))
    publisher.publish("kill/a", b"1", qos=1, retain=True)
    publisher.publish("kill/b", b"2", qos=0, retain=True)
    publisher.close()
    wait_until(lambda: stored_topics(broker) == ["kill/a", "kill/b"], what="both rows in the store's file")
    assert broker.stop(signal.SIGKILL) == -signal.SIGKILL

    again = restart(broker)
    assert retained(clients, again, "kill/#", 2) == {"kill/a": b"1", "kill/b": b"2"}


def _text(path: Path) -> None:
    path.write_text("these are not the retained messages you are looking for\n")


@pytest.mark.parametrize(
    ("make", "problem"),
    [(_text, "not an SQLite database"), (_corrupt, "the store is corrupt")],
    ids=["not-a-database", "corrupt"],
)
def test_a_store_that_is_not_ours_stops_start_up_naming_the_file(
    tmp_path: Path, make: Callable[[Path], None], problem: str
) -> None:
    (tmp_path / "data").mkdir(mode=0o700)
    make(tmp_path / STORE)
    before = (tmp_path / STORE).read_bytes()
    broker = BrokerProcess(config(), tmp_path)
    try:
        assert broker.proc.wait(WAIT) == 1
    finally:
        if broker.proc.poll() is None:
            broker.stop(signal.SIGKILL)
    broker.wait_for_log(rf"persistence\.file: data/store\.sqlite3: {problem} .*; move it away")
    assert "realip-broker ready" not in broker.output()
    assert (tmp_path / STORE).read_bytes() == before


def test_with_persistence_off_nothing_is_kept(
    start_broker: BrokerFactory, restart: Restart, clients: Clients
) -> None:
    broker = start_broker(config(enable=False))
    clients.new("publisher").connect("127.0.0.1", broker.port("tcp:default")).publish(
        "off/a", b"1", qos=1, retain=True
    )
    assert retained(clients, broker, "off/#", 1) == {"off/a": b"1"}  # retained while it runs
    assert broker.stop() == 0
    assert not (broker.workdir / STORE).exists()
    again = restart(broker)
    assert "restored" not in again.output()
    assert retained(clients, again, "off/#", 0) == {}
