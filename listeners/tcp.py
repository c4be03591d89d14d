"""The TCP listener: accept, enforce limits, learn the client's address, hand over to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from broker.settings import UNLIMITED, ListenerSettings
from listeners.address import ClientAddress, format_hostport
from listeners.connection import ConnectionHandler, ListenerStats, StreamConnection

logger = logging.getLogger(__name__)

#: StreamReader buffer limit. MQTT is read in small exact-size pieces; 64 KiB is asyncio's default
#: and bounds what one slow consumer can pin in memory before back-pressure.
STREAM_LIMIT = 64 * 1024


class TcpListener:
    """One ``listeners.tcp.<name>``: an asyncio server whose connections go to ``handler``."""

    def __init__(self, settings: ListenerSettings, handler: ConnectionHandler) -> None:
        self.settings = settings
        self.stats = ListenerStats()
        self._handler = handler
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

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # MQTT packets are small and latency matters more than coalescing.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer_ip, peer_port = str(peer[0]), int(peer[1])
        limit = self.settings.max_connections
        if limit != UNLIMITED and self.stats.current >= limit:
            self.stats.refuse("max_connections")
            logger.warning(
                "%s refused %s: max_connections (%d) reached",
                self.id,
                format_hostport(peer_ip, peer_port),
                limit,
            )
            writer.transport.abort()
            return
        connection = StreamConnection(reader, writer)
        self.stats.current += 1
        self.stats.accepted += 1
        self._connections.add(connection)
        peer = format_hostport(peer_ip, peer_port)
        logger.debug("%s: %s connected; %d live", self.id, peer, self.stats.current)
        try:
            address = ClientAddress.direct(peer_ip, peer_port)
            await self._handler(connection, address, self.settings)
        except Exception:
            logger.exception("%s: connection from %s failed", self.id, peer)
        finally:
            self._connections.discard(connection)
            self.stats.current -= 1
            await connection.close()
            logger.debug("%s: %s closed; %d live", self.id, peer, self.stats.current)
