"""SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677), server side, for MQTT 5 enhanced authentication.

The exchange maps onto MQTT 5 packets like this::

    client                                               server
    CONNECT  Authentication Method "SCRAM-SHA-256",
             Authentication Data   client-first-message   ->  ScramExchange.first()
                                                         <-  AUTH 0x18 (continue), server-first-message
    AUTH 0x18  client-final-message                       ->  ScramExchange.final()
                                                         <-  CONNACK 0x00, server-final-message ("v=...")
                                                             or CONNACK 0x86 when ScramError is raised

The protocol itself (message grammar, SASLprep, ``=2C``/``=3D`` user name decoding, proof
verification with constant-time comparison) is :mod:`scramp`'s ``ScramServer``; this module adds what
a broker needs around it: credentials stored per user (:class:`ScramCredentials`, made by
:func:`make_credentials` when a password is set), size limits on what a client may send, one
exception type (:class:`ScramError`) whatever the client sends, and no way to tell an unknown user
from a wrong password by the server's answers (an unknown user gets a stable fake salt and the same
refusal as a wrong proof).

Channel binding (the ``-PLUS`` methods, the ``p=`` gs2 flag) is not offered: a client asking for it
is refused; the ``n,,`` and ``y,,`` gs2 headers are accepted as RFC 5802 says. An authorization
identity (``a=`` in the gs2 header) is refused too (scramp does not support one).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from scramp import ScramException, ScramMechanism  # type: ignore[import-untyped]
from scramp.utils import ServerError  # type: ignore[import-untyped]

from broker.errors import RealIPError

__all__ = [
    "DEFAULT_ITERATIONS",
    "MAX_ITERATIONS",
    "MAX_MESSAGE_BYTES",
    "MAX_USERNAME_BYTES",
    "METHODS",
    "MIN_ITERATIONS",
    "MIN_SALT_BYTES",
    "SALT_BYTES",
    "ScramCredentials",
    "ScramError",
    "ScramExchange",
    "make_credentials",
]

#: MQTT 5 Authentication Method -> the algorithm of :func:`make_credentials`.
METHODS: Final = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}

#: Algorithm -> (scramp mechanism name, hash constructor).
_ALGORITHMS: Final = {
    "sha256": ("SCRAM-SHA-256", hashlib.sha256),
    "sha512": ("SCRAM-SHA-512", hashlib.sha512),
}

#: PBKDF2 iterations when none is given, and the fewest accepted: RFC 7677 section 4 asks for at
#: least 4096, and scramp refuses fewer.
DEFAULT_ITERATIONS: Final = 4096
MIN_ITERATIONS: Final = 4096
#: The most iterations accepted: the client must compute them on every connection, and scramp
#: refuses more (its guard against a server that makes clients spin).
MAX_ITERATIONS: Final = 10_000_000

#: Salt length of new credentials and of the fake salts given for unknown users (which must look
#: the same): 128 bits, NIST SP 800-132's minimum and the length in the RFCs' examples.
SALT_BYTES: Final = 16
#: The shortest stored salt accepted: scramp refuses shorter ones.
MIN_SALT_BYTES: Final = 12

#: The longest client-first or client-final message accepted. Either is a few hundred bytes (a gs2
#: header, a user name, a nonce; the channel binding, the nonce, a proof); 4096 leaves room for long
#: user names and extension attributes while bounding the parsing and SASLprep work a client can
#: cause per connection attempt.
MAX_MESSAGE_BYTES: Final = 4096
#: The longest user name (UTF-8, after SASLprep and ``=2C``/``=3D`` decoding) accepted: longer than
#: any account name an operator creates, short enough to bound the lookup key and log lines.
MAX_USERNAME_BYTES: Final = 1024

#: The one message for a wrong proof *and* for an unknown user, so that nothing (answer, log line
#: shown to the client, exception text) tells them apart.
_PROOF_REFUSED: Final = "SCRAM authentication failed: wrong password or unknown user"

#: Key of the fake salts of unknown users: random per process, so nobody can compute them, and
#: constant within the process, so that the same unknown user gets the same salt every time (as a
#: real user does) instead of a fresh one that would give it away.
_FAKE_SALT_KEY: Final = secrets.token_bytes(32)


class ScramError(RealIPError):
    """A SCRAM exchange failed: the client's message is malformed, too large or out of turn, it asks
    for channel binding, or its proof is wrong. The message says what failed, never a secret, and
    is the same for an unknown user as for a wrong password. The connection must be refused
    (CONNACK 0x86, bad user name or password)."""


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What the server stores for one user and one algorithm (RFC 5802 section 3): never the
    password, only what checking a proof needs. Made by :func:`make_credentials`.

    ``stored_key`` and ``server_key`` are left out of the repr: with them one can impersonate the
    server, or the user given a recorded exchange.

    Raises (on construction):
        TypeError: a field has the wrong type.
        ValueError: the salt is shorter than :data:`MIN_SALT_BYTES`, the iteration count is outside
            [:data:`MIN_ITERATIONS`, :data:`MAX_ITERATIONS`], or the keys are not both SHA-256 or
            both SHA-512 digests.
    """

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # Checked here rather than during an exchange: a bad record is a server-side mistake, best
        # reported where it is made (loading or setting a password), not as a client's failure.
        for name in ("salt", "stored_key", "server_key"):
            if not isinstance(getattr(self, name), bytes):
                raise TypeError(f"ScramCredentials.{name} must be bytes")
        # bool is an int subclass, and scramp wants exactly int.
        if type(self.iterations) is not int:
            raise TypeError("ScramCredentials.iterations must be an int")
        if len(self.salt) < MIN_SALT_BYTES:
            raise ValueError(f"the salt must be at least {MIN_SALT_BYTES} bytes, not {len(self.salt)}")
        if not MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"the iteration count must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}, "
                f"not {self.iterations}"
            )
        sizes = {hash_fn().digest_size for _, hash_fn in _ALGORITHMS.values()}
        if len(self.stored_key) not in sizes or len(self.server_key) != len(self.stored_key):
            raise ValueError("the stored key and server key must both be SHA-256 or both SHA-512 digests")


