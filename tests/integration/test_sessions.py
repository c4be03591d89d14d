"""The session lifecycle of the engine, against amqtt 0.12.1's faults (README, "How it is built")."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.support import WAIT, BrokerProcess, Clients, broker_config, listener_config

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    return start_broker(broker_config(tcp={"default": listener_config()}, mqtt={"idle_timeout": "500ms"}))


def test_a_new_client_gets_no_retained_messages_it_did_not_subscribe_to(
    broker: BrokerProcess, clients: Clients
) -> None:
    # amqtt 0.12.1 sent a connecting client the retained messages matching any client's subscription.
    port = broker.port("tcp:default")
    other = clients.new("other").connect("127.0.0.1", port)
    other.subscribe("secret/#", 1)
    clients.new("owner").connect("127.0.0.1", port).publish("secret/a", b"s3cr3t", qos=1, retain=True)
    assert other.expect().payload == b"s3cr3t"
    newcomer = clients.new("newcomer").connect("127.0.0.1", port)
    newcomer.subscribe("public/#", 1)
    clients.new("pub").connect("127.0.0.1", port).publish("public/x", b"hello", qos=1)
    message = newcomer.expect()
    assert (message.topic, message.payload) == ("public/x", b"hello")


def test_a_socket_that_sends_no_connect_is_closed_after_idle_timeout(broker: BrokerProcess) -> None:
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the broker
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0, elapsed
    broker.wait_for_log(r"sent no CONNECT within 0\.5s \(mqtt\.idle_timeout\); closing")


@pytest.mark.parametrize("clean_session", [True, False])
def test_a_second_connect_with_the_same_id_takes_over(
    broker: BrokerProcess, clients: Clients, clean_session: bool
) -> None:
    port = broker.port("tcp:default")
    first = clients.new("twin", clean_session=clean_session).connect("127.0.0.1", port)
    second = clients.new("twin", clean_session=clean_session).connect("127.0.0.1", port)
    assert first.disconnected.wait(WAIT), "the first connection was not closed [MQTT-3.1.4-2]"
    second.subscribe("twin/t", 1)
    clients.new("pub").connect("127.0.0.1", port).publish("twin/t", b"to-second", qos=1)
    assert second.expect().payload == b"to-second"


def test_a_persistent_session_is_resumed_with_session_present(
    broker: BrokerProcess, clients: Clients
) -> None:
    port = broker.port("tcp:default")
    first = clients.new("durable", clean_session=False).connect("127.0.0.1", port)
    first.subscribe("durable/t", 1)
    first.close()
    again = clients.new("durable", clean_session=False).connect("127.0.0.1", port)
    assert again.session_present
    clients.new("pub").connect("127.0.0.1", port).publish("durable/t", b"kept", qos=1)
    assert again.expect().payload == b"kept"


def test_a_malformed_connect_is_refused_and_others_keep_working(
    broker: BrokerProcess, clients: Clients
) -> None:
    port = broker.port("tcp:default")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00")  # protocol name "MQTX"
        assert sock.recv(16) in (b"", b"\x20\x02\x00\x01")
    broker.wait_for_log(r"CONNECT protocol name 'MQTX' is not 'MQTT' \[MQTT-3.1.2-1\]; closing")
    clients.new("fine").connect("127.0.0.1", port)
