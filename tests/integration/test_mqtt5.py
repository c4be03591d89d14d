"""MQTT 5.0 with third-party clients (paho-mqtt MQTTv5, mosquitto_pub/sub -V mqttv5) against the
real broker: directly, through NGINX sending the PROXY protocol, and through NGINX on WebSocket
(X-Forwarded-For), each client bound to its own 127.x address so that the address the broker
reports and tells the client (``peer_in_connack``) is the real one.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.mqtt_raw import packet, read_packet, recv_exactly, string, varint, wait_closed
from tests.routes import EDGE, Route, nginx_proxy, nginx_ws
from tests.support import (
    REPO,
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    ctl,
    listener_config,
    metric_samples,
    require_binary,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]

MQTT = {"peer_in_connack": True, "publisher_address_property": "x-real-ip", "max_inflight": 8}
RULES = {"no_match": "allow", "rules": [{"permission": "deny", "action": "publish", "topics": ["ro/#"]}]}


def props(kind: int, **values: Any) -> Properties:
    """paho Properties of a packet type, e.g. ``props(PacketTypes.PUBLISH, ContentType="x")``."""
    properties = Properties(kind)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


@dataclass
class Got:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any]


@dataclass
class V5:
    """A paho MQTTv5 client with blocking helpers, recording what the broker says."""

    client: paho.Client
    client_id: str
    connack: queue.Queue[tuple[int, bool, dict[str, Any]]] = field(default_factory=queue.Queue)
    messages: queue.Queue[Got] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    disconnects: queue.Queue[int] = field(default_factory=queue.Queue)
    acks: dict[int, int] = field(default_factory=dict)
    acked: threading.Condition = field(default_factory=threading.Condition)

    def expect(self, timeout: float = WAIT) -> Got:
        return self.messages.get(timeout=timeout)

    def expect_nothing(self, within: float = 0.3) -> None:
        with pytest.raises(queue.Empty):
            raise AssertionError(f"unexpected {self.messages.get(timeout=within)}")

    def subscribe(
        self, topic: str, qos: int = 1, properties: Properties | None = None, **options: Any
    ) -> list[int]:
        self.client.subscribe(topic, options=paho.SubscribeOptions(qos=qos, **options), properties=properties)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, **values: Any) -> int:
        """Publish; returns the PUBACK/PUBREC reason code (0 for QoS 0)."""
        properties = props(PacketTypes.PUBLISH, **values) if values else None
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if not qos:
            return 0
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, WAIT), "no PUBACK"
            return self.acks.pop(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _props_dict(properties: Any) -> dict[str, Any]:
    return {} if properties is None else {k: v for k, v in properties.json().items()}


class V5Clients:
    """Makes and closes paho MQTTv5 clients of one route."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.made: list[V5] = []

    def connect(
        self,
        client_id: str,
        *,
        source: str = "127.0.0.1",
        clean_start: bool = True,
        expect_rc: int = 0,
        will: tuple[str, bytes, Properties | None] | None = None,
        keepalive: int = 60,
        **connect_props: Any,
    ) -> V5:
        transport = "websockets" if self.route.websocket else "tcp"
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, transport=transport
        )
        if self.route.websocket:
            client.ws_set_options(path="/mqtt")
        made = V5(client, client_id)
        client.on_connect = lambda c, u, flags, rc, p: made.connack.put(
            (rc.value, bool(flags.session_present), _props_dict(p))
        )
        client.on_message = lambda c, u, m: made.messages.put(
            Got(m.topic, m.payload, m.qos, m.retain, _props_dict(m.properties))
        )
        client.on_subscribe = lambda c, u, mid, rcs, p: made.subacks.put([r.value for r in rcs])
        client.on_disconnect = lambda c, u, flags, rc, p: made.disconnects.put(rc.value)

        def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
            with made.acked:
                made.acks[mid] = rc.value
                made.acked.notify_all()

        client.on_publish = on_publish
        if will is not None:
            client.will_set(will[0], will[1], qos=1, properties=will[2])
        properties = props(PacketTypes.CONNECT, **connect_props) if connect_props else None
        client.connect(
            "127.0.0.1",
            self.route.port,
            keepalive=keepalive,
            bind_address=source,
            clean_start=clean_start,
            properties=properties,
        )
        client.loop_start()
        self.made.append(made)
        return made

    def connack(self, client: V5) -> tuple[int, bool, dict[str, Any]]:
        return client.connack.get(timeout=WAIT)

    def close_all(self) -> None:
        for client in self.made:
            client.client.loop_stop()
            client.client.disconnect()


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    return start_broker(
        broker_config(
            tcp={
                "default": listener_config(),
                "pp": listener_config(proxy_protocol=True, trusted_proxies=[f"{EDGE}/32"]),
            },
            ws={
                "xff": listener_config(
                    trusted_proxies=[f"{EDGE}/32"],
                    websocket={
                        "proxy_address_header": "X-Forwarded-For",
                        "proxy_port_header": "X-Forwarded-Port",
                    },
                )
            },
            mqtt=MQTT,
            authorization=RULES,
        ),
        log_level="info",
    )


