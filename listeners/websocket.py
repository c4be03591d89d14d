"""The WebSocket listener: MQTT over WebSocket on ``websocket.mqtt_path``, handed to the engine."""

from __future__ import annotations

import http
import logging
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from broker.settings import UNLIMITED, ListenerSettings
from listeners.address import ClientAddress, format_hostport
from listeners.connection import ConnectionHandler, ListenerStats, WebSocketConnection

logger = logging.getLogger(__name__)

#: [MQTT-6.0.0-3] clients offer "mqtt"; a client offering none (or another) gets HTTP 400.
SUBPROTOCOLS = [Subprotocol("mqtt")]

#: Largest WebSocket message accepted. One MQTT packet per message is usual; 16 MiB bounds the
#: memory one client can make us buffer (websockets' default of 1 MiB is too small for MQTT).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024

#: Seconds for the HTTP upgrade to complete (bounds slow-loris handshakes).
OPEN_TIMEOUT = 10.0


class WebSocketListener:
    """One ``listeners.ws.<name>``."""

    def __init__(self, settings: ListenerSettings, handler: ConnectionHandler) -> None:
        assert settings.websocket is not None, "ws listeners always have websocket options"
        self.settings = settings
        self.stats = ListenerStats()
        self._handler = handler
        self._path = settings.websocket.mqtt_path
        self._server: Server | None = None
        self._connections: set[WebSocketConnection] = set()

    @property
    def id(self) -> str:
        """``ws:<name>``."""
        return self.settings.id

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound.
        """
        bind = self.settings.bind
        self._server = await serve(
            self._on_websocket,
            host=bind.host or None,
            port=bind.port,
            subprotocols=SUBPROTOCOLS,
            process_request=self._process_request,
            # MQTT has its own keepalive; permessage-deflate costs CPU for small binary packets.
            compression=None,
            ping_interval=None,
            max_size=MAX_MESSAGE_SIZE,
            open_timeout=OPEN_TIMEOUT,
            reuse_address=True,
        )

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound."""
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def stop_accepting(self) -> None:
        """Close the listening sockets; live connections go on."""
        if self._server is not None:
            self._server.close(close_connections=False)

    def abort_connections(self) -> None:
        """Drop every live connection at once (last step of shutdown)."""
        for connection in list(self._connections):
            connection.abort()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer before the upgrade: 404 for other paths, 503 when full."""
        peer = format_hostport(*_peer(connection))
        if urlsplit(request.path).path != self._path:
            self.stats.refuse("not_found")
            logger.info("%s refused %s: path %r is not %r", self.id, peer, request.path, self._path)
            return _respond(
                connection, http.HTTPStatus.NOT_FOUND, f"Not Found: MQTT is served on {self._path}\n"
            )
        limit = self.settings.max_connections
        if limit != UNLIMITED and self.stats.current >= limit:
            self.stats.refuse("max_connections")
            logger.warning("%s refused %s: max_connections (%d) reached", self.id, peer, limit)
            return _respond(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        return None

    async def _on_websocket(self, websocket: ServerConnection) -> None:
        peer_ip, peer_port = _peer(websocket)
        connection = WebSocketConnection(websocket)
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


def _peer(connection: ServerConnection) -> tuple[str, int]:
    remote = connection.remote_address
    return str(remote[0]), int(remote[1])


def _respond(connection: ServerConnection, status: http.HTTPStatus, text: str) -> Response:
    response = connection.respond(status, text)
    response.headers["Connection"] = "close"
    return response
