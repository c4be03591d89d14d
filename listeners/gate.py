"""The trust rules of a listener's ``proxy_protocol`` setting, as pure code (ARCHITECTURE.md "Trust rules").

:class:`ProxyGate` is fed the first bytes of a connection and decides: a PROXY header to honour, no
header (the bytes are the client's own stream), or a refusal with a reason. The TCP listener feeds it
from ``data_received`` under ``proxy_protocol_timeout`` (TLS listeners: from the socket, before the
handshake); the WebSocket listener does the same before the HTTP request reaches the protocol.

Refusal reasons (metrics label, besides the parser's own ``v1_*`` / ``v2_*`` / ``not_proxy_protocol``):

``untrusted_proxy``   ``proxy_protocol: true`` with ``trusted_proxies`` set, and the peer is not in it
                      (refused before a byte is read)
``untrusted_header``  ``proxy_protocol: optional``: a PROXY header from a peer not in
                      ``trusted_proxies`` is a spoofing attempt
"""

from __future__ import annotations

from typing import Final

from listeners.address import AddressSource, ClientAddress, Networks, normalize_ip
from listeners.errors import ProxyProtocolError
from listeners.options import UNLIMITED, ListenerOptions, ProxyProtocolMode
from listeners.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    NEED_DATA,
    Detection,
    NeedData,
    ProxyHeader,
    ProxyHeaderParser,
    detect,
)
from listeners.tls import TlsInfo

#: Largest v2 header a listener accepts. HAProxy's biggest (SSL TLVs with a long CN, a 128-byte
#: UNIQUE_ID, AUTHORITY) stays well under 1 KiB; buffering up to the 64 KiB the length field allows
#: would let any peer pin that much memory per connection before it is refused.
MAX_V2_LENGTH: Final = DEFAULT_MAX_V2_LENGTH

GateResult = NeedData | tuple[ProxyHeader | None, bytes]


def peer_refusal(mode: ProxyProtocolMode, trusted: Networks, peer_ip: str) -> ProxyProtocolError | None:
    """Whether a peer must be refused before a byte is read from it (``untrusted_proxy``).

    With ``proxy_protocol: true`` and ``trusted_proxies`` set, only those proxies may connect at
    all. With it empty every peer counts as trusted (EMQX's behaviour). Never raises.
    """
    if mode is ProxyProtocolMode.ON and trusted and not trusted.contains(peer_ip):
        return ProxyProtocolError(
            "untrusted_proxy", f"peer {peer_ip} is not in trusted_proxies (proxy_protocol: true)"
        )
    return None


def refusal_at_accept(settings: ListenerOptions, current: int, peer_ip: str) -> tuple[str, str] | None:
    """``(reason, message)`` when a just-accepted connection must be dropped before a byte is read:
    ``max_connections`` reached (``current`` connections open besides it) or an untrusted peer
    (:func:`peer_refusal`); ``None`` admits it. Never raises.
    """
    limit = settings.max_connections
    if limit != UNLIMITED and current >= limit:
        return "max_connections", f"max_connections ({limit}) reached"
    refusal = peer_refusal(settings.proxy_protocol, settings.trusted_proxies, peer_ip)
    return None if refusal is None else (refusal.reason, str(refusal))


class ProxyGate:
    """Reads the PROXY header (or its absence) at the start of one connection.

    ``feed`` returns :data:`~listeners.proxy_protocol.NEED_DATA` until it can decide, then
    ``(header, rest)``: ``header`` is ``None`` when the connection carries no header (``optional``
    mode and bytes without the signature), and ``rest`` is every byte of the client's own stream
    received so far.
    """

    __slots__ = ("_buffer", "_mode", "_parser", "_peer_ip", "_peer_trusted", "_trusted")

    def __init__(self, mode: ProxyProtocolMode, trusted: Networks, peer_ip: str) -> None:
        self._mode = mode
        self._trusted = trusted
        self._peer_ip = peer_ip
        self._peer_trusted = not trusted or trusted.contains(peer_ip)
        self._parser: ProxyHeaderParser | None = None
        self._buffer = b""
        if mode is ProxyProtocolMode.ON:
            self._parser = ProxyHeaderParser(max_v2_length=MAX_V2_LENGTH)

    def fresh(self) -> ProxyGate:
        """A new gate with the same rules, for re-reading a connection's first bytes from the start."""
        return ProxyGate(self._mode, self._trusted, self._peer_ip)

    def feed(self, data: bytes) -> GateResult:
        """Take the next bytes of the connection.

        Raises:
            ProxyProtocolError: the header is malformed (the parser's reason), absent where
                required (``not_proxy_protocol``), or sent by an untrusted peer in ``optional``
                mode (``untrusted_header``).
        """
        if self._mode is ProxyProtocolMode.OFF:
            return None, data
        if self._parser is None:
            self._buffer += data
            found = detect(self._buffer)
            if found is Detection.NEED_DATA:
                return NEED_DATA
            if found is Detection.NONE:
                return None, self._buffer
            if not self._peer_trusted:
                raise ProxyProtocolError(
                    "untrusted_header",
                    f"PROXY {'v1' if found is Detection.V1 else 'v2'} header from {self._peer_ip}, "
                    "which is not in trusted_proxies: refused as a spoofing attempt",
                )
            self._parser = ProxyHeaderParser(max_v2_length=MAX_V2_LENGTH)
            data, self._buffer = self._buffer, b""
        return self._parser.feed(data)


def client_address(header: ProxyHeader | None, peer_ip: str, peer_port: int) -> ClientAddress:
    """The client a connection stands for, given its PROXY header (or none).

    A header with a TCP source address names the client and the socket peer becomes the proxy;
    ``LOCAL`` (health checks), v1 ``UNKNOWN``, ``UNSPEC`` and ``UNIX`` carry no usable address, so
    the socket's own peer is the client. Never raises (the parser validated the addresses).
    """
    if header is None:
        return ClientAddress.direct(peer_ip, peer_port)
    details = header.as_dict()
    ssl_tlv = header.ssl
    tls = None
    if ssl_tlv is not None and ssl_tlv.client_ssl:
        tls = TlsInfo(
            version=ssl_tlv.version,
            cert_cn=ssl_tlv.cn,
            cert_verified=ssl_tlv.cert_verified,
            source="proxy_protocol",
        )
    if not header.has_address or header.src_addr is None or header.src_port is None:
        return ClientAddress(
            ip=normalize_ip(peer_ip), port=peer_port, details={"proxy_protocol": details}, tls=tls
        )
    source = AddressSource.PROXY_PROTOCOL_V1 if header.version == 1 else AddressSource.PROXY_PROTOCOL_V2
    return ClientAddress(
        ip=normalize_ip(header.src_addr),
        port=header.src_port,
        source=source,
        proxy_ip=normalize_ip(peer_ip),
        proxy_port=peer_port,
        details={"proxy_protocol": details},
        tls=tls,
    )
