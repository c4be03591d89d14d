"""PROXY protocol v1 and v2 headers: detection, strict incremental parsing, and builders.

Sans-I/O: bytes in, a :class:`ProxyHeader` (plus the bytes that followed it) or ``NEED_DATA`` out.
The listener reads from the socket, applies the timeout and feeds :class:`ProxyHeaderParser`.

The reference is HAProxy's ``doc/proxy-protocol.txt`` (2020/03/05 revision); error messages cite
its sections. Strictness follows ranch's ``ranch_proxy_header``: a header that does not match the
spec exactly is refused, because the spec says so (2.1: "Any sequence which does not exactly
match the protocol must be discarded") and because a lenient parser of an address that is used for
access control is an attack surface.

Every error is a :class:`~listeners.errors.ProxyProtocolError` whose ``reason`` is one of
:data:`REASONS`. Errors are reported in stream order: the parser fails at the first byte from which
the header can no longer be valid, so the same input fails with the same reason however it is split
into reads.

Decisions where the spec leaves room:

* v1 ``UNKNOWN``: everything after the keyword up to CRLF is ignored, as 2.1 requires, but the
  line-level rules still hold there: US-ASCII only, no control characters, no lone CR or LF, and
  at most 107 bytes.
* v1 TCP6 addresses are whatever :class:`ipaddress.IPv6Address` accepts (so ``::ffff:1.2.3.4``
  is fine) minus zone ids; they are reported in compressed form, as v2 addresses are.
* v2: unassigned family and transport nibbles are refused even for LOCAL (2.2: they "must be
  rejected as invalid by receivers"). The address block size follows the family nibble for both
  commands; TLVs start after it. Addresses are decoded only for PROXY with a family and a transport
  that are both specified: for LOCAL and for UNSPEC "the receiver should ignore address information".
* v2 SSL sub-TLVs of unknown types are bounds-checked and ignored (2.2: a receiver "may choose to
  skip over and ignore the TLVs it is not interested in").
* v2 string TLVs that the spec calls US-ASCII (SSL version, cipher, algorithms, NETNS) are held to
  UTF-8, like AUTHORITY and CN: ASCII is a subset, and being stricter buys nothing for a report.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

from listeners.errors import ProxyProtocolError

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: Start of a v1 header (2.1). The space is part of it: ``PROXYx`` is not a v1 header.
V1_SIGNATURE: Final = b"PROXY "
#: The 12-byte v2 signature (2.2); its NUL and lone LF make it fail fast in text protocols.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

#: Longest v1 line including CRLF (2.1: the "worst case" UNKNOWN line); a receiver "should declare
#: the line invalid" when no CRLF is found within it. Also bounds what we buffer before CRLF.
V1_MAX_LENGTH: Final = 107
#: Fields of a v1 TCP4/TCP6 line after ``PROXY``: family, two addresses, two ports (2.1).
V1_FIELD_COUNT: Final = 5

#: Fixed part of a v2 header: signature, version/command, family/transport, length (2.2).
V2_FIXED_LENGTH: Final = 16
#: Largest v2 header the wire format allows: the length field is 16 bits (2.2).
V2_MAX_LENGTH_CEILING: Final = V2_FIXED_LENGTH + 0xFFFF
#: Smallest ``max_v2_length`` accepted: an INET6 header without TLVs. A lower cap could never carry
#: an IPv6 client and is a configuration mistake, not a hardening.
V2_MAX_LENGTH_FLOOR: Final = V2_FIXED_LENGTH + 36
#: Default cap on a whole v2 header. Trusted load balancers send well under 1 KiB (addresses plus a
#: few TLVs: AWS NLB about 100 bytes); buffering up to the 64 KiB the length field allows, per
#: connection, before anything is validated is a memory amplification for whoever can connect.
DEFAULT_MAX_V2_LENGTH: Final = 4096

#: PP2_TYPE_UNIQUE_ID is "an opaque byte sequence of up to 128 bytes" (2.2.5).
UNIQUE_ID_MAX_LENGTH: Final = 128
#: HAProxy's PP2_AUTHORITY_MAX; a DNS name is at most 253 bytes (RFC 1035 2.3.4), SNI likewise.
AUTHORITY_MAX_LENGTH: Final = 255
#: The PP2_TYPE_SSL value starts with client (1 byte) and verify (4 bytes) (2.2.6).
SSL_FIXED_LENGTH: Final = 5

# TLV types (2.2, 2.2.6).
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

# Bits of the PP2_TYPE_SSL ``client`` field (2.2.6).
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

#: Every ``reason`` this module raises, with what it means.
REASONS: Final[dict[str, str]] = {
    "not_proxy_protocol": "the first bytes are neither 'PROXY ' nor the v2 signature",
    "parser_done": "the parser was fed again after it returned a header or raised",
    "v1_too_long": "no CRLF within the first 107 bytes of a v1 line",
    "v1_bad_line_ending": "a lone CR or LF in a v1 line",
    "v1_non_ascii": "a byte above 0x7F in a v1 line",
    "v1_bad_character": "a control character (tab, NUL, DEL...) in a v1 line",
    "v1_bad_separator": "an empty field: a double, leading or trailing space",
    "v1_bad_family": "the protocol field is not TCP4, TCP6 or UNKNOWN",
    "v1_bad_field_count": "a missing or extra field in a TCP4/TCP6 line",
    "v1_bad_address": "an address is not a strict IPv4/IPv6 address",
    "v1_family_mismatch": "an address of the other family than the protocol field says",
    "v1_bad_port": "a port is not a decimal 0-65535 without leading zeros",
    "v2_bad_version": "the version nibble is not 2",
    "v2_bad_command": "the command nibble is neither LOCAL nor PROXY",
    "v2_bad_family": "the address family nibble is unassigned",
    "v2_bad_transport": "the transport protocol nibble is unassigned",
    "v2_too_long": "the header is longer than max_v2_length",
    "v2_bad_length": "the length does not cover the address block of the family",
    "v2_tlv_overrun": "a TLV or SSL sub-TLV runs past the end of its container",
    "v2_duplicate_tlv": "a known TLV or SSL sub-TLV type appears twice",
    "v2_bad_crc32c": "the CRC32C TLV is not exactly 4 bytes",
    "v2_crc_mismatch": "the CRC32C checksum does not match the header",
    "v2_unique_id_too_long": "UNIQUE_ID is longer than 128 bytes",
    "v2_bad_ssl": "the SSL TLV is shorter than its 5-byte fixed part",
    "v2_bad_utf8": "a string TLV or SSL sub-TLV is not valid UTF-8",
    "v2_bad_authority": "AUTHORITY is empty, too long or holds control characters or spaces",
}

_SPEC: Final = "proxy-protocol.txt"
_CR: Final = 0x0D
_LF: Final = 0x0A
_SP: Final = 0x20
_DEL: Final = 0x7F

_V1_FAMILIES: Final = ("TCP4", "TCP6", "UNKNOWN")
# Lets a wrong protocol keyword fail on its first wrong byte instead of at the next space.
_V1_FAMILY_PREFIXES: Final = frozenset(
    word[:end].encode("ascii") for word in _V1_FAMILIES for end in range(1, len(word) + 1)
)
# 2.1: "exactly 4 integers in the range [0..255] ... Heading zeroes are not permitted".
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_STRICT_IPV4: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
# 2.1: ports "in the range [0..65535] ... Heading zeroes are not permitted"; no sign.
_STRICT_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")
_IPV6_TEXT: Final = re.compile(r"[0-9A-Fa-f:.]+")
# Printable ASCII other than space: what a v1 field is made of.
_V1_FIELD_RUN: Final = re.compile(rb"[\x21-\x7e]+")

_V2_COMMANDS: Final = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES: Final = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_V2_TRANSPORTS: Final = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
# Bytes of the address block per family (2.2, "union proxy_addr").
_V2_ADDRESS_LENGTHS: Final = {"UNSPEC": 0, "INET": 12, "INET6": 36, "UNIX": 216}
_UNIX_PATH_LENGTH: Final = 108
_PORTS: Final = struct.Struct("!HH")

_TLV_NAMES: Final = {
    PP2_TYPE_ALPN: "ALPN",
    PP2_TYPE_AUTHORITY: "AUTHORITY",
    PP2_TYPE_CRC32C: "CRC32C",
    PP2_TYPE_NOOP: "NOOP",
    PP2_TYPE_UNIQUE_ID: "UNIQUE_ID",
    PP2_TYPE_SSL: "SSL",
    PP2_TYPE_NETNS: "NETNS",
}
_SSL_SUBTYPE_NAMES: Final = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}
_SPEC_SECTIONS: Final = {
    PP2_TYPE_ALPN: "2.2.1",
    PP2_TYPE_AUTHORITY: "2.2.2",
    PP2_TYPE_CRC32C: "2.2.3",
    PP2_TYPE_NOOP: "2.2.4",
    PP2_TYPE_UNIQUE_ID: "2.2.5",
    PP2_TYPE_SSL: "2.2.6",
    PP2_TYPE_NETNS: "2.2.7",
}


#: What the parser accepts as input: whatever a socket read or a buffer hands over.
BytesLike: TypeAlias = bytes | bytearray | memoryview


def _error(reason: str, message: str, section: str) -> ProxyProtocolError:
    return ProxyProtocolError(reason, f"{message} ({_SPEC} {section})")


# --------------------------------------------------------------------------------------------------
# CRC32C (2.2.3: "as described in RFC4960, Appendix B")
# --------------------------------------------------------------------------------------------------


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of ``data``, as an unsigned int.

    ``crc32c(b"123456789") == 0xE3069283``. Never raises for bytes-like input.
    """
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc32c_of = crc32c  # build_v2's ``crc32c`` flag shadows the function inside it


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