@pytest.fixture(
    params=[
        "direct",
        pytest.param("nginx-proxy", marks=pytest.mark.e2e),
        pytest.param("nginx-ws", marks=pytest.mark.e2e),
    ]
)
def route(request: pytest.FixtureRequest, broker: BrokerProcess, tmp_path: Path) -> Iterator[Route]:
    if request.param == "direct":
        yield Route(broker, broker.port("tcp:default"))
        return
    require_binary("nginx")
    port, nginx = (nginx_proxy if request.param == "nginx-proxy" else nginx_ws)(broker, tmp_path)
    try:
        yield Route(broker, port, websocket=request.param == "nginx-ws", proxy=EDGE)
    finally:
        nginx.stop()


@pytest.fixture
def v5(route: Route) -> Iterator[V5Clients]:
    made = V5Clients(route)
    yield made
    made.close_all()


def connected(v5: V5Clients, client_id: str, **kwargs: Any) -> tuple[V5, dict[str, Any]]:
    client = v5.connect(client_id, **kwargs)
    rc, _, properties = v5.connack(client)
    assert rc == 0, f"CONNACK 0x{rc:02X}"
    return client, properties


# ------------------------------------------------------------------------------------------------


def test_connack_announces_limits_and_the_real_address(v5: V5Clients, route: Route) -> None:
    client, connack = connected(v5, "v5-connack", source="127.0.0.41")
    assert connack["ReceiveMaximum"] == 8  # mqtt.max_inflight
    assert connack["MaximumPacketSize"] == 1024 * 1024
    assert connack["TopicAliasMaximum"] == 65535
    assert connack.get("SharedSubscriptionAvailable", 1) == 1  # available (the default)
    user = dict(connack["UserProperty"])
    port = client.client.socket().getsockname()[1] if not route.websocket else None
    assert user["peername"].startswith("127.0.0.41:")
    if port is not None:
        assert user["peername"] == f"127.0.0.41:{port}"
    expected_source = {None: "socket", EDGE: "x_forwarded_for" if route.websocket else "proxy_protocol_v1"}
    assert user["address_source"] == expected_source[route.proxy]
    info = client_info(route.broker, "v5-connack")
    assert (info["ip_address"], info["proto_ver"], info["proxy_address"]) == ("127.0.0.41", 5, route.proxy)
    shown = ctl(route.broker, "clients", "show", "v5-connack").stdout
    assert "proto_ver=5" in shown and "peername=127.0.0.41:" in shown


