"""The MQTT engine: sessions, routing, retained messages, admission — ours, on asyncio.

Listeners hand each connection over with :meth:`Engine.open` (the listeners' ``SinkFactory``):
the engine answers with a :class:`~broker.channel.Channel`, which the listener then feeds bytes.
Everything a packet causes happens inline in that call: a PUBLISH is matched in the subscription
trie, checked against each subscriber's compiled rules, and appended to each subscriber's outbox;
one flush per event-loop iteration writes every connection that has something to send.
ARCHITECTURE.md walks through the path of an address and of a message.

Admission is decided before any session is touched (access lists and bans on the real address,
client id and username, the will): a refused client can neither wipe nor take over a session, and
leaves nothing behind. A CONNECT for a connected client id takes over: the old connection is closed
and detached first [MQTT-3.1.4-2], and a resumed session carries the *new* connection's address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from broker.access import Gatekeeper, Refusal
from broker.auth.base import AuthorizationSource, Credentials, Outcome
from broker.auth.chain import AuthChain, Decision
from broker.authorization import Authorizer, ClientRules, valid_filter
from broker.channel import Channel, ChannelState
from broker.core.session import (
    EXPIRED,
    NOT_AUTHORIZED,
    QUEUE_FULL,
    Delivery,
    Message,
    Session,
    SharedGroup,
    SubOptions,
)
from broker.core.topics import RetainedStore, SubscriptionTrie
from broker.errors import RealIPError
from broker.logs import Throttle
from broker.metrics import MessageCounters
from broker.mqtt import packets as mp
from broker.mqtt import reasons
from broker.store.base import (
    Store,
    StoredMessage,
    StoredSession,
    StoredSubscription,
    StoredWill,
    properties_to_json,
    stored_delivery,
)

if TYPE_CHECKING:
    from broker.cluster.wire import Forwarded
    from broker.settings import ListenerSettings, MqttSettings
    from listeners.address import ClientAddress
    from listeners.connection import Link
    from listeners.options import ListenerOptions

logger = logging.getLogger(__name__)

#: Seconds that shutdown waits for connections to close after their last bytes were flushed.
SHUTDOWN_TIMEOUT = 1.5

#: Retained messages sent for a new subscription per event-loop iteration: a SUBSCRIBE to ``#``
#: with 100k retained messages must not stall everyone else while they are sent.
RETAINED_BATCH = 100

#: Topics whose merged subscriber list is cached for routing; the cache is emptied whenever a
#: subscription changes, and when it holds this many topics.
ROUTE_CACHE_SIZE = 10_000

#: Publish-side drop reasons (besides the session's own, see broker.core.session).
SYS_TOPIC = "sys_topic"
PUBLISH_NOT_AUTHORIZED = "publish_not_authorized"
TOPIC_TOO_DEEP = "topic_levels"
RETAINED_FULL = "retained_full"

#: Retained messages under it are the broker's own live figures (``broker/sys_topics.py``), published
#: again after every start: never persisted (mosquitto does not save them either).
SYS_PREFIX = "$SYS"


#: What an MQTT 5 client is told when authentication refused it (the log and audit say more).
_AUTH_REFUSALS = {
    "bad_credentials": "bad user name or password",
    "auth_unavailable": "authentication is unavailable; try again later",
}

#: CONNACK refusals that 3.1.1 cannot express: the connection is just closed.
_CLOSED_AT_V3 = frozenset({reasons.CONNECTION_RATE_EXCEEDED, reasons.QUOTA_EXCEEDED})

#: A verified client certificate named the user (``peer_cert_as_username``).
CERTIFIED = Decision(reasons.SUCCESS, authenticated=True, by="peer_cert_as_username")


def _denied(method: str, message: str) -> Decision:
    return Decision(
        reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", f"{method}: {message}", failure=True, by=method
    )


@dataclass(slots=True)
class Admission:
    """A CONNECT on its way through authentication."""

    connect: mp.Connect
    client_id: str
    username: str | None
    assigned: bool
    credentials: Credentials


@dataclass(frozen=True, slots=True)
class SessionView:
    """A connected client as operators see it (no engine internals leak out)."""

    client_id: str
    username: str | None
    address: ClientAddress
    listener_id: str
    clean_session: bool
    keepalive: int
    connected_at: float
    proto_ver: int
    subscriptions: int = 0
    inflight: int = 0
    queued: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    #: Seconds the session outlives the connection; the client's Receive Maximum and Topic Alias
    #: Maximum (MQTT 5; 65535 and 0 for MQTT 3.1.1).
    expiry_interval: float = 0.0
    receive_maximum: int = 65535
    topic_alias_maximum: int = 0
    #: Whether an authenticator proved the username; whether it is a superuser (no rules apply).
    authenticated: bool = False
    is_superuser: bool = False


class EngineHooks(Protocol):
    """What the engine reports (the audit log implements it)."""

    def connected(self, view: SessionView) -> None:
        """A client was admitted (after CONNACK)."""
        return None

    def disconnected(self, view: SessionView, reason: str) -> None:
        """A client's connection ended."""
        return None

    def refused(
        self,
        listener_id: str,
        address: ClientAddress,
        reason: str,
        client_id: str | None,
        username: str | None,
    ) -> None:
        """A CONNECT was refused (CONNACK 2 or 5)."""
        return None

    def auth_failed(  # noqa: PLR0917 - what the audit record holds
        self,
        listener_id: str,
        address: ClientAddress,
        refusal: Refusal,
        client_id: str,
        username: str | None,
        by: str,
    ) -> None:
        """A CONNECT was refused by authentication (``by`` the authenticator that decided)."""
        return None


class ClusterLink(Protocol):
    """The cluster, as the engine sees it (``broker.cluster.node.ClusterNode``): told every local
    subscription change and every PUBLISH, inline and in O(1)."""

    def subscribed(self, topic_filter: str) -> None:
        """A local session subscribed to ``topic_filter`` (it had not)."""

    def unsubscribed(self, topic_filter: str) -> None:
        """A local session's subscription to ``topic_filter`` went."""

    def forward(self, message: Message, local_groups: Iterable[str] = ()) -> tuple[int, set[str]]:
        """Send ``message`` to the other nodes that want it; returns how many nodes, and which of
        ``local_groups`` (this node's shared subscription groups matching it, ``$share/g/f``) take
        it here (each group gets it once in the cluster)."""
        return 0, set(local_groups)

    def retained_deleted(self, topic: str) -> None:
        """An operator deleted the retained message of ``topic`` here: on every node too."""

    def session_started(self, client_id: str) -> None:
        """This node now holds the session of ``client_id``."""

    def session_ended(self, client_id: str) -> None:
        """This node no longer holds it (ended, or handed over)."""

    async def claim(self, client_id: str, discard: bool) -> StoredSession | None:
        """Before a CONNECT for ``client_id`` is answered: if another node holds its session, that
        node closes the client's connection there and hands the session over (None when it has
        none to give: not persistent, or ``discard`` asked for a clean start). Never raises."""
        return None


class _NoHooks(EngineHooks):
    """Reports nothing."""


class EngineSession(Session):
    """A session and what the engine keeps beside it: its connection, rules and expiry timer, and
    the store that keeps it while it is persistent (every change of what a restart must bring back
    is told to it: the :class:`~broker.core.session.Session` hooks, :meth:`stored`)."""

    def __init__(self, client_id: str, settings: MqttSettings, *, persistent: bool) -> None:
        super().__init__(
            client_id,
            persistent=persistent,
            max_inflight=settings.max_inflight,
            max_mqueue_len=settings.max_mqueue_len,
            store_qos0=settings.mqueue_store_qos0,
            max_awaiting_rel=settings.max_awaiting_rel,
        )
        self.channel: Channel | None = None
        self.rules: ClientRules | None = None
        self.expiry: asyncio.TimerHandle | None = None
        #: Seconds the session outlives its connection (0: it ends with it).
        self.expiry_interval = 0.0
        #: MQTT 5: a will waiting for its Will Delay Interval, and its timer.
        self.pending_will: Message | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        #: Its drops are logged once, then summarised (they may come while it is offline).
        self.throttle = Throttle()
        #: The authenticated username that made it (None: made by a client that proved none);
        #: only that user (or a superuser) may continue it.
        self.owner: str | None = None
        #: The store keeping it (None: not persistent, or persistence is off).
        self.store: Store | None = None
        #: What its rules were compiled for (its last client's), so that a restart compiles the same.
        self.username: str | None = None
        self.authenticated = False
        self.superuser = False
        self.ip = ""
        #: When its last client went (wall clock; None while one is connected).
        self.disconnected_at: float | None = None
        #: The connected client's will as a store keeps it (published after a restart if the broker
        #: stopped under it without a clean stop).
        self.connection_will: StoredWill | None = None

    def _saved(self, delivery: Delivery) -> None:
        if self.store is not None:
            self.store.put_delivery(self.client_id, delivery)

    def _removed(self, delivery: Delivery) -> None:
        if self.store is not None:
            self.store.delete_delivery(self.client_id, delivery.seq)

    def _changed(self) -> None:
        if self.store is not None:
            self.store.put_session(self)

    def stored(self, *, loop_now: float, wall_now: float) -> StoredSession:
        """Its own state as a store keeps it (:class:`~broker.store.base.SessionState`). Never raises."""
        will = None
        if self.channel is not None:
            will = self.connection_will
        elif self.pending_will is not None and self.will_timer is not None:
            try:
                message = StoredMessage.from_message(self.pending_will, loop_now=loop_now, wall_now=wall_now)
            except ValueError as exc:  # the decoder makes only storable values: a bug
                logger.error("will of client %r not saved: %s", self.client_id, exc)
            else:
                will = StoredWill(message, 0.0, wall_now + (self.will_timer.when() - loop_now))
        return StoredSession(
            self.client_id,
            self.expiry_interval,
            None if self.channel is not None else self.disconnected_at,
            self.owner,
            self.username,
            self.authenticated,
            self.superuser,
            self.ip,
            tuple(self.awaiting_rel),
            will,
        )