class _NeedData(Enum):
    """Type of :data:`NEED_DATA`; an enum so that ``result is NEED_DATA`` narrows types."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`ProxyHeaderParser.feed` and :func:`parse` until a whole header is buffered.
NEED_DATA: Final = _NeedData.NEED_DATA
#: The type of :data:`NEED_DATA`, for annotations.
NeedData: TypeAlias = _NeedData


class Detection(Enum):
    """What :func:`detect` saw at the start of a connection."""

    V1 = "v1"
    V2 = "v2"
    NONE = "none"
    NEED_DATA = "need_data"


def detect(data: BytesLike) -> Detection:
    """Whether ``data`` starts a PROXY v1 or v2 header, cannot start one, or is too short to tell.

    Decides as early as possible: a first byte other than ``P`` or CR is :attr:`Detection.NONE`
    at once (an MQTT CONNECT starts with 0x10, a WebSocket handshake with ``GET ``). Only the first
    12 bytes are looked at. Never raises.
    """
    size = len(data)
    if size == 0:
        return Detection.NEED_DATA
    first = data[0]
    if first == V1_SIGNATURE[0]:
        signature, found = V1_SIGNATURE, Detection.V1
    elif first == V2_SIGNATURE[0]:
        signature, found = V2_SIGNATURE, Detection.V2
    else:
        return Detection.NONE
    head = bytes(data[: len(signature)])
    if head == signature:
        return found
    if len(head) < len(signature) and signature.startswith(head):
        return Detection.NEED_DATA
    return Detection.NONE


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLV:
    """One v2 Type-Length-Value entry as it was on the wire (2.2)."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV (2.2.6): how the client talked TLS to the proxy."""

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    @property
    def client_ssl(self) -> bool:
        """PP2_CLIENT_SSL: the client connected over SSL/TLS."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def client_cert_conn(self) -> bool:
        """PP2_CLIENT_CERT_CONN: the client presented a certificate on this connection."""
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def client_cert_sess(self) -> bool:
        """PP2_CLIENT_CERT_SESS: the client presented a certificate at least once in the TLS session."""
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def cert_verified(self) -> bool:
        """A client certificate was presented and the proxy verified it (``verify`` is 0)."""
        presented = self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        return self.verify == 0 and bool(presented)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary, for reports."""
        summary: dict[str, object] = {
            "client": self.client,
            "client_ssl": self.client_ssl,
            "client_cert_conn": self.client_cert_conn,
            "client_cert_sess": self.client_cert_sess,
            "verify": self.verify,
            "cert_verified": self.cert_verified,
        }
        for name in ("version", "cn", "cipher", "sig_alg", "key_alg"):
            value = getattr(self, name)
            if value is not None:
                summary[name] = value
        return summary


