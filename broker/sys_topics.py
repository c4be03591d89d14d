"""``$SYS`` topics: the broker's figures every interval, and client events with the real address.

Two kinds of messages, published through the engine's own :meth:`~broker.engine.Engine.publish`
(clients may not publish ``$SYS`` topics: ``Engine.accepts_publish`` drops them; the broker's own
``publish`` does not go through that check). All of them are QoS 0 and have ``publisher`` "":

- **Client events** (EMQX's names and payload, with the proxy's address added): when a client is
  admitted, ``$SYS/brokers/<node>/clients/<clientid>/connected``; when its connection ends,
  ``.../disconnected``. Not retained. The payload is one JSON object::

      {"clientid": "sensor-1", "username": "alice",
       "ipaddress": "203.0.113.7", "port": 50412,            # the real client (PROXY / X-Forwarded-For)
       "proxy_ipaddress": "10.0.0.2", "proxy_port": 41234,   # the balancer; null for a direct client
       "address_source": "proxy_protocol_v1", "listener": "tcp:default",
       "proto_ver": 4, "clean_start": true, "keepalive": 60,
       "connected_at": "2026-11-27T03:36:05.011+00:00", "ts": "2026-11-27T03:36:05.012+00:00",
       "reason": "keepalive_timeout"}                        # disconnected only

  Times are ISO 8601 with milliseconds, as in the audit log and the admin API (EMQX sends
  milliseconds since the epoch instead).

- **Figures** (mosquitto's names, under ``$SYS/brokers/<node>/``), retained, as text:
  ``version``, ``uptime`` (``"N seconds"``), ``clients/connected``, ``clients/total`` (sessions
  held, connected or not), ``messages/received``, ``messages/sent``, ``messages/dropped`` (all
  reasons) and ``messages/dropped/<reason>``, ``subscriptions/count``, ``retained messages/count``,
  ``connects/refused/<reason>``. :meth:`SysTopics.start` publishes all of them, then every
  ``interval`` only those whose text changed since it was last published (as mosquitto does), so
  a quiet broker sends little more than ``uptime``.

A client id, or a reason, is one topic level: ``%``, ``/``, ``+``, ``#`` and U+0000 in it are
percent-encoded (``a/b+c`` -> ``a%2Fb%2Bc``), nothing else is touched, so percent-decoding the level
(``urllib.parse.unquote``) gives back the exact id, and two ids never share a topic. An
empty id would be an empty level, which is a valid one (``+`` matches it [MQTT-4.7.1-3]); the engine
never reports one anyway (it assigns ``auto-<uuid>`` [MQTT-3.1.3-6]). A topic that would exceed the
65,535 bytes a topic can have (a client id near that size) uses :data:`OVERLONG_PREFIX` and the
id's SHA-256 as its level instead. The payload always holds the exact id.

Cost: nothing when the class is not wired in; one JSON encoding and one routing per connect and
disconnect when it is; one ``loop.call_later`` timer for the figures (no task).

``$SYS/#`` subscribers see every client's real address: restrict it with ``authorization.rules``
(EMQX's default rules let only localhost subscribe to ``$SYS/#``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from broker.audit import iso8601
from broker.core.session import Message
from broker.engine import EngineHooks

if TYPE_CHECKING:
    from broker.access import Refusal
    from broker.engine import SessionView
    from listeners.address import ClientAddress

logger = logging.getLogger(__name__)

#: Every topic starts with it, then the node name: EMQX's layout, which keeps the nodes of a future
#: cluster apart (mosquitto, a single node, uses ``$SYS/broker/``).
SYS_PREFIX: Final = "$SYS/brokers/"

#: A topic name is a UTF-8 string of at most 65,535 bytes [MQTT-1.5.4]; the encoder refuses longer.
MAX_TOPIC_BYTES: Final = 65535

#: The longest node name accepted: room for ``name@`` and a full host name (253), and small enough
#: that every figure's topic stays far below :data:`MAX_TOPIC_BYTES`.
MAX_NODE_NAME_BYTES: Final = 1024

#: The level used instead of a client id whose topic would exceed :data:`MAX_TOPIC_BYTES`, followed
#: by the id's SHA-256 in hex. An encoded id never holds it: its ``%`` are always followed by two
#: hex digits, and ``s`` is not one.
OVERLONG_PREFIX: Final = "%sha256:"

#: What cannot stand as itself in one topic level: the separator, the wildcards (a topic name
#: holding one is invalid [MQTT-4.7.1-1]), U+0000 [MQTT-4.7.3-2], and ``%`` itself so that decoding
#: is exact.
_LEVEL_ESCAPES: Final = str.maketrans({"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"})
_ESCAPED: Final = frozenset("%/+#\0")

#: What a node name may not hold: it is one topic level, and must match itself in filters.
_NODE_FORBIDDEN: Final = frozenset("/+#\0")


def topic_level(text: str) -> str:
    """``text`` as one topic level: ``%``, ``/``, ``+``, ``#`` and U+0000 percent-encoded, the rest
    unchanged (``urllib.parse.unquote`` gives ``text`` back). Never raises."""
    # The common id has none of them: skip the translation's copy.
    if _ESCAPED.isdisjoint(text):
        return text
    return text.translate(_LEVEL_ESCAPES)


class Counters(Protocol):
    """What :class:`SysTopics` reads of the engine's counters (``broker.metrics.MessageCounters``)."""

    @property
    def received(self) -> int:
        """PUBLISH packets received from clients."""

    @property
    def sent(self) -> int:
        """PUBLISH packets sent to clients."""

    @property
    def dropped(self) -> Mapping[str, int]:
        """Messages dropped, by reason."""

    @property
    def refused(self) -> Mapping[str, int]:
        """CONNECTs refused, by reason."""


