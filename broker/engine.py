"""The MQTT engine: amqtt, and every use of its internals in the project.

Written against **amqtt 0.12.1** exactly (pinned in pyproject.toml). Nothing else in the project
imports amqtt; :func:`check_amqtt_version` refuses to start on any other version, because what is
used here (``Broker.external_connected``, the adapter ABCs, ``Broker.sessions``, plugin loading by
dotted path) is not a stable API. ``tests/unit/test_engine_pin.py`` fails loudly if the installed
amqtt changes under us.

Connections arrive through :meth:`Engine.serve`, the one function listeners call: a
:class:`~listeners.connection.Connection` and the :class:`~listeners.address.ClientAddress`
the listener learned. amqtt sees that address as the peer (``get_peer_info``), so its own logs
and its sessions carry the real client, never the load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import amqtt
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError, ProtocolHandlerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import (
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import OUTGOING, OutgoingApplicationMessage, Session

from broker.access import Gatekeeper, Refusal
from broker.authorization import Authorizer, topic_matches
from broker.errors import EngineError
from broker.metrics import MessageCounters

if TYPE_CHECKING:
    from broker.settings import ListenerSettings
    from listeners.address import ClientAddress
    from listeners.connection import Connection

logger = logging.getLogger(__name__)

#: The only amqtt release this module is written for.
AMQTT_VERSION = "0.12.1"

#: Seconds that shutdown waits for amqtt to close its sessions before connections are dropped.
SHUTDOWN_TIMEOUT = 1.5

#: [MQTT-3.1.2-24] a client silent for this many keepalive periods is disconnected.
KEEPALIVE_FACTOR = 1.5

#: Seconds a take-over waits for the connection it replaces to wind down (will, events) before
#: the new one proceeds; bounded so that a stuck old connection cannot block its successor.
TAKEOVER_TIMEOUT = 2.0


def check_amqtt_version(found: str | None = None) -> None:
    """Refuse to run on an amqtt other than :data:`AMQTT_VERSION`.

    Raises:
        EngineError: the installed (or given) version differs.
    """
    found = amqtt.__version__ if found is None else found
    if found != AMQTT_VERSION:
        raise EngineError(
            f"broker/engine.py is written against amqtt {AMQTT_VERSION} internals, but amqtt {found} is "
            f"installed; install amqtt=={AMQTT_VERSION} (pyproject.toml pins it)"
        )


class _ConnectionReader(ReaderAdapter):
    """amqtt's reader interface over a listener's :class:`Connection`."""

    def __init__(self, connection: Connection, max_read: int, who: str) -> None:
        self._connection = connection
        self._max_read = max_read
        self._who = who
        #: When bytes last arrived (time.monotonic), for the keepalive watchdog.
        self.last_activity = time.monotonic()

    async def read(self, n: int = -1) -> bytes:
        # amqtt always asks for exact sizes; readexactly's IncompleteReadError is what it expects
        # at end of stream (codecs_amqtt.read_or_raise turns it into NoDataError).
        if n > self._max_read:
            # amqtt reads a packet's body in one call sized by the packet's remaining length:
            # refuse before buffering what a client announces (up to 256 MB) [mqtt.max_packet_size].
            logger.warning(
                "%s announced a %d-byte packet (mqtt.max_packet_size %d); closing",
                self._who,
                n,
                self._max_read,
            )
            self._connection.abort()
            raise asyncio.IncompleteReadError(b"", n)
        data = await self._connection.read(n)
        self.last_activity = time.monotonic()
        return data

    def feed_eof(self) -> None:
        """Not used by the broker side of amqtt."""


#: MQTT control packet type of PUBLISH (first byte's high nibble) [MQTT-2.2.1].
_PUBLISH = 3

#: The only protocol level amqtt 0.12.1 accepts (MQTT 3.1.1) [MQTT-3.1.2-2].
_PROTOCOL_LEVEL = 4


class _ConnectionWriter(WriterAdapter):
    """amqtt's writer interface; reports the real client as the peer.

    amqtt writes each packet with one ``write`` call (``MQTTPacket.to_stream``), which is where
    outgoing PUBLISH packets are counted.
    """

    def __init__(
        self,
        connection: Connection,
        address: ClientAddress,
        listener_id: str,
        counters: MessageCounters,
        cert_as_username: bool = False,
    ) -> None:
        self.connection = connection
        self.address = address
        self.listener_id = listener_id
        self.counters = counters
        self.cert_as_username = cert_as_username
        self.connected_at: float | None = None
        self.proto_ver = _PROTOCOL_LEVEL
        #: Why the connection ended, once known: client_disconnect, connection_lost, kicked,
        #: takeover, shutdown.
        self.end_reason: str | None = None

    def write(self, data: bytes) -> None:
        if data and data[0] >> 4 == _PUBLISH:
            self.counters.sent += 1
        self.connection.write(data)

    def drain(self) -> Coroutine[Any, Any, None]:
        # The connection's own coroutine, not one wrapping it: one frame less per packet sent.
        return self.connection.drain()

    def get_peer_info(self) -> tuple[str, int]:
        return self.address.ip, self.address.port

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self.connection.ssl_object()

    async def close(self) -> None:
        await self.connection.close()


class AcceptAllAuthPlugin(BaseAuthPlugin):
    """Accept every CONNECT that reached the engine.

    amqtt refuses a client when no auth plugin answers. Its AnonymousAuthPlugin would mark the
    session anonymous, and amqtt then drops a persistent session's queued QoS 1/2 messages; this
    plugin does not.
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return True


