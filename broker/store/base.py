"""The persistence seam: what the engine hands a store, and what a store gives back at start.

A :class:`Store` keeps the broker's state across restarts: retained messages and persistent
sessions. The engine keeps the truth in memory and tells the store every change as it happens
(``put_*`` / ``delete_*``: O(1), never I/O on the event loop); the store writes behind, in batches,
and gives everything back once at start (:meth:`Store.load_retained`, :meth:`Store.load_sessions`).
What it is handed are the engine's own objects: a :class:`~broker.core.session.Message` is shared and
never changed once made, so that a store converts it (:meth:`StoredMessage.from_message`) where it
writes, off the loop, not once per publish on it; a :class:`~broker.core.session.Delivery` and a
:class:`SessionState` change, so a store reads them on the loop when it hands a batch over (the
latest state wins: a QoS 1 delivery queued and acknowledged within one batch is never written).
:meth:`Store.flush` waits until what was handed over is durable; :meth:`Store.close` (at a clean
stop) flushes, then lets go of the file or server.

A persistent session is kept as rows a change touches one at a time: the session's own state
(:class:`StoredSession`: expiry, owner, the address its rules were compiled for, its will, the
incoming QoS 2 ids awaiting PUBREL), each subscription (:class:`StoredSubscription`), each queued or
in-flight delivery (:class:`StoredDelivery`, numbered by the store in arrival order,
``Delivery.seq``). :meth:`Store.delete_session` forgets all of one client id.

Implementations: :class:`NullStore` (``persistence.enable: false``: nothing kept),
:class:`MemoryStore` (kept in this process only: tests, embedding), ``broker.store.sqlite`` (the
embedded default, one file in ``node.data_dir``), and later a Redis cluster store behind the same
protocol.

A :class:`StoredMessage` is store-neutral: its ``properties`` are JSON-able (binary values as
``{"__bytes__": base64}``) and its ``expires_at`` is a wall-clock time (``time.time()``), because the
engine's loop clock starts again at every start. :meth:`StoredMessage.from_message` and
:meth:`StoredMessage.to_message` convert, given both clocks' readings.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from broker.core.session import Delivery, Message, SubOptions
from broker.errors import RealIPError

logger = logging.getLogger(__name__)

#: The key of a binary property value in its JSON form: ``{"__bytes__": "<base64>"}`` (a property
#: value is otherwise an int, a string, or a list of them: never a mapping, so no clash).
BYTES_KEY = "__bytes__"


class StoreError(RealIPError):
    """A store cannot be opened, read or written; the message names the file (or server), says what
    is wrong and what to do."""


def properties_to_json(properties: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """MQTT 5 properties (``broker.mqtt.properties``' value types) as JSON-able data, or ``None`` for
    none: ``bytes`` become ``{"__bytes__": base64}``, tuples (``user_property`` pairs) lists.

    Raises:
        ValueError: a value of another type (not a property value).
    """
    if not properties:
        return None
    return {name: _to_json(name, value) for name, value in properties.items()}


def _to_json(name: str, value: Any) -> Any:
    if isinstance(value, bytes):
        return {BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if isinstance(value, str | int):
        return value
    if isinstance(value, list | tuple):
        return [_to_json(name, item) for item in value]
    raise ValueError(f"property {name}: a {type(value).__name__} value cannot be stored")


def properties_from_json(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The inverse of :func:`properties_to_json`: ``user_property`` back to a list of
    ``(name, value)`` tuples, binary values back to ``bytes``.

    Raises:
        ValueError: not what :func:`properties_to_json` makes (a damaged or hand-edited store).
    """
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(f"properties: {data!r} is not a mapping")
    properties = {str(name): _from_json(str(name), value) for name, value in data.items()}
    pairs = properties.get("user_property")
    if pairs is not None:
        if not isinstance(pairs, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
            for pair in pairs
        ):
            raise ValueError(f"property user_property: {pairs!r} is not a list of string pairs")
        properties["user_property"] = [(pair[0], pair[1]) for pair in pairs]
    return properties or None


def _from_json(name: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) != {BYTES_KEY} or not isinstance(value[BYTES_KEY], str):
            raise ValueError(f"property {name}: {value!r} is not a {{{BYTES_KEY!r}: base64}} value")
        try:
            return base64.b64decode(value[BYTES_KEY], validate=True)
        except binascii.Error:
            raise ValueError(f"property {name}: {value[BYTES_KEY]!r} is not base64") from None
    if isinstance(value, list):
        return [_from_json(name, item) for item in value]
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise ValueError(f"property {name}: {value!r} is not a property value")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A retained message as a store keeps it.

    ``publisher`` is its sender's client id ("" for the broker's own); ``properties`` its MQTT 5
    properties in JSON-able form (:func:`properties_to_json`), or ``None``; ``expires_at`` when its
    Message Expiry Interval runs out, as a wall-clock time (seconds since the epoch), or ``None``.
    """

    topic: str
    payload: bytes
    qos: int
    publisher: str = ""
    properties: dict[str, Any] | None = None
    expires_at: float | None = None
    #: Its RETAIN flag (a retained message's is set; a queued delivery's message may not be).
    retain: bool = True

    @classmethod
    def from_message(cls, message: Message, *, loop_now: float, wall_now: float) -> StoredMessage:
        """The stored form of the engine's ``message``; ``loop_now`` and ``wall_now`` are the
        engine's clock and ``time.time()`` read now (to move ``expires_at`` from one to the other).

        Raises:
            ValueError: a property value of a type no property has.
        """
        expires_at = message.expires_at
        return cls(
            message.topic,
            message.payload,
            message.qos,
            message.publisher,
            properties_to_json(message.properties),
            None if expires_at is None else wall_now + (expires_at - loop_now),
            message.retain,
        )

    def expired(self, wall_now: float) -> bool:
        """Whether its Message Expiry Interval has run out at wall-clock time ``wall_now``."""
        return self.expires_at is not None and wall_now >= self.expires_at

    def to_message(self, *, loop_now: float, wall_now: float) -> Message | None:
        """The engine's retained message (its expiry on the engine's clock), or ``None`` when it
        expired meanwhile (while the broker was down, say).

        Raises:
            ValueError: its properties are not what :func:`properties_to_json` makes.
        """
        if self.expired(wall_now):
            return None
        expires_at = None if self.expires_at is None else loop_now + (self.expires_at - wall_now)
        return Message(
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            self.publisher,
            properties_from_json(self.properties),
            expires_at,
        )


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """One subscription of a persistent session: its filter and options (3.8.3.1)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    identifier: int = 0

    @classmethod
    def from_options(cls, topic_filter: str, options: SubOptions) -> StoredSubscription:
        """The stored form of the engine's subscription. Never raises."""
        return cls(
            topic_filter, options.qos, options.no_local, options.retain_as_published, options.identifier
        )

    def to_options(self) -> SubOptions:
        """The engine's form. Never raises."""
        return SubOptions(self.qos, self.no_local, self.retain_as_published, self.identifier)


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """A queued (``packet_id`` 0) or in-flight delivery of a persistent session: its message, the
    QoS and RETAIN flag it goes with, the subscription identifiers it matched, and for a QoS 2 one
    whether its PUBREC came (``released``: its PUBREL is what goes out again). ``seq`` orders a
    session's deliveries as they arrived."""

    seq: int
    message: StoredMessage
    qos: int
    retain: bool = False
    subscription_ids: tuple[int, ...] = ()
    packet_id: int = 0
    released: bool = False


