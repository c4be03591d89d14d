"""WebSocket listeners (``ws``, ``wss``): MQTT over WebSocket on ``websocket.mqtt_path``.

Push-based like the TCP listeners: :class:`WebSocketProtocol` is a
:class:`~listeners.stream.ClientProtocol` with websockets' sans-I/O
:class:`~websockets.server.ServerProtocol` between the transport and the engine's sink, so no task
runs per connection (websockets' asyncio server runs one per connection).

The client's address is learned in two layers (ARCHITECTURE.md "Trust rules"):

1. ``proxy_protocol``: a PROXY header before the HTTP request, read as on TCP listeners (from
   ``data_received``; on ``wss`` from the socket, before the TLS handshake); it gives the
   socket-level peer.
2. ``websocket.proxy_address_header`` / ``proxy_port_header``: the upgrade request's headers,
   resolved by :mod:`listeners.forwarded` against ``trusted_proxies``; a malformed header from a
   trusted peer is answered 400 and never falls back to the proxy.

After the upgrade every binary frame's payload, continuation frames included, goes to the sink: MQTT
is a byte stream, so how the client fragments it does not matter. A text frame is a protocol error
[MQTT-6.0.0-1] (close 1003); a message larger than ``max_packet_size`` is refused by websockets
(close 1009) before it is buffered; pings are answered by the protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from listeners.acceptor import Acceptor, Opening, accept_tls, bind_socket, load_tls_context
from listeners.address import AddressSource, ClientAddress, normalize_ip
from listeners.connection import AddressCheck, ListenerStats, RefusalHook, RefusalLog, SinkFactory
from listeners.errors import ForwardedHeaderError
from listeners.forwarded import HeaderRules, resolve
from listeners.gate import peer_refusal
from listeners.options import UNLIMITED, Bind, ListenerOptions
from listeners.proxy_protocol import ProxyHeader
from listeners.stream import ClientProtocol, ListenerContext

logger = logging.getLogger(__name__)

#: [MQTT-6.0.0-3] clients offer "mqtt"; a client offering none (or another) gets HTTP 400.
SUBPROTOCOLS: Final = [Subprotocol("mqtt")]

#: Seconds from accept (on wss: from the end of the TLS handshake) to a completed HTTP upgrade: bounds
#: slow-loris handshakes, which hold a socket and a slot of max_connections.
OPEN_TIMEOUT: Final = 10.0

#: Default largest WebSocket message: the broker passes ``mqtt.max_packet_size`` (one MQTT packet per
#: message is what clients send), so the limit is the same on every transport.
DEFAULT_MAX_PACKET_SIZE: Final = 1024 * 1024


class _QuietLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets' protocol logs every opened and every rejected connection at INFO; behind a load
    balancer (health checks, scanners) that is routine, and our own refusals are logged by us with
    their reason. Its INFO lines become DEBUG; warnings and errors (its own bugs) stay."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


_protocol_logger = _QuietLogger(logging.getLogger(f"{__name__}.protocol"))

#: An HTTP answer refusing an upgrade: (status, body).
Refusal = tuple[http.HTTPStatus, str]

#: The listener's decision on an upgrade request: (address so far, request, socket peer) -> the
#: client to admit, or the refusal to answer.
Decide = Callable[[ClientAddress, Request, tuple[str, int]], "ClientAddress | Refusal"]


class WebSocketProtocol(ClientProtocol):
    """One connection of a ``ws``/``wss`` listener: PROXY header, HTTP upgrade, then WebSocket
    frames in and out; the engine's Link (each write is one binary frame)."""

    __slots__ = ("_address", "_decide", "_failed", "_max_size", "_open_timer", "_ws")

    def __init__(
        self,
        context: ListenerContext,
        decide: Decide,
        max_size: int,
        *,
        counted: bool = False,
        header: ProxyHeader | None = None,
    ) -> None:
        super().__init__(context, counted=counted, header=header)
        self._decide = decide
        self._max_size = max_size
        self._ws: ServerProtocol | None = None
        self._address: ClientAddress | None = None
        self._open_timer: asyncio.TimerHandle | None = None
        self._failed = False  # we closed with 1003: the frames after it are not the client's stream

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._transport.is_closing():
            self._open_timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self._open_timeout)

    def data_received(self, data: bytes) -> None:
        if self._ws is not None:
            self._receive(data)
        elif self._gate is not None:
            self._feed_gate(data)

    def eof_received(self) -> bool | None:
        ws = self._ws
        if ws is None:
            return super().eof_received()
        ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
        super().connection_lost(exc)

    # Link ----------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` as one binary frame; ignored once closing."""
        ws = self._ws
        if ws is not None and ws.state is OPEN and not self._transport.is_closing():
            ws.send_binary(data)
            self._flush()

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """Send the chunks as ONE binary frame; ignored once closing."""
        self.write(b"".join(chunks))

    def close(self) -> None:
        """Start the closing handshake (close frame 1000); the TCP connection closes when the
        client answers, or is dropped after CLOSE_TIMEOUT."""
        ws = self._ws
        if ws is None:
            super().close()
        elif ws.state is OPEN and not self._transport.is_closing():
            self._closing = True  # what the client sends from now on is not for the sink
            ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._flush()
            self._arm_close_timer()

    @property
    def is_closing(self) -> bool:
        """Whether the closing handshake started or the connection is gone."""
        ws = self._ws
        return self._closing or ws is None or ws.state is not OPEN or self._transport.is_closing()

    # Steps ---------------------------------------------------------------------------------------

    def _refusal_at_accept(self, current: int, peer_ip: str) -> tuple[str, str] | None:
        # max_connections is answered with HTTP 503 at the upgrade, so that a client learns why;
        # an untrusted peer is dropped before a byte is read, as on TCP listeners.
        settings = self._context.settings
        refusal = peer_refusal(settings.proxy_protocol, settings.trusted_proxies, peer_ip)
        return None if refusal is None else (refusal.reason, str(refusal))

    def _address_known(self, address: ClientAddress, rest: bytes) -> None:
        # The PROXY stage is over: from here on the bytes are HTTP, then WebSocket frames.
        self._address = address
        self._ws = ServerProtocol(subprotocols=SUBPROTOCOLS, max_size=self._max_size, logger=_protocol_logger)
        if rest:
            self._receive(rest)

    def _receive(self, data: bytes) -> None:
        ws = self._ws
        assert ws is not None
        self._quiet = False
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._on_request(ws, event)
            elif isinstance(event, Frame) and not self._on_frame(ws, event):
                break
        self._flush()

    def _on_request(self, ws: ServerProtocol, request: Request) -> None:
        assert self._address is not None
        decision = self._decide(self._address, request, self._peer)
        if not isinstance(decision, ClientAddress):
            ws.send_response(ws.reject(*decision))
            return  # the protocol sends EOF after the answer (see _flush)
        # websockets' own checks come after ours: an invalid upgrade, or one without the "mqtt"
        # subprotocol [MQTT-6.0.0-3], is answered 400 (426 for a bad Upgrade header).
        ws.send_response(ws.accept(request))
        if ws.state is not OPEN:
            return
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        context = self._context
        logger.debug("%s: %s upgraded; %d live", context.id, decision.describe(), context.stats.current)
        self._hand_over(decision)

    def _on_frame(self, ws: ServerProtocol, frame: Frame) -> bool:
        """Pass a data frame's payload to the sink; False once the rest must be ignored."""
        sink = self._sink
        if sink is None or self._failed or self._closing:
            return False
        opcode = frame.opcode
        if opcode is Opcode.BINARY or opcode is Opcode.CONT:
            if frame.data:
                sink.data_received(bytes(frame.data))
        elif opcode is Opcode.TEXT:
            # [MQTT-6.0.0-1] MQTT travels in binary frames; a text frame is a protocol error.
            logger.debug("%s: %s sent a text frame; closing (1003)", self._context.id, self.peer)
            self._failed = True
            ws.fail(CloseCode.UNSUPPORTED_DATA, "MQTT needs binary frames")
            return False
        # Ping (answered by the protocol), pong and close (answered, then EOF): nothing for the sink.
        return True

    def _flush(self) -> None:
        """Write what the protocol has to send; its empty chunk means: done, close our side."""
        ws = self._ws
        assert ws is not None
        transport = self._transport
        if transport.is_closing():  # aborted (refused, timed out): nothing more goes out
            ws.data_to_send()
            return
        for data in ws.data_to_send():
            if data:
                transport.write(data)
                continue
            if self._sink is None and ws.handshake_exc is not None and not self._quiet:
                # No request, a malformed one, or one websockets refused (no "mqtt" subprotocol,
                # not an upgrade): routine for health checks and scanners, hence DEBUG.
                logger.debug(
                    "%s: %s: opening handshake failed: %s", self._context.id, self.peer, ws.handshake_exc
                )
            # Half-close and let the client close (its FIN ends the connection), as websockets'
            # servers do; TLS cannot half-close, so close it (flushing first).
            if transport.can_write_eof():
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):
                    transport.close()
            else:
                transport.close()
        if ws.close_expected():
            self._arm_close_timer()

    def _open_timeout(self) -> None:
        self._open_timer = None
        ws = self._ws
        if ws is None or ws.state is CONNECTING:
            logger.debug("%s: %s: no WebSocket upgrade within %gs", self._context.id, self.peer, OPEN_TIMEOUT)
            self._closing = True  # ours: not a health check
            self._transport.abort()


