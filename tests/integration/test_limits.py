"""Every ``mqtt.*`` limit, and every attack that grew amqtt's memory or stalled it, against the real
broker process: the bound holds, the drop is counted (``/metrics``, ``ctl clients show``), and
clients that have nothing to do with it are not disturbed.

Bounds are asserted by the broker's own counts (queue lengths, drop counters), never by timing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest

from tests.mqtt_raw import connect, packet, publish, read_packet, recv_exactly, string, subscribe, wait_closed
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    listener_config,
    metric_samples,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]

LIMITS = {
    "max_inflight": 4,
    "max_mqueue_len": 10,
    "max_awaiting_rel": 5,
    "max_subscriptions": 3,
    "max_topic_levels": 8,
    "max_clientid_len": 30,
    "max_retained_messages": 20,
}


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    return start_broker(broker_config(tcp={"default": listener_config()}, mqtt=LIMITS), log_level="info")


def raw_client(
    broker: BrokerProcess, client_id: str, *, clean: bool = True, rcvbuf: int = 0
) -> socket.socket:
    """A connected raw 3.1.1 client (CONNACK read)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", broker.port("tcp:default")))
    sock.sendall(connect(client_id, clean=clean))
    connack = recv_exactly(sock, 4)
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack
    return sock


def dropped(broker: BrokerProcess, reason: str) -> float:
    return metric_samples(broker).get(("realip_messages_dropped_total", (("reason", reason),)), 0.0)


def test_a_subscriber_that_never_acknowledges_holds_a_window_and_a_bounded_queue(
    broker: BrokerProcess, clients: Clients
) -> None:
    """amqtt kept every later delivery, for every client, behind one unacknowledged QoS 1."""
    stuck = raw_client(broker, "stuck")
    stuck.sendall(subscribe(1, ("load/#", 1)))
    assert read_packet(stuck) == (0x90, b"\x00\x01\x01")
    bystander = clients.new("bystander").connect("127.0.0.1", broker.port("tcp:default"))
    bystander.subscribe("other/#", 1)
    publisher = clients.new("publisher").connect("127.0.0.1", broker.port("tcp:default"))
    for index in range(200):
        publisher.publish("load/x", str(index), qos=1)
    publisher.publish("other/x", b"still served", qos=1)
    assert bystander.expect().payload == b"still served"
    info = wait_until(lambda: (i := client_info(broker, "stuck"))["dropped"] and i, what="drops")
    assert (info["inflight"], info["mqueue_len"]) == (4, 10)
    assert info["dropped"] == {"queue_full": 200 - 4 - 10}
    assert dropped(broker, "queue_full") == 186
    # What it holds are the first four (in flight, never acknowledged) and the newest ten.
    ids = []
    for _ in range(4):
        first, body = read_packet(stuck)
        assert first == 0x32
        ids.append(int.from_bytes(body[8:10], "big"))
        assert body[10:] == str(len(ids) - 1).encode()
    assert ids == [1, 2, 3, 4]
    stuck.sendall(b"\x40\x02\x00\x01")  # one PUBACK frees one slot: the oldest queued goes out
    first, body = read_packet(stuck)
    assert body[10:] == b"190"
    stuck.close()


def test_an_offline_session_queues_a_bounded_number_and_resumes_with_distinct_ids(
    broker: BrokerProcess, clients: Clients
) -> None:
    sleeper = clients.new("sleeper", clean_session=False).connect("127.0.0.1", broker.port("tcp:default"))
    sleeper.subscribe("news/#", 1)
    sleeper.close()
    publisher = clients.new("newsroom").connect("127.0.0.1", broker.port("tcp:default"))
    for index in range(50):
        publisher.publish("news/x", str(index), qos=1)
    wait_until(lambda: dropped(broker, "queue_full") == 40, what="40 offline drops")
    back = clients.new("sleeper", clean_session=False).connect("127.0.0.1", broker.port("tcp:default"))
    assert back.session_present
    payloads = [back.expect().payload for _ in range(10)]
    assert payloads == [str(i).encode() for i in range(40, 50)]  # the newest survive (EMQX's rule)
    back.expect_nothing()


