"""The byte stream a listener hands to the engine, whatever the transport.

A :class:`Connection` reads exact byte counts and writes packets. The engine wraps it for amqtt;
the listener that made it keeps the transport details (TLS, WebSocket framing, bytes already read
past a PROXY header). :class:`ListenerStats` is what a listener counts for the admin API and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from broker.settings import ListenerSettings
    from listeners.address import ClientAddress

logger = logging.getLogger(__name__)

#: Seconds a closing connection may take to flush what is queued before it is dropped.
CLOSE_TIMEOUT = 5.0


class Connection(Protocol):
    """A client connection as the engine sees it.

    ``read(n)`` returns exactly ``n`` bytes or raises :class:`asyncio.IncompleteReadError` at end of
    stream (the contract of :meth:`asyncio.StreamReader.readexactly`).
    """

    @property
    def read(self) -> Callable[[int], Awaitable[bytes]]:
        """The coroutine function reading exactly ``n`` bytes."""

    def write(self, data: bytes) -> None:
        """Queue bytes for sending."""

    async def drain(self) -> None:
        """Send what was queued, waiting while the peer is slow."""

    async def close(self) -> None:
        """Close the connection; safe to call more than once."""

    def abort(self) -> None:
        """Drop the connection at once, without flushing."""

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, when the listener terminated TLS itself."""


#: What a listener calls for each accepted connection; returns when the connection is over.
ConnectionHandler = Callable[["Connection", "ClientAddress", "ListenerSettings"], Awaitable[None]]


class Verdict(Protocol):
    """A refusal decided outside the listener (access lists, bans)."""

    @property
    def reason(self) -> str:
        """Short code (metrics and audit label)."""

    @property
    def message(self) -> str:
        """What was wrong, for the log."""


#: Asked with (listener id, real client IP) as soon as a listener knows the address; ``None`` admits.
AddressCheck = Callable[[str, str], "Verdict | None"]

#: Told of every connection a listener refuses: (listener id, client address, reason).
RefusalHook = Callable[[str, "ClientAddress", str], None]


@dataclass
class ListenerStats:
    """Live counters of one listener, read by the admin API and metrics."""

    current: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def refuse(
    listener_id: str,
    stats: ListenerStats,
    hook: RefusalHook | None,
    address: ClientAddress,
    *,
    reason: str,
    message: str,
) -> None:
    """Count, log once (socket peer, reason, and the real client when known) and report a refusal."""
    stats.refused[reason] += 1
    logger.warning("%s refused %s: %s [%s]", listener_id, address.describe(), message, reason)
    if hook is not None:
        hook(listener_id, address, reason)


class StreamConnection:
    """A TCP connection (plain or TLS) over asyncio streams.

    ``pending`` holds bytes already read from the socket that belong to the client's MQTT stream
    (those that came in the same read as a PROXY header); they are served before the socket's.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: bytes = b""
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._pending = pending
        self._closed = False
        # With nothing pending, read straight from the stream: no extra frame on the hot path.
        self.read: Callable[[int], Awaitable[bytes]] = self._read_pending if pending else reader.readexactly

    async def _read_pending(self, n: int) -> bytes:
        head, self._pending = self._pending[:n], self._pending[n:]
        if not self._pending:
            self.read = self._reader.readexactly
        if len(head) == n:
            return head
        try:
            return head + await self._reader.readexactly(n - len(head))
        except asyncio.IncompleteReadError as exc:
            raise asyncio.IncompleteReadError(head + exc.partial, n) from None

    def write(self, data: bytes) -> None:
        """Queue bytes for sending; ignored once closed."""
        if not self._closed:
            self._writer.write(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        if not self._closed:
            await self._writer.drain()

    async def close(self) -> None:
        """Flush, then close the socket. Never raises for a peer that already went away."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, RuntimeError):
            if not self._writer.transport.is_closing() and self._writer.can_write_eof():
                self._writer.write_eof()
        self._writer.close()
        try:
            # A peer that stopped reading never lets the buffer drain: bounded, then dropped.
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except TimeoutError:
            self._writer.transport.abort()
        except (OSError, asyncio.CancelledError):
            pass

    def abort(self) -> None:
        """Drop the connection at once, without flushing (shutdown, refusal)."""
        self._closed = True
        self._writer.transport.abort()

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, if the listener terminated TLS."""
        obj = self._writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None


class WebSocketConnection:
    """MQTT over a WebSocket: binary messages in, one message per drained batch out."""

    def __init__(self, websocket: ServerConnection) -> None:
        self._ws = websocket
        self._in = bytearray()
        self._out: list[bytes] = []
        self._closed = False

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the MQTT stream, across WebSocket message boundaries.

        Raises:
            asyncio.IncompleteReadError: the WebSocket closed first.
        """
        while len(self._in) < n:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                partial = bytes(self._in)
                self._in.clear()
                raise asyncio.IncompleteReadError(partial, n) from None
            # [MQTT-6.0.0-1] MQTT travels in binary frames; a text frame is a protocol error.
            if isinstance(message, str):
                await self._ws.close(1003, "MQTT needs binary frames")
                raise asyncio.IncompleteReadError(bytes(self._in), n)
            self._in += message
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out as one binary message at the next :meth:`drain`."""
        if not self._closed:
            self._out.append(data)

    async def drain(self) -> None:
        """Send everything queued as one binary WebSocket message."""
        if self._out and not self._closed:
            data = b"".join(self._out)
            self._out.clear()
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(data)

    async def close(self) -> None:
        """Send what is queued, then close the WebSocket normally."""
        if self._closed:
            return
        await self.drain()
        self._closed = True
        await self._ws.close()

    def abort(self) -> None:
        """Drop the connection at once (shutdown)."""
        self._closed = True
        self._ws.transport.abort()

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, if the listener terminated TLS."""
        obj = self._ws.transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None
