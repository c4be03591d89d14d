"""How messages and sessions travel between nodes (pure): a batch of messages as one binary blob,
a persistent session (:func:`encode_session`) as JSON.

A batch is a sequence of forwarded messages, each::

    !HHIIBBdH  topic length, publisher length, properties length, payload length,
               qos, flags (bit 0: retain; bit 1: for the node's subscribers), expiry (seconds
               left; -1: none), shared groups length
    topic, publisher, properties (JSON of broker.store.base.properties_to_json, or empty), payload,
    shared groups (the ``$share/g/f`` groups whose turn it is on that node, NUL-separated)

Expiry travels as the time left, not a time: the nodes' clocks are not each other's. The payload
is copied once into the batch, whatever the number of subscribers on the other node.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
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

_HEAD: Final = struct.Struct("!HHIIBBdH")

#: Flags.
_RETAIN: Final = 1
_NORMAL: Final = 2


class WireError(ValueError):
    """A batch that is not one this module made (a bug, or another program on the stream)."""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A message on its way to one node: whether that node delivers it to its (non-shared)
    subscribers (``normal``), and to which of its shared subscription groups (``groups``: it is
    their turn there)."""

    message: Message
    normal: bool = True
    groups: tuple[str, ...] = ()


def encode(entries: list[Forwarded], now: float) -> bytes:
    """One batch of ``entries``; ``now`` is the engine's clock (for the expiry left).

    Raises:
        ValueError: a topic or publisher over 65535 bytes, or a property value of no property type.
    """
    parts: list[bytes] = []
    for entry in entries:
        message = entry.message
        topic = message.topic.encode()
        publisher = message.publisher.encode()
        properties = message.properties
        props = json.dumps(properties_to_json(properties)).encode() if properties else b""
        expiry = -1.0 if message.expires_at is None else max(0.0, message.expires_at - now)
        groups = "\0".join(entry.groups).encode()
        flags = (_RETAIN if message.retain else 0) | (_NORMAL if entry.normal else 0)
        lengths = (len(topic), len(publisher), len(props), len(message.payload))
        parts.append(_HEAD.pack(*lengths, message.qos, flags, expiry, len(groups)))
        parts += (topic, publisher, props, message.payload, groups)
    return b"".join(parts)


def decode(data: bytes, now: float) -> list[Forwarded]:
    """The entries of a batch, their messages' expiry on this node's clock ``now``.

    Raises:
        WireError: it is truncated or damaged.
    """
    entries: list[Forwarded] = []
    offset, size = 0, len(data)
    view = memoryview(data)
    try:
        while offset < size:
            head = _HEAD.unpack_from(data, offset)
            topic_len, publisher_len, props_len, payload_len, qos, flags, expiry, groups_len = head
            offset += _HEAD.size
            end = offset + topic_len + publisher_len + props_len + payload_len + groups_len
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
            offset += payload_len
            groups = bytes(view[offset:end]).decode()
            offset = end
            expires_at = None if expiry < 0 else now + expiry
            message = Message(topic, payload, qos, bool(flags & _RETAIN), publisher, properties, expires_at)
            entries.append(
                Forwarded(message, bool(flags & _NORMAL), tuple(groups.split("\0")) if groups else ())
            )
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"a damaged batch ({exc})") from None
    return entries


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
