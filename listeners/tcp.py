"""TCP listeners, plain (``tcp``) and TLS (``ssl``): accept, enforce limits, learn the client's
address (PROXY header, TLS identity), hand each connection to the engine's sink factory.

``tcp`` is an asyncio server of :class:`~listeners.stream.ClientProtocol`: the PROXY header is read
from ``data_received``. ``ssl`` accepts with an :class:`~listeners.acceptor.Acceptor`, which takes
the PROXY header from the socket exactly, then runs TLS on the same socket with the same protocol
(``loop.connect_accepted_socket``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from listeners.acceptor import Acceptor, accept_tls, load_tls_context
from listeners.connection import ListenerStats, RefusalHook, SinkFactory
from listeners.options import ListenerOptions
from listeners.proxy_protocol import ProxyHeader
from listeners.stream import ClientProtocol, ListenerContext


class TcpListener:
    """One ``listeners.tcp.<name>``: an asyncio server whose connections go to ``factory``."""

    def __init__(
        self, settings: ListenerOptions, factory: SinkFactory, *, on_refused: RefusalHook | None = None
    ) -> None:
        self.settings = settings
        self._context = ListenerContext(settings, factory, on_refused)
        self._server: asyncio.Server | None = None

    @property
    def id(self) -> str:
        """``tcp:<name>``."""
        return self.settings.id

    @property
    def stats(self) -> ListenerStats:
        """Live connections, accepted and refused ones by reason."""
        return self._context.stats

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        bind = self.settings.bind
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ClientProtocol(self._context), bind.host or None, bind.port, reuse_address=True
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
        self._context.abort_all()


class SslListener(TcpListener):
    """One ``listeners.ssl.<name>``: MQTT over TLS, with the PROXY header (if any) before the handshake.

    An :class:`~listeners.acceptor.Acceptor` accepts, so that the header is taken from the socket
    exactly and the TLS handshake starts on the bytes after it.
    """

    def __init__(
        self, settings: ListenerOptions, factory: SinkFactory, *, on_refused: RefusalHook | None = None
    ) -> None:
        super().__init__(settings, factory, on_refused=on_refused)
        self._acceptor = Acceptor(settings.bind, self._on_socket)
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Load the certificates, bind and start accepting.

        Raises:
            OSError: the address cannot be bound; or, with errno 0 and the problem as its message,
                a certificate or key cannot be used.
        """
        self._tls = load_tls_context(self.settings)
        self._acceptor.start()

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs bound."""
        return self._acceptor.addresses()

    def stop_accepting(self) -> None:
        """Close the listening socket; live connections go on."""
        self._acceptor.stop()

    def abort_connections(self) -> None:
        """Drop every live connection and every one still in its PROXY header or handshake."""
        self._acceptor.cancel_pending()
        super().abort_connections()

    async def _on_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        assert self._tls is not None
        await accept_tls(self._context, self._tls, sock, peer, self._protocol)

    def _protocol(self, header: ProxyHeader | None) -> ClientProtocol:
        return ClientProtocol(self._context, counted=True, header=header)
