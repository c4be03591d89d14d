"""MQTT 3.1.1 and 5.0 wire format: an incremental, strict :class:`Decoder` and the encoders.

Sans-I/O: bytes in, packets (:mod:`broker.mqtt.packets`) out, and back. The decoder raises one
exception, :class:`MalformedPacket`, whose ``reason_code`` names the problem and whose message
cites the rule broken: the normative statement of MQTT 3.1.1 (``[MQTT-3.3.2-2]``) where there is
one, otherwise the MQTT 5.0 section. Errors are reported in stream order and as early as the bytes
allow (a bad first byte fails before its remaining length arrives, an oversized packet before its
body), so the same input fails the same way however it is split into reads.

Decisions where the specs leave room:

* Remaining Length: at most four bytes, at both levels. MQTT 5 also requires the fewest bytes
  [MQTT-1.5.5-1]; 3.1.1 has no such rule, so that is checked only after an MQTT 5 CONNECT.
* UTF-8 strings: ill-formed UTF-8 (surrogates, overlong forms) and U+0000 are refused
  [MQTT-1.5.3-1/2]; control characters and non-characters are accepted, the spec says a receiver
  MAY close on them and clients do send them. See :func:`~broker.mqtt.properties.read_string`.
* Packet identifier 0 is refused wherever one is present [MQTT-2.3.1-1]: PUBLISH QoS > 0, its
  acknowledgements, SUBSCRIBE, UNSUBSCRIBE and their acknowledgements.
* Topic filters are checked for syntax [MQTT-4.7.1-2/3, MQTT-4.7.3-1] (and, at MQTT 5, the
  ``$share/{name}/{filter}`` form, MQTT 5 4.8.2) with reason 0x8F; a PUBLISH or will topic with a
  wildcard, or empty, is 0x90. Everything beyond syntax (authorization, ``$`` topics, limits) is
  the engine's business.
* Reason codes are refused when the packet's table does not list them (0x82), since a receiver
  cannot act on a code it does not know.
* CONNECT: a known protocol name with an unknown level, or an unknown level, is 0x84 (the protocol
  answers CONNACK return code 1 [MQTT-3.1.2-2]); an unknown protocol name is 0x82 (closed without
  an answer [MQTT-3.1.2-1], as mosquitto does). A 3.1.1 zero-byte client id with CleanSession 0,
  and a 3.1 client id outside 1-23 characters, are 0x85 (CONNACK 2, [MQTT-3.1.3-8]).

The decoder takes its protocol level from the first CONNECT it decodes; its ``protocol_level``
can also be set directly (a client-side decoder).

Encoders raise :class:`ValueError` for what cannot be put on the wire (a packet id outside
1-65535, a string over 65,535 bytes, QoS 3, a packet longer than 268,435,460 bytes, AUTH at 3.1.1,
a CONNACK or SUBACK code 3.1.1 does not have) and do not otherwise judge content: tests use them
to build packets the decoder must refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from broker.mqtt import properties as _props
from broker.mqtt.packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from broker.mqtt.properties import (
    decode_properties,
    encode_binary,
    encode_properties,
    encode_string,
    encode_varint,
    read_binary,
    read_string,
)
from broker.mqtt.reasons import (
    AUTH_REASONS,
    CLIENT_IDENTIFIER_NOT_VALID,
    CONNACK_REASONS,
    DISCONNECT_REASONS,
    MALFORMED_PACKET,
    PACKET_TOO_LARGE,
    PROTOCOL_ERROR,
    PUBACK_REASONS,
    PUBCOMP_REASONS,
    PUBREC_REASONS,
    PUBREL_REASONS,
    SUBACK_REASONS,
    TOPIC_FILTER_INVALID,
    TOPIC_NAME_INVALID,
    UNSUBACK_REASONS,
    UNSUPPORTED_PROTOCOL_VERSION,
    V3_CONNACK_CODES,
    V3_SUBACK_CODES,
    MalformedPacket,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "Decoder",
    "MalformedPacket",
    "encode",
    "encode_publish_parts",
]

#: Largest Remaining Length: four bytes of seven bits (3.1.1 2.2.3, MQTT 5 2.1.4).
MAX_REMAINING_LENGTH: Final = 268_435_455
#: Largest whole packet: first byte, four length bytes, the largest body.
MAX_PACKET_SIZE: Final = 1 + 4 + MAX_REMAINING_LENGTH

#: The protocol levels the CONNECT packet may name (3.1.2.2): 3 is MQTT 3.1 ("MQIsdp").
KNOWN_LEVELS: Final = frozenset({3, 4, 5})
#: The 3.1 spec caps client identifiers at 23 characters; 3.1.1 and 5 lifted that.
V31_MAX_CLIENT_ID: Final = 23

_NAMES: Final = {int(kind): kind.name for kind in PacketType}


# --------------------------------------------------------------------------------------------------
# First byte checks, precomputed: one tuple index per packet on the hot path
# --------------------------------------------------------------------------------------------------


def _first_byte_problem(first: int, level: int) -> tuple[int, str] | None:
    kind = first >> 4
    flags = first & 0x0F
    if kind == 0:
        return MALFORMED_PACKET, "packet type 0 is reserved (3.1.1 2.2.1, MQTT 5 2.1.2)"
    if kind == 15 and level != 5:
        return MALFORMED_PACKET, "packet type 15 (AUTH) is reserved at MQTT 3.1.1 (3.1.1 2.2.1)"
    if kind == 3:
        qos = (flags >> 1) & 3
        if qos == 3:
            return MALFORMED_PACKET, "PUBLISH with QoS 3 [MQTT-3.3.1-4]"
        if flags & 0x08 and not qos:
            return MALFORMED_PACKET, "PUBLISH with DUP 1 at QoS 0 [MQTT-3.3.1-2]"
        return None
    expected = 0b0010 if kind in (6, 8, 10) else 0
    if flags != expected:
        return (
            MALFORMED_PACKET,
            f"{_NAMES[kind]} with fixed header flags 0b{flags:04b}, must be 0b{expected:04b} "
            "[MQTT-2.2.2-1] [MQTT-2.2.2-2]",
        )
    return None


_FIRST_BYTE: Final[dict[int, tuple[tuple[int, str] | None, ...]]] = {
    level: tuple(_first_byte_problem(first, level) for first in range(256)) for level in (4, 5)
}


def _short(what: str) -> MalformedPacket:
    return MalformedPacket(MALFORMED_PACKET, f"{what}: remaining length too short for its contents")


def _trailing(what: str, extra: int) -> MalformedPacket:
    return MalformedPacket(
        MALFORMED_PACKET, f"{what}: {extra} byte(s) after its contents, remaining length too long"
    )


def _topic_name_problem(topic: str, where: str) -> MalformedPacket:
    """The error for a topic name that is empty or holds a wildcard (the caller checked it does)."""
    if not topic:
        return MalformedPacket(TOPIC_NAME_INVALID, f"{where} is empty [MQTT-4.7.3-1]")
    if "\x00" in topic:
        return MalformedPacket(MALFORMED_PACKET, f"{where} contains U+0000 [MQTT-1.5.3-2]")
    return MalformedPacket(TOPIC_NAME_INVALID, f"{where} {topic!r} contains a wildcard [MQTT-3.3.2-2]")


def topic_filter_problem(topic_filter: str, level: int) -> str | None:
    """Why ``topic_filter`` is not a valid topic filter at ``level``, or None. Never raises.

    Checks syntax only: non-empty [MQTT-4.7.3-1], ``#`` alone in the last level [MQTT-4.7.1-2],
    ``+`` alone in its level [MQTT-4.7.1-3]; at level 5 also the shared form (MQTT 5 4.8.2).
    """
    if not topic_filter:
        return "is empty [MQTT-4.7.3-1]"
    if "+" in topic_filter or "#" in topic_filter:
        levels = topic_filter.split("/")
        last = len(levels) - 1
        for index, part in enumerate(levels):
            if part == "+":
                continue
            if part == "#":
                if index != last:
                    return "has '#' before its last level [MQTT-4.7.1-2]"
                continue
            if "#" in part:
                return "has '#' that is not a whole level [MQTT-4.7.1-2]"
            if "+" in part:
                return "has '+' that is not a whole level [MQTT-4.7.1-3]"
    if level == 5 and topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            return "is a shared subscription without a share name and a filter [MQTT-4.8.2-1] [MQTT-4.8.2-2]"
        if "+" in parts[1] or "#" in parts[1]:
            return "has a wildcard in its share name [MQTT-4.8.2-2]"
    return None


def _read_filter(data: bytes, pos: int, end: int, what: str, level: int) -> tuple[str, int]:
    topic_filter, pos = read_string(data, pos, end, f"{what} topic filter")
    problem = topic_filter_problem(topic_filter, level)
    if problem is not None:
        raise MalformedPacket(TOPIC_FILTER_INVALID, f"{what} topic filter {topic_filter!r} {problem}")
    return topic_filter, pos


def _packet_id(data: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise _short(what)
    packet_id = (data[pos] << 8) | data[pos + 1]
    if not packet_id:
        raise MalformedPacket(MALFORMED_PACKET, f"{what} with packet identifier 0 [MQTT-2.3.1-1]")
    return packet_id


def _bad_reason(what: str, code: int) -> MalformedPacket:
    return MalformedPacket(PROTOCOL_ERROR, f"{what} with reason code 0x{code:02X}, not one its table allows")


# --------------------------------------------------------------------------------------------------
# Decoders of everything but PUBLISH (which the loop decodes inline)
# --------------------------------------------------------------------------------------------------

_Body = Callable[["Decoder", bytes, int, int], Packet]


def _decode_connect(decoder: Decoder, data: bytes, pos: int, end: int) -> Connect:
    name, pos = read_string(data, pos, end, "CONNECT protocol name")
    if pos >= end:
        raise _short("CONNECT")
    level = data[pos]
    pos += 1
    if level not in KNOWN_LEVELS:
        raise MalformedPacket(
            UNSUPPORTED_PROTOCOL_VERSION,
            f"CONNECT protocol level {level} ({name!r}) is not 3, 4 or 5 [MQTT-3.1.2-2]",
        )
    if name != ("MQIsdp" if level == 3 else "MQTT"):
        if name in ("MQTT", "MQIsdp"):
            raise MalformedPacket(
                UNSUPPORTED_PROTOCOL_VERSION,
                f"CONNECT protocol name {name!r} with level {level} [MQTT-3.1.2-2]",
            )
        raise MalformedPacket(PROTOCOL_ERROR, f"CONNECT protocol name {name!r} is not 'MQTT' [MQTT-3.1.2-1]")
    if decoder.connect_level is None:
        # Switch before the rest is checked: a malformed MQTT 5 CONNECT is answered in MQTT 5. Only
        # the first CONNECT counts: a second one is a violation, not a change of dialect.
        decoder.connect_level = level
        decoder.protocol_level = level
    v5 = level == 5
    if pos + 3 > end:
        raise _short("CONNECT")
    flags = data[pos]
    keepalive = (data[pos + 1] << 8) | data[pos + 2]
    pos += 3
    if flags & 0x01:
        raise MalformedPacket(MALFORMED_PACKET, "CONNECT reserved flag is 1 [MQTT-3.1.2-3]")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = (flags & 0x20) != 0
    if not will_flag:
        if will_qos:
            raise MalformedPacket(MALFORMED_PACKET, "CONNECT will QoS without will flag [MQTT-3.1.2-13]")
        if will_retain:
            raise MalformedPacket(MALFORMED_PACKET, "CONNECT will retain without will flag [MQTT-3.1.2-15]")
    elif will_qos == 3:
        raise MalformedPacket(MALFORMED_PACKET, "CONNECT will QoS 3 [MQTT-3.1.2-14]")
    has_username = flags & 0x80
    has_password = flags & 0x40
    if has_password and not has_username and not v5:
        raise MalformedPacket(
            MALFORMED_PACKET, "CONNECT password flag without user name flag [MQTT-3.1.2-22]"
        )
    properties: dict[str, Any] = {}
    if v5:
        properties, pos = decode_properties(data, pos, end, PacketType.CONNECT)
        if "authentication_data" in properties and "authentication_method" not in properties:
            raise MalformedPacket(
                PROTOCOL_ERROR,
                "CONNECT authentication_data without authentication_method (MQTT 5 3.1.2.11.10)",
            )
    client_id, pos = read_string(data, pos, end, "CONNECT client identifier")
    will = None
    if will_flag:
        will_properties: dict[str, Any] = {}
        if v5:
            will_properties, pos = decode_properties(data, pos, end, _props.WILL)
        will_topic, pos = read_string(data, pos, end, "CONNECT will topic")
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise _topic_name_problem(will_topic, "CONNECT will topic")
        will_payload, pos = read_binary(data, pos, end, "CONNECT will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = None
    if has_username:
        username, pos = read_string(data, pos, end, "CONNECT user name")
    password = None
    if has_password:
        password, pos = read_binary(data, pos, end, "CONNECT password")
    if pos != end:
        raise _trailing("CONNECT", end - pos)
    clean_start = (flags & 0x02) != 0
    if level == 4 and not client_id and not clean_start:
        raise MalformedPacket(
            CLIENT_IDENTIFIER_NOT_VALID,
            "CONNECT with a zero-byte client id and CleanSession 0 [MQTT-3.1.3-8]",
        )
    if level == 3 and not 1 <= len(client_id) <= V31_MAX_CLIENT_ID:
        raise MalformedPacket(
            CLIENT_IDENTIFIER_NOT_VALID, "MQTT 3.1 CONNECT client id must be 1-23 characters (3.1 3.1)"
        )
    return Connect(name, level, clean_start, keepalive, client_id, username, password, will, properties)


def _decode_connack(decoder: Decoder, data: bytes, pos: int, end: int) -> Connack:
    if pos + 2 > end:
        raise _short("CONNACK")
    flags = data[pos]
    code = data[pos + 1]
    if flags & 0xFE:
        raise MalformedPacket(MALFORMED_PACKET, "CONNACK reserved acknowledge flags are not 0 [MQTT-3.2.2-1]")
    if decoder.protocol_level != 5:
        if end - pos != 2:
            raise _trailing("CONNACK", end - pos - 2)
        if code not in V3_CONNACK_CODES:
            raise MalformedPacket(MALFORMED_PACKET, f"CONNACK return code {code} is reserved (3.1.1 3.2.2.3)")
        return Connack(flags == 1, code, {})
    if code not in CONNACK_REASONS:
        raise _bad_reason("CONNACK", code)
    properties, pos = decode_properties(data, pos + 2, end, PacketType.CONNACK)
    if pos != end:
        raise _trailing("CONNACK", end - pos)
    return Connack(flags == 1, code, properties)


def _ack_decoder(
    cls: type[Puback | Pubrec | Pubrel | Pubcomp], kind: PacketType, reasons: frozenset[int]
) -> _Body:
    what = kind.name

    def decode(decoder: Decoder, data: bytes, pos: int, end: int) -> Packet:
        packet_id = _packet_id(data, pos, end, what)
        length = end - pos
        if decoder.protocol_level != 5:
            if length != 2:
                raise _trailing(what, length - 2)
            return cls(packet_id, 0, {})
        # MQTT 5 3.4.2.1: the reason code may be omitted (length 2), and the property length too
        # (length 3).
        if length == 2:
            return cls(packet_id, 0, {})
        code = data[pos + 2]
        if code not in reasons:
            raise _bad_reason(what, code)
        if length == 3:
            return cls(packet_id, code, {})
        properties, pos = decode_properties(data, pos + 3, end, kind)
        if pos != end:
            raise _trailing(what, end - pos)
        return cls(packet_id, code, properties)

    return decode


def _decode_subscribe(decoder: Decoder, data: bytes, pos: int, end: int) -> Subscribe:
    level = decoder.protocol_level
    packet_id = _packet_id(data, pos, end, "SUBSCRIBE")
    pos += 2
    properties: dict[str, Any] = {}
    if level == 5:
        properties, pos = decode_properties(data, pos, end, PacketType.SUBSCRIBE)
    subscriptions: list[Subscription] = []
    while pos < end:
        topic_filter, pos = _read_filter(data, pos, end, "SUBSCRIBE", level)
        if pos >= end:
            raise _short("SUBSCRIBE")
        options = data[pos]
        pos += 1
        qos = options & 0x03
        if qos == 3:
            raise MalformedPacket(
                MALFORMED_PACKET, f"SUBSCRIBE {topic_filter!r} requests QoS 3 [MQTT-3.8.3-4]"
            )
        if level != 5:
            if options & 0xFC:
                raise MalformedPacket(
                    MALFORMED_PACKET,
                    f"SUBSCRIBE {topic_filter!r} has reserved option bits set [MQTT-3.8.3-4]",
                )
            subscriptions.append(Subscription(topic_filter, qos))
            continue
        if options & 0xC0:
            raise MalformedPacket(
                MALFORMED_PACKET, f"SUBSCRIBE {topic_filter!r} has reserved option bits set [MQTT-3.8.3-5]"
            )
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise MalformedPacket(
                PROTOCOL_ERROR, f"SUBSCRIBE {topic_filter!r} has Retain Handling 3 (MQTT 5 3.8.3.1)"
            )
        no_local = (options & 0x04) != 0
        if no_local and topic_filter.startswith("$share/"):
            raise MalformedPacket(
                PROTOCOL_ERROR, f"SUBSCRIBE shared subscription {topic_filter!r} with No Local [MQTT-3.8.3-4]"
            )
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, (options & 0x08) != 0, retain_handling)
        )
    if not subscriptions:
        raise MalformedPacket(PROTOCOL_ERROR, "SUBSCRIBE without any topic filter [MQTT-3.8.3-3]")
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(decoder: Decoder, data: bytes, pos: int, end: int) -> Suback:
    packet_id = _packet_id(data, pos, end, "SUBACK")
    pos += 2
    properties: dict[str, Any] = {}
    if decoder.protocol_level == 5:
        properties, pos = decode_properties(data, pos, end, PacketType.SUBACK)
        allowed = SUBACK_REASONS
    else:
        allowed = V3_SUBACK_CODES
    codes = list(data[pos:end])
    if not codes:
        raise MalformedPacket(MALFORMED_PACKET, "SUBACK without any return code (3.9.3)")
    for code in codes:
        if code not in allowed:
            if decoder.protocol_level != 5:
                raise MalformedPacket(MALFORMED_PACKET, f"SUBACK return code 0x{code:02X} [MQTT-3.9.3-2]")
            raise _bad_reason("SUBACK", code)
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(decoder: Decoder, data: bytes, pos: int, end: int) -> Unsubscribe:
    level = decoder.protocol_level
    packet_id = _packet_id(data, pos, end, "UNSUBSCRIBE")
    pos += 2
    properties: dict[str, Any] = {}
    if level == 5:
        properties, pos = decode_properties(data, pos, end, PacketType.UNSUBSCRIBE)
    topic_filters: list[str] = []
    while pos < end:
        topic_filter, pos = _read_filter(data, pos, end, "UNSUBSCRIBE", level)
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise MalformedPacket(PROTOCOL_ERROR, "UNSUBSCRIBE without any topic filter [MQTT-3.10.3-2]")
    return Unsubscribe(packet_id, topic_filters, properties)


def _decode_unsuback(decoder: Decoder, data: bytes, pos: int, end: int) -> Unsuback:
    packet_id = _packet_id(data, pos, end, "UNSUBACK")
    if decoder.protocol_level != 5:
        if end - pos != 2:
            raise _trailing("UNSUBACK", end - pos - 2)
        return Unsuback(packet_id, [], {})
    properties, pos = decode_properties(data, pos + 2, end, PacketType.UNSUBACK)
    codes = list(data[pos:end])
    if not codes:
        raise MalformedPacket(MALFORMED_PACKET, "UNSUBACK without any reason code (MQTT 5 3.11.3)")
    for code in codes:
        if code not in UNSUBACK_REASONS:
            raise _bad_reason("UNSUBACK", code)
    return Unsuback(packet_id, codes, properties)


def _empty_decoder(cls: type[Pingreq | Pingresp], kind: PacketType) -> _Body:
    def decode(decoder: Decoder, data: bytes, pos: int, end: int) -> Packet:
        if end != pos:
            raise _trailing(kind.name, end - pos)
        return cls()

    return decode


def _decode_disconnect(decoder: Decoder, data: bytes, pos: int, end: int) -> Disconnect:
    if pos == end:
        return Disconnect(0, {})
    if decoder.protocol_level != 5:
        raise _trailing("DISCONNECT", end - pos)
    code = data[pos]
    if code not in DISCONNECT_REASONS:
        raise _bad_reason("DISCONNECT", code)
    if end - pos == 1:  # MQTT 5 3.14.2.2.1: no Property Length below 2 bytes
        return Disconnect(code, {})
    properties, pos = decode_properties(data, pos + 1, end, PacketType.DISCONNECT)
    if pos != end:
        raise _trailing("DISCONNECT", end - pos)
    return Disconnect(code, properties)


def _decode_auth(decoder: Decoder, data: bytes, pos: int, end: int) -> Auth:
    # Only reached at level 5: type 15 is refused by the first-byte check at 3.1.1.
    if pos == end:
        return Auth(0, {})
    code = data[pos]
    if code not in AUTH_REASONS:
        raise _bad_reason("AUTH", code)
    # MQTT 5 3.15.2.1 lets both the reason code and the property length be omitted, not one alone.
    properties, pos = decode_properties(data, pos + 1, end, PacketType.AUTH)
    if pos != end:
        raise _trailing("AUTH", end - pos)
    return Auth(code, properties)


def _unreachable(decoder: Decoder, data: bytes, pos: int, end: int) -> Packet:
    raise AssertionError("packet type 0 and PUBLISH never reach the table")


_DECODERS: Final[tuple[_Body, ...]] = (
    _unreachable,
    _decode_connect,
    _decode_connack,
    _unreachable,
    _ack_decoder(Puback, PacketType.PUBACK, PUBACK_REASONS),
    _ack_decoder(Pubrec, PacketType.PUBREC, PUBREC_REASONS),
    _ack_decoder(Pubrel, PacketType.PUBREL, PUBREL_REASONS),
    _ack_decoder(Pubcomp, PacketType.PUBCOMP, PUBCOMP_REASONS),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _empty_decoder(Pingreq, PacketType.PINGREQ),
    _empty_decoder(Pingresp, PacketType.PINGRESP),
    _decode_disconnect,
    _decode_auth,
)


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------


class Decoder:
    """Incremental decoder of a stream of MQTT packets (one direction of one connection).

    ``max_packet_size`` caps a whole packet (fixed header included, as MQTT 5 3.1.2.11.4 counts
    it); a bigger one fails with 0x95 PACKET_TOO_LARGE as soon as its fixed header is complete,
    before any of its body is buffered. So the decoder never holds more than ``max_packet_size``
    bytes of an incomplete packet (plus at most four bytes of an incomplete fixed header).

    ``protocol_level`` (4 by default; 3 decodes like 4) selects the MQTT 5 format when 5. The
    decoder sets it from the first CONNECT it decodes (as soon as that CONNECT's level byte is read,
    see :attr:`connect_level`); set it yourself to decode a server's packets.

    After :meth:`feed` has raised, the decoder is spent: every later call raises the same error
    again (with ``packets`` empty).
    """

    __slots__ = ("_chunks", "_error", "_have", "_need", "connect_level", "max_packet_size", "protocol_level")

    def __init__(self, max_packet_size: int, protocol_level: int = 4) -> None:
        """Raises ValueError for a ``max_packet_size`` below 2 or above MAX_PACKET_SIZE."""
        if not 2 <= max_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size {max_packet_size} is not within 2-{MAX_PACKET_SIZE}")
        if protocol_level not in KNOWN_LEVELS:
            raise ValueError(f"protocol_level {protocol_level} is not 3, 4 or 5")
        self.max_packet_size = max_packet_size
        self.protocol_level = protocol_level
        #: The level byte of the first CONNECT decoded, as soon as it is read and known to be 3, 4
        #: or 5 (even if the rest of that CONNECT turns out malformed); None before.
        self.connect_level: int | None = None
        # The tail of an incomplete packet, kept as the reads that brought it and joined once the
        # packet is complete: appending to one bytes object per read would be quadratic.
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._error: MalformedPacket | None = None

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete packet are held."""
        return self._have

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Add ``data`` to the stream; return every packet it completes, in order.

        ``feed(b"")`` returns ``[]`` (end of stream is the caller's business: the bytes held by
        :attr:`buffered` are then a truncated packet).

        Raises :class:`MalformedPacket` at the first invalid packet; the packets decoded before it
        in this call are in its ``packets`` attribute.
        """
        if self._error is not None:
            error = self._error
            raise MalformedPacket(error.reason_code, error.message, packet_type=error.packet_type)
        # Slices of a bytearray or memoryview would not make bytes payloads.
        raw = data if type(data) is bytes else bytes(data)
        if self._chunks:
            self._chunks.append(raw)
            self._have += len(raw)
            if self._have < self._need:
                return []
            raw = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        elif not raw:
            return []
        packets: list[Packet] = []
        try:
            pos = self._decode(raw, packets)
        except MalformedPacket as exc:
            exc.packets = packets
            self._error = exc
            self._chunks = []
            self._have = 0
            raise
        if pos < len(raw):
            tail = raw[pos:]
            self._chunks = [tail]
            self._have = len(tail)
        return packets

    def _decode(self, data: bytes, packets: list[Packet]) -> int:
        """Decode every complete packet of ``data`` into ``packets``; return where the rest starts.

        Sets ``_need`` to the number of bytes the incomplete rest must reach before it is worth
        decoding again.
        """
        size = len(data)
        limit = self.max_packet_size
        level = self.protocol_level
        checks = _FIRST_BYTE[5 if level == 5 else 4]
        append = packets.append
        pos = 0
        first = 0
        try:
            while pos < size:
                first = data[pos]
                problem = checks[first]
                if problem is not None:
                    raise MalformedPacket(problem[0], problem[1])
                if pos + 1 >= size:
                    self._need = 2
                    return pos
                length = data[pos + 1]
                if length < 0x80:
                    header = 2
                else:
                    length, header = _long_remaining_length(data, pos, size, level)
                    if not header:
                        self._need = size - pos + 1
                        return pos
                total = header + length
                if total > limit:
                    raise MalformedPacket(
                        PACKET_TOO_LARGE,
                        f"{_NAMES[first >> 4]} of {total} bytes exceeds the maximum packet size of {limit} "
                        "(MQTT 5 3.1.2.11.4)",
                    )
                end = pos + total
                if end > size:
                    self._need = total
                    return pos
                start = pos + header
                pos = end
                if first >> 4 != 3:
                    append(_DECODERS[first >> 4](self, data, start, end))
                    if first < 0x20:  # a CONNECT may have switched the protocol level
                        level = self.protocol_level
                        checks = _FIRST_BYTE[5 if level == 5 else 4]
                    continue
                # PUBLISH, inline: it is most of the traffic (3.3).
                if start + 2 > end:
                    raise _short("PUBLISH")
                topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
                if topic_end > end:
                    raise _short("PUBLISH")
                try:
                    topic = data[start + 2 : topic_end].decode()
                except UnicodeDecodeError as exc:
                    raise MalformedPacket(
                        MALFORMED_PACKET,
                        f"PUBLISH topic name is not well-formed UTF-8 ({exc.reason}) [MQTT-1.5.3-1]",
                    ) from None
                if "+" in topic or "#" in topic or "\x00" in topic or (not topic and level != 5):
                    raise _topic_name_problem(topic, "PUBLISH topic name")
                qos = (first >> 1) & 0x03
                if qos:
                    if topic_end + 2 > end:
                        raise _short("PUBLISH")
                    packet_id: int | None = (data[topic_end] << 8) | data[topic_end + 1]
                    if not packet_id:
                        raise MalformedPacket(
                            MALFORMED_PACKET, f"PUBLISH QoS {qos} with packet identifier 0 [MQTT-2.3.1-1]"
                        )
                    topic_end += 2
                else:
                    packet_id = None
                if level == 5:
                    properties, topic_end = decode_properties(data, topic_end, end, 3)
                    if not topic and "topic_alias" not in properties:
                        raise MalformedPacket(
                            PROTOCOL_ERROR,
                            "PUBLISH with an empty topic name and no topic_alias (MQTT 5 3.3.2.1)",
                        )
                else:
                    properties = {}
                append(
                    Publish(
                        topic,
                        data[topic_end:end],
                        qos,
                        (first & 0x01) != 0,
                        (first & 0x08) != 0,
                        packet_id,
                        properties,
                    )
                )
        except MalformedPacket as exc:
            if exc.packet_type is None:
                exc.packet_type = first >> 4
            raise
        return pos


def _long_remaining_length(data: bytes, pos: int, size: int, level: int) -> tuple[int, int]:
    """Decode a Remaining Length of two or more bytes at ``pos + 1``: (length, header size).

    Returns header size 0 when the length is not complete in ``data``. Raises MalformedPacket as
    soon as a fourth length byte has its continuation bit set (3.1.1 2.2.3, MQTT 5 2.1.4), or, at
    MQTT 5, when the encoding is not minimal [MQTT-1.5.5-1].
    """
    length = 0
    shift = 0
    index = pos + 1
    while True:
        if index >= size:
            return 0, 0
        byte = data[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        if index - pos > 4:
            raise MalformedPacket(MALFORMED_PACKET, "remaining length is longer than 4 bytes (3.1.1 2.2.3)")
        shift += 7
    if byte == 0 and level == 5:
        raise MalformedPacket(
            MALFORMED_PACKET, "remaining length is not encoded in the fewest bytes [MQTT-1.5.5-1]"
        )
    return length, index - pos


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def _frame(first: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((first, length)) + body
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {length} bytes exceeds {MAX_REMAINING_LENGTH} (2.2.3)")
    return bytes((first,)) + encode_varint(length) + body


def _pid(packet_id: int | None) -> bytes:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id!r} is not within 1-65535 [MQTT-2.3.1-1]")
    return packet_id.to_bytes(2, "big")


def _qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos!r} is not 0, 1 or 2")
    return qos


def encode_publish_parts(  # noqa: PLR0917 - positional on purpose: called once per fan-out message
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    properties: Mapping[str, Any] | None,
    protocol_level: int,
) -> tuple[bytes, bytes]:
    """Encode a PUBLISH in two parts around its packet identifier, for fan-out.

    The whole packet is ``first + packet_id.to_bytes(2, "big") + second`` at QoS 1/2 and
    ``first + second`` at QoS 0, so one ``first`` serves every subscriber at a QoS and only the
    packet id differs. ``second`` is ``payload`` itself (not a copy) at level 3/4 and at QoS 0;
    at level 5 with QoS > 0 the property block must follow the packet id, so ``second`` is then the
    properties plus a copy of the payload.

    ``topic`` is not checked for wildcards (it comes from a decoded PUBLISH). Raises ValueError
    for QoS 3, DUP at QoS 0 [MQTT-3.3.1-2], an empty topic (at level 5 without topic_alias), a
    topic over 65,535 bytes, bad properties, or a packet over the size limit.
    """
    raw = topic.encode()
    topic_length = len(raw)
    if not 0 < topic_length <= 0xFFFF and (
        topic_length or protocol_level != 5 or not properties or "topic_alias" not in properties
    ):
        raise ValueError(f"topic of {topic_length} bytes cannot be sent (1.5.3, MQTT 5 3.3.2.1)")
    if qos:
        if qos not in (1, 2):
            raise ValueError(f"QoS {qos!r} is not 0, 1 or 2")
    elif dup:
        raise ValueError("DUP must be 0 at QoS 0 [MQTT-3.3.1-2]")
    first_byte = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if protocol_level == 5:
        block = encode_properties(properties, 3)
        if qos:
            second = block + payload
            remaining = 4 + topic_length + len(second)
            tail = raw
        else:
            second = payload
            remaining = 2 + topic_length + len(block) + len(payload)
            tail = raw + block
    elif protocol_level in (3, 4):
        second = payload
        remaining = (4 if qos else 2) + topic_length + len(payload)
        tail = raw
    else:
        raise ValueError(f"protocol level {protocol_level!r} is not 3, 4 or 5")
    if remaining < 0x80:
        return bytes((first_byte, remaining, topic_length >> 8, topic_length & 0xFF)) + tail, second
    if remaining > MAX_REMAINING_LENGTH:
        raise ValueError(f"PUBLISH of {remaining} bytes exceeds {MAX_REMAINING_LENGTH} (2.2.3)")
    header = bytes((first_byte,)) + encode_varint(remaining)
    return header + bytes((topic_length >> 8, topic_length & 0xFF)) + tail, second


def _encode_publish(packet: Publish, v5: bool) -> bytes:
    first, second = encode_publish_parts(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.properties, 5 if v5 else 4
    )
    if packet.qos:
        return first + _pid(packet.packet_id) + second
    return first + second


def _encode_connect(packet: Connect, v5: bool) -> bytes:
    will = packet.will
    flags = 0x02 if packet.clean_start else 0
    if will is not None:
        flags |= 0x04 | (_qos(will.qos) << 3) | (0x20 if will.retain else 0)
    if packet.password is not None:
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    if not 0 <= packet.keepalive <= 0xFFFF:
        raise ValueError(f"keep alive {packet.keepalive} is not within 0-65535")
    parts = [
        encode_string(packet.proto_name),
        bytes((packet.proto_level, flags)),
        packet.keepalive.to_bytes(2, "big"),
    ]
    if v5:
        parts.append(encode_properties(packet.properties, PacketType.CONNECT))
    parts.append(encode_string(packet.client_id))
    if will is not None:
        if v5:
            parts.append(encode_properties(will.properties, _props.WILL))
        parts += (encode_string(will.topic), encode_binary(will.payload))
    if packet.username is not None:
        parts.append(encode_string(packet.username))
    if packet.password is not None:
        parts.append(encode_binary(packet.password))
    return _frame(0x10, b"".join(parts))


def _encode_connack(packet: Connack, v5: bool) -> bytes:
    flags = 1 if packet.session_present else 0
    if not 0 <= packet.reason_code <= 0xFF:
        raise ValueError(f"CONNACK reason code {packet.reason_code} is not a byte")
    if not v5:
        if packet.reason_code not in V3_CONNACK_CODES:
            raise ValueError(
                f"CONNACK return code {packet.reason_code} does not exist at 3.1.1 (use v3_connack_code)"
            )
        return bytes((0x20, 2, flags, packet.reason_code))
    return _frame(0x20, bytes((flags, packet.reason_code)) + encode_properties(packet.properties, 2))


def _ack_encoder(first: int, kind: int) -> Callable[[Any, bool], bytes]:
    def encode(packet: Puback | Pubrec | Pubrel | Pubcomp, v5: bool) -> bytes:
        packet_id = _pid(packet.packet_id)
        if not v5:
            return bytes((first, 2)) + packet_id
        code = packet.reason_code
        if not packet.properties:
            # The shortest forms MQTT 5 3.4.2.1 allows: no reason code for success, else no
            # property length.
            if not code:
                return bytes((first, 2)) + packet_id
            return bytes((first, 3)) + packet_id + bytes((code,))
        return _frame(first, packet_id + bytes((code,)) + encode_properties(packet.properties, kind))

    return encode


def _encode_subscribe(packet: Subscribe, v5: bool) -> bytes:
    parts = [_pid(packet.packet_id)]
    if v5:
        parts.append(encode_properties(packet.properties, PacketType.SUBSCRIBE))
    for subscription in packet.subscriptions:
        options = _qos(subscription.qos)
        if v5:
            if not 0 <= subscription.retain_handling <= 2:
                raise ValueError(f"retain handling {subscription.retain_handling} is not 0, 1 or 2")
            options |= (
                (0x04 if subscription.no_local else 0)
                | (0x08 if subscription.retain_as_published else 0)
                | (subscription.retain_handling << 4)
            )
        parts += (encode_string(subscription.topic_filter), bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(packet: Suback, v5: bool) -> bytes:
    if not v5 and not V3_SUBACK_CODES.issuperset(packet.reason_codes):
        raise ValueError(f"SUBACK return codes {packet.reason_codes} are not all 0, 1, 2 or 0x80 at 3.1.1")
    block = encode_properties(packet.properties, PacketType.SUBACK) if v5 else b""
    return _frame(0x90, _pid(packet.packet_id) + block + bytes(packet.reason_codes))


def _encode_unsubscribe(packet: Unsubscribe, v5: bool) -> bytes:
    parts = [_pid(packet.packet_id)]
    if v5:
        parts.append(encode_properties(packet.properties, PacketType.UNSUBSCRIBE))
    parts += (encode_string(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(packet: Unsuback, v5: bool) -> bytes:
    if not v5:
        return b"\xb0\x02" + _pid(packet.packet_id)
    block = encode_properties(packet.properties, PacketType.UNSUBACK)
    return _frame(0xB0, _pid(packet.packet_id) + block + bytes(packet.reason_codes))


def _encode_pingreq(packet: Pingreq, v5: bool) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(packet: Pingresp, v5: bool) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(packet: Disconnect, v5: bool) -> bytes:
    if not v5:
        return b"\xe0\x00"
    if not packet.properties:
        if not packet.reason_code:
            return b"\xe0\x00"
        return bytes((0xE0, 1, packet.reason_code))
    return _frame(0xE0, bytes((packet.reason_code,)) + encode_properties(packet.properties, 14))


def _encode_auth(packet: Auth, v5: bool) -> bytes:
    if not v5:
        raise ValueError("AUTH does not exist at MQTT 3.1.1")
    if not packet.reason_code and not packet.properties:
        return b"\xf0\x00"
    return _frame(0xF0, bytes((packet.reason_code,)) + encode_properties(packet.properties, 15))


_ENCODERS: Final[dict[type, Callable[[Any, bool], bytes]]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _ack_encoder(0x40, 4),
    Pubrec: _ack_encoder(0x50, 5),
    Pubrel: _ack_encoder(0x62, 6),
    Pubcomp: _ack_encoder(0x70, 7),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_pingreq,
    Pingresp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Encode ``packet`` for a connection at ``protocol_level`` (3 and 4 use the 3.1.1 format).

    For a CONNECT the format follows ``protocol_level`` and the level byte is ``proto_level``, so a
    test can build a CONNECT of any level. Properties are ignored below level 5.

    Raises ValueError for what cannot be encoded (see the module docstring) and TypeError for an
    object that is not a packet.
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"{packet!r} is not an MQTT packet")
    if protocol_level not in KNOWN_LEVELS:
        raise ValueError(f"protocol level {protocol_level!r} is not 3, 4 or 5")
    return encoder(packet, protocol_level == 5)
