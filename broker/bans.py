"""Runtime bans: by real address (``peerhost``: an address or a CIDR), ``clientid`` or ``username``.

Bans live in memory and in ``<node.data_dir>/bans.json``. Memory comes first: :meth:`BanStore.add`,
:meth:`~BanStore.delete` and :meth:`~BanStore.purge` change the list at once (the next CONNECT sees
it) and return; the file follows within moments, written by a background thread so that no CONNECT
waits for a disc. Changes that come in a burst (a scan tripping ``failure_ban`` from many addresses, a
scripted import) are coalesced: the thread waits :data:`COALESCE_DELAY`, then writes the latest full
list once. Each write replaces the file atomically (write a temporary file, fsync, rename, fsync the
directory): after a crash or ``kill -9`` at any moment the file holds an older or the latest list,
never a torn one; changes made in the last moments before such a crash may be missing from it.

A write that fails (disc full, a read-only or missing directory) is logged with the path and the
reason, counted in :attr:`BanStore.write_failures`, and retried at the next change; the bans keep
applying from memory meanwhile. :meth:`BanStore.flush` waits until the file holds the list (the broker
calls it when it stops) and raises :class:`BanError` if it cannot be written.

Matching costs a few dictionary look-ups whatever the number of bans: exact addresses in a dict,
networks by prefix length (:class:`_PeerhostIndex`). Bans with ``until`` expire; expired bans never
match, and are dropped by :meth:`BanStore.purge`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from broker.errors import RealIPError
from broker.files import replace_atomically
from broker.settings import parse_duration
from listeners.address import normalize_ip, parse_network

logger = logging.getLogger(__name__)

KINDS: Final = ("peerhost", "clientid", "username")

#: Longest ban value accepted (an MQTT client id or username is at most 65535 bytes; a ban list
#: is read on every CONNECT, so keep entries sane).
MAX_VALUE_LENGTH: Final = 1024

FILE_NAME: Final = "bans.json"
FILE_VERSION: Final = 1

#: Seconds the writer waits after a change before writing, so that a burst of bans makes one write
#: (each write is a full list with two fsyncs). Short next to anything an operator notices; at most
#: this much (plus one write) of changes is missing from the file after a crash.
COALESCE_DELAY: Final = 0.05

#: Seconds :meth:`BanStore.flush` waits for the file: one write of even 100,000 bans takes well under
#: a second, and a stopping broker must not hang on a stuck disc (a dead NFS server).
FLUSH_TIMEOUT: Final = 10.0


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
        if ip is None:
            return False
        client = _client_key(ip)
        if client is None:
            return False
        try:
            version, number, shift = _cached_network_key(self.value)
        except ValueError:  # a Ban built by hand with a value canonical_value would refuse
            return False
        return client[0] == version and client[1] >> shift == number >> shift

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


@functools.lru_cache(maxsize=4096)
def _client_key(ip: str) -> tuple[int, int] | None:
    """A client's address as (IP version, integer), compared as :meth:`listeners.address.Networks.contains`
    compares: IPv4-mapped IPv6 becomes IPv4, a zone index is ignored. ``None`` if ``ip`` is not an
    address. Never raises.

    Cached like :func:`~listeners.address.normalize_ip`: the same clients and balancers come back.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


def _network_key(value: str) -> tuple[int, int, int]:
    """A ``peerhost`` ban value as (IP version, network address as an integer, host bits): an
    address is in the network when both integers agree once shifted right by the host bits (0 for
    an exact address). An IPv4-mapped value is the IPv4 network (:func:`parse_network`).

    Raises:
        ValueError: ``value`` is not an address or a network with its host bits zero.
    """
    network = parse_network(value)
    return network.version, int(network.network_address), network.max_prefixlen - network.prefixlen


# Cached for Ban.applies_to, which broker/operations.py asks of one new ban for every live client.
_cached_network_key = functools.lru_cache(maxsize=1024)(_network_key)