def test_mixed_311_and_5_with_properties_passed_through(
    v5: V5Clients, route: Route, clients: Clients
) -> None:
    subscriber, _ = connected(v5, "v5-sub", source="127.0.0.42")
    assert subscriber.subscribe(
        "mix/#", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7)
    ) == [1]
    old = clients.new("v3-sub").connect("127.0.0.1", route.broker.port("tcp:default"))
    old.subscribe("mix/#", 1)
    publisher, _ = connected(v5, "v5-pub", source="127.0.0.43")
    code = publisher.publish(
        "mix/a",
        b"hello",
        ContentType="text/plain",
        ResponseTopic="reply/here",
        CorrelationData=b"\x01\x02",
        PayloadFormatIndicator=1,
        UserProperty=[("k", "v"), ("x-real-ip", "6.6.6.6")],
    )
    assert code == 0
    got = subscriber.expect()
    assert (got.topic, got.payload, got.qos) == ("mix/a", b"hello", 1)
    assert got.properties["ContentType"] == "text/plain"
    assert got.properties["ResponseTopic"] == "reply/here"
    assert got.properties["CorrelationData"] == "0102"
    assert got.properties["PayloadFormatIndicator"] == 1
    assert got.properties["SubscriptionIdentifier"] == [7]
    user = got.properties["UserProperty"]
    assert ("k", "v") in user
    # The forged address property is gone; the real one (the publisher's, behind NGINX) is there.
    assert [value for name, value in user if name == "x-real-ip"] == [
        f"127.0.0.43:{client_info(route.broker, 'v5-pub')['port']}"
    ]
    message = old.expect()  # the 3.1.1 subscriber gets the payload (no properties in 3.1.1)
    assert (message.topic, message.payload) == ("mix/a", b"hello")
    # A 3.1.1 publisher reaches the MQTT 5 subscriber, with the address property added.
    old.publish("mix/b", b"from 3.1.1", qos=1)
    got = subscriber.expect()
    assert got.payload == b"from 3.1.1" and dict(got.properties["UserProperty"])["x-real-ip"].startswith(
        "127.0.0.1:"
    )


def test_publish_reason_codes(v5: V5Clients) -> None:
    publisher, _ = connected(v5, "v5-codes")
    assert publisher.publish("nobody/listens", b"x", qos=1) == 0x10  # no matching subscribers
    assert publisher.publish("ro/x", b"x", qos=1) == 0x87  # not authorized


def test_session_expiry_and_clean_start(v5: V5Clients) -> None:
    first, _ = connected(v5, "v5-sess", SessionExpiryInterval=60)
    first.subscribe("sess/t", 1)
    first.close()
    again = v5.connect("v5-sess", clean_start=False, SessionExpiryInterval=60)
    assert v5.connack(again)[:2] == (0, True)
    again.close()
    fresh = v5.connect("v5-sess", clean_start=True)
    assert v5.connack(fresh)[:2] == (0, False)
    fresh.close()  # session expiry 0: the session ends with the connection
    gone = v5.connect("v5-sess", clean_start=False)
    assert v5.connack(gone)[:2] == (0, False)


def test_session_expiry_is_capped_and_said(start_broker: BrokerFactory, tmp_path: Path) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"session_expiry_interval": "1m"}),
        log_level="info",
    )
    clients = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        _, connack = connected(clients, "v5-cap", SessionExpiryInterval=3600)
        assert connack["SessionExpiryInterval"] == 60
        assert client_info(broker, "v5-cap")["session_expiry_interval"] == 60
    finally:
        clients.close_all()


def test_message_expiry_on_queued_messages(v5: V5Clients) -> None:
    sleeper, _ = connected(v5, "v5-sleeper", SessionExpiryInterval=60)
    sleeper.subscribe("exp/#", 1)
    sleeper.close()
    publisher, _ = connected(v5, "v5-exp-pub")
    published = time.monotonic()
    publisher.publish("exp/short", b"gone", MessageExpiryInterval=1)
    publisher.publish("exp/long", b"kept", MessageExpiryInterval=100)
    wait_until(lambda: time.monotonic() - published > 1.2, what="the short expiry to pass")
    back = v5.connect("v5-sleeper", clean_start=False, SessionExpiryInterval=60)
    assert v5.connack(back)[:2] == (0, True)
    got = back.expect()
    assert got.payload == b"kept"
    assert 95 <= got.properties["MessageExpiryInterval"] <= 99  # what is left of it
    back.expect_nothing()
    samples = metric_samples(v5.route.broker)
    assert samples[("realip_messages_dropped_total", (("reason", "expired"),))] == 1


