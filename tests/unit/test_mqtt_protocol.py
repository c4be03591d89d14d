"""Tests of :mod:`broker.mqtt.protocol`: bytes in, packets and bytes out, no I/O and no loop.

Invariants the protocol promises, checked throughout:

* :meth:`~MqttServerProtocol.receive_data` never raises, whatever the bytes;
* once the connection must end, ``close_requested`` is True, ``state`` is CLOSING, the answer the
  spec asks for (if any) is the last thing in the outbox, and later data yields nothing;
* the outcome does not depend on how the bytes are split into reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.mqtt import reasons
from broker.mqtt.codec import encode
from broker.mqtt.packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
)
from broker.mqtt.protocol import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    MqttServerProtocol,
    State,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BIG = 1 << 20
V4_ONLY = frozenset({4})
V4_V5 = frozenset({4, 5})

#: ``mosquitto_pub -V mqttv311 -i pub1``.
CONNECT_V4 = bytes.fromhex("101000044d5154540402003c000470756231")
#: ``mosquitto_pub -V mqttv5 -i pub1``: receive_maximum 20.
CONNECT_V5 = bytes.fromhex("101400044d5154540502003c03210014000470756231")
#: ``mosquitto_pub -V mqttv5 -D connect session-expiry-interval 30 -D connect user-property a b``.
CONNECT_V5_PROPERTIES = bytes.fromhex("102000044d5154540502003c0f110000001e26000161000162210014000470756231")
#: ``mosquitto_pub -V mqttv31 -i pub1``: "MQIsdp", level 3.
CONNECT_V31 = bytes.fromhex("101200064d51497364700302003c000470756231")

PUBLISH_V4 = encode(Publish("a/b", b"hello"), 4)
PUBLISH_V5 = encode(Publish("a/b", b"hello"), 5)


def protocol(accept: frozenset[int] = V4_ONLY, max_packet_size: int = BIG) -> MqttServerProtocol:
    return MqttServerProtocol(max_packet_size, accept)


def feed(proto: MqttServerProtocol, *chunks: bytes) -> list[Packet]:
    packets: list[Packet] = []
    for chunk in chunks:
        packets += proto.receive_data(chunk)
    return packets


def sent(proto: MqttServerProtocol) -> bytes:
    return b"".join(proto.data_to_send())


def assert_closed(proto: MqttServerProtocol, answer: bytes, reason: int | None = None) -> None:
    """The connection must end, after exactly ``answer``; further data changes nothing."""
    assert proto.close_requested
    assert proto.state is State.CLOSING
    assert sent(proto) == answer
    if reason is not None:
        assert proto.error is not None
        assert proto.error.reason_code == reason, proto.error
    assert proto.receive_data(PUBLISH_V4 + b"\xc0\x00") == []
    proto.send(Pingresp())
    assert proto.data_to_send() == []


# --------------------------------------------------------------------------------------------------
# The happy path
# --------------------------------------------------------------------------------------------------


def test_connect_then_packets() -> None:
    proto = protocol()
    assert proto.state.name == "AWAITING_CONNECT"
    (connect,) = feed(proto, CONNECT_V4)
    assert isinstance(connect, Connect)
    assert connect.client_id == "pub1"
    assert proto.state is State.CONNECTED
    assert proto.protocol_level == 4
    assert proto.data_to_send() == []
    proto.accept_connect()
    assert sent(proto) == b"\x20\x02\x00\x00"
    assert feed(proto, PUBLISH_V4, b"\xc0\x00", b"\xe0\x00") == [
        Publish("a/b", b"hello"),
        Pingreq(),
        Disconnect(),
    ]
    assert not proto.close_requested
    assert proto.error is None


def test_connect_and_publish_in_one_read() -> None:
    """Clients may send packets before CONNACK arrives (3.1.1 3.1.4): returned in order."""
    proto = protocol()
    packets = feed(proto, CONNECT_V4 + PUBLISH_V4 + b"\xc0\x00")
    assert [type(packet) for packet in packets] == [Connect, Publish, Pingreq]


def test_v5_accepted_encodes_at_v5() -> None:
    proto = protocol(V4_V5)
    (connect,) = feed(proto, CONNECT_V5_PROPERTIES)
    assert isinstance(connect, Connect)
    assert connect.properties == {
        "session_expiry_interval": 30,
        "user_property": [("a", "b")],
        "receive_maximum": 20,
    }
    assert proto.protocol_level == 5
    proto.accept_connect(True, {"topic_alias_maximum": 5})
    assert sent(proto) == b"\x20\x06\x01\x00\x03\x22\x00\x05"
    assert feed(proto, PUBLISH_V5) == [Publish("a/b", b"hello")]
    proto.send(Puback(1, reasons.NO_MATCHING_SUBSCRIBERS))
    assert sent(proto) == b"\x40\x03\x00\x01\x10"


def test_send_raw_and_outbox_order() -> None:
    proto = protocol()
    feed(proto, CONNECT_V4)
    proto.accept_connect()
    proto.send_raw(b"\x30\x05", b"\x00\x01a", b"xy")
    proto.send(Pingresp())
    assert proto.data_to_send() == [b"\x20\x02\x00\x00", b"\x30\x05", b"\x00\x01a", b"xy", b"\xd0\x00"]
    assert proto.data_to_send() == []


def test_receive_eof() -> None:
    proto = protocol()
    feed(proto, CONNECT_V4)
    proto.receive_eof()
    assert proto.state is State.CLOSED
    assert proto.receive_data(PUBLISH_V4) == []
    proto.send(Pingresp())
    assert proto.data_to_send() == []


# --------------------------------------------------------------------------------------------------
# CONNECT rules
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(PUBLISH_V4, id="publish"),
        pytest.param(b"\xc0\x00", id="pingreq"),
        pytest.param(b"\xe0\x00", id="disconnect"),
        pytest.param(encode(Subscribe(1, [Subscription("a", 0)]), 4), id="subscribe"),
        pytest.param(b"\x20\x02\x00\x00", id="connack"),
    ],
)
def test_first_packet_not_connect_MQTT_3_1_0_1(first: bytes) -> None:
    proto = protocol(V4_V5)
    assert feed(proto, first + CONNECT_V4) == []
    assert_closed(proto, b"", reasons.PROTOCOL_ERROR)
    assert proto.error is not None
    assert "[MQTT-3.1.0-1]" in str(proto.error)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"\x00\x00", id="reserved-type-0"),
        pytest.param(b"\xf0\x00", id="auth-at-3.1.1"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-client-hello"),
    ],
)
def test_garbage_first_closes_silently(first: bytes) -> None:
    proto = protocol(V4_V5)
    assert feed(proto, first) == []
    assert_closed(proto, b"", reasons.MALFORMED_PACKET)


def test_second_connect_MQTT_3_1_0_2() -> None:
    proto = protocol()
    packets = feed(proto, CONNECT_V4 + PUBLISH_V4 + CONNECT_V4 + b"\xc0\x00")
    assert [type(packet) for packet in packets] == [Connect, Publish]
    assert_closed(proto, b"", reasons.PROTOCOL_ERROR)
    assert "[MQTT-3.1.0-2]" in str(proto.error)


def test_second_connect_in_later_read() -> None:
    proto = protocol()
    feed(proto, CONNECT_V4)
    proto.accept_connect()
    assert sent(proto) == b"\x20\x02\x00\x00"
    assert feed(proto, PUBLISH_V4 + CONNECT_V4) == [Publish("a/b", b"hello")]
    assert_closed(proto, b"", reasons.PROTOCOL_ERROR)


def test_second_connect_v5_gets_disconnect() -> None:
    proto = protocol(V4_V5)
    feed(proto, CONNECT_V5)
    assert feed(proto, CONNECT_V4) == []
    assert_closed(proto, b"\xe0\x01\x82", reasons.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(Connack(False, 0), id="connack"),
        pytest.param(Suback(1, [0]), id="suback"),
        pytest.param(Unsuback(1), id="unsuback"),
        pytest.param(Pingresp(), id="pingresp"),
    ],
)
def test_client_sends_server_only_packet(packet: Packet) -> None:
    proto = protocol()
    packets = feed(proto, CONNECT_V4 + b"\xc0\x00" + encode(packet, 4) + b"\xc0\x00")
    assert [type(p) for p in packets] == [Connect, Pingreq]
    assert_closed(proto, b"", reasons.PROTOCOL_ERROR)


def test_client_sends_server_only_packet_v5() -> None:
    proto = protocol(V4_V5)
    assert feed(proto, CONNECT_V5)
    assert feed(proto, encode(Suback(1, [0]), 5)) == []
    assert_closed(proto, b"\xe0\x01\x82", reasons.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("connect", "reason"),
    [
        pytest.param(CONNECT_V5, 0x84, id="mosquitto_pub-v5"),
        pytest.param(CONNECT_V5_PROPERTIES, 0x84, id="mosquitto_pub-v5-with-properties"),
        pytest.param(CONNECT_V31, 0x84, id="MQIsdp-level-3"),
        pytest.param(encode(Connect("MQTT", 6, True, 0, "c"), 4), 0x84, id="level-6-MQTT-3.1.2-2"),
        pytest.param(encode(Connect("MQTT", 0x84, True, 0, "c"), 4), 0x84, id="mosquitto-bridge-bit"),
        pytest.param(encode(Connect("MQIsdp", 4, True, 0, "c"), 4), 0x84, id="MQIsdp-level-4"),
        # The level decides, even when the rest of the CONNECT is malformed.
        pytest.param(CONNECT_V5[:9] + b"\x03" + CONNECT_V5[10:], 0x81, id="v5-malformed-reserved-flag"),
    ],
)
def test_unaccepted_level_answered_connack_1(connect: bytes, reason: int) -> None:
    proto = protocol(V4_ONLY)
    assert feed(proto, connect + PUBLISH_V4) == []
    assert_closed(proto, CONNACK_UNACCEPTABLE_PROTOCOL_VERSION, reason)
    assert CONNACK_UNACCEPTABLE_PROTOCOL_VERSION == b"\x20\x02\x00\x01"


def test_unaccepted_level_message_names_the_client() -> None:
    proto = protocol(V4_ONLY)
    feed(proto, CONNECT_V5)
    assert proto.error is not None
    assert "'pub1'" in str(proto.error)
    assert "level 5" in str(proto.error)


def test_level_3_accepted_when_asked() -> None:
    proto = protocol(frozenset({3, 4}))
    (connect,) = feed(proto, CONNECT_V31)
    assert isinstance(connect, Connect)
    assert (connect.proto_name, connect.proto_level) == ("MQIsdp", 3)
    proto.refuse(reasons.BAD_USERNAME_OR_PASSWORD)
    assert sent(proto) == b"\x20\x02\x00\x04"


def test_v4_only_listener_refuses_v5_but_v4_v5_listener_takes_it() -> None:
    proto = protocol(frozenset({5}))
    assert feed(proto, CONNECT_V4) == []
    assert_closed(proto, CONNACK_UNACCEPTABLE_PROTOCOL_VERSION)
    proto = protocol(frozenset({5}))
    assert len(feed(proto, CONNECT_V5)) == 1


@pytest.mark.parametrize(
    ("connect", "answer", "reason"),
    [
        pytest.param(CONNECT_V4[:9] + b"\x03" + CONNECT_V4[10:], b"", 0x81, id="reserved-flag-MQTT-3.1.2-3"),
        pytest.param(CONNECT_V4[:9] + b"\x0a" + CONNECT_V4[10:], b"", 0x81, id="will-qos-MQTT-3.1.2-13"),
        pytest.param(CONNECT_V4[:9] + b"\x42" + CONNECT_V4[10:], b"", 0x81, id="password-flag-MQTT-3.1.2-22"),
        pytest.param(b"\x10\x11" + CONNECT_V4[2:] + b"\x00", b"", 0x81, id="remaining-length-too-long"),
        pytest.param(b"\x10\x0f" + CONNECT_V4[2:-1], b"", 0x81, id="remaining-length-too-short"),
        pytest.param(encode(Connect("MQTX", 4, True, 0, "c"), 4), b"", 0x82, id="protocol-name-MQTT-3.1.2-1"),
        pytest.param(encode(Connect("MQTT", 4, False, 0, ""), 4), CONNACK_IDENTIFIER_REJECTED, 0x85,
                     id="empty-client-id-clean-0-MQTT-3.1.3-8"),
        pytest.param(CONNECT_V4[:1] + b"\xff\xff\xff\x7f", b"", 0x95, id="too-large"),
    ],
)  # fmt: skip
def test_malformed_connect_v4(connect: bytes, answer: bytes, reason: int) -> None:
    proto = protocol(V4_V5, max_packet_size=1024)
    assert feed(proto, connect) == []
    assert_closed(proto, answer, reason)


@pytest.mark.parametrize(
    ("connect", "reason"),
    [
        pytest.param(CONNECT_V5[:9] + b"\x03" + CONNECT_V5[10:], 0x81, id="reserved-flag-MQTT-3.1.2-3"),
        pytest.param(CONNECT_V5[:14] + b"\x00\x00" + CONNECT_V5[16:], 0x82, id="receive-maximum-0"),
        pytest.param(CONNECT_V5[:13] + b"\x01" + CONNECT_V5[14:], 0x81, id="unknown-property"),
        pytest.param(b"\x10\x15" + CONNECT_V5[2:] + b"\x00", 0x81, id="trailing-byte"),
    ],
)
def test_malformed_connect_v5_answered_in_v5(connect: bytes, reason: int) -> None:
    proto = protocol(V4_V5)
    assert feed(proto, connect) == []
    assert_closed(proto, bytes((0x20, 0x03, 0x00, reason, 0x00)), reason)


# --------------------------------------------------------------------------------------------------
# After CONNECT: malformed packets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(b"\x36\x05\x00\x01a\x00\x01", 0x81, id="publish-qos-3-MQTT-3.3.1-4"),
        pytest.param(b"\x30\x03\x00\x01#", 0x90, id="publish-wildcard-MQTT-3.3.2-2"),
        pytest.param(b"\x82\x02\x00\x01", 0x82, id="subscribe-empty-MQTT-3.8.3-3"),
        pytest.param(b"\x62\x02\x00\x00", 0x81, id="pubrel-packet-id-0-MQTT-2.3.1-1"),
        pytest.param(b"\x30\xff\xff\x7f", 0x95, id="too-large"),
    ],
)
def test_malformed_after_connect_v4_closes_silently(bad: bytes, reason: int) -> None:
    proto = protocol(V4_V5, max_packet_size=1024)
    packets = feed(proto, CONNECT_V4 + PUBLISH_V4 + bad + PUBLISH_V4)
    assert [type(packet) for packet in packets] == [Connect, Publish]
    assert_closed(proto, b"", reason)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(b"\x36\x05\x00\x01a\x00\x01", 0x81, id="publish-qos-3-MQTT-3.3.1-4"),
        pytest.param(b"\x30\x04\x00\x01#\x00", 0x90, id="publish-wildcard-MQTT-3.3.2-2"),
        pytest.param(b"\x30\x07\x00\x01a\x03\x23\x00\x00", 0x94, id="topic-alias-0"),
        pytest.param(b"\x30\x03\x00\x01a", 0x81, id="publish-without-property-length"),
        pytest.param(b"\xf1\x00", 0x81, id="auth-flags-MQTT-2.2.2-1"),
        pytest.param(b"\x82\x03\x00\x01\x00", 0x82, id="subscribe-empty-MQTT-3.8.3-3"),
        pytest.param(b"\x82\x08\x00\x01\x00\x00\x02+a\x00", 0x8F, id="subscribe-bad-filter-MQTT-4.7.1-3"),
        pytest.param(b"\x30\xff\xff\x7f", 0x95, id="too-large"),
        pytest.param(b"\x40\x03\x00\x01\x92", 0x82, id="puback-bad-reason-code"),
    ],
)
def test_malformed_after_connect_v5_gets_disconnect(bad: bytes, reason: int) -> None:
    proto = protocol(V4_V5, max_packet_size=1024)
    packets = feed(proto, CONNECT_V5 + PUBLISH_V5 + bad + PUBLISH_V5)
    assert [type(packet) for packet in packets] == [Connect, Publish]
    assert_closed(proto, bytes((0xE0, 0x01, reason)), reason)


def test_v5_disconnect_after_queued_packets() -> None:
    """The DISCONNECT comes after whatever the engine queued before the bad packet arrived."""
    proto = protocol(V4_V5)
    feed(proto, CONNECT_V5)
    proto.accept_connect()
    feed(proto, b"\x30\x03\x00\x01#")
    assert proto.data_to_send() == [b"\x20\x03\x00\x00\x00", b"\xe0\x01\x90"]


def test_auth_passes_through_at_v5() -> None:
    proto = protocol(V4_V5)
    auth = encode(Auth(reasons.CONTINUE_AUTHENTICATION, {"authentication_method": "m"}), 5)
    packets = feed(proto, CONNECT_V5 + auth)
    assert packets[1] == Auth(reasons.CONTINUE_AUTHENTICATION, {"authentication_method": "m"})


# --------------------------------------------------------------------------------------------------
# Refusing and disconnecting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v5_code", "v4_answer"),
    [
        (reasons.NOT_AUTHORIZED, b"\x20\x02\x00\x05"),
        (reasons.BAD_USERNAME_OR_PASSWORD, b"\x20\x02\x00\x04"),
        (reasons.CLIENT_IDENTIFIER_NOT_VALID, b"\x20\x02\x00\x02"),
        (reasons.SERVER_UNAVAILABLE, b"\x20\x02\x00\x03"),
        (reasons.BANNED, b"\x20\x02\x00\x05"),
        (reasons.CONNECTION_RATE_EXCEEDED, b"\x20\x02\x00\x03"),
    ],
)
def test_refuse(v5_code: int, v4_answer: bytes) -> None:
    proto = protocol(V4_V5)
    feed(proto, CONNECT_V4)
    proto.refuse(v5_code)
    assert_closed(proto, v4_answer)
    assert proto.error is None

    proto = protocol(V4_V5)
    feed(proto, CONNECT_V5)
    proto.refuse(v5_code)
    assert_closed(proto, bytes((0x20, 0x03, 0x00, v5_code, 0x00)))


def test_refuse_needs_a_refusal() -> None:
    proto = protocol(V4_V5)
    feed(proto, CONNECT_V5)
    with pytest.raises(ValueError):
        proto.refuse(0)


def test_disconnect() -> None:
    proto = protocol(V4_V5)
    feed(proto, CONNECT_V5)
    proto.disconnect(reasons.SESSION_TAKEN_OVER, {"reason_string": "another connection"})
    assert_closed(proto, encode(Disconnect(0x8E, {"reason_string": "another connection"}), 5))

    proto = protocol()
    feed(proto, CONNECT_V4)
    proto.disconnect(reasons.SESSION_TAKEN_OVER)
    assert_closed(proto, b"")


# --------------------------------------------------------------------------------------------------
# Splits and random input
# --------------------------------------------------------------------------------------------------


def run(chunks: Sequence[bytes], accept: frozenset[int] = V4_V5) -> tuple[object, ...]:
    """Everything observable after feeding ``chunks``: packets, bytes out, state, error code."""
    proto = protocol(accept, max_packet_size=512)
    packets = feed(proto, *chunks)
    error = proto.error.reason_code if proto.error is not None else None
    return (packets, sent(proto), proto.state, proto.close_requested, error)


_STREAMS = {
    "v4-ok": CONNECT_V4 + PUBLISH_V4 + b"\xc0\x00" + encode(Subscribe(1, [Subscription("a/#", 1)]), 4),
    "v5-ok": CONNECT_V5_PROPERTIES + PUBLISH_V5 + b"\xc0\x00" + b"\xe0\x00",
    "v4-bad": CONNECT_V4 + PUBLISH_V4 + b"\x30\x03\x00\x01#" + PUBLISH_V4,
    "v5-bad": CONNECT_V5 + PUBLISH_V5 + b"\x30\x04\x00\x01#\x00" + PUBLISH_V5,
    "v5-second-connect": CONNECT_V5 + PUBLISH_V5 + CONNECT_V5,
    "not-connect-first": PUBLISH_V4 + CONNECT_V4,
    "v31": CONNECT_V31 + PUBLISH_V4,
}


@pytest.mark.parametrize("stream", list(_STREAMS.values()), ids=list(_STREAMS))
def test_every_split_offset(stream: bytes) -> None:
    whole = run([stream])
    for offset in range(len(stream) + 1):
        assert run([stream[:offset], stream[offset:]]) == whole
    assert run([stream[i : i + 1] for i in range(len(stream))]) == whole


@FAST
@given(
    head=st.sampled_from([CONNECT_V4, CONNECT_V5, CONNECT_V5_PROPERTIES, CONNECT_V31, b""]),
    tail=st.binary(max_size=200),
    accept=st.sampled_from([V4_ONLY, V4_V5, frozenset({5})]),
    offsets=st.lists(st.integers(0, 300), max_size=5),
)
def test_random_bytes_never_raise(
    head: bytes, tail: bytes, accept: frozenset[int], offsets: list[int]
) -> None:
    """Invariant: receive_data never raises, and the outcome does not depend on the chunking."""
    data = head + tail
    cuts = sorted({min(offset, len(data)) for offset in offsets})
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    whole = run([data], accept)
    assert run(chunks, accept) == whole
    _, out, state, close_requested, error = whole
    assert (state is State.CLOSING) is close_requested
    assert (error is not None) <= close_requested
    assert isinstance(out, bytes)
    if close_requested and out:
        # The last thing sent is a CONNACK refusal or a DISCONNECT, nothing after it.
        assert (
            out.endswith((b"\x20\x02\x00\x01", b"\x20\x02\x00\x02", b"\xe0\x01\x81", b"\xe0\x01\x82"))
            or (out[0] == 0x20 and len(out) == 5)
            or out[-3:-1] == b"\xe0\x01"
        )
