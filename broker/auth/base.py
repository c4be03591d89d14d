"""What every authenticator shares: the credentials it is asked about and the verdict it gives.

An authenticator answers ``allow`` (optionally as a superuser), ``deny``, or ``ignore`` (not mine:
the next one in the chain decides), EMQX's three answers. A backend that could not decide because
something it depends on failed (an HTTP server down, a timeout) answers ``ignore`` with
``error`` set: the chain then refuses with "server unavailable" instead of "bad password", and the
failure is not counted against the client's address.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from broker.errors import RealIPError

if TYPE_CHECKING:
    from listeners.address import ClientAddress


class AuthError(RealIPError):
    """An authenticator cannot be set up (its file cannot be read, its key is invalid...)."""


class Outcome(Enum):
    """An authenticator's answer."""

    ALLOW = "allow"
    DENY = "deny"
    IGNORE = "ignore"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a CONNECT claims, and where it comes from (the *real* address)."""

    client_id: str
    username: str | None
    password: bytes | None
    address: ClientAddress
    listener_id: str
    #: 4 (MQTT 3.1.1) or 5
    proto_ver: int
    #: The CN of a client certificate that was verified (by our TLS listener, or by a trusted
    #: proxy that said so in PROXY v2), else None.
    cert_common_name: str | None = None

    def __repr__(self) -> str:  # never the password, whatever logs it
        return (
            f"Credentials(client_id={self.client_id!r}, username={self.username!r}, "
            f"password={'<set>' if self.password is not None else None}, "
            f"peer={self.address.peername}, listener={self.listener_id}, proto_ver={self.proto_ver})"
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """One authenticator's answer. ``reason`` is for the log and the audit record: it never
    holds a secret. ``error`` marks an ``ignore`` caused by a failure of the backend itself."""

    outcome: Outcome
    is_superuser: bool = False
    reason: str = ""
    error: bool = False


ALLOW = Verdict(Outcome.ALLOW)
IGNORE = Verdict(Outcome.IGNORE)


class Authenticator(Protocol):
    """One link of the chain."""

    #: How logs, metrics and audit records name it: ``password_based:built_in_database``,
    #: ``password_based:password_file``, ``password_based:http``, ``jwt``, ``amqtt_plugin``.
    name: str
    #: Whether its ``allow`` proves the CONNECT's username (a password checked for that user; a
    #: token whose claims name it; a callout that was sent it). Only a proven username matches
    #: rules that name one, fills ``${username}`` and owns a session.
    proves_username: bool

    async def start(self) -> None:
        """Set up (open an HTTP session, read a file).

        Raises:
            AuthError: it cannot be set up.
        """

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """Decide. Never raises: a failure of its own is ``ignore`` with ``error`` set."""

    async def close(self) -> None:
        """Release what :meth:`start` took."""


class AuthorizationSource(Protocol):
    """An ``authorization.sources`` entry: asked what no rule decides."""

    name: str

    async def start(self) -> None:
        """Set up. Raises AuthError when it cannot."""

    async def authorize(self, credentials: Credentials, action: str, topic: str, qos: int) -> Outcome:
        """``publish`` or ``subscribe`` to ``topic``: allow, deny or ignore. Never raises."""

    async def close(self) -> None:
        """Release what :meth:`start` took."""
