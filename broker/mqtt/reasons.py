"""MQTT reason codes: every MQTT 5.0 Reason Code (section 2.4) and the MQTT 3.1.1 CONNACK return codes.

The constants are plain ``int`` (not an enum) because several names share a value: 0x00 is
``SUCCESS``, ``NORMAL_DISCONNECTION`` and ``GRANTED_QOS_0`` depending on the packet, and because
they are compared against bytes straight off the wire on hot paths.

``*_REASONS`` sets list the codes MQTT 5.0 allows in each packet type (the tables of sections 3.2.2.2,
3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1 and 3.15.2.1); the decoder refuses any
other code in a packet it receives, and the protocol uses them to pick a code it may legally send.

:class:`MalformedPacket` lives here, next to the codes it carries, so that every module of the
package can raise it without importing the codec.
"""

from __future__ import annotations

from typing import Any, Final

# --------------------------------------------------------------------------------------------------
# MQTT 5.0 Reason Codes (section 2.4)
# --------------------------------------------------------------------------------------------------

SUCCESS: Final = 0x00
NORMAL_DISCONNECTION: Final = 0x00
GRANTED_QOS_0: Final = 0x00
GRANTED_QOS_1: Final = 0x01
GRANTED_QOS_2: Final = 0x02
DISCONNECT_WITH_WILL_MESSAGE: Final = 0x04
NO_MATCHING_SUBSCRIBERS: Final = 0x10
NO_SUBSCRIPTION_EXISTED: Final = 0x11
CONTINUE_AUTHENTICATION: Final = 0x18
RE_AUTHENTICATE: Final = 0x19
UNSPECIFIED_ERROR: Final = 0x80
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
IMPLEMENTATION_SPECIFIC_ERROR: Final = 0x83
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
CLIENT_IDENTIFIER_NOT_VALID: Final = 0x85
BAD_USERNAME_OR_PASSWORD: Final = 0x86
NOT_AUTHORIZED: Final = 0x87
SERVER_UNAVAILABLE: Final = 0x88
SERVER_BUSY: Final = 0x89
BANNED: Final = 0x8A
SERVER_SHUTTING_DOWN: Final = 0x8B
BAD_AUTHENTICATION_METHOD: Final = 0x8C
KEEP_ALIVE_TIMEOUT: Final = 0x8D
SESSION_TAKEN_OVER: Final = 0x8E
TOPIC_FILTER_INVALID: Final = 0x8F
TOPIC_NAME_INVALID: Final = 0x90
PACKET_IDENTIFIER_IN_USE: Final = 0x91
PACKET_IDENTIFIER_NOT_FOUND: Final = 0x92
RECEIVE_MAXIMUM_EXCEEDED: Final = 0x93
TOPIC_ALIAS_INVALID: Final = 0x94
PACKET_TOO_LARGE: Final = 0x95
MESSAGE_RATE_TOO_HIGH: Final = 0x96
QUOTA_EXCEEDED: Final = 0x97
ADMINISTRATIVE_ACTION: Final = 0x98
PAYLOAD_FORMAT_INVALID: Final = 0x99
RETAIN_NOT_SUPPORTED: Final = 0x9A
QOS_NOT_SUPPORTED: Final = 0x9B
USE_ANOTHER_SERVER: Final = 0x9C
SERVER_MOVED: Final = 0x9D
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: Final = 0x9E
CONNECTION_RATE_EXCEEDED: Final = 0x9F
MAXIMUM_CONNECT_TIME: Final = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: Final = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: Final = 0xA2

# --------------------------------------------------------------------------------------------------
# MQTT 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3) and SUBACK failure (3.9.3)
# --------------------------------------------------------------------------------------------------

V3_ACCEPTED: Final = 0
V3_UNACCEPTABLE_PROTOCOL_VERSION: Final = 1
V3_IDENTIFIER_REJECTED: Final = 2
V3_SERVER_UNAVAILABLE: Final = 3
V3_BAD_USERNAME_OR_PASSWORD: Final = 4
V3_NOT_AUTHORIZED: Final = 5
#: The only SUBACK failure return code of 3.1.1 [MQTT-3.9.3-2]; same value as UNSPECIFIED_ERROR.
V3_SUBACK_FAILURE: Final = 0x80

