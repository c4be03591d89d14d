"""The contract between a listener and the engine, whatever the transport.

Push-based, as asyncio's own protocols: for each connection the listener calls the engine's
:data:`SinkFactory` once, as soon as the client's address is known, with a :class:`Link` (what the
engine may do to the connection); the engine answers with a :class:`Sink` (what the listener tells
it: bytes of the MQTT stream, flow control, the end). No task runs per connection or per message.

:class:`ListenerStats` is what a listener counts for the admin API and metrics; :func:`refuse` is
the one shape of a refusal (count, log, report).
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from listeners.address import ClientAddress
    from listeners.options import ListenerOptions

logger = logging.getLogger(__name__)

#: Seconds a closing connection may take to flush what is queued before it is dropped: a peer that
#: stops reading would otherwise hold its socket and buffer forever.
CLOSE_TIMEOUT: Final = 5.0


class Link(Protocol):
    """What the engine may do to one connection (the listener's protocol object implements it)."""

    def write(self, data: bytes) -> None:
        """Queue bytes for sending; ignored once closing. WebSocket: one binary frame."""

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """Queue several chunks; ignored once closing. WebSocket: all of them in ONE binary frame."""

    def pause_reading(self) -> None:
        """Stop calling :meth:`Sink.data_received` until :meth:`resume_reading`."""

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`."""

    def close(self) -> None:
        """Flush what is queued, then close (WebSocket: close frame 1000, then the TCP close).

        From here on :meth:`Sink.data_received` is not called again. TCP half-closes (FIN after the
        queued bytes) and :meth:`Sink.connection_lost` comes when the client closes its side; a
        peer that does not read or close is dropped after :data:`CLOSE_TIMEOUT`. Safe to call twice.
        """

    def abort(self) -> None:
        """Drop the connection at once; what is queued is lost."""

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, when the listener terminated TLS itself."""

    @property
    def is_closing(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called, or the connection is gone."""


class Sink(Protocol):
    """What the listener tells the engine about one connection."""

    def data_received(self, data: bytes) -> None:
        """Bytes of the MQTT stream (after the PROXY header, without WebSocket framing)."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone; called exactly once, also after :meth:`Link.close` / ``abort``."""

    def pause_writing(self) -> None:
        """The transport's write buffer is above its high-water mark: stop writing."""

    def resume_writing(self) -> None:
        """The write buffer drained below its low-water mark: writing may go on."""


#: Called once per connection, as soon as the client's address is known (after the PROXY header /
#: WebSocket upgrade), synchronously. An exception aborts that connection and is logged.
SinkFactory = Callable[[Link, "ClientAddress", "ListenerOptions"], Sink]


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


class RefusalLog(Protocol):
    """Logs one refusal as a WARNING: ``(reason, client ip, logger, message, *args)``. The broker
    passes one that aggregates repeats per (reason, address), so that a client retrying without
    end cannot flood the log; without one, every refusal is logged."""

    def __call__(self, reason: str, ip: str, log: logging.Logger, message: str, *args: object) -> None:
        """Log ``message % args`` on ``log``, or count it. Never raises."""


@dataclass
class ListenerStats:
    """Live counters of one listener, read by the admin API and metrics.

    ``current`` counts connections from accept to their end, including those still in their PROXY
    header, TLS handshake or WebSocket upgrade (they hold a socket too, and ``max_connections``
    bounds them).
    """

    current: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    #: Connections the peer closed without sending a byte of the client's own stream (nothing at
    #: all, or only a PROXY header, LOCAL or not): load balancers' health checks (HAProxy
    #: ``check``), logged at DEBUG only.
    health_checks: int = 0


def refuse(
    listener_id: str,
    stats: ListenerStats,
    hook: RefusalHook | None,
    address: ClientAddress,
    *,
    reason: str,
    message: str,
    log: RefusalLog | None = None,
) -> None:
    """Count, log (socket peer, reason, and the real client when known; through ``log`` when
    given, which may hold repeats back) and report a refusal.

    The caller closes the connection or answers it. Raises what ``hook`` raises.
    """
    stats.refused[reason] += 1
    line = "%s refused %s: %s [%s]"
    if log is None:
        logger.warning(line, listener_id, address.describe(), message, reason)
    else:
        log(reason, address.ip, logger, line, listener_id, address.describe(), message, reason)
    if hook is not None:
        hook(listener_id, address, reason)
