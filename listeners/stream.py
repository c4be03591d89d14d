"""One client connection as an :class:`asyncio.Protocol`: accept-time checks, the PROXY header, then
the engine's :class:`~listeners.connection.Sink`.

:class:`ClientProtocol` is the :class:`~listeners.connection.Link` the engine gets: no task and no
stream object per connection, the transport calls us and we call the sink. The PROXY header is fed
to a :class:`~listeners.gate.ProxyGate` from ``data_received`` under a ``call_later`` timer; bytes
after it in the same read go to the sink as soon as it exists. TLS listeners read the header from the
socket before the handshake (:mod:`listeners.acceptor`) and say so (``counted=True, header=...``).

:mod:`listeners.websocket` subclasses it: same accept, PROXY and flow-control handling, with
WebSocket framing between the transport and the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import cast

from listeners.address import ClientAddress, format_hostport
from listeners.connection import (
    CLOSE_TIMEOUT,
    ListenerStats,
    RefusalHook,
    RefusalLog,
    Sink,
    SinkFactory,
    refuse,
)
from listeners.errors import ProxyProtocolError
from listeners.gate import ProxyGate, client_address, refusal_at_accept
from listeners.options import ListenerOptions, ProxyProtocolMode
from listeners.proxy_protocol import NEED_DATA, ProxyHeader
from listeners.tls import local_tls_info

logger = logging.getLogger(__name__)

#: Bytes a connection's transport may buffer before the engine is told to stop writing to it
#: (``pause_writing``), and the level it must drain to before writing resumes (asyncio's defaults).
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class ListenerContext:
    """What the connections of one listener share: its settings, counters, sink factory, and the
    live connections (for :meth:`abort_all` at shutdown).

    ``settings`` is read by each connection when it needs a setting (at accept, for its PROXY
    header, its upgrade): a reload replaces the object, and what comes next follows the new one.
    """

    def __init__(
        self,
        settings: ListenerOptions,
        factory: SinkFactory,
        on_refused: RefusalHook | None,
        log_refusal: RefusalLog | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.on_refused = on_refused
        self.log_refusal = log_refusal
        self.stats = ListenerStats()
        self.connections: set[ClientProtocol] = set()

    @property
    def id(self) -> str:
        """``type:name`` of the listener."""
        return self.settings.id

    def refuse(self, address: ClientAddress, reason: str, message: str) -> None:
        """Count, log and report one refused connection; the caller closes or answers it.

        Raises what the ``on_refused`` hook raises.
        """
        log = self.log_refusal
        refuse(self.id, self.stats, self.on_refused, address, reason=reason, message=message, log=log)

    def health_check(self, peer: str) -> None:
        """Count a connection closed by its peer before it sent a byte of its own stream (nothing,
        or only a PROXY header): a load balancer's health check, routine, so DEBUG only."""
        self.stats.health_checks += 1
        logger.debug("%s: %s health check (closed without sending MQTT)", self.id, peer)

    def abort_all(self) -> None:
        """Drop every live connection at once (the last step of shutdown)."""
        for connection in list(self.connections):
            connection.abort()


