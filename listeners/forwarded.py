"""The real client of a WebSocket upgrade request, from X-Forwarded-For, X-Real-IP or Forwarded headers.

Pure code, no I/O: :func:`resolve` takes the socket peer, the request's raw header list and the
listener's :class:`HeaderRules`, and returns a :class:`Resolution` or raises
:class:`~listeners.errors.ForwardedHeaderError`. The WebSocket listener answers such an error with
HTTP 400 and logs it; it never falls back to the proxy's address.

Which syntax is parsed is chosen by the name of the configured address header:

- ``Forwarded``: RFC 7239 (``for=192.0.2.43;proto=https, for="[2001:db8::17]:4711"``);
- ``X-Real-IP``: exactly one address, on one header line;
- anything else (``X-Forwarded-For``, ``X-Client-IP``, ``CF-Connecting-IP``...): a comma-separated
  address list, leftmost = farthest from us, each proxy appending the address it received from.

Trust (ARCHITECTURE.md, "Trust rules"):

- No address header configured: the socket peer is the client; headers are not read at all.
- ``trusted_proxies`` set and the socket peer not in it: headers are ignored entirely, so a client
  that connects directly cannot forge its address.
- Header absent: the socket peer is the client, in every mode. A trusted proxy that omits the header
  is thereby taken as the client; that is not an error (health checks, internal clients).
- ``trusted_proxies`` empty ("leftmost" mode, EMQX's rule): the leftmost entry is the client. Only
  safe when the outermost load balancer overwrites the header. The whole list is checked: every
  entry must be a well-formed node (an address, ``unknown`` or an obfuscated identifier), and the
  leftmost must be an address.
- ``trusted_proxies`` set and the peer trusted ("walk" mode, NGINX ``real_ip_recursive on``, uvicorn):
  the list is walked right to left, entries in ``trusted_proxies`` are skipped, and the first other
  entry is the client. If every entry is trusted, the leftmost one is the client (as NGINX does).
  Every entry met by the walk must be well-formed and must be an address. Entries left of the chosen
  client were written by the client and are not interpreted: they may be any text, except that the
  list structure (no empty entry; for ``Forwarded`` the element/parameter grammar, a ``for=`` in
  every element, no repeated parameter), the size and hop limits and the character rules (no control
  character, nothing outside printable ASCII) apply to the whole header. A client that breaks them
  only gets its own request refused.

Addresses (one list entry, or the value of ``for=``): ``192.0.2.1``, ``192.0.2.1:4711`` (port with
IPv4 only), ``[2001:db8::1]``, ``[2001:db8::1]:4711``, and, except in ``Forwarded`` (RFC 7239 §6
requires brackets), bare ``2001:db8::1``, always read as an address without port: a bare IPv6
address followed by a port is ambiguous. Spaces and tabs around an entry are trimmed (never inside a
``Forwarded`` quoted-string). IPv4-mapped IPv6 becomes IPv4. Zone ids (``fe80::1%eth0``), leading
zeros in IPv4 (``010.0.0.1``) and IPv4 in brackets are refused. A port is 1 to 5 ASCII digits with
a value 1-65535. ``unknown`` (any case) and RFC 7239 obfuscated identifiers (``_hidden``) are
well-formed but are not addresses: the client's address is not known, so the request is refused
(``unknown_address``) when such an entry is the one chosen, or is met by the walk. An obfuscated
port (``192.0.2.1:_p1``) leaves the port unknown (0).

Port:

1. If the chosen entry carries a port (``ip:port``, ``[v6]:port``, ``for="ip:port"``), it is used.
2. ``Forwarded``: the port comes only from ``for=``; the port header is never read (0 when absent).
3. Otherwise, if a port header is configured and present, its lines are joined with ``,`` and split
   into a port list (same limits and character rules as the address header; no empty entry). With
   ``N`` addresses, ``M`` ports and the chosen hop ``h`` (0 = leftmost):
   - ``M == N``: the port at index ``h`` (both lists appended by the same proxies);
   - ``M == 1``: the single port was set by the outermost proxy (``X-Forwarded-Port $remote_port``,
     inner tiers passing it on) and belongs to the address that proxy saw: the leftmost entry in
     leftmost mode (``h == 0``), the chosen hop in walk mode, where the chosen hop is the entry the
     outermost trusted proxy appended. It is used as is;
   - otherwise the lists are aligned on the right (the innermost proxies append to both): the port at
     index ``h - (N - M)``, or 0 when that index is outside the port list.
   Only the port picked is interpreted; a malformed one is refused (``bad_port``).
4. Otherwise 0. When the header was not used (``SOCKET``), the peer's own port.

Reason codes of :class:`~listeners.errors.ForwardedHeaderError` (metrics label):

``header_too_long``      the joined header is longer than :data:`MAX_HEADER_BYTES`
``too_many_hops``        the list has more than :data:`MAX_HOPS` entries
``control_character``    a control character (CR, LF, NUL, DEL, C1...; TAB is allowed) anywhere
``non_ascii``            a character outside printable ASCII anywhere
``multiple_values``      X-Real-IP given on several lines, or holding several comma-separated values
``empty_entry``          an empty list entry (``a,,b``, trailing comma, empty or blank header)
``malformed_address``    an entry that is not a well-formed address or node
``bad_port``             a port that is not 1-65535 (in an entry or in the port header)
``unknown_address``      the entry chosen or walked is ``unknown`` or an obfuscated identifier
``forwarded_syntax``     a Forwarded header that does not follow RFC 7239 §4
``missing_for``          a Forwarded element without ``for=``
``duplicate_parameter``  a Forwarded element with the same parameter twice (RFC 7239 §4)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from listeners.address import AddressSource, Networks, normalize_ip
from listeners.errors import ForwardedHeaderError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HOPS",
    "HeaderRules",
    "Resolution",
    "resolve",
]

# A header (all its lines joined) longer than this is refused before it is parsed: it bounds the work
# per request. NGINX's default large_client_header_buffers line is 8 KiB too, and 64 hops of the
# longest bracketed IPv6 address with port fit in it with room to spare.
MAX_HEADER_BYTES = 8 * 1024

# More list entries than this are refused: no real deployment has 64 proxy tiers, and the walk, the
# per-entry parsing and the chain kept for reports stay small.
MAX_HOPS = 64

# RFC 9110 §5.6.2 token characters: header names, Forwarded parameter names and unquoted values.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# C0 controls except TAB (CR/LF/NUL split or truncate headers and log lines), DEL and the C1 block
# (NEL is a line break to some readers).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Anything else outside TAB and printable ASCII: no proxy writes it into these headers, and the chain
# ends up in logs and JSON reports (a websockets header value carries raw bytes as lone surrogates).
_NON_ASCII_RE = re.compile(r"[^\t\x20-\x7e]")
# RFC 7239 §6.3 obfnode and §6.2 obfport.
_OBFUSCATED_RE = re.compile(r"_[A-Za-z0-9._-]+")
# RFC 7239 §6 port = 1*5DIGIT; [0-9] rather than \d, which matches non-ASCII digits.
_PORT_RE = re.compile(r"[0-9]{1,5}")
_OWS = " \t"

_X_REAL_IP = "x-real-ip"
_FORWARDED = "forwarded"


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """How one WebSocket listener learns the client's address from request headers.

    ``address_header`` (``""`` = off) names the header carrying the address; its name chooses the
    syntax (see the module docstring). ``port_header`` (``""`` = off) names a header carrying the
    port (``X-Forwarded-Port``); it is ignored for ``Forwarded`` and when ``address_header`` is off.
    ``trusted_proxies`` empty means EMQX's leftmost rule; set, it enables the right-to-left walk and
    headers from any other peer are ignored. Header names are compared case-insensitively.

    Raises:
        ValueError: a header name is neither ``""`` nor an HTTP token (RFC 9110 §5.6.2).
    """

    address_header: str = ""
    port_header: str = ""
    trusted_proxies: Networks = field(default_factory=Networks)

    def __post_init__(self) -> None:
        for label, name in (("address_header", self.address_header), ("port_header", self.port_header)):
            if not isinstance(name, str) or (name and not _TOKEN_RE.fullmatch(name)):
                raise ValueError(f"{label} {name!r} is not an HTTP header name (e.g. 'X-Forwarded-For')")
        if not isinstance(self.trusted_proxies, Networks):
            raise ValueError(f"trusted_proxies must be Networks, not {type(self.trusted_proxies).__name__}")

    @classmethod
    def from_values(
        cls,
        address_header: str = "",
        port_header: str = "",
        trusted_proxies: Networks | Iterable[str] = (),
    ) -> HeaderRules:
        """Build from plain settings values; ``trusted_proxies`` may be CIDR strings.

        Raises:
            ValueError: a header name is not a token, or a ``trusted_proxies`` entry is not a network
                (see :meth:`Networks.parse`).
        """
        networks = (
            trusted_proxies if isinstance(trusted_proxies, Networks) else Networks.parse(trusted_proxies)
        )
        return cls(address_header=address_header, port_header=port_header, trusted_proxies=networks)

    @property
    def enabled(self) -> bool:
        """Whether an address header is configured at all."""
        return bool(self.address_header)

    @property
    def source(self) -> AddressSource:
        """The syntax of the address header, as reported when it is used; ``SOCKET`` when off."""
        name = self.address_header.lower()
        if not name:
            return AddressSource.SOCKET
        if name == _FORWARDED:
            return AddressSource.FORWARDED
        if name == _X_REAL_IP:
            return AddressSource.X_REAL_IP
        return AddressSource.X_FORWARDED_FOR


@dataclass(frozen=True, slots=True)
class Resolution:
    """Who the client is, as learned from the socket peer and the request headers.

    ``ip`` is normalized (:func:`~listeners.address.normalize_ip`); ``port`` is 0 when unknown.
    ``source`` is ``SOCKET`` when the headers were not used. ``chain`` is the address list as parsed
    (trimmed entries, or the ``for=`` values of a Forwarded header), left to right, for reports; it
    holds client-written text and is never used for decisions. ``hop`` is the index in ``chain`` of the
    entry chosen, ``None`` for ``SOCKET``.
    """

    ip: str
    port: int
    source: AddressSource = AddressSource.SOCKET
    chain: tuple[str, ...] = ()
    hop: int | None = None


@dataclass(frozen=True, slots=True)
class _Node:
    """One parsed list entry. ``ip`` is ``None`` for ``unknown`` and obfuscated identifiers."""

    ip: str | None
    port: int
    has_port: bool


def resolve(
    peer_ip: str,
    peer_port: int,
    headers: Iterable[tuple[str, str]],
    rules: HeaderRules,
) -> Resolution:
    """Return the real client of a request that arrived from ``peer_ip``:``peer_port``.

    ``headers`` is the request's raw header list in order, repeated names included; it is iterated
    at most once, and not at all when the headers are not to be used.

    Raises:
        ForwardedHeaderError: the headers are to be used and are malformed, over a limit, or do not
            name a known address; ``reason`` says which (see the module docstring).
        ValueError: ``peer_ip`` is not an IP address (a bug in the caller).
    """
    peer = normalize_ip(peer_ip)
    direct = Resolution(ip=peer, port=peer_port)
    if not rules.address_header:
        return direct
    if rules.trusted_proxies and peer not in rules.trusted_proxies:
        return direct

    address_name = rules.address_header.lower()
    port_name = rules.port_header.lower()
    address_lines: list[str] = []
    port_lines: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == address_name:
            address_lines.append(value)
        elif port_name and lowered == port_name:
            port_lines.append(value)
    if not address_lines:
        return direct

    source = rules.source
    header = rules.address_header
    if source is AddressSource.X_REAL_IP and len(address_lines) > 1:
        raise ForwardedHeaderError(
            "multiple_values", f"{header}: {len(address_lines)} header lines, expected exactly one"
        )
    value = _join(address_lines, header)

    if source is AddressSource.X_REAL_IP and "," in value:
        raise ForwardedHeaderError(
            "multiple_values", f"{header}: {value!r} holds several comma-separated values, expected one"
        )
    if source is AddressSource.FORWARDED:
        chain = _split_forwarded(value, header)
    else:
        chain = _split_list(value, header)

    strict_ipv6 = source is AddressSource.FORWARDED
    if rules.trusted_proxies:
        hop, ip, node = _walk(chain, rules.trusted_proxies, header, strict_ipv6)
    else:
        hop, ip, node = _leftmost(chain, header, strict_ipv6)

    if node.has_port or source is AddressSource.FORWARDED:
        port = node.port
    elif port_name and port_lines:
        port = _port_from_header(port_lines, rules.port_header, hop, len(chain))
    else:
        port = 0
    return Resolution(ip=ip, port=port, source=source, chain=chain, hop=hop)


def _join(lines: Sequence[str], header: str) -> str:
    """Join header lines in order (RFC 9110 §5.3), checking the size and character rules first.

    Raises:
        ForwardedHeaderError: ``header_too_long``, ``control_character`` or ``non_ascii``.
    """
    size = sum(len(line) for line in lines) + len(lines) - 1
    if size > MAX_HEADER_BYTES:
        raise ForwardedHeaderError(
            "header_too_long", f"{header}: {size} bytes, more than the limit of {MAX_HEADER_BYTES}"
        )
    value = ",".join(lines)
    bad = _CONTROL_RE.search(value)
    if bad is not None:
        raise ForwardedHeaderError(
            "control_character", f"{header}: control character {bad.group()!r} at offset {bad.start()}"
        )
    bad = _NON_ASCII_RE.search(value)
    if bad is not None:
        raise ForwardedHeaderError(
            "non_ascii", f"{header}: non-ASCII character {bad.group()!r} at offset {bad.start()}"
        )
    return value


def _split_list(value: str, header: str) -> tuple[str, ...]:
    """Split a comma-separated list into trimmed entries.

    Raises:
        ForwardedHeaderError: ``too_many_hops`` or ``empty_entry``.
    """
    count = value.count(",") + 1
    if count > MAX_HOPS:
        raise ForwardedHeaderError(
            "too_many_hops", f"{header}: {count} entries, more than the limit of {MAX_HOPS}"
        )
    entries = tuple(entry.strip(_OWS) for entry in value.split(","))
    for index, entry in enumerate(entries):
        if not entry:
            raise ForwardedHeaderError(
                "empty_entry", f"{header}: entry {index} of {len(entries)} is empty in {value!r}"
            )
    return entries


def _split_forwarded(value: str, header: str) -> tuple[str, ...]:
    """Parse an RFC 7239 §4 Forwarded header; return the ``for=`` value of each element, unquoted.

    Grammar: ``1#forwarded-element``; ``forwarded-element = [pair] *(";" [pair])``;
    ``pair = token "=" (token / quoted-string)``. Spaces and tabs are allowed around ``,`` and ``;``
    (not around ``=``). Parameter names are case-insensitive; only ``for`` is used, the others must
    only be well-formed.

    Raises:
        ForwardedHeaderError: ``forwarded_syntax``, ``empty_entry``, ``missing_for``,
            ``duplicate_parameter`` or ``too_many_hops``.
    """
    end = len(value)
    chain: list[str] = []
    i = 0
    while True:
        if len(chain) == MAX_HOPS:
            raise ForwardedHeaderError(
                "too_many_hops", f"{header}: more than the limit of {MAX_HOPS} elements"
            )
        i = _skip_ows(value, i)
        if i == end or value[i] == ",":
            raise ForwardedHeaderError(
                "empty_entry", f"{header}: element {len(chain)} is empty at offset {i} in {value!r}"
            )
        params: dict[str, str] = {}
        while True:
            i = _skip_ows(value, i)
            if i < end and value[i] not in ",;":
                name, text, i = _pair(value, i, header)
                if name in params:
                    raise ForwardedHeaderError(
                        "duplicate_parameter",
                        f"{header}: parameter {name!r} given twice in element {len(chain)}",
                    )
                params[name] = text
                i = _skip_ows(value, i)
            if i < end and value[i] == ";":
                i += 1
                continue
            break
        if i < end and value[i] != ",":
            raise ForwardedHeaderError(
                "forwarded_syntax", f"{header}: unexpected {value[i]!r} at offset {i}, expected ';' or ','"
            )
        if "for" not in params:
            raise ForwardedHeaderError("missing_for", f"{header}: element {len(chain)} has no 'for='")
        chain.append(params["for"])
        if i == end:
            return tuple(chain)
        i += 1


def _pair(value: str, start: int, header: str) -> tuple[str, str, int]:
    """Parse ``token=value`` at ``start``; return the lower-cased name, the value and the next offset.

    Raises:
        ForwardedHeaderError: ``forwarded_syntax``.
    """
    end = len(value)
    i = start
    while i < end and value[i] in _TCHAR:
        i += 1
    if i == start:
        raise ForwardedHeaderError(
            "forwarded_syntax", f"{header}: expected a parameter name at offset {start}, got {value[start]!r}"
        )
    name = value[start:i].lower()
    if i == end or value[i] != "=":
        raise ForwardedHeaderError(
            "forwarded_syntax", f"{header}: expected '=' after parameter {name!r} at offset {i}"
        )
    i += 1
    if i < end and value[i] == '"':
        text, i = _quoted_string(value, i, header)
        return name, text, i
    token_start = i
    while i < end and value[i] in _TCHAR:
        i += 1
    if i == token_start:
        raise ForwardedHeaderError(
            "forwarded_syntax",
            f"{header}: parameter {name!r} needs a token or a quoted-string at offset {token_start}",
        )
    return name, value[token_start:i], i


def _quoted_string(value: str, start: int, header: str) -> tuple[str, int]:
    """Unquote the RFC 9110 §5.6.4 quoted-string opening at ``start``; return it and the next offset.

    Control and non-ASCII characters were refused before, so every other character is valid qdtext
    or a valid quoted-pair.

    Raises:
        ForwardedHeaderError: ``forwarded_syntax`` (no closing quote).
    """
    end = len(value)
    out: list[str] = []
    i = start + 1
    while i < end:
        char = value[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\\":
            if i + 1 == end:
                break
            out.append(value[i + 1])
            i += 2
        else:
            out.append(char)
            i += 1
    raise ForwardedHeaderError(
        "forwarded_syntax", f"{header}: quoted-string opened at offset {start} is not closed"
    )


def _skip_ows(value: str, i: int) -> int:
    end = len(value)
    while i < end and value[i] in _OWS:
        i += 1
    return i


def _leftmost(chain: tuple[str, ...], header: str, strict_ipv6: bool) -> tuple[int, str, _Node]:
    """EMQX's rule: every entry must be well-formed, and the leftmost must be an address.

    Returns the hop (0), the client's address and its node.

    Raises:
        ForwardedHeaderError: ``malformed_address``, ``bad_port`` or ``unknown_address``.
    """
    nodes = [_parse_node(entry, header, index, strict_ipv6) for index, entry in enumerate(chain)]
    return 0, _known(nodes[0], chain, 0, header), nodes[0]


def _walk(
    chain: tuple[str, ...], trusted: Networks, header: str, strict_ipv6: bool
) -> tuple[int, str, _Node]:
    """NGINX ``real_ip_recursive on``: the rightmost entry not in ``trusted``; else the leftmost.

    Returns the hop chosen, the client's address and its node.

    Raises:
        ForwardedHeaderError: ``malformed_address``, ``bad_port`` or ``unknown_address``, for an entry
            met by the walk; entries left of the client are not interpreted.
    """
    index = len(chain) - 1
    while True:
        node = _parse_node(chain[index], header, index, strict_ipv6)
        ip = _known(node, chain, index, header)
        if index == 0 or ip not in trusted:
            return index, ip, node
        index -= 1


def _known(node: _Node, chain: tuple[str, ...], index: int, header: str) -> str:
    """The address of ``node``.

    Raises:
        ForwardedHeaderError: ``unknown_address``: ``node`` is ``unknown`` or obfuscated.
    """
    if node.ip is None:
        raise ForwardedHeaderError(
            "unknown_address",
            f"{header}: entry {index} {chain[index]!r} hides the address, so the client is not known",
        )
    return node.ip


def _parse_node(text: str, header: str, index: int, strict_ipv6: bool) -> _Node:
    """Parse one entry: an address with optional port, ``unknown`` or an obfuscated identifier.

    ``strict_ipv6`` (Forwarded, RFC 7239 §6) refuses IPv6 addresses without brackets.

    Raises:
        ForwardedHeaderError: ``malformed_address`` or ``bad_port``.
    """
    port_text: str | None = None
    ip: str | None
    if text.startswith("["):
        close = text.find("]")
        rest = text[close + 1 :] if close >= 0 else ""
        if close < 0 or (rest and not rest.startswith(":")):
            raise _malformed(
                text, header, index, "a '[' must be closed by ']' followed by nothing or ':port'"
            )
        port_text = rest[1:] if rest else None
        ip = _ipv6(text[1:close], text, header, index)
    elif text.count(":") >= 2:
        if strict_ipv6:
            raise _malformed(text, header, index, "an IPv6 address must be in brackets (RFC 7239 §6)")
        ip = _ipv6(text, text, header, index)
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
        if host.lower() == "unknown" or _OBFUSCATED_RE.fullmatch(host):
            ip = None
        else:
            try:
                ip = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise _malformed(text, header, index, "not an IP address") from None
    if port_text is None:
        return _Node(ip=ip, port=0, has_port=False)
    if _OBFUSCATED_RE.fullmatch(port_text):
        return _Node(ip=ip, port=0, has_port=True)
    return _Node(ip=ip, port=_parse_port(port_text, f"{header}: entry {index} {text!r}"), has_port=True)


def _ipv6(host: str, text: str, header: str, index: int) -> str:
    """The normalized text of an IPv6 address (IPv4-mapped becomes IPv4).

    Raises:
        ForwardedHeaderError: ``malformed_address``, zone ids included.
    """
    if "%" in host:
        raise _malformed(text, header, index, "zone ids are not allowed")
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        raise _malformed(text, header, index, "not an IPv6 address") from None
    return normalize_ip(str(address))


def _malformed(text: str, header: str, index: int, why: str) -> ForwardedHeaderError:
    return ForwardedHeaderError("malformed_address", f"{header}: entry {index} {text!r}: {why}")


def _parse_port(text: str, where: str) -> int:
    """A port, 1 to 5 ASCII digits, 1-65535.

    Raises:
        ForwardedHeaderError: ``bad_port``.
    """
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ForwardedHeaderError("bad_port", f"{where}: port {text!r} is not 1-65535")
    return int(text)


def _port_from_header(lines: Sequence[str], header: str, hop: int, hops: int) -> int:
    """The port of the address at ``hop`` of ``hops`` from the port header (see the module docstring).

    Raises:
        ForwardedHeaderError: ``header_too_long``, ``control_character``, ``non_ascii``,
            ``too_many_hops``, ``empty_entry`` or ``bad_port``.
    """
    ports = _split_list(_join(lines, header), header)
    if len(ports) == hops:
        index = hop
    elif len(ports) == 1:
        index = 0
    else:
        index = hop - (hops - len(ports))
    if not 0 <= index < len(ports):
        return 0
    return _parse_port(ports[index], f"{header}: entry {index}")
