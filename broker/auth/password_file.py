"""``mechanism: password_based, backend: password_file``: users from a ``mosquitto_passwd`` file.

The file holds one ``username:hash`` per line (any hash :mod:`broker.auth.passwords` checks: the
``$7$``/``$6$``/``$argon2id$`` that ``mosquitto_passwd`` writes, and ours); blank lines and lines
starting with ``#`` are skipped; blanks around the user name and the hash are ignored, as mosquitto
does. Unlike mosquitto, which skips a bad line with a notice, a bad line (no ``:``, an empty user
name, a hash in no known format, a user named twice) makes the whole file invalid: a user silently
missing is worse than a clear error.

The file is read at start (an error then stops the broker) and again whenever it changes: each
authentication compares ``os.stat`` of the path (mtime in ns, size, inode) with the copy read last,
so ``mosquitto_passwd`` editing it in place and an atomic replacement are both seen at the next
CONNECT. A new version that cannot be read or is invalid is logged once and the users read before
stay in force.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from broker.auth.base import IGNORE, AuthError, Credentials, Verdict
from broker.auth.passwords import PasswordChecks, check_password, is_known_format, typical_hash
from broker.settings import PasswordFileSettings

logger = logging.getLogger(__name__)

#: The largest password file read. It is read whole on every change; a few hundred thousand users
#: fit in 64 MiB, and a runaway file must not exhaust memory.
MAX_FILE_BYTES: Final = 64 * 1024 * 1024

#: (st_mtime_ns, st_size, st_ino): what tells a changed file.
Signature = tuple[int, int, int]


def _signature(stat: os.stat_result) -> Signature:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def read_password_file(path: str | Path) -> tuple[Signature, dict[str, str]]:
    """The users of a password file (user name -> encoded hash) and the file's signature.

    Raises:
        AuthError: the file cannot be read, is larger than :data:`MAX_FILE_BYTES`, or has a bad
            line (the message names the path and the line number, never a hash).
    """
    try:
        with open(path, "rb") as handle:
            # The signature of the very file read (fstat), not of whatever the path names later.
            signature = _signature(os.fstat(handle.fileno()))
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AuthError(f"{path}: cannot read the password file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise AuthError(f"{path}: the password file is larger than {MAX_FILE_BYTES} bytes")
    users: dict[str, str] = {}
    where: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise AuthError(f"{path}:{number}: the line is not UTF-8") from None
        if not line or line.startswith("#"):
            continue
        username, colon, encoded = line.partition(":")
        username, encoded = username.strip(" \t"), encoded.strip(" \t")
        # The hash is never quoted in a message: it is an offline-guessing target, and a line that
        # is no hash may be a plaintext password not yet converted with `mosquitto_passwd -U`.
        if not colon:
            raise AuthError(f"{path}:{number}: expected 'username:hash', found no ':'")
        if not username:
            raise AuthError(f"{path}:{number}: the user name is empty")
        if not encoded:
            raise AuthError(f"{path}:{number}: user {username!r} has no password hash")
        if not is_known_format(encoded):
            raise AuthError(
                f"{path}:{number}: user {username!r}: the password hash is in no known format "
                "(expected one written by mosquitto_passwd: $7$, $6$ or $argon2id$; "
                "a plaintext password must first be hashed with `mosquitto_passwd -U`)"
            )
        if username in users:
            raise AuthError(
                f"{path}:{number}: user {username!r} is already defined on line {where[username]}"
            )
        users[username] = encoded
        where[username] = number
    return signature, users


class PasswordFileAuthenticator:
    """Users and hashes from a ``mosquitto_passwd`` file, reloaded when it changes."""

    name = "password_based:password_file"
    proves_username = True

    def __init__(self, settings: PasswordFileSettings, checks: PasswordChecks) -> None:
        self.path = Path(settings.path)
        self._checks = checks
        self._users: dict[str, str] = {}
        #: A hash of the most common kind in the file: what an unknown user's check should cost.
        self._typical: str | None = None
        #: The signature last looked at (read or failed), or None when the path could not be stat'ed:
        #: a failure is logged once per change, not on every CONNECT.
        self._seen: Signature | None = None

    def __len__(self) -> int:
        return len(self._users)

    async def start(self) -> None:
        """Read the file.

        Raises:
            AuthError: it cannot be read or is invalid (path and line in the message).
        """
        self._load()

    def _load(self) -> None:
        """Read the file and take its users.

        Raises:
            AuthError: as :func:`read_password_file`; the users are then unchanged.
        """
        signature, users = read_password_file(self.path)
        self._users = users
        self._typical = typical_hash(users.values())
        self._seen = signature

    def _reload_if_changed(self) -> None:
        """Re-read the file if its signature changed; on failure keep the users and log the error
        once for this version of the file. Never raises."""
        try:
            signature: Signature | None = _signature(os.stat(self.path))
        except OSError:
            signature = None
        if signature is not None and signature == self._seen:
            return
        if signature is None and self._seen is None:
            return  # still missing: logged when it went
        try:
            self._load()
        except AuthError as exc:
            self._seen = signature
            logger.error("%s; still using the %d user(s) read before", exc, len(self._users))
            return
        logger.info("%s: password file reloaded, %d user(s)", self.path, len(self._users))

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """Check the user name and password against the file (re-read first if it changed).

        No user name, or a user not in the file: ``ignore`` (the latter after spending the time of a
        real check, so that timing does not tell which user names exist). Wrong or no password:
        ``deny``. Too many checks in flight: ``ignore`` with ``error`` set. Never raises.
        """
        self._reload_if_changed()
        username = credentials.username
        if not username:
            return IGNORE
        encoded = self._users.get(username)
        return await check_password(self._checks, credentials.password, encoded, self._typical)

    async def close(self) -> None:
        """Nothing to release (the checks' threads belong to the application). Never raises."""
