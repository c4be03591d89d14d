"""Password hashes: making them (argon2id, bcrypt, PBKDF2-SHA512), checking them (those and
``mosquitto_passwd``'s), and running the checks off the event loop.

Formats :func:`verify_password` accepts (``b64`` is standard base64, RFC 4648 section 4; padding
optional)::

    $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>   argon2 (PHC string; also mosquitto 2.1's default)
    $2b$12$<53 characters>                         bcrypt ($2a$ and $2y$ too)
    $pbkdf2-sha512$i=<iterations>$<b64 salt>$<b64 hash>
                                                   ours: PBKDF2-HMAC-SHA512, 16-byte salt, 64-byte
                                                   hash, written without padding (PHC style). Not
                                                   passlib's format, which uses another alphabet.
    $7$<iterations>$<b64 salt>$<b64 hash>          mosquitto 2.0: PBKDF2-HMAC-SHA512, 64-byte hash
    $6$<b64 salt>$<b64 hash>                       mosquitto 1.x: SHA-512(password || salt)

:func:`hash_password` writes the first three. Checking a hash costs tens of milliseconds of CPU
(and an argon2id one the memory it asks for: 19 MiB for ours, 64 MiB with argon2-cffi's
default): :class:`PasswordChecks` runs them in a few worker threads, never on the event loop, and
refuses work beyond a bound instead of queueing it without end (a flood of CONNECTs must not
become a flood of hash computations).

Hashes are read from files an operator writes, but a typo or a hostile file must not pin a worker
for minutes or allocate gigabytes: the cost parameters a hash may ask for are capped below, and a
hash beyond a cap is a mismatch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TypeVar

import argon2
from pwdlib.hashers.argon2 import Argon2Hasher
from pwdlib.hashers.bcrypt import BcryptHasher

from broker.auth.base import Outcome, Verdict

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Algorithms :func:`hash_password` writes (``settings.HASH_ALGORITHMS`` names the same three).
ALGORITHMS: Final = ("argon2id", "bcrypt", "pbkdf2")

#: PBKDF2-HMAC-SHA512 iterations of new ``$pbkdf2-sha512$`` hashes: OWASP's Password Storage Cheat
#: Sheet (2023) figure for SHA-512, ~0.15 s on one core of a current server.
PBKDF2_ITERATIONS: Final = 210_000
#: Salt length of new ``$pbkdf2-sha512$`` hashes: 128 bits (NIST SP 800-132's minimum).
PBKDF2_SALT_BYTES: Final = 16

#: The longest encoded hash looked at. Real ones are 60 (bcrypt) to ~120 characters; anything far
#: longer is not a hash, and decoding it would be wasted work.
MAX_ENCODED_LENGTH: Final = 1024
#: Most PBKDF2 iterations a ``$7$``/``$pbkdf2-sha512$`` hash may ask for: 10 million is ~7 s of a
#: worker, past any sane setting (mosquitto_passwd's default is 101), and bounds a typo's damage.
MAX_PBKDF2_ITERATIONS: Final = 10_000_000
#: Most bcrypt cost accepted: every step doubles the time; 16 is 16 times the default of 12 (~4 s).
MAX_BCRYPT_ROUNDS: Final = 16
#: Most argon2 memory accepted, in KiB: 1 GiB, sixteen times the default; each check in flight
#: allocates it, so more would let a hash file exhaust the host's memory.
MAX_ARGON2_MEMORY_KIB: Final = 1024 * 1024
#: Most argon2 passes accepted (the default is 3).
MAX_ARGON2_TIME_COST: Final = 32
#: Most argon2 lanes accepted (the default is 4); each may be a thread of its own.
MAX_ARGON2_PARALLELISM: Final = 16
#: bcrypt reads at most 72 bytes of password; bcrypt 5 refuses longer ones rather than truncate.
BCRYPT_MAX_PASSWORD_BYTES: Final = 72

#: Dummy hashes kept (one per distinct scheme and cost seen): a handful in practice.
_MAX_DUMMY_HASHES: Final = 32

#: New argon2id hashes: OWASP's Password Storage Cheat Sheet minimum (19 MiB, 2 passes, 1 lane),
#: about 28 ms a check here. argon2-cffi's default (64 MiB, 3 passes, 4 lanes) costs 135 ms: with
#: two worker threads a reconnect storm would be served at ~15 CONNECTs per second. Existing hashes
#: are checked with the parameters they carry.
_ARGON2: Final = Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1)
#: New bcrypt hashes: cost 10, OWASP's minimum (about 60 ms here; pwdlib's default 12 is 4x that).
_BCRYPT: Final = BcryptHasher(rounds=10)

_B64: Final = r"[A-Za-z0-9+/]+={0,2}"
_DIGITS: Final = r"[0-9]{1,10}"
_MOSQUITTO_PBKDF2_RE: Final = re.compile(
    rf"\$7\$(?P<i>{_DIGITS})\$(?P<salt>{_B64})\$(?P<hash>{_B64})", re.ASCII
)
_MOSQUITTO_SHA512_RE: Final = re.compile(rf"\$6\$(?P<salt>{_B64})\$(?P<hash>{_B64})", re.ASCII)
_PBKDF2_RE: Final = re.compile(
    rf"\$pbkdf2-sha512\$i=(?P<i>{_DIGITS})\$(?P<salt>{_B64})\$(?P<hash>{_B64})", re.ASCII
)
_BCRYPT_RE: Final = re.compile(r"\$(?P<prefix>2[aby])\$(?P<rounds>[0-9]{2})\$[./A-Za-z0-9]{53}", re.ASCII)
_ARGON2_RE: Final = re.compile(r"\$argon2(?:id|i|d)\$", re.ASCII)

#: SHA-512's digest size: the length of the hash part of every PBKDF2/SHA-512 format above.
_SHA512_BYTES: Final = 64


@dataclass(frozen=True, slots=True)
class _Parsed:
    """An encoded hash taken apart. ``cost`` identifies the scheme and its cost parameters (two
    hashes with the same ``cost`` take the same time to check); ``salt``/``digest`` are set for the
    schemes we compute ourselves."""

    cost: tuple[str | int, ...]
    salt: bytes = b""
    digest: bytes = b""
    iterations: int = 0


def _b64(text: str) -> bytes:
    """Standard base64 with or without its padding.

    Raises:
        binascii.Error: not base64.
    """
    return base64.b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4), validate=True)


def _parse(encoded: str) -> _Parsed | None:
    """``encoded`` taken apart, or None when it is no format we check or asks for more than the caps
    allow. Never raises."""
    if not isinstance(encoded, str) or len(encoded) > MAX_ENCODED_LENGTH:
        return None
    try:
        if match := _MOSQUITTO_PBKDF2_RE.fullmatch(encoded) or _PBKDF2_RE.fullmatch(encoded):
            iterations = int(match["i"])
            salt, digest = _b64(match["salt"]), _b64(match["hash"])
            if not 1 <= iterations <= MAX_PBKDF2_ITERATIONS or not salt or len(digest) != _SHA512_BYTES:
                return None
            scheme = "7" if encoded.startswith("$7$") else "pbkdf2-sha512"
            return _Parsed((scheme, iterations), salt, digest, iterations)
        if match := _MOSQUITTO_SHA512_RE.fullmatch(encoded):
            salt, digest = _b64(match["salt"]), _b64(match["hash"])
            if not salt or len(digest) != _SHA512_BYTES:
                return None
            return _Parsed(("6",), salt, digest)
        if match := _BCRYPT_RE.fullmatch(encoded):
            rounds = int(match["rounds"])
            if not 4 <= rounds <= MAX_BCRYPT_ROUNDS:
                return None
            return _Parsed(("bcrypt", rounds))
        if _ARGON2_RE.match(encoded):
            params = argon2.extract_parameters(encoded)
            if (
                params.memory_cost > MAX_ARGON2_MEMORY_KIB
                or params.time_cost > MAX_ARGON2_TIME_COST
                or params.parallelism > MAX_ARGON2_PARALLELISM
            ):
                return None
            cost = (
                "argon2",
                params.type.value,
                params.time_cost,
                params.memory_cost,
                params.parallelism,
                params.salt_len,
                params.hash_len,
            )
            return _Parsed(cost)
    except (binascii.Error, ValueError, argon2.exceptions.InvalidHashError):
        return None
    return None


def is_known_format(encoded: str) -> bool:
    """Whether ``encoded`` is a hash :func:`verify_password` can check (one of the module's formats,
    within its cost caps). Never raises."""
    return _parse(encoded) is not None


def hash_password(password: str, algorithm: str) -> str:
    """A new hash of ``password`` with a fresh random salt; ``algorithm`` is one of
    :data:`ALGORITHMS`. CPU-heavy (tens to hundreds of milliseconds): call it from a worker thread
    (:meth:`PasswordChecks.hash`).

    Raises:
        ValueError: ``algorithm`` is unknown, or the password is longer than bcrypt takes
            (:data:`BCRYPT_MAX_PASSWORD_BYTES` bytes in UTF-8) with ``bcrypt``.
    """
    if algorithm == "argon2id":
        return _ARGON2.hash(password)
    if algorithm == "bcrypt":
        if len(password.encode()) > BCRYPT_MAX_PASSWORD_BYTES:
            raise ValueError(
                f"bcrypt takes at most {BCRYPT_MAX_PASSWORD_BYTES} bytes of password; "
                "use argon2id or pbkdf2 for longer ones"
            )
        return _BCRYPT.hash(password)
    if algorithm == "pbkdf2":
        return _pbkdf2_hash(password.encode(), PBKDF2_ITERATIONS, secrets.token_bytes(PBKDF2_SALT_BYTES))
    raise ValueError(
        f"unknown password hash algorithm {algorithm!r} (expected one of {', '.join(ALGORITHMS)})"
    )


def _pbkdf2_hash(password: bytes, iterations: int, salt: bytes) -> str:
    digest = hashlib.pbkdf2_hmac("sha512", password, salt, iterations)
    salt_text = base64.b64encode(salt).decode().rstrip("=")
    digest_text = base64.b64encode(digest).decode().rstrip("=")
    return f"$pbkdf2-sha512$i={iterations}${salt_text}${digest_text}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether ``password`` (the MQTT password field: any bytes) matches ``encoded``.

    False for a hash in no known format, a malformed one, or one beyond the cost caps; and for an
    argon2/bcrypt hash when the password is not UTF-8 (those libraries take text) or, for bcrypt,
    longer than 72 bytes. Comparisons of our own are constant-time. CPU-heavy: call it from a worker
    thread (:class:`PasswordChecks`). Never raises.
    """
    try:
        return _verify(password, encoded)
    except Exception:  # never raises: a hash we cannot check (whatever the library says) is a mismatch
        logger.debug("password hash check failed", exc_info=True)
        return False


