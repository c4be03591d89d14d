"""Accepting connections ourselves, for TLS listeners (``ssl``, ``wss``), which read a PROXY header
before the handshake.

asyncio's servers start reading as soon as a connection is accepted, so bytes that arrive with the
PROXY header (the start of the TLS ClientHello) would be read into a buffer the TLS layer never
sees. Here the header is taken from the socket *exactly*: peek, decide how many bytes belong to the
header, consume only those; the handshake then starts on an untouched stream
(``loop.connect_accepted_socket(..., ssl=...)``, in :func:`accept_tls`). A task runs per connection
only until its handshake is done; the connection is then a :class:`~listeners.stream.ClientProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from listeners.address import ClientAddress, format_hostport
from listeners.errors import ProxyProtocolError
from listeners.gate import ProxyGate, client_address, refusal_at_accept
from listeners.options import Bind, ListenerOptions, ProxyProtocolMode
from listeners.proxy_protocol import NEED_DATA, ProxyHeader
from listeners.stream import ClientProtocol, ListenerContext
from listeners.tls import context_from, handshake_failure

logger = logging.getLogger(__name__)

#: Bytes peeked per look at the socket: a v1 header is at most 107 bytes, a v2 header at most
#: gate.MAX_V2_LENGTH (4 KiB); a peek never consumes, so a larger window costs nothing.
PEEK_SIZE: Final = 8192

#: Pending connections the kernel queues for us (as asyncio's default).
BACKLOG: Final = 100

SocketHandler = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]

T = TypeVar("T")

#: Counts, logs and reports one refusal: (address, reason, message).
Refuse = Callable[[ClientAddress, str, str], None]


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def read_proxy_header_exact(sock: socket.socket, gate: ProxyGate) -> ProxyHeader | None:
    """Consume exactly the PROXY header (or nothing, when ``gate`` finds none) from ``sock``.

    Each look peeks at what is pending and asks a fresh gate about everything seen so far; bytes
    are consumed only when they certainly belong to the header (the whole peek while the header is
    incomplete, the header's exact tail once it is complete). So the socket is never left readable
    with nothing to do, and nothing after the header is consumed.

    Raises:
        ProxyProtocolError: the gate refused the bytes (see :class:`~listeners.gate.ProxyGate`).
        asyncio.IncompleteReadError: the peer closed (or reset) first; ``partial`` is what it sent.
    """
    consumed = b""
    while True:
        await _readable(sock)
        try:
            peeked = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except ConnectionError:
            raise asyncio.IncompleteReadError(consumed, None) from None
        if not peeked:
            raise asyncio.IncompleteReadError(consumed, None)
        seen = consumed + peeked
        result = gate.fresh().feed(seen)
        if result is NEED_DATA:
            consumed += sock.recv(len(peeked))
            continue
        header, rest = result
        header_length = len(seen) - len(rest)
        remaining = header_length - len(consumed)
        while remaining > 0:  # all of it was peeked, so it is there to be read
            remaining -= len(sock.recv(remaining))
        return header


async def read_header_within(
    read: Awaitable[T],
    seconds: float,
    socket_peer: ClientAddress,
    refuse: Refuse,
    *,
    health_check: Callable[[str], None] | None = None,
) -> tuple[bool, T | None]:
    """Await a PROXY header read (``read``) for at most ``seconds`` (``proxy_protocol_timeout``).

    Returns ``(True, what read returned)``, or ``(False, None)`` when the header was refused or late
    (reported through ``refuse`` with the reason) or the peer closed first (without a byte: a health
    check, told to ``health_check`` with the peer). Never raises for the peer's doing.
    """
    try:
        # asyncio.timeout, not wait_for: no extra task per connection.
        async with asyncio.timeout(seconds):
            return True, await read
    except TimeoutError:
        refuse(socket_peer, "proxy_timeout", f"no complete PROXY header within {seconds:g}s")
    except ProxyProtocolError as exc:
        refuse(socket_peer, exc.reason, str(exc))
    except asyncio.IncompleteReadError as exc:
        if not exc.partial and health_check is not None:
            health_check(socket_peer.peername)
        else:
            logger.debug("%s closed before sending a PROXY header", socket_peer.peername)
    except ConnectionError:
        logger.debug("%s closed before sending a PROXY header", socket_peer.peername)
    return False, None


async def admit_before_tls(
    sock: socket.socket,
    peer: tuple[str, int],
    settings: ListenerOptions,
    current: int,
    refuse: Refuse,
    *,
    health_check: Callable[[str], None] | None = None,
) -> tuple[bool, ProxyHeader | None]:
    """The checks of a TLS listener before its handshake: ``max_connections`` (``current`` open
    now), trusted peers, and the PROXY header taken exactly.

    Returns ``(True, header or None)`` to go on to the handshake, or ``(False, None)`` when the
    connection was refused (reported through ``refuse``) or closed by the peer (before a byte:
    told to ``health_check``); the socket is then closed. Never raises for the peer's doing.
    """
    socket_peer = ClientAddress.direct(*peer)
    verdict = refusal_at_accept(settings, current, peer[0])
    if verdict is not None:
        refuse(socket_peer, *verdict)
    elif settings.proxy_protocol is ProxyProtocolMode.OFF:
        return True, None
    else:
        gate = ProxyGate(settings.proxy_protocol, settings.trusted_proxies, peer[0])
        read = read_proxy_header_exact(sock, gate)
        admitted, header = await read_header_within(
            read, settings.proxy_protocol_timeout, socket_peer, refuse, health_check=health_check
        )
        if admitted:
            return True, header
    sock.close()
    return False, None


async def first_byte(sock: socket.socket, seconds: float) -> bool | None:
    """Whether the peer sends a byte (True, nothing consumed) or closes first (False, FIN or RST)
    within ``seconds``; ``None`` when it does neither. Never raises for the peer's doing."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                await _readable(sock)
                try:
                    return bool(sock.recv(1, socket.MSG_PEEK))
                except BlockingIOError:
                    continue
    except TimeoutError:
        return None
    except OSError:  # ECONNRESET: a health check closing with RST (HAProxy does)
        return False


def load_tls_context(settings: ListenerOptions) -> ssl.SSLContext:
    """The server context of a TLS listener, from its ``ssl_options``.

    Raises:
        OSError: with errno 0 and the problem as its message (the convention ``broker.app`` reads
            to tell a certificate problem from a bind failure): a certificate, key or CA file
            cannot be read or used.
    """
    assert settings.ssl_options is not None, "TLS listeners always have ssl_options"
    try:
        return context_from(settings.ssl_options)
    except ValueError as exc:
        raise OSError(0, str(exc)) from None


async def accept_tls(
    context: ListenerContext,
    tls: ssl.SSLContext,
    sock: socket.socket,
    peer: tuple[str, int],
    make_protocol: Callable[[ProxyHeader | None], ClientProtocol],
) -> None:
    """One accepted socket of a TLS listener: :func:`admit_before_tls`, the TLS handshake bounded
    by ``ssl_options.handshake_timeout``, then ``make_protocol(header)`` runs the connection.

    The connection is counted in ``stats.current`` from here, so that those still in their PROXY
    header or handshake are bounded by ``max_connections`` too; the protocol takes the count over
    once the handshake is done (``connection_made``). A peer that closes before its first TLS byte
    is a health check (counted, DEBUG); a failed handshake is refused as ``tls_timeout`` or
    ``tls_error``. Never raises for the peer's doing; the socket is closed on every failure, and on
    cancellation (shutdown). ``tls`` and the settings are those in force at accept: a reload
    changes what the next connection gets.
    """
    stats = context.stats
    stats.current += 1
    protocol: ClientProtocol | None = None
    settings = context.settings
    try:
        admitted, header = await admit_before_tls(
            sock, peer, settings, stats.current - 1, context.refuse, health_check=context.health_check
        )
        if not admitted:
            return
        stats.accepted += 1
        assert settings.ssl_options is not None
        timeout = settings.ssl_options.handshake_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = await first_byte(sock, timeout)
        if not sent:
            if sent is None:
                context.refuse(client_address(header, *peer), *handshake_failure(TimeoutError(), timeout))
            else:
                context.health_check(format_hostport(*peer))
            return
        new_protocol = protocol = make_protocol(header)  # (a closure would not see it narrowed)
        left = max(timeout - (loop.time() - started), 0.001)
        try:
            await loop.connect_accepted_socket(
                lambda: new_protocol, sock, ssl=tls, ssl_handshake_timeout=left
            )
        except OSError as exc:  # ssl.SSLError, ConnectionAbortedError (timeout)...
            context.refuse(client_address(header, *peer), *handshake_failure(exc, timeout))
    finally:
        if protocol is None or not protocol.made:
            stats.current -= 1
            sock.close()


def bind_socket(bind: Bind) -> socket.socket:
    """A listening, non-blocking socket on ``bind`` (every address, both families, for ``""``);
    nothing is accepted from it yet.

    Raises:
        OSError: the address cannot be bound.
    """
    host, port = bind.host, bind.port
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=False)
    elif socket.has_dualstack_ipv6():
        sock = socket.create_server(
            ("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True
        )
    else:
        sock = socket.create_server(("0.0.0.0", port), backlog=BACKLOG)
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class Opening:
    """What a listener made ready for new settings and has not applied yet: a reload prepares every
    listener first (binds the new addresses, loads the certificates), so that one that fails
    changes nothing, then commits them all. ``sockets`` / ``server``: bound, not accepting yet
    (none when the address did not change)."""

    settings: ListenerOptions
    tls: ssl.SSLContext | None = None
    max_packet_size: int | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    server: asyncio.Server | None = None

    def discard(self) -> None:
        """Close what was bound (the reload failed, or this listener is not wanted after all)."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        if self.server is not None:
            self.server.close()
            self.server = None


class Acceptor:
    """A listening socket (or two, v4 and v6) whose connections go to ``on_socket``."""

    def __init__(self, bind: Bind, on_socket: SocketHandler) -> None:
        self._bind = bind
        self._on_socket = on_socket
        self._sockets: list[socket.socket] = []
        self._loops: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address cannot be bound.
        """
        self.serve(self._bind, [bind_socket(self._bind)])

    def serve(self, bind: Bind, sockets: list[socket.socket]) -> None:
        """Accept from ``sockets`` (bound to ``bind``) from now on; the sockets accepted from so far
        are closed (connections accepted from them go on)."""
        self.stop()
        self._bind = bind
        for sock in sockets:
            self._sockets.append(sock)
            self._loops.append(asyncio.create_task(self._accept(sock)))

    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs bound."""
        return [sock.getsockname()[:2] for sock in self._sockets]

    def cancel_pending(self) -> None:
        """Cancel the handlers of connections still being accepted (PROXY header, handshake)."""
        for task in list(self._handlers):
            task.cancel()

    def stop(self) -> None:
        """Stop accepting and close the listening sockets; accepted connections go on."""
        for task in self._loops:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        self._loops.clear()
        self._sockets.clear()

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except (ConnectionAbortedError, BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # EMFILE and the like: say so, breathe, go on
                logger.error("accept on %s failed: %s", self._bind, exc.strerror)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._run(sock, (str(peer[0]), int(peer[1]))))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _run(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            await self._on_socket(sock, peer)
        except Exception:
            logger.exception("connection from %s failed", peer)
            sock.close()
