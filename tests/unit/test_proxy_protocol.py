"""Tests of :mod:`listeners.proxy_protocol`: truth tables per spec section, split-read and
property tests.

Invariants the parser promises, checked throughout:

* the outcome (header and everything after it, or the error ``reason``) does not depend on how
  the bytes are split into reads;
* nothing but :class:`~broker.errors.ProxyProtocolError` ever escapes, whatever the bytes;
* a read that cannot lead to a valid header fails at once, not when more bytes arrive.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import pickle
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import AddressError, ProxyProtocolError
from listeners.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    NEED_DATA,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    REASONS,
    TLV,
    V1_SIGNATURE,
    V2_MAX_LENGTH_CEILING,
    V2_MAX_LENGTH_FLOOR,
    V2_SIGNATURE,
    Detection,
    ProxyHeader,
    ProxyHeaderParser,
    SSLInfo,
    build_v1,
    build_v2,
    crc32c,
    detect,
    parse,
    ssl_tlv,
)

#: An MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s, empty client id): what follows a header.
MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def outcome(chunks: Sequence[bytes], max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> tuple[object, ...]:
    """Feed ``chunks`` in order: ("header", header, every byte after it) | ("error", reason) | ("need",).

    Anything but ProxyProtocolError propagates and fails the test.
    """
    parser = ProxyHeaderParser(max_v2_length=max_v2_length)
    for index, chunk in enumerate(chunks):
        try:
            result = parser.feed(chunk)
        except ProxyProtocolError as exc:
            assert exc.reason in REASONS, exc.reason
            assert parser.done
            return ("error", exc.reason)
        if result is not NEED_DATA:
            header, rest = result
            assert parser.done
            return ("header", header, rest + b"".join(chunks[index + 1 :]))
    assert not parser.done
    return ("need",)


def split(data: bytes, offsets: Sequence[int]) -> list[bytes]:
    cuts = sorted({min(max(offset, 0), len(data)) for offset in offsets})
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


def reason_of(data: bytes, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data, max_v2_length=max_v2_length)
    return info.value.reason


def header_of(data: bytes) -> tuple[ProxyHeader, bytes]:
    result = parse(data)
    assert result is not NEED_DATA
    return result


def v2_raw(ver_cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    """A v2 header written byte by byte, bypassing the builder."""
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + payload


INET_BLOCK = bytes([127, 0, 0, 9, 127, 0, 0, 1]) + (47535).to_bytes(2, "big") + (19101).to_bytes(2, "big")


def inet_with(*tlvs: bytes) -> bytes:
    """PROXY TCP4 127.0.0.9:47535 -> 127.0.0.1:19101 followed by raw TLV bytes."""
    return v2_raw(0x21, 0x11, INET_BLOCK + b"".join(tlvs))


def raw_tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


# --------------------------------------------------------------------------------------------------
# CRC32C
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", 0x00000000, id="empty"),
        pytest.param(b"123456789", 0xE3069283, id="check-value"),
        # RFC 3720 B.4 (iSCSI) vectors.
        pytest.param(bytes(32), 0x8A9136AA, id="rfc3720-zeros"),
        pytest.param(b"\xff" * 32, 0x62A8AB43, id="rfc3720-ones"),
        pytest.param(bytes(range(32)), 0x46DD794E, id="rfc3720-ascending"),
        pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="rfc3720-descending"),
    ],
)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


# --------------------------------------------------------------------------------------------------
# detect()
# --------------------------------------------------------------------------------------------------

_PREFIXES = [V1_SIGNATURE[:size] for size in range(len(V1_SIGNATURE))] + [
    V2_SIGNATURE[:size] for size in range(1, len(V2_SIGNATURE))
]


@pytest.mark.parametrize("data", _PREFIXES, ids=[repr(prefix) for prefix in _PREFIXES])
def test_detect_proper_prefix_needs_data(data: bytes) -> None:
    assert detect(data) is Detection.NEED_DATA


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\x10", Detection.NONE, id="mqtt-connect-first-byte"),
        pytest.param(MQTT_CONNECT, Detection.NONE, id="mqtt-connect"),
        pytest.param(b"GET ", Detection.NONE, id="websocket-get"),
        pytest.param(b"\x16\x03\x01", Detection.NONE, id="tls-client-hello"),
        pytest.param(b"PROXY ", Detection.V1, id="v1-signature"),
        pytest.param(b"PROXY TCP4 1.2.3.4", Detection.V1, id="v1-more"),
        pytest.param(V2_SIGNATURE, Detection.V2, id="v2-signature"),
        pytest.param(V2_SIGNATURE + b"\x21\x11", Detection.V2, id="v2-more"),
        pytest.param(b"PROXZ", Detection.NONE, id="PROXZ"),
        pytest.param(b"PROXY\t", Detection.NONE, id="PROXY-tab"),
        pytest.param(b"PROXYX", Detection.NONE, id="PROXYX"),
        pytest.param(b"proxy ", Detection.NONE, id="lowercase"),
        pytest.param(b"\r\n\r\n\x01", Detection.NONE, id="v2-wrong-fifth-byte"),
        pytest.param(b"\r\nGET", Detection.NONE, id="crlf-then-text"),
        pytest.param(V2_SIGNATURE[:-1] + b"\r", Detection.NONE, id="v2-wrong-last-byte"),
        pytest.param(b"\x00", Detection.NONE, id="nul"),
    ],
)
def test_detect(data: bytes, expected: Detection) -> None:
    assert detect(data) is expected
    assert detect(bytearray(data)) is expected


def test_detect_decides_on_first_byte() -> None:
    for first in range(256):
        if first not in (ord("P"), 0x0D):
            assert detect(bytes([first])) is Detection.NONE


def test_need_data_sentinel() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert copy.deepcopy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
    assert parse(b"PROXY TCP4") is NEED_DATA


# --------------------------------------------------------------------------------------------------
# v1 (proxy-protocol.txt 2.1): valid lines
# --------------------------------------------------------------------------------------------------

FULL6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
V1_MAX_LINE = f"PROXY UNKNOWN {FULL6} {FULL6} 65535 65535\r\n".encode()
V1_FULL_TCP6 = f"PROXY TCP6 {FULL6} {FULL6} 65535 65535\r\n".encode()


@pytest.mark.parametrize(
    ("line", "family", "transport", "src", "dst", "ports"),
    [
        pytest.param(
            b"PROXY TCP4 127.0.0.9 127.0.0.1 47535 19101\r\n",
            "TCP4", "STREAM", "127.0.0.9", "127.0.0.1", (47535, 19101),
            id="nginx-tcp4",
        ),
        pytest.param(
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "TCP4", "STREAM", "192.168.0.1", "192.168.0.11", (56324, 443),
            id="spec-example",
        ),
        pytest.param(
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            "TCP4", "STREAM", "255.255.255.255", "255.255.255.255", (65535, 65535),
            id="tcp4-max-56-bytes",
        ),
        pytest.param(
            b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", "TCP4", "STREAM", "0.0.0.0", "10.0.0.1", (0, 0),
            id="tcp4-zero-octets-port-0",
        ),
        pytest.param(
            b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", "TCP6", "STREAM", "2001:db8::1", "::1", (1, 65535),
            id="tcp6-compressed",
        ),
        pytest.param(
            b"PROXY TCP6 2001:0DB8:0000:0042:0000:8A2E:0370:7334 fe80::1 4124 443\r\n",
            "TCP6", "STREAM", "2001:db8:0:42:0:8a2e:370:7334", "fe80::1", (4124, 443),
            id="tcp6-uppercase-full-reported-compressed",
        ),
        pytest.param(
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1883 1883\r\n",
            "TCP6", "STREAM", "::ffff:102:304", "::1", (1883, 1883),
            id="tcp6-ipv4-mapped",
        ),
        pytest.param(V1_FULL_TCP6, "TCP6", "STREAM", FULL6, FULL6, (65535, 65535), id="tcp6-max-104-bytes"),
        pytest.param(b"PROXY UNKNOWN\r\n", "UNKNOWN", "UNSPEC", None, None, None, id="unknown-short"),
        pytest.param(b"PROXY UNKNOWN \r\n", "UNKNOWN", "UNSPEC", None, None, None, id="unknown-space"),
        pytest.param(
            b"PROXY UNKNOWN 4124 443\r\n", "UNKNOWN", "UNSPEC", None, None, None, id="unknown-junk-ignored"
        ),
        pytest.param(
            b"PROXY UNKNOWN 1.2.3.4  01.2 x\r\n", "UNKNOWN", "UNSPEC", None, None, None,
            id="unknown-invalid-fields-ignored",
        ),
        pytest.param(V1_MAX_LINE, "UNKNOWN", "UNSPEC", None, None, None, id="unknown-max-107-bytes"),
    ],
)  # fmt: skip
def test_v1_valid(
    line: bytes,
    family: str,
    transport: str,
    src: str | None,
    dst: str | None,
    ports: tuple[int, int] | None,
) -> None:
    header, rest = header_of(line + MQTT_CONNECT)
    assert rest == MQTT_CONNECT
    assert header.version == 1
    assert header.command == "PROXY"
    assert header.family == family
    assert header.transport == transport
    assert header.src_addr == src
    assert header.dst_addr == dst
    assert (header.src_port, header.dst_port) == (ports or (None, None))
    assert header.tlvs == ()
    assert header.length == len(line)
    assert header.has_address is (family != "UNKNOWN")


def test_v1_length_limits_match_spec() -> None:
    assert len(V1_MAX_LINE) == 107
    assert len(V1_FULL_TCP6) == 104


def test_v1_nginx_line_exactly() -> None:
    header, rest = header_of(b"PROXY TCP4 127.0.0.9 127.0.0.1 47535 19101\r\n")
    assert rest == b""
    assert header == ProxyHeader(1, "PROXY", "TCP4", "STREAM", "127.0.0.9", 47535, "127.0.0.1", 19101, (), 44)


# --------------------------------------------------------------------------------------------------
# v1: invalid lines, each with its reason
# --------------------------------------------------------------------------------------------------

_GOOD4 = "PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n"


def _v1(text: str) -> bytes:
    return text.encode("latin-1")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not_proxy_protocol", id="lowercase-PROXY"),
        pytest.param(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_family", id="lowercase-tcp4"),
        pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_family", id="TCP5"),
        pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_family", id="UDP4"),
        pytest.param(b"PROXY TCP\r\n", "v1_bad_family", id="TCP-truncated-keyword"),
        pytest.param(b"PROXY UNKNOWNX\r\n", "v1_bad_family", id="UNKNOWN-glued"),
        pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_separator", id="double-space-leading"),
        pytest.param(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_separator", id="double-space"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "v1_bad_separator", id="double-space-ports"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1_bad_separator", id="trailing-space"),
        pytest.param(b"PROXY \r\n", "v1_bad_separator", id="empty-protocol"),
        pytest.param(b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_character", id="tab"),
        pytest.param(b"PROXY TCP4 1.2.3.4\x005.6.7.8 1 2\r\n", "v1_bad_character", id="nul"),
        pytest.param(b"PROXY UNKNOWN\tjunk\r\n", "v1_bad_character", id="tab-after-UNKNOWN"),
        pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1_bad_address", id="octet-leading-zero"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.010 1 2\r\n", "v1_bad_address", id="octet-octal-looking"),
        pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1_bad_address", id="octet-256"),
        pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1_bad_address", id="three-octets"),
        pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "v1_bad_address", id="five-octets"),
        pytest.param(b"PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n", "v1_bad_address", id="hex-octet"),
        pytest.param(b"PROXY TCP4 2130706433 5.6.7.8 1 2\r\n", "v1_bad_address", id="integer-ipv4"),
        pytest.param(b"PROXY TCP4 1.2.3.4 localhost 1 2\r\n", "v1_bad_address", id="hostname"),
        pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1_family_mismatch", id="ipv6-in-tcp4"),
        pytest.param(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "v1_family_mismatch", id="ipv6-dst-in-tcp4"),
        pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1_family_mismatch", id="ipv4-in-tcp6"),
        pytest.param(b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "v1_family_mismatch", id="ipv4-dst-in-tcp6"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1_bad_address", id="zone-id"),
        pytest.param(b"PROXY TCP6 fe80::g ::1 1 2\r\n", "v1_bad_address", id="ipv6-bad-hex"),
        pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "v1_bad_address", id="ipv6-nine-groups"),
        pytest.param(b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1_bad_address", id="ipv6-two-double-colons"),
        pytest.param(b"PROXY TCP6 00001::1 ::1 1 2\r\n", "v1_bad_address", id="ipv6-five-digit-group"),
        pytest.param(b"PROXY TCP6 [::1] ::1 1 2\r\n", "v1_bad_address", id="ipv6-brackets"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1_bad_port", id="port-65536"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1_bad_port", id="dst-port-65536"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1_bad_port", id="port-01"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", "v1_bad_port", id="port-00"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1_bad_port", id="port-minus-1"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "v1_bad_port", id="port-plus-1"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x10\r\n", "v1_bad_port", id="port-hex"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", "v1_bad_port", id="port-six-digits"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1_bad_field_count", id="missing-field"),
        pytest.param(b"PROXY TCP4\r\n", "v1_bad_field_count", id="keyword-only"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1_bad_field_count", id="extra-field"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1_bad_line_ending", id="LF-without-CR"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "v1_bad_line_ending", id="CR-without-LF"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "v1_bad_line_ending", id="CR-CR-LF"),
        pytest.param(b"PROXY UNKNOWN\n", "v1_bad_line_ending", id="UNKNOWN-LF-only"),
        pytest.param(b"PROXY UNKNOWN a\nb\r\n", "v1_bad_line_ending", id="UNKNOWN-inner-LF"),
        pytest.param(b"PROXY UNKNOWN " + b"a" * 94, "v1_too_long", id="108-bytes-no-CRLF"),
        pytest.param(b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", "v1_too_long", id="108-bytes-with-CRLF"),
        pytest.param(_v1("PROXY TCP4 1.2.3.\xe9 5.6.7.8 1 2\r\n"), "v1_non_ascii", id="non-ascii-address"),
        pytest.param(_v1("PROXY UNKNOWN caf\xe9\r\n"), "v1_non_ascii", id="non-ascii-after-UNKNOWN"),
        pytest.param(
            "PROXY TCP4 \uff11.2.3.4 5.6.7.8 1 2\r\n".encode(), "v1_non_ascii", id="fullwidth-digit"
        ),
    ],
)
def test_v1_invalid(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason
    assert outcome([data[i : i + 1] for i in range(len(data))]) == ("error", reason)


def test_v1_error_message_quotes_value_and_cites_spec() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(b"PROXY TCP4 010.0.0.1 5.6.7.8 1 2\r\n")
    message = str(info.value)
    assert "'010.0.0.1'" in message
    assert "strict IPv4" in message
    assert "(proxy-protocol.txt 2.1)" in message
    assert isinstance(info.value, AddressError)


def test_every_reason_is_documented_and_snake_case() -> None:
    for reason in REASONS:
        assert reason.replace("_", "").isalnum()
        assert reason == reason.lower()


# --------------------------------------------------------------------------------------------------
# v2 (proxy-protocol.txt 2.2): valid headers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"src_addr": "192.0.2.1", "dst_addr": "198.51.100.2", "src_port": 51000, "dst_port": 1883},
            ("PROXY", "INET", "STREAM", "192.0.2.1", 51000, "198.51.100.2", 1883, True),
            id="inet-stream",
        ),
        pytest.param(
            {"src_addr": "192.0.2.1", "dst_addr": "198.51.100.2", "src_port": 0, "dst_port": 65535,
             "transport": "DGRAM"},
            ("PROXY", "INET", "DGRAM", "192.0.2.1", 0, "198.51.100.2", 65535, True),
            id="inet-dgram",
        ),
        pytest.param(
            {"src_addr": "2001:db8::1", "dst_addr": "2001:db8::2", "src_port": 1, "dst_port": 8883},
            ("PROXY", "INET6", "STREAM", "2001:db8::1", 1, "2001:db8::2", 8883, True),
            id="inet6-stream",
        ),
        pytest.param(
            {"src_addr": "::ffff:10.0.0.1", "dst_addr": "::1", "src_port": 1, "dst_port": 2,
             "transport": "DGRAM"},
            ("PROXY", "INET6", "DGRAM", "::ffff:a00:1", 1, "::1", 2, True),
            id="inet6-dgram-mapped",
        ),
        pytest.param(
            {"src_addr": "/run/client.sock", "dst_addr": "/run/broker.sock"},
            ("PROXY", "UNIX", "STREAM", "/run/client.sock", None, "/run/broker.sock", None, False),
            id="unix-stream",
        ),
        pytest.param(
            {"src_addr": "/" + "x" * 107, "dst_addr": "", "transport": "DGRAM", "family": "UNIX"},
            ("PROXY", "UNIX", "DGRAM", "/" + "x" * 107, None, "", None, False),
            id="unix-dgram-full-width-and-abstract",
        ),
        pytest.param({}, ("PROXY", "UNSPEC", "UNSPEC", None, None, None, None, False), id="proxy-unspec"),
        pytest.param(
            {"transport": "STREAM"},
            ("PROXY", "UNSPEC", "STREAM", None, None, None, None, False),
            id="proxy-unspec-family-stream",
        ),
        pytest.param(
            {"src_addr": "192.0.2.1", "dst_addr": "192.0.2.2", "src_port": 1, "dst_port": 2,
             "transport": "UNSPEC"},
            ("PROXY", "INET", "UNSPEC", None, None, None, None, False),
            id="proxy-inet-unspec-transport-ignored",
        ),
        pytest.param(
            {"command": "LOCAL"}, ("LOCAL", "UNSPEC", "UNSPEC", None, None, None, None, False), id="local"
        ),
        pytest.param(
            {"command": "LOCAL", "src_addr": "192.0.2.1", "dst_addr": "192.0.2.2", "src_port": 1,
             "dst_port": 2},
            ("LOCAL", "INET", "STREAM", None, None, None, None, False),
            id="local-addresses-ignored",
        ),
    ],
)  # fmt: skip
def test_v2_valid(kwargs: dict[str, object], expected: tuple[object, ...]) -> None:
    data = build_v2(**kwargs)  # type: ignore[arg-type]
    header, rest = header_of(data + MQTT_CONNECT)
    assert rest == MQTT_CONNECT
    assert header.version == 2
    assert header.length == len(data)
    assert header.tlvs == ()
    got = (
        header.command,
        header.family,
        header.transport,
        header.src_addr,
        header.src_port,
        header.dst_addr,
        header.dst_port,
        header.has_address,
    )
    assert got == expected


def test_v2_every_tlv_decoded() -> None:
    unique_id = bytes(range(128))
    ssl = ssl_tlv(
        client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        verify=0,
        version="TLSv1.3",
        cn="Zoë's device",
        cipher="TLS_AES_128_GCM_SHA256",
        sig_alg="RSA-SHA256",
        key_alg="RSA2048",
        extra=[TLV(0x2F, b"unknown sub-TLV, ignored")],
    )
    tlvs = [
        TLV(PP2_TYPE_ALPN, b"mqtt"),
        TLV(PP2_TYPE_AUTHORITY, b"broker.example.com"),
        TLV(PP2_TYPE_NOOP, b""),
        TLV(PP2_TYPE_UNIQUE_ID, unique_id),
        ssl,
        TLV(PP2_TYPE_NOOP, bytes(5)),
        TLV(PP2_TYPE_NETNS, b"blue"),
        TLV(0xEA, b"\x01vpce-0123456789abcdef"),
        TLV(0xEA, b"\x02again: unknown types may repeat"),
    ]
    data = build_v2(
        src_addr="203.0.113.7", dst_addr="10.0.0.5", src_port=40000, dst_port=8883, tlvs=tlvs, crc32c=True
    )
    header, rest = header_of(data)
    assert rest == b""
    assert header.has_address
    assert (header.src_addr, header.src_port, header.dst_addr, header.dst_port) == (
        "203.0.113.7",
        40000,
        "10.0.0.5",
        8883,
    )
    assert header.alpn == b"mqtt"
    assert header.authority == "broker.example.com"
    assert header.unique_id == unique_id
    assert header.netns == "blue"
    assert header.crc32c == int.from_bytes(data[-4:], "big")
    assert header.ssl == SSLInfo(
        client=0x07,
        verify=0,
        version="TLSv1.3",
        cn="Zoë's device",
        cipher="TLS_AES_128_GCM_SHA256",
        sig_alg="RSA-SHA256",
        key_alg="RSA2048",
    )
    assert header.ssl.client_ssl and header.ssl.client_cert_conn and header.ssl.client_cert_sess
    assert header.ssl.cert_verified
    # Every TLV is kept, in wire order, the checksum last as the builder appends it.
    assert [tlv.type for tlv in header.tlvs] == [tlv.type for tlv in tlvs] + [PP2_TYPE_CRC32C]
    assert header.tlv(0xEA) == b"\x01vpce-0123456789abcdef"
    assert header.tlv(0x99) is None


def test_v2_no_tlvs_decode_to_none() -> None:
    header, _ = header_of(build_v2(src_addr="192.0.2.1", dst_addr="192.0.2.2", src_port=1, dst_port=2))
    assert (header.alpn, header.authority, header.unique_id, header.crc32c, header.netns, header.ssl) == (
        None,
        None,
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("client", "verify", "expected"),
    [
        pytest.param(PP2_CLIENT_SSL, 0, (True, False, False, False), id="tls-no-cert"),
        pytest.param(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0, (True, True, False, True), id="cert-conn-ok"),
        pytest.param(PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS, 0, (True, False, True, True), id="cert-sess-ok"),
        pytest.param(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 20, (True, True, False, False), id="cert-bad"),
        pytest.param(0, 0, (False, False, False, False), id="plain-tcp"),
    ],
)
def test_ssl_info_flags(client: int, verify: int, expected: tuple[bool, bool, bool, bool]) -> None:
    header, _ = header_of(build_v2(tlvs=[ssl_tlv(client=client, verify=verify)]))
    info = header.ssl
    assert info is not None
    assert (info.client_ssl, info.client_cert_conn, info.client_cert_sess, info.cert_verified) == expected
    assert info.verify == verify


def test_v2_ssl_verify_is_uint32() -> None:
    header, _ = header_of(build_v2(tlvs=[ssl_tlv(verify=0xFFFFFFFF)]))
    assert header.ssl is not None
    assert header.ssl.verify == 0xFFFFFFFF


def test_v2_local_still_checks_tlvs() -> None:
    header, _ = header_of(build_v2(command="LOCAL", tlvs=[TLV(PP2_TYPE_UNIQUE_ID, b"hc-1")], crc32c=True))
    assert header.command == "LOCAL"
    assert header.unique_id == b"hc-1"
    assert reason_of(build_v2(command="LOCAL", tlvs=[TLV(PP2_TYPE_UNIQUE_ID, bytes(129))])) == (
        "v2_unique_id_too_long"
    )


def test_v2_as_dict_is_json() -> None:
    data = build_v2(
        src_addr="2001:db8::7",
        dst_addr="2001:db8::1",
        src_port=50000,
        dst_port=1883,
        tlvs=[
            TLV(PP2_TYPE_ALPN, b"mqtt\xff"),
            TLV(PP2_TYPE_AUTHORITY, b"example.org"),
            TLV(PP2_TYPE_UNIQUE_ID, b"\x00\x01"),
            ssl_tlv(client=5, verify=0, version="TLSv1.2", cn="device-1"),
            TLV(PP2_TYPE_NETNS, b"ns1"),
            TLV(PP2_TYPE_NOOP, b"pad"),
            TLV(0xE1, b"\xab\xcd"),
        ],
        crc32c=True,
    )
    header, _ = header_of(data)
    summary = header.as_dict()
    assert json.loads(json.dumps(summary)) == summary
    assert summary == {
        "version": 2,
        "command": "PROXY",
        "family": "INET6",
        "transport": "STREAM",
        "src_addr": "2001:db8::7",
        "src_port": 50000,
        "dst_addr": "2001:db8::1",
        "dst_port": 1883,
        "alpn": "mqtt\\xff",
        "authority": "example.org",
        "crc32c": f"{header.crc32c:08x}",
        "unique_id": "0001",
        "ssl": {
            "client": 5,
            "client_ssl": True,
            "client_cert_conn": False,
            "client_cert_sess": True,
            "verify": 0,
            "cert_verified": True,
            "version": "TLSv1.2",
            "cn": "device-1",
        },
        "netns": "ns1",
        "tlvs_unknown": [{"type": 0xE1, "value": "abcd"}],
    }


def test_v1_as_dict() -> None:
    header, _ = header_of(b"PROXY TCP4 127.0.0.9 127.0.0.1 47535 19101\r\n")
    assert header.as_dict() == {
        "version": 1,
        "command": "PROXY",
        "family": "TCP4",
        "transport": "STREAM",
        "src_addr": "127.0.0.9",
        "src_port": 47535,
        "dst_addr": "127.0.0.1",
        "dst_port": 19101,
    }


# --------------------------------------------------------------------------------------------------
# v2: hand-written vectors, laid out as in 2.2
# --------------------------------------------------------------------------------------------------

# What `haproxy ... send-proxy-v2` sends for a client 127.0.0.9:47535 connecting to 127.0.0.1:19101.
HAPROXY_INET = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, command PROXY
    "11"  # AF_INET, STREAM
    "000c"  # 12 bytes follow
    "7f000009"  # src 127.0.0.9
    "7f000001"  # dst 127.0.0.1
    "b9af"  # src port 47535
    "4a9d"  # dst port 19101
)
HAND_INET6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"
    "21"  # version 2, PROXY
    "21"  # AF_INET6, STREAM
    "0024"  # 36 bytes follow
    "20010db8000000000000000000000001"  # src 2001:db8::1
    "00000000000000000000000000000001"  # dst ::1
    "01bb"  # src port 443
    "075b"  # dst port 1883
)
# A LOCAL health check as HAProxy sends it: AF_UNSPEC, no address, length 0.
HAND_LOCAL = bytes.fromhex("0d0a0d0a000d0a515549540a20000000")
# A header captured from an AWS Network Load Balancer (published in ranch's test suite): a CRC32C
# computed by AWS, its 0xEA VPC endpoint TLV and NOOP padding. Checks our CRC against a third party.
AWS_NLB = bytes.fromhex(
    "0d0a0d0a000d0a515549540a" "21" "11" "0054"
    "ac1f0771" "ac1f0a1f" "c8f2" "0050"  # 172.31.7.113:51442 -> 172.31.10.31:80
    "03" "0004" "e8d6892d"  # CRC32C
    "ea" "0017" "01" + b"vpce-08d2bf15fac5001c9".hex() +  # AWS VPC endpoint id
    "04" "0024" + "00" * 36  # NOOP padding
)  # fmt: skip


def test_haproxy_inet_vector() -> None:
    assert len(HAPROXY_INET) == 28
    assert (
        build_v2(src_addr="127.0.0.9", dst_addr="127.0.0.1", src_port=47535, dst_port=19101) == HAPROXY_INET
    )
    header, rest = header_of(HAPROXY_INET + MQTT_CONNECT)
    assert header == ProxyHeader(2, "PROXY", "INET", "STREAM", "127.0.0.9", 47535, "127.0.0.1", 19101, (), 28)
    assert rest == MQTT_CONNECT


def test_hand_inet6_vector() -> None:
    assert len(HAND_INET6) == 52
    assert build_v2(src_addr="2001:db8::1", dst_addr="::1", src_port=443, dst_port=1883) == HAND_INET6
    header, rest = header_of(HAND_INET6)
    assert header == ProxyHeader(2, "PROXY", "INET6", "STREAM", "2001:db8::1", 443, "::1", 1883, (), 52)
    assert rest == b""


def test_hand_local_vector() -> None:
    assert build_v2(command="LOCAL") == HAND_LOCAL
    header, _ = header_of(HAND_LOCAL)
    assert (header.command, header.family, header.has_address, header.length) == (
        "LOCAL",
        "UNSPEC",
        False,
        16,
    )


def test_aws_nlb_vector() -> None:
    assert len(AWS_NLB) == 16 + 0x54
    header, rest = header_of(AWS_NLB)
    assert rest == b""
    assert (header.src_addr, header.src_port, header.dst_addr, header.dst_port) == (
        "172.31.7.113",
        51442,
        "172.31.10.31",
        80,
    )
    assert header.crc32c == 0xE8D6892D
    assert header.tlv(0xEA) == b"\x01vpce-08d2bf15fac5001c9"
    flipped = bytearray(AWS_NLB)
    flipped[19] ^= 0x01  # 172.31.7.112: the checksum no longer matches
    assert reason_of(bytes(flipped)) == "v2_crc_mismatch"


def test_builder_crc32c_covers_whole_header() -> None:
    data = build_v2(src_addr="192.0.2.1", dst_addr="192.0.2.2", src_port=1, dst_port=2, crc32c=True)
    assert data[-7:-4] == b"\x03\x00\x04"
    assert crc32c(data[:-4] + bytes(4)) == int.from_bytes(data[-4:], "big")


# --------------------------------------------------------------------------------------------------
# v2: invalid headers, each with its reason
# --------------------------------------------------------------------------------------------------


def _with_byte(data: bytes, index: int, value: int) -> bytes:
    patched = bytearray(data)
    patched[index] = value
    return bytes(patched)


_SSL_BASE = b"\x01" + bytes(4)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x11), "v2_bad_version", id="version-1"),
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x31), "v2_bad_version", id="version-3"),
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x01), "v2_bad_version", id="version-0"),
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x22), "v2_bad_command", id="command-2"),
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x2F), "v2_bad_command", id="command-15"),
        pytest.param(_with_byte(HAPROXY_INET, 13, 0x41), "v2_bad_family", id="family-4"),
        pytest.param(_with_byte(HAPROXY_INET, 13, 0x13), "v2_bad_transport", id="transport-3"),
        pytest.param(_with_byte(HAND_LOCAL, 13, 0x40), "v2_bad_family", id="local-family-4"),
        pytest.param(_with_byte(HAND_LOCAL, 13, 0x03), "v2_bad_transport", id="local-transport-3"),
        pytest.param(v2_raw(0x21, 0x11, INET_BLOCK[:11]), "v2_bad_length", id="inet-length-11"),
        pytest.param(v2_raw(0x21, 0x12, b""), "v2_bad_length", id="inet-dgram-length-0"),
        pytest.param(v2_raw(0x21, 0x21, INET_BLOCK * 2), "v2_bad_length", id="inet6-length-24"),
        pytest.param(v2_raw(0x21, 0x31, bytes(215)), "v2_bad_length", id="unix-length-215"),
        pytest.param(v2_raw(0x20, 0x11, b""), "v2_bad_length", id="local-inet-length-0"),
        pytest.param(inet_with(b"\x01\x00\x05mqt"), "v2_tlv_overrun", id="tlv-overrun"),
        pytest.param(inet_with(b"\x01\x00"), "v2_tlv_overrun", id="tlv-header-truncated"),
        pytest.param(inet_with(b"\xea\xff\xff"), "v2_tlv_overrun", id="tlv-claims-65535"),
        pytest.param(
            build_v2(src_addr="192.0.2.1", dst_addr="192.0.2.2", src_port=1, dst_port=2, crc32c=True)[:-1]
            + b"\x00",
            "v2_crc_mismatch",
            id="crc-mismatch",
        ),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_CRC32C, b"abc")), "v2_bad_crc32c", id="crc-3-bytes"),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_CRC32C, b"abcde")), "v2_bad_crc32c", id="crc-5-bytes"),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_UNIQUE_ID, bytes(129))), "v2_unique_id_too_long", id="unique-id-129"
        ),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00")), "v2_bad_ssl", id="ssl-4-bytes"),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_SSL, b"")), "v2_bad_ssl", id="ssl-empty"),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_SSL, _SSL_BASE + b"\x21\x00\x09TLSv1.3")),
            "v2_tlv_overrun",
            id="ssl-sub-tlv-overrun",
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_SSL, _SSL_BASE + b"\x21\x00")),
            "v2_tlv_overrun",
            id="ssl-sub-tlv-header-truncated",
        ),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_AUTHORITY, b"caf\xc3")), "v2_bad_utf8", id="authority-utf8"),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_SSL, _SSL_BASE + raw_tlv(PP2_SUBTYPE_SSL_CN, b"\xc3\x28"))),
            "v2_bad_utf8",
            id="ssl-cn-utf8",
        ),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_NETNS, b"\xff")), "v2_bad_utf8", id="netns-utf8"),
        pytest.param(inet_with(raw_tlv(PP2_TYPE_AUTHORITY, b"")), "v2_bad_authority", id="authority-empty"),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_AUTHORITY, b"a" * 256)), "v2_bad_authority", id="authority-256-bytes"
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_AUTHORITY, b"evil.com\r\nX-Log: forged")),
            "v2_bad_authority",
            id="authority-crlf",
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_AUTHORITY, b"a b")), "v2_bad_authority", id="authority-space"
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_ALPN, b"mqtt"), raw_tlv(PP2_TYPE_ALPN, b"h2")),
            "v2_duplicate_tlv",
            id="duplicate-alpn",
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_UNIQUE_ID, b"a"), raw_tlv(PP2_TYPE_UNIQUE_ID, b"a")),
            "v2_duplicate_tlv",
            id="duplicate-unique-id",
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_CRC32C, bytes(4)), raw_tlv(PP2_TYPE_CRC32C, bytes(4))),
            "v2_duplicate_tlv",
            id="duplicate-crc32c",
        ),
        pytest.param(
            inet_with(raw_tlv(PP2_TYPE_SSL, _SSL_BASE), raw_tlv(PP2_TYPE_SSL, _SSL_BASE)),
            "v2_duplicate_tlv",
            id="duplicate-ssl",
        ),
        pytest.param(
            inet_with(
                raw_tlv(PP2_TYPE_SSL, _SSL_BASE + raw_tlv(PP2_SUBTYPE_SSL_CN, b"a") + raw_tlv(0x22, b"b"))
            ),
            "v2_duplicate_tlv",
            id="duplicate-ssl-cn",
        ),
        pytest.param(
            build_v2(tlvs=[TLV(PP2_TYPE_NOOP, bytes(DEFAULT_MAX_V2_LENGTH))]), "v2_too_long", id="over-max"
        ),
    ],
)
def test_v2_invalid(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason
    assert outcome(split(data, range(0, len(data), 7))) == ("error", reason)


def test_v2_too_long_fails_right_after_16_bytes() -> None:
    data = build_v2(
        src_addr="192.0.2.1", dst_addr="192.0.2.2", src_port=1, dst_port=2, tlvs=[TLV(0xE0, bytes(100))]
    )
    parser = ProxyHeaderParser(max_v2_length=100)
    assert parser.feed(data[:15]) is NEED_DATA
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(data[15:16])
    assert info.value.reason == "v2_too_long"
    assert f"{len(data)} bytes" in str(info.value)


def test_v2_max_length_is_inclusive() -> None:
    data = build_v2(tlvs=[TLV(PP2_TYPE_NOOP, bytes(100))])
    assert outcome([data], max_v2_length=len(data))[0] == "header"
    assert outcome([data], max_v2_length=len(data) - 1) == ("error", "v2_too_long")


def test_v2_largest_header_fed_byte_by_byte() -> None:
    data = build_v2(tlvs=[TLV(0xE0, bytes(0xFFFF - 3))])
    assert len(data) == V2_MAX_LENGTH_CEILING
    parser = ProxyHeaderParser(max_v2_length=V2_MAX_LENGTH_CEILING)
    for index in range(len(data) - 1):
        assert parser.feed(data[index : index + 1]) is NEED_DATA
    result = parser.feed(data[-1:] + MQTT_CONNECT)
    assert result is not NEED_DATA
    assert result[0].length == V2_MAX_LENGTH_CEILING
    assert result[1] == MQTT_CONNECT


@pytest.mark.parametrize("value", [V2_MAX_LENGTH_FLOOR - 1, V2_MAX_LENGTH_CEILING + 1, 0, -1])
def test_max_v2_length_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyHeaderParser(max_v2_length=value)


# --------------------------------------------------------------------------------------------------
# Early failure: refuse as soon as the bytes so far cannot be a header
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fails_at", "reason"),
    [
        pytest.param(MQTT_CONNECT, 1, "not_proxy_protocol", id="mqtt-first-byte"),
        pytest.param(b"GET / HTTP/1.1\r\n", 1, "not_proxy_protocol", id="websocket-first-byte"),
        pytest.param(b"PROXZ TCP4", 5, "not_proxy_protocol", id="PROXZ"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", 12, "not_proxy_protocol", id="v2-signature-last-byte"),
        pytest.param(b"PROXY X", 7, "v1_bad_family", id="family-first-byte"),
        pytest.param(b"PROXY TCP4 1.2.3.04 ", 20, "v1_bad_address", id="address-at-its-space"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", 32, "v1_bad_field_count", id="extra-field"),
        pytest.param(b"PROXY TCP4\n", 11, "v1_bad_line_ending", id="bare-LF"),
        pytest.param(b"PROXY UNKNOWN " + b"a" * 200, 107, "v1_too_long", id="v1-107-bytes"),
        pytest.param(_with_byte(HAPROXY_INET, 12, 0x41), 13, "v2_bad_version", id="version-13th-byte"),
        pytest.param(_with_byte(HAPROXY_INET, 13, 0x51), 14, "v2_bad_family", id="family-14th-byte"),
        pytest.param(v2_raw(0x21, 0x21, b"", length=12), 16, "v2_bad_length", id="length-16th-byte"),
    ],
)
def test_fails_as_soon_as_possible(data: bytes, fails_at: int, reason: str) -> None:
    parser = ProxyHeaderParser()
    for index in range(fails_at - 1):
        assert parser.feed(data[index : index + 1]) is NEED_DATA, index
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(data[fails_at - 1 : fails_at])
    assert info.value.reason == reason


def test_v1_107_bytes_without_crlf_fail_in_one_read() -> None:
    # A single big read is judged on its first 107 bytes, however much more it holds.
    assert reason_of(b"PROXY UNKNOWN " + b"a" * 100_000) == "v1_too_long"


# --------------------------------------------------------------------------------------------------
# Split reads: every offset, and one byte at a time
# --------------------------------------------------------------------------------------------------

VALID_HEADERS = {
    "v1-nginx": b"PROXY TCP4 127.0.0.9 127.0.0.1 47535 19101\r\n",
    "v1-tcp6": V1_FULL_TCP6,
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-unknown-max": V1_MAX_LINE,
    "v2-haproxy": HAPROXY_INET,
    "v2-inet6": HAND_INET6,
    "v2-local": HAND_LOCAL,
    "v2-aws": AWS_NLB,
    "v2-unix": build_v2(src_addr="/run/a.sock", dst_addr="/run/b.sock", transport="DGRAM"),
    "v2-tlvs": build_v2(
        src_addr="2001:db8::7",
        dst_addr="2001:db8::1",
        src_port=50000,
        dst_port=1883,
        tlvs=[
            TLV(PP2_TYPE_ALPN, b"mqtt"),
            TLV(PP2_TYPE_AUTHORITY, b"example.org"),
            TLV(PP2_TYPE_UNIQUE_ID, bytes(16)),
            ssl_tlv(client=7, verify=0, version="TLSv1.3", cn="device-1", cipher="TLS_AES_256_GCM_SHA384"),
            TLV(PP2_TYPE_NETNS, b"ns1"),
            TLV(0xE1, b"\xab\xcd"),
        ],
        crc32c=True,
    ),
}


@pytest.mark.parametrize("name", list(VALID_HEADERS))
def test_every_split_offset(name: str) -> None:
    header_bytes = VALID_HEADERS[name]
    data = header_bytes + MQTT_CONNECT
    header, rest = header_of(data)
    assert header.length == len(header_bytes)
    assert rest == MQTT_CONNECT
    for offset in range(len(data) + 1):
        assert outcome([data[:offset], data[offset:]]) == ("header", header, rest), offset
        if offset < len(header_bytes):
            assert parse(data[:offset]) is NEED_DATA, offset


@pytest.mark.parametrize("name", list(VALID_HEADERS))
def test_one_byte_at_a_time(name: str) -> None:
    header_bytes = VALID_HEADERS[name]
    data = header_bytes + MQTT_CONNECT
    expected, _ = header_of(data)
    parser = ProxyHeaderParser()
    for index in range(len(header_bytes) - 1):
        assert parser.feed(data[index : index + 1]) is NEED_DATA
    result = parser.feed(data[len(header_bytes) - 1 : len(header_bytes)])
    assert result == (expected, b"")
    assert outcome([data[i : i + 1] for i in range(len(data))]) == ("header", expected, MQTT_CONNECT)


# --------------------------------------------------------------------------------------------------
# What follows the header
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALID_HEADERS))
def test_rest(name: str) -> None:
    header_bytes = VALID_HEADERS[name]
    assert header_of(header_bytes)[1] == b""
    assert header_of(header_bytes + MQTT_CONNECT)[1] == MQTT_CONNECT
    big = bytes(range(256)) * 256
    assert header_of(header_bytes + big)[1] == big


def test_rest_may_look_like_another_header() -> None:
    # Only one header per connection: a second one is the application's problem, returned as is.
    first = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    header, rest = header_of(first + HAPROXY_INET)
    assert header.src_addr == "1.2.3.4"
    assert rest == HAPROXY_INET


# --------------------------------------------------------------------------------------------------
# Parser lifecycle
# --------------------------------------------------------------------------------------------------


def test_feed_after_header_is_refused() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(HAPROXY_INET) != NEED_DATA
    assert parser.done
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(b"")
    assert info.value.reason == "parser_done"


def test_feed_after_error_is_refused() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(MQTT_CONNECT)
    with pytest.raises(ProxyProtocolError) as info:
        parser.feed(HAPROXY_INET)
    assert info.value.reason == "parser_done"


def test_empty_feed_re_evaluates() -> None:
    parser = ProxyHeaderParser()
    assert not parser.done
    assert parser.max_v2_length == DEFAULT_MAX_V2_LENGTH
    assert parser.feed(b"") is NEED_DATA
    assert parser.feed(b"PROXY UNKNOWN\r") is NEED_DATA
    assert parser.feed(b"") is NEED_DATA
    result = parser.feed(b"\n")
    assert result is not NEED_DATA
    assert result[0].family == "UNKNOWN"


def test_feed_accepts_bytearray_and_memoryview() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(bytearray(HAPROXY_INET[:10])) is NEED_DATA
    result = parser.feed(memoryview(HAPROXY_INET[10:] + b"x"))
    assert result is not NEED_DATA
    assert result[1] == b"x"
    assert type(result[1]) is bytes


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("1.2.3.4", "5.6.7.8", 1, 2), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="tcp4"),
        pytest.param(("::1", "2001:db8::1", 1, 2), b"PROXY TCP6 ::1 2001:db8::1 1 2\r\n", id="tcp6"),
        pytest.param((None, None, None, None), b"PROXY UNKNOWN\r\n", id="unknown"),
        pytest.param((FULL6, FULL6, 65535, 65535, "UNKNOWN"), V1_MAX_LINE, id="unknown-with-fields"),
    ],
)
def test_build_v1(args: tuple[object, ...], expected: bytes) -> None:
    assert build_v1(*args) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: build_v1("1.2.3.4", "::1", 1, 2), id="v1-mixed-families"),
        pytest.param(lambda: build_v1("1.2.3.4", None, 1, 2), id="v1-one-address"),
        pytest.param(lambda: build_v1("1.2.3.4", "5.6.7.8", None, 2), id="v1-missing-port"),
        pytest.param(lambda: build_v2(command="HEALTH"), id="v2-bad-command"),
        pytest.param(lambda: build_v2(src_addr="1.2.3.4", dst_addr="5.6.7.8"), id="v2-missing-ports"),
        pytest.param(lambda: build_v2(src_addr="/" * 109, dst_addr="/"), id="v2-unix-path-too-long"),
        pytest.param(lambda: build_v2(transport="SEQPACKET"), id="v2-bad-transport"),
        pytest.param(lambda: build_v2(tlvs=[TLV(0x100, b"")]), id="v2-tlv-type-too-big"),
        pytest.param(lambda: build_v2(tlvs=[TLV(0xE0, bytes(0x10000))]), id="v2-tlv-too-long"),
        pytest.param(lambda: build_v2(tlvs=[TLV(0xE0, bytes(0xFFFF))] * 2), id="v2-payload-too-long"),
        pytest.param(lambda: ssl_tlv(verify=-1), id="ssl-verify-negative"),
        pytest.param(
            lambda: build_v2(src_addr="::1", dst_addr="::1", src_port=1, dst_port=65536), id="v2-port-65536"
        ),
    ],
)
def test_builders_refuse_what_they_cannot_encode(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------------

_KNOWN_TYPES = [PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID]
_KNOWN_TYPES += [PP2_TYPE_SSL, PP2_TYPE_NETNS]


_TLV_VALUES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"", b"\xff", b"\xc3", b"a b", bytes(129), b"\x00\x04abcd"]),
    st.binary(max_size=10).map(lambda subs: _SSL_BASE + subs),
    st.tuples(st.sampled_from([0x21, 0x22, 0x25, 0x2F]), st.sampled_from([b"TLSv1.3", b"\xff", b""])).map(
        lambda sub: _SSL_BASE + raw_tlv(*sub)
    ),
)


@st.composite
def _v2_random_payload(draw: st.DrawFn) -> bytes:
    """A v2 header with a correct length field and a TLV-ish random payload: reaches TLV checks."""
    ver_cmd = draw(st.sampled_from([0x20, 0x21, 0x21, 0x21, 0x11, 0x22]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x10, 0x41, 0x13]))
    block = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}.get(fam >> 4, 0)
    address = draw(st.one_of(st.binary(min_size=block, max_size=block), st.binary(max_size=40)))
    tlvs = draw(
        st.lists(
            st.tuples(st.sampled_from([*_KNOWN_TYPES, 0x21, 0xEA, 0xFF]), _TLV_VALUES, st.booleans()),
            max_size=5,
        )
    )
    payload = address + b"".join(
        raw_tlv(kind, value) if honest else bytes([kind, 0, len(value) + 1]) + value
        for kind, value, honest in tlvs
    )
    header = v2_raw(ver_cmd, fam, payload)
    if draw(st.booleans()):
        # A correct checksum lets the TLV checks after it be reached; a wrong one tests the check.
        header = v2_raw(ver_cmd, fam, payload + raw_tlv(PP2_TYPE_CRC32C, bytes(4)))
        checksum = crc32c(header) ^ draw(st.sampled_from([0, 0, 1]))
        header = header[:-4] + checksum.to_bytes(4, "big")
    return header


_V1_TOKENS = st.one_of(
    st.ip_addresses().map(str),
    st.integers(min_value=-2, max_value=70_000).map(str),
    st.sampled_from(["01", "1.2.3", "::1%x", "", "00", "+1", "fe80::g", "1.2.3.04", "::ffff:1.2.3.4"]),
    st.text(alphabet="0123456789.:abcdef", max_size=12),
)
_V1_LINES = st.tuples(
    st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "TCP5"]),
    st.lists(_V1_TOKENS, max_size=6),
    st.sampled_from(["\r\n", "\r\n", "\n", "\r", "", " \r\n", "\r\n\x10"]),
).map(lambda parts: ("PROXY " + " ".join([parts[0], *parts[1]]) + parts[2]).encode())

_ANY_INPUT = st.one_of(
    st.binary(max_size=150),
    st.binary(max_size=120).map(lambda tail: V1_SIGNATURE + tail),
    st.text(alphabet="PROXYTCP46UNKOW0123456789abcdef.:%+- \r\n\t\x00é", max_size=110).map(
        lambda tail: ("PROXY " + tail).encode()
    ),
    _V1_LINES,
    st.binary(max_size=300).map(lambda tail: V2_SIGNATURE + tail),
    _v2_random_payload(),
    st.sampled_from(list(VALID_HEADERS.values())).flatmap(
        lambda header: st.binary(max_size=20).map(lambda tail: header + tail)
    ),
)


@FAST
@given(data=_ANY_INPUT, offsets=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_any_bytes_any_chunking(data: bytes, offsets: list[int]) -> None:
    """Invariant: NEED_DATA, a header or ProxyProtocolError, and the same one for every chunking."""
    whole = outcome([data])
    assert outcome(split(data, offsets)) == whole
    if len(data) <= 120:
        assert outcome([data[i : i + 1] for i in range(len(data))]) == whole
    if whole[0] == "header":
        header = whole[1]
        assert isinstance(header, ProxyHeader)
        assert data[: header.length] + whole[2] == data  # type: ignore[operator]
        json.dumps(header.as_dict())


_SAMPLES = list(VALID_HEADERS.values())


@FAST
@given(
    sample=st.sampled_from(_SAMPLES),
    position=st.integers(min_value=0, max_value=10_000),
    xor=st.integers(min_value=1, max_value=255),
    offsets=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
)
def test_one_flipped_byte(sample: bytes, position: int, xor: int, offsets: list[int]) -> None:
    """Invariant: a corrupted header never raises anything but ProxyProtocolError."""
    mutated = bytearray(sample + MQTT_CONNECT)
    mutated[position % len(sample)] ^= xor
    data = bytes(mutated)
    assert outcome(split(data, offsets)) == outcome([data])


_ports = st.integers(min_value=0, max_value=65535)


@FAST
@given(
    version=st.sampled_from([4, 6]),
    data=st.data(),
    src_port=_ports,
    dst_port=_ports,
)
def test_v1_round_trip(version: Literal[4, 6], data: st.DataObject, src_port: int, dst_port: int) -> None:
    src = str(data.draw(st.ip_addresses(v=version)))
    dst = str(data.draw(st.ip_addresses(v=version)))
    line = build_v1(src, dst, src_port, dst_port)
    header, rest = header_of(line + MQTT_CONNECT)
    assert rest == MQTT_CONNECT
    assert header.family == f"TCP{version}"
    assert (header.src_addr, header.dst_addr) == (src, dst)
    assert (header.src_port, header.dst_port) == (src_port, dst_port)
    assert header.length == len(line)


_texts = st.text(max_size=24)
_host_names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,8}){0,3}", fullmatch=True)
_unix_paths = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60).filter(
    lambda path: len(path.encode()) <= 108
)


@st.composite
def _endpoints(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(["INET", "INET6", "UNIX", "UNSPEC"]))
    if kind == "UNSPEC":
        return {}
    if kind == "UNIX":
        return {"src_addr": draw(_unix_paths), "dst_addr": draw(_unix_paths), "family": "UNIX"}
    version: Literal[4, 6] = 4 if kind == "INET" else 6
    return {
        "src_addr": str(draw(st.ip_addresses(v=version))),
        "dst_addr": str(draw(st.ip_addresses(v=version))),
        "src_port": draw(_ports),
        "dst_port": draw(_ports),
    }


@FAST
@given(
    endpoints=_endpoints(),
    transport=st.sampled_from([None, "DGRAM"]),
    alpn=st.none() | st.binary(max_size=16),
    authority=st.none() | _host_names,
    unique_id=st.none() | st.binary(max_size=128),
    netns=st.none() | _texts,
    ssl=st.none()
    | st.builds(
        SSLInfo,
        client=st.integers(0, 255),
        verify=st.integers(0, 0xFFFFFFFF),
        version=st.none() | _texts,
        cn=st.none() | _texts,
        cipher=st.none() | _texts,
        sig_alg=st.none() | _texts,
        key_alg=st.none() | _texts,
    ),
    unknown=st.lists(
        st.tuples(st.integers(0, 255).filter(lambda kind: kind not in _KNOWN_TYPES), st.binary(max_size=8)),
        max_size=3,
    ),
    noops=st.lists(st.binary(max_size=8), max_size=2),
    with_crc=st.booleans(),
)
def test_v2_round_trip(
    endpoints: dict[str, object],
    transport: str | None,
    alpn: bytes | None,
    authority: str | None,
    unique_id: bytes | None,
    netns: str | None,
    ssl: SSLInfo | None,
    unknown: list[tuple[int, bytes]],
    noops: list[bytes],
    with_crc: bool,
) -> None:
    tlvs = [TLV(PP2_TYPE_NOOP, value) for value in noops]
    if alpn is not None:
        tlvs.append(TLV(PP2_TYPE_ALPN, alpn))
    if authority is not None:
        tlvs.append(TLV(PP2_TYPE_AUTHORITY, authority.encode()))
    if unique_id is not None:
        tlvs.append(TLV(PP2_TYPE_UNIQUE_ID, unique_id))
    if netns is not None:
        tlvs.append(TLV(PP2_TYPE_NETNS, netns.encode()))
    if ssl is not None:
        fields = ("client", "verify", "version", "cn", "cipher", "sig_alg", "key_alg")
        tlvs.append(ssl_tlv(**{name: getattr(ssl, name) for name in fields}))
    tlvs.extend(TLV(kind, value) for kind, value in unknown)
    if endpoints and transport is not None:
        endpoints = {**endpoints, "transport": transport}
    data = build_v2(tlvs=tlvs, crc32c=with_crc, **endpoints)  # type: ignore[arg-type]
    header, rest = header_of(data + MQTT_CONNECT)
    assert rest == MQTT_CONNECT
    assert header.length == len(data)
    if not endpoints:
        expected_family = "UNSPEC"
    elif endpoints.get("family") == "UNIX":
        expected_family = "UNIX"
    else:
        expected_family = "INET" if ipaddress.ip_address(str(endpoints["src_addr"])).version == 4 else "INET6"
    assert header.family == expected_family
    assert header.src_addr == endpoints.get("src_addr")
    assert header.dst_addr == endpoints.get("dst_addr")
    assert header.src_port == endpoints.get("src_port")
    assert header.dst_port == endpoints.get("dst_port")
    assert header.has_address is (expected_family in ("INET", "INET6"))
    assert header.alpn == alpn
    assert header.authority == authority
    assert header.unique_id == unique_id
    assert header.netns == netns
    assert header.ssl == ssl
    assert [tlv for tlv in header.tlvs if tlv.type != PP2_TYPE_CRC32C] == tlvs
    assert (header.crc32c is not None) is with_crc