def test_packet_ids_do_not_run_out_across_a_long_offline_queue(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    """amqtt dropped 134,465 of 200,000 acknowledged messages on resume when packet ids ran out."""
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"max_mqueue_len": "infinity"}),
        log_level="info",
    )
    port = broker.port("tcp:default")
    sleeper = clients.new("long-sleeper", clean_session=False).connect("127.0.0.1", port)
    sleeper.subscribe("bulk", 1)
    sleeper.close()
    total = 70_000  # more than the 65,535 packet ids
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(connect("bulk-publisher"))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        sock.sendall(b"".join(publish("bulk", index.to_bytes(4, "big")) for index in range(total)))
        sock.sendall(b"\xe0\x00")  # DISCONNECT after everything
        wait_closed(sock)
    received: list[int] = []
    done = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received.append(int.from_bytes(message.payload, "big"))
        if len(received) == total:
            done.set()

    back = clients.new("long-sleeper", clean_session=False)
    back.client.on_message = on_message
    back.connect("127.0.0.1", port)
    assert done.wait(60), f"{len(received)} of {total} delivered"
    assert received == list(range(total))
    assert dropped(broker, "queue_full") == 0


def test_a_subscriber_that_stops_reading_slows_nobody(broker: BrokerProcess) -> None:
    """amqtt buffered 556 MiB for one subscriber that stopped reading; here its transport pauses,
    its queue fills to max_mqueue_len, the rest is dropped and counted, and a subscriber that
    keeps up gets every message while the publisher is never held up."""
    deaf = raw_client(broker, "deaf", rcvbuf=4096)
    deaf.sendall(subscribe(1, ("flood", 0)))
    assert read_packet(deaf)[0] == 0x90
    reader = raw_client(broker, "reader")
    reader.sendall(subscribe(1, ("flood", 0)))
    assert read_packet(reader)[0] == 0x90
    one = publish("flood", b"x" * 1024)
    batch, batches = 500, 40  # 20 MB in all: more than the kernel's socket buffers can hide
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("flooder"))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        for _ in range(batches):  # in step with the reader, so that only the deaf one overflows
            sock.sendall(one * batch)
            assert recv_exactly(reader, batch * len(one)) == one * batch
        sock.sendall(b"\xe0\x00")
        wait_closed(sock)
    info = client_info(broker, "deaf")
    assert info["mqueue_len"] == 10
    assert info["dropped"]["queue_full"] > batch * batches // 2
    assert dropped(broker, "queue_full") == info["dropped"]["queue_full"]
    assert client_info(broker, "reader")["dropped"] == {}
    deaf.close()
    reader.close()


def test_unreleased_incoming_qos2_is_bounded_by_max_awaiting_rel(
    broker: BrokerProcess, clients: Clients
) -> None:
    """amqtt kept 1,000 unreleased 1 MB QoS 2 messages (+955 MiB); here only their ids are held, and
    one more than max_awaiting_rel closes the connection."""
    sock = raw_client(broker, "hoarder")
    big = b"y" * 200_000
    for packet_id in range(1, 6):
        sock.sendall(publish("hoard", big, qos=2, packet_id=packet_id))
        assert read_packet(sock) == (0x50, packet_id.to_bytes(2, "big"))  # PUBREC
    sock.sendall(publish("hoard", big, qos=2, packet_id=6))
    wait_closed(sock)
    broker.wait_for_log(
        r"client 'hoarder' .* has 5 QoS 2 messages awaiting PUBREL \(mqtt.max_awaiting_rel\); closing"
    )
    clients.new("fine").connect("127.0.0.1", broker.port("tcp:default"))