def make_credentials(
    password: str, algorithm: str, iterations: int = DEFAULT_ITERATIONS, *, salt: bytes | None = None
) -> ScramCredentials:
    """The credentials to store for ``password`` (SASLprep'd, as RFC 5802 says) with ``algorithm``
    ("sha256" or "sha512"), a fresh random salt of :data:`SALT_BYTES` (or ``salt``, for tests and
    known-answer checks) and ``iterations`` PBKDF2 rounds.

    Raises:
        ValueError: ``algorithm`` is unknown, ``iterations`` is outside [:data:`MIN_ITERATIONS`,
            :data:`MAX_ITERATIONS`], ``salt`` is shorter than :data:`MIN_SALT_BYTES`, or the
            password holds characters SASLprep prohibits (control characters, unassigned code
            points...).
    """
    try:
        mechanism_name, _ = _ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown SCRAM algorithm {algorithm!r} (expected one of {sorted(_ALGORITHMS)})"
        ) from None
    # Checked here so that the message names our limits, not scramp's.
    if type(iterations) is not int or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"the iteration count must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    elif len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"the salt must be at least {MIN_SALT_BYTES} bytes")
    try:
        salt_out, stored_key, server_key, count = ScramMechanism(mechanism_name).make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
    except ScramException as exc:
        # Never the password itself: scramp's message says which SASLprep rule it breaks.
        raise ValueError(f"the password cannot be used for SCRAM: {exc.args[0]}") from None
    return ScramCredentials(
        salt=bytes(salt_out),
        iterations=int(count),
        stored_key=bytes(stored_key),
        server_key=bytes(server_key),
    )


class _Stage(Enum):
    """Where an exchange is."""

    AWAIT_FIRST = "awaiting the client-first-message"
    AWAIT_FINAL = "awaiting the client-final-message"
    SUCCEEDED = "finished"
    FAILED = "failed"