def _verify(password: bytes, encoded: str) -> bool:
    if not isinstance(password, bytes | bytearray):
        return False
    parsed = _parse(encoded)
    if parsed is None:
        return False
    scheme = parsed.cost[0]
    if scheme in ("7", "pbkdf2-sha512"):
        computed = hashlib.pbkdf2_hmac("sha512", password, parsed.salt, parsed.iterations)
        return hmac.compare_digest(computed, parsed.digest)
    if scheme == "6":
        return hmac.compare_digest(hashlib.sha512(bytes(password) + parsed.salt).digest(), parsed.digest)
    try:
        text = bytes(password).decode("utf-8")
    except UnicodeDecodeError:
        return False
    if scheme == "bcrypt":
        if len(password) > BCRYPT_MAX_PASSWORD_BYTES:
            return False
        return _BCRYPT.verify(text, encoded)
    return _ARGON2.verify(text, encoded)


# ------------------------------------------------------------------------------------------------
# Unknown users: spend the time of a real check
# ------------------------------------------------------------------------------------------------


def dummy_hash(like: str | None = None) -> str:
    """A hash of a random password (which nobody knows) in the same scheme and with the same cost as
    ``like``, so that checking a password against it takes as long as against ``like``; argon2id
    with the default cost when ``like`` is None or not a known format. Made once per distinct cost
    (the first call for a cost also pays for making it) and cached. Never raises."""
    parsed = _parse(like) if like is not None else None
    return _dummy_for(parsed.cost if parsed is not None else ("argon2-default",))