class FiguresSource(Protocol):
    """What :class:`SysTopics` reads the figures from (the :class:`~broker.engine.Engine`)."""

    @property
    def counters(self) -> Counters:
        """The message and connection counters."""

    def stats(self) -> dict[str, Any]:
        """Sizes: ``sessions``, ``subscriptions`` and ``retained`` are read."""

    def count(self) -> int:
        """Clients connected now."""


class SysTopics(EngineHooks):
    """Publishes the ``$SYS`` figures every ``interval`` and the client events (``EngineHooks``).

    ``publish`` is the engine's ``publish`` (route, and keep if retained); ``source`` the engine;
    ``started`` the :func:`time.monotonic` time the broker started (``clock``'s time base);
    ``wall`` gives the events' ``ts``. The hooks never raise: the engine calls them inline, in the
    middle of admitting or detaching a client. Refused CONNECTs publish nothing (``refused`` and
    ``auth_failed`` are ``EngineHooks``' no-ops): they are counted (``connects/refused/<reason>``)
    and audited, and an event per refusal would let a flood of them flood the subscribers too.
    """

    def __init__(
        self,
        publish: Callable[[Message], int],
        source: FiguresSource,
        *,
        node: str,
        interval: float,
        started: float,
        version: str,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Check the node name, interval and version once, and build the topics' prefix.

        Raises:
            ValueError: ``node`` is empty, holds ``/``, ``+``, ``#`` or U+0000, is not encodable
                UTF-8 or is longer than :data:`MAX_NODE_NAME_BYTES`; ``interval`` is not a positive
                finite number of seconds; ``version`` is empty (an empty retained message would
                delete the retained ``version`` instead [MQTT-3.3.1-10]).
        """
        if not node or not _NODE_FORBIDDEN.isdisjoint(node):
            raise ValueError(f"node name {node!r}: must be non-empty, without '/', '+', '#' or U+0000")
        try:
            size = len(node.encode())
        except UnicodeEncodeError:
            raise ValueError(f"node name {node!r} is not valid UTF-8 text") from None
        if size > MAX_NODE_NAME_BYTES:
            raise ValueError(f"node name of {size} bytes: at most {MAX_NODE_NAME_BYTES}")
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise ValueError(f"$SYS interval {interval!r}: must be a positive number of seconds")
        if not version:
            raise ValueError("$SYS version: must be non-empty")
        self._publish = publish
        self._source = source
        self.node = node
        self.interval = float(interval)
        self._started = started
        self._version = version
        self._clock = clock
        self._wall = wall
        #: Built once: every topic starts with one of them.
        self._prefix = f"{SYS_PREFIX}{node}/"
        self._clients = f"{self._prefix}clients/"
        #: topic -> the text last published there (what "only when changed" compares with).
        self._last: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ client events (hooks)

    def connected(self, view: SessionView) -> None:
        """A client was admitted: ``.../clients/<clientid>/connected``."""
        self._event(view, "connected", None)

    def disconnected(self, view: SessionView, reason: str) -> None:
        """A client's connection ended: ``.../clients/<clientid>/disconnected`` with ``reason``."""
        self._event(view, "disconnected", reason)

    def event_topic(self, client_id: str, event: str) -> str:
        """The topic of ``event`` (``connected``/``disconnected``) for ``client_id``, escaped as the
        module says, within :data:`MAX_TOPIC_BYTES`. Never raises."""
        topic = f"{self._clients}{topic_level(client_id)}/{event}"
        # A character is at most 4 bytes: only a topic that could be too long is measured.
        if len(topic) * 4 > MAX_TOPIC_BYTES and len(topic.encode(errors="surrogatepass")) > MAX_TOPIC_BYTES:
            digest = hashlib.sha256(client_id.encode(errors="surrogatepass")).hexdigest()
            topic = f"{self._clients}{OVERLONG_PREFIX}{digest}/{event}"
        return topic

    def _event(self, view: SessionView, event: str, reason: str | None) -> None:
        address = view.address
        record: dict[str, Any] = {
            "clientid": view.client_id,
            "username": view.username,
            "ipaddress": address.ip,
            "port": address.port,
            "proxy_ipaddress": address.proxy_ip,
            "proxy_port": address.proxy_port,
            "address_source": address.source.value,
            "listener": view.listener_id,
            "proto_ver": view.proto_ver,
            "clean_start": view.clean_session,
            "keepalive": view.keepalive,
            "connected_at": iso8601(view.connected_at),
            "ts": iso8601(self._wall()),
        }
        if reason is not None:
            record["reason"] = reason
        # ensure_ascii (the default) escapes every non-ASCII character, so encoding cannot fail.
        payload = json.dumps(record, separators=(",", ":")).encode()
        try:
            self._publish(Message(self.event_topic(view.client_id, event), payload, 0, False))
        except Exception:
            # The engine is admitting or detaching this client: a fault in a report must not
            # break that. Said, with its traceback, and the client goes on.
            logger.exception("$SYS event %s of client %r could not be published", event, view.client_id)

    # ------------------------------------------------------------------ figures

    def figures(self) -> dict[str, str]:
        """Every figure now: topic -> its text.

        Raises:
            KeyError: the source's ``stats()`` lacks ``sessions``, ``subscriptions`` or ``retained``.
        """
        source = self._source
        stats = source.stats()
        counters = source.counters
        prefix = self._prefix
        uptime = max(0, int(self._clock() - self._started))
        figures = {
            f"{prefix}version": self._version,
            f"{prefix}uptime": f"{uptime} seconds",
            f"{prefix}clients/connected": str(source.count()),
            f"{prefix}clients/total": str(stats["sessions"]),
            f"{prefix}messages/received": str(counters.received),
            f"{prefix}messages/sent": str(counters.sent),
            f"{prefix}messages/dropped": str(sum(counters.dropped.values())),
            f"{prefix}subscriptions/count": str(stats["subscriptions"]),
            f"{prefix}retained messages/count": str(stats["retained"]),
        }
        for reason, count in counters.dropped.items():
            figures[f"{prefix}messages/dropped/{topic_level(reason)}"] = str(count)
        for reason, count in counters.refused.items():
            figures[f"{prefix}connects/refused/{topic_level(reason)}"] = str(count)
        return figures

    def publish_now(self) -> int:
        """Publish every figure (retained), changed or not; returns how many.

        Raises:
            KeyError: as :meth:`figures`.
        """
        return self._publish_figures(only_changed=False)

    def publish_changed(self) -> int:
        """Publish the figures whose text changed since last published; returns how many.

        Raises:
            KeyError: as :meth:`figures`.
        """
        return self._publish_figures(only_changed=True)

    def _publish_figures(self, *, only_changed: bool) -> int:
        last = self._last
        published = 0
        for topic, text in self.figures().items():
            if only_changed and last.get(topic) == text:
                continue
            last[topic] = text
            self._publish(Message(topic, text.encode(), 0, True))
            published += 1
        return published

    # ------------------------------------------------------------------ the timer

    @property
    def running(self) -> bool:
        """Whether the figures are being published every interval."""
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Publish every figure now, then the changed ones every ``interval`` on ``loop``: one
        ``call_later`` timer at a time, each tick scheduling the next.

        Raises:
            RuntimeError: already started.
            KeyError: as :meth:`figures`.
        """
        if self._loop is not None:
            raise RuntimeError("$SYS topics are already started")
        self.publish_now()
        self._loop = loop
        self._timer = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        """Cancel the timer; nothing is published after it (the retained figures stay). Safe to
        call twice, or before :meth:`start`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def _tick(self) -> None:
        self._timer = None
        try:
            self.publish_changed()
        except Exception:
            # A fault here must not end the chain silently: say it, and try again next time.
            logger.exception("$SYS figures could not be published")
        loop = self._loop
        if loop is not None:  # not stopped meanwhile
            self._timer = loop.call_later(self.interval, self._tick)


class Hooks(EngineHooks):
    """Several ``EngineHooks`` called in turn, in the order added (give the audit trail first: its
    record is then written before anything else runs). Each hook must not raise, as the engine's
    single hook must not."""

    def __init__(self, *hooks: EngineHooks) -> None:
        self._hooks: tuple[EngineHooks, ...] = hooks

    def add(self, hook: EngineHooks) -> None:
        """Call ``hook`` too, after the others (the engine may already hold this object)."""
        self._hooks = (*self._hooks, hook)

    def connected(self, view: SessionView) -> None:
        """A client was admitted."""
        for hook in self._hooks:
            hook.connected(view)

    def disconnected(self, view: SessionView, reason: str) -> None:
        """A client's connection ended."""
        for hook in self._hooks:
            hook.disconnected(view, reason)

    def refused(
        self,
        listener_id: str,
        address: ClientAddress,
        reason: str,
        client_id: str | None,
        username: str | None,
    ) -> None:
        """A CONNECT was refused."""
        for hook in self._hooks:
            hook.refused(listener_id, address, reason, client_id, username)

    def auth_failed(  # noqa: PLR0917 - EngineHooks' signature
        self,
        listener_id: str,
        address: ClientAddress,
        refusal: Refusal,
        client_id: str,
        username: str | None,
        by: str,
    ) -> None:
        """A CONNECT was refused by authentication."""
        for hook in self._hooks:
            hook.auth_failed(listener_id, address, refusal, client_id, username, by)
