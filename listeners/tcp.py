"""TCP listeners, plain (``tcp``) and TLS (``ssl``): accept, enforce limits, learn the client's
address (PROXY header, TLS identity), hand each connection to the engine's sink factory.

``tcp`` is an asyncio server of :class:`~listeners.stream.ClientProtocol`: the PROXY header is read
from ``data_received``. ``ssl`` accepts with an :class:`~listeners.acceptor.Acceptor`, which takes
the PROXY header from the socket exactly, then runs TLS on the same socket with the same protocol
(``loop.connect_accepted_socket``).

A reload hands a listener new settings in two steps: :meth:`TcpListener.prepare` (bind a new
address, load the certificates: what can fail) and :meth:`TcpListener.commit` (swap them in). The
connections accepted from then on follow the new settings; those already open keep what they were
admitted with (their PROXY header, their TLS session).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from listeners.acceptor import Acceptor, Opening, accept_tls, bind_socket, load_tls_context
from listeners.connection import ListenerStats, RefusalHook, RefusalLog, SinkFactory
from listeners.options import Bind, ListenerOptions
from listeners.proxy_protocol import ProxyHeader
from listeners.stream import ClientProtocol, ListenerContext


class TcpListener:
    """One ``listeners.tcp.<name>``: an asyncio server whose connections go to ``factory``."""

    def __init__(
        self,
        settings: ListenerOptions,
        factory: SinkFactory,
        *,
        on_refused: RefusalHook | None = None,
        log_refusal: RefusalLog | None = None,
    ) -> None:
        self.settings = settings
        self._context = ListenerContext(settings, factory, on_refused, log_refusal)
        self._server: asyncio.Server | None = None
        #: The address the listening sockets are bound to (None before start).
        self._bound: Bind | None = None

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
        await self.commit(await self.prepare(self.settings))

    async def prepare(self, settings: ListenerOptions, *, max_packet_size: int | None = None) -> Opening:
        """Make ready to take ``settings`` (nothing changes until :meth:`commit`): bind its address
        when it is not the one in use, without accepting yet. ``max_packet_size`` is for WebSocket
        listeners (TCP streams are bounded by the engine's codec).

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        opening = Opening(settings, max_packet_size=max_packet_size)
        if settings.bind != self._bound:
            bind = settings.bind
            opening.server = await asyncio.get_running_loop().create_server(
                lambda: ClientProtocol(self._context),
                bind.host or None,
                bind.port,
                reuse_address=True,
                start_serving=False,
            )
        return opening

    async def commit(self, opening: Opening) -> None:
        """Take what :meth:`prepare` made ready: the next connection follows the new settings; a
        new address accepts from now on and the old one is closed (its connections go on)."""
        self.settings = self._context.settings = opening.settings
        server, opening.server = opening.server, None
        if server is not None:
            old, self._server = self._server, server
            self._bound = opening.settings.bind
            await server.start_serving()
            if old is not None:
                old.close()

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

    def connections(self) -> list[ClientProtocol]:
        """The live connections (accepted, not yet gone)."""
        return list(self._context.connections)

    def cancel_pending(self) -> None:
        """Drop the connections still in their PROXY header or TLS handshake (TLS listeners)."""


class SslListener(TcpListener):
    """One ``listeners.ssl.<name>``: MQTT over TLS, with the PROXY header (if any) before the handshake.

    An :class:`~listeners.acceptor.Acceptor` accepts, so that the header is taken from the socket
    exactly and the TLS handshake starts on the bytes after it.
    """

    def __init__(
        self,
        settings: ListenerOptions,
        factory: SinkFactory,
        *,
        on_refused: RefusalHook | None = None,
        log_refusal: RefusalLog | None = None,
    ) -> None:
        super().__init__(settings, factory, on_refused=on_refused, log_refusal=log_refusal)
        self._acceptor = Acceptor(settings.bind, self._on_socket)
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Load the certificates, bind and start accepting.

        Raises:
            OSError: the address cannot be bound; or, with errno 0 and the problem as its message,
                a certificate or key cannot be used.
        """
        await self.commit(await self.prepare(self.settings))

    async def prepare(self, settings: ListenerOptions, *, max_packet_size: int | None = None) -> Opening:
        """Load the certificates of ``settings`` (read again at every reload: a renewed certificate
        at the same path is picked up) and bind its address if it changed; nothing changes until
        :meth:`commit`.

        Raises:
            OSError: the address cannot be bound; or, with errno 0 and the problem as its message,
                a certificate or key cannot be used.
        """
        opening = Opening(settings, tls=load_tls_context(settings), max_packet_size=max_packet_size)
        if settings.bind != self._bound:
            opening.sockets = [bind_socket(settings.bind)]
        return opening

    async def commit(self, opening: Opening) -> None:
        """Take what :meth:`prepare` made ready: the next handshake uses the new certificates (the
        sessions already established keep theirs)."""
        self.settings = self._context.settings = opening.settings
        self._tls = opening.tls
        sockets, opening.sockets = opening.sockets, []
        if sockets:
            self._bound = opening.settings.bind
            self._acceptor.serve(opening.settings.bind, sockets)

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

    def cancel_pending(self) -> None:
        """Drop the connections still in their PROXY header or TLS handshake."""
        self._acceptor.cancel_pending()

    async def _on_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        assert self._tls is not None
        await accept_tls(self._context, self._tls, sock, peer, self._protocol)

    def _protocol(self, header: ProxyHeader | None) -> ClientProtocol:
        return ClientProtocol(self._context, counted=True, header=header)
