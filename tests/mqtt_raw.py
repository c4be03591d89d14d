"""Hand-built MQTT 3.1.1 bytes for tests that must misbehave as no client library would.

Independent of ``broker.mqtt`` on purpose: the broker's codec is what these tests check.
"""

from __future__ import annotations

import socket


def varint(length: int) -> bytes:
    """The remaining-length encoding of ``length`` [MQTT-2.2.3]."""
    encoded = b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return encoded


def packet(kind: int, body: bytes) -> bytes:
    """A packet: first byte ``kind`` (type and flags), remaining length, ``body``."""
    return bytes([kind]) + varint(len(body)) + body


def string(text: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string (bytes are taken as they are, valid or not)."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def connect(
    client_id: str, clean: bool = True, will: tuple[str, bytes] | None = None, keepalive: int = 60
) -> bytes:
    """A 3.1.1 CONNECT."""
    flags = 0x02 if clean else 0x00
    payload = string(client_id)
    if will is not None:
        flags |= 0x04
        topic, message = will
        payload += string(topic) + len(message).to_bytes(2, "big") + message
    return packet(0x10, b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive.to_bytes(2, "big") + payload)


def publish(
    topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1, retain: bool = False
) -> bytes:
    """A PUBLISH (packet id only for QoS 1/2)."""
    body = string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return packet(0x30 | (qos << 1) | int(retain), body)


def subscribe(packet_id: int, *filters: tuple[str, int]) -> bytes:
    """A SUBSCRIBE of ``(filter, qos)`` pairs."""
    body = packet_id.to_bytes(2, "big") + b"".join(string(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closed first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """The next packet's first byte and body.

    Raises:
        ConnectionError: the peer closed first.
    """
    first = recv_exactly(sock, 1)
    if not first:
        raise ConnectionError("closed")
    length, shift = 0, 0
    while True:
        byte = recv_exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first[0], recv_exactly(sock, length)


def wait_closed(sock: socket.socket) -> None:
    """Read and discard until the peer closes.

    Raises:
        TimeoutError: the peer did not close within the socket's timeout.
    """
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