class _PeerhostIndex:
    """The ``peerhost`` bans, found in a few dictionary look-ups instead of a scan of every ban.

    Per IP version, one dict per number of host bits present: ``{host_bits: {network >> host_bits:
    [bans]}}``. Exact addresses (a plain address, a /32, a /128) are the 0-host-bit dict, keyed by the
    normalized address's integer. A look-up shifts the client's address for each length present,
    exact first, then longest prefix first: at most 33 or 129 look-ups, usually a handful. A slot
    holds a list because two bans can cover the same addresses (``10.0.0.1`` and ``10.0.0.1/32``),
    and one of them may have expired.

    Used from one thread (the event loop's); not locked.
    """

    __slots__ = ("_order", "_tables")

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        """Index ``bans`` (``peerhost`` ones; others are ignored).

        Raises:
            ValueError: a ban's value is not an address or a network.
        """
        self._tables: dict[int, dict[int, dict[int, list[Ban]]]] = {4: {}, 6: {}}
        # The same tables by ascending host bits (exact first, then longest prefix): what match walks.
        self._order: dict[int, list[tuple[int, dict[int, list[Ban]]]]] = {4: [], 6: []}
        for ban in bans:
            if ban.kind == "peerhost":
                self.add(ban)

    def add(self, ban: Ban) -> None:
        """Index a ``peerhost`` ban, in place of an indexed one with the same value.

        Raises:
            ValueError: its value is not an address or a network.
        """
        version, number, shift = _network_key(ban.value)
        tables = self._tables[version]
        table = tables.get(shift)
        if table is None:
            table = tables[shift] = {}
            self._order[version] = sorted(tables.items(), key=lambda item: item[0])
        slot = table.setdefault(number >> shift, [])
        for index, held in enumerate(slot):
            if held.value == ban.value:
                slot[index] = ban
                return
        slot.append(ban)

    def remove(self, ban: Ban) -> None:
        """Forget the ``peerhost`` ban with ``ban``'s value, if indexed.

        Raises:
            ValueError: its value is not an address or a network.
        """
        version, number, shift = _network_key(ban.value)
        tables = self._tables[version]
        table = tables.get(shift)
        if table is None:
            return
        key = number >> shift
        slot = [held for held in table.get(key, ()) if held.value != ban.value]
        if slot:
            table[key] = slot
            return
        table.pop(key, None)
        if not table:
            del tables[shift]
            self._order[version] = sorted(tables.items(), key=lambda item: item[0])

    def match(self, ip: str, now: float) -> Ban | None:
        """The most specific unexpired ban covering ``ip`` (among bans covering the same addresses,
        the first indexed); ``None`` for none or for text that is not an address. Never raises."""
        client = _client_key(ip)
        if client is None:
            return None
        version, number = client
        for shift, table in self._order[version]:
            slot = table.get(number >> shift)
            if slot is not None:
                for ban in slot:
                    if not ban.expired(now):
                        return ban
        return None


def _document(bans: Iterable[Ban]) -> bytes:
    """The ban file's content (the fields of :class:`Ban`, in order). Built field by field:
    ``dataclasses.asdict`` copies recursively, 54 ms instead of 2 ms for 10,000 bans."""
    entries = [
        {"kind": b.kind, "value": b.value, "reason": b.reason, "by": b.by, "at": b.at, "until": b.until}
        for b in bans
    ]
    return json.dumps({"version": FILE_VERSION, "bans": entries}, indent=1).encode()