@dataclass(frozen=True, slots=True)
class StoredWill:
    """A persistent session's will: the message, and when it is published unless the client
    reconnects first. ``due_at`` is a wall-clock time (a delayed will of a disconnected session);
    ``None`` means the connection was open when the state was written, so the broker stopped under
    it: the will goes ``delay`` seconds after the next start (the connection ended without
    DISCONNECT, MQTT 5 3.1.2.5)."""

    message: StoredMessage
    delay: float = 0.0
    due_at: float | None = None


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A persistent session's own state, beside its subscriptions and deliveries.

    ``disconnected_at`` is when its client went (wall clock), ``None`` while one is connected (the
    expiry then counts from the next start). ``owner`` is the authenticated username that made it
    (:attr:`broker.engine.EngineSession.owner`); ``username``, ``authenticated``, ``superuser`` and
    ``ip`` are what its authorization rules were compiled for, so that an offline session gets
    only what its client may read after a restart too. ``awaiting_rel`` are incoming QoS 2 packet
    ids not yet released.
    """

    client_id: str
    expiry_interval: float
    disconnected_at: float | None = None
    owner: str | None = None
    username: str | None = None
    authenticated: bool = False
    superuser: bool = False
    ip: str = ""
    awaiting_rel: tuple[int, ...] = ()
    will: StoredWill | None = None
    subscriptions: tuple[StoredSubscription, ...] = ()
    deliveries: tuple[StoredDelivery, ...] = ()

    def ends_at(self, wall_now: float) -> float:
        """When it expires (wall clock), counting a connected one's expiry from ``wall_now``."""
        gone = wall_now if self.disconnected_at is None else self.disconnected_at
        return gone + self.expiry_interval


