"""The TCP listener's PROXY protocol modes against the real broker process (raw sockets play the LB)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from listeners.proxy_protocol import TLV, build_v1, build_v2, ssl_tlv
from tests.support import WAIT, BrokerProcess, Clients, broker_config, listener_config

BrokerFactory = Callable[..., BrokerProcess]

CONNACK_OK = b"\x20\x02\x00\x00"


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big") + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def raw_session(port: int, *chunks: bytes, source: str = "127.0.0.1", pause: float = 0.0) -> bytes:
    """Send ``chunks`` (pausing between them) and return what the broker answers before closing or 4 bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0)) as sock:
        for index, chunk in enumerate(chunks):
            if index and pause:
                time.sleep(pause)
            sock.sendall(chunk)
        data = b""
        while len(data) < 4:
            part = sock.recv(4 - len(data))
            if not part:
                break
            data += part
        return data


def assert_closed_without_answer(port: int, *chunks: bytes, source: str = "127.0.0.1") -> None:
    try:
        answer = raw_session(port, *chunks, source=source)
    except ConnectionResetError:
        return
    assert answer == b"", f"expected the broker to close the connection, got {answer!r}"


@pytest.fixture
def strict(start_broker: BrokerFactory) -> BrokerProcess:
    """proxy_protocol: true, every peer trusted (EMQX's default behaviour)."""
    return start_broker(
        broker_config(tcp={"default": listener_config(proxy_protocol=True, proxy_protocol_timeout="700ms")})
    )


@pytest.mark.parametrize(
    ("header", "client", "expected"),
    [
        pytest.param(
            build_v1("203.0.113.7", "10.0.0.1", 4242, 1883), "v1", r"203\.0\.113\.7:4242", id="v1-tcp4"
        ),
        pytest.param(
            build_v1("2001:db8::7", "2001:db8::1", 4243, 1883), "v1six", r"\[2001:db8::7\]:4243", id="v1-tcp6"
        ),
        pytest.param(
            build_v2(src_addr="198.51.100.9", dst_addr="10.0.0.1", src_port=40000, dst_port=1883),
            "v2",
            r"198\.51\.100\.9:40000",
            id="v2-inet",
        ),
        pytest.param(
            build_v2(
                src_addr="198.51.100.10",
                dst_addr="10.0.0.1",
                src_port=40001,
                dst_port=1883,
                tlvs=[TLV(0x05, b"uid-1"), TLV(0x02, b"mqtt.example"), ssl_tlv(cn="device-1")],
                crc32c=True,
            ),
            "v2tlv",
            r"198\.51\.100\.10:40001",
            id="v2-tlvs-crc",
        ),
    ],
)
def test_the_header_names_the_client(
    strict: BrokerProcess, header: bytes, client: str, expected: str
) -> None:
    assert raw_session(strict.port("tcp:default"), header + connect_packet(client)) == CONNACK_OK
    strict.wait_for_log(
        rf"client '{client}' from {expected} via 127\.0\.0\.1:\d+ \(proxy_protocol_v[12]\) connected"
    )


@pytest.mark.parametrize("split", [1, 5, 20, 40])
def test_a_header_split_across_reads(strict: BrokerProcess, split: int) -> None:
    header = build_v1("203.0.113.8", "10.0.0.1", 5000, 1883)
    data = header + connect_packet("split")
    assert raw_session(strict.port("tcp:default"), data[:split], data[split:], pause=0.05) == CONNACK_OK
    strict.wait_for_log(r"client 'split' from 203\.0\.113\.8:5000 via")