class ScramExchange:
    """One exchange for one connection: :meth:`first` then :meth:`final`, each once.

    Any failure ends the exchange: every later call raises :class:`ScramError`.
    """

    def __init__(
        self,
        method: str,
        lookup: Callable[[str], ScramCredentials | None],
        *,
        unknown_iterations: int = DEFAULT_ITERATIONS,
        _server_nonce: str | None = None,
    ) -> None:
        """``method`` is the MQTT Authentication Method (a key of :data:`METHODS`); ``lookup`` finds
        a user's credentials for that method's algorithm by user name (None: no such user).

        ``unknown_iterations`` is the iteration count announced for unknown users: set it to the
        count new passwords get (``scram.iteration_count``) so that unknown users look like
        recently set ones. ``_server_nonce`` is for tests only (known-answer vectors): the server's
        part of the nonce, instead of a fresh random one; never set it in production.

        Raises:
            ValueError: ``method`` is not a key of :data:`METHODS`, ``unknown_iterations`` is out of
                range, or ``_server_nonce`` is not a valid nonce.
        """
        try:
            self.algorithm: Final[str] = METHODS[method]
        except KeyError:
            raise ValueError(f"unknown SCRAM method {method!r} (expected one of {sorted(METHODS)})") from None
        if type(unknown_iterations) is not int or not MIN_ITERATIONS <= unknown_iterations <= MAX_ITERATIONS:
            raise ValueError(f"unknown_iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
        self.method: Final[str] = method
        self._lookup = lookup
        self._unknown_iterations = unknown_iterations
        self._digest_size: int = _ALGORITHMS[self.algorithm][1]().digest_size
        self._username: str | None = None
        self._stage = _Stage.AWAIT_FIRST
        # An exception raised by our own callback inside scramp, which scramp would replace with its
        # own "auth_fn exception": kept here to be raised as it is.
        self._callback_error: Exception | None = None
        try:
            self._server = ScramMechanism(method).make_server(self._auth_info, s_nonce=_server_nonce)
        except ScramException as exc:
            raise ValueError(f"invalid server nonce: {exc.args[0]}") from None

    @property
    def username(self) -> str | None:
        """The user name (authcid) the client-first-message gives, after ``=2C``/``=3D`` decoding and
        SASLprep, once :meth:`first` has parsed it; None before, or when it could not be parsed or
        was too long. Proven only once :meth:`final` has returned. Never raises."""
        return self._username

    def first(self, client_first: bytes) -> bytes:
        """Take the client-first-message (the CONNECT's Authentication Data) and return the
        server-first-message (for AUTH 0x18). An unknown user gets an ordinary-looking answer.

        Raises:
            ScramError: the message is too long, not UTF-8 or malformed (its user name cannot be
                parsed, is too long or breaks SASLprep), asks for channel binding or an
                authorization identity, or the exchange is not at its start.
            Exception: whatever ``lookup`` raises, unchanged (a failure of the user store is not
                the client's failure).
            ValueError: ``lookup`` returned credentials of the other algorithm (a wiring mistake).
        """
        self._advance(_Stage.AWAIT_FIRST)
        text = _decode(client_first, "client-first-message")
        try:
            self._server.set_client_first(text)
            server_first = self._server.get_server_first()
        except ScramException as exc:
            refusal = exc
        else:
            self._stage = _Stage.AWAIT_FINAL
            return str(server_first).encode()
        # Raised outside the except clause, so that no scramp exception is chained to them: its
        # text is already in the message, and its traceback is scramp's internals.
        self._raise_callback_error()
        if refusal.server_error in (
            ServerError.CHANNEL_BINDING_NOT_SUPPORTED,
            ServerError.UNSUPPORTED_CHANNEL_BINDING_TYPE,
        ):
            raise ScramError("SCRAM client-first-message refused: channel binding is not offered")
        raise ScramError(f"SCRAM client-first-message refused: {refusal.args[0]}")

    def final(self, client_final: bytes) -> bytes:
        """Take the client-final-message (the client's AUTH 0x18 Authentication Data), check its
        proof and return the server-final-message (``v=...``, for the CONNACK's Authentication Data).

        Raises:
            ScramError: the proof is wrong or the user is unknown (one message for both), the nonce
                or the channel binding differs from what :meth:`first` saw, the message is too
                long, not UTF-8 or malformed, or :meth:`first` has not succeeded just before.
        """
        self._advance(_Stage.AWAIT_FINAL)
        text = _decode(client_final, "client-final-message")
        try:
            self._server.set_client_final(text)
            server_final = self._server.get_server_final()
        except ScramException as exc:
            refusal = exc
        else:
            self._stage = _Stage.SUCCEEDED
            return str(server_final).encode()
        if refusal.server_error is ServerError.INVALID_PROOF:
            raise ScramError(_PROOF_REFUSED)
        if refusal.server_error is ServerError.CHANNEL_BINDINGS_DONT_MATCH:
            raise ScramError(
                "SCRAM client-final-message refused: its channel binding does not match the gs2 header"
            )
        raise ScramError(f"SCRAM client-final-message refused: {refusal.args[0]}")

    def _advance(self, expected: _Stage) -> None:
        """Check the exchange is at ``expected``, and mark it failed until the step succeeds.

        Raises:
            ScramError: it is not.
        """
        if self._stage is not expected:
            raise ScramError(f"SCRAM message out of turn: the exchange is {self._stage.value}")
        # Any exception from here on leaves the exchange failed: no retrying a step with new input.
        self._stage = _Stage.FAILED

    def _raise_callback_error(self) -> None:
        """Raise what :meth:`_auth_info` raised, if it did, instead of scramp's wrapper of it.

        Raises:
            Exception: that exception.
        """
        error, self._callback_error = self._callback_error, None
        if error is not None:
            raise error

    def _auth_info(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's ``auth_fn``: the user's (salt, stored key, server key, iterations), or fake ones
        for an unknown user, so that its server-first-message looks like a real one and its proof
        fails at :meth:`final` exactly like a wrong one.

        Raises:
            ScramError: the user name is too long.
            ValueError: ``lookup`` returned credentials of the other algorithm.
            Exception: whatever ``lookup`` raises.
            (Each is kept in ``_callback_error`` first: scramp replaces it with its own exception.)
        """
        try:
            if len(username.encode()) > MAX_USERNAME_BYTES:
                raise ScramError(f"SCRAM user name longer than {MAX_USERNAME_BYTES} bytes")
            self._username = username
            credentials = self._lookup(username)
            if credentials is None:
                return self._fake_auth_info(username)
            if len(credentials.stored_key) != self._digest_size:
                raise ValueError(
                    f"the stored SCRAM credentials of this user are not {self.algorithm} credentials "
                    f"(lookup for {self.method} returned keys of {len(credentials.stored_key)} bytes)"
                )
        except Exception as exc:
            self._callback_error = exc
            raise
        return credentials.salt, credentials.stored_key, credentials.server_key, credentials.iterations

    def _fake_auth_info(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        """Credentials for an unknown user: a salt that is the same every time for this user name
        and algorithm (a real user's salt does not change either) and random keys, which no proof
        matches. Never raises."""
        message = f"{self.algorithm}\x00{username}".encode()
        salt = hmac.new(_FAKE_SALT_KEY, message, hashlib.sha256).digest()[:SALT_BYTES]
        stored_key = secrets.token_bytes(self._digest_size)
        server_key = secrets.token_bytes(self._digest_size)
        return salt, stored_key, server_key, self._unknown_iterations


def _decode(message: bytes, what: str) -> str:
    """``message`` as text, within :data:`MAX_MESSAGE_BYTES`.

    Raises:
        ScramError: it is longer, or not UTF-8 (RFC 5802 messages are UTF-8).
    """
    if len(message) > MAX_MESSAGE_BYTES:
        raise ScramError(f"SCRAM {what} longer than {MAX_MESSAGE_BYTES} bytes ({len(message)})")
    try:
        return bytes(message).decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"SCRAM {what} is not UTF-8") from None
