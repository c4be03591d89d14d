"""Who is on the other end of a connection: the real client, and the proxy it came through.

Pure code, no I/O. A :class:`ClientAddress` is made by a listener once per connection and handed
with the connection to the engine; it is what ``clients show``, access control, the audit log and
metrics report.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from listeners.tls import TlsInfo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressSource(StrEnum):
    """How the client's address was learned."""

    SOCKET = "socket"
    PROXY_PROTOCOL_V1 = "proxy_protocol_v1"
    PROXY_PROTOCOL_V2 = "proxy_protocol_v2"
    X_FORWARDED_FOR = "x_forwarded_for"
    X_REAL_IP = "x_real_ip"
    FORWARDED = "forwarded"


@functools.lru_cache(maxsize=4096)
def normalize_ip(text: str) -> str:
    """Return the canonical text of an IP address; IPv4-mapped IPv6 becomes plain IPv4.

    A dual-stack socket reports an IPv4 peer as ``::ffff:a.b.c.d``; access rules and reports must
    see ``a.b.c.d``. A zone index (``fe80::1%eth0``) is kept.

    Cached: the same load balancers and clients come back again and again.

    Raises:
        ValueError: ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def format_hostport(ip: str, port: int) -> str:
    """``1.2.3.4:5`` or ``[::1]:5``, the form used in logs and ``clients show``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The real client of one connection, and the proxy (socket peer) it came through.

    ``proxy_ip``/``proxy_port`` are ``None`` when the client connected directly (``source`` is
    ``SOCKET``). ``details`` holds what the proxy told besides the address (PROXY v2 TLVs, the
    forwarded chain), for reports; it is never used for decisions.
    """

    ip: str
    port: int
    source: AddressSource = AddressSource.SOCKET
    proxy_ip: str | None = None
    proxy_port: int | None = None
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: The client's TLS session: our own handshake, or what a trusted proxy said in PROXY v2.
    tls: TlsInfo | None = None

    @classmethod
    def direct(cls, ip: str, port: int) -> ClientAddress:
        """The socket peer is the client."""
        return cls(ip=normalize_ip(ip), port=port)

    @property
    def peername(self) -> str:
        """``ip:port`` of the real client."""
        return format_hostport(self.ip, self.port)

    @property
    def proxy_name(self) -> str | None:
        """``ip:port`` of the proxy, or ``None`` for a direct client."""
        if self.proxy_ip is None or self.proxy_port is None:
            return None
        return format_hostport(self.proxy_ip, self.proxy_port)

    def describe(self) -> str:
        """One log-friendly phrase naming the client and the proxy together."""
        proxy = self.proxy_name
        if proxy is None:
            return self.peername
        return f"{self.peername} via {proxy} ({self.source})"


class Networks:
    """An immutable set of IP networks with fast membership tests for addresses given as text.

    Used for ``trusted_proxies`` and access lists. IPv4-mapped IPv6 addresses match their IPv4
    networks.
    """

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(networks)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Networks:
        """Build from CIDR strings or bare addresses (a bare address is a /32 or /128).

        Raises:
            ValueError: an entry is not a network, or has host bits set (``10.0.0.1/8``);
                the message names the entry.
        """
        networks = []
        for entry in entries:
            networks.append(parse_network(entry))
        return cls(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __iter__(self) -> Any:
        return iter(self._networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Networks) and self._networks == other._networks

    def __hash__(self) -> int:
        return hash(self._networks)

    def __repr__(self) -> str:
        return f"Networks({[str(n) for n in self._networks]!r})"

    def contains(self, ip: str | IPAddress) -> bool:
        """Whether ``ip`` is in one of the networks; text that is not an address is never in.

        Never raises.
        """
        if isinstance(ip, str):
            try:
                address: IPAddress = ipaddress.ip_address(ip)
            except ValueError:
                return False
        else:
            address = ip
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    __contains__ = contains


def parse_network(entry: str) -> IPNetwork:
    """Parse one CIDR (``10.0.0.0/8``, ``fd00::/8``) or bare address.

    Strict: host bits must be zero, so a typo like ``10.0.0.1/8`` is an error instead of
    silently trusting a whole /8. An IPv4-mapped network (``::ffff:10.0.0.0/104``) becomes the IPv4
    one, because addresses are matched in IPv4 form (an IPv6 network wider than the mapped range,
    such as ``::/0``, matches IPv6 clients only).

    Raises:
        ValueError: ``entry`` is not a network; the message quotes it.
    """
    if not isinstance(entry, str):
        raise ValueError(f"{entry!r} is not a network (expected a string like '10.0.0.0/8')")
    try:
        network = ipaddress.ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        detail = "has host bits set" if "host bits" in str(exc) else "is not a network"
        raise ValueError(f"{entry!r} {detail}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        # Addresses are compared in IPv4 form (normalize_ip), so an IPv4-mapped network must be too,
        # or a deny list written that way would never match.
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
