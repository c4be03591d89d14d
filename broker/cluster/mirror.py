"""Which persistent sessions changed since the cluster last wrote them to Redis (pure).

A :class:`SessionMirror` is a :class:`~broker.store.base.Store` for the session half of the
protocol, beside the node's own store (``broker.store.base.FanOut``): every change only marks its
client id, in O(1). At each heartbeat the cluster node writes every marked session whole
(``Engine.snapshot``, ``wire.encode_session``) to ``realip:session:{client id}``, so that when the
node dies another takes its sessions over (see README "Cluster"). A kill -9 loses at most one
heartbeat interval of changes there.
"""

from __future__ import annotations

from broker.core.session import Delivery, Message, SubOptions
from broker.store.base import SessionState, StoredMessage, StoredSession


class SessionMirror:
    """Marks changed and ended sessions; keeps nothing else (see the module's docstring)."""

    location = "redis (session mirror)"

    def __init__(self) -> None:
        #: Client ids whose session changed, and those whose session ended, since the last take.
        self.changed: set[str] = set()
        self.ended: set[str] = set()

    def take(self) -> tuple[set[str], set[str]]:
        """What changed and what ended since the last take (then forgotten here). Never raises."""
        changed, ended = self.changed, self.ended
        self.changed, self.ended = set(), set()
        return changed, ended

    def give_back(self, changed: set[str], ended: set[str]) -> None:
        """What a failed write did not write: marked again, under what came since. Never raises."""
        self.ended |= ended - self.changed
        self.changed |= changed - self.ended

    def _mark(self, client_id: str) -> None:
        self.changed.add(client_id)
        self.ended.discard(client_id)

    async def open(self) -> None:
        """Nothing to open. Never raises."""

    async def load_retained(self) -> list[StoredMessage]:
        """Retained messages are not mirrored. Never raises."""
        return []

    def put_retained(self, message: Message) -> None:
        """Not mirrored (every node holds every retained message). Never raises."""

    def delete_retained(self, topic: str) -> None:
        """Not mirrored. Never raises."""

    async def load_sessions(self) -> list[StoredSession]:
        """Sessions are taken over from Redis by the cluster, not loaded at start. Never raises."""
        return []

    def put_session(self, state: SessionState) -> None:
        """Marked. Never raises."""
        self._mark(state.client_id)

    def delete_session(self, client_id: str) -> None:
        """Marked as ended. Never raises."""
        self.changed.discard(client_id)
        self.ended.add(client_id)

    def put_subscription(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        """Marked. Never raises."""
        self._mark(client_id)

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        """Marked. Never raises."""
        self._mark(client_id)

    def put_delivery(self, client_id: str, delivery: Delivery) -> None:
        """Marked. Never raises."""
        self._mark(client_id)

    def delete_delivery(self, client_id: str, seq: int) -> None:
        """Marked. Never raises."""
        self._mark(client_id)

    def stats(self) -> dict[str, int]:
        """Nothing counted here (the cluster's status says what it wrote). Never raises."""
        return {}

    async def flush(self) -> None:
        """The cluster writes at its heartbeat. Never raises."""

    async def close(self) -> None:
        """Nothing to close. Never raises."""