class SessionState(Protocol):
    """What a store is handed for a session's own state: read (:meth:`stored`) when the store hands
    a batch over, so that many changes within one batch are one write."""

    client_id: str

    def stored(self, *, loop_now: float, wall_now: float) -> StoredSession:
        """Its state now, without subscriptions and deliveries (kept row by row). Never raises."""
        ...


class Store(Protocol):
    """Where the broker's state outlives the process (see the module's docstring).

    ``put_retained`` and ``delete_retained`` are called on the event loop for every change: they
    must return at once (record the change; write it later, elsewhere). The coroutines run their
    I/O off the loop.
    """

    #: What log lines and errors name: the file, or the server.
    location: str

    async def open(self) -> None:
        """Open (or create) the store.

        Raises:
            StoreError: it cannot be opened or is not a store of this broker (the message says what
                to do).
        """

    async def load_retained(self) -> list[StoredMessage]:
        """Every retained message kept, expired ones included (the engine drops those).

        Raises:
            StoreError: it cannot be read.
        """
        return []

    def put_retained(self, message: Message) -> None:
        """Keep the engine's ``message`` as its topic's retained message (replacing any). Never
        blocks; the conversion to a :class:`StoredMessage` may happen later, elsewhere (the message
        is never changed). A message that cannot be stored (a property value of no property type:
        a bug) is logged and its topic deleted instead.

        Raises:
            RuntimeError: the store is not open.
        """

    def delete_retained(self, topic: str) -> None:
        """Forget ``topic``'s retained message. Never blocks.

        Raises:
            RuntimeError: the store is not open.
        """

    async def load_sessions(self) -> list[StoredSession]:
        """Every persistent session kept, with its subscriptions and deliveries (in ``seq`` order),
        expired ones included (the engine ends those). Numbers later deliveries after the highest
        ``seq`` kept.

        Raises:
            StoreError: it cannot be read.
        """
        return []

    def put_session(self, state: SessionState) -> None:
        """Keep a persistent session's own state (read from ``state`` later). Never blocks.

        Raises:
            RuntimeError: the store is not open.
        """

    def delete_session(self, client_id: str) -> None:
        """Forget everything of ``client_id``'s session: its state, subscriptions and deliveries.

        Raises:
            RuntimeError: the store is not open.
        """

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """Keep (or replace) one subscription of a persistent session.

        Raises:
            RuntimeError: the store is not open.
        """

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """Forget one subscription of a persistent session.

        Raises:
            RuntimeError: the store is not open.
        """

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """Keep a queued or in-flight delivery of a persistent session, or its new state (packet id,
        released); gives it a ``seq`` if it has none.

        Raises:
            RuntimeError: the store is not open.
        """

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """Forget the delivery numbered ``seq`` (it left the session; 0, never kept: nothing to do).

        Raises:
            RuntimeError: the store is not open.
        """

    def stats(self) -> dict[str, int]:
        """Its counters since it was made, for ``/metrics``: ``writes`` (transactions committed),
        ``rows_written``, ``write_failures``, ``pending`` (changes not yet handed to the writer).
        Never raises."""
        return {}

    async def flush(self) -> None:
        """Return when everything handed over so far is durable.

        Raises:
            StoreError: it could not be written (what was not written is kept and retried).
            RuntimeError: the store is not open.
        """

    async def close(self) -> None:
        """Flush, then let go of the file or server. Safe to call twice, or unopened.

        Raises:
            StoreError: what was pending could not be written (the store is closed anyway).
        """


