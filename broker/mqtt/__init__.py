"""MQTT 3.1.1 and 5.0 without I/O: the packet model, a strict codec, and a server-side protocol.

Standard library only: nothing here imports asyncio, amqtt or the rest of ``broker``, so the
engine, tests and benchmarks can use it alone.

* :mod:`broker.mqtt.packets`: one slotted class per control packet, :data:`Packet` their union;
* :mod:`broker.mqtt.properties`: the MQTT 5 property table and its codec;
* :mod:`broker.mqtt.reasons`: reason codes, their names, the 3.1.1 CONNACK mapping, and
  :class:`MalformedPacket`, the one exception the decoder raises;
* :mod:`broker.mqtt.codec`: :class:`Decoder` (bytes to packets), :func:`encode` and the fan-out
  :func:`encode_publish_parts`;
* :mod:`broker.mqtt.protocol`: :class:`MqttServerProtocol`, the connection-level rules of a server.

Specs: OASIS MQTT Version 3.1.1 (2014) and MQTT Version 5.0 (2019). Messages cite the 3.1.1
normative statement (``[MQTT-3.3.2-2]``) where there is one, else the MQTT 5.0 section.
"""

from __future__ import annotations

from broker.mqtt.codec import MAX_PACKET_SIZE, Decoder, encode, encode_publish_parts
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
from broker.mqtt.protocol import MqttServerProtocol, State
from broker.mqtt.reasons import MalformedPacket, reason_name, v3_connack_code

__all__ = [
    "MAX_PACKET_SIZE",
    "Auth",
    "Connack",
    "Connect",
    "Decoder",
    "Disconnect",
    "MalformedPacket",
    "MqttServerProtocol",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "State",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "encode",
    "encode_publish_parts",
    "reason_name",
    "v3_connack_code",
]