class BanStore:
    """The ban list: in memory, indexed for :meth:`match`, and in its file, written in the background.

    The public methods are called from one thread (the event loop's) and never wait for the disc,
    except :meth:`flush`. The writer thread reads the list under ``_lock``, which guards the list and
    the writer's state.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._bans: dict[tuple[str, str], Ban] = {}
        self._peerhosts = _PeerhostIndex()
        #: Writes of the ban file that failed since start (``/metrics``).
        self.write_failures = 0
        self._lock = threading.Lock()
        # Notified when the writer is told to hurry (flush) and when it has written or ended.
        self._wake = threading.Condition(self._lock)
        self._changes = 0  # changes made in memory so far
        self._attempted = 0  # the changes the last write (or attempt) covered
        self._written = 0  # the changes the file holds
        self._error: str | None = None  # why the last write failed; None once one succeeds
        self._flushing = 0  # flush() calls waiting: the writer skips COALESCE_DELAY
        self._writer: threading.Thread | None = None
        #: Told of every ban added or deleted here ("add" / "delete", the ban), unless the change
        #: came from elsewhere (``shared=False``): the cluster shares them.
        self.on_change: Callable[[str, Ban], None] | None = None

    def load(self) -> None:
        """Replace the list in memory with the ban file's, if there is one (at start, before changes).

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
            bans = {(ban.kind, ban.value): ban for ban in (Ban(**entry) for entry in entries)}
            for ban in bans.values():
                canonical_value(ban.kind, ban.value)
            index = _PeerhostIndex(bans.values())
        except (ValueError, TypeError, KeyError, BanError) as exc:
            raise BanError(f"{self.path}: not a valid ban file ({exc}); fix or remove it") from None
        with self._lock:
            self._bans = bans
            self._peerhosts = index
            # The file holds this list: nothing to write.
            self._attempted = self._written = self._changes

    def add(self, ban: Ban, *, shared: bool = True) -> Ban:
        """Add or replace a ban; it applies at once and the file follows (see the module docstring).
        Returns the ban as stored (its value canonical). ``shared``: tell :attr:`on_change` (False
        for a ban another node made).

        Raises:
            BanError: the kind or value is invalid (nothing changed).
        """
        ban = Ban(ban.kind, canonical_value(ban.kind, ban.value), ban.reason, ban.by, ban.at, ban.until)
        if ban.kind == "peerhost":
            self._peerhosts.add(ban)
        with self._lock:
            self._bans[(ban.kind, ban.value)] = ban
            self._changed()
        if shared and self.on_change is not None:
            self.on_change("add", ban)
        return ban

    def delete(self, kind: str, value: str, *, shared: bool = True) -> Ban | None:
        """Remove a ban at once (the file follows); ``None`` if there was none. ``shared`` as
        :meth:`add`.

        Raises:
            BanError: the kind or value is invalid.
        """
        key = (kind, canonical_value(kind, value))
        with self._lock:
            removed = self._bans.pop(key, None)
            if removed is None:
                return None
            self._changed()
        if removed.kind == "peerhost":
            self._peerhosts.remove(removed)
        if shared and self.on_change is not None:
            self.on_change("delete", removed)
        return removed

    def purge(self, now: float | None = None) -> list[Ban]:
        """Drop expired bans (the file follows); returns them. Never raises."""
        now = time.time() if now is None else now
        expired = [ban for ban in self._bans.values() if ban.expired(now)]
        if not expired:
            return expired
        with self._lock:
            for ban in expired:
                del self._bans[(ban.kind, ban.value)]
            self._changed()
        for ban in expired:
            if ban.kind == "peerhost":
                self._peerhosts.remove(ban)
        return expired

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Block until the file holds every change made so far: write it now (without
        :data:`COALESCE_DELAY`), retrying a write that failed. For the broker's stop and for tests;
        it blocks the calling thread for up to one write (up to ``timeout``).

        Raises:
            BanError: the file cannot be written (the path and the reason), or the write did not end
                within ``timeout`` seconds. The bans still apply from memory.
        """
        deadline = time.monotonic() + timeout
        with self._wake:
            target = self._changes
            if self._written >= target:
                return
            self._flushing += 1
            try:
                if self._error is not None:
                    self._attempted = self._written  # the last write failed: try again now
                self._start_writer()
                self._wake.notify_all()  # cut the writer's wait for a burst short
                while self._written < target and self._writer is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BanError(f"{self.path}: the ban file was not written within {timeout:g}s")
                    self._wake.wait(remaining)
            finally:
                self._flushing -= 1
            if self._written < target:
                raise BanError(f"{self.path}: cannot write the ban file: {self._error}")

    def _changed(self) -> None:
        """Count a change and have the writer write it. Called with ``_lock`` held."""
        self._changes += 1
        self._start_writer()

    def _start_writer(self) -> None:
        """Start the writer thread unless it runs (a running one sees the new change). Called with
        ``_lock`` held."""
        if self._writer is not None:
            return
        # Not a daemon: an interpreter that exits (the broker stopping, a test ending) waits for the
        # last write instead of cutting it off. The thread ends once the file is up to date.
        writer = threading.Thread(target=self._write_loop, name="ban-file-writer", daemon=False)
        try:
            writer.start()
        except RuntimeError as exc:  # no thread to be had (the process at its limit): a failed write
            self.write_failures += 1
            self._error = f"cannot start the writer thread: {exc}"
            logger.error("%s: cannot write the ban file: %s (retried at the next change)", self.path, exc)
            return
        self._writer = writer

    def _write_loop(self) -> None:
        """The writer thread: write the latest full list until the file holds every change, or a
        write failed with no change since (the next change retries), then end. Never raises."""
        while True:
            with self._wake:
                if self._attempted == self._changes:
                    self._writer = None
                    self._wake.notify_all()
                    return
                # Let the rest of a burst come in, unless flush() is waiting.
                deadline = time.monotonic() + COALESCE_DELAY
                while not self._flushing and (remaining := deadline - time.monotonic()) > 0:
                    self._wake.wait(remaining)
                target = self._attempted = self._changes
                bans = list(self._bans.values())
            error = self._write(bans)
            with self._wake:
                recovered = error is None and self._error is not None
            # Logged before flush() is told, so that what it waited for is in the log when it returns.
            if error is not None:
                logger.error(
                    "%s: cannot write the ban file: %s (the bans apply from memory; retried at the next "
                    "change)",
                    self.path,
                    error,
                )
            elif recovered:
                logger.warning("%s: the ban file is written again (it holds every ban)", self.path)
            with self._wake:
                if error is None:
                    self._written, self._error = target, None
                else:
                    self.write_failures += 1
                    self._error = error
                self._wake.notify_all()

    def _write(self, bans: list[Ban]) -> str | None:
        """Replace the file with ``bans``; the reason it failed, or ``None``. Never raises."""
        try:
            replace_atomically(self.path, _document(bans))
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception as exc:
            # Anything else too: a dead writer thread would never write a later change.
            logger.exception("%s: writing the ban file failed unexpectedly", self.path)
            return f"{type(exc).__name__}: {exc}"
        return None

    def __iter__(self) -> Iterator[Ban]:
        now = time.time()
        return iter([ban for ban in self._bans.values() if not ban.expired(now)])

    def get(self, kind: str, value: str) -> Ban | None:
        """The ban of ``kind`` on exactly ``value`` (in canonical form), if any. Never raises."""
        return self._bans.get((kind, value))

    def __len__(self) -> int:
        return len(self._bans)

    def match(self, ip: str | None, client_id: str | None = None, username: str | None = None) -> Ban | None:
        """The ban that applies to a client, if any; expired bans never match. Never raises.

        When several apply: the ``clientid`` ban, else the ``username`` ban, else the most specific
        ``peerhost`` ban (an exact address, then the longest prefix; among bans covering the same
        addresses, such as ``10.0.0.1`` and ``10.0.0.1/32``, the one added first). Its cost does not
        grow with the number of bans: a few dictionary look-ups.
        """
        if not self._bans:
            return None
        now = time.time()
        for kind, value in (("clientid", client_id), ("username", username)):
            if value is not None:
                ban = self._bans.get((kind, value))
                if ban is not None and not ban.expired(now):
                    return ban
        if ip is not None:
            return self._peerhosts.match(ip, now)
        return None
