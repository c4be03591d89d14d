"""MQTT 5 properties (MQTT 5 section 2.2.2): identifiers, value types, where each is allowed, codec.

Properties travel as a ``dict[str, Any]`` keyed by the snake_case property name. Values are
``int`` for the Byte, Two Byte, Four Byte and Variable Byte Integer types, ``str`` for UTF-8
strings, ``bytes`` for Binary Data, and:

* ``user_property``: ``list[tuple[str, str]]``, in wire order (it may repeat everywhere, 3.1.2.11.8);
* ``subscription_identifier``: ``list[int]`` in PUBLISH, where it may repeat (3.3.2.3.8), and a plain
  ``int`` in SUBSCRIBE, where it may not (3.8.2.1.2).

Decoding enforces the rules of 2.2.2.2 and of each property's section: an identifier unknown or
not allowed in the packet is a Malformed Packet (0x81); a property other than the two above given
twice, a Byte flag other than 0/1, a zero Receive Maximum, Maximum Packet Size or Subscription
Identifier are Protocol Errors (0x82); a zero Topic Alias is TOPIC_ALIAS_INVALID (0x94, 3.3.2.3.4).

The wire primitives (Variable Byte Integer, UTF-8 string, Binary Data; 1.5) live here too, because
properties need them and the codec imports this module, not the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.mqtt.reasons import MALFORMED_PACKET, PROTOCOL_ERROR, TOPIC_ALIAS_INVALID, MalformedPacket

# --------------------------------------------------------------------------------------------------
# Value types (MQTT 5 2.2.2.2 table 2-4 "Data Type" column, defined in 1.5)
# --------------------------------------------------------------------------------------------------

BYTE: Final = 1
TWO_BYTE_INTEGER: Final = 2
FOUR_BYTE_INTEGER: Final = 4
VARIABLE_BYTE_INTEGER: Final = 5
UTF8_STRING: Final = 6
BINARY_DATA: Final = 7
UTF8_STRING_PAIR: Final = 8

#: Largest Variable Byte Integer: four bytes of seven bits (1.5.5).
MAX_VARIABLE_BYTE_INTEGER: Final = 268_435_455

#: Pseudo packet type for the Will Properties of a CONNECT payload (3.1.3.2). Type 0 is reserved,
#: so it cannot clash with a real packet type.
WILL: Final = 0

# Packet type numbers, repeated here so that this module does not depend on the packet model.
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 2, 3, 4, 5, 6, 7
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK, _DISCONNECT, _AUTH = 8, 9, 10, 11, 14, 15

_PACKET_NAMES: Final = {
    WILL: "CONNECT will",
    _CONNECT: "CONNECT",
    _CONNACK: "CONNACK",
    _PUBLISH: "PUBLISH",
    _PUBACK: "PUBACK",
    _PUBREC: "PUBREC",
    _PUBREL: "PUBREL",
    _PUBCOMP: "PUBCOMP",
    _SUBSCRIBE: "SUBSCRIBE",
    _SUBACK: "SUBACK",
    _UNSUBSCRIBE: "UNSUBSCRIBE",
    _UNSUBACK: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    _DISCONNECT: "DISCONNECT",
    _AUTH: "AUTH",
}

# Value checks beyond the type.
_NO_CHECK: Final = 0
_FLAG: Final = 1  # Byte that must be 0 or 1
_NON_ZERO: Final = 2
_TOPIC_ALIAS: Final = 3
_TOPIC_NAME: Final = 4  # a topic name: not empty, no wildcards


@dataclass(frozen=True, slots=True)
class PropertySpec:
    """One row of MQTT 5 table 2-4: identifier, name, value type, packets it may appear in."""

    identifier: int
    name: str
    kind: int
    packets: frozenset[int]
    section: str
    check: int = _NO_CHECK


_ACKS = (_PUBACK, _PUBREC, _PUBREL, _PUBCOMP)
_ALL = frozenset({WILL, _CONNECT, _CONNACK, _PUBLISH, *_ACKS, _SUBSCRIBE, _SUBACK, _UNSUBSCRIBE})
_ALL |= {_UNSUBACK, _DISCONNECT, _AUTH}

#: Every MQTT 5 property, in identifier order (MQTT 5 2.2.2.2 table 2-4).
PROPERTIES: Final[tuple[PropertySpec, ...]] = (
    PropertySpec(0x01, "payload_format_indicator", BYTE, frozenset({_PUBLISH, WILL}), "3.3.2.3.2", _FLAG),
    PropertySpec(
        0x02, "message_expiry_interval", FOUR_BYTE_INTEGER, frozenset({_PUBLISH, WILL}), "3.3.2.3.3"
    ),
    PropertySpec(0x03, "content_type", UTF8_STRING, frozenset({_PUBLISH, WILL}), "3.3.2.3.9"),
    PropertySpec(0x08, "response_topic", UTF8_STRING, frozenset({_PUBLISH, WILL}), "3.3.2.3.5", _TOPIC_NAME),
    PropertySpec(0x09, "correlation_data", BINARY_DATA, frozenset({_PUBLISH, WILL}), "3.3.2.3.6"),
    PropertySpec(
        0x0B,
        "subscription_identifier",
        VARIABLE_BYTE_INTEGER,
        frozenset({_PUBLISH, _SUBSCRIBE}),
        "3.8.2.1.2",
        _NON_ZERO,
    ),
    PropertySpec(
        0x11,
        "session_expiry_interval",
        FOUR_BYTE_INTEGER,
        frozenset({_CONNECT, _CONNACK, _DISCONNECT}),
        "3.1.2.11.2",
    ),
    PropertySpec(0x12, "assigned_client_identifier", UTF8_STRING, frozenset({_CONNACK}), "3.2.2.3.7"),
    PropertySpec(0x13, "server_keep_alive", TWO_BYTE_INTEGER, frozenset({_CONNACK}), "3.2.2.3.14"),
    PropertySpec(
        0x15, "authentication_method", UTF8_STRING, frozenset({_CONNECT, _CONNACK, _AUTH}), "3.1.2.11.9"
    ),
    PropertySpec(
        0x16, "authentication_data", BINARY_DATA, frozenset({_CONNECT, _CONNACK, _AUTH}), "3.1.2.11.10"
    ),
    PropertySpec(0x17, "request_problem_information", BYTE, frozenset({_CONNECT}), "3.1.2.11.7", _FLAG),
    PropertySpec(0x18, "will_delay_interval", FOUR_BYTE_INTEGER, frozenset({WILL}), "3.1.3.2.2"),
    PropertySpec(0x19, "request_response_information", BYTE, frozenset({_CONNECT}), "3.1.2.11.6", _FLAG),
    PropertySpec(0x1A, "response_information", UTF8_STRING, frozenset({_CONNACK}), "3.2.2.3.15"),
    PropertySpec(0x1C, "server_reference", UTF8_STRING, frozenset({_CONNACK, _DISCONNECT}), "3.2.2.3.16"),
    PropertySpec(
        0x1F,
        "reason_string",
        UTF8_STRING,
        frozenset({_CONNACK, *_ACKS, _SUBACK, _UNSUBACK, _DISCONNECT, _AUTH}),
        "3.2.2.3.9",
    ),
    PropertySpec(
        0x21, "receive_maximum", TWO_BYTE_INTEGER, frozenset({_CONNECT, _CONNACK}), "3.1.2.11.3", _NON_ZERO
    ),
    PropertySpec(
        0x22, "topic_alias_maximum", TWO_BYTE_INTEGER, frozenset({_CONNECT, _CONNACK}), "3.1.2.11.5"
    ),
    PropertySpec(0x23, "topic_alias", TWO_BYTE_INTEGER, frozenset({_PUBLISH}), "3.3.2.3.4", _TOPIC_ALIAS),
    PropertySpec(0x24, "maximum_qos", BYTE, frozenset({_CONNACK}), "3.2.2.3.4", _FLAG),
    PropertySpec(0x25, "retain_available", BYTE, frozenset({_CONNACK}), "3.2.2.3.5", _FLAG),
    PropertySpec(0x26, "user_property", UTF8_STRING_PAIR, _ALL, "3.1.2.11.8"),
    PropertySpec(
        0x27,
        "maximum_packet_size",
        FOUR_BYTE_INTEGER,
        frozenset({_CONNECT, _CONNACK}),
        "3.1.2.11.4",
        _NON_ZERO,
    ),
    PropertySpec(0x28, "wildcard_subscription_available", BYTE, frozenset({_CONNACK}), "3.2.2.3.11", _FLAG),
    PropertySpec(0x29, "subscription_identifier_available", BYTE, frozenset({_CONNACK}), "3.2.2.3.12", _FLAG),
    PropertySpec(0x2A, "shared_subscription_available", BYTE, frozenset({_CONNACK}), "3.2.2.3.13", _FLAG),
)

BY_IDENTIFIER: Final[dict[int, PropertySpec]] = {spec.identifier: spec for spec in PROPERTIES}
BY_NAME: Final[dict[str, PropertySpec]] = {spec.name: spec for spec in PROPERTIES}
#: The property names each packet type (or :data:`WILL`) allows.
ALLOWED: Final[dict[int, frozenset[str]]] = {
    packet: frozenset(spec.name for spec in PROPERTIES if packet in spec.packets) for packet in _PACKET_NAMES
}

# Identifier byte -> spec, as a 128-entry tuple: one index instead of a dict lookup per property.
_TABLE: Final[tuple[PropertySpec | None, ...]] = tuple(BY_IDENTIFIER.get(ident) for ident in range(128))


# --------------------------------------------------------------------------------------------------
# Wire primitives (1.5)
# --------------------------------------------------------------------------------------------------


def read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a Variable Byte Integer at ``pos``; return it and the position after it.

    Raises :class:`MalformedPacket` (0x81) if it runs past ``end``, has more than four bytes, or
    is not encoded in the fewest bytes [MQTT-1.5.5-1].
    """
    value = 0
    shift = 0
    for index in range(4):
        if pos >= end:
            raise MalformedPacket(MALFORMED_PACKET, f"{what} runs past the end of the packet (MQTT 5 1.5.5)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and index:
                raise MalformedPacket(
                    MALFORMED_PACKET, f"{what} is not encoded in the fewest bytes [MQTT-1.5.5-1]"
                )
            return value, pos
        shift += 7
    raise MalformedPacket(MALFORMED_PACKET, f"{what} is longer than 4 bytes (MQTT 5 1.5.5)")


def read_string(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """Read a UTF-8 Encoded String (2-byte length, then UTF-8) at ``pos``.

    Raises :class:`MalformedPacket` (0x81) if it runs past ``end``, is not well-formed UTF-8 (which
    includes encoded surrogates U+D800-U+DFFF and overlong forms) [MQTT-1.5.3-1], or contains
    U+0000 [MQTT-1.5.3-2]. Control characters and non-characters are accepted: the spec says a
    receiver MAY close on them (1.5.3), and refusing them would break clients that are within it.
    A BOM (U+FEFF) is kept as is [MQTT-1.5.3-3].
    """
    if pos + 2 > end:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} runs past the end of the packet (1.5.3)")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} runs past the end of the packet (1.5.3)")
    try:
        text = data[pos + 2 : stop].decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket(
            MALFORMED_PACKET, f"{what} is not well-formed UTF-8 ({exc.reason}) [MQTT-1.5.3-1]"
        ) from None
    if "\x00" in text:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} contains U+0000 [MQTT-1.5.3-2]")
    return text, stop