@dataclass(frozen=True, slots=True)
class SessionView:
    """A connected client as operators see it (no amqtt types leak out)."""

    client_id: str
    username: str | None
    address: ClientAddress
    listener_id: str
    clean_session: bool
    keepalive: int
    connected_at: float
    proto_ver: int


class EngineHooks(Protocol):
    """What the engine reports (the audit log implements it)."""

    def connected(self, view: SessionView) -> None:
        """A client was admitted (after CONNACK)."""
        return None

    def disconnected(self, view: SessionView, reason: str) -> None:
        """A client's connection ended."""
        return None

    def refused(
        self,
        listener_id: str,
        address: ClientAddress,
        reason: str,
        client_id: str | None,
        username: str | None,
    ) -> None:
        """A CONNECT was refused (CONNACK 5)."""
        return None


class _NoHooks(EngineHooks):
    """Reports nothing (the protocol's methods do nothing)."""


class _Handler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler with its QoS 1/2 delivery kept across disconnects.

    amqtt 0.12.1 dropped an outgoing QoS 1/2 message from the session when its acknowledgement did
    not come within 5 s or the connection closed, so nothing was re-sent on reconnect; it also
    answered an MQTT 3.1 CONNECT with nothing at all.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._retries: set[asyncio.Task[None]] = set()

    @classmethod
    async def init_from_connect(
        cls,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's CONNECT handling, answering unsupported protocol versions as the spec asks.

        Raises:
            MQTTError: the CONNECT is refused (a CONNACK was sent where the spec wants one).
        """
        connect = await ConnectPacket.from_stream(reader)
        # [MQTT-3.1.2-2] an unsupported level (MQTT 3.1 "MQIsdp"/3, MQTT 5) gets CONNACK 0x01,
        # then the connection is closed; amqtt closed MQTT 3.1 clients without a word.
        if (connect.proto_name, connect.proto_level) in (("MQIsdp", 3), ("MQTT", 5)):
            await ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION).to_stream(writer)
            raise MQTTError(f"protocol level {connect.proto_level} ({connect.proto_name}) is not supported")
        if (
            connect.payload is not None
            and connect.payload.client_id_is_random
            and not connect.clean_session_flag
        ):
            # [MQTT-3.1.3-8] a zero-length client id needs clean session. Checked here because the
            # replayed CONNECT below carries the id amqtt generated, no longer empty.
            await ConnackPacket.build(0, IDENTIFIER_REJECTED).to_stream(writer)
            raise MQTTError("[MQTT-3.1.3-8] zero-length client id with clean session 0")
        # amqtt's own checks and session set-up run on the same CONNECT, re-read from its bytes.
        replay = _ReplayReader(connect.to_bytes(), reader)
        handler, session = await super().init_from_connect(replay, writer, plugins_manager, loop)
        return handler, session

    async def _retry_deliveries(self) -> None:
        """[MQTT-4.4.0-1] re-send unacknowledged PUBLISH/PUBREL, and resume incoming QoS 2 messages
        waiting for PUBREL, without holding up the session."""
        assert self.session is not None
        pending = [*self.session.inflight_in.values(), *self.session.inflight_out.values()]
        for message in pending:
            task = asyncio.create_task(self._deliver_outgoing(message))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _deliver_outgoing(self, message: OutgoingApplicationMessage) -> None:
        # Cancelled or failed with the connection: the message stays in flight for the next one.
        with contextlib.suppress(asyncio.CancelledError, ProtocolHandlerError):
            await self._handle_message_flow(message)

    async def stop(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await super().stop()

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        waiter = self._pubrel_waiters.get(pubrel.packet_id)
        if waiter is None or waiter.done():
            # MQTT 3.1.1 4.3.3: the receiver MUST answer a PUBREL with PUBCOMP, also for an id it no
            # longer holds (delivered before a reconnect), or the client re-sends it forever;
            # amqtt only logged it.
            await self._send_packet(PubcompPacket.build(pubrel.packet_id))
            return
        await super().handle_pubrel(pubrel)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        assert self.session is not None and app_message.packet_id is not None
        packet_id = app_message.packet_id
        self.session.inflight_out[packet_id] = app_message
        # A re-send carries DUP=1 [MQTT-3.3.1-1].
        packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            # No timeout: in MQTT 3.1.1 an unacknowledged message is re-sent on reconnect, not dropped.
            app_message.puback_packet = await waiter
            self.session.inflight_out.pop(packet_id, None)
        finally:
            self._puback_waiters.pop(packet_id, None)

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        assert self.session is not None and app_message.packet_id is not None
        packet_id = app_message.packet_id
        self.session.inflight_out[packet_id] = app_message
        loop = asyncio.get_running_loop()
        if app_message.pubrec_packet is None:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            rec: asyncio.Future[PubrecPacket] = loop.create_future()
            self._pubrec_waiters[packet_id] = rec
            try:
                await self._send_packet(packet)
                app_message.publish_packet = packet
                app_message.pubrec_packet = await rec
            finally:
                self._pubrec_waiters.pop(packet_id, None)
        # After PUBREC, the PUBREL is what is (re-)sent [MQTT-4.3.3-1, 4.4.0-1].
        comp: asyncio.Future[PubcompPacket] = loop.create_future()
        self._pubcomp_waiters[packet_id] = comp
        try:
            app_message.pubrel_packet = PubrelPacket.build(packet_id)
            await self._send_packet(app_message.pubrel_packet)
            app_message.pubcomp_packet = await comp
            self.session.inflight_out.pop(packet_id, None)
        finally:
            self._pubcomp_waiters.pop(packet_id, None)


class _ReplayReader(ReaderAdapter):
    """Serves bytes already read (a parsed CONNECT) before the connection's own."""

    def __init__(self, head: bytes, reader: ReaderAdapter) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            data: bytes = await self._reader.read(n)
            return data
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += await self._reader.read(n - len(data))
        return data

    def feed_eof(self) -> None:
        """Not used by the broker side of amqtt."""


class _Once:
    """Calls a function the first time it is called, never again."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._function: Callable[[], None] | None = function

    def __call__(self) -> None:
        function, self._function = self._function, None
        if function is not None:
            function()


class _KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: str) -> None:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key)
            raise

    def release(self, key: str) -> None:
        self._locks[key][0].release()
        self._forget(key)

    def _forget(self, key: str) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


class _Broker(Broker):
    """amqtt's Broker with its connection lifecycle replaced (``_client_connected``).

    amqtt 0.12.1 changes session state before it knows whether a client is admitted, and mixes
    up sessions on reconnect. This lifecycle decides in a fixed order:

    1. read the CONNECT within ``connect_timeout`` (amqtt waits forever: AMQTT.md fault d);
    2. decide admission (access lists and bans on the real address, client id and username, then
       authentication) before touching any existing session, so a refused client can neither wipe
       nor take over a session (faults b, c) and leaves no "connected" ghost;
    3. take over a connected session of the same client id by closing the old connection and
       waiting for it to wind down [MQTT-3.1.4-2] (amqtt left it running on a clean-session CONNECT);
    4. resume a persistent session with the *new* connection's address and TLS state (fault a:
       amqtt kept the old peer, so access control and reports saw a stale address);
    5. send retained messages only for new subscriptions [MQTT-3.3.1-6] (amqtt re-sent, on every
       CONNECT, the retained messages matching *any* client's subscription, to the new client).
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        connect_timeout: float,
        counters: MessageCounters,
        gatekeeper: Gatekeeper | None,
        hooks: EngineHooks,
        authorizer: Authorizer,
    ) -> None:
        super().__init__(config)
        self.authorizer = authorizer
        self.connect_timeout = connect_timeout
        self.counters = counters
        self.gatekeeper = gatekeeper
        self.hooks = hooks
        # client id -> set once the connection currently attached to that session has ended.
        self._flows: dict[str, asyncio.Event] = {}
        self._id_locks = _KeyedLocks()
        # Deliveries under way (a task each, as amqtt's handler API wants).
        self._deliveries: set[asyncio.Future[Any]] = set()

    def _delivery_done(self, task: asyncio.Future[Any]) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a delivery failed: %r", task.exception())

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        assert isinstance(writer, _ConnectionWriter), "only our listeners feed this broker"
        who = f"{writer.listener_id}: {writer.address.describe()}"
        try:
            handler, incoming = await asyncio.wait_for(
                _Handler.init_from_connect(reader, writer, self.plugins_manager),
                self.connect_timeout,
            )
        except TimeoutError:
            logger.info(
                "%s sent no CONNECT within %.1fs (mqtt.idle_timeout); closing", who, self.connect_timeout
            )
            await writer.close()
            return
        except Exception as exc:  # amqtt raises many types for a malformed CONNECT
            logger.info("%s: refused: invalid CONNECT: %s", who, exc or type(exc).__name__)
            await writer.close()
            return
        client_id = incoming.client_id or ""
        if writer.cert_as_username:
            # peer_cert_as_username: cn. The username is the verified certificate's CN, whatever
            # the client sent; without one the client has no username (it cannot claim one).
            tls = writer.address.tls
            incoming.username = tls.cert_cn if tls is not None and tls.cert_verified and tls.cert_cn else None
        refusal = None
        if self.gatekeeper is not None:
            refusal = self.gatekeeper.check_client(
                writer.listener_id, writer.address.ip, client_id, incoming.username
            )
        if refusal is None and incoming.will_flag:
            refusal = self._check_will(incoming)
        if refusal is None and not await self._authenticate(incoming, self.listeners_config[listener_name]):
            refusal = Refusal("auth", "not authorized by the authentication plugins")
        if refusal is not None:
            logger.warning("%s: client %r refused: %s [%s]", who, client_id, refusal.message, refusal.reason)
            self.hooks.refused(
                writer.listener_id, writer.address, refusal.reason, client_id, incoming.username
            )
            # [MQTT-3.2.2-4] a refusing CONNACK has session present 0; then close [MQTT-3.2.2-5].
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            return
        # One admission at a time per client id, held until the connection is fully started
        # (CONNACK sent, handler running): two CONNECTs with the same id arriving together must not
        # both take over the old connection, nor take over one that is still starting.
        await self._id_locks.acquire(client_id)
        release = _Once(lambda: self._id_locks.release(client_id))
        try:
            session = await self._take_session(incoming)
            keep_alive = self._attach(session, handler, reader, writer)
        except BaseException:
            release()
            raise
        await self._run_session(session, handler, reader, writer, keep_alive=keep_alive, started=release)

    def _check_will(self, incoming: Session) -> Refusal | None:
        """A will is a PUBLISH the client asks for in advance: the same rules apply, decided now."""
        topic = incoming.will_topic or ""
        if not topic or "#" in topic or "+" in topic or "\0" in topic:
            return Refusal("will_topic", f"will topic {topic!r} is not a valid topic name [MQTT-3.1.3-10]")
        if topic.startswith("$SYS"):
            return Refusal("will_topic", f"will topic {topic!r}: $SYS topics belong to the broker")
        if not self._topic_filtering_sync(incoming, topic, Action.PUBLISH):
            return Refusal("will_topic", f"may not publish its will to {topic!r} (authorization rules)")
        return None

    async def _take_session(self, incoming: Session) -> Session:
        """The session this admitted CONNECT continues or starts; takes over a connected one."""
        client_id = incoming.client_id or ""
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            await self._take_over(client_id, existing[1])
            existing = self._sessions.get(client_id)
        if incoming.clean_session or existing is None:
            if existing is not None:
                await self._cleanup_session(client_id)  # [MQTT-3.1.2-6] discard the previous session
            incoming.parent = 0
            return incoming
        session = existing[0]
        for name in (
            "will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
            "username", "password", "remote_address", "remote_port", "ssl_object",
        ):  # fmt: skip
            setattr(session, name, getattr(incoming, name))
        session.clean_session = False
        session.parent = 1  # [MQTT-3.2.2-2] session present
        # In-flight messages were allowed to the session's previous connection; the new one (maybe
        # from another address) gets only what it may receive now.
        for packet_id, message in list(session.inflight_out.items()):
            if not self._topic_filtering_sync(session, message.topic, Action.RECEIVE):
                del session.inflight_out[packet_id]
        return session

    async def _take_over(self, client_id: str, old_handler: BrokerProtocolHandler) -> None:
        logger.info("client %r connected again: closing its previous connection", client_id)
        await self.disconnect(client_id, old_handler, "takeover")

    async def disconnect(self, client_id: str, handler: BrokerProtocolHandler, reason: str) -> None:
        """Close a client's connection as if it dropped, and wait (bounded) for its flow to end."""
        if isinstance(handler.writer, _ConnectionWriter) and handler.writer.end_reason is None:
            handler.writer.end_reason = reason
        flow_ended = self._flows.get(client_id)
        await handler.handle_connection_closed()
        await handler.stop()
        if flow_ended is not None:
            try:
                await asyncio.wait_for(flow_ended.wait(), TAKEOVER_TIMEOUT)
            except TimeoutError:
                logger.warning("connection of client %r did not end in time", client_id)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's per-client loop, with what arrived before a DISCONNECT routed first.

        amqtt handles a DISCONNECT ahead of the messages that preceded it and then drops those still
        queued, QoS 1/2 messages it has already acknowledged included [MQTT-4.6.0-2]. Its own reader
        is slow enough (a task per packet read) that the queue rarely fills; ours is not (see
        _run_session), and a publisher sending a burst and disconnecting lost most of it. Here
        subscriptions and deliveries are handled before a disconnect seen in the same wake-up, and
        the queue is drained before the session ends.
        """
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        try:
            while True:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        await self._protocol_violation(client_session, handler)
                        return
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter in done:
                    wait_deliver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await wait_deliver
                    if not wait_deliver.cancelled() and not await self._handle_message_delivery(
                        client_session, handler, wait_deliver
                    ):
                        await self._protocol_violation(client_session, handler)
                        return
                    if not await self._drain_deliveries(client_session, handler):
                        await self._protocol_violation(client_session, handler)
                        return
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    return
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        except asyncio.CancelledError:
            logger.debug("client loop of %r cancelled", client_session.client_id)
        finally:
            for waiter in (disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver):
                waiter.cancel()
            await asyncio.gather(
                disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver, return_exceptions=True
            )

    async def _drain_deliveries(self, client_session: Session, handler: BrokerProtocolHandler) -> bool:
        """Route the messages the client sent that are still queued; False on a protocol violation."""
        queue = client_session.delivered_message_queue
        loop = asyncio.get_running_loop()
        while not queue.empty():
            delivered: asyncio.Future[Any] = loop.create_future()
            delivered.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(client_session, handler, delivered):
                return False
        return True

    async def _protocol_violation(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Close a client that broke the protocol; like any abnormal close, its will is published."""
        writer = handler.writer
        if isinstance(writer, _ConnectionWriter) and writer.end_reason is None:
            writer.end_reason = "protocol_error"
        closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        closed.set_result(None)
        await self._handle_disconnect(client_session, handler, closed)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """One PUBLISH received from a client: check it, route it, retain it. False closes the connection."""
        message = wait_deliver.result()
        if message is None:
            return True
        self.counters.received += 1
        topic = message.topic
        # [MQTT-4.7.3-1] non-empty; [MQTT-3.3.2-2] no wildcards in a topic name.
        if not topic or "#" in topic or "+" in topic or "\0" in topic:
            logger.warning(
                "%s: invalid topic name %r in PUBLISH; closing [MQTT-3.3.2-2]",
                _who(client_session, handler),
                topic,
            )
            return False
        # $SYS belongs to the broker; other $-topics are the applications' own and are routed (never
        # to wildcard subscriptions, [MQTT-4.7.2-1]).
        if topic.startswith("$SYS"):
            logger.info(
                "%s may not publish to %r: $SYS topics belong to the broker; dropped",
                _who(client_session, handler),
                topic,
            )
            return True
        if not self._topic_filtering_sync(client_session, topic, Action.PUBLISH):
            logger.info(
                "%s may not publish to %r (authorization rules); dropped",
                _who(client_session, handler),
                topic,
            )
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=message
        )
        await self._broadcast_message(client_session, topic, message.data, message.qos)
        packet = message.publish_packet
        if packet is not None and packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Deliver one message to every subscriber: one copy per client, at min(publish QoS, the
        highest QoS of its matching subscriptions) [MQTT-3.3.5-1], queued (QoS 1/2) for an offline
        persistent session [MQTT-3.1.2-5]. amqtt sent one copy per matching subscription, each at
        the *subscription's* QoS even when that was higher than the publish QoS."""
        broadcast = await self._broadcast_queue.get()
        topic, data = broadcast["topic"], broadcast["data"]
        publish_qos = broadcast.get("qos")
        publish_qos = QOS_0 if publish_qos is None else publish_qos
        targets: dict[str, tuple[Session, int]] = {}
        for topic_filter, subscriptions in self._subscriptions.items():
            if not subscriptions or not topic_matches(topic_filter, topic):
                continue
            for session, sub_qos in subscriptions:
                key = session.client_id or ""
                best = targets.get(key)
                if best is None or sub_qos > best[1]:
                    targets[key] = (session, sub_qos)
        for session, sub_qos in targets.values():
            if not self._topic_filtering_sync(session, topic, Action.RECEIVE):
                continue
            qos = min(publish_qos, sub_qos)
            if session.transitions.state != "connected":
                if not session.clean_session and qos > QOS_0:
                    await self._retain_broadcast_message(broadcast, qos, session)
                continue
            handler = self._get_handler(session)
            if handler is not None:
                running_tasks.append(
                    asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
                )

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued while the client was offline, with RETAIN=0 [MQTT-3.3.1-9]
        (amqtt sent them flagged as retained messages)."""
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            # Queued for the previous connection; the new one may come from elsewhere.
            if not self._topic_filtering_sync(session, queued.topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """[MQTT-3.3.1-6] retained messages for a new subscription, RETAIN=1, at
        min(retained QoS, subscription QoS) [MQTT-3.3.1-8] (amqtt took a retained QoS 0 for "no
        QoS" and sent it at the subscription's QoS), and only topics the client may receive."""
        topic_filter, sub_qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if topic_matches(topic_filter, topic) and self._topic_filtering_sync(
                session, topic, Action.RECEIVE
            ):
                qos = min(sub_qos, retained.qos or QOS_0)
                tasks.append(
                    asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, qos, retain=True))
                )
        if tasks:
            await asyncio.wait(tasks)

    def _topic_filtering_sync(self, session: Session, topic: str, action: Action) -> bool:
        if not self.authorizer.active:
            return True
        ip = session.remote_address or ""
        if action is Action.SUBSCRIBE:
            return self.authorizer.allows(
                "subscribe", topic, session.client_id or "", session.username, ip, is_filter=True
            )
        kind = "publish" if action is Action.PUBLISH else "subscribe"
        return self.authorizer.allows(kind, topic, session.client_id or "", session.username, ip)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # amqtt asks its topic plugins through a task per plugin per message; the rules are plain
        # code, so they are asked directly.
        return self._topic_filtering_sync(session, topic, action)

    async def _keepalive(
        self,
        handler: BrokerProtocolHandler,
        reader: _ConnectionReader,
        writer: _ConnectionWriter,
        keep_alive: int,
    ) -> None:
        """[MQTT-3.1.2-24] close a client silent for 1.5 x its keepalive; its will is then published
        like for any other abnormal close. amqtt noticed the silence and did nothing."""
        limit = keep_alive * KEEPALIVE_FACTOR
        while True:
            idle = time.monotonic() - reader.last_activity
            if idle >= limit:
                break
            await asyncio.sleep(limit - idle)
        if writer.end_reason is None:
            writer.end_reason = "keepalive_timeout"
        logger.info(
            "%s: client %r sent nothing for %.1fs (1.5 x keepalive %ds); closing",
            writer.listener_id,
            handler.session.client_id if handler.session else None,
            limit,
            keep_alive,
        )
        await handler.handle_connection_closed()

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        writer = handler.writer
        if isinstance(writer, _ConnectionWriter) and writer.end_reason is None:
            clean = isinstance(disconnect_waiter.result(), DisconnectPacket)
            writer.end_reason = "client_disconnect" if clean else "connection_lost"
        if client_session.will_flag and self._check_will(client_session) is not None:
            client_session.will_flag = False  # checked at CONNECT; never published unchecked
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    def _attach(
        self, session: Session, handler: BrokerProtocolHandler, reader: ReaderAdapter, writer: WriterAdapter
    ) -> int:
        """Register the connection as the session's; returns the client's keepalive."""
        client_id = session.client_id or ""
        if session.transitions.is_connected():
            session.transitions.disconnect()
        # amqtt's own keepalive machinery does nothing on the broker side (its read and write
        # timeout handlers are no-ops) yet costs a task per packet read (wait_for) and a timer per
        # packet written. It is set up from session.keep_alive in attach() and start(); amqtt sees
        # 0 there, and _keepalive() enforces the client's real value.
        keep_alive: int = session.keep_alive
        session.keep_alive = 0
        handler.attach(session, reader, writer)
        session.transitions.connect()
        self._sessions[client_id] = (session, handler)
        self._flows[client_id] = asyncio.Event()
        return keep_alive

    async def _run_session(
        self,
        session: Session,
        handler: BrokerProtocolHandler,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        *,
        keep_alive: int,
        started: _Once,
    ) -> None:
        """Serve an attached connection to its end; ``started`` is called once it runs (or fails)."""
        client_id = session.client_id or ""
        flow_ended = self._flows[client_id]
        assert isinstance(writer, _ConnectionWriter)
        who = f"{writer.listener_id}: client {client_id!r} from {writer.address.describe()}"
        try:
            await handler.mqtt_connack_authorize(True)
            writer.connected_at = time.time()
            logger.info("%s connected", who)
            self.hooks.connected(_make_view(session, writer))
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
            )
            try:
                await handler.start()
            finally:
                session.keep_alive = keep_alive
                started()
            watchdog = None
            if keep_alive > 0 and isinstance(reader, _ConnectionReader):
                watchdog = asyncio.create_task(self._keepalive(handler, reader, writer, keep_alive))
            try:
                await self._publish_session_retained_messages(session)  # queued while offline
                await self._client_message_loop(session, handler)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
        finally:
            started()
            if self._flows.get(client_id) is flow_ended:
                del self._flows[client_id]
            current = self._sessions.get(client_id)
            if current is not None and current[0] is session and current[1] is handler:
                if session.transitions.is_connected():
                    await self._stop_handler(handler)
                    session.transitions.disconnect()
                if session.clean_session:
                    await self._cleanup_session(client_id)  # [MQTT-3.1.2-6]
            flow_ended.set()
            reason = writer.end_reason or "connection_lost"
            logger.info("%s disconnected (%s)", who, reason)
            if writer.connected_at is not None:
                self.hooks.disconnected(_make_view(session, writer), reason)


