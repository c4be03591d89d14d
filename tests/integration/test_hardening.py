"""Abuse a client can try against the engine: wills, racing CONNECTs, oversize packets, QoS 2 resume."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from tests.mqtt_raw import connect, packet, recv_exactly
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    listener_config,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]

RULES = {
    "no_match": "allow",
    "rules": [
        {"permission": "deny", "action": "publish", "topics": ["admin/#"]},
        {"permission": "allow", "action": "subscribe", "topics": ["secret/#"], "ipaddress": "127.0.0.1/32"},
        {"permission": "deny", "action": "subscribe", "topics": ["secret/#"]},
    ],
}


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    return start_broker(broker_config(tcp={"default": listener_config()}, authorization=RULES))


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("admin/cmd", r"may not publish its will to 'admin/cmd' \(authorization rules\)"),
        ("$SYS/broker/fake", r"will topic '\$SYS/broker/fake': \$SYS topics belong to the broker"),
    ],
)
def test_a_will_is_checked_like_a_publish(
    broker: BrokerProcess, clients: Clients, topic: str, why: str
) -> None:
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("willer", will=(topic, b"boom")))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x05"
    broker.wait_for_log(rf"client 'willer' refused: {why}.* \[will_topic\]")


def test_a_will_topic_with_wildcards_is_a_malformed_connect(broker: BrokerProcess) -> None:
    """[MQTT-3.1.4-1] a CONNECT that does not conform is closed without a CONNACK."""
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("willer", will=("a/#", b"boom")))
        assert sock.recv(4) == b""
    broker.wait_for_log(r"CONNECT will topic 'a/#' contains a wildcard \[MQTT-3.3.2-2\]; closing")


def test_racing_connects_with_one_client_id_leave_one_live_connection(broker: BrokerProcess) -> None:
    port = broker.port("tcp:default")
    first = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    first.sendall(connect("twin"))
    assert recv_exactly(first, 4) == b"\x20\x02\x00\x00"
    racers = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(3)]
    barrier = threading.Barrier(len(racers))

    def go(sock: socket.socket) -> None:
        barrier.wait()
        sock.sendall(connect("twin"))

    threads = [threading.Thread(target=go, args=(sock,)) for sock in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for sock in racers:  # every racer is admitted in turn...
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
    # ...and each later one closes the one before: exactly one stays, and it is the one reported.
    assert first.recv(1) == b""

    def closed(sock: socket.socket) -> bool:
        sock.settimeout(0.05)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        finally:
            sock.settimeout(WAIT)

    wait_until(
        lambda: sum(closed(sock) for sock in racers) == len(racers) - 1, what="all but one racer closed"
    )
    live = [sock for sock in racers if not closed(sock)]
    assert len(live) == 1
    assert client_info(broker, "twin")["port"] == live[0].getsockname()[1]
    for sock in [first, *racers]:
        sock.close()


def test_queued_messages_are_checked_again_when_the_session_resumes(
    broker: BrokerProcess, clients: Clients
) -> None:
    port = broker.port("tcp:default")
    reader = clients.new("reader", clean_session=False).connect("127.0.0.1", port, bind_address="127.0.0.1")
    assert reader.subscribe("secret/x", 1) == [1]  # allowed from 127.0.0.1
    assert reader.subscribe("public/x", 1) == [1]
    reader.close()
    publisher = clients.new("pub").connect("127.0.0.1", port)
    publisher.publish("secret/x", b"queued-for-127.0.0.1", qos=1)
    publisher.publish("public/x", b"marker", qos=1)
    elsewhere = clients.new("reader", clean_session=False).connect(
        "127.0.0.1", port, bind_address="127.0.0.2"
    )
    assert elsewhere.session_present
    message = elsewhere.expect()  # the secret one is not delivered to the new address
    assert (message.topic, message.payload) == ("public/x", b"marker")


def test_an_oversize_packet_is_refused_before_it_is_buffered(broker: BrokerProcess, clients: Clients) -> None:
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("big"))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        header = packet(0x30, b"")[:1]
        length, encoded = 2 * 1024 * 1024, b""
        while True:
            byte, length = length % 128, length // 128
            encoded += bytes([byte | (0x80 if length else 0)])
            if not length:
                break
        sock.sendall(header + encoded + b"\x00\x01t" + b"x" * 1000)
        assert sock.recv(1) == b""
    broker.wait_for_log(r"PUBLISH of 2097157 bytes exceeds the maximum packet size of 1048576 .*; closing")
    clients.new("after-big").connect("127.0.0.1", broker.port("tcp:default"))


def test_an_incoming_qos2_message_survives_a_reconnect_before_pubrel(
    broker: BrokerProcess, clients: Clients
) -> None:
    port = broker.port("tcp:default")
    subscriber = clients.new("q2-sub").connect("127.0.0.1", port)
    subscriber.subscribe("q2/t", 2)
    publish = packet(0x34, b"\x00\x04q2/t\x00\x07exactly-once")  # QoS 2, packet id 7
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(connect("q2-pub", clean=False))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        sock.sendall(publish)
        assert recv_exactly(sock, 4) == b"\x50\x02\x00\x07"  # PUBREC
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:  # dropped before PUBREL
        sock.sendall(connect("q2-pub", clean=False))
        assert recv_exactly(sock, 4) == b"\x20\x02\x01\x00"  # session present
        answer = recv_exactly(sock, 4)
        assert answer == b"\x50\x02\x00\x07"  # the PUBREC is sent again
        sock.sendall(b"\x62\x02\x00\x07")  # PUBREL
        assert recv_exactly(sock, 4) == b"\x70\x02\x00\x07"  # PUBCOMP
        message = subscriber.expect()
        assert (message.topic, message.payload) == ("q2/t", b"exactly-once")
        subscriber.expect_nothing(within=0.3)  # exactly once [MQTT-4.3.3]
        sock.sendall(b"\x62\x02\x00\x63")  # a PUBREL for an id never seen is still answered
        assert recv_exactly(sock, 4) == b"\x70\x02\x00\x63"