def read_binary(data: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    """Read Binary Data (2-byte length, then bytes) at ``pos``.

    Raises :class:`MalformedPacket` (0x81) if it runs past ``end``.
    """
    if pos + 2 > end:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} runs past the end of the packet (1.5.6)")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} runs past the end of the packet (1.5.6)")
    return data[pos + 2 : stop], stop


def encode_varint(value: int) -> bytes:
    """Encode a Variable Byte Integer in the fewest bytes. Raises ValueError outside 0-268,435,455."""
    if value < 0x80:
        if value < 0:
            raise ValueError(f"variable byte integer {value} is negative")
        return bytes((value,))
    if value > MAX_VARIABLE_BYTE_INTEGER:
        raise ValueError(f"variable byte integer {value} exceeds {MAX_VARIABLE_BYTE_INTEGER} (1.5.5)")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(text: str) -> bytes:
    """Encode a UTF-8 Encoded String.

    Raises ValueError (UnicodeEncodeError for a lone surrogate) if ``text`` cannot be sent: it
    contains U+0000 [MQTT-1.5.3-2] or is longer than 65,535 bytes encoded.
    """
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"string of {len(raw)} bytes is longer than 65535 (1.5.3)")
    if b"\x00" in raw:
        raise ValueError("string contains U+0000 [MQTT-1.5.3-2]")
    return len(raw).to_bytes(2, "big") + raw


