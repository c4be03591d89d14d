"""What operators do to a running broker (kick, ban, unban) and what it records (the audit trail).

Shared by the admin API and the engine's hooks so that every path writes the same audit records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from broker.access import Refusal
from broker.audit import AuditLog, address_fields, iso8601
from broker.auth.builtin import User, UserError, UserStore
from broker.auth.scram import DEFAULT_ITERATIONS
from broker.bans import Ban, BanError, BanStore, parse_until
from broker.engine import Engine, SessionView
from broker.settings import BuiltinDatabaseSettings, ScramSettings, Settings
from listeners.address import ClientAddress

logger = logging.getLogger(__name__)


class AuditTrail:
    """Turns engine and listener events into audit records (implements ``EngineHooks``)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def _client(self, event: str, view: SessionView, **extra: Any) -> None:
        self.log.write(
            event,
            listener=view.listener_id,
            clientid=view.client_id,
            username=view.username,
            proto_ver=view.proto_ver,
            **address_fields(view.address),
            **extra,
        )

    def connected(self, view: SessionView) -> None:
        """A client was admitted."""
        self._client("connected", view)

    def disconnected(self, view: SessionView, reason: str) -> None:
        """A client's connection ended."""
        self._client("disconnected", view, reason=reason)

    def refused(
        self,
        listener_id: str,
        address: ClientAddress,
        reason: str,
        client_id: str | None,
        username: str | None,
    ) -> None:
        """A CONNECT was refused (access, ban, auth)."""
        self.log.write(
            "refused",
            listener=listener_id,
            clientid=client_id,
            username=username,
            reason=reason,
            **address_fields(address),
        )

    def auth_failed(  # noqa: PLR0917 - EngineHooks' signature
        self,
        listener_id: str,
        address: ClientAddress,
        refusal: Refusal,
        client_id: str,
        username: str | None,
        by: str,
    ) -> None:
        """A CONNECT was refused by authentication: one ``auth_failed`` line with the real and the
        proxy address (the fail2ban filter in README.md reads it)."""
        self.log.write(
            "auth_failed",
            **address_fields(address),
            listener=listener_id,
            clientid=client_id,
            username=username,
            reason=refusal.reason,
            by=by or None,
            code=f"0x{refusal.code:02X}",
        )

    def failure_ban(self, ban: Ban, failures: int) -> None:
        """An address was banned for its failed authentications (``Gatekeeper``'s ``on_ban``)."""
        self.log.write(
            "ban_added",
            **{"as": ban.kind, "who": ban.value},
            reason=ban.reason,
            by=ban.by,
            until=_iso(ban.until),
            failures=failures,
        )

    def listener_refused(self, listener_id: str, address: ClientAddress, reason: str) -> None:
        """A connection was refused before MQTT (PROXY or header error, access, limits)."""
        self.log.write("refused", listener=listener_id, reason=reason, **address_fields(address))