def test_will_delay_cancelled_by_a_reconnect_and_published_after_it(v5: V5Clients) -> None:
    watcher, _ = connected(v5, "v5-watcher")
    watcher.subscribe("will/#", 1)
    delayed = props(PacketTypes.WILLMESSAGE, WillDelayInterval=1, ContentType="text/plain")
    first, _ = connected(v5, "v5-willer", will=("will/a", b"late", delayed), SessionExpiryInterval=60)
    dropped_at = time.monotonic()
    first.client.socket().close()  # abnormal end: the will waits for its delay
    comeback = v5.connect("v5-willer", clean_start=False, SessionExpiryInterval=60)
    assert v5.connack(comeback)[:2] == (0, True)
    watcher.expect_nothing(within=1.5)  # past the delay: the reconnect cancelled it
    assert time.monotonic() - dropped_at > 1.0
    comeback.close()
    second, _ = connected(v5, "v5-willer2", will=("will/b", b"late", delayed), SessionExpiryInterval=60)
    dropped_at = time.monotonic()
    second.client.socket().close()
    got = watcher.expect()
    assert (got.topic, got.payload) == ("will/b", b"late")
    assert got.properties["ContentType"] == "text/plain"
    assert time.monotonic() - dropped_at >= 0.9  # not before its delay


def test_subscription_options(v5: V5Clients) -> None:
    client, _ = connected(v5, "v5-opts")
    client.publish("opt/retained", b"r", retain=True)
    assert client.subscribe("opt/#", 1, noLocal=True) == [1]
    got = client.expect()  # the retained one comes (Retain Handling 0)
    assert (got.payload, got.retain) == (b"r", True)
    client.publish("opt/own", b"mine")  # No Local: not back to its publisher
    other, _ = connected(v5, "v5-opts-other")
    other.publish("opt/other", b"theirs", retain=True)
    got = client.expect()
    assert (got.payload, got.retain) == (b"theirs", False)  # RETAIN=0 without Retain As Published
    client.expect_nothing()
    # Retain As Published keeps the flag; Retain Handling 1 sends retained only for a new one,
    # 2 never.
    assert client.subscribe("opt/other", 1, retainAsPublished=True, retainHandling=1) == [1]
    assert client.expect().retain is True  # new subscription: the retained message
    assert client.subscribe("opt/other", 1, retainAsPublished=True, retainHandling=1) == [1]
    client.expect_nothing()  # not new: none
    assert client.subscribe("opt/retained", 1, retainHandling=2) == [1]
    client.expect_nothing()
    other.publish("opt/other", b"again", retain=True)
    got = client.expect()  # one copy for its two matching subscriptions, RETAIN kept by one of them
    assert (got.payload, got.retain) == (b"again", True)
    client.expect_nothing()


def test_topic_aliases_from_the_client(v5: V5Clients, route: Route) -> None:
    watcher, _ = connected(v5, "v5-alias-watch")
    watcher.subscribe("alias/#", 0)
    client, _ = connected(v5, "v5-alias")
    client.publish("alias/long/topic", b"1", qos=0, TopicAlias=3)
    client.publish("", b"2", qos=0, TopicAlias=3)
    assert [watcher.expect().topic, watcher.expect().topic] == ["alias/long/topic"] * 2
    bad, _ = connected(v5, "v5-alias-bad")
    bad.publish("", b"x", qos=0, TopicAlias=9)  # never set: protocol error
    assert bad.disconnects.get(timeout=WAIT) == 0x82


def test_server_disconnect_reasons(v5: V5Clients, route: Route) -> None:
    first, _ = connected(v5, "v5-twin")
    second = v5.connect("v5-twin")
    assert v5.connack(second)[0] == 0
    assert first.disconnects.get(timeout=WAIT) == 0x8E  # session taken over
    assert ctl(route.broker, "clients", "kick", "v5-twin").returncode == 0
    assert second.disconnects.get(timeout=WAIT) == 0x98  # administrative action