def encode_binary(data: bytes | bytearray | memoryview) -> bytes:
    """Encode Binary Data. Raises ValueError if longer than 65,535 bytes."""
    if len(data) > 0xFFFF:
        raise ValueError(f"binary data of {len(data)} bytes is longer than 65535 (1.5.6)")
    return len(data).to_bytes(2, "big") + bytes(data)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


def _problem(packet_type: int, spec: PropertySpec, value: Any) -> MalformedPacket | None:
    """The error a value breaks beyond its type, or None."""
    check = spec.check
    where = f"{_PACKET_NAMES[packet_type]} {spec.name}"
    if check == _FLAG and value not in (0, 1):
        return MalformedPacket(PROTOCOL_ERROR, f"{where} is {value}, must be 0 or 1 (MQTT 5 {spec.section})")
    if check == _NON_ZERO and value == 0:
        return MalformedPacket(PROTOCOL_ERROR, f"{where} is 0 (MQTT 5 {spec.section})")
    if check == _TOPIC_ALIAS and value == 0:
        return MalformedPacket(TOPIC_ALIAS_INVALID, f"{where} is 0 [MQTT-3.3.2-8]")
    if check == _TOPIC_NAME and (not value or "+" in value or "#" in value):
        return MalformedPacket(
            PROTOCOL_ERROR, f"{where} {value!r} is not a topic name [MQTT-3.3.2-14] (MQTT 5 4.7.3)"
        )
    return None


