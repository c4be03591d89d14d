"""TCP listeners, plain (``tcp``) and TLS (``ssl``): accept, enforce limits, learn the client's
address (PROXY header, TLS identity), hand over to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl

from broker.settings import ListenerSettings, ProxyProtocolMode
from listeners.acceptor import Acceptor, admit_before_tls, read_header_within
from listeners.address import ClientAddress
from listeners.connection import ConnectionHandler, ListenerStats, RefusalHook, StreamConnection, refuse
from listeners.gate import ProxyGate, client_address, refusal_at_accept
from listeners.proxy_protocol import NEED_DATA, ProxyHeader
from listeners.tls import context_from, handshake_failure, local_tls_info

logger = logging.getLogger(__name__)

#: Bytes asked of the socket per read while the PROXY header is awaited. Bytes read past the header
#: are kept and served to the engine first, so over-reading is harmless.
HEADER_READ_SIZE = 4096

#: StreamReader buffer limit. MQTT is read in small exact-size pieces; 64 KiB is asyncio's default
#: and bounds what one slow consumer can pin in memory before back-pressure.
STREAM_LIMIT = 64 * 1024


class TcpListener:
    """One ``listeners.tcp.<name>``: an asyncio server whose connections go to ``handler``."""

    def __init__(
        self, settings: ListenerSettings, handler: ConnectionHandler, *, on_refused: RefusalHook | None = None
    ) -> None:
        self.settings = settings
        self.stats = ListenerStats()
        self._handler = handler
        self._on_refused = on_refused
        self._server: asyncio.Server | None = None
        self._connections: set[StreamConnection] = set()

    @property
    def id(self) -> str:
        """``tcp:<name>``."""
        return self.settings.id

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        bind = self.settings.bind
        self._server = await asyncio.start_server(
            self._on_connect,
            host=bind.host or None,
            port=bind.port,
            reuse_address=True,
            limit=STREAM_LIMIT,
        )

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound (the real port when the config says 0)."""
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def stop_accepting(self) -> None:
        """Close the listening sockets; live connections go on."""
        if self._server is not None:
            self._server.close()

    def abort_connections(self) -> None:
        """Drop every live connection at once (last step of shutdown)."""
        for connection in list(self._connections):
            connection.abort()

    def _refuse(self, writer: asyncio.StreamWriter, peer: ClientAddress, reason: str, message: str) -> None:
        """Count, log once, report, and drop a connection."""
        refuse(self.id, self.stats, self._on_refused, peer, reason=reason, message=message)
        writer.transport.abort()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer_ip, peer_port = str(peername[0]), int(peername[1])
        socket_peer = ClientAddress.direct(peer_ip, peer_port)
        peer = socket_peer.peername
        settings = self.settings
        verdict = refusal_at_accept(settings, self.stats.current, peer_ip)
        if verdict is not None:
            self._refuse(writer, socket_peer, *verdict)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # MQTT packets are small and latency matters more than coalescing.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.current += 1
        self.stats.accepted += 1
        logger.debug("%s: %s connected; %d live", self.id, peer, self.stats.current)
        connection: StreamConnection | None = None
        try:
            header: ProxyHeader | None = None
            pending = b""
            if settings.proxy_protocol is not ProxyProtocolMode.OFF:
                admitted, read = await read_header_within(
                    self._read_header(reader, peer_ip),
                    settings.proxy_protocol_timeout,
                    socket_peer,
                    lambda address, reason, message: self._refuse(writer, address, reason, message),
                )
                if not admitted or read is None:
                    return
                header, pending = read
            address = client_address(header, peer_ip, peer_port)
            connection = StreamConnection(reader, writer, pending)
            self._connections.add(connection)
            await self._handler(connection, address, settings)
        except Exception:
            logger.exception("%s: connection from %s failed", self.id, peer)
        finally:
            self.stats.current -= 1
            if connection is not None:
                self._connections.discard(connection)
                await connection.close()
            else:
                writer.transport.abort()
            logger.debug("%s: %s closed; %d live", self.id, peer, self.stats.current)

    async def _read_header(
        self, reader: asyncio.StreamReader, peer_ip: str
    ) -> tuple[ProxyHeader | None, bytes]:
        """Read until the PROXY header (or, in ``optional`` mode, its absence) is decided.

        Raises:
            ProxyProtocolError: refused header (see :class:`~listeners.gate.ProxyGate`).
            asyncio.IncompleteReadError: the peer closed first.
        """
        gate = ProxyGate(self.settings.proxy_protocol, self.settings.trusted_proxies, peer_ip)
        while True:
            data = await reader.read(HEADER_READ_SIZE)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            result = gate.feed(data)
            if result is not NEED_DATA:
                return result


class SslListener(TcpListener):
    """One ``listeners.ssl.<name>``: MQTT over TLS, with the PROXY header (if any) before the handshake.

    Connections are accepted by an :class:`~listeners.acceptor.Acceptor` so that the header is taken
    from the socket exactly and the TLS handshake starts on the bytes after it.
    """

    def __init__(
        self, settings: ListenerSettings, handler: ConnectionHandler, *, on_refused: RefusalHook | None = None
    ) -> None:
        super().__init__(settings, handler, on_refused=on_refused)
        self._acceptor = Acceptor(settings.bind, self._on_socket)
        self._context: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Load the certificates, bind and start accepting.

        Raises:
            OSError: the address cannot be bound, or a certificate file cannot be read.
        """
        try:
            assert self.settings.ssl_options is not None, "ssl listeners always have ssl_options"
            self._context = context_from(self.settings.ssl_options)
        except ValueError as exc:
            raise OSError(0, str(exc)) from None
        self._acceptor.start()

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs bound."""
        return self._acceptor.addresses()

    def stop_accepting(self) -> None:
        """Close the listening socket; live connections go on."""
        self._acceptor.stop()

    def _refuse_address(self, address: ClientAddress, reason: str, message: str) -> None:
        refuse(self.id, self.stats, self._on_refused, address, reason=reason, message=message)

    async def _on_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        # Counted from accept: connections still in their PROXY header or handshake hold a socket
        # too, and max_connections must bound them.
        self.stats.current += 1
        connection: StreamConnection | None = None
        try:
            admitted, header = await admit_before_tls(
                sock, peer, self.settings, self.stats.current - 1, self._refuse_address
            )
            if not admitted:
                return
            self.stats.accepted += 1
            address = client_address(header, *peer)
            streams = await self._handshake(sock, address)
            if streams is None:
                return
            reader, writer = streams
            address = dataclasses.replace(address, tls=local_tls_info(writer.get_extra_info("ssl_object")))
            connection = StreamConnection(reader, writer)
            self._connections.add(connection)
            await self._handler(connection, address, self.settings)
        finally:
            self.stats.current -= 1
            if connection is not None:
                self._connections.discard(connection)
                await connection.close()
            else:
                sock.close()  # refused, failed, or cancelled at shutdown: never leak the socket

    async def _handshake(
        self, sock: socket.socket, address: ClientAddress
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """TLS on the accepted socket, bounded by ``ssl_options.handshake_timeout``; None if it failed."""
        assert self._context is not None and self.settings.ssl_options is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        timeout = self.settings.ssl_options.handshake_timeout
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self._context, ssl_handshake_timeout=timeout
            )
        except OSError as exc:  # ssl.SSLError, ConnectionAbortedError (timeout)...
            self._refuse_address(address, *handshake_failure(exc, timeout))
            sock.close()
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