_ADDRESS_FAMILIES: Final = frozenset({"TCP4", "TCP6", "INET", "INET6"})


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``family`` is ``TCP4``/``TCP6``/``UNKNOWN`` for v1 and ``UNSPEC``/``INET``/``INET6``/``UNIX``
    for v2. Addresses and ports are ``None`` when the receiver must ignore them (LOCAL, UNKNOWN,
    UNSPEC); for UNIX the addresses are the socket paths (up to the first NUL, undecodable bytes
    backslash-escaped) and the ports ``None``. IPv6 addresses are in compressed form.

    ``tlvs`` holds every v2 TLV in wire order, known or not; the properties decode the known ones.
    ``length`` is how many bytes the header took on the wire.
    """

    version: int
    command: str
    family: str
    transport: str
    src_addr: str | None
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    tlvs: tuple[TLV, ...]
    length: int

    @property
    def has_address(self) -> bool:
        """Whether ``src_addr``/``src_port`` are the real client: the only case to use them."""
        return (
            self.command == "PROXY"
            and self.family in _ADDRESS_FAMILIES
            and self.src_addr is not None
            and self.src_port is not None
        )

    def tlv(self, type_: int) -> bytes | None:
        """Value of the first TLV of type ``type_``, or ``None``."""
        for entry in self.tlvs:
            if entry.type == type_:
                return entry.value
        return None

    @property
    def alpn(self) -> bytes | None:
        """PP2_TYPE_ALPN (2.2.1): the negotiated application protocol, raw."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY (2.2.2): the host name the client asked for (TLS SNI).

        Raises:
            ProxyProtocolError: only for a header not made by the parser, whose TLV is invalid.
        """
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else _decode_authority(value)

    @property
    def unique_id(self) -> bytes | None:
        """PP2_TYPE_UNIQUE_ID (2.2.5): the proxy's opaque connection id."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def crc32c(self) -> int | None:
        """PP2_TYPE_CRC32C (2.2.3): the checksum the header carried (the parser verified it)."""
        value = self.tlv(PP2_TYPE_CRC32C)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def netns(self) -> str | None:
        """PP2_TYPE_NETNS (2.2.7): the proxy-side network namespace name.

        Raises:
            ProxyProtocolError: only for a header not made by the parser, whose TLV is invalid.
        """
        value = self.tlv(PP2_TYPE_NETNS)
        return None if value is None else _decode_text(value, "NETNS", _SPEC_SECTIONS[PP2_TYPE_NETNS])

    @property
    def ssl(self) -> SSLInfo | None:
        """PP2_TYPE_SSL (2.2.6): the client's TLS session as the proxy saw it.

        Raises:
            ProxyProtocolError: only for a header not made by the parser, whose TLV is invalid.
        """
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _decode_ssl(value)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary for reports: the base fields, then the TLVs present, by name.

        Binary values are hex (``unique_id``, ``crc32c``, unknown TLVs); ALPN is text with
        non-ASCII bytes backslash-escaped. Unknown TLVs are listed under ``tlvs_unknown``.

        Raises:
            ProxyProtocolError: only for a header not made by the parser, whose TLVs are invalid.
        """
        summary: dict[str, object] = {
            "version": self.version,
            "command": self.command,
            "family": self.family,
            "transport": self.transport,
            "src_addr": self.src_addr,
            "src_port": self.src_port,
            "dst_addr": self.dst_addr,
            "dst_port": self.dst_port,
        }
        if (alpn := self.alpn) is not None:
            summary["alpn"] = alpn.decode("ascii", "backslashreplace")
        if (authority := self.authority) is not None:
            summary["authority"] = authority
        if (checksum := self.crc32c) is not None:
            summary["crc32c"] = f"{checksum:08x}"
        if (unique_id := self.unique_id) is not None:
            summary["unique_id"] = unique_id.hex()
        if (ssl := self.ssl) is not None:
            summary["ssl"] = ssl.as_dict()
        if (netns := self.netns) is not None:
            summary["netns"] = netns
        unknown = [
            {"type": entry.type, "value": entry.value.hex()}
            for entry in self.tlvs
            if entry.type not in _TLV_NAMES
        ]
        if unknown:
            summary["tlvs_unknown"] = unknown
        return summary


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------

#: What :meth:`ProxyHeaderParser.feed` and :func:`parse` return.
ParseResult: TypeAlias = _NeedData | tuple[ProxyHeader, bytes]


class _State(Enum):
    DETECT = "detect"
    V1 = "v1"
    V2 = "v2"
    DONE = "done"


class ProxyHeaderParser:
    """Incremental parser of one PROXY v1 or v2 header at the start of a connection.

    Feed it what the socket gives; it returns :data:`NEED_DATA` until a whole header is buffered,
    then ``(header, rest)`` where ``rest`` is every byte after the header (the start of the MQTT or
    WebSocket stream). It fails at the first byte that makes a valid header impossible, so a
    non-PROXY peer is refused on its first byte and an oversized v2 header on its 16th.

    A parser serves one header: after it returned a header or raised, :meth:`feed` raises
    ``ProxyProtocolError("parser_done")``.
    """

    __slots__ = (
        "_buffer",
        "_cr_pending",
        "_field_start",
        "_fields",
        "_max_v2_length",
        "_scanned",
        "_state",
        "_unknown",
        "_v2_total",
    )

    def __init__(self, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        """A parser for one header; ``max_v2_length`` caps a whole v2 header, fixed part included.

        Raises:
            ValueError: ``max_v2_length`` is outside ``V2_MAX_LENGTH_FLOOR``..``V2_MAX_LENGTH_CEILING``.
        """
        if not V2_MAX_LENGTH_FLOOR <= max_v2_length <= V2_MAX_LENGTH_CEILING:
            raise ValueError(
                f"max_v2_length={max_v2_length!r} is outside "
                f"{V2_MAX_LENGTH_FLOOR}..{V2_MAX_LENGTH_CEILING} (16 fixed bytes + 36..65535)"
            )
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._state = _State.DETECT
        # v1 scanning state: bytes [0, _scanned) are checked; fields end at spaces and CR.
        self._scanned = len(V1_SIGNATURE)
        self._field_start = len(V1_SIGNATURE)
        self._fields: list[str] = []
        self._unknown = False
        self._cr_pending = False
        # v2: total header length, known once the 16-byte fixed part is valid.
        self._v2_total: int | None = None

    @property
    def max_v2_length(self) -> int:
        """The largest v2 header (fixed part included) this parser accepts."""
        return self._max_v2_length

    @property
    def done(self) -> bool:
        """Whether the parser returned a header or raised; it must not be fed again."""
        return self._state is _State.DONE

    def feed(self, data: BytesLike) -> ParseResult:
        """Append ``data`` and try to complete the header; ``feed(b"")`` just re-evaluates.

        Returns:
            :data:`NEED_DATA`, or ``(header, rest)`` once a whole header is buffered, ``rest``
            being the bytes after it (possibly empty).

        Raises:
            ProxyProtocolError: the bytes are not a valid header (``reason`` is one of
                :data:`REASONS`), or the parser is already done (``parser_done``).
        """
        if self._state is _State.DONE:
            raise ProxyProtocolError(
                "parser_done", "PROXY header parser already returned a header or raised; use a new one"
            )
        self._buffer += data
        try:
            result = self._advance()
        except ProxyProtocolError:
            self._finish()
            raise
        if result is not NEED_DATA:
            self._finish()
        return result

    def _finish(self) -> None:
        self._state = _State.DONE
        self._buffer = bytearray()
        self._fields = []

    def _advance(self) -> ParseResult:
        if self._state is _State.DETECT:
            found = detect(self._buffer)
            if found is Detection.NEED_DATA:
                return NEED_DATA
            if found is Detection.NONE:
                head = bytes(self._buffer[: len(V2_SIGNATURE)])
                raise _error(
                    "not_proxy_protocol",
                    f"PROXY header expected, got {head!r}: neither 'PROXY ' nor the v2 signature "
                    "(is the peer sending the PROXY protocol?)",
                    "2.1, 2.2",
                )
            self._state = _State.V1 if found is Detection.V1 else _State.V2
        if self._state is _State.V1:
            return self._advance_v1()
        return self._advance_v2()

    # -- v1 ----------------------------------------------------------------------------------------

    def _advance_v1(self) -> ParseResult:
        # Scans each new byte once, in order, so the first invalid byte decides the error whatever
        # the read sizes; nothing past V1_MAX_LENGTH is ever looked at.
        buffer = self._buffer
        end = min(len(buffer), V1_MAX_LENGTH)
        index = self._scanned
        while index < end:
            if not self._cr_pending:
                # Ordinary field bytes are taken as one run; only separators are looked at singly.
                run = _V1_FIELD_RUN.match(buffer, index, end)
                if run is not None:
                    self._field_bytes(index, run.end())
                    index = run.end()
                    if index == end:
                        break
            byte = buffer[index]
            if self._cr_pending:
                if byte != _LF:
                    raise _error(
                        "v1_bad_line_ending",
                        f"PROXY v1: CR at offset {index - 1} is followed by {bytes([byte])!r}, not LF",
                        "2.1",
                    )
                return self._complete_v1(index + 1)
            if byte == _LF:
                raise _error("v1_bad_line_ending", f"PROXY v1: LF without CR at offset {index}", "2.1")
            if byte >= 0x80:
                raise _error(
                    "v1_non_ascii", f"PROXY v1: non-ASCII byte 0x{byte:02x} at offset {index}", "2.1"
                )
            if byte == _CR:
                self._end_field(index)
                self._cr_pending = True
            elif byte < _SP or byte == _DEL:
                raise _error(
                    "v1_bad_character",
                    f"PROXY v1: control character {bytes([byte])!r} at offset {index}",
                    "2.1",
                )
            else:  # a space: printable bytes were consumed as a run above
                self._end_field(index)
            index += 1
        self._scanned = index
        if index >= V1_MAX_LENGTH:
            raise _error("v1_too_long", f"PROXY v1: no CRLF within the first {V1_MAX_LENGTH} bytes", "2.1")
        return NEED_DATA

    def _field_bytes(self, start: int, stop: int) -> None:
        """Check the printable non-space bytes ``[start, stop)`` of the current field."""
        if self._unknown:
            return
        count = len(self._fields)
        if count >= V1_FIELD_COUNT:
            raise _error(
                "v1_bad_field_count",
                f"PROXY v1: extra field after the destination port at offset {start}",
                "2.1",
            )
        if count == 0:
            # Byte by byte, so that the error names the same first wrong byte for any read sizes.
            for index in range(start, stop):
                partial = bytes(self._buffer[self._field_start : index + 1])
                if partial not in _V1_FAMILY_PREFIXES:
                    raise _error(
                        "v1_bad_family",
                        f"PROXY v1: protocol {partial.decode('ascii')!r}... is not TCP4, TCP6 or UNKNOWN",
                        "2.1",
                    )

    def _end_field(self, end: int) -> None:
        if self._unknown:
            return
        start = self._field_start
        self._field_start = end + 1
        if start == end:
            raise _error(
                "v1_bad_separator",
                f"PROXY v1: empty field at offset {start} (fields are separated by exactly one space)",
                "2.1",
            )
        text = self._buffer[start:end].decode("ascii")
        fields = self._fields
        position = len(fields)
        if position == 0:
            if text not in _V1_FAMILIES:
                raise _error(
                    "v1_bad_family", f"PROXY v1: protocol {text!r} is not TCP4, TCP6 or UNKNOWN", "2.1"
                )
            self._unknown = text == "UNKNOWN"
        elif position <= 2:
            text = _v1_address(text, fields[0], "source" if position == 1 else "destination")
        else:
            _v1_port(text, "source" if position == 3 else "destination")
        fields.append(text)

    def _complete_v1(self, length: int) -> tuple[ProxyHeader, bytes]:
        fields = self._fields
        if not self._unknown and len(fields) < V1_FIELD_COUNT:
            missing = ("protocol", "source address", "destination address", "source port", "destination port")
            raise _error(
                "v1_bad_field_count",
                f"PROXY v1: line {bytes(self._buffer[:length])!r} ends before the "
                f"{missing[len(fields)]} field",
                "2.1",
            )
        rest = bytes(self._buffer[length:])
        if self._unknown:
            header = ProxyHeader(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, None, None, (), length)
        else:
            header = ProxyHeader(
                version=1,
                command="PROXY",
                family=fields[0],
                transport="STREAM",
                src_addr=fields[1],
                src_port=int(fields[3]),
                dst_addr=fields[2],
                dst_port=int(fields[4]),
                tlvs=(),
                length=length,
            )
        return header, rest

    # -- v2 ----------------------------------------------------------------------------------------

    def _advance_v2(self) -> ParseResult:
        buffer = self._buffer
        total = self._v2_total
        if total is None:
            # Each nibble is judged as soon as its byte is here, in wire order.
            if len(buffer) > 12:
                _v2_version_command(buffer[12])
            if len(buffer) > 13:
                _v2_family_transport(buffer[13])
            if len(buffer) < V2_FIXED_LENGTH:
                return NEED_DATA
            total = V2_FIXED_LENGTH + ((buffer[14] << 8) | buffer[15])
            if total > self._max_v2_length:
                raise _error(
                    "v2_too_long",
                    f"PROXY v2: header of {total} bytes is longer than the {self._max_v2_length} "
                    "allowed here (max_v2_length)",
                    "2.2",
                )
            family = _V2_FAMILIES[buffer[13] >> 4]
            needed = _V2_ADDRESS_LENGTHS[family]
            if total - V2_FIXED_LENGTH < needed:
                raise _error(
                    "v2_bad_length",
                    f"PROXY v2: length {total - V2_FIXED_LENGTH} is shorter than the {needed}-byte "
                    f"address block of family {family}",
                    "2.2",
                )
            self._v2_total = total
        if len(buffer) < total:
            return NEED_DATA
        return _parse_v2(bytes(buffer[:total])), bytes(buffer[total:])


def parse(data: BytesLike, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> ParseResult:
    """Parse a header from ``data`` in one go: :meth:`ProxyHeaderParser.feed` on a new parser.

    Raises:
        ProxyProtocolError: ``data`` does not start with a valid header.
        ValueError: ``max_v2_length`` is out of range.
    """
    return ProxyHeaderParser(max_v2_length=max_v2_length).feed(data)


# -- v1 fields -------------------------------------------------------------------------------------


def _is_strict_ipv4(text: str) -> bool:
    return _STRICT_IPV4.fullmatch(text) is not None


def _ipv6(text: str) -> ipaddress.IPv6Address | None:
    if _IPV6_TEXT.fullmatch(text) is None:
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def _v1_address(text: str, family: str, which: str) -> str:
    """The address in canonical form; raises ProxyProtocolError."""
    if family == "TCP4":
        if _is_strict_ipv4(text):
            return text
        if _ipv6(text) is not None:
            raise _error(
                "v1_family_mismatch", f"PROXY v1: {which} address {text!r} is IPv6 in a TCP4 line", "2.1"
            )
        raise _error(
            "v1_bad_address",
            f"PROXY v1: {which} address {text!r} is not a strict IPv4 address "
            "(4 decimal numbers 0-255 without leading zeros)",
            "2.1",
        )
    if "%" in text:
        raise _error(
            "v1_bad_address", f"PROXY v1: {which} address {text!r} has a zone id, not allowed", "2.1"
        )
    if _is_strict_ipv4(text):
        raise _error(
            "v1_family_mismatch", f"PROXY v1: {which} address {text!r} is IPv4 in a TCP6 line", "2.1"
        )
    address = _ipv6(text)
    if address is None:
        raise _error("v1_bad_address", f"PROXY v1: {which} address {text!r} is not an IPv6 address", "2.1")
    return str(address)


def _v1_port(text: str, which: str) -> None:
    if _STRICT_PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise _error(
            "v1_bad_port",
            f"PROXY v1: {which} port {text!r} is not a decimal 0-65535 without leading zeros",
            "2.1",
        )


# -- v2 header -------------------------------------------------------------------------------------


def _v2_version_command(byte: int) -> str:
    if byte >> 4 != 2:
        raise _error(
            "v2_bad_version", f"PROXY v2: version {byte >> 4} in byte 13 (0x{byte:02x}), must be 2", "2.2"
        )
    command = _V2_COMMANDS.get(byte & 0x0F)
    if command is None:
        raise _error(
            "v2_bad_command",
            f"PROXY v2: command {byte & 0x0F} in byte 13 (0x{byte:02x}) is neither LOCAL (0) nor PROXY (1)",
            "2.2",
        )
    return command


def _v2_family_transport(byte: int) -> tuple[str, str]:
    family = _V2_FAMILIES.get(byte >> 4)
    if family is None:
        raise _error(
            "v2_bad_family",
            f"PROXY v2: address family {byte >> 4} in byte 14 (0x{byte:02x}) is unassigned",
            "2.2",
        )
    transport = _V2_TRANSPORTS.get(byte & 0x0F)
    if transport is None:
        raise _error(
            "v2_bad_transport",
            f"PROXY v2: transport protocol {byte & 0x0F} in byte 14 (0x{byte:02x}) is unassigned",
            "2.2",
        )
    return family, transport


def _unix_path(raw: bytes) -> str:
    # Paths are bytes; only reports read them, so undecodable bytes are escaped, not refused.
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def _parse_v2(data: bytes) -> ProxyHeader:
    """Parse a whole v2 header whose fixed part was already validated."""
    command = _v2_version_command(data[12])
    family, transport = _v2_family_transport(data[13])
    start = V2_FIXED_LENGTH
    src_addr: str | None = None
    dst_addr: str | None = None
    src_port: int | None = None
    dst_port: int | None = None
    if command == "PROXY" and transport != "UNSPEC":
        if family == "INET":
            src_addr = str(ipaddress.IPv4Address(data[start : start + 4]))
            dst_addr = str(ipaddress.IPv4Address(data[start + 4 : start + 8]))
            src_port, dst_port = _PORTS.unpack_from(data, start + 8)
        elif family == "INET6":
            src_addr = str(ipaddress.IPv6Address(data[start : start + 16]))
            dst_addr = str(ipaddress.IPv6Address(data[start + 16 : start + 32]))
            src_port, dst_port = _PORTS.unpack_from(data, start + 32)
        elif family == "UNIX":
            src_addr = _unix_path(data[start : start + _UNIX_PATH_LENGTH])
            dst_addr = _unix_path(data[start + _UNIX_PATH_LENGTH : start + 2 * _UNIX_PATH_LENGTH])
    tlvs = _v2_tlvs(data, start + _V2_ADDRESS_LENGTHS[family])
    return ProxyHeader(2, command, family, transport, src_addr, src_port, dst_addr, dst_port, tlvs, len(data))


# -- v2 TLVs ---------------------------------------------------------------------------------------


def _split_tlvs(data: bytes, start: int, end: int, what: str, section: str) -> list[tuple[int, int, bytes]]:
    """``(type, value offset, value)`` of each TLV in ``data[start:end]``; raises on overrun."""
    entries = []
    index = start
    while index < end:
        if end - index < 3:
            raise _error(
                "v2_tlv_overrun",
                f"PROXY v2: {end - index} byte(s) at offset {index} are too few for a {what} header "
                "(type + 2-byte length)",
                section,
            )
        kind = data[index]
        value_start = index + 3
        value_end = value_start + ((data[index + 1] << 8) | data[index + 2])
        if value_end > end:
            raise _error(
                "v2_tlv_overrun",
                f"PROXY v2: {what} type 0x{kind:02x} at offset {index} claims {value_end - value_start} "
                f"bytes, only {end - value_start} left",
                section,
            )
        entries.append((kind, value_start, data[value_start:value_end]))
        index = value_end
    return entries


def _v2_tlvs(data: bytes, start: int) -> tuple[TLV, ...]:
    entries = _split_tlvs(data, start, len(data), "TLV", "2.2")
    # The checksum goes first: on a corrupted header it is the one error that names the cause.
    checksums = [entry for entry in entries if entry[0] == PP2_TYPE_CRC32C]
    if len(checksums) > 1:
        raise _error("v2_duplicate_tlv", "PROXY v2: CRC32C TLV appears more than once", "2.2.3")
    if checksums:
        _, offset, value = checksums[0]
        _check_crc32c(data, offset, value)
    seen: set[int] = set()
    for kind, offset, value in entries:
        name = _TLV_NAMES.get(kind)
        if name is None or kind == PP2_TYPE_NOOP:
            continue
        section = _SPEC_SECTIONS[kind]
        if kind in seen:
            raise _error(
                "v2_duplicate_tlv", f"PROXY v2: {name} TLV appears again at offset {offset - 3}", section
            )
        seen.add(kind)
        if kind == PP2_TYPE_AUTHORITY:
            _decode_authority(value)
        elif kind == PP2_TYPE_UNIQUE_ID and len(value) > UNIQUE_ID_MAX_LENGTH:
            raise _error(
                "v2_unique_id_too_long",
                f"PROXY v2: UNIQUE_ID of {len(value)} bytes, at most {UNIQUE_ID_MAX_LENGTH} allowed",
                section,
            )
        elif kind == PP2_TYPE_SSL:
            _decode_ssl(value)
        elif kind == PP2_TYPE_NETNS:
            _decode_text(value, "NETNS", section)
    return tuple(TLV(kind, value) for kind, _, value in entries)


def _check_crc32c(data: bytes, offset: int, value: bytes) -> None:
    if len(value) != 4:
        raise _error(
            "v2_bad_crc32c", f"PROXY v2: CRC32C TLV of {len(value)} bytes, must be exactly 4", "2.2.3"
        )
    # 2.2.3: the checksum covers the whole header with the checksum field set to zeros.
    computed = crc32c(data[:offset] + b"\x00\x00\x00\x00" + data[offset + 4 :])
    received = int.from_bytes(value, "big")
    if computed != received:
        raise _error(
            "v2_crc_mismatch",
            f"PROXY v2: CRC32C 0x{received:08x} in the header, 0x{computed:08x} computed over it",
            "2.2.3",
        )


def _decode_text(value: bytes, what: str, section: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(
            "v2_bad_utf8",
            f"PROXY v2: {what} {value[:64]!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
            section,
        ) from None


def _decode_authority(value: bytes) -> str:
    section = _SPEC_SECTIONS[PP2_TYPE_AUTHORITY]
    text = _decode_text(value, "AUTHORITY", section)
    if not value or len(value) > AUTHORITY_MAX_LENGTH:
        raise _error(
            "v2_bad_authority",
            f"PROXY v2: AUTHORITY of {len(value)} bytes, must be 1-{AUTHORITY_MAX_LENGTH}",
            section,
        )
    # A host name never holds whitespace or control characters; they would only smuggle log lines.
    if any(char.isspace() or not char.isprintable() for char in text):
        raise _error(
            "v2_bad_authority",
            f"PROXY v2: AUTHORITY {text!r} holds whitespace or control characters, not a host name",
            section,
        )
    return text


def _decode_ssl(value: bytes) -> SSLInfo:
    section = _SPEC_SECTIONS[PP2_TYPE_SSL]
    if len(value) < SSL_FIXED_LENGTH:
        raise _error(
            "v2_bad_ssl",
            f"PROXY v2: SSL TLV of {len(value)} bytes, shorter than client (1) + verify (4)",
            section,
        )
    client = value[0]
    verify = int.from_bytes(value[1:5], "big")
    strings: dict[str, str] = {}
    for kind, offset, sub_value in _split_tlvs(value, SSL_FIXED_LENGTH, len(value), "SSL sub-TLV", section):
        name = _SSL_SUBTYPE_NAMES.get(kind)
        if name is None:
            continue
        if name in strings:
            raise _error(
                "v2_duplicate_tlv",
                f"PROXY v2: SSL sub-TLV {name} appears again at offset {offset - 3} of the SSL TLV",
                section,
            )
        strings[name] = _decode_text(sub_value, f"SSL {name}", section)
    return SSLInfo(
        client=client,
        verify=verify,
        version=strings.get("version"),
        cn=strings.get("cn"),
        cipher=strings.get("cipher"),
        sig_alg=strings.get("sig_alg"),
        key_alg=strings.get("key_alg"),
    )


# --------------------------------------------------------------------------------------------------
# Builders (tests, benchmarks, and anything that must send a header)
# --------------------------------------------------------------------------------------------------


def build_v1(
    src_addr: str | None,
    dst_addr: str | None,
    src_port: int | None,
    dst_port: int | None,
    family: str | None = None,
) -> bytes:
    """A v1 line with CRLF. ``family`` is inferred from the addresses; no addresses give
    ``PROXY UNKNOWN\\r\\n``. With an explicit ``family`` the fields are written as given, unchecked,
    so that tests can build invalid lines.

    Raises:
        ValueError: ``family`` is ``None`` and the addresses are not two IPs of one family, or a
            field is missing.
    """
    if family is None:
        if src_addr is None and dst_addr is None:
            return b"PROXY UNKNOWN\r\n"
        family = "TCP4" if _ip_version(src_addr, dst_addr) == 4 else "TCP6"
    if family == "UNKNOWN" and src_addr is None and dst_addr is None:
        return b"PROXY UNKNOWN\r\n"
    if src_addr is None or dst_addr is None or src_port is None or dst_port is None:
        raise ValueError(f"PROXY v1 {family} needs both addresses and both ports")
    return f"PROXY {family} {src_addr} {dst_addr} {src_port} {dst_port}\r\n".encode()


def _ip_version(src_addr: str | None, dst_addr: str | None) -> int:
    if src_addr is None or dst_addr is None:
        raise ValueError("both addresses or neither are needed")
    versions = {ipaddress.ip_address(src_addr).version, ipaddress.ip_address(dst_addr).version}
    if len(versions) != 1:
        raise ValueError(f"{src_addr!r} and {dst_addr!r} are not of the same IP version")
    return versions.pop()


def encode_tlv(tlv: TLV) -> bytes:
    """The wire form of one TLV: type, 16-bit big-endian length, value.

    Raises:
        ValueError: the type is not a byte or the value is longer than 65535 bytes.
    """
    if not 0 <= tlv.type <= 0xFF or len(tlv.value) > 0xFFFF:
        raise ValueError(f"TLV type {tlv.type} or length {len(tlv.value)} does not fit the wire format")
    return bytes([tlv.type]) + struct.pack("!H", len(tlv.value)) + tlv.value


def ssl_tlv(
    *,
    client: int = PP2_CLIENT_SSL,
    verify: int = 0,
    version: str | None = None,
    cn: str | None = None,
    cipher: str | None = None,
    sig_alg: str | None = None,
    key_alg: str | None = None,
    extra: Sequence[TLV] = (),
) -> TLV:
    """A PP2_TYPE_SSL TLV with the given sub-TLVs (in subtype order), then ``extra`` ones as given.

    Raises:
        ValueError: ``client`` is not a byte or ``verify`` not a uint32.
    """
    if not 0 <= client <= 0xFF or not 0 <= verify <= 0xFFFFFFFF:
        raise ValueError(f"client={client} must be a byte and verify={verify} a uint32")
    subs = [
        TLV(kind, text.encode())
        for kind, text in (
            (PP2_SUBTYPE_SSL_VERSION, version),
            (PP2_SUBTYPE_SSL_CN, cn),
            (PP2_SUBTYPE_SSL_CIPHER, cipher),
            (PP2_SUBTYPE_SSL_SIG_ALG, sig_alg),
            (PP2_SUBTYPE_SSL_KEY_ALG, key_alg),
        )
        if text is not None
    ]
    subs.extend(extra)
    value = bytes([client]) + verify.to_bytes(4, "big") + b"".join(encode_tlv(sub) for sub in subs)
    return TLV(PP2_TYPE_SSL, value)


def build_v2(
    *,
    command: str = "PROXY",
    src_addr: str | None = None,
    dst_addr: str | None = None,
    src_port: int | None = None,
    dst_port: int | None = None,
    transport: str | None = None,
    family: str | None = None,
    tlvs: Sequence[TLV] = (),
    crc32c: bool = False,
) -> bytes:
    """A v2 header.

    ``family`` is inferred: no addresses give UNSPEC, IP addresses INET or INET6, anything else
    UNIX (paths, at most 108 bytes in UTF-8). ``transport`` defaults to STREAM with addresses and
    UNSPEC without. With ``crc32c`` a CRC32C TLV is appended after ``tlvs``, computed over the
    whole header with its value zeroed (2.2.3).

    Raises:
        ValueError: an unknown command, family or transport name, addresses that do not fit the
            family, missing ports for INET/INET6, or a header longer than the length field allows.
    """
    command_code = {name: code for code, name in _V2_COMMANDS.items()}.get(command)
    if command_code is None:
        raise ValueError(f"command {command!r} is not LOCAL or PROXY")
    if family is None:
        if src_addr is None and dst_addr is None:
            family = "UNSPEC"
        else:
            try:
                family = "INET" if _ip_version(src_addr, dst_addr) == 4 else "INET6"
            except ValueError:
                family = "UNIX"
    if transport is None:
        transport = "UNSPEC" if family == "UNSPEC" else "STREAM"
    family_code = {name: code for code, name in _V2_FAMILIES.items()}.get(family)
    transport_code = {name: code for code, name in _V2_TRANSPORTS.items()}.get(transport)
    if family_code is None or transport_code is None:
        raise ValueError(f"family {family!r} or transport {transport!r} is unknown")
    payload = _v2_address_block(family, src_addr, dst_addr, src_port, dst_port)
    payload += b"".join(encode_tlv(tlv) for tlv in tlvs)
    if crc32c:
        payload += encode_tlv(TLV(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"))
    if len(payload) > 0xFFFF:
        raise ValueError(f"PROXY v2 payload of {len(payload)} bytes does not fit the 16-bit length")
    header = (
        V2_SIGNATURE
        + bytes([0x20 | command_code, family_code << 4 | transport_code])
        + struct.pack("!H", len(payload))
        + payload
    )
    if crc32c:
        header = header[:-4] + _crc32c_of(header).to_bytes(4, "big")
    return header


def _v2_address_block(
    family: str, src_addr: str | None, dst_addr: str | None, src_port: int | None, dst_port: int | None
) -> bytes:
    if family == "UNSPEC":
        if src_addr is not None or dst_addr is not None:
            raise ValueError("family UNSPEC carries no addresses")
        return b""
    if src_addr is None or dst_addr is None:
        raise ValueError(f"family {family} needs both addresses")
    if family == "UNIX":
        paths = [path.encode() for path in (src_addr, dst_addr)]
        if any(len(path) > _UNIX_PATH_LENGTH for path in paths):
            raise ValueError(f"UNIX paths are at most {_UNIX_PATH_LENGTH} bytes")
        return b"".join(path.ljust(_UNIX_PATH_LENGTH, b"\x00") for path in paths)
    if src_port is None or dst_port is None:
        raise ValueError(f"family {family} needs both ports")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise ValueError(f"ports {src_port}, {dst_port} are not all in 0-65535")
    address_type = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
    return (
        address_type(src_addr).packed + address_type(dst_addr).packed + struct.pack("!HH", src_port, dst_port)
    )