def decode_properties(data: bytes, pos: int, end: int, packet_type: int) -> tuple[dict[str, Any], int]:
    """Read a property block (Property Length, then properties) of ``packet_type`` at ``pos``.

    Returns the properties and the position after the block. ``packet_type`` is a packet type
    number or :data:`WILL`.

    Raises :class:`MalformedPacket`: 0x81 if the block or a value runs past ``end`` or past the
    Property Length, or an identifier is unknown or not allowed in ``packet_type`` (2.2.2.2);
    0x82 for a non-repeatable property given twice or a value out of its range; 0x94 for
    topic_alias 0.
    """
    if pos >= end:
        raise MalformedPacket(
            MALFORMED_PACKET, f"{_PACKET_NAMES[packet_type]} property length is missing (MQTT 5 2.2.2.1)"
        )
    length = data[pos]
    if not length:  # by far the most common block: no properties at all
        return {}, pos + 1
    if length < 0x80:
        pos += 1
    else:
        length, pos = read_varint(data, pos, end, f"{_PACKET_NAMES[packet_type]} property length")
    stop = pos + length
    if stop > end:
        raise MalformedPacket(
            MALFORMED_PACKET,
            f"{_PACKET_NAMES[packet_type]} property length {length} runs past the end of the packet "
            "(MQTT 5 2.2.2.1)",
        )
    properties: dict[str, Any] = {}
    while pos < stop:
        identifier = data[pos]
        spec = _TABLE[identifier] if identifier < 0x80 else None
        if spec is None:
            # An identifier is a Variable Byte Integer; every defined one fits in a byte, so a
            # continuation bit means an unknown identifier as surely as an unassigned value does.
            raise MalformedPacket(
                MALFORMED_PACKET,
                f"{_PACKET_NAMES[packet_type]} has unknown property identifier 0x{identifier:02X} "
                "(MQTT 5 2.2.2.2)",
            )
        if packet_type not in spec.packets:
            raise MalformedPacket(
                MALFORMED_PACKET,
                f"{_PACKET_NAMES[packet_type]} may not carry property {spec.name} (0x{identifier:02X}) "
                "(MQTT 5 2.2.2.2)",
            )
        pos += 1
        kind = spec.kind
        value: Any
        if kind == BYTE:
            if pos >= stop:
                raise _overrun(packet_type, spec)
            value = data[pos]
            pos += 1
        elif kind == TWO_BYTE_INTEGER:
            if pos + 2 > stop:
                raise _overrun(packet_type, spec)
            value = (data[pos] << 8) | data[pos + 1]
            pos += 2
        elif kind == FOUR_BYTE_INTEGER:
            if pos + 4 > stop:
                raise _overrun(packet_type, spec)
            value = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        else:
            what = f"{_PACKET_NAMES[packet_type]} property {spec.name}"
            if kind == VARIABLE_BYTE_INTEGER:
                value, pos = read_varint(data, pos, stop, what)
            elif kind == UTF8_STRING:
                value, pos = read_string(data, pos, stop, what)
            elif kind == BINARY_DATA:
                value, pos = read_binary(data, pos, stop, what)
            else:
                key, pos = read_string(data, pos, stop, f"{what} name")
                text, pos = read_string(data, pos, stop, f"{what} value")
                value = (key, text)
        problem = _problem(packet_type, spec, value) if spec.check else None
        if problem is not None:
            raise problem
        name = spec.name
        if identifier == 0x26 or (identifier == 0x0B and packet_type == _PUBLISH):
            listed = properties.get(name)
            if listed is None:
                properties[name] = [value]
            else:
                listed.append(value)
        elif name in properties:
            raise MalformedPacket(
                PROTOCOL_ERROR,
                f"{_PACKET_NAMES[packet_type]} carries {name} more than once (MQTT 5 {spec.section})",
            )
        else:
            properties[name] = value
    return properties, stop


