"""A client's session state, as pure code: subscriptions, the in-flight window, the bounded queue.

EMQX's ``emqx_session.erl`` is the model: the session decides *what* is sent and when (window,
queue, packet ids, drops); the engine's channel decides *how* (encoding, writing, timers). Nothing
here does I/O or knows the clock; the engine passes times in.

Bounds (``mqtt.*`` settings; every drop is counted by reason here and in the engine's totals):

- ``max_inflight`` QoS 1/2 deliveries awaiting acknowledgement. Packet ids are taken only for
  in-flight deliveries, so the window bounds them and they never run out [MQTT-2.3.1-4].
- ``max_mqueue_len`` messages waiting (offline, window full, or transport paused). When full the
  oldest is dropped (EMQX's rule: the freshest data survives a stalled subscriber).
- ``max_awaiting_rel`` incoming QoS 2 packet ids awaiting PUBREL: only the id and its arrival time
  are kept (the message is routed on arrival, method B of [MQTT-4.3.3]), so an unreleased QoS 2
  costs a few dozen bytes, never its payload.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any, Final

#: Drop reasons (metrics label ``reason`` of ``realip_messages_dropped``).
QUEUE_FULL: Final = "queue_full"
QOS0_OFFLINE: Final = "qos0_offline"
NOT_AUTHORIZED: Final = "not_authorized"
SESSION_DISCARDED: Final = "session_discarded"
EXPIRED: Final = "expired"

#: [MQTT-2.3.1] packet identifiers are 1..65535.
MAX_PACKET_ID: Final = 65535


class Message:
    """One published message, shared by every delivery of it (never copied per subscriber).

    ``publisher`` is the client id of its sender ("" for the broker's own). ``properties`` are the
    MQTT 5 properties forwarded with it unchanged (content type, response topic, correlation data,
    user properties, payload format), or ``None``; ``expires_at`` is when its Message Expiry
    Interval runs out, on the engine's clock (MQTT 5 3.3.2.3.3), or ``None``. The engine caches the
    encoded packet on it (``encoded``), keyed by what differs between deliveries.
    """

    __slots__ = ("encoded", "expires_at", "payload", "properties", "publisher", "qos", "retain", "topic")

    def __init__(  # noqa: PLR0917 - a PUBLISH's fields, in its order
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        publisher: str = "",
        properties: dict[str, Any] | None = None,
        expires_at: float | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.publisher = publisher
        self.properties = properties
        self.expires_at = expires_at
        self.encoded: dict[Any, tuple[bytes, bytes]] = {}

    def expired(self, now: float) -> bool:
        """Whether its Message Expiry Interval has run out at ``now``."""
        return self.expires_at is not None and now >= self.expires_at

    def __repr__(self) -> str:
        return f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"


class Delivery:
    """A message on its way to one session, at the QoS it is delivered with.

    ``packet_id`` is 0 for QoS 0. ``released`` is set once a QoS 2 delivery got its PUBREC (what is
    re-sent is then the PUBREL [MQTT-4.3.3-1]). ``retain`` is the RETAIN flag on the wire: set only
    for retained messages sent for a new subscription [MQTT-3.3.1-8/9].
    """

    __slots__ = ("dup", "message", "packet_id", "qos", "released", "retain", "seq", "subscription_ids")

    def __init__(
        self, message: Message, qos: int, retain: bool = False, subscription_ids: tuple[int, ...] = ()
    ) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        #: MQTT 5: the identifiers of the subscriptions it matched (3.3.4).
        self.subscription_ids = subscription_ids
        self.packet_id = 0
        self.released = False
        self.dup = False
        #: A persistent session's store numbers what it keeps (0: never stored), in arrival order.
        self.seq = 0


class SubOptions:
    """One subscription of a session: its granted QoS and MQTT 5 options (3.8.3.1)."""

    __slots__ = ("identifier", "no_local", "qos", "retain_as_published")

    def __init__(
        self, qos: int, no_local: bool = False, retain_as_published: bool = False, identifier: int = 0
    ) -> None:
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        #: Subscription Identifier, 0 when none.
        self.identifier = identifier

    def __repr__(self) -> str:
        return (
            f"SubOptions(qos={self.qos}, no_local={self.no_local}, "
            f"rap={self.retain_as_published}, id={self.identifier})"
        )


class Session:
    """The state of one client id, connected or not.

    ``online`` is true while a connection is attached; ``writable`` while that connection's
    transport accepts bytes (the engine clears it on ``pause_writing``). Delivery methods return
    the :class:`Delivery` objects to put on the wire now; everything else is queued or dropped here.
    """

    def __init__(
        self,
        client_id: str,
        *,
        persistent: bool,
        max_inflight: int,
        max_mqueue_len: int,
        store_qos0: bool,
        max_awaiting_rel: int,
    ) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.max_inflight = max_inflight
        #: 0 means no limit of ours (``infinity``).
        self.max_mqueue_len = max_mqueue_len
        self.store_qos0 = store_qos0
        self.max_awaiting_rel = max_awaiting_rel
        #: topic filter -> its options
        self.subscriptions: dict[str, SubOptions] = {}
        #: packet id -> delivery, in sending order
        self.inflight: dict[int, Delivery] = {}
        self.queue: deque[Delivery] = deque()
        #: incoming QoS 2 packet id -> when it arrived (the engine's clock), oldest first
        self.awaiting_rel: dict[int, float] = {}
        self.drops: Counter[str] = Counter()
        self.online = False
        self.writable = False
        self._last_id = 0
        #: Called with (reason, delivery) for every drop, so the engine can count and log it.
        self.on_drop: Callable[[str, Delivery], None] | None = None

    # ---------------------------------------------------------------- outgoing

    def deliver(self, delivery: Delivery) -> Delivery | None:
        """Take a delivery: returns it (with a packet id for QoS 1/2) when it is to be sent now,
        ``None`` when it was queued or dropped."""
        if not self.writable:
            if delivery.qos == 0 and not self.online and not self.store_qos0:
                self._drop(QOS0_OFFLINE, delivery)
                return None
            self._enqueue(delivery)
            return None
        if delivery.qos == 0:
            return delivery
        if self.queue or len(self.inflight) >= self.max_inflight:
            self._enqueue(delivery)  # behind what already waits: order per subscriber is kept
            return None
        self._send_inflight(delivery)
        return delivery

    def drain(self, now: float = 0.0) -> list[Delivery]:
        """What may be sent from the queue now (window room, transport writable), in order;
        messages whose expiry interval ran out by ``now`` are dropped, never sent [MQTT-3.3.2-5]."""
        out: list[Delivery] = []
        queue = self.queue
        while queue and self.writable:
            head = queue[0]
            if head.message.expires_at is not None and now >= head.message.expires_at:
                queue.popleft()
                self._removed(head)
                self._drop(EXPIRED, head)
                continue
            if head.qos > 0:
                if len(self.inflight) >= self.max_inflight:
                    break
                self._send_inflight(head)
            else:
                self._removed(head)  # a QoS 0 message is done once written
            queue.popleft()
            out.append(head)
        return out

    def resend(self) -> list[Delivery]:
        """Every in-flight delivery, to be re-sent on a resumed session [MQTT-4.4.0-1]: PUBLISH
        with DUP=1, or the PUBREL of a QoS 2 delivery already PUBREC'd."""
        for delivery in self.inflight.values():
            delivery.dup = True
        return list(self.inflight.values())

    def acknowledge(self, packet_id: int, stage: str) -> bool:
        """A PUBACK / PUBREC / PUBCOMP (``stage``) for an outgoing delivery. True when it matched.

        PUBREC marks a QoS 2 delivery released (its PUBREL is then what goes out); PUBACK,
        PUBCOMP and an MQTT 5 PUBREC with a failure code (``pubrec_error``) end it and free its
        packet id.
        """
        delivery = self.inflight.get(packet_id)
        if delivery is None:
            return False
        if stage == "pubrec":
            if delivery.qos != 2:
                return False
            delivery.released = True
            self._saved(delivery)
            return True
        if stage == "pubrec_error":  # MQTT 5: a PUBREC with a failure code ends the flow
            if delivery.qos != 2 or delivery.released:
                return False
        elif stage == "puback":
            if delivery.qos != 1:
                return False
        elif delivery.qos != 2 or not delivery.released:  # pubcomp
            return False
        del self.inflight[packet_id]
        self._removed(delivery)
        return True

    def abandon(self, delivery: Delivery, reason: str) -> None:
        """A delivery that cannot be sent after all (larger than the client's Maximum Packet
        Size): its packet id is freed and the drop counted."""
        if delivery.packet_id and self.inflight.get(delivery.packet_id) is delivery:
            del self.inflight[delivery.packet_id]
        self._removed(delivery)
        self._drop(reason, delivery)

    def filter_pending(self, keep: Callable[[Message], bool]) -> int:
        """Drop queued and in-flight deliveries whose message ``keep`` refuses (authorization for a
        connection from a new address); returns how many went."""
        before = len(self.queue) + len(self.inflight)
        for packet_id, delivery in list(self.inflight.items()):
            if not delivery.released and not keep(delivery.message):
                del self.inflight[packet_id]
                self._removed(delivery)
                self._drop(NOT_AUTHORIZED, delivery)
        kept: deque[Delivery] = deque()
        for delivery in self.queue:
            if keep(delivery.message):
                kept.append(delivery)
            else:
                self._removed(delivery)
                self._drop(NOT_AUTHORIZED, delivery)
        self.queue = kept
        return before - len(self.queue) - len(self.inflight)

    def discard(self) -> None:
        """The session ends (clean session, expiry, kick): what waits is dropped and counted (the
        hooks are not told: whoever keeps the session forgets it whole)."""
        for delivery in [*self.inflight.values(), *self.queue]:
            self._drop(SESSION_DISCARDED, delivery)
        self.inflight.clear()
        self.queue.clear()
        self.awaiting_rel.clear()
        self.subscriptions.clear()

    # ---------------------------------------------------------------- incoming QoS 2

    def receive_qos2(self, packet_id: int, now: float, timeout: float) -> bool | None:
        """An incoming QoS 2 PUBLISH: True when it is new (route it), False for a re-sent one
        (already routed: only answer PUBREC), ``None`` when ``max_awaiting_rel`` ids are already
        waiting (the engine closes the connection). Ids older than ``timeout`` are forgotten first.
        """
        waiting = self.awaiting_rel
        if packet_id in waiting:
            return False
        self.expire_awaiting_rel(now - timeout)
        if len(waiting) >= self.max_awaiting_rel:
            return None
        waiting[packet_id] = now
        self._changed()
        return True

    def expire_awaiting_rel(self, before: float) -> int:
        """Forget incoming QoS 2 ids that arrived before ``before``; returns how many."""
        waiting = self.awaiting_rel
        gone = 0
        for packet_id, arrived in list(waiting.items()):
            if arrived >= before:
                break  # in arrival order: the rest are younger
            del waiting[packet_id]
            gone += 1
        if gone:
            self._changed()
        return gone

    def release(self, packet_id: int) -> None:
        """A PUBREL: the id is free again (a PUBCOMP is sent either way, MQTT 3.1.1 4.3.3)."""
        if self.awaiting_rel.pop(packet_id, None) is not None:
            self._changed()

    # ---------------------------------------------------------------- internals

    def _send_inflight(self, delivery: Delivery) -> None:
        delivery.packet_id = self._next_packet_id()
        self.inflight[delivery.packet_id] = delivery
        self._saved(delivery)

    def _next_packet_id(self) -> int:
        # The window (<= 65535) is smaller than the id space, so a free id always exists.
        candidate = self._last_id
        inflight = self.inflight
        while True:
            candidate = candidate + 1 if candidate < MAX_PACKET_ID else 1
            if candidate not in inflight:
                self._last_id = candidate
                return candidate

    def _enqueue(self, delivery: Delivery) -> None:
        queue = self.queue
        if self.max_mqueue_len and len(queue) >= self.max_mqueue_len:
            oldest = queue.popleft()
            self._removed(oldest)
            self._drop(QUEUE_FULL, oldest)
        queue.append(delivery)
        self._saved(delivery)

    # Hooks for whoever keeps the session elsewhere (the engine's persistent sessions, in a store);
    # nothing here. Called on every change of what a restart must bring back.

    def _saved(self, delivery: Delivery) -> None:
        """``delivery`` was queued, or changed (given a packet id, released by its PUBREC)."""

    def _removed(self, delivery: Delivery) -> None:
        """``delivery`` left the session: acknowledged, written at QoS 0, dropped."""

    def _changed(self) -> None:
        """The incoming QoS 2 packet ids awaiting PUBREL changed."""

    def _drop(self, reason: str, delivery: Delivery) -> None:
        self.drops[reason] += 1
        if self.on_drop is not None:
            self.on_drop(reason, delivery)

    def pending(self) -> Iterator[Delivery]:
        """In-flight then queued deliveries (for reports and tests)."""
        yield from self.inflight.values()
        yield from self.queue


#: How a shared subscription group picks the member that gets a message (EMQX's names).
SHARED_STRATEGIES: Final = ("round_robin", "random", "sticky", "hash_clientid", "hash_topic")


class SharedGroup:
    """The members of one ``$share/{group}/{filter}`` (MQTT 5 4.8.2): each message goes to one.

    ``members`` maps client id -> its options, in subscription order. :meth:`pick` chooses by the
    strategy, preferring members whose ``available`` says they can take it now (connected and
    writable), so a message is not queued for an offline member while another is there.
    """

    __slots__ = ("_next", "_sticky", "filter", "group", "members")

    def __init__(self, group: str, topic_filter: str) -> None:
        self.group = group
        self.filter = topic_filter
        self.members: dict[str, SubOptions] = {}
        self._next = 0
        self._sticky: str | None = None

    def pick(
        self, strategy: str, publisher: str, topic: str, available: Callable[[str], bool], chance: float
    ) -> str | None:
        """The member to deliver to, or ``None`` when the group is empty. ``chance`` is a number in
        [0, 1) for the ``random`` strategy (the caller's random source, so this stays pure)."""
        members = list(self.members)
        if not members:
            return None
        ready = [member for member in members if available(member)] or members
        if strategy == "sticky":
            if self._sticky not in ready:
                self._sticky = ready[0]
            return self._sticky
        if strategy == "random":
            return ready[int(chance * len(ready))]
        if strategy == "hash_clientid":
            return ready[_stable_hash(publisher) % len(ready)]
        if strategy == "hash_topic":
            return ready[_stable_hash(topic) % len(ready)]
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]


def _stable_hash(text: str) -> int:
    """A hash that is the same in every process (``hash()`` of a str is salted per process)."""
    value = 0
    for byte in text.encode():
        value = (value * 31 + byte) & 0xFFFFFFFF
    return value