#: Every 3.1.1 CONNACK return code; 6-255 are reserved [MQTT-3.2.2-6 table 3.1].
V3_CONNACK_CODES: Final = frozenset(range(6))
#: Every 3.1.1 SUBACK return code [MQTT-3.9.3-2].
V3_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})

# --------------------------------------------------------------------------------------------------
# Which MQTT 5.0 codes each packet may carry
# --------------------------------------------------------------------------------------------------

CONNACK_REASONS: Final = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C}
    | {0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
#: PUBACK and PUBREC share a table (3.4.2.1, 3.5.2.1).
PUBACK_REASONS: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
PUBREC_REASONS: Final = PUBACK_REASONS
#: PUBREL and PUBCOMP share a table (3.6.2.1, 3.7.2.1).
PUBREL_REASONS: Final = frozenset({0x00, 0x92})
PUBCOMP_REASONS: Final = PUBREL_REASONS
SUBACK_REASONS: Final = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
UNSUBACK_REASONS: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
DISCONNECT_REASONS: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94}
    | {0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)
AUTH_REASONS: Final = frozenset({0x00, 0x18, 0x19})

# One name per value; where values are shared, the name of the first packet that uses it.
_NAMES: Final[dict[int, str]] = {
    0x00: "SUCCESS",
    0x01: "GRANTED_QOS_1",
    0x02: "GRANTED_QOS_2",
    0x04: "DISCONNECT_WITH_WILL_MESSAGE",
    0x10: "NO_MATCHING_SUBSCRIBERS",
    0x11: "NO_SUBSCRIPTION_EXISTED",
    0x18: "CONTINUE_AUTHENTICATION",
    0x19: "RE_AUTHENTICATE",
    0x80: "UNSPECIFIED_ERROR",
    0x81: "MALFORMED_PACKET",
    0x82: "PROTOCOL_ERROR",
    0x83: "IMPLEMENTATION_SPECIFIC_ERROR",
    0x84: "UNSUPPORTED_PROTOCOL_VERSION",
    0x85: "CLIENT_IDENTIFIER_NOT_VALID",
    0x86: "BAD_USERNAME_OR_PASSWORD",
    0x87: "NOT_AUTHORIZED",
    0x88: "SERVER_UNAVAILABLE",
    0x89: "SERVER_BUSY",
    0x8A: "BANNED",
    0x8B: "SERVER_SHUTTING_DOWN",
    0x8C: "BAD_AUTHENTICATION_METHOD",
    0x8D: "KEEP_ALIVE_TIMEOUT",
    0x8E: "SESSION_TAKEN_OVER",
    0x8F: "TOPIC_FILTER_INVALID",
    0x90: "TOPIC_NAME_INVALID",
    0x91: "PACKET_IDENTIFIER_IN_USE",
    0x92: "PACKET_IDENTIFIER_NOT_FOUND",
    0x93: "RECEIVE_MAXIMUM_EXCEEDED",
    0x94: "TOPIC_ALIAS_INVALID",
    0x95: "PACKET_TOO_LARGE",
    0x96: "MESSAGE_RATE_TOO_HIGH",
    0x97: "QUOTA_EXCEEDED",
    0x98: "ADMINISTRATIVE_ACTION",
    0x99: "PAYLOAD_FORMAT_INVALID",
    0x9A: "RETAIN_NOT_SUPPORTED",
    0x9B: "QOS_NOT_SUPPORTED",
    0x9C: "USE_ANOTHER_SERVER",
    0x9D: "SERVER_MOVED",
    0x9E: "SHARED_SUBSCRIPTIONS_NOT_SUPPORTED",
    0x9F: "CONNECTION_RATE_EXCEEDED",
    0xA0: "MAXIMUM_CONNECT_TIME",
    0xA1: "SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED",
    0xA2: "WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED",
}