def test_a_client_that_does_not_read_its_answers_is_no_longer_read(broker: BrokerProcess) -> None:
    """amqtt buffered 330 MiB of PINGRESPs for a client sending PINGREQs without reading; here its
    reading pauses once its own output is paused, so its sends stall instead."""
    sock = raw_client(broker, "pinger", rcvbuf=4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.settimeout(2.0)
    sent = 0
    with pytest.raises(TimeoutError):
        for _ in range(10_000):
            sock.sendall(b"\xc0\x00" * 10_000)
            sent += 20_000
    assert sent < 50_000_000  # the broker stopped reading long before 50 MB
    sock.close()


def test_subscription_limits(broker: BrokerProcess, clients: Clients) -> None:
    client = clients.new("subs").connect("127.0.0.1", broker.port("tcp:default"))
    assert client.subscribe("a/1", 1) == [1]
    assert client.subscribe("a/2", 1) == [1]
    assert client.subscribe("a/3", 1) == [1]
    assert client.subscribe("a/4", 1) == [128]  # max_subscriptions 3
    assert client.subscribe("a/1", 0) == [0]  # replacing one is not a new one
    assert client.subscribe("/".join("l" * 9), 0) == [128]  # max_topic_levels 8
    samples = metric_samples(broker)
    assert samples[("realip_subscriptions_refused_total", (("reason", "mqtt.max_subscriptions"),))] == 1
    assert samples[("realip_subscriptions_refused_total", (("reason", "max_topic_levels"),))] == 1


def test_publish_to_a_too_deep_topic_is_dropped(broker: BrokerProcess, clients: Clients) -> None:
    client = clients.new("deep").connect("127.0.0.1", broker.port("tcp:default"))
    client.subscribe("#", 0)
    client.publish("/".join("l" * 9), b"deep", qos=1)
    client.publish("shallow", b"ok", qos=1)
    assert client.expect().payload == b"ok"
    assert dropped(broker, "topic_levels") == 1


def test_a_too_long_client_id_is_refused(broker: BrokerProcess) -> None:
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("x" * 31))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x02"  # identifier rejected
        wait_closed(sock)
    assert metric_samples(broker)[("realip_connects_refused_total", (("reason", "client_id"),))] == 1


def test_retained_messages_are_bounded(broker: BrokerProcess, clients: Clients) -> None:
    client = clients.new("retainer").connect("127.0.0.1", broker.port("tcp:default"))
    for index in range(25):
        client.publish(f"r/{index}", b"kept", qos=1, retain=True)
    client.publish("r/0", b"replaced", qos=1, retain=True)  # an existing topic may still change
    assert dropped(broker, "retained_full") == 5
    assert metric_samples(broker)[("realip_retained", ())] == 20
    reader = clients.new("reader").connect("127.0.0.1", broker.port("tcp:default"))
    reader.subscribe("r/0", 0)
    assert reader.expect().payload == b"replaced"


def test_session_expiry_and_await_rel_timeout(start_broker: BrokerFactory, clients: Clients) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()},
            mqtt={"session_expiry_interval": "300ms", "await_rel_timeout": "200ms", "max_awaiting_rel": 1},
        ),
        log_level="info",
    )
    port = broker.port("tcp:default")
    releaser = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    releaser.sendall(connect("slow-releaser"))
    assert recv_exactly(releaser, 4) == b"\x20\x02\x00\x00"
    releaser.sendall(publish("q2", b"a", qos=2, packet_id=1))
    assert read_packet(releaser) == (0x50, b"\x00\x01")  # PUBREC; no PUBREL follows
    first = clients.new("expiring", clean_session=False).connect("127.0.0.1", port)
    first.subscribe("e/#", 1)
    first.close()
    broker.wait_for_log(r"session of client 'expiring' expired \(session expiry interval 0.3s\)")
    again = clients.new("expiring", clean_session=False).connect("127.0.0.1", port)
    assert not again.session_present
    # More than await_rel_timeout has passed since id 1 arrived (the expiry above took 300 ms):
    # it was forgotten, so its slot (max_awaiting_rel 1) takes another.
    releaser.sendall(publish("q2", b"b", qos=2, packet_id=2))
    assert read_packet(releaser) == (0x50, b"\x00\x02")
    releaser.close()


