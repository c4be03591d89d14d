"""WebSocket listeners (``ws``, ``wss``): MQTT over WebSocket on ``websocket.mqtt_path``.

The client's address is learned in two layers (DESIGN.md "Trust rules"):

1. ``proxy_protocol``: a PROXY header before the HTTP request, consumed in ``data_received`` before
   websockets' HTTP parser sees a byte (:class:`_AddressingConnection`); it gives the socket-level
   peer, as on TCP listeners.
   On ``wss`` listeners the header comes before the TLS handshake, so an
   :class:`~listeners.acceptor.Acceptor` takes it from the socket first, and websockets' own
   connection objects are then made here (``_make_connection``, after websockets' ``serve``).
2. ``websocket.proxy_address_header`` / ``proxy_port_header``: the upgrade request's headers,
   resolved by :mod:`listeners.forwarded` against ``trusted_proxies`` in ``process_request``; a
   malformed header from a trusted peer is answered 400 and never falls back to the proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import socket
import ssl
from typing import Any, ClassVar
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from broker.errors import ForwardedHeaderError, ProxyProtocolError
from broker.settings import UNLIMITED, ListenerSettings, ProxyProtocolMode
from listeners.acceptor import Acceptor, admit_before_tls
from listeners.address import AddressSource, ClientAddress, format_hostport, normalize_ip
from listeners.connection import (
    AddressCheck,
    ConnectionHandler,
    ListenerStats,
    RefusalHook,
    WebSocketConnection,
    refuse,
)
from listeners.forwarded import HeaderRules, resolve
from listeners.gate import ProxyGate, client_address, peer_refusal
from listeners.proxy_protocol import NEED_DATA, ProxyHeader
from listeners.tls import context_from, handshake_failure, local_tls_info

logger = logging.getLogger(__name__)

#: [MQTT-6.0.0-3] clients offer "mqtt"; a client offering none (or another) gets HTTP 400.
SUBPROTOCOLS = [Subprotocol("mqtt")]

#: Largest WebSocket message accepted. One MQTT packet per message is usual; 16 MiB bounds the
#: memory one client can make us buffer (websockets' default of 1 MiB is too small for MQTT).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

#: Seconds for the HTTP upgrade to complete (bounds slow-loris handshakes).
OPEN_TIMEOUT = 10.0


class _HandshakeLogFilter(logging.Filter):
    """websockets logs every failed opening handshake (a TCP health check, a port scan, a refused
    PROXY header) at ERROR with a traceback; that is routine for a listener behind a load balancer.
    Such records become one DEBUG line; our own refusals are logged by us, with their reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "opening handshake failed" and record.exc_info:
            exc = record.exc_info[1]
            record.msg = "opening handshake failed: %s"
            record.args = (f"{type(exc).__name__}: {exc}",)
            record.exc_info = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_protocol_logger = logging.getLogger(f"{__name__}.protocol")
_protocol_logger.addFilter(_HandshakeLogFilter())