# The nearest 3.1.1 return code for each MQTT 5 CONNACK refusal. 3.1.1 has six codes, so most v5
# refusals collapse: every "the server cannot or will not serve you now" becomes 3 (what EMQX and
# mosquitto send), every "you are not allowed" becomes 5.
_V3_CONNACK: Final[dict[int, int]] = {
    SUCCESS: V3_ACCEPTED,
    UNSUPPORTED_PROTOCOL_VERSION: V3_UNACCEPTABLE_PROTOCOL_VERSION,
    CLIENT_IDENTIFIER_NOT_VALID: V3_IDENTIFIER_REJECTED,
    BAD_USERNAME_OR_PASSWORD: V3_BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORIZED: V3_NOT_AUTHORIZED,
    BANNED: V3_NOT_AUTHORIZED,
    BAD_AUTHENTICATION_METHOD: V3_NOT_AUTHORIZED,
    SERVER_UNAVAILABLE: V3_SERVER_UNAVAILABLE,
    SERVER_BUSY: V3_SERVER_UNAVAILABLE,
    SERVER_SHUTTING_DOWN: V3_SERVER_UNAVAILABLE,
    QUOTA_EXCEEDED: V3_SERVER_UNAVAILABLE,
    USE_ANOTHER_SERVER: V3_SERVER_UNAVAILABLE,
    SERVER_MOVED: V3_SERVER_UNAVAILABLE,
    CONNECTION_RATE_EXCEEDED: V3_SERVER_UNAVAILABLE,
}


def reason_name(code: int) -> str:
    """The MQTT 5 name of ``code`` (``"MALFORMED_PACKET"``), or ``"UNKNOWN_0xNN"``. Never raises.

    0x00 is reported as ``"SUCCESS"`` whatever the packet (it is also NORMAL_DISCONNECTION and
    GRANTED_QOS_0).
    """
    name = _NAMES.get(code)
    return name if name is not None else f"UNKNOWN_0x{code:02X}"


def v3_connack_code(v5_code: int) -> int:
    """The MQTT 3.1.1 CONNACK return code nearest to the MQTT 5 CONNACK reason ``v5_code``.

    0x00 maps to 0 (accepted). A refusal without a 3.1.1 counterpart (0x80 unspecified, 0x81
    malformed, 0x82 protocol error, 0x83, 0x90, 0x95, 0x99-0x9B...) maps to 3 (server unavailable),
    the least specific refusal 3.1.1 has; note that 3.1.1 wants a malformed CONNECT closed without
    any CONNACK [MQTT-3.1.4-1], which is the protocol's business, not this function's.

    Raises :class:`ValueError` for a success code other than 0x00 (below 0x80): it is no refusal.
    """
    code = _V3_CONNACK.get(v5_code)
    if code is not None:
        return code
    if not 0x80 <= v5_code <= 0xFF:
        raise ValueError(f"0x{v5_code:02X} is not an MQTT 5 CONNACK refusal (0x80-0xFF)")
    return V3_SERVER_UNAVAILABLE


class MalformedPacket(ValueError):
    """Bytes that are not a valid MQTT packet, or a packet the spec says must close the connection.

    ``reason_code`` is the MQTT 5 reason code that names the problem (0x81 MALFORMED_PACKET, 0x82
    PROTOCOL_ERROR, 0x84 UNSUPPORTED_PROTOCOL_VERSION, 0x85 CLIENT_IDENTIFIER_NOT_VALID, 0x8F
    TOPIC_FILTER_INVALID, 0x90 TOPIC_NAME_INVALID, 0x94 TOPIC_ALIAS_INVALID, 0x95 PACKET_TOO_LARGE);
    at MQTT 5 it is what a CONNACK or DISCONNECT sends back. The message says what was wrong and
    cites the spec rule (``[MQTT-3.3.2-2]`` or an MQTT 5 section); it is what the broker logs.

    ``packet_type`` is the type nibble of the offending packet (None if not known yet), and
    ``packets`` the packets decoded before it in the same :meth:`~broker.mqtt.codec.Decoder.feed`,
    which the caller must still act on. It derives from ValueError, not from the project's error
    tree, because this package imports nothing else of the project.
    """

    def __init__(
        self,
        reason_code: int,
        message: str,
        *,
        packet_type: int | None = None,
        packets: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.packet_type = packet_type
        #: Decoded before the bad packet; typed loosely to keep this module free of the packet model.
        self.packets: list[Any] = [] if packets is None else packets

    def __repr__(self) -> str:
        return f"MalformedPacket({reason_name(self.reason_code)}, {self.message!r})"
