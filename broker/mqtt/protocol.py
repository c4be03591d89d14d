"""The server side of one MQTT connection, sans I/O: bytes in, packets out; packets in, bytes out.

:class:`MqttServerProtocol` enforces the connection-level rules that need no session state, and
nothing else (sessions, QoS flows, keep-alive, authorization are the engine's):

* the first packet must be a CONNECT [MQTT-3.1.0-1], otherwise the connection is closed without
  an answer;
* a CONNECT whose level this listener does not accept (``accept_levels``), or of an unknown level,
  is answered with the 3.1.1 CONNACK return code 1, ``20 02 00 01`` [MQTT-3.1.2-2], then closed.
  That answer is sent whatever level the client spoke: it is the one every client version
  understands as "unacceptable protocol version";
* a malformed CONNECT is closed without an answer at 3.1.1 [MQTT-3.1.4-1], except that a rejected
  client identifier is answered with return code 2 [MQTT-3.1.3-8]; at MQTT 5 it is answered with a
  CONNACK carrying the reason code (MQTT 5 4.13.1);
* a second CONNECT [MQTT-3.1.0-2], or a packet only a server sends (CONNACK, SUBACK, UNSUBACK,
  PINGRESP), is a protocol violation;
* after the CONNECT, a malformed packet or a violation closes the connection: silently at 3.1.1
  [MQTT-4.8.0-1], after a DISCONNECT with the reason code at MQTT 5 (MQTT 5 4.13.1).

Whenever the connection must end, :attr:`MqttServerProtocol.close_requested` becomes True: the
caller then writes :meth:`~MqttServerProtocol.data_to_send` and closes the transport. What went
wrong is in :attr:`~MqttServerProtocol.error`, for the log. Nothing here raises on bad input.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Final

from broker.mqtt.codec import Decoder, MalformedPacket, encode
from broker.mqtt.packets import Connack, Connect, Disconnect, Packet, PacketType
from broker.mqtt.reasons import (
    CLIENT_IDENTIFIER_NOT_VALID,
    CONNACK_REASONS,
    DISCONNECT_REASONS,
    PROTOCOL_ERROR,
    UNSUPPORTED_PROTOCOL_VERSION,
    V3_IDENTIFIER_REJECTED,
    v3_connack_code,
)

#: CONNACK return code 1 at 3.1.1 [MQTT-3.1.2-2]: the answer to a level we do not accept.
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION: Final = b"\x20\x02\x00\x01"
#: CONNACK return code 2 at 3.1.1 [MQTT-3.1.3-8].
CONNACK_IDENTIFIER_REJECTED: Final = bytes((0x20, 0x02, 0x00, V3_IDENTIFIER_REJECTED))

#: Packets only a server sends; a client sending one commits a protocol violation (3.1.1 4.8).
SERVER_ONLY: Final = frozenset(
    {PacketType.CONNACK, PacketType.SUBACK, PacketType.UNSUBACK, PacketType.PINGRESP}
)


class State(Enum):
    """Where the connection is."""

    #: Nothing decoded yet: the first packet must be a CONNECT.
    AWAITING_CONNECT = "awaiting_connect"
    #: A CONNECT was received and handed over; the engine answers it.
    CONNECTED = "connected"
    #: The connection must end: incoming data is ignored, the outbox is the last thing sent.
    CLOSING = "closing"
    #: The peer closed its side (:meth:`MqttServerProtocol.receive_eof`).
    CLOSED = "closed"


class MqttServerProtocol:
    """Server side of one MQTT connection: decodes, enforces the rules above, queues answers.

    ``max_packet_size`` caps an incoming packet (fixed header included); ``accept_levels`` are the
    CONNECT protocol levels served (4: MQTT 3.1.1, 5: MQTT 5.0, 3: MQTT 3.1).
    """

    __slots__ = ("_decoder", "_outbox", "accept_levels", "close_requested", "error", "state")

    def __init__(self, max_packet_size: int, accept_levels: frozenset[int] = frozenset({4})) -> None:
        """Raises ValueError for a ``max_packet_size`` the decoder refuses."""
        self._decoder = Decoder(max_packet_size)
        self.accept_levels = accept_levels
        self.state = State.AWAITING_CONNECT
        #: What ended the connection (a decode error or a violation), for the log; None otherwise.
        self.error: MalformedPacket | None = None
        #: True once the connection must end: flush :meth:`data_to_send`, then close.
        self.close_requested = False
        self._outbox: list[bytes] = []

    @property
    def protocol_level(self) -> int:
        """The level of the CONNECT received (4 until then): the level packets are encoded at."""
        return self._decoder.protocol_level

    # ----------------------------------------------------------------------------------------------
    # Receiving
    # ----------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Feed bytes read from the peer; return the packets the engine must act on, in order.

        Never raises on bad input: a malformed packet or a violation sets :attr:`error` and
        :attr:`close_requested`, queues the answer the spec asks for, and the packets before it are
        still returned. After that, or after :meth:`refuse` or :meth:`disconnect`, data is ignored.
        The engine should stop acting on the returned packets once it has called :meth:`refuse`.
        """
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return []
        try:
            packets = self._decoder.feed(data)
            error = None
        except MalformedPacket as exc:
            packets = exc.packets
            exc.packets = []
            error = exc
        if self.state is State.CONNECTED:
            for index, packet in enumerate(packets):
                if type(packet) is Connect or packet.packet_type in SERVER_ONLY:
                    return self._violation(packets[:index], packet)
        else:
            packets = self._first_packets(packets)
        if error is not None and not self.close_requested:
            self._fail(error)
        return packets

    def _first_packets(self, packets: list[Packet]) -> list[Packet]:
        """Handle the packets that arrive before and with the CONNECT."""
        if not packets:
            return packets
        first = packets[0]
        if type(first) is not Connect:
            self._close(
                MalformedPacket(
                    PROTOCOL_ERROR,
                    f"first packet is {first.packet_type.name}, not CONNECT [MQTT-3.1.0-1]",
                    packet_type=first.packet_type,
                ),
            )
            return []
        if first.proto_level not in self.accept_levels:
            self._close(
                MalformedPacket(
                    UNSUPPORTED_PROTOCOL_VERSION,
                    f"CONNECT from client id {first.client_id!r} at protocol level {first.proto_level} "
                    f"({first.proto_name!r}), which this listener does not accept [MQTT-3.1.2-2]",
                    packet_type=PacketType.CONNECT,
                ),
                CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            )
            return []
        self.state = State.CONNECTED
        for index, packet in enumerate(packets[1:], 1):
            if type(packet) is Connect or packet.packet_type in SERVER_ONLY:
                return self._violation(packets[:index], packet)
        return packets

    def _violation(self, before: list[Packet], packet: Packet) -> list[Packet]:
        if type(packet) is Connect:
            message = "second CONNECT on the connection [MQTT-3.1.0-2]"
        else:
            message = f"client sent {packet.packet_type.name}, which only a server sends (3.1.1 4.8)"
        self._fail(MalformedPacket(PROTOCOL_ERROR, message, packet_type=packet.packet_type))
        return before

    def _fail(self, error: MalformedPacket) -> None:
        """End the connection for ``error``, with the answer the spec asks for at this point."""
        level = self._decoder.protocol_level
        if self.state is State.AWAITING_CONNECT:
            # The CONNECT's level is known once its level byte was read (connect_level is set); a
            # CONNECT that fails before that (too large, bad name) gets no answer.
            known = self._decoder.connect_level
            if error.packet_type != PacketType.CONNECT:
                self._close(error)
            elif error.reason_code == UNSUPPORTED_PROTOCOL_VERSION or (
                known is not None and known not in self.accept_levels
            ):
                # The level is unknown, or known but not served: answer in the one format any
                # client reads, whatever the rest of the CONNECT held.
                self._close(error, CONNACK_UNACCEPTABLE_PROTOCOL_VERSION)
            elif level == 5:
                code = error.reason_code if error.reason_code in CONNACK_REASONS else PROTOCOL_ERROR
                self._close(error, encode(Connack(False, code, {}), 5))
            elif error.reason_code == CLIENT_IDENTIFIER_NOT_VALID:
                self._close(error, CONNACK_IDENTIFIER_REJECTED)
            else:
                self._close(error)
        elif level == 5:
            code = error.reason_code if error.reason_code in DISCONNECT_REASONS else PROTOCOL_ERROR
            self._close(error, encode(Disconnect(code, {}), 5))
        else:
            self._close(error)

    def _close(self, error: MalformedPacket | None, answer: bytes = b"") -> None:
        if error is not None:
            self.error = error
        if answer:
            self._outbox.append(answer)
        self.state = State.CLOSING
        self.close_requested = True

    def receive_eof(self) -> None:
        """The peer closed its side: the connection is over (state CLOSED)."""
        self.state = State.CLOSED

    # ----------------------------------------------------------------------------------------------
    # Sending
    # ----------------------------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        """Queue ``packet``, encoded at the connection's level.

        Does nothing once close is requested or the connection is closed: what was queued last (a
        refusal, a DISCONNECT) must stay the last packet on the wire. Raises ValueError for a
        packet that cannot be encoded.
        """
        if not self.close_requested and self.state is not State.CLOSED:
            self._outbox.append(encode(packet, self._decoder.protocol_level))

    def send_raw(self, *chunks: bytes) -> None:
        """Queue pre-encoded bytes (a fan-out PUBLISH in parts). Dropped like :meth:`send`."""
        if not self.close_requested and self.state is not State.CLOSED:
            self._outbox.extend(chunks)

    def data_to_send(self) -> list[bytes]:
        """Return the queued bytes, in order, and clear the queue (``[]`` when nothing is queued)."""
        out = self._outbox
        self._outbox = []
        return out

    def accept_connect(
        self, session_present: bool = False, properties: Mapping[str, Any] | None = None
    ) -> None:
        """Queue the CONNACK that accepts the CONNECT (MQTT 5 properties are ignored at 3.1.1)."""
        self.send(Connack(session_present, 0, dict(properties or {})))

    def refuse(self, reason_code: int, properties: Mapping[str, Any] | None = None) -> None:
        """Queue the CONNACK refusing the CONNECT for the MQTT 5 ``reason_code`` (with
        ``properties``, e.g. a reason string, at MQTT 5), then close.

        At 3.1.1 the code is mapped to the nearest return code (:func:`v3_connack_code`). Raises
        ValueError for a code that is not a refusal (below 0x80).
        """
        if self._decoder.protocol_level == 5:
            if reason_code < 0x80:
                raise ValueError(f"0x{reason_code:02X} is not a CONNACK refusal")
            packet = Connack(False, reason_code, dict(properties or {}))
        else:
            packet = Connack(False, v3_connack_code(reason_code), {})
        self.send(packet)
        self._close(None)

    def disconnect(self, reason_code: int = 0, properties: Mapping[str, Any] | None = None) -> None:
        """End the connection from the server side: at MQTT 5 queue a DISCONNECT, then close.

        3.1.1 has no server DISCONNECT: the connection is just closed.
        """
        if self._decoder.protocol_level == 5:
            self.send(Disconnect(reason_code, dict(properties or {})))
        self._close(None)
