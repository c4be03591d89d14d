"""One client connection inside the engine: the listener's sink, the MQTT protocol, the session.

EMQX's split is the model: the listener owns the socket (``emqx_connection``), a :class:`Channel`
owns the protocol semantics of one connection (``emqx_channel``), and the
:class:`~broker.core.session.Session` it is attached to owns the delivery state
(``emqx_session``). A channel is push-driven: the listener calls :meth:`Channel.data_received`
with whatever bytes arrived, every complete packet is handled inline, and what is to be sent is
written once per event-loop iteration by the engine's flush (one ``writelines`` per connection).
No task runs per connection, per packet or per delivery; timers are ``call_at`` handles.
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import TYPE_CHECKING, Any

from broker.core.session import Delivery
from broker.logs import Throttle
from broker.mqtt import packets as mp
from broker.mqtt import reasons
from broker.mqtt.codec import encode_publish_parts
from broker.mqtt.protocol import MqttServerProtocol

if TYPE_CHECKING:
    import asyncio

    from broker.auth.base import Credentials
    from broker.authorization import ClientRules
    from broker.engine import Engine, EngineSession
    from listeners.address import ClientAddress
    from listeners.connection import Link

logger = logging.getLogger(__name__)

#: The protocol levels served: MQTT 3.1.1 and 5.0. An MQTT 3.1 CONNECT is answered CONNACK 1
#: ("unacceptable protocol version") at once and closed.
ACCEPTED_LEVELS = frozenset({4, 5})

#: Topic aliases the broker sets up towards one MQTT 5 client at most (fewer if the client allows
#: fewer): each holds a topic string for the connection's life, so the client's own maximum (up to
#: 65535) is not taken as it is.
MAX_OUTBOUND_ALIASES = 256

#: Packets a client may send after its CONNECT before the CONNACK (while it is authenticated):
#: reading stops meanwhile, so this only caps what the reads already done brought.
MAX_HELD_PACKETS = 1000


#: The DISCONNECT reason code an MQTT 5 client is sent when the broker ends its connection.
_DISCONNECT_CODES = {
    "takeover": reasons.SESSION_TAKEN_OVER,
    "kicked": reasons.ADMINISTRATIVE_ACTION,
    "banned": reasons.ADMINISTRATIVE_ACTION,
    "shutdown": reasons.SERVER_SHUTTING_DOWN,
    "listener_removed": reasons.SERVER_SHUTTING_DOWN,  # a reload stopped the client's listener
    "keepalive_timeout": reasons.KEEP_ALIVE_TIMEOUT,
}


class ChannelState(Enum):
    """Where a connection is in its life."""

    AWAITING_CONNECT = "awaiting_connect"
    CONNECTED = "connected"
    CLOSED = "closed"


class Channel:
    """The engine's side of one connection (implements ``listeners.connection.Sink``)."""

    # Slotted: one per connection, idle ones included (memory per connection is a benchmark).
    __slots__ = (
        "_timer",
        "address",
        "aliases_in",
        "aliases_out",
        "authenticated",
        "clean_start",
        "client_id",
        "closed",
        "connected_at",
        "credentials",
        "dirty",
        "end_reason",
        "engine",
        "handlers",
        "held",
        "is_superuser",
        "keepalive",
        "last_received",
        "link",
        "listener_id",
        "max_packet_out",
        "paused",
        "pending",
        "problem_info",
        "protocol",
        "receive_maximum",
        "retained",
        "rules",
        "session",
        "state",
        "throttle",
        "topic_alias_maximum",
        "username",
        "will",
    )

    def __init__(self, engine: Engine, link: Link, address: ClientAddress, listener_id: str) -> None:
        self.engine = engine
        self.link = link
        self.address = address
        self.listener_id = listener_id
        self.protocol = MqttServerProtocol(engine.settings.max_packet_size, ACCEPTED_LEVELS)
        self.state = ChannelState.AWAITING_CONNECT
        #: ``state is CLOSED``, as a plain attribute: read after every packet.
        self.closed = False
        self.session: EngineSession | None = None
        self.rules: ClientRules | None = None
        self.client_id = ""
        self.username: str | None = None
        self.clean_start = True
        self.keepalive = 0
        self.will: mp.Will | None = None
        self.connected_at = 0.0
        #: Why the connection ended, once known: client_disconnect, connection_lost, kicked,
        #: takeover, shutdown, keepalive_timeout, protocol_error, refused.
        self.end_reason: str | None = None
        #: Whether the transport asked us to stop writing (its buffer is full).
        self.paused = False
        #: Queued for the engine's next flush.
        self.dirty = False
        self.last_received = engine.loop.time()
        self._timer: asyncio.TimerHandle | None = engine.loop.call_at(
            self.last_received + engine.settings.idle_timeout, self._connect_timeout
        )
        #: Retained messages still to send for new subscriptions: (matches, granted QoS, sub id).
        self.retained: list[tuple[Any, int, int]] = []
        #: MQTT 5 (set at CONNECT): whether refusals may carry reason strings; the client's
        #: Receive Maximum, Maximum Packet Size (0: none) and Topic Alias Maximum; its aliases.
        self.problem_info = True
        self.receive_maximum = 65535
        self.max_packet_out = 0
        self.topic_alias_maximum = 0
        self.aliases_in: dict[int, str] = {}
        #: topic -> the alias we set up for it towards this client (MQTT 5 3.3.2.3.4)
        self.aliases_out: dict[str, int] = {}
        self.throttle = Throttle()
        #: The packet handlers in force: the normal ones, or those of a CONNECT being decided.
        self.handlers = _HANDLERS
        #: Packets that arrived while the CONNECT was being authenticated (None: not holding).
        self.held: list[mp.Packet] | None = None
        #: What the connection waits for: the task authenticating its CONNECT or asking the
        #: authorization sources, or an enhanced-authentication exchange (SCRAM) under way.
        self.pending: Any = None
        self.authenticated = False
        self.is_superuser = False
        #: Who the client is (its password dropped), for the authorization sources' requests.
        self.credentials: Credentials | None = None

    def describe(self) -> str:
        """``listener: client 'id' from <real address> via <proxy>`` for log lines."""
        if self.state is ChannelState.AWAITING_CONNECT:
            return f"{self.listener_id}: {self.address.describe()}"
        return f"{self.listener_id}: client {self.client_id!r} from {self.address.describe()}"

    # ------------------------------------------------------------------ sink

    def data_received(self, data: bytes) -> None:
        """Handle every complete packet in ``data`` (the listener's push)."""
        if self.closed:
            return
        self.last_received = self.engine.loop.time()
        self.engine.counters.bytes_received += len(data)
        protocol = self.protocol
        packets = protocol.receive_data(data)
        for packet in packets:
            # Looked up per packet: a CONNECT may switch to the holding (or AUTH) handlers.
            self.handlers[type(packet)](self, packet)
            if self.closed:
                return
        if protocol.close_requested:
            error = protocol.error
            if error is not None:
                logger.warning("%s: %s; closing", self.describe(), error)
            self.close("protocol_error")

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport is gone (the peer closed, or we did)."""
        if self.closed:
            self.engine.forget(self)
            return
        self.state = ChannelState.CLOSED
        self.closed = True
        self._cancel_timer()
        self._cancel_pending()
        self.engine.forget(self)
        if self.session is not None:
            self.engine.detach(self, self.end_reason or "connection_lost")
        elif self.end_reason is None:
            logger.debug("%s closed before CONNECT", self.describe())

    def pause_writing(self) -> None:
        """The transport's buffer is full: deliveries wait in the session's queue, and this
        client's own reading stops (it is not reading what it asked for)."""
        self.paused = True
        if self.session is not None:
            self.session.writable = False
        self.link.pause_reading()

    def resume_writing(self) -> None:
        """The transport drained: send what waited."""
        self.paused = False
        if self.held is None:  # while holding, reading resumes when the hold ends
            self.link.resume_reading()
        session = self.session
        if session is not None and self.state is ChannelState.CONNECTED:
            session.writable = True
            self.send_deliveries(session.drain(self.engine.loop.time()))
            self.engine.pump_retained(self)

    # ------------------------------------------------------------------ sending

    def send(self, packet: mp.Packet) -> None:
        """Encode a packet for the next flush."""
        self.protocol.send(packet)
        self.engine.mark_dirty(self)

    def send_delivery(self, delivery: Delivery) -> None:
        """Put one delivery on the wire (at the next flush): its PUBLISH, or its PUBREL once
        PUBREC'd. The encoded packet is cached on the message, shared by every subscriber, unless
        this delivery has properties of its own (MQTT 5 subscription identifiers, the remaining
        message expiry)."""
        if delivery.released:
            self.protocol.send(mp.Pubrel(delivery.packet_id))
            self.engine.mark_dirty(self)
            return
        message = delivery.message
        level = self.protocol.protocol_level
        qos = delivery.qos
        topic = message.topic
        alias = 0
        if self.topic_alias_maximum and level == 5:
            alias = self.aliases_out.get(topic, 0)
            if alias:
                topic = ""  # the alias stands for it
            elif len(self.aliases_out) < min(self.topic_alias_maximum, MAX_OUTBOUND_ALIASES):
                alias = self.aliases_out[topic] = len(self.aliases_out) + 1
        if level == 5 and (
            alias or message.properties or message.expires_at is not None or delivery.subscription_ids
        ):
            properties = dict(message.properties) if message.properties else {}
            if alias:
                properties["topic_alias"] = alias
            if message.expires_at is not None:  # MQTT 5 3.3.2.3.3: what is left of it
                properties["message_expiry_interval"] = max(
                    0, math.ceil(message.expires_at - self.engine.loop.time())
                )
            if delivery.subscription_ids:
                properties["subscription_identifier"] = list(delivery.subscription_ids)
            first, rest = encode_publish_parts(
                topic, message.payload, qos, delivery.retain, delivery.dup, properties, level
            )
        elif delivery.dup:
            first, rest = encode_publish_parts(
                message.topic, message.payload, qos, delivery.retain, True, None, level
            )
        else:
            key = (level, qos, delivery.retain)
            parts = message.encoded.get(key)
            if parts is None:
                parts = message.encoded[key] = encode_publish_parts(
                    message.topic, message.payload, qos, delivery.retain, False, None, level
                )
            first, rest = parts
        if self.max_packet_out and len(first) + len(rest) + (2 if qos else 0) > self.max_packet_out:
            # [MQTT-3.1.2-24 (MQTT 5)] never a packet above the client's Maximum Packet Size.
            if self.session is not None:
                self.session.abandon(delivery, "too_large")
            return
        if qos:
            self.protocol.send_raw(first, delivery.packet_id.to_bytes(2, "big"), rest)
        else:
            self.protocol.send_raw(first, rest)
        self.engine.counters.sent += 1
        self.engine.mark_dirty(self)

    def send_deliveries(self, deliveries: list[Delivery]) -> None:
        """:meth:`send_delivery` for each, in order."""
        for delivery in deliveries:
            self.send_delivery(delivery)

    def flush(self) -> None:
        """Write what is pending with one ``writelines`` (called by the engine's flush)."""
        self.dirty = False
        chunks = self.protocol.data_to_send()
        if chunks:
            self.engine.counters.bytes_sent += sum(map(len, chunks))
            self.link.writelines(chunks)

    def close(self, reason: str) -> None:
        """Flush, close the transport, and detach from the session now (not when the transport
        reports it is gone), so that a successor or the shutdown sees the final state at once."""
        if self.closed:
            return
        if self.end_reason is None:
            self.end_reason = reason
        was_connected = self.session is not None
        code = _DISCONNECT_CODES.get(self.end_reason)
        if was_connected and code is not None and self.protocol.protocol_level == 5:
            reference = self.engine.settings.server_reference
            if self.end_reason == "shutdown" and reference:
                # MQTT 5 4.11: send the client elsewhere instead of just "shutting down".
                moved = self.engine.settings.server_moved
                code = reasons.SERVER_MOVED if moved else reasons.USE_ANOTHER_SERVER
                self.protocol.disconnect(code, {"server_reference": reference})
            else:
                self.protocol.disconnect(code)
        self.state = ChannelState.CLOSED
        self.closed = True
        self._cancel_timer()
        self._cancel_pending()
        self.flush()
        self.link.close()
        if was_connected:
            self.engine.detach(self, self.end_reason)

    def abort(self, reason: str) -> None:
        """Drop the connection without flushing (shutdown's last step)."""
        if self.end_reason is None:
            self.end_reason = reason
        self.link.abort()

    # ------------------------------------------------------------------ authentication

    def hold(self, first: mp.Packet | None = None) -> None:
        """A CONNECT is being authenticated, or a packet (``first``) waits for the authorization
        sources: hold what follows, in order, and stop reading (so what is held is at most what
        one read brought; :data:`MAX_HELD_PACKETS` caps it anyway)."""
        self.held = [] if first is None else [first]
        self.handlers = _HOLDING
        self.link.pause_reading()

    def release(self) -> None:
        """The CONNECT was decided (and answered), or the sources answered: handle what was held,
        in order, then read on. A held packet may start another hold: the rest wait for it."""
        held, self.held = self.held, None
        self.handlers = _HANDLERS
        if held is None or self.closed:
            return
        for index, packet in enumerate(held):
            self.handlers[type(packet)](self, packet)
            if self.closed:
                return
            if self.held is not None:  # held again: the rest go after the packet that asked
                self.held.extend(held[index + 1 :])
                return
        if not self.paused:
            self.link.resume_reading()

    def expect_auth(self) -> None:
        """MQTT 5 enhanced authentication goes on: only AUTH or DISCONNECT may come now."""
        self.handlers = _AUTHENTICATING

    def _cancel_pending(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and hasattr(pending, "cancel"):
            pending.cancel()

    def _hold_packet(self, packet: mp.Packet) -> None:
        held = self.held
        if held is None:
            return
        if len(held) >= MAX_HELD_PACKETS and self.state is ChannelState.AWAITING_CONNECT:
            self.violation(0, f"sent more than {MAX_HELD_PACKETS} packets before its CONNACK")
            return
        # After CONNACK (a packet waiting for the authorization sources) reading is paused too:
        # what is held is what the reads already done brought, decoded.
        held.append(packet)

    def _on_auth(self, packet: mp.Auth) -> None:
        self.handlers = _HANDLERS
        self.engine.continue_exchange(self, packet)

    def _on_early_packet(self, packet: mp.Packet) -> None:
        self.violation(
            reasons.PROTOCOL_ERROR,
            f"sent a {type(packet).__name__} before its CONNACK during enhanced authentication "
            "[MQTT-3.1.2-30]",
        )

    # ------------------------------------------------------------------ timers

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _connect_timeout(self) -> None:
        self._timer = None
        if self.state is ChannelState.AWAITING_CONNECT:
            logger.info(
                "%s sent no CONNECT within %.1fs (mqtt.idle_timeout); closing",
                self.describe(),
                self.engine.settings.idle_timeout,
            )
            self.end_reason = "connect_timeout"
            self.state = ChannelState.CLOSED
            self.closed = True
            self._cancel_pending()  # an authentication still under way is not needed any more
            self.link.abort()

    def start_keepalive(self) -> None:
        """[MQTT-3.1.2-24] arm the keepalive check: a client silent for ``keepalive_multiplier``
        x its keepalive is disconnected (and its will published)."""
        self._cancel_timer()
        if self.keepalive > 0:
            limit = self.keepalive * self.engine.settings.keepalive_multiplier
            self._timer = self.engine.loop.call_at(self.last_received + limit, self._check_keepalive)

    def _check_keepalive(self) -> None:
        self._timer = None
        if self.state is not ChannelState.CONNECTED:
            return
        limit = self.keepalive * self.engine.settings.keepalive_multiplier
        deadline = self.last_received + limit
        if self.engine.loop.time() < deadline:  # heard from since: check again then
            self._timer = self.engine.loop.call_at(deadline, self._check_keepalive)
            return
        logger.info(
            "%s sent nothing for %.1fs (%g x keepalive %ds); closing",
            self.describe(),
            limit,
            self.engine.settings.keepalive_multiplier,
            self.keepalive,
        )
        self.close("keepalive_timeout")

    # ------------------------------------------------------------------ packets

    def _on_connect(self, packet: mp.Connect) -> None:
        # The idle timer runs on until CONNACK: it bounds a slow authentication too.
        self.engine.admit(self, packet)

    def _on_publish(self, packet: mp.Publish) -> None:
        session = self.session
        if session is None:
            return
        engine = self.engine
        qos = packet.qos
        packet_id = packet.packet_id or 0
        topic = packet.topic
        properties = packet.properties
        v5 = self.protocol.protocol_level == 5
        if v5 and properties:
            topic = self._resolve_alias(topic, properties)
            if not topic:
                return
            if "subscription_identifier" in properties:
                self.violation(
                    reasons.PROTOCOL_ERROR, "sent a Subscription Identifier in a PUBLISH [MQTT-3.3.4-6]"
                )
                return
        # Decided before anything else is done with it: a packet waiting for the authorization
        # sources is handled again, from the start, once they answered.
        accepted = engine.accepts_publish(self, topic, qos, packet)
        if accepted is None:
            return
        engine.counters.received += 1
        if qos == 2:
            fresh = session.receive_qos2(packet_id, engine.loop.time(), engine.settings.await_rel_timeout)
            if fresh is None:
                engine.counters.dropped["awaiting_rel_full"] += 1
                if v5:  # we announced it as our Receive Maximum
                    self.violation(
                        reasons.RECEIVE_MAXIMUM_EXCEEDED,
                        f"has {session.max_awaiting_rel} QoS 2 messages awaiting PUBREL (Receive Maximum)",
                    )
                else:
                    self.violation(
                        0,
                        f"has {session.max_awaiting_rel} QoS 2 messages awaiting PUBREL "
                        "(mqtt.max_awaiting_rel)",
                    )
                return
            if not fresh:  # a re-send of one already routed [MQTT-4.3.3-2]
                self.send(mp.Pubrec(packet_id))
                return
        code = reasons.SUCCESS
        if accepted:
            message = engine.make_message(
                self, topic, packet.payload, qos, packet.retain, dict(properties) if properties else None
            )
            if not engine.route(message):
                code = reasons.NO_MATCHING_SUBSCRIBERS
            if packet.retain:
                engine.retain(message, self)
        else:
            code = reasons.NOT_AUTHORIZED
        if self.closed or not qos:
            return
        if not v5:
            code = 0
        elif qos == 2 and code >= 0x80:
            session.release(packet_id)  # a refusing PUBREC ends the flow: no PUBREL follows
        self.send(mp.Puback(packet_id, code) if qos == 1 else mp.Pubrec(packet_id, code))

    def _resolve_alias(self, topic: str, properties: dict[str, Any]) -> str:
        """MQTT 5 3.3.2.3.4: the topic of a PUBLISH using a Topic Alias ("" after a violation)."""
        alias = properties.get("topic_alias")
        if alias is None:
            return topic
        limit = self.engine.settings.max_topic_alias
        if not 0 < alias <= limit:
            self.violation(
                reasons.TOPIC_ALIAS_INVALID, f"used topic alias {alias} (mqtt.max_topic_alias {limit})"
            )
            return ""
        if topic:
            self.aliases_in[alias] = topic  # at most max_topic_alias entries
            return topic
        known = self.aliases_in.get(alias)
        if known is None:
            self.violation(reasons.PROTOCOL_ERROR, f"used topic alias {alias} before setting it")
            return ""
        return known

    def violation(self, code: int, what: str) -> None:
        """The client broke a rule the decoder cannot see: log, DISCONNECT (MQTT 5), close."""
        logger.warning("%s %s; closing", self.describe(), what)
        if code:
            self.protocol.disconnect(code)
        self.close("protocol_error")

    def _on_puback(self, packet: mp.Puback) -> None:
        self._acknowledged(packet.packet_id, "puback")

    def _on_pubrec(self, packet: mp.Pubrec) -> None:
        if packet.reason_code >= 0x80:  # MQTT 5: the client refused it; the delivery ends here
            self._acknowledged(packet.packet_id, "pubrec_error")
            return
        session = self.session
        if session is not None and session.acknowledge(packet.packet_id, "pubrec"):
            self.send(mp.Pubrel(packet.packet_id))

    def _on_pubcomp(self, packet: mp.Pubcomp) -> None:
        self._acknowledged(packet.packet_id, "pubcomp")

    def _acknowledged(self, packet_id: int, stage: str) -> None:
        session = self.session
        if session is not None and session.acknowledge(packet_id, stage):
            if session.queue:
                self.send_deliveries(session.drain(self.engine.loop.time()))
            if self.retained:
                self.engine.pump_retained(self)

    def _on_pubrel(self, packet: mp.Pubrel) -> None:
        # MQTT 3.1.1 4.3.3: PUBCOMP also for an id no longer held (released before a reconnect),
        # or the client re-sends its PUBREL forever.
        if self.session is not None:
            self.session.release(packet.packet_id)
        self.send(mp.Pubcomp(packet.packet_id))

    def _on_subscribe(self, packet: mp.Subscribe) -> None:
        self.engine.subscribe(self, packet)

    def _on_unsubscribe(self, packet: mp.Unsubscribe) -> None:
        self.engine.unsubscribe(self, packet)

    def _on_pingreq(self, packet: mp.Pingreq) -> None:
        self.send(mp.Pingresp())

    def _on_disconnect(self, packet: mp.Disconnect) -> None:
        if self.protocol.protocol_level == 5:
            expiry = packet.properties.get("session_expiry_interval")
            if expiry is not None:
                if self.session is not None and self.session.expiry_interval == 0 and expiry:
                    self.violation(
                        reasons.PROTOCOL_ERROR, "set a session expiry at DISCONNECT after 0 [MQTT-3.14.2-2]"
                    )
                    return
                self.engine.set_session_expiry(self, float(expiry))
            if packet.reason_code == reasons.DISCONNECT_WITH_WILL_MESSAGE:
                self.close("disconnect_with_will")
                return
        self.will = None  # [MQTT-3.1.2-10] a clean DISCONNECT discards the will
        self.close("client_disconnect")

    def _on_unexpected(self, packet: mp.Packet) -> None:
        # The protocol already refuses what a client may never send; AUTH without an
        # authentication method at CONNECT (the only kind admitted) is a protocol error.
        self.violation(reasons.PROTOCOL_ERROR, f"sent an unexpected {type(packet).__name__}")


_HANDLERS: dict[type[Any], Any] = {
    mp.Connect: Channel._on_connect,
    mp.Publish: Channel._on_publish,
    mp.Puback: Channel._on_puback,
    mp.Pubrec: Channel._on_pubrec,
    mp.Pubrel: Channel._on_pubrel,
    mp.Pubcomp: Channel._on_pubcomp,
    mp.Subscribe: Channel._on_subscribe,
    mp.Unsubscribe: Channel._on_unsubscribe,
    mp.Pingreq: Channel._on_pingreq,
    mp.Disconnect: Channel._on_disconnect,
    mp.Connack: Channel._on_unexpected,
    mp.Suback: Channel._on_unexpected,
    mp.Unsuback: Channel._on_unexpected,
    mp.Pingresp: Channel._on_unexpected,
    mp.Auth: Channel._on_unexpected,
}

#: While a CONNECT is authenticated: everything waits.
_HOLDING: dict[type[Any], Any] = dict.fromkeys(_HANDLERS, Channel._hold_packet)

#: During MQTT 5 enhanced authentication: AUTH continues it, DISCONNECT ends it.
_AUTHENTICATING: dict[type[Any], Any] = {
    **dict.fromkeys(_HANDLERS, Channel._on_early_packet),
    mp.Auth: Channel._on_auth,
    mp.Disconnect: Channel._on_disconnect,
}