def stored_delivery(delivery: Delivery, *, loop_now: float, wall_now: float) -> StoredDelivery:
    """The stored form of the engine's ``delivery`` (with a ``seq``), clocks as
    :meth:`StoredMessage.from_message`.

    Raises:
        ValueError: a property value of a type no property has.
    """
    return StoredDelivery(
        delivery.seq,
        StoredMessage.from_message(delivery.message, loop_now=loop_now, wall_now=wall_now),
        delivery.qos,
        delivery.retain,
        delivery.subscription_ids,
        delivery.packet_id,
        delivery.released,
    )


class NullStore:
    """Keeps nothing (``persistence.enable: false``): every retained message is lost at a stop."""

    location = "nowhere (persistence.enable: false)"

    async def open(self) -> None:
        """Nothing to open. Never raises."""

    async def load_retained(self) -> list[StoredMessage]:
        """Nothing was kept. Never raises."""
        return []

    def put_retained(self, message: Message) -> None:
        """Dropped. Never raises."""

    def delete_retained(self, topic: str) -> None:
        """Nothing to forget. Never raises."""

    async def load_sessions(self) -> list[StoredSession]:
        """Nothing was kept. Never raises."""
        return []

    def put_session(self, state: SessionState) -> None:
        """Dropped. Never raises."""

    def delete_session(self, client_id: str) -> None:
        """Nothing to forget. Never raises."""

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """Dropped. Never raises."""

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """Nothing to forget. Never raises."""

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """Dropped. Never raises."""

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """Nothing to forget. Never raises."""

    def stats(self) -> dict[str, int]:
        """Nothing counted. Never raises."""
        return {}

    async def flush(self) -> None:
        """Nothing to write. Never raises."""

    async def close(self) -> None:
        """Nothing to close. Never raises."""


class MemoryStore:
    """Keeps the latest state in this process only (for tests, and for embedding the engine): what a
    store was handed, and what it gives back, without a file."""

    location = "memory"

    def __init__(
        self,
        retained: Mapping[str, StoredMessage] | None = None,
        sessions: Mapping[str, StoredSession] | None = None,
    ) -> None:
        self.retained: dict[str, StoredMessage] = dict(retained or {})
        #: client id -> its state (subscriptions and deliveries empty: kept below)
        self.sessions: dict[str, StoredSession] = {}
        self.subscriptions: dict[str, dict[str, StoredSubscription]] = {}
        self.deliveries: dict[str, dict[int, StoredDelivery]] = {}
        self._seq = 0
        for client_id, session in (sessions or {}).items():
            self.sessions[client_id] = replace(session, subscriptions=(), deliveries=())
            self.subscriptions[client_id] = {s.topic_filter: s for s in session.subscriptions}
            self.deliveries[client_id] = {d.seq: d for d in session.deliveries}

    async def open(self) -> None:
        """Nothing to open. Never raises."""

    async def load_retained(self) -> list[StoredMessage]:
        """What was put and not deleted, by topic. Never raises."""
        return [self.retained[topic] for topic in sorted(self.retained)]

    def put_retained(self, message: Message) -> None:
        """Converted and kept at once (the engine's clock is the running loop's).

        Raises:
            RuntimeError: no event loop is running.
        """
        loop_now = asyncio.get_running_loop().time()
        try:
            stored = StoredMessage.from_message(message, loop_now=loop_now, wall_now=time.time())
        except ValueError as exc:
            logger.error("retained message on %r not stored: %s", message.topic, exc)
            self.retained.pop(message.topic, None)
            return
        self.retained[message.topic] = stored

    def delete_retained(self, topic: str) -> None:
        """Forgotten at once. Never raises."""
        self.retained.pop(topic, None)

    async def load_sessions(self) -> list[StoredSession]:
        """What was put and not deleted, whole, by client id. Never raises."""
        self._seq = max((seq for kept in self.deliveries.values() for seq in kept), default=self._seq)
        return [self.session(client_id) for client_id in sorted(self.sessions)]

    def session(self, client_id: str) -> StoredSession:
        """One session, whole (for tests).

        Raises:
            KeyError: none is kept for ``client_id``.
        """
        return replace(
            self.sessions[client_id],
            subscriptions=tuple(self.subscriptions.get(client_id, {}).values()),
            deliveries=tuple(sorted(self.deliveries.get(client_id, {}).values(), key=lambda d: d.seq)),
        )

    def put_session(self, state: SessionState) -> None:
        """Read and kept at once (the engine's clock is the running loop's).

        Raises:
            RuntimeError: no event loop is running.
        """
        loop_now = asyncio.get_running_loop().time()
        self.sessions[state.client_id] = state.stored(loop_now=loop_now, wall_now=time.time())

    def delete_session(self, client_id: str) -> None:
        """Forgotten at once. Never raises."""
        self.sessions.pop(client_id, None)
        self.subscriptions.pop(client_id, None)
        self.deliveries.pop(client_id, None)

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """Kept at once. Never raises."""
        self.subscriptions.setdefault(client_id, {})[topic_filter] = StoredSubscription.from_options(
            topic_filter, options
        )

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """Forgotten at once. Never raises."""
        self.subscriptions.get(client_id, {}).pop(topic_filter, None)

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """Converted and kept at once.

        Raises:
            RuntimeError: no event loop is running.
        """
        if not delivery.seq:
            self._seq += 1
            delivery.seq = self._seq
        loop_now = asyncio.get_running_loop().time()
        self.deliveries.setdefault(client_id, {})[delivery.seq] = stored_delivery(
            delivery, loop_now=loop_now, wall_now=time.time()
        )

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """Forgotten at once. Never raises."""
        self.deliveries.get(client_id, {}).pop(seq, None)

    def stats(self) -> dict[str, int]:
        """Nothing is written (everything is kept at once). Never raises."""
        return {"writes": 0, "rows_written": 0, "write_failures": 0, "pending": 0}

    async def flush(self) -> None:
        """Nothing to write. Never raises."""

    async def close(self) -> None:
        """Nothing to close (the messages stay, for a test to read). Never raises."""


