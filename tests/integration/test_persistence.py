"""Retained messages and persistent sessions survive restarts: the real broker stopped (SIGTERM,
kill -9) and started again on the same working directory, with real clients (paho, and raw sockets
where a test must hold back an acknowledgement); a store file that is not the broker's stops it."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes

from tests import mqtt_raw as raw
from tests.integration.test_mqtt5 import V5Clients, props
from tests.routes import Route
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    listener_config,
    metric_samples,
    wait_until,
)
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
    again.wait_for_log(r"2 retained message\(s\) and 0 session\(s\) restored from data/store\.sqlite3")
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


# ---------------------------------------------------------------------------------------- sessions


def stored_rows(broker: BrokerProcess, query: str) -> list[tuple[Any, ...]]:
    """Rows of the store's file, read as another process would (read-only, while it runs)."""
    path = broker.workdir / STORE
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return connection.execute(query).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        connection.close()


def raw_connect(broker: BrokerProcess, client_id: str, *, clean: bool) -> tuple[socket.socket, bool]:
    """A raw 3.1.1 connection (it acknowledges nothing by itself), and CONNACK's session present."""
    sock = socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT)
    sock.sendall(raw.connect(client_id, clean=clean))
    kind, body = raw.read_packet(sock)
    assert (kind, body[1]) == (0x20, 0), f"CONNACK {kind:#x} {body!r}"
    return sock, bool(body[0] & 1)


def read_publish(sock: socket.socket) -> tuple[str, bytes, int, bool, int]:
    """The next packet, a QoS 1/2 PUBLISH: (topic, payload, qos, dup, packet id)."""
    kind, body = raw.read_packet(sock)
    assert kind >> 4 == 3, f"expected PUBLISH, got {kind:#x}"
    qos = (kind >> 1) & 3
    length = int.from_bytes(body[:2], "big")
    topic = body[2 : 2 + length].decode()
    packet_id = int.from_bytes(body[2 + length : 4 + length], "big")
    return topic, body[4 + length :], qos, bool(kind & 0x08), packet_id


def test_a_session_and_its_queue_survive_a_clean_restart(
    start_broker: BrokerFactory, restart: Restart, clients: Clients
) -> None:
    broker = start_broker(config(flush_interval="1h"))  # only the stop can write them
    port = broker.port("tcp:default")
    subscriber = clients.new("keeper", clean_session=False).connect("127.0.0.1", port)
    assert subscriber.subscribe("orders/#", 1) == [1]
    assert subscriber.subscribe("alerts", 2) == [2]
    subscriber.close()
    publisher = clients.new("shop").connect("127.0.0.1", port)
    for n in range(3):
        publisher.publish("orders/new", f"order {n}".encode(), qos=1)
    publisher.publish("alerts", b"fire", qos=2)
    publisher.publish("orders/new", b"qos 0, offline", qos=0)
    publisher.close()
    assert stored_rows(broker, "SELECT client_id FROM sessions") == []  # all pending, in memory
    assert broker.stop() == 0

    again = restart(broker)
    again.wait_for_log(r"0 retained message\(s\) and 1 session\(s\) restored from data/store\.sqlite3")
    port = again.port("tcp:default")
    back = clients.new("keeper", clean_session=False).connect("127.0.0.1", port)
    assert back.session_present  # [MQTT-3.2.2-2]
    got = [back.expect() for _ in range(5)]
    back.expect_nothing()
    assert [(m.topic, m.payload, m.qos) for m in got[:3]] == [
        ("orders/new", b"order 0", 1),
        ("orders/new", b"order 1", 1),
        ("orders/new", b"order 2", 1),
    ]
    # paho hands a QoS 2 message over at its PUBREL, so the QoS 0 one (queued offline, as
    # mqtt.mqueue_store_qos0 says) may come first.
    assert sorted((m.topic, m.payload, m.qos) for m in got[3:]) == [
        ("alerts", b"fire", 2),
        ("orders/new", b"qos 0, offline", 0),
    ]
    # Its subscriptions came back too: they route what is published after the restart.
    clients.new("shop2").connect("127.0.0.1", port).publish("orders/late", b"after", qos=1)
    assert (back.expect().topic, back.expect_nothing()) == ("orders/late", None)
    back.close()
    # Delivered: the queue is empty in the store once written (a clean stop writes it).
    assert again.stop() == 0
    third = restart(again)
    assert stored_rows(third, "SELECT count(*) FROM deliveries") == [(0,)]
    assert stored_rows(third, "SELECT topic_filter FROM subscriptions ORDER BY topic_filter") == [
        ("alerts",),
        ("orders/#",),
    ]


