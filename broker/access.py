"""Who may connect: access lists, bans and per-address limits, decided on the real address.

:class:`Gatekeeper` is asked twice: with the address alone as soon as a listener knows it (a
WebSocket upgrade is answered 403), and with the CONNECT's client id and username before the
engine touches any session. It also keeps what is counted per *real* client address (after the
PROXY header or forwarded headers, never the load balancer's): connections and CONNECT rate per
listener (``max_connections_per_ip``, ``max_conn_rate_per_ip``), and failed authentications,
which ban the address for a while (``authentication_policy.failure_ban``). One abusive client
behind a load balancer is refused; its neighbours behind the same balancer are not.

It logs the refusals too (:meth:`Gatekeeper.log_refusal`, for the engine and the listeners): the
first per (reason, client address) at once, then one summary line per interval, so a banned client
retrying without end cannot flood the log (every refusal is still counted in the metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.bans import Ban, BanError, BanStore
from broker.logs import ThrottleTable
from broker.mqtt import reasons
from broker.settings import AccessSettings, FailureBanSettings, ListenerSettings, Rate, Settings
from listeners.options import UNLIMITED

logger = logging.getLogger(__name__)

#: Addresses tracked at most per table (CONNECT rate per listener, authentication failures): an
#: attacker cycling through many addresses (IPv6 gives him plenty) must not grow memory without
#: bound. Past it the oldest entries are forgotten, which can only make a limit more lenient.
MAX_TRACKED_ADDRESSES: Final = 100_000


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client is refused: ``reason`` is the metrics and audit label (``access``, ``banned``,
    ``conn_rate``, ``connections_per_ip``...), ``message`` the log sentence, ``code`` the MQTT 5
    CONNACK reason code."""

    reason: str
    message: str
    code: int = reasons.NOT_AUTHORIZED


class _RateLimiter:
    """A token bucket per address: ``rate.count`` CONNECTs per ``rate.period``, refilled evenly."""

    __slots__ = ("_buckets", "rate")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        #: ip -> (tokens left, when last counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, ip: str, now: float) -> bool:
        """Count one CONNECT from ``ip``; False when it is over the rate."""
        rate = self.rate
        tokens, last = self._buckets.pop(ip, (float(rate.count), now))
        tokens = min(float(rate.count), tokens + (now - last) * rate.count / rate.period)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if tokens < rate.count:  # a full bucket is the default: not worth remembering
            self._buckets[ip] = (tokens, now)
            _bound(self._buckets)
        return allowed


class _FailureCounter:
    """Failed authentications per address within a window (EMQX's flapping detection, by address)."""

    __slots__ = ("_failures", "settings")

    def __init__(self, settings: FailureBanSettings) -> None:
        self.settings = settings
        #: ip -> (failures, when the window started)
        self._failures: dict[str, tuple[int, float]] = {}

    def record(self, ip: str, now: float) -> int:
        """Count one failure; returns the failures of ``ip`` in its current window."""
        count, start = self._failures.pop(ip, (0, now))
        if now - start > self.settings.window_time:
            count, start = 0, now
        count += 1
        self._failures[ip] = (count, start)
        _bound(self._failures)
        return count

    def forget(self, ip: str) -> None:
        """``ip`` was banned: its count starts again. (A success does not reset it: one valid
        account must not let an attacker guess others' passwords at will.)"""
        self._failures.pop(ip, None)


def _bound(table: dict[str, tuple[float, float]] | dict[str, tuple[int, float]]) -> None:
    while len(table) > MAX_TRACKED_ADDRESSES:
        del table[next(iter(table))]  # dicts keep insertion order: the oldest goes