class Engine:
    """The amqtt broker behind our listeners."""

    def __init__(
        self,
        *,
        connect_timeout: float = 15.0,
        max_packet_size: int = 1024 * 1024,
        gatekeeper: Gatekeeper | None = None,
        hooks: EngineHooks | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._broker: _Broker | None = None
        self._authorizer = authorizer or Authorizer()
        self._connect_timeout = connect_timeout
        self._max_packet_size = max_packet_size
        self._gatekeeper = gatekeeper
        self._hooks: EngineHooks = hooks or _NoHooks()
        self.counters = MessageCounters()

    @staticmethod
    def amqtt_config(listener_ids: Sequence[str]) -> dict[str, Any]:
        """amqtt's configuration: one ``external`` listener per listener of ours, our auth plugin.

        amqtt requires a listener named ``default``; ours are named ``type:name`` so they never clash.
        amqtt's logging, packet-logging and $SYS plugins are left out: they cost per packet.
        """
        listeners: dict[str, Any] = {"default": {"type": "external"}}
        listeners.update({listener_id: {"type": "external"} for listener_id in listener_ids})
        return {"listeners": listeners, "plugins": {f"{__name__}.AcceptAllAuthPlugin": {}}}

    async def start(self, listener_ids: Sequence[str]) -> None:
        """Start amqtt with an external listener for each of ours.

        Raises:
            EngineError: wrong amqtt version, or amqtt failed to start.
        """
        check_amqtt_version()
        try:
            self._broker = _Broker(
                self.amqtt_config(listener_ids),
                connect_timeout=self._connect_timeout,
                counters=self.counters,
                gatekeeper=self._gatekeeper,
                hooks=self._hooks,
                authorizer=self._authorizer,
            )
            await self._broker.start()
        except Exception as exc:
            raise EngineError(f"the MQTT engine failed to start: {exc}") from exc

    async def serve(self, connection: Connection, address: ClientAddress, listener: ListenerSettings) -> None:
        """Run one client connection to its end. The one function listeners call.

        Raises:
            EngineError: the engine is not started.
        """
        if self._broker is None:
            raise EngineError("the MQTT engine is not started")
        writer = _ConnectionWriter(
            connection, address, listener.id, self.counters, listener.peer_cert_as_username == "cn"
        )
        reader = _ConnectionReader(connection, self._max_packet_size, f"{listener.id}: {address.describe()}")
        await self._broker.external_connected(reader, writer, listener.id)

    def sessions(self) -> list[SessionView]:
        """The clients connected now, in connection order."""
        if self._broker is None:
            return []
        views = (_view(session, handler) for session, handler in list(self._broker.sessions.values()))
        return [view for view in views if view is not None]

    def session(self, client_id: str) -> SessionView | None:
        """The connected client ``client_id``, if any."""
        if self._broker is None:
            return None
        entry = self._broker.sessions.get(client_id)
        return None if entry is None else _view(*entry)

    def count(self) -> int:
        """How many clients are connected."""
        return len(self.sessions())

    async def kick(self, client_id: str, reason: str = "kicked") -> bool:
        """Disconnect a connected client and discard its session; False if it is not connected."""
        broker = self._broker
        entry = None if broker is None else broker.sessions.get(client_id)
        if broker is None or entry is None or _view(*entry) is None:
            return False
        logger.info("client %r kicked (%s)", client_id, reason)
        await broker.disconnect(client_id, entry[1], reason)
        if client_id in broker.sessions and broker.sessions[client_id][0] is entry[0]:
            await broker._cleanup_session(client_id)
        return True

    async def shutdown(self) -> None:
        """Disconnect every client and stop amqtt; bounded by :data:`SHUTDOWN_TIMEOUT`."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        for _, handler in broker.sessions.values():
            if isinstance(handler.writer, _ConnectionWriter) and handler.writer.end_reason is None:
                handler.writer.end_reason = "shutdown"
        try:
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "the MQTT engine did not stop within %.1fs; dropping connections", SHUTDOWN_TIMEOUT
            )
        except Exception:
            logger.exception("the MQTT engine failed while stopping")


def _view(session: Session, handler: BrokerProtocolHandler) -> SessionView | None:
    writer = handler.writer
    if session.transitions.state != "connected" or not isinstance(writer, _ConnectionWriter):
        return None
    if writer.connected_at is None:  # CONNACK not sent yet
        return None
    return _make_view(session, writer)


def _make_view(session: Session, writer: _ConnectionWriter) -> SessionView:
    return SessionView(
        client_id=session.client_id or "",
        username=session.username,
        address=writer.address,
        listener_id=writer.listener_id,
        clean_session=bool(session.clean_session),
        keepalive=session.keep_alive,
        connected_at=writer.connected_at or 0.0,
        proto_ver=writer.proto_ver,
    )


def _who(session: Session, handler: BrokerProtocolHandler) -> str:
    """``client 'id' from <real address> via <proxy>`` for log lines (built only when logged)."""
    writer = handler.writer
    where = writer.address.describe() if isinstance(writer, _ConnectionWriter) else "?"
    return f"client {session.client_id!r} from {where}"