def test_keepalive_timeout_is_said(v5: V5Clients) -> None:
    client, _ = connected(v5, "v5-silent", keepalive=1)
    client.client.loop_stop()  # stop sending PINGREQ: silent from here
    sock = client.client.socket()
    sock = getattr(sock, "_socket", sock)  # paho wraps WebSocket transports
    sock.settimeout(WAIT)
    data = b""  # on WebSocket the DISCONNECT comes inside a binary frame
    while b"\xe0" not in data or len(data) < data.index(b"\xe0") + 3:
        chunk = sock.recv(16)
        assert chunk, f"closed without a DISCONNECT: {data!r}"
        data += chunk
    assert data[data.index(b"\xe0") + 2] == 0x8D  # DISCONNECT, keep alive timeout


def test_refusals_say_why_with_the_real_address(v5: V5Clients, route: Route) -> None:
    assert ctl(route.broker, "banned", "add", "clientid", "v5-banned").returncode == 0
    refused = v5.connect("v5-banned", source="127.0.0.44")
    rc, _, properties = v5.connack(refused)
    assert rc == 0x8A  # banned
    assert "127.0.0.44" in properties["ReasonString"]
    quiet = v5.connect("v5-banned", source="127.0.0.44", RequestProblemInformation=0)
    rc, _, properties = v5.connack(quiet)
    assert rc == 0x8A and "ReasonString" not in properties


def test_unknown_authentication_method(v5: V5Clients) -> None:
    client = v5.connect("v5-auth", AuthenticationMethod="SCRAM-SHA-1")
    assert v5.connack(client)[0] == 0x8C


def test_assigned_client_identifier(v5: V5Clients) -> None:
    _, connack = connected(v5, "")
    assigned = connack["AssignedClientIdentifier"]
    assert assigned.startswith("auto-")
    assert client_info(v5.route.broker, assigned)["proto_ver"] == 5


def raw_v5_subscriber(port: int, client_id: str, connect_props: bytes, topic: str, qos: int) -> socket.socket:
    """A hand-made MQTT 5 client (CONNECT with ``connect_props``, one SUBSCRIBE), for what paho
    hides: the packets as they arrive."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(packet(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c" + connect_props + string(client_id)))
    assert read_packet(sock)[0] == 0x20
    sock.sendall(packet(0x82, b"\x00\x01\x00" + string(topic) + bytes([qos])))
    assert read_packet(sock)[0] == 0x90
    return sock


def test_receive_maximum_of_the_client_bounds_our_in_flight(broker: BrokerProcess) -> None:
    """[MQTT-3.3.4-9] no more unacknowledged QoS 1 deliveries than the client's Receive Maximum."""
    port = broker.port("tcp:default")
    # Receive Maximum 2
    with raw_v5_subscriber(port, "v5-rm", b"\x03\x21\x00\x02", "rm/t", 1) as sock:
        publisher = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        publisher.sendall(packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c" + string("v3-rm-pub")))
        assert recv_exactly(publisher, 4) == b"\x20\x02\x00\x00"
        for index in range(5):  # QoS 1, packet ids 1..5
            publisher.sendall(packet(0x32, string("rm/t") + (index + 1).to_bytes(2, "big") + b"m"))
        ids = []
        for _ in range(2):
            kind, body = read_packet(sock)
            assert kind == 0x32
            ids.append(body[6:8])
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            read_packet(sock)  # a third would exceed Receive Maximum 2
        sock.settimeout(WAIT)
        sock.sendall(b"\x40\x02" + ids[0])  # PUBACK one: one more comes
        assert read_packet(sock)[0] == 0x32
        publisher.close()


def test_maximum_packet_size_of_the_client(broker: BrokerProcess, clients: Clients) -> None:
    """A delivery larger than the client's Maximum Packet Size is dropped and counted, never sent."""
    port = broker.port("tcp:default")
    # Maximum Packet Size 64
    with raw_v5_subscriber(port, "v5-small", b"\x05\x27\x00\x00\x00\x40", "mps/t", 0) as sock:
        publisher = clients.new("mps-pub").connect("127.0.0.1", port)
        publisher.publish("mps/t", b"b" * 200, qos=1)
        publisher.publish("mps/t", b"small", qos=1)
        kind, body = read_packet(sock)
        assert (kind, body[-5:]) == (0x30, b"small")
    assert metric_samples(broker)[("realip_messages_dropped_total", (("reason", "too_large"),))] == 1


def test_our_maximum_packet_size_is_enforced_with_0x95(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"max_packet_size": "1KB"}), log_level="info"
    )
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(packet(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + string("v5-big")))
        assert read_packet(sock)[0] == 0x20
        sock.sendall(b"\x30" + varint(5000) + b"\x00\x01t")
        kind, body = read_packet(sock)
        assert (kind, body[0]) == (0xE0, 0x95)  # DISCONNECT, packet too large
        wait_closed(sock)


