"""MQTT 3.1.1 behaviours amqtt 0.12.1 gets wrong (README, "MQTT 3.1.1 as the spec says"), driven by paho-mqtt against the real broker.

Every test runs three times: clients straight at realip-broker; through real NGINX sending the
PROXY protocol (the listener must not change any of this); and straight at plain amqtt 0.12.1 with
its own listener, where the tests of the behaviours it gets wrong are expected to fail (strict
xfail, so a test that stops telling the difference is noticed).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.plain_amqtt import plain_amqtt
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    MqttClient,
    broker_config,
    client_info,
    listener_config,
)

BrokerFactory = Callable[..., BrokerProcess]
EDGE = "127.0.0.50"

AUTHORIZATION = {
    "no_match": "allow",
    "rules": [
        {"permission": "deny", "action": "subscribe", "topics": ["secret/#"]},
        {"permission": "deny", "action": "publish", "topics": ["readonly/#"], "ipaddress": "127.0.0.0/8"},
        {"permission": "allow", "action": "all", "topics": ["own/${clientid}/#"]},
        {"permission": "deny", "action": "all", "topics": ["own/#"]},
    ],
}


@dataclass
class Route:
    """Where clients connect: the broker itself, NGINX in front of it, or plain amqtt."""

    broker: BrokerProcess | None
    port: int
    request: pytest.FixtureRequest | None = None

    def amqtt_gets_it_wrong(self, why: str) -> None:
        """On plain amqtt, the test must fail (strict xfail)."""
        if self.broker is None and self.request is not None:
            self.request.applymarker(pytest.mark.xfail(strict=True, reason=f"amqtt 0.12.1: {why}"))

    def client(self, clients: Clients, client_id: str, **kwargs: Any) -> MqttClient:
        return clients.new(client_id, **kwargs)

    def connect(self, clients: Clients, client_id: str, *, keepalive: int = 60, **kwargs: Any) -> MqttClient:
        return self.client(clients, client_id, **kwargs).connect("127.0.0.1", self.port, keepalive=keepalive)


@pytest.fixture(params=["direct", pytest.param("nginx", marks=pytest.mark.e2e), "plain-amqtt"])
def route(request: pytest.FixtureRequest, start_broker: BrokerFactory, tmp_path: Path) -> Iterator[Route]:
    if request.param == "plain-amqtt":
        with plain_amqtt("-") as port:
            yield Route(None, port, request)
        return
    if request.param == "direct":
        broker = start_broker(broker_config(tcp={"default": listener_config()}, authorization=AUTHORIZATION))
        yield Route(broker, broker.port("tcp:default"))
        return
    from tests.e2e.peers import Nginx, free_port, render_example

    broker = start_broker(
        broker_config(
            tcp={"default": listener_config(proxy_protocol=True, trusted_proxies=[f"{EDGE}/32"])},
            authorization=AUTHORIZATION,
        )
    )
    port = free_port()
    body = render_example(
        "nginx/tcp-proxy-protocol.conf",
        {
            "listen 1884;": f"listen 127.0.0.1:{port};",
            "proxy_pass 127.0.0.1:1883;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{broker.port('tcp:default')};",
        },
    )
    nginx = Nginx(tmp_path / "nginx", body)
    try:
        nginx.wait_listening(("127.0.0.1", port))
        yield Route(broker, port)
    finally:
        nginx.stop()


def first_message(client: MqttClient, marker_topic: str, publisher: MqttClient) -> Any:
    """The first message the client gets after subscribing, proven by a marker published last."""
    publisher.publish(marker_topic, b"marker", qos=1)
    return client.expect()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_retained_set_and_clear_through_a_wildcard(route: Route, clients: Clients, qos: int) -> None:
    if qos == 0:
        route.amqtt_gets_it_wrong("a retained QoS 0 message is sent at the subscription's QoS")
    publisher = route.connect(clients, f"ret-pub-{qos}")
    publisher.publish(f"ret{qos}/a/b", b"on", qos=qos, retain=True)
    first = route.connect(clients, f"ret-sub-{qos}")
    first.subscribe(f"ret{qos}/#", 1)
    message = first.expect()
    # [MQTT-3.3.1-6] [MQTT-3.3.1-8] RETAIN=1 to a new subscription, at min(publish QoS, subscription QoS).
    assert (message.topic, message.payload, message.retain, message.qos) == (
        f"ret{qos}/a/b",
        b"on",
        True,
        min(qos, 1),
    )
    # [MQTT-3.3.1-10/11] a zero-byte retained message clears it (and is delivered as usual).
    publisher.publish(f"ret{qos}/a/b", b"", qos=qos, retain=True)
    cleared = first.expect()
    assert (cleared.payload, cleared.retain) == (b"", False)
    second = route.connect(clients, f"ret-late-{qos}")
    second.subscribe(f"ret{qos}/#", 1)
    assert first_message(second, f"ret{qos}/marker", publisher).payload == b"marker"


def test_will_on_keepalive_expiry_and_not_after_disconnect(route: Route, clients: Clients) -> None:
    route.amqtt_gets_it_wrong("a client silent past 1.5 x keepalive is never disconnected; no will")
    watcher = route.connect(clients, "watcher")
    watcher.subscribe("will/#", 1)
    silent = route.client(clients, "silent")
    silent.client.will_set("will/silent", b"gone", qos=1)
    silent.connect("127.0.0.1", route.port, keepalive=1)
    silent.client.loop_stop()  # the socket stays open but nothing is sent: no PINGREQ
    started = time.monotonic()
    will = watcher.expect(timeout=WAIT)
    elapsed = time.monotonic() - started
    assert (will.topic, will.payload) == ("will/silent", b"gone")
    assert 1.0 <= elapsed < 4.0, f"[MQTT-3.1.2-24] disconnect after 1.5 x keepalive, took {elapsed:.2f}s"
    if route.broker is not None:
        route.broker.wait_for_log(r"client 'silent' .* disconnected \(keepalive_timeout\)")
    polite = route.client(clients, "polite")
    polite.client.will_set("will/polite", b"should-not-appear", qos=1)
    polite.connect("127.0.0.1", route.port)
    polite.close()  # DISCONNECT: [MQTT-3.1.2-10] the will is discarded
    publisher = route.connect(clients, "will-marker")
    assert first_message(watcher, "will/marker", publisher).topic == "will/marker"


def test_offline_queue_with_session_present(route: Route, clients: Clients) -> None:
    route.amqtt_gets_it_wrong("session present 0 and nothing delivered after reconnect")
    durable = route.connect(clients, "durable", clean_session=False)
    durable.subscribe("queue/t", 2)
    durable.close()
    publisher = route.connect(clients, "queue-pub")
    publisher.publish("queue/t", b"m1", qos=1)
    publisher.publish("queue/t", b"m2", qos=2)
    publisher.publish("queue/t", b"m0", qos=0)  # queued too (mqueue_store_qos0: true, EMQX's default)
    again = route.connect(clients, "durable", clean_session=False)
    assert again.session_present  # [MQTT-3.2.2-2]
    # paho hands a QoS 2 message over at PUBREL, so arrival order says nothing here.
    got = sorted((m.payload, m.qos, m.retain) for m in (again.expect() for _ in range(3)))
    assert got == [(b"m0", 0, False), (b"m1", 1, False), (b"m2", 2, False)]


def test_unacknowledged_qos1_is_redelivered_with_dup(route: Route, clients: Clients) -> None:
    route.amqtt_gets_it_wrong("an unacknowledged QoS 1 message is dropped, not re-sent with DUP")
    lazy = route.client(clients, "lazy", clean_session=False)
    lazy.client.manual_ack_set(True)  # receive, never PUBACK
    lazy.connect("127.0.0.1", route.port)
    lazy.subscribe("dup/t", 1)
    route.connect(clients, "dup-pub").publish("dup/t", b"again", qos=1)
    first = lazy.expect()
    assert (first.payload, first.dup) == (b"again", False)
    sock = lazy.client.socket()
    assert sock is not None
    lazy.client.loop_stop()
    sock.close()  # drop the connection without acknowledging
    back = route.client(clients, "lazy", clean_session=False).connect("127.0.0.1", route.port)
    redelivered = back.expect()
    assert (redelivered.payload, redelivered.dup, redelivered.qos) == (b"again", True, 1)  # [MQTT-4.4.0-1]


@pytest.mark.parametrize("qos", [0, 1])
def test_a_burst_followed_by_disconnect_is_delivered_whole(route: Route, clients: Clients, qos: int) -> None:
    # amqtt's loop handles a DISCONNECT before the deliveries queued with it and drops them; its own
    # slow reader (a task per packet read) almost never lets the queue fill, so plain amqtt passes.
    # Our engine reads faster: this guards the fix in broker/engine.py's _client_message_loop.
    subscriber = route.connect(clients, f"burst-sub-{qos}")
    subscriber.subscribe("burst/t", 1)
    count = 200
    connect = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x05burst"
    packets = bytes([0x10, len(connect)]) + connect
    for index in range(count):
        payload = b"%d" % index
        if qos:
            body = b"\x00\x07burst/t" + (index + 1).to_bytes(2, "big") + payload
            packets += bytes([0x32, len(body)]) + body
        else:
            body = b"\x00\x07burst/t" + payload
            packets += bytes([0x30, len(body)]) + body
    with socket.create_connection(("127.0.0.1", route.port), timeout=WAIT) as sock:
        sock.sendall(packets + b"\xe0\x00")  # everything, then DISCONNECT, in one write
        while sock.recv(65536):  # CONNACK, PUBACKs; the broker closes after the DISCONNECT
            pass
    received = [int(subscriber.expect().payload) for _ in range(count)]
    assert received == list(range(count))  # all of them, in order [MQTT-4.6.0-2]


def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos(
    route: Route, clients: Clients
) -> None:
    route.amqtt_gets_it_wrong("one copy per subscription, each at the subscription's QoS")
    client = route.connect(clients, "overlap")
    client.subscribe("over/+", 0)
    client.subscribe("over/#", 2)
    publisher = route.connect(clients, "over-pub")
    publisher.publish("over/x", b"once", qos=1)
    message = client.expect()
    assert (message.payload, message.qos) == (b"once", 1)  # min(publish 1, highest subscription 2)
    assert first_message(client, "over/marker", publisher).topic == "over/marker"  # no second copy


def test_zero_length_client_id(route: Route, clients: Clients) -> None:
    # paho refuses to send this CONNECT itself, so it goes raw: clean session 0, client id "".
    with socket.create_connection(("127.0.0.1", route.port), timeout=WAIT) as sock:
        body = b"\x00\x04MQTT\x04\x00\x00\x3c\x00\x00"
        sock.sendall(bytes([0x10, len(body)]) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x02"  # [MQTT-3.1.3-8] identifier rejected
        assert sock.recv(1) == b""
    accepted = route.client(clients, "", clean_session=True).connect(
        "127.0.0.1", route.port
    )  # [MQTT-3.1.3-6]
    assert accepted.subscribe("anon/t", 0) == [0]


def test_dollar_topics_are_not_matched_by_wildcards(route: Route, clients: Clients) -> None:
    route.amqtt_gets_it_wrong("a client publishing to a $-topic is disconnected")
    everything = route.connect(clients, "everything")
    everything.subscribe("#", 1)
    plus = route.connect(clients, "plus")
    plus.subscribe("+/x", 1)
    dollar = route.connect(clients, "dollar")
    dollar.subscribe("$app/#", 1)
    publisher = route.connect(clients, "dollar-pub")
    publisher.publish("$app/x", b"internal", qos=1)
    assert dollar.expect().topic == "$app/x"
    # [MQTT-4.7.2-1] neither "#" nor "+/x" sees it: the next message they get is the marker.
    publisher.publish("app/x", b"marker", qos=1)
    assert everything.expect().topic == "app/x"
    assert plus.expect().topic == "app/x"


def test_authorization_rules(route: Route, clients: Clients) -> None:
    if route.broker is None:
        pytest.skip("plain amqtt has no authorization rules to configure")
    client = route.connect(clients, "acl-client")
    # [MQTT-3.9.3] a refused SUBSCRIBE is answered 0x80, per filter.
    assert client.subscribe("secret/keys", 1) == [0x80]
    assert client.subscribe("own/acl-client/inbox", 1) == [1]
    assert client.subscribe("own/someone-else/inbox", 1) == [0x80]
    # A wildcard subscription cannot be used to read denied topics.
    assert client.subscribe("#", 1) == [1]
    publisher = route.connect(clients, "acl-pub")
    publisher.publish("secret/keys", b"hidden", qos=1)  # accepted from the publisher, never delivered
    publisher.publish("readonly/x", b"dropped", qos=1)  # a refused PUBLISH is dropped and logged
    publisher.publish("own/acl-client/inbox", b"for-you", qos=1)  # denied to the publisher (not its id)
    publisher.publish("public/x", b"marker", qos=1)
    message = client.expect()
    assert (message.topic, message.payload) == ("public/x", b"marker")
    assert route.broker is not None
    route.broker.wait_for_log(r"client 'acl-pub' from .+ may not publish to 'readonly/x'")
    assert client_info(route.broker, "acl-client")["ip_address"] == "127.0.0.1"


def test_mqtt_3_1_connect_is_answered(route: Route) -> None:
    route.amqtt_gets_it_wrong("an MQTT 3.1 CONNECT is dropped without a CONNACK")
    with socket.create_connection(("127.0.0.1", route.port), timeout=WAIT) as sock:
        body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03old"
        sock.sendall(bytes([0x10, len(body)]) + body)
        # [MQTT-3.1.2-2] unsupported protocol level: CONNACK 0x01, then close.
        assert sock.recv(4) == b"\x20\x02\x00\x01"
        assert sock.recv(1) == b""


def test_paho_mqtt_3_1_client_is_told_the_version_is_unsupported(route: Route, clients: Clients) -> None:
    route.amqtt_gets_it_wrong("an MQTT 3.1 CONNECT is dropped without a CONNACK")
    old = route.client(clients, "old-client", protocol=paho.MQTTv31)
    old.client.connect("127.0.0.1", route.port)
    old.client.loop_start()
    code, _ = old.connack.get(timeout=WAIT)
    assert code == 1