@functools.lru_cache(maxsize=_MAX_DUMMY_HASHES)
def _dummy_for(cost: tuple[str | int, ...]) -> str:
    password = secrets.token_urlsafe(24)
    scheme = cost[0]
    if scheme == "7":
        salt = base64.b64encode(secrets.token_bytes(12)).decode()
        digest = base64.b64encode(hashlib.pbkdf2_hmac("sha512", password.encode(), b"", 1)).decode()
        # Only the cost matters: the digest is never meant to match.
        return f"$7${cost[1]}${salt}${digest}"
    if scheme == "pbkdf2-sha512":
        return _pbkdf2_hash(password.encode(), int(cost[1]), secrets.token_bytes(PBKDF2_SALT_BYTES))
    if scheme == "6":
        salt = base64.b64encode(secrets.token_bytes(12)).decode()
        return f"$6${salt}${base64.b64encode(hashlib.sha512(password.encode()).digest()).decode()}"
    if scheme == "bcrypt":
        return BcryptHasher(rounds=int(cost[1])).hash(password)
    if scheme == "argon2":
        _, variant, time_cost, memory_cost, parallelism, salt_len, hash_len = cost
        hasher = argon2.PasswordHasher(
            time_cost=int(time_cost),
            memory_cost=int(memory_cost),
            parallelism=int(parallelism),
            hash_len=int(hash_len),
            salt_len=int(salt_len),
            type=argon2.Type(variant),
        )
        return hasher.hash(password)
    return _ARGON2.hash(password)


def verify_dummy(password: bytes, like: str | None = None) -> bool:
    """Check ``password`` against :func:`dummy_hash` of ``like`` and return False: what an unknown
    user costs, so that a wrong user name takes as long as a wrong password. Never raises."""
    verify_password(password, dummy_hash(like))
    return False