def test_what_mosquitto_pub_v5_sends_is_served(broker: BrokerProcess) -> None:
    """amqtt hung 15 s on `mosquitto_pub -V mqttv5` and then logged "sent no CONNECT"."""
    sub = require_binary("mosquitto_sub")
    pub = require_binary("mosquitto_pub")
    port = str(broker.port("tcp:default"))
    listener = subprocess.Popen(
        [
            sub,
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-A",
            "127.0.0.45",
            "-t",
            "m5/#",
            "-C",
            "1",
            "-v",
            "-i",
            "m5-sub",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: ctl(broker, "clients", "show", "m5-sub").returncode == 0, what="mosquitto_sub")
        assert client_info(broker, "m5-sub")["ip_address"] == "127.0.0.45"
        assert client_info(broker, "m5-sub")["proto_ver"] == 5
        subprocess.run(
            [
                pub,
                "-V",
                "mqttv5",
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-t",
                "m5/x",
                "-m",
                "hi",
                "-q",
                "1",
                "-D",
                "publish",
                "user-property",
                "a",
                "b",
            ],
            check=True,
            timeout=WAIT,
        )
        out, _ = listener.communicate(timeout=WAIT)
        assert out.strip() == "m5/x hi"
    finally:
        listener.kill()


def test_shared_subscriptions_one_delivery_per_group(v5: V5Clients, route: Route, clients: Clients) -> None:
    """$share/{name}/{filter} for MQTT 5 and 3.1.1 members alike: each message to one member of each
    group (round robin), every message to a plain subscriber, no retained message to a share."""
    publisher, _ = connected(v5, "share-pub")
    publisher.publish("jobs/old", b"retained", retain=True)
    modern, _ = connected(v5, "share-v5")
    assert modern.subscribe("$share/workers/jobs/#", 1) == [1]
    old = clients.new("share-v3").connect("127.0.0.1", route.broker.port("tcp:default"))
    assert old.subscribe("$share/workers/jobs/#", 1) == [1]
    other_group, _ = connected(v5, "share-audit")
    assert other_group.subscribe("$share/audit/jobs/+", 1) == [1]
    plain, _ = connected(v5, "share-plain")
    assert plain.subscribe("jobs/#", 1) == [1]
    assert plain.expect().payload == b"retained"  # the plain one gets the retained message...
    for index in range(6):
        assert publisher.publish(f"jobs/{index}", str(index).encode()) == 0
    got_plain = sorted(plain.expect().payload for _ in range(6))
    assert got_plain == [str(i).encode() for i in range(6)]
    audit = sorted(other_group.expect().payload for _ in range(6))
    assert audit == [str(i).encode() for i in range(6)]  # the only member of its group: all
    first = [modern.expect().payload for _ in range(3)]
    second = [old.expect().payload for _ in range(3)]
    assert sorted(first + second) == [str(i).encode() for i in range(6)]  # each once, split evenly
    modern.expect_nothing()  # ...a share does not (MQTT 5 4.8.2)
    old.expect_nothing()
    assert modern.subscribe("$share/workers/jobs/#", 1) == [1]  # re-subscribing: still no retained
    modern.expect_nothing()


def test_shared_subscription_strategy_is_validated(tmp_path: Path) -> None:
    from broker.errors import ConfigError
    from broker.settings import load_settings

    with pytest.raises(
        ConfigError, match=r"mqtt.shared_subscription_strategy: 'fastest' is not one of round_robin"
    ):
        load_settings({"mqtt": {"shared_subscription_strategy": "fastest"}})


def test_outbound_topic_aliases_when_the_client_allows_them(broker: BrokerProcess, clients: Clients) -> None:
    """A topic sent again goes as its alias alone (MQTT 5 3.3.2.3.4)."""
    port = broker.port("tcp:default")
    # Topic Alias Maximum 5
    with raw_v5_subscriber(port, "v5-aliased", b"\x03\x22\x00\x05", "long/topic/name", 0) as sock:
        publisher = clients.new("alias-pub").connect("127.0.0.1", port)
        publisher.publish("long/topic/name", b"one", qos=1)
        publisher.publish("long/topic/name", b"two", qos=1)
        _, first = read_packet(sock)
        _, second = read_packet(sock)
    # (The properties also carry the publisher's address: publisher_address_property is set.)
    topic = string("long/topic/name")
    assert first.startswith(topic) and b"\x23\x00\x01" in first and first.endswith(b"one")  # topic, alias 1
    assert (
        second.startswith(string("")) and b"\x23\x00\x01" in second and second.endswith(b"two")
    )  # alias alone


def mqttjs() -> str:
    """MQTT.js's command line (scripts/install-peers.sh puts it in .peers/)."""
    path = REPO / ".peers" / "mqttjs" / "node_modules" / ".bin" / "mqtt"
    if not path.exists():
        require_binary(str(path))  # skips, or fails under REQUIRE_E2E=1, with the install hint
    return str(path)


def test_mqttjs_v5_subscriber_and_publisher(route: Route) -> None:
    """MQTT.js with protocolVersion 5 (another stack's MQTT 5 client) publishes and subscribes through each route."""
    cli = mqttjs()
    transport = ["-l", "ws", "--path", "/mqtt"] if route.websocket else []
    # The CLI hands unknown options to mqtt.connect(): --protocolVersion 5 is MQTT 5.
    common = ["-h", "127.0.0.1", "-p", str(route.port), "--protocolVersion", "5", *transport]
    listener = subprocess.Popen(
        [cli, "sub", *common, "-t", "js/#", "-q", "1", "-i", "js-sub", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: ctl(route.broker, "clients", "show", "js-sub").returncode == 0, what="MQTT.js")
        info = client_info(route.broker, "js-sub")
        assert (info["proto_ver"], info["proxy_address"]) == (5, route.proxy)
        subprocess.run(
            [cli, "pub", *common, "-t", "js/x", "-m", "from mqtt.js", "-q", "1", "-i", "js-pub"],
            check=True,
            timeout=WAIT,
            capture_output=True,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "js/x from mqtt.js"
    finally:
        listener.kill()
        listener.wait()


def test_server_keepalive_and_response_information(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()},
            mqtt={"server_keepalive": 20, "response_information": "replies/"},
        ),
        log_level="info",
    )
    made = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        _, connack = connected(made, "v5-ka", keepalive=300, RequestResponseInformation=1)
        assert connack["ServerKeepAlive"] == 20
        assert connack["ResponseInformation"] == "replies/"
        assert client_info(broker, "v5-ka")["keepalive"] == 20  # the broker's value is the one enforced
        _, connack = connected(made, "v5-no-ask")
        assert "ResponseInformation" not in connack  # only when asked
    finally:
        made.close_all()


def test_suback_and_unsuback_reason_codes(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()},
            mqtt={"max_subscriptions": 2, "max_topic_levels": 4},
            authorization={
                "no_match": "allow",
                "rules": [{"permission": "deny", "action": "subscribe", "topics": ["no/#"]}],
            },
        ),
        log_level="info",
    )
    made = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        client, _ = connected(made, "v5-suback")
        assert client.subscribe("no/x", 1) == [0x87]  # not authorized
        assert client.subscribe("a/b/c/d/e", 1) == [0x8F]  # deeper than max_topic_levels
        assert client.subscribe("ok/1", 2) == [2]
        assert client.subscribe("ok/2", 0) == [0]
        assert client.subscribe("ok/3", 1) == [0x97]  # quota exceeded (max_subscriptions)
        unsubacks: queue.Queue[list[int]] = queue.Queue()
        client.client.on_unsubscribe = lambda c, u, mid, rcs, p: unsubacks.put([r.value for r in rcs])
        client.client.unsubscribe(["ok/1", "never"])
        assert unsubacks.get(timeout=WAIT) == [0x00, 0x11]  # no subscription existed
    finally:
        made.close_all()


