"""How messages and sessions travel between nodes (pure): a batch of messages as one binary blob,
a persistent session (:func:`encode_session`) as JSON.

A batch is a sequence of messages, each::

    !HHIIBBd  topic length, publisher length, properties length, payload length,
              qos, flags (bit 0: retain), expiry (seconds left; -1: none)
    topic, publisher, properties (JSON of broker.store.base.properties_to_json, or empty), payload

Expiry travels as the time left, not a time: the nodes' clocks are not each other's. The payload
is copied once into the batch, whatever the number of subscribers on the other node.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any, Final

from broker.core.session import Message
from broker.store.base import (
    StoredDelivery,
    StoredMessage,
    StoredSession,
    StoredSubscription,
    StoredWill,
    properties_from_json,
    properties_to_json,
)

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


def encode_session(session: StoredSession) -> bytes:
    """A persistent session as it moves to the node its client reconnected to: JSON, payloads in
    base64, times on the wall clock (the nodes' clocks are kept in step by NTP).

    Raises:
        ValueError: a property value of no property type.
    """

    def message(stored: StoredMessage) -> dict[str, Any]:
        return {
            "topic": stored.topic,
            "payload": base64.b64encode(stored.payload).decode("ascii"),
            "qos": stored.qos,
            "publisher": stored.publisher,
            "properties": stored.properties,
            "expires_at": stored.expires_at,
            "retain": stored.retain,
        }

    will = session.will
    document = {
        "client_id": session.client_id,
        "expiry_interval": session.expiry_interval,
        "disconnected_at": session.disconnected_at,
        "owner": session.owner,
        "username": session.username,
        "authenticated": session.authenticated,
        "superuser": session.superuser,
        "ip": session.ip,
        "awaiting_rel": list(session.awaiting_rel),
        "will": None
        if will is None
        else {"message": message(will.message), "delay": will.delay, "due_at": will.due_at},
        "subscriptions": [
            [s.topic_filter, s.qos, s.no_local, s.retain_as_published, s.identifier]
            for s in session.subscriptions
        ],
        "deliveries": [
            {
                "seq": d.seq,
                "message": message(d.message),
                "qos": d.qos,
                "retain": d.retain,
                "subscription_ids": list(d.subscription_ids),
                "packet_id": d.packet_id,
                "released": d.released,
            }
            for d in session.deliveries
        ],
    }
    return json.dumps(document).encode()


def decode_session(data: bytes) -> StoredSession:
    """The inverse of :func:`encode_session`.

    Raises:
        WireError: not what :func:`encode_session` makes.
    """

    def message(raw: dict[str, Any]) -> StoredMessage:
        properties_from_json(raw["properties"])  # checked now
        return StoredMessage(
            str(raw["topic"]),
            base64.b64decode(raw["payload"], validate=True),
            int(raw["qos"]),
            str(raw["publisher"]),
            raw["properties"],
            None if raw["expires_at"] is None else float(raw["expires_at"]),
            bool(raw["retain"]),
        )

    try:
        doc = json.loads(data)
        will = doc["will"]
        return StoredSession(
            str(doc["client_id"]),
            float(doc["expiry_interval"]),
            None if doc["disconnected_at"] is None else float(doc["disconnected_at"]),
            doc["owner"],
            doc["username"],
            bool(doc["authenticated"]),
            bool(doc["superuser"]),
            str(doc["ip"]),
            tuple(int(i) for i in doc["awaiting_rel"]),
            None
            if will is None
            else StoredWill(message(will["message"]), float(will["delay"]), will["due_at"]),
            tuple(
                StoredSubscription(str(f), int(q), bool(nl), bool(rap), int(i))
                for f, q, nl, rap, i in doc["subscriptions"]
            ),
            tuple(
                StoredDelivery(
                    int(d["seq"]),
                    message(d["message"]),
                    int(d["qos"]),
                    bool(d["retain"]),
                    tuple(int(i) for i in d["subscription_ids"]),
                    int(d["packet_id"]),
                    bool(d["released"]),
                )
                for d in doc["deliveries"]
            ),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise WireError(f"not a session ({type(exc).__name__}: {exc})") from None
