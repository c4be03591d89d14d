"""Runtime bans: by real address (``peerhost``: an address or a CIDR), ``clientid`` or ``username``.

Bans live in memory and in ``<node.data_dir>/bans.json``, which is replaced atomically on every
change (write a temporary file, fsync, rename, fsync the directory): after a crash or ``kill -9`` at
any moment the file holds either the old or the new list, never a torn one. Bans with ``until``
expire; expired bans are dropped when next seen.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from broker.errors import RealIPError
from broker.files import replace_atomically
from broker.settings import parse_duration
from listeners.address import IPNetwork, Networks, normalize_ip, parse_network

KINDS: Final = ("peerhost", "clientid", "username")

#: Longest ban value accepted (an MQTT client id or username is at most 65535 bytes; a ban list
#: is read on every CONNECT, so keep entries sane).
MAX_VALUE_LENGTH: Final = 1024

FILE_NAME: Final = "bans.json"
FILE_VERSION: Final = 1


class BanError(RealIPError):
    """A ban request is invalid, or the ban file cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Ban:
    """One ban. ``value`` of a ``peerhost`` ban is an address or a CIDR in canonical form."""

    kind: str
    value: str
    reason: str = ""
    by: str = "admin"
    at: float = 0.0
    until: float | None = None

    def applies_to(self, ip: str | None, client_id: str | None, username: str | None) -> bool:
        """Whether this ban matches a client (expiry aside). Never raises."""
        if self.kind == "clientid":
            return client_id == self.value
        if self.kind == "username":
            return username == self.value
        return ip is not None and Networks([parse_network(self.value)]).contains(ip)

    def expired(self, now: float) -> bool:
        """Whether the ban no longer applies at ``now``."""
        return self.until is not None and now >= self.until

    def as_json(self) -> dict[str, Any]:
        """The API form: EMQX's names (``as``, ``who``) and ISO 8601 times."""
        return {
            "as": self.kind,
            "who": self.value,
            "reason": self.reason,
            "by": self.by,
            "at": _iso(self.at),
            "until": None if self.until is None else _iso(self.until),
        }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def canonical_value(kind: str, value: str) -> str:
    """The stored form of a ban value; a ``peerhost`` becomes a canonical address or CIDR.

    Raises:
        BanError: unknown kind, empty or over-long value, or a peerhost that is not an address or
            network.
    """
    if kind not in KINDS:
        raise BanError(f"ban kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE_LENGTH:
        raise BanError(f"{kind} ban: the value must be 1 to {MAX_VALUE_LENGTH} characters")
    if kind != "peerhost":
        return value
    try:
        if "/" in value:
            return str(parse_network(value))
        return normalize_ip(value)
    except ValueError as exc:
        raise BanError(
            f"peerhost ban: {exc if '/' in value else repr(value) + ' is not an IP address'}"
        ) from None


_ISO_UNTIL = re.compile(r"^\d{4}-\d\d-\d\d")


def parse_until(text: str, now: float) -> float:
    """``--until``: an ISO 8601 time (``2026-12-01T00:00:00Z``) or a duration from now (``1h``).

    Raises:
        BanError: neither form, or not in the future.
    """
    if _ISO_UNTIL.match(text):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BanError(f"until: {text!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        until = moment.timestamp()
    else:
        try:
            until = now + parse_duration(text)
        except ValueError:
            raise BanError(f"until: {text!r} is neither an ISO 8601 time nor a duration like '1h'") from None
    if until <= now:
        raise BanError(f"until: {text!r} is not in the future")
    return until


class BanStore:
    """The ban list with its file."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._bans: dict[tuple[str, str], Ban] = {}
        self._networks: list[tuple[IPNetwork, Ban]] = []

    def load(self) -> None:
        """Read the ban file, if there is one.

        Raises:
            BanError: the file exists but cannot be read or is not a valid ban list (what and where).
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise BanError(f"{self.path}: cannot read the ban file: {exc}") from None
        try:
            document = json.loads(text)
            entries = document["bans"] if isinstance(document, dict) else None
            if not isinstance(entries, list):
                raise TypeError("no 'bans' list")
            bans = [Ban(**entry) for entry in entries]
            for ban in bans:
                canonical_value(ban.kind, ban.value)
        except (ValueError, TypeError, KeyError, BanError) as exc:
            raise BanError(f"{self.path}: not a valid ban file ({exc}); fix or remove it") from None
        self._replace({(ban.kind, ban.value): ban for ban in bans})

    def _replace(self, bans: dict[tuple[str, str], Ban]) -> None:
        self._bans = bans
        self._networks = [(parse_network(ban.value), ban) for ban in bans.values() if ban.kind == "peerhost"]

    def _save(self) -> None:
        document = {"version": FILE_VERSION, "bans": [asdict(ban) for ban in self._bans.values()]}
        replace_atomically(self.path, json.dumps(document, indent=1).encode())

    def add(self, ban: Ban) -> Ban:
        """Add or replace a ban and persist the list.

        Raises:
            BanError: the value is invalid, or the file cannot be written (the list is unchanged).
        """
        ban = Ban(ban.kind, canonical_value(ban.kind, ban.value), ban.reason, ban.by, ban.at, ban.until)
        previous = dict(self._bans)
        bans = dict(self._bans)
        bans[(ban.kind, ban.value)] = ban
        self._commit(bans, previous)
        return ban

    def delete(self, kind: str, value: str) -> Ban | None:
        """Remove a ban and persist the list; ``None`` if there was none.

        Raises:
            BanError: the value is invalid, or the file cannot be written (the list is unchanged).
        """
        key = (kind, canonical_value(kind, value))
        if key not in self._bans:
            return None
        previous = dict(self._bans)
        bans = dict(self._bans)
        removed = bans.pop(key)
        self._commit(bans, previous)
        return removed

    def _commit(self, bans: dict[tuple[str, str], Ban], previous: dict[tuple[str, str], Ban]) -> None:
        self._replace(bans)
        try:
            self._save()
        except OSError as exc:
            self._replace(previous)
            raise BanError(f"{self.path}: cannot write the ban file: {exc.strerror}") from None

    def purge(self, now: float | None = None) -> list[Ban]:
        """Drop expired bans (persisting the list if any went); returns them.

        Raises:
            BanError: the file cannot be written.
        """
        now = time.time() if now is None else now
        expired = [ban for ban in self._bans.values() if ban.expired(now)]
        if expired:
            self._commit({k: b for k, b in self._bans.items() if not b.expired(now)}, dict(self._bans))
        return expired

    def __iter__(self) -> Iterator[Ban]:
        now = time.time()
        return iter([ban for ban in self._bans.values() if not ban.expired(now)])

    def __len__(self) -> int:
        return len(self._bans)

    def match(self, ip: str | None, client_id: str | None = None, username: str | None = None) -> Ban | None:
        """The ban that applies to a client, if any (expired bans never match). Never raises."""
        if not self._bans:
            return None
        now = time.time()
        for kind, value in (("clientid", client_id), ("username", username)):
            if value is not None:
                ban = self._bans.get((kind, value))
                if ban is not None and not ban.expired(now):
                    return ban
        if ip is not None and self._networks:
            for network, ban in self._networks:
                if not ban.expired(now) and Networks([network]).contains(ip):
                    return ban
        return None