def _overrun(packet_type: int, spec: PropertySpec) -> MalformedPacket:
    return MalformedPacket(
        MALFORMED_PACKET,
        f"{_PACKET_NAMES[packet_type]} property {spec.name} runs past the property length (MQTT 5 2.2.2.1)",
    )


def _integer(value: Any, size: int, name: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
        raise ValueError(f"property {name} = {value!r} is not an integer of {size} byte(s)")
    return value.to_bytes(size, "big")


def _encode_one(spec: PropertySpec, value: Any) -> bytes:
    head = bytes((spec.identifier,))
    kind = spec.kind
    if kind == BYTE:
        return head + _integer(value, 1, spec.name)
    if kind == TWO_BYTE_INTEGER:
        return head + _integer(value, 2, spec.name)
    if kind == FOUR_BYTE_INTEGER:
        return head + _integer(value, 4, spec.name)
    if kind == VARIABLE_BYTE_INTEGER:
        if not isinstance(value, int):
            raise ValueError(f"property {spec.name} = {value!r} is not an integer")
        return head + encode_varint(value)
    if kind == UTF8_STRING:
        if not isinstance(value, str):
            raise ValueError(f"property {spec.name} = {value!r} is not a str")
        return head + encode_string(value)
    if kind == BINARY_DATA:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"property {spec.name} = {value!r} is not bytes")
        return head + encode_binary(value)
    key, text = value
    return head + encode_string(key) + encode_string(text)


def encode_properties(properties: Mapping[str, Any] | None, packet_type: int) -> bytes:
    """Encode a property block (Property Length, then properties in the mapping's order).

    ``user_property`` takes a list of pairs; ``subscription_identifier`` a list of ints or one int
    (one only in SUBSCRIBE). Returns ``b"\\x00"`` for no properties.

    Raises ValueError for an unknown name, a property ``packet_type`` does not allow, or a value of
    the wrong type or out of range.
    """
    if not properties:
        return b"\x00"
    allowed = ALLOWED[packet_type]
    parts: list[bytes] = []
    for name, value in properties.items():
        spec = BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"unknown MQTT 5 property {name!r}")
        if name not in allowed:
            raise ValueError(f"{_PACKET_NAMES[packet_type]} may not carry property {name} (MQTT 5 2.2.2.2)")
        if name == "user_property":
            parts.extend(_encode_one(spec, pair) for pair in value)
        elif name == "subscription_identifier" and isinstance(value, list | tuple):
            if packet_type != _PUBLISH and len(value) != 1:
                raise ValueError(f"{_PACKET_NAMES[packet_type]} carries one subscription_identifier")
            parts.extend(_encode_one(spec, item) for item in value)
        else:
            parts.append(_encode_one(spec, value))
    body = b"".join(parts)
    return encode_varint(len(body)) + body