class Operations:
    """Kick, ban, and manage the built-in database's users, with their audit records."""

    def __init__(
        self, engine: Engine, bans: BanStore, audit: AuditTrail, users: UserStore, settings: Settings
    ) -> None:
        self.engine = engine
        self.bans = bans
        self.audit = audit
        self.users = users
        builtin = [e for e in settings.authentication if isinstance(e, BuiltinDatabaseSettings)]
        #: How new passwords are stored: the built-in database's algorithm, and the SCRAM
        #: authenticators' iteration count (the highest configured).
        self._algorithm = builtin[0].password_hash_algorithm if builtin else "argon2id"
        iterations = [e.iteration_count for e in settings.authentication if isinstance(e, ScramSettings)]
        self._iterations = max(iterations, default=DEFAULT_ITERATIONS)

    async def add_user(self, username: str, password: str, *, is_superuser: bool, by: str = "admin") -> User:
        """Add a user to the built-in database (hashing in a worker thread).

        Raises:
            UserError: the name or password is refused, the user exists, or the file cannot be written.
        """
        user = await self._make_user(username, password, is_superuser)
        self.users.add(user)
        self.audit.log.write("user_added", username=username, is_superuser=is_superuser, by=by)
        return user

    async def update_user(
        self, username: str, *, password: str | None, is_superuser: bool | None, by: str = "admin"
    ) -> User:
        """Change a user's password and/or superuser flag.

        Raises:
            UserError: no such user, a refused password, or the file cannot be written.
        """
        current = self.users.get(username)
        if current is None:
            raise UserError(f"no user {username!r}")
        superuser = current.is_superuser if is_superuser is None else is_superuser
        if password is None:
            user = dataclasses.replace(current, is_superuser=superuser)
        else:
            user = await self._make_user(username, password, superuser)
        stored = self.users.replace(user)
        changed = ["password"] if password is not None else []
        if is_superuser is not None:
            changed.append("is_superuser")
        self.audit.log.write("user_updated", username=username, changed=changed, by=by)
        return stored

    async def _make_user(self, username: str, password: str, is_superuser: bool) -> User:
        """Hash a password the configured way, in a worker thread (it costs tens of ms).

        Raises:
            UserError: the name or password is refused.
        """
        return await asyncio.to_thread(
            UserStore.make_user,
            username,
            password,
            is_superuser=is_superuser,
            algorithm=self._algorithm,
            iteration_count=self._iterations,
        )

    def delete_user(self, username: str, *, by: str = "admin") -> User:
        """Remove a user (its connected clients stay connected until they reconnect).

        Raises:
            UserError: no such user, or the file cannot be written.
        """
        user = self.users.delete(username)
        self.audit.log.write("user_deleted", username=username, by=by)
        return user

    async def kick(self, client_id: str, *, by: str = "admin", reason: str = "kicked") -> bool:
        """Disconnect a client and discard its session; False if it is not connected."""
        view = self.engine.session(client_id)
        if view is None or not await self.engine.kick(client_id, reason):
            return False
        self.audit._client("kicked", view, by=by, reason=reason)
        return True

    async def add_ban(
        self, kind: str, value: str, *, reason: str = "", until: str | None = None, by: str = "admin"
    ) -> tuple[Ban, list[str]]:
        """Ban, persist, and kick the live clients the ban matches; returns the ban and who was kicked.

        Raises:
            BanError: invalid kind, value or until (the file is written in the background).
        """
        now = time.time()
        ban = self.bans.add(
            Ban(kind, value, reason, by, now, None if until is None else parse_until(until, now))
        )
        self.audit.log.write(
            "ban_added", **{"as": ban.kind, "who": ban.value}, reason=reason, by=by, until=_iso(ban.until)
        )
        return ban, await self._kick_banned(ban, by)

    async def _kick_banned(self, ban: Ban, by: str) -> list[str]:
        """Kick the connected clients ``ban`` matches; returns their ids."""
        kicked = []
        for view in self.engine.sessions():
            matches = ban.applies_to(view.address.ip, view.client_id, view.username)
            if matches and await self.kick(view.client_id, by=by, reason="banned"):
                kicked.append(view.client_id)
        if kicked:
            logger.info(
                "ban %s %s kicked %d client(s): %s", ban.kind, ban.value, len(kicked), ", ".join(kicked)
            )
        return kicked

    def apply_shared_user(self, change: str, user: User, node: str) -> None:
        """A user another node of the cluster added, changed (``change`` "put") or deleted:
        the same here (audited, ``by`` naming that node). Never raises (a user that cannot be
        stored here is logged)."""
        by = f"cluster@{node}"
        try:
            if change == "delete":
                if self.users.get(user.username) is not None:
                    self.users.delete(user.username, shared=False)
                    self.audit.log.write("user_deleted", username=user.username, by=by)
                return
            existed = self.users.get(user.username) is not None
            self.users.put(user)
        except UserError as exc:
            logger.warning("cluster: user %r from node %s not applied: %s", user.username, node, exc)
            return
        event = "user_updated" if existed else "user_added"
        self.audit.log.write(event, username=user.username, is_superuser=user.is_superuser, by=by)

    async def apply_shared_ban(self, change: str, ban: Ban, node: str) -> None:
        """A ban another node of the cluster added (``change`` "add") or deleted: applied here
        (audited, ``by`` naming that node) and, for an added one, the clients here it matches
        kicked. Never raises (a ban this version cannot read is logged and skipped)."""
        by = f"{ban.by}@{node}"
        try:
            if change == "delete":
                if self.bans.delete(ban.kind, ban.value, shared=False) is not None:
                    self.audit.log.write("ban_deleted", **{"as": ban.kind, "who": ban.value}, by=by)
                return
            ban = self.bans.add(ban, shared=False)
        except BanError as exc:
            logger.warning("cluster: ban %s %s from node %s not applied: %s", ban.kind, ban.value, node, exc)
            return
        self.audit.log.write(
            "ban_added", **{"as": ban.kind, "who": ban.value}, reason=ban.reason, by=by, until=_iso(ban.until)
        )
        await self._kick_banned(ban, by)

    def delete_ban(self, kind: str, value: str, *, by: str = "admin") -> Ban | None:
        """Lift a ban; ``None`` if there was none.

        Raises:
            BanError: invalid kind or value.
        """
        ban = self.bans.delete(kind, value)
        if ban is not None:
            self.audit.log.write("ban_deleted", **{"as": ban.kind, "who": ban.value}, by=by)
        return ban


def _iso(timestamp: float | None) -> str | None:
    """An audit record's time: ISO 8601 like its ``ts`` (None stays None: no expiry)."""
    return None if timestamp is None else iso8601(timestamp)