class FanOut:
    """Several stores told the same changes, in order (the node's own store, then the cluster's
    session mirror): what is loaded at start comes from the first; its counters are the first's.
    The first is the one that numbers deliveries (``Delivery.seq``)."""

    def __init__(self, *stores: Store) -> None:
        self.stores = stores
        self.location = stores[0].location

    async def open(self) -> None:
        """Open each, in order.

        Raises:
            StoreError: as :meth:`Store.open` (those opened are left open: close them).
        """
        for store in self.stores:
            await store.open()

    async def load_retained(self) -> list[StoredMessage]:
        """The first store's.

        Raises:
            StoreError: it cannot be read.
        """
        return await self.stores[0].load_retained()

    def put_retained(self, message: Message) -> None:
        """To each. Raises as :meth:`Store.put_retained`."""
        for store in self.stores:
            store.put_retained(message)

    def delete_retained(self, topic: str) -> None:
        """To each. Raises as :meth:`Store.delete_retained`."""
        for store in self.stores:
            store.delete_retained(topic)

    async def load_sessions(self) -> list[StoredSession]:
        """The first store's.

        Raises:
            StoreError: it cannot be read.
        """
        return await self.stores[0].load_sessions()

    def put_session(self, state: SessionState) -> None:
        """To each. Raises as :meth:`Store.put_session`."""
        for store in self.stores:
            store.put_session(state)

    def delete_session(self, client_id: str) -> None:
        """To each. Raises as :meth:`Store.delete_session`."""
        for store in self.stores:
            store.delete_session(client_id)

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """To each. Raises as :meth:`Store.put_subscription`."""
        for store in self.stores:
            store.put_subscription(client_id, topic_filter, options)

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """To each. Raises as :meth:`Store.delete_subscription`."""
        for store in self.stores:
            store.delete_subscription(client_id, topic_filter)

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """To each. Raises as :meth:`Store.put_delivery`."""
        for store in self.stores:
            store.put_delivery(client_id, delivery)

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """To each. Raises as :meth:`Store.delete_delivery`."""
        for store in self.stores:
            store.delete_delivery(client_id, seq)

    def stats(self) -> dict[str, int]:
        """The first store's. Never raises."""
        return self.stores[0].stats()

    async def flush(self) -> None:
        """Each, in order.

        Raises:
            StoreError: as :meth:`Store.flush`.
        """
        for store in self.stores:
            await store.flush()

    async def close(self) -> None:
        """Each, in order, all of them even if one fails.

        Raises:
            StoreError: the first failure (the others are closed anyway).
        """
        error: StoreError | None = None
        for store in self.stores:
            try:
                await store.close()
            except StoreError as exc:
                error = error or exc
        if error is not None:
            raise error
