"""TLS for ``ssl`` and ``wss`` listeners: the server context, and what a handshake tells about the client.

Kept free of I/O beyond reading certificate files, so that ``check-config`` builds the same context
the listener will use and reports a bad key or certificate with its path.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

#: TLS versions a listener may enable (EMQX's names).
VERSIONS: Final = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What is known of a client's TLS session: from our own handshake, or from a PROXY v2 SSL TLV.

    ``cert_verified`` is true only when a client certificate was presented and verified (by us, or
    by the proxy that says so in the TLV).
    """

    version: str | None
    cert_cn: str | None
    cert_verified: bool
    source: str  # "local" or "proxy_protocol"

    def as_dict(self) -> dict[str, object]:
        """For reports."""
        return {
            "version": self.version,
            "cert_cn": self.cert_cn,
            "cert_verified": self.cert_verified,
            "source": self.source,
        }


def make_server_context(
    *,
    certfile: str,
    keyfile: str,
    cacertfile: str = "",
    verify_peer: bool = False,
    fail_if_no_peer_cert: bool = False,
    versions: Sequence[str] = ("tlsv1.3", "tlsv1.2"),
    ciphers: str = "",
) -> ssl.SSLContext:
    """A server-side TLS context.

    ``verify_peer`` asks for a client certificate and verifies it against ``cacertfile``;
    ``fail_if_no_peer_cert`` then refuses clients without one.

    Raises:
        ValueError: a file cannot be read, the key does not match the certificate, a version or the
            cipher string is not usable; the message names the option.
    """
    for name, path in (("certfile", certfile), ("keyfile", keyfile), ("cacertfile", cacertfile)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"{name}: cannot read {path}: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    chosen = sorted(VERSIONS[v] for v in versions)
    context.minimum_version, context.maximum_version = chosen[0], chosen[-1]
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"certfile/keyfile: {certfile!r} and {keyfile!r} are not a usable pair: {exc}"
        ) from None
    if cacertfile:
        try:
            context.load_verify_locations(cafile=cacertfile)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cacertfile: {cacertfile!r} holds no usable CA certificate: {exc}") from None
    if verify_peer:
        context.verify_mode = ssl.CERT_REQUIRED if fail_if_no_peer_cert else ssl.CERT_OPTIONAL
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"ciphers: {ciphers!r} selects no cipher OpenSSL knows") from None
    return context


class ContextOptions(Protocol):
    """What :func:`context_from` reads (``broker.settings.SslOptions``)."""

    @property
    def certfile(self) -> str: ...
    @property
    def keyfile(self) -> str: ...
    @property
    def cacertfile(self) -> str: ...
    @property
    def verify(self) -> bool: ...
    @property
    def fail_if_no_peer_cert(self) -> bool: ...
    @property
    def versions(self) -> tuple[str, ...]: ...
    @property
    def ciphers(self) -> str: ...


def context_from(options: ContextOptions) -> ssl.SSLContext:
    """:func:`make_server_context` from a listener's ``ssl_options``.

    Raises:
        ValueError: as :func:`make_server_context`.
    """
    return make_server_context(
        certfile=options.certfile,
        keyfile=options.keyfile,
        cacertfile=options.cacertfile,
        verify_peer=options.verify,
        fail_if_no_peer_cert=options.fail_if_no_peer_cert,
        versions=options.versions,
        ciphers=options.ciphers,
    )


def handshake_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """The refusal reason and message for a failed server-side handshake.

    asyncio reports a handshake timeout as ``ConnectionAbortedError("... taking longer than ...")``.
    """
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)
    ):
        return "tls_timeout", f"no TLS handshake within {timeout:g}s"
    detail = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return "tls_error", f"TLS handshake failed: {detail}"


def local_tls_info(ssl_object: ssl.SSLObject | None) -> TlsInfo | None:
    """What our own handshake established (a verified client certificate's CN, if any)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    cn = None
    if cert:
        subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName":
                    cn = value
    # getpeercert() returns a certificate only when it was verified (CERT_OPTIONAL/REQUIRED).
    return TlsInfo(version=ssl_object.version(), cert_cn=cn, cert_verified=bool(cert), source="local")