def test_qos0_for_offline_sessions_can_be_refused(start_broker: BrokerFactory, clients: Clients) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"mqueue_store_qos0": False}), log_level="info"
    )
    port = broker.port("tcp:default")
    sleeper = clients.new("q0-sleeper", clean_session=False).connect("127.0.0.1", port)
    sleeper.subscribe("t", 1)
    sleeper.close()
    publisher = clients.new("q0-pub").connect("127.0.0.1", port)
    publisher.publish("t", b"qos0", qos=0)
    publisher.publish("t", b"qos1", qos=1)
    wait_until(lambda: dropped(broker, "qos0_offline") == 1, what="the QoS 0 drop")
    back = clients.new("q0-sleeper", clean_session=False).connect("127.0.0.1", port)
    assert back.expect().payload == b"qos1"
    back.expect_nothing()


@pytest.mark.parametrize(("upgrade", "expected"), [(False, 0), (True, 1)])
def test_upgrade_qos(start_broker: BrokerFactory, clients: Clients, upgrade: bool, expected: int) -> None:
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, mqtt={"upgrade_qos": upgrade}), log_level="info"
    )
    client = clients.new("up").connect("127.0.0.1", broker.port("tcp:default"))
    client.subscribe("u", 1)
    client.publish("u", b"x", qos=0)
    assert client.expect().qos == expected


def test_retained_messages_for_a_wide_subscription_do_not_stall_others(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    """amqtt stalled every client for 8.9 s while one SUBSCRIBE scanned 100k retained messages."""
    broker = start_broker(broker_config(tcp={"default": listener_config()}), log_level="info")
    port = broker.port("tcp:default")
    count = 20_000
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(connect("loader"))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        sock.sendall(b"".join(publish(f"ret/{i}", b"r" * 100, retain=True) for i in range(count)))
        sock.sendall(b"\xe0\x00")
        wait_closed(sock)
    wait_until(lambda: metric_samples(broker)[("realip_retained", ())] == count, what="retained stored")
    greedy = raw_client(broker, "greedy", rcvbuf=4096)  # subscribes to everything and reads slowly
    greedy.sendall(subscribe(1, ("#", 0)))
    other = clients.new("other").connect("127.0.0.1", port)
    other.subscribe("live", 0)
    other.publish("live", b"served meanwhile")
    assert other.expect().payload == b"served meanwhile"
    # Then the greedy one still gets all of them, paced by its own reading.
    assert read_packet(greedy)[0] == 0x90
    retained = 0
    while retained < count:
        first, body = read_packet(greedy)
        if first == 0x30:  # the live message, interleaved
            assert body.endswith(b"served meanwhile")
            continue
        assert first == 0x31  # PUBLISH, RETAIN=1 [MQTT-3.3.1-8]
        retained += 1
    greedy.close()


# -------------------------------------------------------------------------------- parsing


def test_a_huge_subscribe_is_refused_from_its_fixed_header(broker: BrokerProcess, clients: Clients) -> None:
    """amqtt accepted a 12 MB SUBSCRIBE; max_packet_size counts every packet type."""
    sock = raw_client(broker, "huge-sub")
    body = b"\x00\x01" + b"".join(string(f"t/{i}") + b"\x00" for i in range(400_000))
    sock.sendall(packet(0x82, body)[:10])
    wait_closed(sock)
    broker.wait_for_log(
        r"client 'huge-sub' .*SUBSCRIBE of \d+ bytes exceeds the maximum packet size of 1048576"
    )
    clients.new("after").connect("127.0.0.1", broker.port("tcp:default"))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("qos 3 [MQTT-3.3.1-4]", packet(0x36, string("t") + b"\x00\x01x")),
        ("wildcard topic [MQTT-3.3.2-2]", publish("a/+", b"x")),
        ("invalid UTF-8 [MQTT-1.5.3-1]", publish(b"bad/\xff", b"x")),
        ("U+0000 [MQTT-1.5.3-2]", publish(b"bad/\x00", b"x")),
        ("packet id 0 [MQTT-2.3.1-1]", publish("t", b"x", qos=1, packet_id=0)),
        ("SUBSCRIBE flags [MQTT-3.8.1-1]", packet(0x80, b"\x00\x01" + string("t") + b"\x00")),
        ("empty SUBSCRIBE [MQTT-3.8.3-3]", packet(0x82, b"\x00\x01")),
        ("empty UNSUBSCRIBE [MQTT-3.10.3-2]", packet(0xA2, b"\x00\x01")),
        ("second CONNECT [MQTT-3.1.0-2]", connect("again")),
        ("client CONNACK", b"\x20\x02\x00\x00"),
        ("topic length beyond the remaining length", packet(0x30, b"\x00\x09ab")),
    ],
)
def test_a_malformed_packet_closes_the_connection(
    broker: BrokerProcess, clients: Clients, name: str, data: bytes
) -> None:
    """amqtt went on reading a desynchronised stream (a PUBLISH payload parsed as a SUBSCRIBE)."""
    watcher = clients.new("watcher").connect("127.0.0.1", broker.port("tcp:default"))
    watcher.subscribe("#", 0)
    sock = raw_client(broker, "bad")
    sock.sendall(data + publish("after/bad", b"must not be routed"))
    wait_closed(sock)
    watcher.expect_nothing()


