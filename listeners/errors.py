"""The root of the project's one exception tree, and the errors of learning a client's address.

They live here, in the lowest layer, so that :mod:`listeners` needs nothing from :mod:`broker`;
:mod:`broker.errors` re-exports them and roots the broker's own errors in the same
:class:`RealIPError`::

    RealIPError                  (here)
    └── AddressError             a client address could not be learned safely
        ├── ProxyProtocolError   a PROXY protocol v1/v2 header is malformed or refused
        └── ForwardedHeaderError an X-Forwarded-For / X-Real-IP / Forwarded header is malformed

``AddressError`` subclasses carry a short machine-readable ``reason`` (used as a metrics label and
in the audit log) besides the human-readable message.
"""

from __future__ import annotations


class RealIPError(Exception):
    """Base class of every error raised on purpose by realip-broker."""


class AddressError(RealIPError):
    """The client's address could not be learned safely; the connection must be refused.

    ``reason`` is a short snake_case code (a metrics label); the message says what was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ProxyProtocolError(AddressError):
    """A PROXY protocol header is malformed, unsupported or not allowed here."""


class ForwardedHeaderError(AddressError):
    """An address header of a WebSocket upgrade request is malformed."""