def test_disconnect_can_change_the_session_expiry(v5: V5Clients) -> None:
    client, _ = connected(v5, "v5-change", SessionExpiryInterval=60)
    client.subscribe("chg/t", 1)
    client.client.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    client.disconnects.get(timeout=WAIT)
    again = v5.connect("v5-change", clean_start=False)
    assert v5.connack(again)[:2] == (0, False)  # the DISCONNECT ended the session
    zero, _ = connected(v5, "v5-zero")  # session expiry 0 at CONNECT...
    zero.client.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=30))
    assert zero.disconnects.get(timeout=WAIT) in (0x82, 0)  # ...may not become non-zero [MQTT-3.14.2-2]
    v5.route.broker.wait_for_log(r"set a session expiry at DISCONNECT after 0 \[MQTT-3.14.2-2\]; closing")


def test_receive_maximum_we_announce_is_enforced(broker: BrokerProcess) -> None:
    """Ours is mqtt.max_inflight (8 here): a 9th QoS 2 PUBLISH awaiting PUBREL gets DISCONNECT 0x93."""
    with raw_v5_subscriber(broker.port("tcp:default"), "v5-flood", b"\x00", "unused", 0) as sock:
        for packet_id in range(1, 9):
            sock.sendall(packet(0x34, string("q2") + packet_id.to_bytes(2, "big") + b"\x00" + b"x"))
            assert read_packet(sock)[0] == 0x50  # PUBREC
        sock.sendall(packet(0x34, string("q2") + (9).to_bytes(2, "big") + b"\x00" + b"x"))
        kind, body = read_packet(sock)
        assert (kind, body[0]) == (0xE0, 0x93)


