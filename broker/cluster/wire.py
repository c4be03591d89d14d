"""How messages travel between nodes (pure): a batch of messages as one binary blob.

A batch is a sequence of messages, each::

    !HHIIBBd  topic length, publisher length, properties length, payload length,
              qos, flags (bit 0: retain), expiry (seconds left; -1: none)
    topic, publisher, properties (JSON of broker.store.base.properties_to_json, or empty), payload

Expiry travels as the time left, not a time: the nodes' clocks are not each other's. The payload
is copied once into the batch, whatever the number of subscribers on the other node.
"""

from __future__ import annotations

import json
import struct
from typing import Final

from broker.core.session import Message
from broker.store.base import properties_from_json, properties_to_json

_HEAD: Final = struct.Struct("!HHIIBBd")


class WireError(ValueError):
    """A batch that is not one this module made (a bug, or another program on the stream)."""


def encode(messages: list[Message], now: float) -> bytes:
    """One batch of ``messages``; ``now`` is the engine's clock (for the expiry left).

    Raises:
        ValueError: a topic or publisher over 65535 bytes, or a property value of no property type.
    """
    parts: list[bytes] = []
    for message in messages:
        topic = message.topic.encode()
        publisher = message.publisher.encode()
        properties = message.properties
        props = json.dumps(properties_to_json(properties)).encode() if properties else b""
        expiry = -1.0 if message.expires_at is None else max(0.0, message.expires_at - now)
        parts.append(
            _HEAD.pack(
                len(topic),
                len(publisher),
                len(props),
                len(message.payload),
                message.qos,
                int(message.retain),
                expiry,
            )
        )
        parts += (topic, publisher, props, message.payload)
    return b"".join(parts)


def decode(data: bytes, now: float) -> list[Message]:
    """The messages of a batch, their expiry on this node's clock ``now``.

    Raises:
        WireError: it is truncated or damaged.
    """
    messages: list[Message] = []
    offset, size = 0, len(data)
    view = memoryview(data)
    try:
        while offset < size:
            topic_len, publisher_len, props_len, payload_len, qos, flags, expiry = _HEAD.unpack_from(
                data, offset
            )
            offset += _HEAD.size
            end = offset + topic_len + publisher_len + props_len + payload_len
            if end > size or qos > 2:
                raise WireError(f"message at byte {offset - _HEAD.size}: truncated or qos {qos}")
            topic = bytes(view[offset : offset + topic_len]).decode()
            offset += topic_len
            publisher = bytes(view[offset : offset + publisher_len]).decode()
            offset += publisher_len
            properties = None
            if props_len:
                properties = properties_from_json(json.loads(bytes(view[offset : offset + props_len])))
            offset += props_len
            payload = bytes(view[offset : offset + payload_len])
            offset = end
            expires_at = None if expiry < 0 else now + expiry
            messages.append(Message(topic, payload, qos, bool(flags & 1), publisher, properties, expires_at))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"a damaged batch ({exc})") from None
    return messages