class WebSocketListener:
    """One ``listeners.ws.<name>`` or ``listeners.wss.<name>``.

    Its settings, path, header rules, largest message and certificates are read per connection (a
    reload swaps them with :meth:`prepare` / :meth:`commit`, as on TCP listeners).
    """

    def __init__(
        self,
        settings: ListenerOptions,
        factory: SinkFactory,
        *,
        on_refused: RefusalHook | None = None,
        admit: AddressCheck | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        log_refusal: RefusalLog | None = None,
    ) -> None:
        self._context = ListenerContext(settings, factory, on_refused, log_refusal)
        self._admit = admit
        self._max_size = max_packet_size
        self._take(settings)
        self._server: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None
        self._tls: ssl.SSLContext | None = None
        #: The address the listening sockets are bound to (None before start).
        self._bound: Bind | None = None

    def _take(self, settings: ListenerOptions) -> None:
        assert settings.websocket is not None, "ws listeners always have websocket options"
        self.settings = self._context.settings = settings
        self._path = settings.websocket.mqtt_path
        self._rules = HeaderRules(
            address_header=settings.websocket.proxy_address_header,
            port_header=settings.websocket.proxy_port_header,
            trusted_proxies=settings.trusted_proxies,
        )

    @property
    def id(self) -> str:
        """``ws:<name>`` or ``wss:<name>``."""
        return self.settings.id

    @property
    def stats(self) -> ListenerStats:
        """Live connections, accepted and refused ones by reason."""
        return self._context.stats

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound; or (wss), with errno 0 and the problem as its
                message, a certificate or key cannot be used.
        """
        await self.commit(await self.prepare(self.settings))

    async def prepare(self, settings: ListenerOptions, *, max_packet_size: int | None = None) -> Opening:
        """Make ready to take ``settings`` and ``max_packet_size`` (``mqtt.max_packet_size``: the
        largest message of the connections to come): load the certificates (wss; read again at
        every reload), bind the address if it changed, without accepting yet. Nothing changes
        until :meth:`commit`.

        Raises:
            OSError: the address cannot be bound; or (wss), with errno 0 and the problem as its
                message, a certificate or key cannot be used.
        """
        opening = Opening(settings, max_packet_size=max_packet_size)
        if settings.ssl_options is not None:
            opening.tls = load_tls_context(settings)
        if settings.bind != self._bound:
            bind = settings.bind
            if settings.ssl_options is not None:
                opening.sockets = [bind_socket(bind)]
            else:
                opening.server = await asyncio.get_running_loop().create_server(
                    self._protocol, bind.host or None, bind.port, reuse_address=True, start_serving=False
                )
        return opening

    async def commit(self, opening: Opening) -> None:
        """Take what :meth:`prepare` made ready: the next connection follows the new settings (its
        path, header rules, certificates); a new address accepts from now on and the old one is
        closed (its connections go on)."""
        settings = opening.settings
        self._take(settings)
        if opening.max_packet_size is not None:
            self._max_size = opening.max_packet_size
        self._tls = opening.tls
        sockets, opening.sockets = opening.sockets, []
        server, opening.server = opening.server, None
        if sockets:
            if self._acceptor is None:
                self._acceptor = Acceptor(settings.bind, self._on_tls_socket)
            self._acceptor.serve(settings.bind, sockets)
            self._bound = settings.bind
        elif server is not None:
            old, self._server = self._server, server
            self._bound = settings.bind
            await server.start_serving()
            if old is not None:
                old.close()

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound."""
        if self._acceptor is not None:
            return self._acceptor.addresses()
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def stop_accepting(self) -> None:
        """Close the listening sockets; live connections go on."""
        if self._acceptor is not None:
            self._acceptor.stop()
        elif self._server is not None:
            self._server.close()

    def abort_connections(self) -> None:
        """Drop every live connection at once (last step of shutdown)."""
        self.cancel_pending()
        self._context.abort_all()

    def connections(self) -> list[ClientProtocol]:
        """The live connections (accepted, not yet gone)."""
        return list(self._context.connections)

    def cancel_pending(self) -> None:
        """Drop the connections still in their PROXY header or TLS handshake (wss)."""
        if self._acceptor is not None:
            self._acceptor.cancel_pending()

    def _protocol(self, header: ProxyHeader | None = None, *, counted: bool = False) -> WebSocketProtocol:
        return WebSocketProtocol(self._context, self._decide, self._max_size, counted=counted, header=header)

    def _tls_protocol(self, header: ProxyHeader | None) -> WebSocketProtocol:
        return self._protocol(header, counted=True)

    async def _on_tls_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        assert self._tls is not None
        await accept_tls(self._context, self._tls, sock, peer, self._tls_protocol)

    def _decide(
        self, base: ClientAddress, request: Request, socket_peer: tuple[str, int]
    ) -> ClientAddress | Refusal:
        """Decide on an upgrade request before websockets checks it: 404 other paths, 503 when
        full, 400 malformed address headers, 403 addresses refused by access rules or bans; else
        the client to admit. Never raises for the client's doing."""
        context = self._context
        if urlsplit(request.path).path != self._path:
            # Not counted as a refusal for the audit log: a browser or scanner asking for a page.
            context.stats.refused["not_found"] += 1
            logger.info(
                "%s: %s asked for %r, not %r [not_found]", self.id, base.describe(), request.path, self._path
            )
            return http.HTTPStatus.NOT_FOUND, f"Not Found: MQTT is served on {self._path}\n"
        limit = self.settings.max_connections
        if limit != UNLIMITED and context.stats.current > limit:  # this connection counts itself
            context.refuse(base, "max_connections", f"max_connections ({limit}) reached")
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n"
        try:
            client = self._resolve(base, request, socket_peer)
        except ForwardedHeaderError as exc:
            context.refuse(base, exc.reason, str(exc))
            return http.HTTPStatus.BAD_REQUEST, f"Bad Request: invalid {self._rules.address_header} header\n"
        verdict = None if self._admit is None else self._admit(self.id, client.ip)
        if verdict is not None:
            context.refuse(client, verdict.reason, verdict.message)
            return http.HTTPStatus.FORBIDDEN, "Forbidden\n"
        return client

    def _resolve(self, base: ClientAddress, request: Request, socket_peer: tuple[str, int]) -> ClientAddress:
        """Refine ``base`` (socket or PROXY address) with the request's address headers.

        Raises:
            ForwardedHeaderError: a header to be used is malformed.
        """
        if not self._rules.enabled:
            return base
        resolution = resolve(base.ip, base.port, request.headers.raw_items(), self._rules)
        if resolution.source is AddressSource.SOCKET:
            return base
        details = dict(base.details)
        details["forwarded"] = {
            "header": self._rules.address_header,
            "chain": list(resolution.chain),
            "hop": resolution.hop,
        }
        return dataclasses.replace(
            base,
            ip=resolution.ip,
            port=resolution.port,
            source=resolution.source,
            proxy_ip=normalize_ip(socket_peer[0]),
            proxy_port=socket_peer[1],
            details=details,
        )