def test_in_flight_and_unreleased_qos2_survive_kill_9(
    start_broker: BrokerFactory, restart: Restart, clients: Clients
) -> None:
    broker = start_broker(config(flush_interval="100ms"))
    subscriber, present = raw_connect(broker, "holder", clean=False)
    assert not present
    subscriber.sendall(raw.subscribe(1, ("work/#", 1)))
    assert raw.read_packet(subscriber)[0] == 0x90  # SUBACK
    clients.new("boss").connect("127.0.0.1", broker.port("tcp:default")).publish("work/a", b"job", qos=1)
    topic, payload, qos, dup, packet_id = read_publish(subscriber)  # never acknowledged
    assert (topic, payload, qos, dup) == ("work/a", b"job", 1, False)
    # An incoming QoS 2 PUBLISH answered with PUBREC, its PUBREL never sent.
    sender, _ = raw_connect(broker, "sender", clean=False)
    sender.sendall(raw.publish("work/b", b"exactly once", qos=2, packet_id=77))
    assert raw.read_packet(sender) == (0x50, (77).to_bytes(2, "big"))  # PUBREC
    # The holder gets work/b too (routed on arrival): it stays in flight with work/a.
    assert read_publish(subscriber)[:2] == ("work/b", b"exactly once")
    wait_until(
        lambda: (
            stored_rows(broker, "SELECT topic, packet_id > 0 FROM deliveries ORDER BY seq")
            == [("work/a", 1), ("work/b", 1)]
            and stored_rows(broker, "SELECT state FROM sessions WHERE client_id = 'sender'") != []
            and '"awaiting_rel": [77]'
            in stored_rows(broker, "SELECT state FROM sessions WHERE client_id = 'sender'")[0][0]
        ),
        what="the in-flight deliveries and the unreleased QoS 2 id in the store's file",
    )
    samples = metric_samples(broker)
    assert samples[("realip_store_writes_total", ())] >= 1
    assert samples[("realip_store_rows_written_total", ())] >= 4  # two sessions, two deliveries
    assert samples[("realip_store_write_failures_total", ())] == 0
    assert broker.stop(signal.SIGKILL) == -signal.SIGKILL
    subscriber.close()
    sender.close()

    again = restart(broker)
    subscriber, present = raw_connect(again, "holder", clean=False)
    assert present
    # [MQTT-4.4.0-1] re-sent with DUP=1 and the same packet ids, in order.
    first, second = read_publish(subscriber), read_publish(subscriber)
    assert first == ("work/a", b"job", 1, True, packet_id)
    assert second[:4] == ("work/b", b"exactly once", 1, True)
    subscriber.sendall(
        raw.packet(0x40, first[4].to_bytes(2, "big")) + raw.packet(0x40, second[4].to_bytes(2, "big"))
    )
    sender, present = raw_connect(again, "sender", clean=False)
    assert present
    assert raw.read_packet(sender) == (0x50, (77).to_bytes(2, "big"))  # its PUBREC, again
    # The re-sent PUBLISH of id 77 is a duplicate, not a new message [MQTT-4.3.3]; PUBREL ends it.
    sender.sendall(raw.publish("work/b", b"exactly once", qos=2, packet_id=77))
    assert raw.read_packet(sender) == (0x50, (77).to_bytes(2, "big"))
    sender.sendall(raw.packet(0x62, (77).to_bytes(2, "big")))
    assert raw.read_packet(sender) == (0x70, (77).to_bytes(2, "big"))  # PUBCOMP
    subscriber.settimeout(0.3)
    with pytest.raises(TimeoutError):
        raw.read_packet(subscriber)  # work/b was not routed a second time
    subscriber.close()
    sender.close()


def test_expiry_and_wills_across_restarts(start_broker: BrokerFactory, restart: Restart) -> None:
    broker = start_broker(config(flush_interval="100ms"))
    v5 = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        watcher = v5.connect("watcher", clean_start=False, SessionExpiryInterval=3600)
        assert v5.connack(watcher)[0] == 0
        assert watcher.subscribe("wills/#", 1) == [1]
        short = v5.connect("short", clean_start=False, SessionExpiryInterval=1)
        assert v5.connack(short)[0] == 0
        assert short.subscribe("wills/#", 1) == [1]
        will = ("wills/dying", b"gone", props(PacketTypes.WILLMESSAGE, WillDelayInterval=0))
        dying = v5.connect("dying", clean_start=False, will=will, SessionExpiryInterval=600)
        assert v5.connack(dying)[0] == 0
        short.close()
        watcher.close()

        def offline() -> dict[str, float]:
            rows = stored_rows(broker, "SELECT client_id, state FROM sessions")
            return {cid: json.loads(state)["disconnected_at"] for cid, state in rows}

        wait_until(
            lambda: (
                len(stored_rows(broker, "SELECT client_id FROM sessions WHERE state LIKE '%wills/dying%'"))
                == 1
                and offline().get("short") is not None
                and offline().get("watcher") is not None
                and "dying" in offline()
            ),
            what="three sessions, two of them offline, the connected one with its will, in the store's file",
        )
        gone = offline()["short"]  # when the broker saw it go (wall clock): its expiry counts from there
        assert broker.stop(signal.SIGKILL) == -signal.SIGKILL  # under the connection: its will is due
    finally:
        v5.close_all()
    time.sleep(max(0.0, gone + 1.0 - time.time()))  # its known deadline: "short" expired while down

    again = restart(broker)
    again.wait_for_log(r"stored session of client 'short' expired while the broker was down")
    again.wait_for_log(r"1 will\(s\) that fell due while the broker was down published")
    v5 = V5Clients(Route(again, again.port("tcp:default")))
    try:
        watcher = v5.connect("watcher", clean_start=False, SessionExpiryInterval=3600)
        assert v5.connack(watcher)[:2] == (0, True)
        got = watcher.expect()
        assert (got.topic, got.payload) == ("wills/dying", b"gone")
        short = v5.connect("short", clean_start=False, SessionExpiryInterval=1)
        assert v5.connack(short)[:2] == (0, False)  # it expired: a new session
    finally:
        v5.close_all()