class _AddressingConnection(ServerConnection):
    """A websockets connection that counts itself and reads a PROXY header before the HTTP request.

    A subclass per listener sets :attr:`listener` (websockets takes a connection *class*).
    """

    listener: ClassVar[WebSocketListener]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_peer: tuple[str, int] = ("", 0)
        self.proxy_header: ProxyHeader | None = None
        self.client: ClientAddress | None = None
        self._gate: ProxyGate | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        #: Set when the listener's acceptor already read the PROXY header (TLS listeners).
        self.header_read = False

    @property
    def peer(self) -> str:
        """``ip:port`` of the socket peer."""
        return format_hostport(*self.socket_peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        listener = self.listener
        peername = transport.get_extra_info("peername")
        self.socket_peer = (str(peername[0]), int(peername[1]))
        listener.stats.current += 1
        listener.stats.accepted += 1
        self._counted = True
        settings = listener.settings
        if settings.proxy_protocol is ProxyProtocolMode.OFF or self.header_read:
            return
        refusal = peer_refusal(settings.proxy_protocol, settings.trusted_proxies, self.socket_peer[0])
        if refusal is not None:
            self._refuse(refusal.reason, str(refusal))
            return
        self._gate = ProxyGate(settings.proxy_protocol, settings.trusted_proxies, self.socket_peer[0])
        self._timer = self.loop.call_later(settings.proxy_protocol_timeout, self._header_timeout)

    def _refuse(self, reason: str, message: str) -> None:
        self.listener.refuse(ClientAddress.direct(*self.socket_peer), reason, message)
        self._gate = None
        self.transport.abort()

    def _header_timeout(self) -> None:
        if self._gate is not None:
            timeout = self.listener.settings.proxy_protocol_timeout
            self._refuse("proxy_timeout", f"no complete PROXY header within {timeout:g}s")

    def data_received(self, data: bytes) -> None:
        gate = self._gate
        if gate is None:
            if not self.transport.is_closing():
                super().data_received(data)
            return
        try:
            result = gate.feed(data)
        except ProxyProtocolError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if result is NEED_DATA:
            return
        self.proxy_header, rest = result
        self._gate = None
        if self._timer is not None:
            self._timer.cancel()
        if rest:
            super().data_received(rest)

    def eof_received(self) -> None:
        if self._gate is not None:  # closed before the PROXY header was complete
            self._gate = None
            self.transport.abort()
            return
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            self.listener.stats.current -= 1
            self._counted = False
        super().connection_lost(exc)


class _TlsServer(Server):
    """websockets' Server for connections our acceptor hands over (no asyncio server of its own)."""

    serving = True

    def is_serving(self) -> bool:
        return self.serving


class WebSocketListener:
    """One ``listeners.ws.<name>``."""

    def __init__(
        self,
        settings: ListenerSettings,
        handler: ConnectionHandler,
        *,
        on_refused: RefusalHook | None = None,
        admit: AddressCheck | None = None,
    ) -> None:
        assert settings.websocket is not None, "ws listeners always have websocket options"
        self.settings = settings
        self.stats = ListenerStats()
        self._handler = handler
        self._on_refused = on_refused
        self._admit = admit
        self._path = settings.websocket.mqtt_path
        self._rules = HeaderRules(
            address_header=settings.websocket.proxy_address_header,
            port_header=settings.websocket.proxy_port_header,
            trusted_proxies=settings.trusted_proxies,
        )
        self._server: Server | None = None
        self._acceptor: Acceptor | None = None
        self._context: ssl.SSLContext | None = None
        self._pending = 0  # wss sockets accepted, not yet handed to websockets
        self._connections: set[WebSocketConnection] = set()
        self._connection_class = type(
            "AddressingConnection", (_AddressingConnection,), {"listener": self, "__module__": __name__}
        )

    @property
    def id(self) -> str:
        """``ws:<name>``."""
        return self.settings.id

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound, or (wss) a certificate file cannot be read.
        """
        bind = self.settings.bind
        if self.settings.ssl_options is not None:
            try:
                self._context = context_from(self.settings.ssl_options)
            except ValueError as exc:
                raise OSError(0, str(exc)) from None
            self._server = _TlsServer(
                self._on_websocket,
                process_request=self._process_request,
                open_timeout=OPEN_TIMEOUT,
                logger=_protocol_logger,
            )
            self._acceptor = Acceptor(bind, self._on_tls_socket)
            self._acceptor.start()
            return
        self._server = await serve(
            self._on_websocket,
            host=bind.host or None,
            port=bind.port,
            subprotocols=SUBPROTOCOLS,
            process_request=self._process_request,
            create_connection=self._connection_class,
            # MQTT has its own keepalive; permessage-deflate costs CPU for small binary packets.
            compression=None,
            ping_interval=None,
            max_size=MAX_MESSAGE_SIZE,
            open_timeout=OPEN_TIMEOUT,
            reuse_address=True,
            logger=_protocol_logger,
        )

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
            if isinstance(self._server, _TlsServer):
                self._server.serving = False
        elif self._server is not None:
            self._server.close(close_connections=False)

    def _make_connection(self) -> _AddressingConnection:
        """A websockets connection for a socket we accepted (as the factory in websockets' ``serve``)."""
        assert self._server is not None
        protocol = ServerProtocol(
            subprotocols=SUBPROTOCOLS, max_size=MAX_MESSAGE_SIZE, logger=_protocol_logger
        )
        connection = self._connection_class(protocol, self._server, ping_interval=None)
        assert isinstance(connection, _AddressingConnection)
        return connection

    async def _on_tls_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """A ``wss`` connection: limits, the PROXY header taken exactly, TLS, then websockets."""
        assert self._context is not None and self.settings.ssl_options is not None
        # Until the handshake completes (connection_made) the socket is counted here, so that
        # max_connections bounds handshakes in progress too.
        self._pending += 1
        try:
            await self._tls_handover(sock, peer)
        except BaseException:
            sock.close()  # cancelled at shutdown: never leak the socket
            raise
        finally:
            self._pending -= 1

    async def _tls_handover(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        assert self._context is not None and self.settings.ssl_options is not None
        current = self.stats.current + self._pending - 1
        admitted, header = await admit_before_tls(sock, peer, self.settings, current, self.refuse)
        if not admitted:
            return

        def factory() -> _AddressingConnection:
            connection = self._make_connection()
            connection.header_read = True
            connection.proxy_header = header
            return connection

        timeout = self.settings.ssl_options.handshake_timeout
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, ssl=self._context, ssl_handshake_timeout=timeout
            )
        except OSError as exc:  # ssl.SSLError, ConnectionAbortedError (timeout)...
            self.refuse(client_address(header, *peer), *handshake_failure(exc, timeout))
            sock.close()

    def abort_connections(self) -> None:
        """Drop every live connection at once (last step of shutdown)."""
        for connection in list(self._connections):
            connection.abort()

    def refuse(self, address: ClientAddress, reason: str, message: str) -> None:
        """Count, log and report one refused connection (the caller closes or answers it)."""
        refuse(self.id, self.stats, self._on_refused, address, reason=reason, message=message)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Decide before the upgrade: 404 other paths, 503 when full, 400 malformed address
        headers, 403 addresses refused by access rules or bans."""
        assert isinstance(connection, _AddressingConnection)
        base = client_address(connection.proxy_header, *connection.socket_peer)
        local = local_tls_info(connection.transport.get_extra_info("ssl_object"))
        if local is not None:
            base = dataclasses.replace(base, tls=local)
        if urlsplit(request.path).path != self._path:
            # Not counted as a refusal for the audit log: a browser or scanner asking for a page.
            self.stats.refused["not_found"] += 1
            logger.info(
                "%s: %s asked for %r, not %r [not_found]", self.id, base.describe(), request.path, self._path
            )
            return _respond(
                connection, http.HTTPStatus.NOT_FOUND, f"Not Found: MQTT is served on {self._path}\n"
            )
        limit = self.settings.max_connections
        if limit != UNLIMITED and self.stats.current > limit:  # this connection counts itself
            self.refuse(base, "max_connections", f"max_connections ({limit}) reached")
            return _respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        try:
            client = self._resolve(base, request, connection.socket_peer)
        except ForwardedHeaderError as exc:
            self.refuse(base, exc.reason, str(exc))
            header = self._rules.address_header
            return _respond(
                connection, http.HTTPStatus.BAD_REQUEST, f"Bad Request: invalid {header} header\n"
            )
        verdict = None if self._admit is None else self._admit(self.id, client.ip)
        if verdict is not None:
            self.refuse(client, verdict.reason, verdict.message)
            return _respond(connection, http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        connection.client = client
        return None

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
        return ClientAddress(
            ip=resolution.ip,
            port=resolution.port,
            source=resolution.source,
            proxy_ip=normalize_ip(socket_peer[0]),
            proxy_port=socket_peer[1],
            details=details,
            tls=base.tls,
        )

    async def _on_websocket(self, websocket: ServerConnection) -> None:
        assert isinstance(websocket, _AddressingConnection)
        address = websocket.client or ClientAddress.direct(*websocket.socket_peer)
        connection = WebSocketConnection(websocket)
        self._connections.add(connection)
        logger.debug("%s: %s upgraded; %d live", self.id, address.describe(), self.stats.current)
        try:
            await self._handler(connection, address, self.settings)
        except Exception:
            logger.exception("%s: connection from %s failed", self.id, websocket.peer)
        finally:
            self._connections.discard(connection)
            await connection.close()  # returns once the TCP connection is lost
            logger.debug("%s: %s closed; %d live", self.id, websocket.peer, self.stats.current)


def _respond(connection: ServerConnection, status: http.HTTPStatus, text: str) -> Response:
    response = connection.respond(status, text)
    response.headers["Connection"] = "close"
    return response