class Engine:
    """Every session and subscription of the broker, and the connections attached to them."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        listeners: Sequence[ListenerSettings] = (),
        gatekeeper: Gatekeeper | None = None,
        hooks: EngineHooks | None = None,
        authorizer: Authorizer | None = None,
        auth: AuthChain | None = None,
        sources: Sequence[AuthorizationSource] = (),
        store: Store | None = None,
    ) -> None:
        """``sources`` are asked (in order) what no authorization rule decides; ``store`` (open) is
        told every change of a retained message and of a persistent session (``None``: they are
        kept in memory only)."""
        self.settings = settings
        self._store = store
        self.auth = auth or AuthChain()
        self._sources = tuple(sources)
        #: Source answers by (source, outcome), for ``/metrics``.
        self.source_results: Counter[tuple[str, str]] = Counter()
        self._cert_username = {listener.id for listener in listeners if listener.peer_cert_as_username}
        self.gatekeeper = gatekeeper
        self._hooks: EngineHooks = hooks or _NoHooks()
        self._authorizer = authorizer or Authorizer()
        self.counters = MessageCounters()
        self._sessions: dict[str, EngineSession] = {}
        #: client id -> its connection, in connection order (what ``ctl clients list`` shows)
        self._connected: dict[str, Channel] = {}
        #: every open connection, CONNECTed or not (shutdown closes them all)
        self._channels: set[Channel] = set()
        self._subscriptions: SubscriptionTrie[str | SharedGroup, SubOptions | SharedGroup] = (
            SubscriptionTrie()
        )
        #: (share name, filter) -> its group, for ``$share/{name}/{filter}`` subscriptions
        self._groups: dict[tuple[str, str], SharedGroup] = {}
        #: topic -> ([(client id, options of its matching subscriptions)], [shared groups]): the
        #: trie's answer, grouped
        self._routes: dict[str, tuple[list[tuple[str, tuple[SubOptions, ...]]], list[SharedGroup]]] = {}
        self._retained: RetainedStore[Message] = RetainedStore()
        self._dirty: list[Channel] = []
        self._flush_scheduled = False
        self._pumping: set[Channel] = set()
        self._all_closed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The cluster this node is part of (set before sessions are restored), or None.
        self.cluster: ClusterLink | None = None

    def reconfigure(
        self,
        settings: MqttSettings,
        authorizer: Authorizer,
        auth: AuthChain,
        sources: Sequence[AuthorizationSource],
    ) -> None:
        """A configuration reload: new limits (for what comes next: a connection's packet size is
        fixed when it opens), new authentication, new rules, recompiled at once for every
        connected client (an offline session gets them when it reconnects)."""
        self.settings = settings
        self._authorizer = authorizer
        self.auth = auth
        self._sources = tuple(sources)
        for client_id, channel in self._connected.items():
            rules = self._rules_for(
                client_id,
                channel.username,
                channel.address.ip,
                authenticated=channel.authenticated,
                superuser=channel.is_superuser,
            )
            channel.rules = rules
            if channel.session is not None:
                channel.session.rules = rules

    def _rules_for(
        self, client_id: str, username: str | None, ip: str, *, authenticated: bool, superuser: bool
    ) -> ClientRules | None:
        """A client's compiled rules: none for a superuser; only a proven username can match rules
        that name one, or fill ``${username}``."""
        if superuser:
            return None
        return self._authorizer.for_client(client_id, username if authenticated else None, ip)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop the engine was started on.

        Raises:
            RuntimeError: the engine is not started.
        """
        if self._loop is None:
            raise RuntimeError("the MQTT engine is not started")
        return self._loop

    def now(self) -> float:
        """The engine's clock (its loop's).

        Raises:
            RuntimeError: the engine is not started.
        """
        return self.loop.time()

    async def start(self) -> None:
        """Bind the engine to the running loop (nothing else to set up)."""
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ connections

    def open(self, link: Link, address: ClientAddress, listener: ListenerOptions) -> Channel:
        """A new connection from ``address`` on ``listener`` (the listeners' ``SinkFactory``).

        Raises:
            RuntimeError: the engine is not started.
        """
        channel = Channel(self, link, address, listener.id)
        self._channels.add(channel)
        return channel

    def forget(self, channel: Channel) -> None:
        """A connection is gone for good."""
        self._channels.discard(channel)
        if not self._channels and self._all_closed is not None:
            self._all_closed.set()

    def mark_dirty(self, channel: Channel) -> None:
        """``channel`` has bytes to write: flush it at the end of this loop iteration."""
        if not channel.dirty:
            channel.dirty = True
            self._dirty.append(channel)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for channel in dirty:
            if channel.dirty:
                channel.flush()

    # ------------------------------------------------------------------ admission

    def admit(self, channel: Channel, connect: mp.Connect) -> None:
        """Decide a CONNECT, then attach the connection to its session and answer CONNACK.

        In order: the client id; access lists, bans and the listener's per-address limits (all on
        the real address); then authentication. An authenticator that must be awaited (a password
        hash in a worker thread, an HTTP callout) runs in one task for this CONNECT while the
        connection's further packets are held, unread, until the decision [MQTT-3.1.4-5]; MQTT 5
        enhanced authentication (SCRAM) goes on with AUTH packets. Nothing touches a session
        before the client is admitted.
        """
        settings = self.settings
        v5 = connect.proto_level == 5
        props = connect.properties
        channel.problem_info = not v5 or props.get("request_problem_information", 1) == 1
        client_id = connect.client_id
        assigned = False
        method = props.get("authentication_method") if v5 else None
        if method is not None and method not in self.auth.enhanced:
            unknown = Refusal(
                "auth_method",
                f"authentication method {method!r} is not offered",
                reasons.BAD_AUTHENTICATION_METHOD,
            )
            self._refuse(channel, connect, unknown)
            return
        if not client_id:
            if not connect.clean_start and not v5:
                self._refuse(
                    channel,
                    connect,
                    Refusal(
                        "client_id",
                        "[MQTT-3.1.3-8] a zero-length client id needs clean session 1",
                        reasons.CLIENT_IDENTIFIER_NOT_VALID,
                    ),
                )
                return
            client_id = f"auto-{uuid.uuid4().hex}"  # [MQTT-3.1.3-6] the server assigns one
            assigned = True
        elif len(client_id) > settings.max_clientid_len:
            limit = settings.max_clientid_len
            message = f"client id of {len(client_id)} characters (mqtt.max_clientid_len {limit})"
            self._refuse(channel, connect, Refusal("client_id", message, reasons.CLIENT_IDENTIFIER_NOT_VALID))
            return
        username = connect.username
        tls = channel.address.tls
        verified_cn = tls.cert_cn if tls is not None and tls.cert_verified else None
        certified = None
        if channel.listener_id in self._cert_username:
            # peer_cert_as_username: cn. The username is the verified certificate's CN, whatever
            # the client sent; without one the client has no username (it cannot claim one).
            certified = username = verified_cn or None
        ip = channel.address.ip
        if self.gatekeeper is not None:
            refusal = self.gatekeeper.check_client(channel.listener_id, ip, client_id, username)
            if refusal is not None:
                self._refuse(channel, connect, refusal, client_id=client_id, username=username)
                return
        credentials = Credentials(
            client_id,
            username,
            connect.password,
            channel.address,
            channel.listener_id,
            connect.proto_level,
            verified_cn,
        )
        admission = Admission(connect, client_id, username, assigned, credentials)
        if method is not None:
            self._start_exchange(channel, admission, method, props.get("authentication_data", b""))
            return
        # A verified certificate on a peer_cert_as_username listener is the client's identity.
        decision = CERTIFIED if certified is not None else self.auth.decide_now(credentials)
        if decision is not None:
            self._decided(channel, admission, decision)
            return
        channel.hold()
        channel.pending = self.loop.create_task(self._authenticate(channel, admission))

    async def _authenticate(self, channel: Channel, admission: Admission) -> None:
        try:
            decision = await self.auth.authenticate(admission.credentials)
        except Exception:  # the chain never raises; if it did, the client must not hang
            logger.exception("%s: authentication failed unexpectedly", channel.describe())
            decision = Decision(reasons.SERVER_UNAVAILABLE, "auth_unavailable", "authentication failed")
        channel.pending = None
        if not channel.closed:
            try:
                self._decided(channel, admission, decision)
            except Exception:  # a bug must not leave a held connection paused for ever
                logger.exception("%s: admission failed unexpectedly; closing", channel.describe())
                channel.close("internal_error")

    def _start_exchange(self, channel: Channel, admission: Admission, method: str, data: bytes) -> None:
        """MQTT 5 4.12: answer the CONNECT's Authentication Data with AUTH 0x18 (continue)."""
        exchange = self.auth.enhanced[method]()
        try:
            challenge = exchange.first(data)
        except RealIPError as exc:
            self._decided(channel, admission, _denied(method, str(exc)))
            return
        channel.pending = (exchange, admission, method)
        channel.expect_auth()
        channel.send(
            mp.Auth(
                reasons.CONTINUE_AUTHENTICATION,
                {"authentication_method": method, "authentication_data": challenge},
            )
        )

    def continue_exchange(self, channel: Channel, packet: mp.Auth) -> None:
        """The client's AUTH during enhanced authentication: its proof, then CONNACK."""
        exchange, admission, method = channel.pending
        channel.pending = None
        props = packet.properties
        if (
            packet.reason_code != reasons.CONTINUE_AUTHENTICATION
            or props.get("authentication_method") != method
        ):
            channel.violation(
                reasons.PROTOCOL_ERROR, f"sent an AUTH that does not continue {method} [MQTT-4.12.0-5]"
            )
            return
        try:
            final = exchange.final(props.get("authentication_data", b""))
        except RealIPError as exc:
            self._decided(channel, admission, _denied(method, str(exc)))
            return
        user = exchange.username or ""
        if admission.username is not None and admission.username != user:
            message = f"the CONNECT's username {admission.username!r} is not the {method} user {user!r}"
            self._decided(channel, admission, _denied(method, message))
            return
        admission.username = user
        decision = Decision(
            reasons.SUCCESS, authenticated=True, is_superuser=self.auth.is_superuser(user), by=method
        )
        self._decided(
            channel, admission, decision, {"authentication_method": method, "authentication_data": final}
        )

    def _decided(
        self, channel: Channel, admission: Admission, decision: Decision, extra: dict[str, Any] | None = None
    ) -> None:
        """Admit, or refuse, a client whose authentication is decided."""
        if decision.admitted:
            if self._sources:  # kept for their requests (which never carry the password)
                channel.credentials = dataclasses.replace(
                    admission.credentials, username=admission.username, password=None
                )
            rules = self._rules_for(
                admission.client_id,
                admission.username,
                channel.address.ip,
                authenticated=decision.authenticated,
                superuser=decision.is_superuser,
            )
            will = admission.connect.will
            if (
                will is not None
                and rules is not None
                and rules.has_sources
                and rules.decide("publish", will.topic) is None
            ):  # the sources decide the will too
                if channel.held is None:
                    channel.hold()
                request = [("publish", will.topic, will.qos)]
                channel.pending = self.loop.create_task(
                    self._ask_sources(channel, rules, request, admission, decision, extra)
                )
                return
            self._admit(channel, admission, decision, rules, extra)
            return
        connect, address = admission.connect, channel.address
        refusal = Refusal(decision.reason, decision.message, decision.code)
        self._refuse(
            channel, connect, refusal, client_id=admission.client_id, username=admission.username, audit=False
        )
        self._hooks.auth_failed(
            channel.listener_id, address, refusal, admission.client_id, admission.username, decision.by
        )
        if decision.failure and self.gatekeeper is not None:
            self.gatekeeper.authentication_failed(address.ip)

    def _admit(
        self,
        channel: Channel,
        admission: Admission,
        decision: Decision,
        rules: ClientRules | None,
        extra: dict[str, Any] | None,
    ) -> None:
        """Attach an admitted client (:meth:`_attach`), then handle what it sent meanwhile. In a
        cluster, the node holding its session hands it over first (the connection held meanwhile):
        there is never a moment when two nodes serve one client id."""
        if self.cluster is None or admission.assigned:
            self._attach(channel, admission, decision, rules, extra)
            channel.release()
            return
        if channel.held is None:
            channel.hold()
        channel.pending = self.loop.create_task(self._claim(channel, admission, decision, rules, extra))

    async def _claim(
        self,
        channel: Channel,
        admission: Admission,
        decision: Decision,
        rules: ClientRules | None,
        extra: dict[str, Any] | None,
    ) -> None:
        assert self.cluster is not None
        client_id = admission.client_id
        # Shielded: the client may go (or time out) while the other node hands the session over;
        # the claim finishes anyway and the session stays here, offline (else it is nowhere).
        claiming = self.loop.create_task(self.cluster.claim(client_id, admission.connect.clean_start))
        try:
            stored = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            claiming.add_done_callback(self._keep_claimed)
            raise
        channel.pending = None
        if channel.closed:
            self._keep_claimed(claiming)
            return
        try:
            if stored is not None:
                if client_id in self._sessions:  # a stale local one loses to the one that was in use
                    self.forget_session(client_id)
                self.restore_sessions([stored], foreign=True)
                logger.info("client %r: its session came over from another node", client_id)
            self._attach(channel, admission, decision, rules, extra)
            channel.release()
        except Exception:  # a bug must not leave a held connection paused for ever
            logger.exception("%s: admission failed unexpectedly; closing", channel.describe())
            channel.close("internal_error")

    def _keep_claimed(self, claiming: asyncio.Task[StoredSession | None]) -> None:
        """A claimed session whose client went before it came: kept here, offline."""
        if claiming.cancelled() or claiming.exception() is not None:
            return
        stored = claiming.result()
        if stored is not None:
            self.restore_sessions([stored], foreign=True)

    def hand_over(self, client_id: str, discard: bool) -> StoredSession | None:
        """Another node admitted ``client_id``: close its connection here (DISCONNECT 0x8E, its will
        as for any takeover) and give its session away whole (None: it has none here, it is not
        persistent, or ``discard``: the client asked for a clean start, and it is ended here). It
        stays here until the caller, once the session is safe elsewhere, lets go of it
        (:meth:`forget_session`). Never raises."""
        session = self._sessions.get(client_id)
        if session is None:
            return None
        if session.channel is not None:
            logger.info("client %r connected on another node: closing its connection here", client_id)
            session.channel.close("takeover")
        if self._sessions.get(client_id) is not session:  # not persistent: ended with its connection
            return None
        if discard:
            self._discard(session)
            return None
        return self.snapshot(client_id)  # forgotten (forget_session) once it is safe elsewhere

    def snapshot(self, client_id: str) -> StoredSession | None:
        """The whole of a session as a store keeps it (its state, subscriptions, queued and
        in-flight deliveries), or None if there is none. Never raises."""
        session = self._sessions.get(client_id)
        if session is None:
            return None
        loop_now, wall_now = self.loop.time(), time.time()
        state = session.stored(loop_now=loop_now, wall_now=wall_now)
        deliveries = []
        for delivery in session.pending():
            try:
                deliveries.append(stored_delivery(delivery, loop_now=loop_now, wall_now=wall_now))
            except ValueError as exc:  # the decoder makes only storable values: a bug
                topic = delivery.message.topic
                logger.error("client %r: a message on %r not kept: %s", client_id, topic, exc)
        subscriptions = tuple(
            StoredSubscription.from_options(topic_filter, options)
            for topic_filter, options in session.subscriptions.items()
        )
        return dataclasses.replace(state, subscriptions=subscriptions, deliveries=tuple(deliveries))

    def forget_session(self, client_id: str) -> None:
        """Let go of a session that lives on elsewhere (handed over, or another node holds it
        now): what waits goes with it (not counted as dropped), a delayed will too (not published
        here); the store forgets it. Never raises."""
        session = self._sessions.get(client_id)
        if session is None:
            return
        if session.channel is not None:
            session.channel.close("takeover")
        session.inflight.clear()
        session.queue.clear()
        if session.will_timer is not None:
            session.will_timer.cancel()
            session.will_timer = None
        session.pending_will = None
        self._discard(session)

    def _attach(
        self,
        channel: Channel,
        admission: Admission,
        decision: Decision,
        rules: ClientRules | None,
        extra: dict[str, Any] | None,
    ) -> None:
        """Attach an admitted client to its session and answer CONNACK."""
        settings = self.settings
        connect, client_id, username = admission.connect, admission.client_id, admission.username
        v5 = connect.proto_level == 5
        props = connect.properties
        ip = channel.address.ip
        if connect.will is not None:
            refusal = self._check_will(connect.will.topic, rules)
            if refusal is not None:
                self._refuse(channel, connect, refusal, client_id=client_id, username=username)
                return
        if self.gatekeeper is not None:
            # Asked again now: while the client authenticated, its address may have been banned
            # (by its own failures in parallel, or by an operator), others from it may have
            # connected, and SCRAM learns the username only at the end.
            refusal = self.gatekeeper.check_bans(channel.listener_id, ip, client_id, username)
            if refusal is None:
                refusal = self.gatekeeper.check_connections(channel.listener_id, ip)
            if refusal is not None:
                self._refuse(channel, connect, refusal, client_id=client_id, username=username)
                return
        owner = username if decision.authenticated else None
        existing = self._sessions.get(client_id)
        if (
            existing is not None
            and existing.owner is not None
            and existing.owner != owner
            and not decision.is_superuser
        ):
            # A session made by an authenticated user is that user's: another client claiming
            # its id would take over its queue and subscriptions.
            message = f"client id {client_id!r} is held by a session of another user"
            self._refuse(
                channel, connect, Refusal("client_id_owned", message), client_id=client_id, username=username
            )
            return
        # Session expiry: MQTT 3.1.1 persistent sessions last mqtt.session_expiry_interval; an
        # MQTT 5 client asks for its own, capped at it (and told so in CONNACK) [MQTT-3.1.2-23].
        maximum = settings.session_expiry_interval
        requested = (
            float(props.get("session_expiry_interval", 0))
            if v5
            else (0.0 if connect.clean_start else maximum)
        )
        expiry = min(requested, maximum)
        session, present = self._take_session(client_id, clean_start=connect.clean_start, expiry=expiry)
        channel.state = ChannelState.CONNECTED
        channel.client_id = client_id
        channel.username = username
        channel.clean_start = connect.clean_start
        channel.keepalive = connect.keepalive
        channel.will = connect.will
        channel.rules = rules
        channel.session = session
        channel.authenticated = decision.authenticated
        channel.is_superuser = decision.is_superuser
        if session.owner is None:  # a superuser continuing a user's session leaves it theirs
            session.owner = owner
        session.username, session.ip = username, ip
        session.authenticated, session.superuser = decision.authenticated, decision.is_superuser
        session.disconnected_at = None
        if self.gatekeeper is not None:
            self.gatekeeper.connected(channel.listener_id, ip)
        receive_maximum = int(props.get("receive_maximum", 65535)) if v5 else 65535
        channel.receive_maximum = receive_maximum
        channel.max_packet_out = int(props.get("maximum_packet_size", 0)) if v5 else 0
        channel.topic_alias_maximum = int(props.get("topic_alias_maximum", 0)) if v5 else 0
        session.channel = channel
        session.rules = rules
        session.online = True
        session.writable = not channel.paused
        # [MQTT-3.3.4-9] never more unacknowledged deliveries than the client's Receive Maximum.
        session.max_inflight = min(settings.max_inflight, receive_maximum)
        # Ours, announced as Receive Maximum, bounds the client's unreleased QoS 2 (0x93 beyond).
        session.max_awaiting_rel = (
            min(settings.max_awaiting_rel, settings.max_inflight) if v5 else settings.max_awaiting_rel
        )
        self._connected[client_id] = channel
        if present:
            if session.will_timer is not None:  # MQTT 5 3.1.3.2.2: a reconnect cancels a delayed will
                session.will_timer.cancel()
                session.will_timer = None
                session.pending_will = None
            if rules is not None:
                # Queued for the session's previous connection, maybe from another address.
                session.filter_pending(lambda message: rules.allows("subscribe", message.topic))
        if session.store is not None:
            session.connection_will = (
                None if connect.will is None else self._stored_will(channel, connect.will)
            )
            session.store.put_session(session)
        connack: dict[str, Any] = {}
        if v5:
            connack = self._connack_properties(
                channel, props, requested, expiry, client_id if admission.assigned else None
            )
            if settings.server_keepalive:
                channel.keepalive = settings.server_keepalive
            if extra:
                connack.update(extra)
        channel.send(mp.Connack(present, 0, connack))  # [MQTT-3.2.2-2] session present
        channel.connected_at = time.time()
        logger.info("%s connected", channel.describe())
        self._hooks.connected(self._view(channel, session))
        channel.start_keepalive()
        if present:
            # [MQTT-4.4.0-1] what the previous connection left unacknowledged goes out again; an
            # incoming QoS 2 awaiting PUBREL gets its PUBREC again (as mosquitto does), so a client
            # that lost it knows to send the PUBREL.
            for packet_id in session.awaiting_rel:
                channel.send(mp.Pubrec(packet_id))
            channel.send_deliveries(session.resend())
            channel.send_deliveries(session.drain(self.loop.time()))

    def _connack_properties(
        self,
        channel: Channel,
        props: dict[str, Any],
        requested: float,
        expiry: float,
        assigned: str | None,
    ) -> dict[str, Any]:
        """What an MQTT 5 CONNACK tells the client of this broker's limits (3.2.2.3)."""
        settings = self.settings
        out: dict[str, Any] = {
            "receive_maximum": settings.max_inflight,
            "maximum_packet_size": settings.max_packet_size,
            "topic_alias_maximum": settings.max_topic_alias,
        }
        if expiry != requested:
            out["session_expiry_interval"] = int(expiry)
        if assigned is not None:
            out["assigned_client_identifier"] = assigned
        if settings.server_keepalive:
            out["server_keep_alive"] = settings.server_keepalive
        if props.get("request_response_information") == 1 and settings.response_information:
            out["response_information"] = settings.response_information
        if settings.peer_in_connack:
            address = channel.address
            out["user_property"] = [("peername", address.peername), ("address_source", str(address.source))]
        return out

    def _refuse(
        self,
        channel: Channel,
        connect: mp.Connect,
        refusal: Refusal,
        *,
        client_id: str | None = None,
        username: str | None = None,
        audit: bool = True,
    ) -> None:
        """Answer a refusing CONNACK and close; counted by reason, logged, audited as ``refused``
        unless ``audit`` is False (an authentication failure is audited as ``auth_failed``)."""
        client_id = connect.client_id if client_id is None else client_id
        username = connect.username if username is None else username
        line = "%s: client %r refused: %s [%s]"
        args = (channel.describe(), client_id, refusal.message, refusal.reason)
        if self.gatekeeper is None:
            logger.warning(line, *args)
        else:  # a client retrying without end: one line, then a summary per interval (counted exactly)
            self.gatekeeper.log_refusal(refusal.reason, channel.address.ip, logger, line, *args)
        self.counters.refused[refusal.reason] += 1
        self.counters.refused_by_listener[(channel.listener_id, refusal.reason)] += 1
        if audit:
            self._hooks.refused(channel.listener_id, channel.address, refusal.reason, client_id, username)
        if connect.proto_level != 5 and refusal.code in _CLOSED_AT_V3:
            channel.close("refused")  # no 3.1.1 return code says "too many": closed, as EMQX does
            return
        # [MQTT-3.2.2-4] a refusing CONNACK has session present 0; then close [MQTT-3.2.2-5]. An
        # MQTT 5 client that allows it is told why, with the address the decision was made on.
        properties = None
        if channel.problem_info and connect.proto_level == 5:
            # An authentication refusal says no more than its code: which authenticator refused,
            # or why, would tell an attacker which usernames exist (and name internal servers).
            told = _AUTH_REFUSALS.get(refusal.reason, refusal.message)
            why = f"{told} [{refusal.reason}] (client {channel.address.peername})"
            properties = {"reason_string": why}
        channel.protocol.refuse(refusal.code, properties)
        channel.close("refused")

    def _check_will(self, topic: str, rules: ClientRules | None) -> Refusal | None:
        """A will is a PUBLISH the client asks for in advance: the same rules apply, decided now."""
        if topic.startswith("$SYS"):
            return Refusal("will_topic", f"will topic {topic!r}: $SYS topics belong to the broker")
        if topic.count("/") >= self.settings.max_topic_levels:
            return Refusal("will_topic", f"will topic {topic!r} is deeper than mqtt.max_topic_levels")
        if rules is not None and not rules.allows("publish", topic):
            return Refusal("will_topic", f"may not publish its will to {topic!r} (authorization rules)")
        return None

    def _take_session(
        self, client_id: str, *, clean_start: bool, expiry: float
    ) -> tuple[EngineSession, bool]:
        """The session an admitted CONNECT continues (True) or starts (False)."""
        existing = self._sessions.get(client_id)
        if existing is not None and existing.channel is not None:
            logger.info("client %r connected again: closing its previous connection", client_id)
            existing.channel.close("takeover")
            existing = self._sessions.get(client_id)
        if existing is not None and clean_start:
            self._discard(existing)  # [MQTT-3.1.2-6] a clean session starts afresh
            existing = None
        if existing is not None:
            if existing.expiry is not None:
                existing.expiry.cancel()
                existing.expiry = None
            self._set_expiry(existing, expiry)
            return existing, True
        session = self._new_session(client_id)
        self._set_expiry(session, expiry)
        return session, False

    def _new_session(self, client_id: str) -> EngineSession:
        session = EngineSession(client_id, self.settings, persistent=False)
        session.on_drop = lambda reason, delivery: self._dropped(session, reason, delivery)
        self._sessions[client_id] = session
        if self.cluster is not None:
            self.cluster.session_started(client_id)
        return session

    def _set_expiry(self, session: EngineSession, seconds: float) -> None:
        """A session's expiry interval: one that outlives its connection is kept in the store (all
        of it, when it starts to be); one that ends with it is not (forgotten there)."""
        session.expiry_interval = seconds
        session.persistent = seconds > 0
        if self._store is None:
            return
        if not session.persistent:
            if session.store is not None:
                session.store = None
                self._store.delete_session(session.client_id)
            return
        if session.store is None:
            session.store = store = self._store
            store.put_session(session)
            for topic_filter, options in session.subscriptions.items():
                store.put_subscription(session.client_id, topic_filter, options)
            for delivery in session.pending():
                store.put_delivery(session.client_id, delivery)
        else:
            session.store.put_session(session)

    def set_session_expiry(self, channel: Channel, seconds: float) -> None:
        """MQTT 5 DISCONNECT changed the session's expiry interval (capped as at CONNECT)."""
        session = channel.session
        if session is not None:
            self._set_expiry(session, min(seconds, self.settings.session_expiry_interval))

    def detach(self, channel: Channel, reason: str) -> None:
        """A connected channel ended: publish its will unless it said goodbye, keep or discard its
        session, report it. Called once per connection, as soon as its end is known."""
        session = channel.session
        channel.session = None
        channel.retained.clear()
        if session is None:
            return
        if self.gatekeeper is not None:  # counted when attached
            self.gatekeeper.disconnected(channel.listener_id, channel.address.ip)
        if session.channel is not channel:
            return
        view = self._view(channel, session)
        session.channel = None
        session.online = session.writable = False
        if self._connected.get(channel.client_id) is channel:
            del self._connected[channel.client_id]
        will, channel.will = channel.will, None
        if will is not None and reason not in ("client_disconnect", "shutdown"):
            message = self.make_message(
                channel, will.topic, will.payload, will.qos, will.retain, dict(will.properties)
            )
            delay = float(will.properties.get("will_delay_interval", 0))
            delay = min(delay, session.expiry_interval) if session.persistent else 0.0
            if delay > 0:
                # MQTT 5 3.1.3.2.2: published after the delay, or when the session ends if sooner,
                # unless the client reconnects first.
                session.pending_will = message
                session.will_timer = self.loop.call_later(delay, self._publish_will, session)
            else:
                self.publish(message)
        if not session.persistent:
            self._discard(session)
        elif self._sessions.get(session.client_id) is session:
            session.expiry = self.loop.call_later(session.expiry_interval, self._expire, session)
            session.disconnected_at = time.time()
            session.connection_will = None
            if session.store is not None:
                session.store.put_session(session)
        self.counters.disconnected[reason] += 1
        logger.info("%s disconnected (%s)", channel.describe(), reason)
        self._hooks.disconnected(view, reason)

    def _publish_will(self, session: EngineSession) -> None:
        session.will_timer = None
        message, session.pending_will = session.pending_will, None
        if session.store is not None:
            session.store.put_session(session)
        if message is not None:
            self.publish(message)

    def publish(self, message: Message) -> int:
        """Route a message and keep it if it is retained; returns the sessions it went to."""
        count = self.route(message)
        if message.retain:
            self.retain(message, None)
        return count

    def _expire(self, session: EngineSession) -> None:
        session.expiry = None
        if session.channel is None and self._sessions.get(session.client_id) is session:
            logger.info(
                "session of client %r expired (session expiry interval %gs); %d queued messages dropped",
                session.client_id,
                session.expiry_interval,
                len(session.queue) + len(session.inflight),
            )
            self._discard(session)

    def _discard(self, session: EngineSession) -> None:
        if session.store is not None:  # forgotten whole, not change by change
            session.store.delete_session(session.client_id)
            session.store = None
        if session.will_timer is not None:  # the session ends: a delayed will goes now
            session.will_timer.cancel()
            self._publish_will(session)
        for topic_filter in session.subscriptions:
            self._unsubscribed(session, topic_filter)
        session.discard()
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
            if self.cluster is not None:
                self.cluster.session_ended(session.client_id)

    # ------------------------------------------------------------------ messages

    def accepts_publish(self, channel: Channel, topic: str, qos: int, packet: mp.Publish) -> bool | None:
        """Whether a client's PUBLISH to ``topic`` is routed; a refused one is dropped, counted and
        logged (throttled per client). None: the authorization sources are asked, and ``packet``
        is handled again once they answered. Valid topic names are the decoder's business."""
        if topic.startswith("$SYS"):
            # $SYS belongs to the broker; other $-topics are the applications' own and are routed
            # (never to wildcard subscriptions, [MQTT-4.7.2-1]).
            why = "may not publish to %r: $SYS topics belong to the broker"
            return self._publish_dropped(channel, SYS_TOPIC, logging.INFO, why, topic)
        if topic.count("/") >= self.settings.max_topic_levels:
            why = "published to a topic of more than %d levels (mqtt.max_topic_levels)"
            return self._publish_dropped(
                channel, TOPIC_TOO_DEEP, logging.WARNING, why, self.settings.max_topic_levels
            )
        rules = channel.rules
        if rules is None:
            return True
        allowed = rules.decide("publish", topic) if rules.has_sources else rules.allows("publish", topic)
        if allowed is None:
            self.ask_sources(channel, rules, [("publish", topic, qos)], packet)
            return None
        if not allowed:
            why = "may not publish to %r (authorization rules)"
            return self._publish_dropped(channel, PUBLISH_NOT_AUTHORIZED, logging.INFO, why, topic)
        return True

    def ask_sources(
        self, channel: Channel, rules: ClientRules, requests: list[tuple[str, str, int]], packet: mp.Packet
    ) -> None:
        """Hold the connection (``packet`` first) while the sources answer ``requests``."""
        channel.hold(packet)
        channel.pending = self.loop.create_task(self._ask_sources(channel, rules, requests))

    async def _ask_sources(  # noqa: PLR0917 - a will's check goes on with its admission
        self,
        channel: Channel,
        rules: ClientRules,
        requests: list[tuple[str, str, int]],
        admission: Admission | None = None,
        decision: Decision | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Ask each source in turn for each request; remember the answers, then handle what was
        held (or, for a will, go on with the admission)."""
        credentials = channel.credentials
        answers: list[tuple[str, str, bool | None]] = []
        for action, topic, qos in requests:
            allowed = None
            for source in self._sources:
                outcome = Outcome.IGNORE
                if credentials is not None:
                    outcome = await source.authorize(credentials, action, topic, qos)
                self.source_results[(source.name, outcome.value)] += 1
                if outcome is not Outcome.IGNORE:
                    allowed = outcome is Outcome.ALLOW
                    break
            answers.append((action, topic, allowed))
        channel.pending = None
        if channel.closed:
            return
        try:
            rules.remember(answers)
            if admission is not None and decision is not None:
                self._admit(channel, admission, decision, rules, extra)
                return
            channel.release()
        except Exception:  # a bug must not leave a held connection paused for ever
            logger.exception("%s: handling the sources' answer failed; closing", channel.describe())
            channel.close("internal_error")
            return
        if self._authorizer.forgets_answers:
            rules.forget_answers()

    def _publish_dropped(self, channel: Channel, reason: str, level: int, why: str, *args: Any) -> bool:
        """Count a refused PUBLISH and log ``client 'x' from <address> <why>; dropped`` (throttled)."""
        self.counters.dropped[reason] += 1
        channel.throttle.log(
            logger,
            level,
            f"client %r from %s {why}; dropped",
            channel.client_id,
            channel.address.describe(),
            *args,
        )
        return False

    def make_message(  # noqa: PLR0917 - a PUBLISH's fields, in its order
        self,
        channel: Channel,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: dict[str, Any] | None,
    ) -> Message:
        """The message a client publishes (or its will): MQTT 5 properties to forward, its expiry,
        and, with ``mqtt.publisher_address_property``, the publisher's real address as a user
        property (any client-supplied one of that name removed first, so it cannot be forged)."""
        expires_at = None
        if properties:
            properties.pop("topic_alias", None)  # per connection, never forwarded
            properties.pop("will_delay_interval", None)
            interval = properties.pop("message_expiry_interval", None)
            if interval is not None:
                expires_at = self.loop.time() + interval
        properties = self._with_address(channel, properties)
        return Message(topic, payload, qos, retain, channel.client_id, properties or None, expires_at)

    def _with_address(self, channel: Channel, properties: dict[str, Any] | None) -> dict[str, Any] | None:
        """With ``mqtt.publisher_address_property``: ``properties`` with the publisher's real address
        as that user property (any client-supplied one of that name removed, so it cannot be forged)."""
        name = self.settings.publisher_address_property
        if name:
            properties = properties or {}
            user = [pair for pair in properties.get("user_property", ()) if pair[0] != name]
            user.append((name, channel.address.peername))
            properties["user_property"] = user
        return properties

    def _stored_will(self, channel: Channel, will: mp.Will) -> StoredWill | None:
        """A connected client's will as a persistent session keeps it: published after a restart if
        the broker stops under the connection (its Message Expiry Interval then counts from the
        restart: it is kept in the properties). None if it cannot be stored (a bug, logged)."""
        properties = dict(will.properties)
        delay = float(properties.pop("will_delay_interval", 0))
        try:
            stored_properties = properties_to_json(self._with_address(channel, properties))
        except ValueError as exc:
            logger.error("will of client %r not saved: %s", channel.client_id, exc)
            return None
        message = StoredMessage(
            will.topic, will.payload, will.qos, channel.client_id, stored_properties, None, will.retain
        )
        return StoredWill(message, delay)

    def route(self, message: Message) -> int:
        """Deliver a message to every local subscriber (:meth:`route_local`) and hand it to the
        cluster for the other nodes' subscribers (a shared subscription group gets it once in the
        cluster: the cluster says which of this node's groups take it here); returns how many
        sessions here and nodes there it went to."""
        if self.cluster is None:
            return self.route_local(message)
        _, groups = self._routes.get(message.topic) or self._targets(message.topic)
        forwarded, kept = self.cluster.forward(message, [_group_route(group) for group in groups])
        return self.route_local(message, shared=kept) + forwarded

    def deliver_remote(self, entries: list[Forwarded]) -> None:
        """Messages another node of the cluster forwarded: delivered to this node's subscribers
        (when the entry says so) and to the shared groups whose turn it is here, and retained
        here when they are retained (every node keeps every retained message)."""
        for entry in entries:
            message = entry.message
            self.route_local(message, normal=entry.normal, shared=entry.groups)
            if message.retain:
                self.retain(message, None)

    def keep_retained(self, messages: list[Message]) -> None:
        """Retained messages the cluster held while this node was away: kept, routed to nobody
        (a subscriber gets them when it subscribes)."""
        for message in messages:
            self.retain(message, None)

    def route_local(
        self, message: Message, *, normal: bool = True, shared: Collection[str] | None = None
    ) -> int:
        """Deliver a message to every matching subscriber of this node (with ``normal``; and of
        its shared subscription groups, those in ``shared`` when given): one copy per client, at
        min(publish QoS, the highest QoS of its matching subscriptions) [MQTT-3.3.5-1] (or the
        subscription's QoS with ``upgrade_qos``), with the identifiers of every subscription it
        matched (MQTT 5 3.3.4), never back to its publisher through a No Local subscription
        [MQTT-3.8.3-3], and only topics the subscriber's rules let it receive. Returns how many
        sessions it went to."""
        topic = message.topic
        cached = self._routes.get(topic)
        targets, groups = self._targets(topic) if cached is None else cached
        if groups and shared is not None:
            groups = [group for group in groups if _group_route(group) in shared]
        count = self._route_shared(message, groups) if groups else 0
        if not targets or not normal:
            return count
        upgrade = self.settings.upgrade_qos
        sessions = self._sessions
        publisher = message.publisher
        for client_id, options in targets:
            if len(options) == 1:
                option = options[0]
                if option.no_local and client_id == publisher:
                    continue
                granted = option.qos
                as_published = option.retain_as_published
                ids: tuple[int, ...] = (option.identifier,) if option.identifier else ()
            else:
                chosen = [o for o in options if not (o.no_local and client_id == publisher)]
                if not chosen:
                    continue
                granted = max(o.qos for o in chosen)
                as_published = any(o.retain_as_published for o in chosen)
                ids = tuple(o.identifier for o in chosen if o.identifier)
            session = sessions[client_id]
            rules = session.rules
            if rules is not None and not rules.allows("subscribe", topic):
                self.counters.dropped[NOT_AUTHORIZED] += 1
                session.drops[NOT_AUTHORIZED] += 1
                continue
            count += 1
            qos = granted if upgrade or granted < message.qos else message.qos
            # [MQTT-3.3.1-9] RETAIN=0 on normal deliveries, unless Retain As Published (MQTT 5).
            delivery = session.deliver(Delivery(message, qos, message.retain and as_published, ids))
            if delivery is not None and session.channel is not None:
                session.channel.send_delivery(delivery)
        return count

    def _route_shared(self, message: Message, groups: list[SharedGroup]) -> int:
        """One delivery per shared subscription group (MQTT 5 4.8.2), to the member the strategy
        picks (``mqtt.shared_subscription_strategy``), preferring connected, writable members."""
        sessions = self._sessions
        strategy = self.settings.shared_subscription_strategy

        def available(client_id: str) -> bool:
            return sessions[client_id].writable

        count = 0
        for group in groups:
            chance = random.random()  # noqa: S311 - spreading load, not a secret
            member = group.pick(strategy, message.publisher, message.topic, available, chance)
            if member is None:
                continue
            session = sessions[member]
            rules = session.rules
            if rules is not None and not rules.allows("subscribe", message.topic):
                self.counters.dropped[NOT_AUTHORIZED] += 1
                session.drops[NOT_AUTHORIZED] += 1
                continue
            options = group.members[member]
            qos = options.qos if self.settings.upgrade_qos or options.qos < message.qos else message.qos
            ids = (options.identifier,) if options.identifier else ()
            retain = message.retain and options.retain_as_published
            delivery = session.deliver(Delivery(message, qos, retain, ids))
            count += 1
            if delivery is not None and session.channel is not None:
                session.channel.send_delivery(delivery)
        return count

    def _targets(self, topic: str) -> tuple[list[tuple[str, tuple[SubOptions, ...]]], list[SharedGroup]]:
        """Who gets ``topic``: each client with the options of its matching subscriptions, and the
        shared groups that match; cached until a subscription changes.

        Built with as few objects as it takes (a topic seen once, as with a new topic per message,
        pays this on every PUBLISH): one entry per match, merged only when a client matched twice.
        """
        matches = self._subscriptions.match(topic)
        if not matches:
            entry = _NO_TARGETS
        else:
            targets: list[tuple[str, tuple[SubOptions, ...]]] = []
            groups: list[SharedGroup] = []
            for key, options in matches:
                if type(options) is SharedGroup:
                    groups.append(options)
                elif type(key) is str:
                    targets.append((key, (options,)))  # type: ignore[arg-type]
            if len(targets) > 1 and len({client_id for client_id, _ in targets}) < len(targets):
                merged: dict[str, tuple[SubOptions, ...]] = {}
                for client_id, options_of in targets:
                    merged[client_id] = merged.get(client_id, ()) + options_of
                targets = list(merged.items())
            entry = (targets, groups)
        routes = self._routes
        if len(routes) >= ROUTE_CACHE_SIZE:
            routes.clear()
        routes[topic] = entry
        return entry

    def _subscribed(self, session: EngineSession, topic_filter: str, options: SubOptions) -> None:
        if self.cluster is not None and topic_filter not in session.subscriptions:
            self.cluster.subscribed(topic_filter)
        session.subscriptions[topic_filter] = options
        if session.store is not None:
            session.store.put_subscription(session.client_id, topic_filter, options)
        shared = _shared(topic_filter)
        if shared is None:
            self._subscriptions.add(topic_filter, session.client_id, options)
        else:
            group = self._groups.get(shared)
            if group is None:
                group = self._groups[shared] = SharedGroup(*shared)
                self._subscriptions.add(shared[1], group, group)
            group.members[session.client_id] = options
        self._routes.clear()

    def _unsubscribed(self, session: EngineSession, topic_filter: str) -> None:
        if self.cluster is not None:
            self.cluster.unsubscribed(topic_filter)
        if session.store is not None:
            session.store.delete_subscription(session.client_id, topic_filter)
        shared = _shared(topic_filter)
        if shared is None:
            self._subscriptions.remove(topic_filter, session.client_id)
        else:
            group = self._groups.get(shared)
            if group is not None:
                group.members.pop(session.client_id, None)
                if not group.members:
                    del self._groups[shared]
                    self._subscriptions.remove(shared[1], group)
        self._routes.clear()

    def retain(self, message: Message, channel: Channel | None) -> None:
        """Store (or, for an empty payload, clear [MQTT-3.3.1-10/11]) a topic's retained message,
        within ``mqtt.max_retained_messages``, and tell the store (which writes it later, off the
        loop)."""
        topic = message.topic
        if not message.payload:
            self._forget_retained(topic)
            return
        limit = self.settings.max_retained_messages
        if limit and len(self._retained) >= limit and self._retained.get(topic) is None:
            self.counters.dropped[RETAINED_FULL] += 1
            if channel is not None:
                channel.throttle.log(
                    logger,
                    logging.WARNING,
                    "client %r from %s: %d retained messages stored (mqtt.max_retained_messages); "
                    "retained message on %r not kept",
                    channel.client_id,
                    channel.address.describe(),
                    limit,
                    topic,
                )
            return
        self._retained.set(topic, message)
        if self._store is not None and not topic.startswith(SYS_PREFIX):
            self._store.put_retained(message)  # converted by the store where it writes, off the loop

    def _forget_retained(self, topic: str) -> bool:
        """Drop ``topic``'s retained message, here and in the store; False if there was none."""
        if self._retained.delete(topic) is None:
            return False
        # Only what was kept is deleted from the store: a client publishing empty retained messages
        # to random topics cannot grow its pending batch (it holds the retained topics at most).
        if self._store is not None and not topic.startswith(SYS_PREFIX):
            self._store.delete_retained(topic)
        return True

    def _restore_one(self, stored: StoredMessage, loop_now: float, wall_now: float) -> str | None:
        """Retain one stored message; None if done, else why it was dropped."""
        topic = stored.topic
        if topic.startswith(SYS_PREFIX):
            return "$SYS"  # never stored by this broker: not its figures to bring back
        limit = self.settings.max_retained_messages
        try:
            message = stored.to_message(loop_now=loop_now, wall_now=wall_now)
            if message is None:
                return "expired"
            if limit and len(self._retained) >= limit and self._retained.get(topic) is None:
                return "beyond mqtt.max_retained_messages"
            self._retained.set(topic, message)
        except ValueError as exc:  # damaged properties, an invalid topic name
            logger.warning("stored retained message on %r unusable (%s): dropped", topic, exc)
            return "unusable"
        return None

    def restore_retained(self, messages: Iterable[StoredMessage]) -> int:
        """Fill the retained messages from what the store kept, at start (before any listener):
        each one's expiry moved back onto the engine's clock. Those expired meanwhile, those beyond
        ``mqtt.max_retained_messages`` (it was lowered), and unusable ones (a hand-edited store) are
        dropped, and deleted from the store: it holds what the engine holds, so a topic cleared
        later cannot come back at the next start. Returns how many were restored.

        Raises:
            RuntimeError: the engine is not started.
        """
        loop_now, wall_now = self.loop.time(), time.time()
        dropped: Counter[str] = Counter()
        restored = 0
        for stored in messages:
            why = self._restore_one(stored, loop_now, wall_now)
            if why is None:
                restored += 1
                continue
            dropped[why] += 1
            if self._store is not None:
                self._store.delete_retained(stored.topic)
        if dropped:
            logger.warning(
                "%d stored retained message(s) dropped: %s",
                dropped.total(),
                ", ".join(f"{count} {why}" for why, count in sorted(dropped.items())),
            )
        return restored

    def restore_sessions(self, stored_sessions: Iterable[StoredSession], *, foreign: bool = False) -> int:
        """Bring back the persistent sessions the store kept, at start (after the retained messages,
        before any listener): each offline until its client reconnects, its expiry counting from
        when its client went (from now for one connected when the broker stopped), its rules
        compiled for its last client, its subscriptions routing again, its queue trimmed to
        ``mqtt.max_mqueue_len``. Sessions that expired meanwhile are ended and deleted from the
        store. A will that fell due meanwhile is published now (after every session is back, so
        that they get it); one still delayed waits out its delay. Returns how many came back.

        ``foreign``: sessions another node of the cluster held (handed over, or taken over from a
        dead node): written whole to this node's store (numbered afresh), and one whose client id
        has a session here already is left where it is.

        Raises:
            RuntimeError: the engine is not started.
        """
        loop_now, wall_now = self.loop.time(), time.time()
        due: list[Message] = []
        restored = 0
        for stored in stored_sessions:
            if foreign and stored.client_id in self._sessions:
                logger.warning(
                    "the session of %r from another node: one is here already, kept", stored.client_id
                )
                continue
            will, at = self._restored_will(stored, loop_now, wall_now)
            left = stored.ends_at(wall_now) - wall_now
            if left <= 0 or stored.client_id in self._sessions:
                if self._store is not None and not foreign:
                    self._store.delete_session(stored.client_id)
                logger.info("stored session of client %r expired while the broker was down", stored.client_id)
                if will is not None:
                    due.append(will)
                continue
            session = self._restore_session(stored, loop_now, wall_now)
            session.expiry = self.loop.call_later(left, self._expire, session)
            if will is not None and at <= loop_now:
                due.append(will)
            elif will is not None:
                session.pending_will = will
                session.will_timer = self.loop.call_at(at, self._publish_will, session)
            if foreign:  # all of it, numbered by this node's store (_set_expiry does so)
                for delivery in session.pending():
                    delivery.seq = 0
                self._set_expiry(session, session.expiry_interval)
            else:
                session.store = self._store
                if self._store is not None and (stored.disconnected_at is None or will is not None):
                    self._store.put_session(session)  # now offline since this start, its will moved
            restored += 1
        for will in due:
            self.publish(will)
        if due:
            logger.info("%d will(s) that fell due while the broker was down published", len(due))
        return restored

    def _restore_session(self, stored: StoredSession, loop_now: float, wall_now: float) -> EngineSession:
        """One stored session back in memory (not yet told to the store)."""
        client_id = stored.client_id
        session = self._new_session(client_id)
        session.expiry_interval, session.persistent = stored.expiry_interval, True
        session.owner, session.username, session.ip = stored.owner, stored.username, stored.ip
        session.authenticated, session.superuser = stored.authenticated, stored.superuser
        session.disconnected_at = wall_now if stored.disconnected_at is None else stored.disconnected_at
        session.rules = self._rules_for(
            client_id,
            stored.username,
            stored.ip,
            authenticated=stored.authenticated,
            superuser=stored.superuser,
        )
        for subscription in stored.subscriptions:
            self._subscribed(session, subscription.topic_filter, subscription.to_options())
        for kept in stored.deliveries:
            try:
                message = kept.message.to_message(loop_now=loop_now, wall_now=wall_now)
            except ValueError as exc:
                logger.warning("stored message for client %r unusable (%s): dropped", client_id, exc)
                message = None
            if message is None:  # expired while the broker was down, or unusable
                self._store_forget(client_id, kept.seq)
                session.drops[EXPIRED] += 1
                self.counters.dropped[EXPIRED] += 1
                continue
            delivery = Delivery(message, kept.qos, kept.retain, kept.subscription_ids)
            delivery.seq = kept.seq
            if kept.packet_id:
                delivery.packet_id, delivery.released = kept.packet_id, kept.released
                session.inflight[kept.packet_id] = delivery
            else:
                session.queue.append(delivery)
        limit = session.max_mqueue_len
        while limit and len(session.queue) > limit:  # mqtt.max_mqueue_len was lowered
            oldest = session.queue.popleft()
            self._store_forget(client_id, oldest.seq)
            session.drops[QUEUE_FULL] += 1
            self.counters.dropped[QUEUE_FULL] += 1
        session.awaiting_rel = dict.fromkeys(stored.awaiting_rel, loop_now)
        return session

    def _store_forget(self, client_id: str, seq: int) -> None:
        if self._store is not None:
            self._store.delete_delivery(client_id, seq)

    def _restored_will(
        self, stored: StoredSession, loop_now: float, wall_now: float
    ) -> tuple[Message | None, float]:
        """A stored session's will and when it is due (the engine's clock), or ``(None, 0)``."""
        kept = stored.will
        if kept is None:
            return None, 0.0
        try:
            message = kept.message.to_message(loop_now=loop_now, wall_now=wall_now)
            if message is None:
                return None, 0.0  # its Message Expiry Interval ran out
            properties = message.properties
            if properties and "message_expiry_interval" in properties:  # a connection's will: from now
                message.expires_at = loop_now + float(properties.pop("message_expiry_interval"))
                message.properties = properties or None
        except (ValueError, TypeError) as exc:
            logger.warning("stored will of client %r unusable (%s): dropped", stored.client_id, exc)
            return None, 0.0
        if kept.due_at is not None:
            return message, loop_now + (kept.due_at - wall_now)
        # The broker stopped under the connection: the will goes after its delay, capped by the
        # session's expiry, from now (MQTT 5 3.1.3.2.2).
        return message, loop_now + min(kept.delay, stored.expiry_interval)

    def subscribe(self, channel: Channel, packet: mp.Subscribe) -> None:
        """Grant or refuse each filter (SUBACK), then send the retained messages of those granted
        [MQTT-3.3.1-6] (as MQTT 5 Retain Handling says), paced by :meth:`pump_retained`."""
        session = channel.session
        if session is None:
            return
        v5 = channel.protocol.protocol_level == 5
        rules = channel.rules
        if rules is not None and rules.has_sources:
            unknown = []
            for subscription in packet.subscriptions:
                shared = _shared(subscription.topic_filter)
                real_filter = subscription.topic_filter if shared is None else shared[1]
                if rules.decide("subscribe", real_filter, is_filter=True) is None:
                    unknown.append(("subscribe", real_filter, subscription.qos))
            if unknown:
                self.ask_sources(channel, rules, unknown, packet)
                return
        limit = self.settings.max_subscriptions
        identifier = int(packet.properties.get("subscription_identifier", 0)) if v5 else 0
        codes: list[int] = []
        granted: list[tuple[str, int, int]] = []
        for subscription in packet.subscriptions:
            topic_filter = subscription.topic_filter
            refused = None  # (metrics label, why for the log)
            shared = _shared(topic_filter)
            real_filter = topic_filter if shared is None else shared[1]
            if topic_filter.startswith("$share/") and shared is None:  # 3.1.1: not a usable share
                refused, code = ("share_invalid", "not $share/{name}/{filter}"), reasons.TOPIC_FILTER_INVALID
            elif topic_filter.count("/") >= self.settings.max_topic_levels:
                refused, code = ("max_topic_levels", "max_topic_levels"), reasons.TOPIC_FILTER_INVALID
            elif rules is not None and not rules.allows("subscribe", real_filter, is_filter=True):
                refused, code = ("authorization", "authorization rules"), reasons.NOT_AUTHORIZED
            elif real_filter.startswith("$SYS") and not self._may_read_sys(channel, rules, real_filter):
                # $SYS carries every client's address: readable only where a rule allows it.
                refused, code = ("authorization", "no rule allows $SYS"), reasons.NOT_AUTHORIZED
            elif limit and topic_filter not in session.subscriptions and len(session.subscriptions) >= limit:
                why = f"mqtt.max_subscriptions {limit}"
                refused, code = ("mqtt.max_subscriptions", why), reasons.QUOTA_EXCEEDED
            if refused is not None:
                self.counters.refused_subscriptions[refused[0]] += 1
                channel.throttle.log(
                    logger,
                    logging.INFO,
                    "client %r from %s may not subscribe to %r (%s)",
                    channel.client_id,
                    channel.address.describe(),
                    topic_filter,
                    refused[1],
                )
                codes.append(code if v5 else 0x80)
                continue
            qos = subscription.qos
            existed = topic_filter in session.subscriptions
            options = SubOptions(qos, subscription.no_local, subscription.retain_as_published, identifier)
            self._subscribed(session, topic_filter, options)
            codes.append(qos)
            handling = subscription.retain_handling if v5 else 0
            if shared is not None:
                continue  # no retained messages for a shared subscription (MQTT 5 4.8.2)
            if handling == 0 or (handling == 1 and not existed):  # MQTT 5 3.8.3.1
                granted.append((topic_filter, qos, identifier))
        channel.send(mp.Suback(packet.packet_id, codes))
        for topic_filter, qos, sub_id in granted:
            channel.retained.append((self._retained.match(topic_filter), qos, sub_id))
        if granted:
            self.pump_retained(channel)

    @staticmethod
    def _may_read_sys(channel: Channel, rules: ClientRules | None, topic_filter: str) -> bool:
        """A superuser, or a client whose rules (or sources) allow this ``$SYS`` filter explicitly:
        ``no_match: allow`` does not open ``$SYS``."""
        if channel.is_superuser:
            return True
        return rules is not None and rules.explicitly_allows("subscribe", topic_filter, is_filter=True)

    def unsubscribe(self, channel: Channel, packet: mp.Unsubscribe) -> None:
        """Remove filters (UNSUBACK; MQTT 5 codes say which existed)."""
        session = channel.session
        if session is None:
            return
        codes = []
        for topic_filter in packet.topic_filters:
            if session.subscriptions.pop(topic_filter, None) is None:
                codes.append(reasons.NO_SUBSCRIPTION_EXISTED)
            else:
                self._unsubscribed(session, topic_filter)
                codes.append(reasons.SUCCESS)
        channel.send(mp.Unsuback(packet.packet_id, codes))

    def pump_retained(self, channel: Channel) -> None:
        """Send up to :data:`RETAINED_BATCH` retained messages for new subscriptions, RETAIN=1 at
        min(retained QoS, granted QoS) [MQTT-3.3.1-8]; continue next iteration, or when the
        connection can take more (window room, transport writable). Expired ones are deleted."""
        session = channel.session
        budget = RETAINED_BATCH
        now = self.loop.time()
        while channel.retained and session is not None and channel.state is ChannelState.CONNECTED:
            if not session.writable or len(session.inflight) >= session.max_inflight:
                return  # resumed by resume_writing or an acknowledgement
            matches, granted, sub_id = channel.retained[0]
            rules = channel.rules
            ids = (sub_id,) if sub_id else ()
            for topic, message in matches:
                if message.expired(now):
                    self._forget_retained(topic)
                    continue
                if rules is not None and not rules.allows("subscribe", topic):
                    continue
                qos = min(granted, message.qos)
                delivery = session.deliver(Delivery(message, qos, True, ids))
                if delivery is not None:
                    channel.send_delivery(delivery)
                budget -= 1
                if budget == 0 or not session.writable or len(session.inflight) >= session.max_inflight:
                    break
            else:
                channel.retained.pop(0)
                continue
            if budget == 0 and channel not in self._pumping:
                self._pumping.add(channel)
                self.loop.call_soon(self._pump_later, channel)
            return

    def _pump_later(self, channel: Channel) -> None:
        self._pumping.discard(channel)
        self.pump_retained(channel)

    def _dropped(self, session: EngineSession, reason: str, delivery: Delivery) -> None:
        """A session dropped a delivery: count it, and log it without flooding."""
        self.counters.dropped[reason] += 1
        session.throttle.log(
            logger,
            logging.WARNING,
            "client %r: message on %r dropped (%s; queue %d, mqtt.max_mqueue_len %s)",
            session.client_id,
            delivery.message.topic,
            reason,
            len(session.queue),
            session.max_mqueue_len or "infinity",
        )

    # ------------------------------------------------------------------ operators

    def _view(self, channel: Channel, session: EngineSession) -> SessionView:
        return SessionView(
            client_id=channel.client_id,
            username=channel.username,
            address=channel.address,
            listener_id=channel.listener_id,
            clean_session=channel.clean_start,
            keepalive=channel.keepalive,
            connected_at=channel.connected_at,
            proto_ver=channel.protocol.protocol_level,
            subscriptions=len(session.subscriptions),
            inflight=len(session.inflight),
            queued=len(session.queue),
            drops=dict(session.drops),
            expiry_interval=session.expiry_interval,
            receive_maximum=channel.receive_maximum,
            topic_alias_maximum=channel.topic_alias_maximum,
            authenticated=channel.authenticated,
            is_superuser=channel.is_superuser,
        )

    def sessions(self) -> list[SessionView]:
        """The clients connected now, in connection order."""
        return [
            self._view(channel, channel.session)
            for channel in self._connected.values()
            if channel.session is not None
        ]

    def session(self, client_id: str) -> SessionView | None:
        """The connected client ``client_id``, if any."""
        channel = self._connected.get(client_id)
        if channel is None or channel.session is None:
            return None
        return self._view(channel, channel.session)

    def session_ids(self) -> list[str]:
        """The client ids of every session held, connected or not. Never raises."""
        return list(self._sessions)

    def count(self) -> int:
        """How many clients are connected."""
        return len(self._connected)

    def stats(self) -> dict[str, Any]:
        """Sizes for metrics: sessions, subscriptions, retained messages, queued messages."""
        return {
            "sessions": len(self._sessions),
            "subscriptions": len(self._subscriptions),
            "retained": len(self._retained),
            "queued": sum(len(session.queue) for session in self._sessions.values()),
            "inflight": sum(len(session.inflight) for session in self._sessions.values()),
        }

    def store_stats(self) -> dict[str, int]:
        """The store's counters (:meth:`broker.store.base.Store.stats`), none without one. Never
        raises."""
        return {} if self._store is None else self._store.stats()

    def subscription_list(self, client_id: str | None = None) -> list[dict[str, Any]]:
        """Every subscription (of one client's session when ``client_id`` is given), sessions in
        connection order, offline ones after: ``{"clientid", "topic", "qos", "nl", "rap", "sub_id",
        "online"}`` (EMQX's names). Never raises."""
        sessions = (
            [self._sessions[client_id]] if client_id is not None and client_id in self._sessions else []
        )
        if client_id is None:
            online = [c.session for c in self._connected.values() if c.session is not None]
            seen = {id(session) for session in online}
            sessions = [*online, *(s for s in self._sessions.values() if id(s) not in seen)]
        return [
            {
                "clientid": session.client_id,
                "topic": topic_filter,
                "qos": options.qos,
                "nl": int(options.no_local),
                "rap": int(options.retain_as_published),
                "sub_id": options.identifier or None,
                "online": session.channel is not None,
            }
            for session in sessions
            for topic_filter, options in session.subscriptions.items()
        ]

    def retained_list(self, topic_filter: str = "#", limit: int = 100) -> list[Message]:
        """Retained messages ``topic_filter`` matches, ``limit`` at most (unordered).

        Raises:
            ValueError: not a valid topic filter.
        """
        if not valid_filter(topic_filter):
            raise ValueError(f"{topic_filter!r} is not a valid topic filter")
        return [message for _, message in itertools.islice(self._retained.match(topic_filter), limit)]

    def retained_get(self, topic: str) -> Message | None:
        """The retained message of ``topic``, if any (a filter is no topic: None). Never raises."""
        return self._retained.get(topic)

    def retained_delete(self, topic: str) -> bool:
        """Drop the retained message of ``topic`` (on every node of a cluster); False if this node
        had none. Never raises."""
        if self.cluster is not None:
            self.cluster.retained_deleted(topic)
        return self._forget_retained(topic)

    def forget_retained(self, topic: str) -> None:
        """Another node of the cluster dropped the retained message of ``topic``: here too."""
        self._forget_retained(topic)

    async def kick(self, client_id: str, reason: str = "kicked") -> bool:
        """Disconnect a connected client and discard its session; False if it is not connected."""
        channel = self._connected.get(client_id)
        if channel is None:
            return False
        session = channel.session
        logger.info("client %r kicked (%s)", client_id, reason)
        channel.close(reason)
        if session is not None:
            self._discard(session)
        return True

    async def shutdown(self) -> None:
        """Close every connection (each recorded as ``shutdown``), wait up to
        :data:`SHUTDOWN_TIMEOUT` for them to go, then drop what is left."""
        if self._loop is None:
            return
        for channel in list(self._channels):
            channel.close("shutdown")
        if self._channels:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), SHUTDOWN_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "%d connection(s) did not close within %.1fs; dropping them",
                    len(self._channels),
                    SHUTDOWN_TIMEOUT,
                )
                for channel in list(self._channels):
                    channel.abort("shutdown")
        for session in list(self._sessions.values()):
            if session.expiry is not None:
                session.expiry.cancel()


#: The routing of a topic nobody subscribes to (shared, never changed).
_NO_TARGETS: tuple[list[tuple[str, tuple[SubOptions, ...]]], list[SharedGroup]] = ([], [])


def _group_route(group: SharedGroup) -> str:
    """A shared subscription group as the cluster names it: ``$share/{group}/{filter}``."""
    return f"$share/{group.group}/{group.filter}"


def _shared(topic_filter: str) -> tuple[str, str] | None:
    """``(share name, filter)`` of ``$share/{name}/{filter}``, or ``None`` for a plain filter (or a
    ``$share/`` one without a usable name and filter)."""
    if not topic_filter.startswith("$share/") or topic_filter.count("/") < 2:
        return None
    _, name, rest = topic_filter.split("/", 2)
    if not name or not rest or "+" in name or "#" in name:
        return None
    return name, rest