def test_a_publish_payload_is_never_parsed_as_packets(broker: BrokerProcess, clients: Clients) -> None:
    sub = clients.new("payload-sub").connect("127.0.0.1", broker.port("tcp:default"))
    sub.subscribe("p", 0)
    sock = raw_client(broker, "payload-pub")
    inner = subscribe(9, ("#", 0))
    sock.sendall(publish("p", inner))
    assert sub.expect().payload == inner
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # no SUBACK: the payload stayed a payload
    sock.close()


def test_mqtt5_connect_is_answered_at_once(broker: BrokerProcess) -> None:
    """amqtt hung 15 s on what `mosquitto_pub -V mqttv5` sends, then logged "sent no CONNECT"."""
    properties = b"\x03\x21\x00\x14"  # Receive Maximum 20
    body = b"\x00\x04MQTT\x05\x02\x00\x3c" + properties + string("v5-client")
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(packet(0x10, body))
        kind, connack = read_packet(sock)
        assert (kind, connack[:2]) == (0x20, b"\x00\x00")  # MQTT 5 CONNACK: accepted
    broker.wait_for_log(r"client 'v5-client' from 127\.0\.0\.1:\d+ connected")
    assert "sent no CONNECT" not in broker.output()


def test_websocket_frames_are_bounded_by_max_packet_size(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    """amqtt's WebSocket listener took 16 MiB frames whatever mqtt.max_packet_size said (40
    half-sent ones held +641 MiB); here a frame announcing more is refused from its header (1009)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    broker = start_broker(
        broker_config(ws={"default": listener_config()}, mqtt={"max_packet_size": "64KB"}), log_level="info"
    )
    url = f"ws://127.0.0.1:{broker.port('ws:default')}/mqtt"
    with ws_connect(url, subprotocols=["mqtt"], max_size=None) as ws:  # type: ignore[list-item]
        ws.send(connect("ws-big"))
        assert ws.recv(timeout=WAIT) == b"\x20\x02\x00\x00"
        ws.send(publish("t", b"z" * 100_000))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # An MQTT packet split over several frames is still one packet, bounded as a whole.
    with ws_connect(url, subprotocols=["mqtt"]) as ws:  # type: ignore[list-item]
        ws.send(connect("ws-split"))
        assert ws.recv(timeout=WAIT) == b"\x20\x02\x00\x00"
        big = publish("t", b"z" * 70_000)
        for offset in range(0, len(big), 30_000):
            ws.send(big[offset : offset + 30_000])
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=WAIT)
    broker.wait_for_log(r"client 'ws-split' .*PUBLISH of \d+ bytes exceeds the maximum packet size of 65536")