class ClientProtocol(asyncio.Protocol):
    """One connection of a ``tcp`` or ``ssl`` listener, from accept to its end; the engine's Link.

    ``counted``: the listener already applied the accept-time checks and counted the connection in
    ``stats.current``/``accepted`` (TLS listeners do, before the handshake); ``header`` is then the
    PROXY header it read, if any.
    """

    # Slotted: one per connection, idle ones included.
    __slots__ = (
        "_close_timer",
        "_closing",
        "_context",
        "_counted",
        "_gate",
        "_header",
        "_header_read",
        "_header_timer",
        "_made",
        "_peer",
        "_quiet",
        "_receiver",
        "_sink",
        "_transport",
        "_write_paused",
    )

    _transport: asyncio.Transport

    def __init__(
        self, context: ListenerContext, *, counted: bool = False, header: ProxyHeader | None = None
    ) -> None:
        self._context = context
        self._counted = counted
        self._header_read = counted
        self._header = header
        self._peer: tuple[str, int] = ("", 0)
        self._made = False
        self._sink: Sink | None = None
        #: Where the bytes go: the sink's data_received while the connection is open, None before
        #: (PROXY stage) and once closing (what a client sends after our close is dropped).
        self._receiver: Callable[[bytes], None] | None = None
        self._closing = False
        self._gate: ProxyGate | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        #: Nothing of the client's own stream received yet (a complete PROXY header does not count):
        #: if the peer closes now, it was a health check.
        self._quiet = True

    # ---------------------------------------------------------------------------------------------
    # asyncio.Protocol: called by the transport
    # ---------------------------------------------------------------------------------------------

    @property
    def made(self) -> bool:
        """Whether the transport called :meth:`connection_made` (it then calls
        :meth:`connection_lost` too, which uncounts the connection)."""
        return self._made

    @property
    def peer(self) -> str:
        """``ip:port`` of the socket peer (the load balancer, if any)."""
        return format_hostport(*self._peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self._made = True
        transport = self._transport = cast("asyncio.Transport", transport)
        context = self._context
        peername = transport.get_extra_info("peername")
        if peername is None:  # reset between accept and now: getpeername() failed
            transport.abort()
            return
        self._peer = (str(peername[0]), int(peername[1]))
        stats = context.stats
        if not self._counted:
            refusal = self._refusal_at_accept(stats.current, self._peer[0])
            if refusal is not None:
                context.refuse(ClientAddress.direct(*self._peer), *refusal)
                transport.abort()
                return
            stats.current += 1
            stats.accepted += 1
            self._counted = True
        context.connections.add(self)
        logger.debug("%s: %s connected; %d live", context.id, self.peer, stats.current)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # MQTT packets are small and latency matters more than coalescing. (asyncio sets it on
            # its own TCP transports too; not every event loop does.)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Explicit (asyncio's defaults), not left to each event loop's own: when the engine is told
        # to stop writing, and when to resume, is part of how a slow subscriber is bounded.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        settings = context.settings
        if self._header_read or settings.proxy_protocol is ProxyProtocolMode.OFF:
            self._address_known(self._client(self._header), b"")
            return
        self._gate = ProxyGate(settings.proxy_protocol, settings.trusted_proxies, self._peer[0])
        self._header_timer = asyncio.get_running_loop().call_later(
            settings.proxy_protocol_timeout, self._header_timeout
        )

    def data_received(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is not None:
            receiver(data)
        elif self._gate is not None:
            self._feed_gate(data)

    def eof_received(self) -> bool | None:
        if self._gate is not None:
            self._gate = None
            if not self._quiet:  # a part of a header (nothing at all is a health check)
                logger.debug("%s: %s closed before sending a PROXY header", self._context.id, self.peer)
        # MQTT has no half-closed state, and after our close() this is the client's answer: let
        # the transport close (it flushes what is queued first).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._gate = None
        self._receiver = None
        by_peer = not self._closing  # FIN or RST, not our close, abort or refusal
        self._closing = True
        context = self._context
        context.connections.discard(self)
        if self._counted:
            if self._quiet and by_peer:
                context.health_check(self.peer)
            self._counted = False
            context.stats.current -= 1
            logger.debug("%s: %s closed; %d live", context.id, self.peer, context.stats.current)
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._sink is not None:
            self._sink.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._sink is not None:
            self._sink.resume_writing()

    # ---------------------------------------------------------------------------------------------
    # Link: called by the engine
    # ---------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; ignored once closing."""
        # The transport's own flag too: it may be closing on an error before connection_lost.
        if not self._closing and not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """Queue several chunks; ignored once closing."""
        if not self._closing and not self._transport.is_closing():
            self._transport.writelines(chunks)

    def pause_reading(self) -> None:
        """Stop reading from the socket until :meth:`resume_reading`."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        self._transport.resume_reading()

    def close(self) -> None:
        """Flush what is queued, then close; drop the connection if that takes CLOSE_TIMEOUT.

        TCP half-closes (FIN after the queued bytes) and reads, dropping what comes, until the
        client's FIN: closing a socket with unread input makes the kernel send RST, and an RST can
        destroy our last bytes (a refusing CONNACK) in the client's buffer before it reads them.
        """
        transport = self._transport
        if self._closing or transport.is_closing():
            return
        self._closing = True
        self._receiver = None
        if transport.can_write_eof():
            transport.resume_reading()  # the client's FIN must be seen, even if reading was paused
            transport.write_eof()
        else:  # TLS: close_notify after the queued bytes
            transport.close()
        self._arm_close_timer()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._closing = True
        self._receiver = None
        self._transport.abort()

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, when this listener terminated TLS."""
        obj = self._transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    @property
    def is_closing(self) -> bool:
        """Whether the connection is closing or gone."""
        return self._closing or self._transport.is_closing()

    @property
    def sink(self) -> Sink | None:
        """The engine's side of this connection, once the address is known."""
        return self._sink

    # ---------------------------------------------------------------------------------------------
    # Steps, some of them overridden by the WebSocket protocol
    # ---------------------------------------------------------------------------------------------

    def _refusal_at_accept(self, current: int, peer_ip: str) -> tuple[str, str] | None:
        """``(reason, message)`` if the connection must be dropped before a byte is read."""
        return refusal_at_accept(self._context.settings, current, peer_ip)

    def _address_known(self, address: ClientAddress, rest: bytes) -> None:
        """The PROXY stage is over: hand the connection, and ``rest`` (the first bytes of the MQTT
        stream), to the engine."""
        sink = self._hand_over(address)
        if sink is not None and not self.is_closing:  # the factory may have closed the link already
            if rest:
                self._quiet = False
                self._receiver = sink.data_received
                sink.data_received(rest)
            else:  # the first read flips _quiet; the ones after it go straight to the sink
                self._receiver = self._first_data

    def _first_data(self, data: bytes) -> None:
        self._quiet = False
        sink = self._sink
        if sink is not None:
            self._receiver = sink.data_received
            sink.data_received(data)

    def _hand_over(self, address: ClientAddress) -> Sink | None:
        """Ask the engine for this connection's sink; ``None`` when it failed (logged, aborted)."""
        context = self._context
        try:
            sink = context.factory(self, address, context.settings)
        except Exception:
            # An engine bug must cost this connection only, never the listener.
            logger.exception("%s: connection from %s failed", context.id, address.describe())
            self.abort()
            return None
        self._sink = sink
        if self._write_paused:  # paused while the handshake's bytes were flushing
            sink.pause_writing()
        return sink

    def _client(self, header: ProxyHeader | None) -> ClientAddress:
        """The client this connection stands for, with our own TLS session if we terminated TLS."""
        address = client_address(header, *self._peer)
        local = local_tls_info(self.ssl_object())
        return address if local is None else dataclasses.replace(address, tls=local)

    def _feed_gate(self, data: bytes) -> None:
        assert self._gate is not None
        self._quiet = False  # until the header is complete
        try:
            result = self._gate.feed(data)
        except ProxyProtocolError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if result is NEED_DATA:
            return
        header, rest = result
        self._quiet = not rest
        self._gate = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._address_known(self._client(header), rest)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._gate is not None:
            timeout = self._context.settings.proxy_protocol_timeout
            self._refuse("proxy_timeout", f"no complete PROXY header within {timeout:g}s")

    def _refuse(self, reason: str, message: str) -> None:
        """Count, log and report a refusal of the socket peer, and drop the connection."""
        self._gate = None
        self._closing = True
        self._context.refuse(ClientAddress.direct(*self._peer), reason, message)
        self._transport.abort()

    def _arm_close_timer(self) -> None:
        """Bound the time a closing connection may take: a peer that does not read (or does not
        answer the closing handshake) would otherwise keep it forever."""
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._transport.abort)
