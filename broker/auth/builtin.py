"""``mechanism: password_based, backend: built_in_database``: users kept by the broker itself.

Users live in memory and in ``<node.data_dir>/users.json`` (mode 0600), which is replaced
atomically on every change, as the ban list is (write a temporary file, fsync, rename, fsync the
directory): after a crash at any moment the file holds the old or the new list, never a torn one.
A write that fails leaves the users in memory as they were. The file::

    {"version": 1,
     "users": [{"username": "alice",
                "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$...",
                "is_superuser": false,
                "created_at": 1764633600.0,
                "scram": {"sha256": {"salt": "<base64>", "iterations": 4096,
                                     "stored_key": "<base64>", "server_key": "<base64>"},
                          "sha512": {...}}}]}

(bytes in standard base64 with padding; ``created_at`` in seconds since the epoch). Every user gets
a password hash (:mod:`broker.auth.passwords`, the configured algorithm) for ``password_based``
and SCRAM credentials for both SHA-256 and SHA-512 (:mod:`broker.auth.scram`) for MQTT 5 enhanced
authentication, all made from the same password when it is set. Hashing is CPU-heavy, so writers
take users already made by :meth:`UserStore.make_user`, which the caller runs in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from broker.auth.base import IGNORE, Credentials, Outcome, Verdict
from broker.auth.passwords import PasswordChecks, check_password, hash_password, is_known_format, typical_hash
from broker.auth.scram import ScramCredentials, make_credentials
from broker.errors import RealIPError
from broker.files import replace_atomically
from broker.settings import HASH_ALGORITHMS

FILE_NAME: Final = "users.json"
FILE_VERSION: Final = 1

#: Longest user name accepted, in characters. MQTT allows 65535 bytes, but a user name is a
#: dictionary key, a log field and an API path segment: nobody names an account this long, and
#: SCRAM (broker.auth.scram.MAX_USERNAME_BYTES) accepts no longer ones either.
MAX_USERNAME_LENGTH: Final = 1024
#: Longest password accepted, in UTF-8 bytes: the MQTT password field holds at most 65535 bytes, so
#: a longer password could never be sent.
MAX_PASSWORD_BYTES: Final = 65535

#: SCRAM algorithms every user gets credentials for, and their key length (the digest size).
SCRAM_ALGORITHMS: Final = {"sha256": 32, "sha512": 64}


class UserError(RealIPError):
    """A user request is invalid (bad user name or password, a user that exists already or does not
    exist), or the user file cannot be read or written (the message names the path)."""


@dataclass(frozen=True)
class User:
    """One user of the built-in database. Its repr never shows the hash or the SCRAM keys."""

    username: str
    password_hash: str = field(repr=False)
    is_superuser: bool = False
    #: Seconds since the epoch.
    created_at: float = 0.0
    #: SCRAM algorithm ("sha256", "sha512") -> credentials.
    scram: dict[str, ScramCredentials] = field(default_factory=dict, repr=False)

    def as_json(self) -> dict[str, Any]:
        """The API form, with EMQX's field names for built-in database users; never the hash."""
        return {
            "user_id": self.username,
            "is_superuser": self.is_superuser,
            "created_at": datetime.fromtimestamp(self.created_at, UTC).isoformat(timespec="seconds"),
        }