def test_a_header_alone_then_mqtt_later(strict: BrokerProcess) -> None:
    header = build_v2(src_addr="192.0.2.50", dst_addr="10.0.0.1", src_port=6000, dst_port=1883)
    assert raw_session(strict.port("tcp:default"), header, connect_packet("later"), pause=0.2) == CONNACK_OK
    strict.wait_for_log(r"client 'later' from 192\.0\.2\.50:6000 via")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(build_v2(command="LOCAL"), id="v2-local"),
        pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    ],
)
def test_local_and_unknown_use_the_socket_address(strict: BrokerProcess, header: bytes) -> None:
    assert (
        raw_session(strict.port("tcp:default"), header + connect_packet("hc"), source="127.0.0.33")
        == CONNACK_OK
    )
    strict.wait_for_log(r"client 'hc' from 127\.0\.0\.33:\d+ connected")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(connect_packet("plain"), "not_proxy_protocol", id="plain-mqtt"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "not_proxy_protocol", id="http"),
        pytest.param(b"PROXY TCP4 010.0.0.1 10.0.0.2 1 2\r\n", "v1_bad_address", id="v1-leading-zero"),
        pytest.param(b"PROXY UNKNOWN " + b"x" * 200, "v1_too_long", id="v1-oversize"),
        pytest.param(
            build_v2(
                src_addr="1.2.3.4", dst_addr="5.6.7.8", src_port=1, dst_port=2, tlvs=[TLV(0xE0, bytes(5000))]
            ),
            "v2_too_long",
            id="v2-oversize",
        ),
        pytest.param(
            build_v2(src_addr="1.2.3.4", dst_addr="5.6.7.8", src_port=1, dst_port=2, crc32c=True)[:-1]
            + b"\x00",
            "v2_crc_mismatch",
            id="v2-bad-crc",
        ),
    ],
)
def test_hostile_input_is_refused_with_its_reason(strict: BrokerProcess, data: bytes, reason: str) -> None:
    assert_closed_without_answer(strict.port("tcp:default"), data)
    strict.wait_for_log(rf"tcp:default refused 127\.0\.0\.1:\d+: .* \[{reason}\]")


def test_a_silent_socket_is_closed_after_the_timeout(strict: BrokerProcess, clients: Clients) -> None:
    port = strict.port("tcp:default")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""
        elapsed = time.monotonic() - started
    assert 0.6 < elapsed < 3.0, elapsed
    strict.wait_for_log(r"refused 127\.0\.0\.1:\d+: no complete PROXY header within 0\.7s \[proxy_timeout\]")


def test_trusted_proxies_refuse_other_peers_before_reading(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config(proxy_protocol=True, trusted_proxies=["127.0.0.50/32"])}
        )
    )
    port = broker.port("tcp:default")
    header = build_v1("203.0.113.9", "10.0.0.1", 7000, 1883)
    assert_closed_without_answer(port, header + connect_packet("forger"), source="127.0.0.51")
    broker.wait_for_log(
        r"refused 127\.0\.0\.51:\d+: peer 127\.0\.0\.51 is not in trusted_proxies .*\[untrusted_proxy\]"
    )
    assert raw_session(port, header + connect_packet("via-lb"), source="127.0.0.50") == CONNACK_OK
    broker.wait_for_log(r"client 'via-lb' from 203\.0\.113\.9:7000 via 127\.0\.0\.50:\d+")


def test_optional_mode(start_broker: BrokerFactory, clients: Clients) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config(proxy_protocol="optional", trusted_proxies=["127.0.0.50"])}
        )
    )
    port = broker.port("tcp:default")
    # An untrusted client without a header is served with its own address...
    clients.new("direct").connect("127.0.0.1", port, bind_address="127.0.0.60")
    broker.wait_for_log(r"client 'direct' from 127\.0\.0\.60:\d+ connected")
    # ...a header from it is a spoofing attempt...
    forged = build_v1("203.0.113.66", "10.0.0.1", 6666, 1883)
    assert_closed_without_answer(port, forged + connect_packet("spoof"), source="127.0.0.60")
    broker.wait_for_log(
        r"refused 127\.0\.0\.60:\d+: PROXY v1 header from 127\.0\.0\.60.*\[untrusted_header\]"
    )
    # ...and the trusted proxy may send one, or not.
    assert raw_session(port, forged + connect_packet("lb"), source="127.0.0.50") == CONNACK_OK
    broker.wait_for_log(r"client 'lb' from 203\.0\.113\.66:6666 via 127\.0\.0\.50:\d+")
    assert raw_session(port, connect_packet("lb-plain"), source="127.0.0.50") == CONNACK_OK
    broker.wait_for_log(r"client 'lb-plain' from 127\.0\.0\.50:\d+ connected")
