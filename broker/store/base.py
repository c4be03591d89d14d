"""The persistence seam: what the engine hands a store, and what a store gives back at start.

A :class:`Store` keeps the broker's state across restarts. The engine keeps the truth in memory and
tells the store every change as it happens (:meth:`Store.put_retained`, :meth:`Store.delete_retained`:
O(1), never I/O on the event loop); the store writes behind, in batches, and gives everything back
once at start (:meth:`Store.load_retained`). What ``put_retained`` is handed is the engine's own
:class:`~broker.core.session.Message`, shared and never changed once made, so that a store converts it
(:meth:`StoredMessage.from_message`) where it writes, off the loop, not once per publish on it.
:meth:`Store.flush` waits until what was handed over is durable; :meth:`Store.close` (at a clean
stop) flushes, then lets go of the file or server.

Implementations: :class:`NullStore` (``persistence.enable: false``: nothing kept),
:class:`MemoryStore` (kept in this process only: tests, embedding), ``broker.store.sqlite`` (the
embedded default, one file in ``node.data_dir``), and later a Redis cluster store behind the same
protocol. Sessions will join the same way: ``put_session`` / ``delete_session`` / ``load_sessions``,
the latest state per client id, written in the same batches as retained messages.

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
from dataclasses import dataclass
from typing import Any, Protocol

from broker.core.session import Message
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
            True,
            self.publisher,
            properties_from_json(self.properties),
            expires_at,
        )


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

    async def flush(self) -> None:
        """Nothing to write. Never raises."""

    async def close(self) -> None:
        """Nothing to close. Never raises."""


class MemoryStore:
    """Keeps the latest state in this process only (for tests, and for embedding the engine): what a
    store was handed, and what it gives back, without a file."""

    location = "memory"

    def __init__(self, retained: Mapping[str, StoredMessage] | None = None) -> None:
        self.retained: dict[str, StoredMessage] = dict(retained or {})

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

    async def flush(self) -> None:
        """Nothing to write. Never raises."""

    async def close(self) -> None:
        """Nothing to close (the messages stay, for a test to read). Never raises."""
