"""Who may connect: access lists and bans, decided on the real address (and client id, username).

:class:`Gatekeeper` is asked twice: with the address alone as soon as a listener knows it (a
WebSocket upgrade is answered 403), and with the CONNECT's client id and username before the
engine touches any session (CONNACK 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.bans import BanStore
from broker.settings import AccessSettings, Settings


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client is refused; ``reason`` is ``access`` or ``banned`` (metrics and audit label)."""

    reason: str
    message: str


class Gatekeeper:
    """Access rules per listener plus the runtime ban list."""

    def __init__(self, settings: Settings, bans: BanStore) -> None:
        self.bans = bans
        self._access: dict[str, AccessSettings] = {
            listener.id: settings.access_for(listener) for listener in settings.listeners
        }
        self._global = settings.access

    def check_address(self, listener_id: str, ip: str) -> Refusal | None:
        """Access lists, then ``peerhost`` bans. Never raises."""
        access = self._access.get(listener_id, self._global)
        if access.refuses(ip):
            scope = "listener" if access is not self._global else "global"
            return Refusal("access", f"{ip} is refused by the {scope} access rules")
        ban = self.bans.match(ip)
        if ban is not None:
            return Refusal("banned", f"{ip} is banned (peerhost {ban.value}{_why(ban.reason)})")
        return None

    def check_client(self, listener_id: str, ip: str, client_id: str, username: str | None) -> Refusal | None:
        """:meth:`check_address`, then ``clientid`` and ``username`` bans. Never raises."""
        refusal = self.check_address(listener_id, ip)
        if refusal is not None:
            return refusal
        ban = self.bans.match(None, client_id, username)
        if ban is not None:
            return Refusal("banned", f"{ban.kind} {ban.value!r} is banned{_why(ban.reason)}")
        return None


def _why(reason: str) -> str:
    return f": {reason}" if reason else ""