def test_topic_alias_above_our_maximum_is_0x94(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"max_topic_alias": 4}), log_level="info"
    )
    made = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        client, connack = connected(made, "v5-alias-max")
        assert connack["TopicAliasMaximum"] == 4
        client.publish("t", b"x", qos=0, TopicAlias=5)
        assert client.disconnects.get(timeout=WAIT) == 0x94
    finally:
        made.close_all()


def test_shutdown_says_0x8b_and_retained_messages_expire(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, audit={"file": "audit.log"}), log_level="info"
    )
    made = V5Clients(Route(broker, broker.port("tcp:default")))
    try:
        client, _ = connected(made, "v5-shut")
        published = time.monotonic()
        client.publish("ret/short", b"soon gone", retain=True, MessageExpiryInterval=1)
        client.publish("ret/long", b"stays", retain=True, MessageExpiryInterval=100)
        wait_until(lambda: time.monotonic() - published > 1.2, what="the short expiry to pass")
        assert client.subscribe("ret/#", 1) == [1]
        got = client.expect()
        assert got.payload == b"stays" and got.retain
        client.expect_nothing()
        assert broker.stop() == 0
        assert client.disconnects.get(timeout=WAIT) == 0x8B  # server shutting down
        records = (broker.workdir / "audit.log").read_text()
        assert '"proto_ver":5' in records  # the audit log carries the protocol level
    finally:
        made.close_all()


@pytest.mark.parametrize(("moved", "code"), [(False, 0x9C), (True, 0x9D)])
def test_shutdown_can_send_clients_to_another_server(
    start_broker: BrokerFactory, moved: bool, code: int
) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()},
            mqtt={"server_reference": "mqtt2.example:1883", "server_moved": moved},
        ),
        log_level="info",
    )
    with raw_v5_subscriber(broker.port("tcp:default"), "v5-redirect", b"\x00", "t", 0) as sock:
        assert broker.stop() == 0
        kind, body = read_packet(sock)
    assert (kind, body[0]) == (0xE0, code)
    assert b"\x1c" + string("mqtt2.example:1883") in body  # Server Reference property