def check_username(username: str) -> None:
    """Refuse a user name the database does not take.

    Raises:
        UserError: not a string, empty, longer than :data:`MAX_USERNAME_LENGTH`, not encodable as
            UTF-8 (a lone surrogate), or holding a control character (MQTT forbids U+0000, and the
            others would garble logs and listings).
    """
    if not isinstance(username, str) or not username:
        raise UserError("the user name must not be empty")
    if len(username) > MAX_USERNAME_LENGTH:
        raise UserError(f"the user name is longer than {MAX_USERNAME_LENGTH} characters")
    try:
        username.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the user name is not valid UTF-8") from None
    if any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in username):
        raise UserError("the user name holds a control character")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    """Standard base64 (with its padding) -> bytes.

    Raises:
        TypeError: not a string.
        binascii.Error: not base64.
    """
    if not isinstance(text, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(text, validate=True)


def user_to_json(user: User) -> dict[str, Any]:
    """A user as the file (and the cluster's Redis) keeps it: with its hash and SCRAM keys."""
    return {
        "username": user.username,
        "password_hash": user.password_hash,
        "is_superuser": user.is_superuser,
        "created_at": user.created_at,
        "scram": {
            algorithm: {
                "salt": _b64(credentials.salt),
                "iterations": credentials.iterations,
                "stored_key": _b64(credentials.stored_key),
                "server_key": _b64(credentials.server_key),
            }
            for algorithm, credentials in user.scram.items()
        },
    }


def user_from_json(entry: Any) -> User:
    """A user of the file.

    Raises:
        TypeError, ValueError, KeyError, binascii.Error, UserError: the entry is not a valid user
            (the message says what is wrong, never a hash or a key).
    """
    if not isinstance(entry, dict):
        raise TypeError("a user is not an object")
    username = entry["username"]
    check_username(username)
    password_hash = entry["password_hash"]
    if not isinstance(password_hash, str) or not is_known_format(password_hash):
        raise ValueError(f"user {username!r}: the password hash is in no known format")
    is_superuser = entry["is_superuser"]
    created_at = entry["created_at"]
    if not isinstance(is_superuser, bool):
        raise TypeError(f"user {username!r}: is_superuser is not true or false")
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        raise TypeError(f"user {username!r}: created_at is not a number")
    scram_entries = entry.get("scram", {})
    if not isinstance(scram_entries, dict):
        raise TypeError(f"user {username!r}: scram is not an object")
    scram: dict[str, ScramCredentials] = {}
    for algorithm, item in scram_entries.items():
        if algorithm not in SCRAM_ALGORITHMS or not isinstance(item, dict):
            raise ValueError(f"user {username!r}: unknown SCRAM algorithm {algorithm!r}")
        credentials = ScramCredentials(
            salt=_unb64(item["salt"]),
            iterations=item["iterations"],
            stored_key=_unb64(item["stored_key"]),
            server_key=_unb64(item["server_key"]),
        )
        if len(credentials.stored_key) != SCRAM_ALGORITHMS[algorithm]:
            raise ValueError(f"user {username!r}: the {algorithm} SCRAM keys have the wrong length")
        scram[algorithm] = credentials
    return User(username, password_hash, is_superuser, float(created_at), scram)


class UserStore:
    """The built-in user database with its file."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._users: dict[str, User] = {}
        self._typical: str | None = None
        #: Told of every user added, changed or deleted here ("put" with the user, "delete" with
        #: the user removed), unless the change came from elsewhere (``shared=False``): the
        #: cluster shares them.
        self.on_change: Callable[[str, User], None] | None = None

    def load(self) -> None:
        """Read the user file, if there is one (none: no users).

        Raises:
            UserError: the file exists but cannot be read or is not a valid user file (the message
                names the path and says what is wrong).
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._take({})
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path}: cannot read the user file: {exc}") from None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("version") != FILE_VERSION:
                raise ValueError(f"not a version {FILE_VERSION} user file")
            entries = document.get("users")
            if not isinstance(entries, list):
                raise TypeError("no 'users' list")
            users: dict[str, User] = {}
            for entry in entries:
                user = user_from_json(entry)
                if user.username in users:
                    raise ValueError(f"user {user.username!r} appears twice")
                users[user.username] = user
        except (ValueError, TypeError, KeyError, binascii.Error, UserError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise UserError(f"{self.path}: not a valid user file ({what}); fix or remove it") from None
        self._take(users)

    def _take(self, users: dict[str, User]) -> None:
        self._users = users
        self._typical = typical_hash(user.password_hash for user in users.values())

    def get(self, username: str) -> User | None:
        """The user of that name, or None. Never raises."""
        return self._users.get(username)

    def list(self) -> builtins.list[User]:
        """Every user, sorted by name. Never raises."""
        return [self._users[name] for name in sorted(self._users)]

    def __len__(self) -> int:
        return len(self._users)

    def typical_hash(self) -> str | None:
        """A password hash of the most common algorithm and cost among the users (what a check for
        an unknown user should cost), None when there are no users. Never raises."""
        return self._typical

    @staticmethod
    def make_user(
        username: str, password: str, *, is_superuser: bool, algorithm: str, iteration_count: int = 4096
    ) -> User:
        """A new user, not yet stored: its password hashed with ``algorithm`` (one of
        ``settings.HASH_ALGORITHMS``) and SCRAM credentials for SHA-256 and SHA-512 with
        ``iteration_count`` PBKDF2 rounds. Pure but CPU-heavy (up to a few hundred milliseconds):
        run it in a worker thread.

        Raises:
            UserError: the user name is refused (:func:`check_username`), the password is empty,
                longer than :data:`MAX_PASSWORD_BYTES`, too long for bcrypt, or holds characters
                SCRAM's SASLprep prohibits, the algorithm is unknown, or ``iteration_count`` is out
                of SCRAM's range.
        """
        check_username(username)
        if not isinstance(password, str) or not password:
            raise UserError("the password must not be empty")
        try:
            size = len(password.encode("utf-8"))
        except UnicodeEncodeError:
            raise UserError("the password is not valid UTF-8") from None
        if size > MAX_PASSWORD_BYTES:
            raise UserError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes (MQTT's limit)")
        if algorithm not in HASH_ALGORITHMS:
            expected = ", ".join(HASH_ALGORITHMS)
            raise UserError(f"unknown password hash algorithm {algorithm!r} (expected one of {expected})")
        try:
            scram = {name: make_credentials(password, name, iteration_count) for name in SCRAM_ALGORITHMS}
            password_hash = hash_password(password, algorithm)
        except ValueError as exc:  # their messages never hold the password
            raise UserError(str(exc)) from None
        return User(username, password_hash, bool(is_superuser), time.time(), scram)

    def add(self, user: User) -> None:
        """Store a new user and persist the list.

        Raises:
            UserError: its name is refused or taken, or the file cannot be written (the users are
                then unchanged).
        """
        check_username(user.username)
        if user.username in self._users:
            raise UserError(f"user {user.username!r} already exists")
        self._commit({**self._users, user.username: user})
        self._tell("put", user)

    def put(self, user: User) -> None:
        """Add or replace a user another node of the cluster changed (not told to
        :attr:`on_change`), and persist the list.

        Raises:
            UserError: its name is refused, or the file cannot be written.
        """
        check_username(user.username)
        self._commit({**self._users, user.username: user})

    def _tell(self, change: str, user: User) -> None:
        if self.on_change is not None:
            self.on_change(change, user)

    def replace(self, user: User) -> User:
        """Replace an existing user (a new password, superuser flag) and persist the list. The user
        keeps its original ``created_at``; returns the user as stored.

        Raises:
            UserError: no user has that name, or the file cannot be written (the users are then
                unchanged).
        """
        previous = self._users.get(user.username)
        if previous is None:
            raise UserError(f"user {user.username!r} does not exist")
        stored = User(user.username, user.password_hash, user.is_superuser, previous.created_at, user.scram)
        self._commit({**self._users, user.username: stored})
        self._tell("put", stored)
        return stored

    def delete(self, username: str, *, shared: bool = True) -> User:
        """Remove a user and persist the list; returns the user removed. ``shared``: tell
        :attr:`on_change` (False for a deletion another node made).

        Raises:
            UserError: no user has that name, or the file cannot be written (the users are then
                unchanged).
        """
        removed = self._users.get(username)
        if removed is None:
            raise UserError(f"user {username!r} does not exist")
        self._commit({name: user for name, user in self._users.items() if name != username})
        if shared:
            self._tell("delete", removed)
        return removed

    def _commit(self, users: dict[str, User]) -> None:
        """Write ``users`` to the file, then (only then) take them.

        Raises:
            UserError: the file cannot be written.
        """
        try:
            self._save(users)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write the user file: {exc.strerror or exc}") from None
        self._take(users)

    def _save(self, users: dict[str, User]) -> None:
        """Replace the file atomically with ``users``.

        Raises:
            OSError: it cannot be written; the old file is then intact.
        """
        document = {"version": FILE_VERSION, "users": [user_to_json(users[name]) for name in sorted(users)]}
        replace_atomically(self.path, json.dumps(document, indent=1).encode())


class BuiltinAuthenticator:
    """Checks user names and passwords against the :class:`UserStore`."""

    name = "password_based:built_in_database"
    proves_username = True

    def __init__(self, store: UserStore, checks: PasswordChecks) -> None:
        self.store = store
        self._checks = checks

    async def start(self) -> None:
        """Nothing: the application loads the store (the admin API shares it). Never raises."""

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """No user name, or an unknown user: ``ignore`` (the latter after spending the time of a real
        check, so that timing does not tell which user names exist). Wrong or no password:
        ``deny``. Right: ``allow``, as a superuser if the user is one. Too many checks in flight:
        ``ignore`` with ``error`` set. Never raises.
        """
        username = credentials.username
        if not username:
            return IGNORE
        user = self.store.get(username)
        encoded = None if user is None else user.password_hash
        verdict = await check_password(self._checks, credentials.password, encoded, self.store.typical_hash())
        if user is not None and verdict.outcome is Outcome.ALLOW and user.is_superuser:
            return Verdict(Outcome.ALLOW, is_superuser=True)
        return verdict

    async def close(self) -> None:
        """Nothing to release. Never raises."""
