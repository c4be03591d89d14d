"""What a listener reads of its settings, as types of its own.

``broker.settings`` builds the real settings from YAML; its ``ListenerSettings`` satisfies
:class:`ListenerOptions` structurally, so listeners need nothing from :mod:`broker`. The value types
(:class:`Bind`, :class:`ProxyProtocolMode`, :data:`UNLIMITED`) are defined here and re-exported by
``broker.settings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from listeners.address import Networks
from listeners.tls import ContextOptions

#: A listener's ``max_connections`` when the file says ``infinity``: no limit of our own.
UNLIMITED = 0


class ProxyProtocolMode(StrEnum):
    """``proxy_protocol`` of a listener: whether a PROXY header is required, optional or off."""

    OFF = "false"
    ON = "true"
    OPTIONAL = "optional"

    def dump(self) -> bool | str:
        """The value as written in YAML (``false``, ``true`` or ``optional``)."""
        return {"false": False, "true": True}.get(self.value, self.value)


@dataclass(frozen=True, slots=True)
class Bind:
    """A listening address: ``host`` is an IP literal or ``""`` for every interface."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """Whether this binds every address of its family."""
        return self.host in ("", "0.0.0.0", "::")


class WebSocketOptions(Protocol):
    """What a WebSocket listener reads of ``listeners.<ws|wss>.<name>.websocket``."""

    @property
    def mqtt_path(self) -> str:
        """The one HTTP path served; others get 404."""

    @property
    def proxy_address_header(self) -> str:
        """The header naming the client (``X-Forwarded-For``...), or ``""``: not read."""

    @property
    def proxy_port_header(self) -> str:
        """The header giving the client's port (``X-Forwarded-Port``), or ``""``."""


class SslOptions(ContextOptions, Protocol):
    """What a TLS listener reads of ``listeners.<ssl|wss>.<name>.ssl_options``."""

    @property
    def handshake_timeout(self) -> float:
        """Seconds a client has to complete the TLS handshake."""


class ListenerOptions(Protocol):
    """What a listener reads of its settings (``broker.settings.ListenerSettings``)."""

    @property
    def id(self) -> str:
        """``type:name``, how logs and metrics name the listener."""

    @property
    def type(self) -> str:
        """``tcp``, ``ssl``, ``ws`` or ``wss``."""

    @property
    def name(self) -> str:
        """The listener's name under its type."""

    @property
    def bind(self) -> Bind:
        """Where to listen."""

    @property
    def max_connections(self) -> int:
        """Connections open at once, :data:`UNLIMITED` for no limit."""

    @property
    def proxy_protocol(self) -> ProxyProtocolMode:
        """Whether a PROXY header is read."""

    @property
    def proxy_protocol_timeout(self) -> float:
        """Seconds a connection has to send its whole PROXY header."""

    @property
    def trusted_proxies(self) -> Networks:
        """Peers allowed to name the client (PROXY header, address headers)."""

    @property
    def websocket(self) -> WebSocketOptions | None:
        """WebSocket options (``ws``/``wss`` listeners only)."""

    @property
    def ssl_options(self) -> SslOptions | None:
        """TLS options (``ssl``/``wss`` listeners only)."""