class Gatekeeper:
    """Access rules per listener, the runtime ban list, and the per-address counts."""

    def __init__(
        self,
        settings: Settings,
        bans: BanStore,
        *,
        on_ban: Callable[[Ban, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_ban(ban, failures)`` is told of each address banned for failed authentications."""
        self.bans = bans
        self._access: dict[str, AccessSettings] = {}
        self._global = settings.access
        self._listeners: dict[str, ListenerSettings] = {}
        self._rates: dict[str, _RateLimiter] = {}
        #: (listener id, ip) -> connected clients, on listeners with max_connections_per_ip only
        self._connections: dict[tuple[str, str], int] = {}
        self._counted: set[str] = set()
        self._failure_ban = settings.authentication_policy.failure_ban
        self._failures = _FailureCounter(self._failure_ban)
        self._on_ban = on_ban
        self._clock = clock
        #: Addresses banned for failed authentications since start (``/metrics``).
        self.failure_bans = 0
        #: Refusal log lines by (reason, client address): repeats held back and summed up.
        self.refusals = ThrottleTable()
        self.update(settings)

    def update(self, settings: Settings) -> None:
        """Take the access lists, per-address limits and failure-ban policy of ``settings`` (at
        start, and at a configuration reload). What was counted so far stays: rate buckets whose
        rate did not change, connection counts, failures; a listener that gets
        ``max_connections_per_ip`` by a reload counts the connections made from then on."""
        self._access = {listener.id: settings.access_for(listener) for listener in settings.listeners}
        self._global = settings.access
        self._listeners = {listener.id: listener for listener in settings.listeners}
        rates = {}
        for listener in settings.listeners:
            rate = listener.max_conn_rate_per_ip
            if rate is None:
                continue
            kept = self._rates.get(listener.id)
            rates[listener.id] = kept if kept is not None and kept.rate == rate else _RateLimiter(rate)
        self._rates = rates
        self._counted = {
            listener.id for listener in settings.listeners if listener.max_connections_per_ip != UNLIMITED
        }
        self._connections = {
            key: count for key, count in self._connections.items() if key[0] in self._counted
        }
        self._failure_ban = settings.authentication_policy.failure_ban
        self._failures.settings = self._failure_ban

    def log_refusal(self, reason: str, ip: str, log: logging.Logger, message: str, *args: object) -> None:
        """Log a refusal of ``ip`` for ``reason`` as a WARNING on ``log``: the first at once, then
        at most one line per ``logs.LOG_INTERVAL`` per (reason, address), saying how many were held
        back (``listeners.connection.RefusalLog``). Never raises."""
        self.refusals.log((reason, ip), log, logging.WARNING, message, *args)

    def check_address(self, listener_id: str, ip: str) -> Refusal | None:
        """Access lists, then ``peerhost`` bans. Never raises."""
        access = self._access.get(listener_id, self._global)
        if access.refuses(ip):
            scope = "listener" if access is not self._global else "global"
            return Refusal("access", f"{ip} is refused by the {scope} access rules")
        ban = self.bans.match(ip)
        if ban is not None:
            return Refusal(
                "banned", f"{ip} is banned (peerhost {ban.value}{_why(ban.reason)})", reasons.BANNED
            )
        return None

    def check_client(self, listener_id: str, ip: str, client_id: str, username: str | None) -> Refusal | None:
        """:meth:`check_bans`, then the per-address limits of the listener (this counts the CONNECT
        towards ``max_conn_rate_per_ip``). Never raises."""
        refusal = self.check_bans(listener_id, ip, client_id, username)
        if refusal is not None:
            return refusal
        listener = self._listeners.get(listener_id)
        if listener is None:
            return None
        # Every CONNECT counts towards the rate, a refused one too: retrying is what it limits.
        limiter = self._rates.get(listener_id)
        if limiter is not None and not limiter.take(ip, self._clock()):
            return Refusal(
                "conn_rate",
                f"{ip} connects faster than {listener.max_conn_rate_per_ip} "
                f"(listeners.{listener.type}.{listener.name}.max_conn_rate_per_ip)",
                reasons.CONNECTION_RATE_EXCEEDED,
            )
        return self.check_connections(listener_id, ip)

    def check_bans(self, listener_id: str, ip: str, client_id: str, username: str | None) -> Refusal | None:
        """:meth:`check_address`, then ``clientid`` and ``username`` bans (asked again when the
        client is admitted: a ban may have come while it authenticated, and SCRAM learns the
        username only then). Never raises."""
        refusal = self.check_address(listener_id, ip)
        if refusal is not None:
            return refusal
        ban = self.bans.match(None, client_id, username)
        if ban is not None:
            return Refusal("banned", f"{ban.kind} {ban.value!r} is banned{_why(ban.reason)}", reasons.BANNED)
        return None

    def check_connections(self, listener_id: str, ip: str) -> Refusal | None:
        """``max_connections_per_ip`` of the listener (asked again when a client is attached after
        an authentication that took a while: others from its address may have come meanwhile).
        Never raises."""
        listener = self._listeners.get(listener_id)
        if listener is None:
            return None
        limit = listener.max_connections_per_ip
        if limit != UNLIMITED and self._connections.get((listener_id, ip), 0) >= limit:
            return Refusal(
                "connections_per_ip",
                f"{ip} has {limit} connections already "
                f"(listeners.{listener.type}.{listener.name}.max_connections_per_ip)",
                reasons.QUOTA_EXCEEDED,
            )
        return None

    def connected(self, listener_id: str, ip: str) -> None:
        """A client from ``ip`` was admitted on ``listener_id``."""
        if listener_id not in self._counted:
            return
        key = (listener_id, ip)
        self._connections[key] = self._connections.get(key, 0) + 1

    def disconnected(self, listener_id: str, ip: str) -> None:
        """A client admitted with :meth:`connected` is gone."""
        if listener_id not in self._counted:
            return
        key = (listener_id, ip)
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
        else:
            self._connections.pop(key, None)

    def authentication_failed(self, ip: str) -> Ban | None:
        """Count a failed authentication from ``ip``; ban the address once it has failed
        ``max_count`` times within ``window_time``. Returns the new ban. Never raises. The ban applies
        at once; the ban store writes its file in the background (and logs a write that fails)."""
        settings = self._failure_ban
        if not settings.enable:
            return None
        now = self._clock()
        count = self._failures.record(ip, now)
        if count < settings.max_count:
            return None
        self._failures.forget(ip)
        wall = time.time()
        reason = (
            f"{count} failed authentications within {settings.window_time:g}s "
            "(authentication_policy.failure_ban)"
        )
        try:
            ban = self.bans.add(Ban("peerhost", ip, reason, "failure_ban", wall, wall + settings.ban_time))
        except BanError as exc:
            logger.error("cannot ban %s after %d failed authentications: %s", ip, count, exc)
            return None
        self.failure_bans += 1
        logger.warning("%s banned for %gs: %s", ip, settings.ban_time, reason)
        if self._on_ban is not None:
            self._on_ban(ban, count)
        return ban


def _why(reason: str) -> str:
    return f": {reason}" if reason else ""
