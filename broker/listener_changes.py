"""What a configuration reload does to the listeners, decided as pure code.

A running listener (same ``type:name``, still enabled) takes its new settings for the connections
that come next: trusted proxies, PROXY mode and timeout, WebSocket path and address headers,
``max_connections``, access rules, per-address limits, certificates (read again every time). One
whose ``bind`` changed *moves*: the new address is bound first, then the old one stops accepting;
its open connections stay (they are still this listener's). A listener the file adds is started; one
it no longer has (or disables) is stopped and its clients are disconnected. A change of type is a
listener of another id: the old one stops, the new one starts.

``peer_cert_as_username`` is the exception: the engine learns at start which listeners map the
certificate's CN to the username, so a change of it (on a running listener, or a new listener that
asks for it) is reported as needing a restart and not applied (a new listener asking for it is not
started: its clients would otherwise be admitted without the identity the file asks for).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from broker.settings import ListenerSettings


@dataclass(frozen=True)
class ListenerChanges:
    """The plan of one reload for the listeners."""

    #: Running listeners, each with the settings it takes (all of them: certificates are read again).
    update: tuple[ListenerSettings, ...] = ()
    #: Listeners to start.
    start: tuple[ListenerSettings, ...] = ()
    #: Ids of the running listeners to stop.
    stop: tuple[str, ...] = ()
    #: Ids among ``update`` whose settings differ from those running, and among them those whose
    #: bind changed.
    changed: tuple[str, ...] = ()
    moved: tuple[str, ...] = ()
    #: Settings the file changed that only a restart applies (``listeners.ssl.x.peer_cert_as_username``).
    restart_needed: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        """Whether a listener starts, stops or takes other settings."""
        return bool(self.start or self.stop or self.changed)

    def summary(self) -> dict[str, list[str]]:
        """``{"started", "stopped", "updated", "moved"}``: ids, for the reload's answer and log."""
        return {
            "started": [listener.id for listener in self.start],
            "stopped": list(self.stop),
            "updated": [listener_id for listener_id in self.changed if listener_id not in self.moved],
            "moved": list(self.moved),
        }


def _path(listener: ListenerSettings) -> str:
    return f"listeners.{listener.type}.{listener.name}.peer_cert_as_username"


def plan_listeners(
    running: Sequence[ListenerSettings], wanted: Sequence[ListenerSettings], cert_username: Collection[str]
) -> ListenerChanges:
    """What to do to go from the ``running`` listeners to the enabled ones of ``wanted``.

    ``cert_username``: ids of the listeners on which the engine maps the certificate's CN to the
    username (fixed at start). Never raises.
    """
    before = {listener.id: listener for listener in running}
    update: list[ListenerSettings] = []
    start: list[ListenerSettings] = []
    changed: list[str] = []
    moved: list[str] = []
    restart: list[str] = []
    for entry in wanted:
        if not entry.enable:
            continue
        old = before.get(entry.id)
        listener = entry
        if bool(entry.peer_cert_as_username) != (entry.id in cert_username):
            restart.append(_path(entry))
            if old is None:
                continue  # not started: see the module's docstring
            listener = dataclasses.replace(entry, peer_cert_as_username=old.peer_cert_as_username)
        if old is None:
            start.append(listener)
            continue
        update.append(listener)
        if listener != old:
            changed.append(listener.id)
        if listener.bind != old.bind:
            moved.append(listener.id)
    kept = {listener.id for listener in update}
    return ListenerChanges(
        update=tuple(update),
        start=tuple(start),
        stop=tuple(listener_id for listener_id in before if listener_id not in kept),
        changed=tuple(changed),
        moved=tuple(moved),
        restart_needed=tuple(restart),
    )
