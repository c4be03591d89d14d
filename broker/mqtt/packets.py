"""The MQTT packet model: one slotted class per control packet, the same for MQTT 3.1.1 and 5.0.

Packets are plain mutable records (``@dataclass(slots=True)``): slots keep a decoded PUBLISH small
and its construction cheap, and mutability lets the engine resolve a topic alias in place.

``properties`` is a ``dict`` keyed by the snake_case MQTT 5 property name (see
:mod:`broker.mqtt.properties` for names and value types). Packets decoded at MQTT 3.1.1 carry an
empty dict of their own (never a shared one, so mutating it is safe); encoders ignore properties at
level 4. Field values are not validated here: the decoder produces only valid packets, and the
encoder raises :class:`ValueError` for what it cannot put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeAlias


class PacketType(IntEnum):
    """The control packet type: the high nibble of the first byte (3.1.1 2.2.1, MQTT 5 2.1.2)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    #: MQTT 5 only; type 15 is reserved (and so malformed) at 3.1.1.
    AUTH = 15


Properties: TypeAlias = dict[str, Any]


@dataclass(slots=True)
class Will:
    """The will message of a CONNECT (3.1.2.5, 3.1.3.2-3; MQTT 5 3.1.2.5, 3.1.3.2)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    """CONNECT (3.1). ``proto_level`` is 3 (MQTT 3.1, "MQIsdp"), 4 (3.1.1) or 5."""

    packet_type: ClassVar[PacketType] = PacketType.CONNECT

    proto_name: str
    proto_level: int
    clean_start: bool
    keepalive: int
    client_id: str
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connack:
    """CONNACK (3.2). ``reason_code`` is the 3.1.1 return code (0-5) when encoded at level 4."""

    packet_type: ClassVar[PacketType] = PacketType.CONNACK

    session_present: bool
    reason_code: int
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    """PUBLISH (3.3). ``packet_id`` is None at QoS 0. ``topic`` is "" only at MQTT 5 with a topic_alias.

    ``properties["subscription_identifier"]``, when present, is a ``list[int]`` (it may repeat).
    """

    packet_type: ClassVar[PacketType] = PacketType.PUBLISH

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Puback:
    """PUBACK (3.4): the answer to a QoS 1 PUBLISH."""

    packet_type: ClassVar[PacketType] = PacketType.PUBACK

    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Pubrec:
    """PUBREC (3.5): QoS 2 delivery, part 1."""

    packet_type: ClassVar[PacketType] = PacketType.PUBREC

    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Pubrel:
    """PUBREL (3.6): QoS 2 delivery, part 2."""

    packet_type: ClassVar[PacketType] = PacketType.PUBREL

    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Pubcomp:
    """PUBCOMP (3.7): QoS 2 delivery, part 3."""

    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP

    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (3.8.3; MQTT 5 3.8.3.1).

    ``no_local``, ``retain_as_published`` and ``retain_handling`` exist at MQTT 5 only; they are
    False/False/0 when decoded at 3.1.1 and not encoded there.
    """

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE (3.8). ``properties["subscription_identifier"]``, when present, is an ``int``."""

    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE

    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Suback:
    """SUBACK (3.9): one reason code per subscription (3.1.1: 0, 1, 2 or 0x80)."""

    packet_type: ClassVar[PacketType] = PacketType.SUBACK

    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (3.10)."""

    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE

    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Unsuback:
    """UNSUBACK (3.11). ``reason_codes`` exist at MQTT 5 only: empty when decoded at 3.1.1."""

    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK

    packet_id: int
    reason_codes: list[int] = field(default_factory=list)
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Pingreq:
    """PINGREQ (3.12)."""

    packet_type: ClassVar[PacketType] = PacketType.PINGREQ


@dataclass(slots=True)
class Pingresp:
    """PINGRESP (3.13)."""

    packet_type: ClassVar[PacketType] = PacketType.PINGRESP


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT (3.14). The reason code and properties exist at MQTT 5 only."""

    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT

    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    """AUTH (MQTT 5 3.15): enhanced authentication exchange."""

    packet_type: ClassVar[PacketType] = PacketType.AUTH

    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