def typical_hash(hashes: Iterable[str]) -> str | None:
    """One of ``hashes`` with the most common scheme and cost among them (what an unknown user's
    check should cost to look like a known one's), or None when none is a known format. Never
    raises."""
    exemplars: dict[tuple[str | int, ...], str] = {}
    counts: Counter[tuple[str | int, ...]] = Counter()
    for encoded in hashes:
        parsed = _parse(encoded)
        if parsed is not None:
            exemplars.setdefault(parsed.cost, encoded)
            counts[parsed.cost] += 1
    if not counts:
        return None
    return exemplars[counts.most_common(1)[0][0]]


# ------------------------------------------------------------------------------------------------
# Worker threads
# ------------------------------------------------------------------------------------------------


class PasswordChecks:
    """Password checks in ``workers`` threads, at most ``max_pending`` waiting or running at once.

    ``pending`` (checks waiting or running) and ``busy_refusals`` (checks refused because
    ``max_pending`` were) are for metrics. A check whose caller is cancelled still counts until its
    thread is done with it: the bound is on the work, not on the callers.
    """

    def __init__(self, workers: int = 2, max_pending: int = 64) -> None:
        """Start ``workers`` threads (lazily, as checks arrive).

        Raises:
            ValueError: ``workers`` or ``max_pending`` is less than 1.
        """
        if workers < 1 or max_pending < 1:
            raise ValueError("PasswordChecks needs at least one worker and one pending check")
        self.workers = workers
        self.max_pending = max_pending
        self.pending = 0
        self.busy_refusals = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="password-check")
        self._closed = False

    async def verify(self, password: bytes, encoded: str) -> bool | None:
        """:func:`verify_password` in a worker; None, without doing it, when ``max_pending`` checks
        are already waiting or running or the pool is closed (refuse the client: server busy).
        Never raises."""
        return await self._bounded(verify_password, password, encoded)

    async def verify_unknown(self, password: bytes, like: str | None = None) -> bool | None:
        """:func:`verify_dummy` in a worker, for a user who does not exist: False after the time a
        check against a hash like ``like`` takes, or None when busy, as :meth:`verify` would.
        Never raises."""
        return await self._bounded(verify_dummy, password, like)

    async def _bounded(self, function: Callable[[bytes, _T], bool], password: bytes, arg: _T) -> bool | None:
        if self._closed or self.pending >= self.max_pending:
            self.busy_refusals += 1
            return None
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, function, password, arg)
        except RuntimeError:  # the pool was shut down under us
            self.busy_refusals += 1
            return None
        self.pending += 1
        # Counted down when the thread is done, not when the caller stops waiting (cancelled).
        future.add_done_callback(self._done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and not (task is not None and task.cancelling()):
                # close() dropped the check before it ran; our caller itself was not cancelled.
                self.busy_refusals += 1
                return None
            raise

    def _done(self, _future: asyncio.Future[bool]) -> None:
        self.pending -= 1

    async def hash(self, password: str, algorithm: str) -> str:
        """:func:`hash_password` in a worker (for the admin API; not bounded by ``max_pending``).

        Raises:
            ValueError: as :func:`hash_password`.
            RuntimeError: the pool is closed.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, hash_password, password, algorithm)

    def close(self) -> None:
        """Shut the threads down: checks not started are dropped (their callers see CancelledError),
        running ones finish in the background; later calls to :meth:`verify` return None. Never
        raises."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


#: The verdict when :class:`PasswordChecks` is full: the server's failure, not the client's.
BUSY: Final = Verdict(Outcome.IGNORE, error=True, reason="password checks busy")


async def check_password(
    checks: PasswordChecks, password: bytes | None, encoded: str | None, typical: str | None
) -> Verdict:
    """The verdict of a password-based backend on one user: ``encoded`` is the user's hash (None:
    no such user, answered ``ignore`` after spending the time of a check like ``typical``, so
    that timing does not tell which user names exist); no or a wrong password is ``deny`` (after
    the same check), the right one ``allow``; :data:`BUSY` when the checks are full. Never raises."""
    # No password is checked like an empty one, then refused: same time as a wrong password.
    given = password if password is not None else b""
    if encoded is None:
        if await checks.verify_unknown(given, typical) is None:
            return BUSY
        return Verdict(Outcome.IGNORE, reason="unknown user")
    matched = await checks.verify(given, encoded)
    if matched is None:
        return BUSY
    if password is None:
        return Verdict(Outcome.DENY, reason="no password")
    if not matched:
        return Verdict(Outcome.DENY, reason="bad password")
    return Verdict(Outcome.ALLOW)
