"""This node as one of a cluster on Redis: heartbeat, routes, forwarding (the asyncio glue).

Keys (all under ``realip:``):

- ``node:{name}``: this node's record (JSON: instance, pid, host, started, version), with an expiry of
  ``cluster.node_timeout`` renewed every ``cluster.heartbeat_interval``;
- ``nodes``: a sorted set, node name -> last heartbeat (ms since the epoch): who is in the cluster;
- ``routes:{name}``: a set, the route filters of the node's local subscriptions;
- ``inbox:{name}``: a stream, batches of messages forwarded to the node (``wire.py``), trimmed to
  about :data:`INBOX_LENGTH` batches;
- ``clients``: a hash, client id -> ``{node}\n{JSON}``: every connected client of the cluster, as
  the node it is connected to reports it (``ctl clients show``'s fields, the real and the proxy
  address among them), with ``clients:{name}``, the set of a node's client ids (so that a node
  that dies can be cleared);
- ``sessions``: a hash, client id -> the node holding its session (connected or not), with
  ``sessions:{name}``, the set of a node's: a CONNECT on another node asks that one to hand the
  session over (``claim`` / ``handed`` events, the session itself under ``handover:{request}`` for
  a few seconds);
- ``session:{client id}``: a persistent session whole (``{node}\n`` + ``wire.encode_session``),
  written by the node holding it at each heartbeat after it changed (``mirror.py``): when that node
  dies, the first node to see it takes its sessions over (``GETDEL``: one node only), publishing
  their wills once, and a client that reconnects anywhere resumes;
- ``retained``: a hash, topic -> the topic's retained message (``{wall clock}\n`` + a batch of
  one), written by the node it was published on: what a node that joins starts with;
- ``users``: a hash, user name -> the built-in database's record (its password hash and SCRAM
  keys: this Redis must be as private as the nodes' data directories), changed on any node
  (``user`` events) and kept on every node;
- ``bans``: a hash, ``{kind}\0{value}`` -> the ban (JSON): the bans of the cluster, each made on
  one node (by an operator, or for failed authentications) and applied on every node;
- ``events``: a pub/sub channel: ``add`` / ``del`` of one route, ``hello`` of a node (re)joining,
  ``kick`` of a client by an operator on another node, ``ban`` added or deleted, ``unretain`` of a
  retained message an operator deleted, ``bye`` of a node leaving.

Four tasks per node, none per message: the heartbeat, the event listener, the inbox reader, and the
sender, which writes everything queued since its last write in one pipeline (route changes in the
order they happened, then one ``XADD`` per target node), so that a burst of publishes is a few
Redis commands and the order from one publisher to one node is kept. The engine calls
:meth:`ClusterNode.forward` inline for each PUBLISH: a cached route lookup and a list append.

When Redis goes away, the node logs it once (WARNING), keeps serving its local clients
(what it would forward is held, up to :data:`MAX_BACKLOG` messages, then dropped and counted), and
``/metrics`` and ``ctl cluster status`` say so; when it is back the node registers again, writes its
routes, clients and sessions again and reads everyone's. A node that finds itself taken for gone by
the others (it stalled longer than ``node_timeout``) joins again the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.auth.builtin import User, UserError, UserStore, user_from_json, user_to_json
from broker.bans import Ban, BanStore
from broker.cluster import wire
from broker.cluster.mirror import SessionMirror
from broker.cluster.routes import LocalFilters, RouteTable
from broker.core.session import Message
from broker.engine import EngineHooks
from broker.errors import RealIPError
from broker.settings import ClusterSettings
from broker.store.base import StoredSession

if TYPE_CHECKING:
    from broker.engine import SessionView

logger = logging.getLogger(__name__)

PREFIX: Final = "realip:"
EVENTS: Final = PREFIX + "events"
NODES: Final = PREFIX + "nodes"
CLIENTS: Final = PREFIX + "clients"
SESSIONS: Final = PREFIX + "sessions"
#: Forget the session blob KEYS[1] if node ARGV[1] wrote it (another may have since).
_FORGET_BLOB: Final = r"""
local blob = redis.call('GET', KEYS[1])
if blob and string.sub(blob, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '\n' then
    redis.call('DEL', KEYS[1])
end
return 0
"""

#: Holders a claim tries in turn (one may die, and another take its sessions over, meanwhile).
CLAIM_ATTEMPTS: Final = 3

#: Milliseconds a handed-over session waits in Redis for the node that claimed it.
HANDOVER_TTL_MS: Final = 30_000
BANS: Final = PREFIX + "bans"
USERS: Final = PREFIX + "users"
RETAINED: Final = PREFIX + "retained"
#: Batches kept in a node's inbox stream (approximately): what a node slow to read may fall behind.
INBOX_LENGTH: Final = 10_000
#: Messages held for other nodes while Redis cannot take them; beyond, new ones are dropped.
MAX_BACKLOG: Final = 100_000
#: Messages per batch (one stream entry).
BATCH_MESSAGES: Final = 1_000
#: Seconds between attempts while Redis is away.
RETRY_DELAY: Final = 1.0
#: Milliseconds the inbox reader blocks in XREAD.
READ_BLOCK_MS: Final = 1_000

#: Drop reasons (``realip_cluster_dropped_total{reason}``).
BACKLOG_FULL: Final = "backlog_full"
UNDECODABLE: Final = "undecodable"
REFUSED: Final = "redis_refused"

#: What "Redis is away" looks like; any other RedisError is Redis refusing a command (a bug, or a
#: Redis without what we use): logged as an error, not retried.
_AWAY: Final = (RedisConnectionError, RedisTimeoutError, OSError)


class ClusterError(RealIPError):
    """This node cannot join: another live node has its name, or Redis refuses it at start."""


def _node_key(name: str) -> str:
    return f"{PREFIX}node:{name}"


def _routes_key(name: str) -> str:
    return f"{PREFIX}routes:{name}"


def _inbox_key(name: str) -> str:
    return f"{PREFIX}inbox:{name}"


def _clients_key(name: str) -> str:
    return f"{PREFIX}clients:{name}"


def _sessions_key(name: str) -> str:
    return f"{PREFIX}sessions:{name}"


def _blob_key(client_id: str) -> str:
    return f"{PREFIX}session:{client_id}"


#: Forget that node ARGV[2] holds the session of ARGV[1] (KEYS: the sessions hash, the node's
#: index), unless another node holds it now.
_FORGET_SESSION: Final = r"""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[1])
return 0
"""


#: Forget a client of node ARGV[2] (KEYS: the clients hash, the node's index), unless another node
#: has it now (a takeover on another node may have written it since).
_FORGET_CLIENT: Final = r"""
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry and string.sub(entry, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. '\n' then
    redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[1])
return 0
"""


class ClusterNode(EngineHooks):
    """This node's side of the cluster (see the module's docstring).

    ``deliver`` routes a batch of messages from another node to the local subscribers (and keeps
    the retained ones); ``clock`` is the engine's (expiry times travel as time left);
    ``describe`` gives a connected client's record (``ctl clients show``'s JSON), ``connected``
    every local client's (written again after Redis comes back); ``kick`` disconnects a local
    client an operator kicked on another node. As an engine hook it keeps the registry of
    connected clients. ``bans`` are shared: every ban made here goes to the others, and
    ``on_ban(change, ban, node)`` applies one another node made (and kicks whom it matches).
    """

    def __init__(
        self,
        settings: ClusterSettings,
        name: str,
        deliver: Callable[[list[wire.Forwarded]], None],
        clock: Callable[[], float],
        version: str = "",
        *,
        describe: Callable[[SessionView], dict[str, Any]] = lambda view: {"clientid": view.client_id},
        connected: Callable[[], list[SessionView]] = list,
        kick: Callable[[str], Awaitable[bool]] | None = None,
        bans: BanStore | None = None,
        on_ban: Callable[[str, Ban, str], Awaitable[None]] | None = None,
        sessions: Callable[[], Iterable[str]] = tuple,
        hand_over: Callable[[str, bool], StoredSession | None] | None = None,
        mirror: SessionMirror | None = None,
        snapshot: Callable[[str], StoredSession | None] | None = None,
        adopt: Callable[[list[StoredSession]], int] | None = None,
        forget: Callable[[str], None] | None = None,
        users: UserStore | None = None,
        on_user: Callable[[str, User, str], None] | None = None,
        keep_retained: Callable[[list[Message]], None] | None = None,
        forget_retained: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.routes = RouteTable()
        self.local = LocalFilters()
        #: node -> last heartbeat seen (ms since the epoch), the live ones
        self.nodes: dict[str, int] = {}
        self.redis_up = False
        #: when the state last changed (time.time())
        self.redis_since = time.time()
        self.forwarded: Counter[str] = Counter()
        self.received = 0
        self.dropped: Counter[str] = Counter()
        self._deliver = deliver
        self._clock = clock
        self._describe = describe
        self._local_clients = connected
        self._kick = kick
        self._bans = bans
        self._on_ban = on_ban
        self._local_sessions = sessions
        self._hand_over = hand_over
        self._mirror = mirror
        self._snapshot = snapshot
        self._adopt = adopt
        self._forget = forget
        self._users = users
        self._on_user = on_user
        self._keep_retained = keep_retained
        self._forget_retained = forget_retained
        #: topic -> its latest retained message published here, to write to ``retained``
        self._retained: dict[str, Message] = {}
        if users is not None:
            users.on_change = self.user_changed
        #: Sessions written to Redis, and taken over from dead nodes, since start.
        self.sessions_written = 0
        self.sessions_adopted = 0
        #: request id -> the future a claim waits on (the handover key, or None)
        self._claims: dict[str, asyncio.Future[str | None]] = {}
        if bans is not None:
            bans.on_change = self.ban_changed
        self._version = version
        self._instance = uuid.uuid4().hex
        self._started = time.time()
        self._redis: aioredis.Redis | None = None
        self._outbox: dict[str, list[wire.Forwarded]] = {}
        self._backlog = 0
        #: Writes queued for the sender, in order: ("add"|"del", filter), ("client+", id, record),
        #: ("client-", id), ("kick", node, id).
        self._ops: list[tuple[str, ...]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        #: A resync is due (after Redis came back).
        self._rejoin = False
        self._joining = asyncio.Lock()
        #: Redis went away and the node has not begun to rejoin: its own state is not queued.
        self._apart = False

    # ------------------------------------------------------------------ the engine's side

    def _queue_state(self, *op: str) -> None:
        """Queue a change of this node's own state in Redis (a route, a registry entry), for the
        sender. Not while apart from Redis: the rejoin writes the whole state as it is then, so
        nothing grows with what clients do while Redis is away."""
        if self._running and not self._apart:
            self._ops.append(op)
            self._wake.set()

    def subscribed(self, topic_filter: str) -> None:
        """A local subscription to ``topic_filter`` (its route appears with the first)."""
        # A shared subscription's route is kept whole: $share/{group}/{filter}.
        if self.local.add(topic_filter):
            self._queue_state("add", topic_filter)

    def unsubscribed(self, topic_filter: str) -> None:
        """A local subscription went (its route goes with the last)."""
        if self.local.remove(topic_filter):
            self._queue_state("del", topic_filter)

    def forward(self, message: Message, local_groups: Iterable[str] = ()) -> tuple[int, set[str]]:
        """Queue ``message`` for the other nodes with a matching route (every live node, for a
        retained one: each keeps it). For each shared subscription group matching it, one node
        of those with members takes it, in turn: ``local_groups`` are the groups (``$share/g/f``)
        this node has members of. Returns how many nodes it was queued for, and the local groups
        whose turn it is here (deliver to those only). ``$SYS`` stays on its node."""
        kept = set(local_groups)
        if message.topic.startswith("$SYS"):
            return 0, kept
        normal = set(self.routes.match(message.topic))
        groups: dict[str, list[str]] = {}
        remote_groups = self.routes.shared(message.topic)
        for route in kept | set(remote_groups):
            members = [*remote_groups.get(route, ()), *((self.name,) if route in kept else ())]
            chosen = self.routes.pick(route, members)
            if chosen != self.name:
                kept.discard(route)
                groups.setdefault(chosen, []).append(route)
        targets = normal | set(groups)
        if message.retain:
            targets |= {node for node in self.nodes if node != self.name}
            if self._running:
                self._retained[message.topic] = message  # the latest wins: one write per topic
        count = 0
        for node in targets:
            if self._backlog >= MAX_BACKLOG:
                self.dropped[BACKLOG_FULL] += 1
                continue
            # Its own subscribers get it too where it has a route (or for a retained one: a node
            # with no route has no subscriber it would reach).
            entry = wire.Forwarded(message, node in normal or message.retain, tuple(groups.get(node, ())))
            self._outbox.setdefault(node, []).append(entry)
            self._backlog += 1
            count += 1
        if count or message.retain:
            self._wake.set()
        return count, kept

    def connected(self, view: SessionView) -> None:
        """An engine hook: a local client was admitted (registered cluster-wide)."""
        if self._running and not self._apart:
            self._queue_state("client+", view.client_id, json.dumps(self._describe(view)))

    def disconnected(self, view: SessionView, reason: str) -> None:
        """An engine hook: a local client's connection ended (unregistered, if still ours)."""
        self._queue_state("client-", view.client_id)

    # ------------------------------------------------------------------ cluster-wide views

    async def client(self, client_id: str) -> dict[str, Any] | None:
        """The registry's record of ``client_id`` (with ``node``), or None if it is not connected.

        Raises:
            ClusterError: Redis cannot be reached.
        """
        try:
            raw = await self._require().hget(CLIENTS, client_id)
        except (*_AWAY, RedisError) as exc:
            raise ClusterError(f"cluster: Redis at {self.settings.redis.url} unreachable: {exc}") from None
        return None if raw is None else _client_record(raw)

    async def clients(self) -> list[dict[str, Any]]:
        """Every client of the cluster, as its node reported it (with ``node``), by client id.

        Raises:
            ClusterError: Redis cannot be reached.
        """
        try:
            entries: Any = await self._require().hgetall(CLIENTS)
        except (*_AWAY, RedisError) as exc:
            raise ClusterError(f"cluster: Redis at {self.settings.redis.url} unreachable: {exc}") from None
        records = [_client_record(raw) for raw in entries.values()]
        return sorted((r for r in records if r is not None), key=lambda record: str(record["clientid"]))

    def retained_deleted(self, topic: str) -> None:
        """An operator deleted ``topic``'s retained message here (``ctl retained delete``): out of
        Redis, and off every node."""
        if self._running:
            self._retained.pop(topic, None)
            self._ops.append(("unretain", topic))
            self._wake.set()

    def session_started(self, client_id: str) -> None:
        """This node holds the session of ``client_id`` now (so a CONNECT elsewhere claims it)."""
        self._queue_state("session+", client_id)

    def session_ended(self, client_id: str) -> None:
        """This node no longer holds it."""
        self._queue_state("session-", client_id)

    async def claim(self, client_id: str, discard: bool) -> StoredSession | None:
        """If another node holds the session of ``client_id``, have it close the client's
        connection there and hand the session over (see :meth:`broker.engine.Engine.hand_over`);
        if that node is gone, take what it last wrote. A node that does not answer within
        ``cluster.node_timeout`` is taken for gone; when what a gone node wrote was taken over by
        another node meanwhile, that node is asked in turn (up to :data:`CLAIM_ATTEMPTS` holders).
        With Redis away, or after that, the client gets a session of this node (logged). Never
        raises."""
        if not self._running or not self.redis_up:
            return None
        gone: set[str] = set()
        try:
            for _ in range(CLAIM_ATTEMPTS):
                owner: Any = await self._require().hget(SESSIONS, client_id)
                owner = None if owner is None else _text(owner)
                if owner == self.name:
                    return None
                if owner is None or owner not in self.nodes or owner in gone:
                    stored = await self._take_blob(client_id)
                    if stored is not None or owner is None:
                        return stored
                    # Taken over by another node since: it records itself as the holder.
                    await asyncio.sleep(self.settings.heartbeat_interval)
                    continue
                answered, handed = await self._ask(owner, client_id, discard)
                if answered:
                    return handed
                logger.warning(
                    "cluster: node %s did not hand over the session of %r within %gs: taken for gone",
                    owner,
                    client_id,
                    self.settings.node_timeout,
                )
                gone.add(owner)
        except (*_AWAY, RedisError) as exc:
            logger.warning("cluster: the session of %r not claimed (%s): a new one here", client_id, exc)
            return None
        logger.warning("cluster: the session of %r could not be found: a new one here", client_id)
        return None

    async def _ask(self, owner: str, client_id: str, discard: bool) -> tuple[bool, StoredSession | None]:
        """Ask ``owner`` for the session: (whether it answered in time, what it handed over).

        Raises:
            RedisError, OSError: Redis cannot be reached.
        """
        redis = self._require()
        request = uuid.uuid4().hex
        waiting: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._claims[request] = waiting
        try:
            event = ("claim", self.name, owner, client_id, request, "1" if discard else "0")
            await redis.publish(EVENTS, "\0".join(event))
            try:
                async with asyncio.timeout(self.settings.node_timeout):
                    key = await waiting
            except TimeoutError:
                return False, None
        finally:
            self._claims.pop(request, None)
        data: Any = None if key is None else await redis.getdel(key)
        if data is None:
            return True, None
        try:
            return True, wire.decode_session(data)
        except wire.WireError as exc:
            logger.error("cluster: the session of %r from node %s is unreadable: %s", client_id, owner, exc)
            return True, None

    async def _take_blob(self, client_id: str) -> StoredSession | None:
        """The session a dead node last wrote of ``client_id``, taken (no other node gets it).

        Raises:
            RedisError, OSError: Redis cannot be reached.
        """
        data: Any = await self._require().getdel(_blob_key(client_id))
        if data is None:
            return None
        node, _, encoded = bytes(data).partition(b"\n")
        try:
            stored = wire.decode_session(encoded)
        except wire.WireError as exc:
            logger.error(
                "cluster: the session of %r node %s wrote is unreadable: %s", client_id, node.decode(), exc
            )
            return None
        logger.info("cluster: the session of %r taken over from node %s (gone)", client_id, node.decode())
        return stored

    async def _write_sessions(self, redis: aioredis.Redis) -> None:
        """Every persistent session that changed since the last heartbeat, whole, to Redis."""
        if self._mirror is None or self._snapshot is None:
            return
        changed, ended = self._mirror.take()
        if not changed and not ended:
            return
        pipe = redis.pipeline(transaction=False)
        prefix = f"{self.name}\n".encode()
        for client_id in changed:
            stored = self._snapshot(client_id)
            if stored is None:
                continue
            try:
                pipe.set(_blob_key(client_id), prefix + wire.encode_session(stored))
            except ValueError as exc:  # the decoder makes only storable values: a bug
                logger.error("cluster: the session of %r not written: %s", client_id, exc)
        for client_id in ended:
            pipe.eval(_FORGET_BLOB, 1, _blob_key(client_id), self.name)
        try:
            await pipe.execute()
        except (*_AWAY, RedisError):
            self._mirror.give_back(changed, ended)
            raise
        self.sessions_written += len(changed)

    async def _adopt_sessions(self, node: str) -> None:
        """A node died: take over the sessions it held (each goes to the first node that gets it),
        publishing the wills that fall due (once: no other node has the session)."""
        if self._adopt is None:
            return
        redis = self._require()
        ids: Any = await redis.smembers(_sessions_key(node))
        taken = []
        for client_id in ids:
            stored = await self._take_blob(_text(client_id))
            if stored is not None:
                taken.append(stored)
        if taken:
            self.sessions_adopted += self._adopt(taken)
            logger.warning("cluster: %d session(s) of node %s taken over", len(taken), node)

    async def _on_claim(self, claimer: str, client_id: str, request: str, discard: bool) -> None:
        """Another node admitted ``client_id``: hand its session over (if it is here)."""
        stored = None if self._hand_over is None else self._hand_over(client_id, discard)
        redis = self._require()
        key = ""
        if stored is not None:
            key = f"{PREFIX}handover:{request}"
            # In Redis first, then let go: if the write fails, the session stays here.
            await redis.set(key, wire.encode_session(stored), px=HANDOVER_TTL_MS)
            if self._forget is not None:
                self._forget(client_id)
            logger.info("cluster: the session of %r handed over to node %s", client_id, claimer)
        await redis.publish(EVENTS, "\0".join(("handed", self.name, claimer, request, key)))

    def user_changed(self, change: str, user: User) -> None:
        """A user was added, changed or deleted here (``UserStore.on_change``): every node too."""
        if self._running:
            self._ops.append(("user", change, user.username, json.dumps(user_to_json(user))))
            self._wake.set()

    def ban_changed(self, change: str, ban: Ban) -> None:
        """A ban was added or deleted here (``BanStore.on_change``): every node applies it."""
        if self._running:
            self._ops.append(("ban", change, json.dumps(dataclasses.asdict(ban))))
            self._wake.set()

    def kick_remote(self, node: str, client_id: str) -> None:
        """Ask ``node`` to disconnect ``client_id`` (an operator kicked it here)."""
        self._ops.append(("kick", node, client_id))
        self._wake.set()

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Join: claim the name, publish this node's routes, read everyone's, start the tasks.

        Raises:
            ClusterError: Redis cannot be reached, or a live node has this name.
        """
        self._redis = aioredis.from_url(
            self.settings.redis.url,
            socket_connect_timeout=self.settings.node_timeout,
            socket_timeout=None,
            health_check_interval=30,
        )
        try:
            await self._claim_name()
            await self._join()
        except RedisError as exc:
            await self._close_redis()
            raise ClusterError(f"cluster.redis.url: cannot use {self.settings.redis.url}: {exc}") from None
        except ClusterError:
            await self._close_redis()
            raise
        self._running = True
        self.redis_up, self.redis_since = True, time.time()
        for coroutine in (self._heartbeat(), self._listen(), self._read_inbox(), self._send()):
            self._tasks.append(asyncio.create_task(coroutine))
        logger.info(
            "cluster: node %s joined through %s (%d other node(s), %d route(s))",
            self.name,
            self.settings.redis.url,
            len(self.nodes) - 1,
            len(self.routes),
        )

    async def stop(self) -> None:
        """Leave: what is queued is sent (briefly), the record and routes deleted. Never raises."""
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        redis = self._redis
        if redis is not None and self.redis_up:
            try:
                async with asyncio.timeout(2.0):
                    await self._write_pending(redis)
                    await self._write_sessions(redis)  # as the stop left them: offline, no will
                    pipe = redis.pipeline(transaction=False)
                    pipe.delete(_node_key(self.name), _routes_key(self.name))
                    pipe.zrem(NODES, self.name)
                    pipe.publish(EVENTS, f"bye\0{self.name}")
                    await pipe.execute()
                    await self._forget_clients(self.name)
                    await self._forget_sessions(self.name)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("cluster: could not leave cleanly (%s); the others drop this node later", exc)
        await self._close_redis()
        logger.info("cluster: node %s left", self.name)

    async def _close_redis(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    def _record(self) -> str:
        return json.dumps(
            {
                "instance": self._instance,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self._started,
                "version": self._version,
            }
        )

    async def _claim_name(self) -> None:
        """Refuse a name a live node has (its record, renewed at each heartbeat, lasts
        ``node_timeout``), unless that node was a process of this host that is gone (a restart
        after a crash need not wait for the record to lapse).

        Raises:
            ClusterError: a live node has this name.
            RedisError: Redis refused a command.
        """
        existing = await self._require().get(_node_key(self.name))
        if existing is None:
            return
        try:
            other = json.loads(existing)
        except ValueError:
            other = {}
        pid = other.get("pid") if isinstance(other, dict) else None
        if isinstance(pid, int) and other.get("host") == socket.gethostname() and not _alive(pid):
            logger.warning(
                "cluster: taking over the name %r of a process of this host that is gone", self.name
            )
            return
        raise ClusterError(
            f"node.name: {self.name!r} is the name of a live node of the cluster (pid {pid} on "
            f"{other.get('host')}): give each node its own node.name, or wait cluster.node_timeout "
            "after stopping that one"
        )

    async def _join(self) -> None:
        """Register, publish this node's routes, clients and sessions (their state now: what was
        queued of them before is superseded), write the bans, users and retained messages changed
        here while apart (before the merges, so that they are not undone), then read the others'."""
        redis = self._require()
        queued, self._ops = self._ops, []  # what comes during the join stays queued after it
        now_ms = int(time.time() * 1000)
        pipe = redis.pipeline(transaction=True)
        pipe.set(_node_key(self.name), self._record(), px=int(self.settings.node_timeout * 1000))
        pipe.zadd(NODES, {self.name: now_ms})
        pipe.delete(_routes_key(self.name))
        filters = list(self.local)
        if filters:
            pipe.sadd(_routes_key(self.name), *filters)
        pipe.publish(EVENTS, f"hello\0{self.name}")
        await pipe.execute()
        # The registry: what a former run of this node left is cleared, the clients here now
        # written (after a Redis outage, they may have changed meanwhile).
        await self._forget_clients(self.name)
        await self._read_nodes()
        held = await self._keep_own_sessions(list(self._local_sessions()))
        await self._forget_sessions(self.name)
        if held:
            pipe = redis.pipeline(transaction=False)
            pipe.hset(SESSIONS, mapping=dict.fromkeys(held, self.name))
            pipe.sadd(_sessions_key(self.name), *held)
            await pipe.execute()
        views = self._local_clients()
        if views:
            pipe = redis.pipeline(transaction=False)
            for view in views:
                record = json.dumps(self._describe(view))
                pipe.hset(CLIENTS, view.client_id, f"{self.name}\n{record}")
                pipe.sadd(_clients_key(self.name), view.client_id)
            await pipe.execute()
        self._ops = [op for op in queued if op[0] in ("kick", "ban", "user", "unretain")] + self._ops
        await self._write_pending(redis)
        await self._merge_bans()
        await self._merge_users()
        await self._load_retained()
        await self._read_nodes()

    async def _load_retained(self) -> None:
        """The cluster's retained messages, kept here (they win over what this node's store
        had for the same topic: the cluster went on while this node was away)."""
        if self._keep_retained is None:
            return
        stored: Any = await self._require().hgetall(RETAINED)
        now, wall_now = self._clock(), time.time()
        kept: list[Message] = []
        for topic, raw in stored.items():
            written, _, batch = bytes(raw).partition(b"\n")
            try:
                messages = [e.message for e in wire.decode(batch, now - (wall_now - float(written)))]
            except (wire.WireError, ValueError) as exc:
                logger.warning(
                    "cluster: retained message on %r in %s unreadable (%s): skipped", topic, RETAINED, exc
                )
                continue
            kept += [message for message in messages if not message.expired(now)]
        if kept:
            self._keep_retained(kept)
            logger.info("cluster: %d retained message(s) of the cluster kept", len(kept))

    async def _merge_users(self) -> None:
        """The cluster's users and this node's, made one: Redis's record wins for a user both
        have; those only this node has are written to Redis."""
        if self._users is None or self._on_user is None:
            return
        redis = self._require()
        stored: Any = await redis.hgetall(USERS)
        names = set()
        for raw in stored.values():
            user = _user_record(raw)
            if user is None:
                continue
            names.add(user.username)
            if self._users.get(user.username) != user:
                self._on_user("put", user, "cluster")
        missing = [user for user in self._users.list() if user.username not in names]
        if missing:
            await redis.hset(
                USERS, mapping={user.username: json.dumps(user_to_json(user)) for user in missing}
            )

    async def _merge_bans(self) -> None:
        """The cluster's bans and this node's, made one: those only Redis has are applied here,
        those only this node has (made while apart) written to Redis; expired ones dropped."""
        if self._bans is None:
            return
        redis = self._require()
        stored: Any = await redis.hgetall(BANS)
        now = time.time()
        seen: set[tuple[str, str]] = set()
        for key, raw in stored.items():
            try:
                ban = Ban(**json.loads(raw))
            except (TypeError, ValueError):
                logger.warning("cluster: unreadable ban %r in %s: deleted", key, BANS)
                await redis.hdel(BANS, key)
                continue
            if ban.expired(now):
                await redis.hdel(BANS, key)
                continue
            seen.add((ban.kind, ban.value))
            if self._bans.get(ban.kind, ban.value) is None and self._on_ban is not None:
                await self._on_ban("add", ban, "cluster")
        mine = [ban for ban in self._bans if (ban.kind, ban.value) not in seen and not ban.expired(now)]
        if mine:
            await redis.hset(
                BANS,
                mapping={f"{ban.kind}\0{ban.value}": json.dumps(dataclasses.asdict(ban)) for ban in mine},
            )

    async def _keep_own_sessions(self, held: list[str]) -> list[str]:
        """Of the sessions this node holds (restored from its store, or kept through a Redis
        outage), let go of those another live node holds now (it took them over meanwhile);
        returns the others."""
        if not held:
            return held
        redis = self._require()
        owners: Any = await redis.hmget(SESSIONS, held)
        kept = []
        for client_id, owner in zip(held, owners, strict=True):
            holder = None if owner is None else _text(owner)
            if holder is not None and holder != self.name and holder in self.nodes:
                logger.info(
                    "cluster: the session of %r lives on node %s now: dropped here", client_id, holder
                )
                if self._forget is not None:
                    self._forget(client_id)
            else:
                kept.append(client_id)
        return kept

    async def _forget_sessions(self, node: str) -> None:
        """Clear what ``node`` held of the sessions index (it died, or this is its new run)."""
        await self._forget_entries(node, _FORGET_SESSION, SESSIONS, _sessions_key(node))

    async def _forget_clients(self, node: str) -> None:
        """Clear ``node``'s clients from the registry (it died, or this is its new run)."""
        await self._forget_entries(node, _FORGET_CLIENT, CLIENTS, _clients_key(node))

    async def _forget_entries(self, node: str, script: str, registry: str, index: str) -> None:
        """Run ``script`` (compare-and-delete) for each client id of ``node``'s ``index`` in
        ``registry`` (entries another node wrote since stay), then drop the index."""
        redis = self._require()
        ids: Any = await redis.smembers(index)
        if ids:
            pipe = redis.pipeline(transaction=False)
            for client_id in ids:
                pipe.eval(script, 2, registry, index, client_id, node)
            await pipe.execute()
        await redis.delete(index)

    async def _read_nodes(self) -> None:
        """Who is alive, and every live node's routes (a full read)."""
        redis = self._require()
        now_ms = int(time.time() * 1000)
        since = now_ms - int(self.settings.node_timeout * 1000)
        alive: Any = await redis.zrangebyscore(NODES, since, "+inf", withscores=True)
        self.nodes = {_text(name): int(score) for name, score in alive}
        self.nodes.setdefault(self.name, now_ms)
        for node in list(self.routes.nodes()):
            if node not in self.nodes:
                self.routes.drop(node)
        for node in self.nodes:
            if node != self.name:
                self.routes.replace(node, _texts(await redis.smembers(_routes_key(node))))

    def _require(self) -> aioredis.Redis:
        if self._redis is None:
            raise ClusterError("cluster: not started")
        return self._redis

    def _set_up(self, up: bool, why: object = None) -> None:
        if up == self.redis_up:
            return
        self.redis_up = up
        self.redis_since = time.time()
        if up:
            logger.warning("cluster: Redis at %s reachable again: rejoining", self.settings.redis.url)
        else:
            logger.warning(
                "cluster: Redis at %s unreachable (%s): serving local clients only, retrying",
                self.settings.redis.url,
                why,
            )
            self._rejoin = self._apart = True

    async def _recover(self) -> None:
        """After a failure: wait, then rejoin if Redis answers (raises again if not). One task
        rejoins; the others wait for it."""
        await asyncio.sleep(RETRY_DELAY)
        async with self._joining:
            if self._rejoin:
                self._apart = False  # from here on, changes are queued again (kept by _join)
                try:
                    await self._join()
                except BaseException:
                    self._apart = True
                    raise
                self._rejoin = False
        self._set_up(True)

    # ------------------------------------------------------------------ tasks

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            try:
                await asyncio.sleep(interval)
                if self._rejoin:
                    await self._recover()
                async with asyncio.timeout(self.settings.node_timeout):  # a half-open connection
                    await self._beat()
            except (*_AWAY, TimeoutError) as exc:
                self._set_up(False, exc or "no answer within cluster.node_timeout")
            except RedisError as exc:
                logger.error("cluster: Redis refused the heartbeat: %s", exc)
            except Exception:  # a bug: logged, and the heartbeat goes on (else the node "dies")
                logger.exception("cluster: the heartbeat failed")

    async def _beat(self) -> None:
        redis = self._require()
        now_ms = int(time.time() * 1000)
        since = now_ms - int(self.settings.node_timeout * 1000)
        pipe = redis.pipeline(transaction=False)
        pipe.set(_node_key(self.name), self._record(), px=int(self.settings.node_timeout * 1000))
        pipe.zadd(NODES, {self.name: now_ms})
        pipe.zrangebyscore(NODES, since, "+inf", withscores=True)
        pipe.zrangebyscore(NODES, "-inf", f"({since}")
        _, added, alive, gone = await pipe.execute()
        if added and not self._rejoin:
            # We were taken for gone (this node stalled longer than node_timeout): the others
            # dropped our routes and took our sessions. Join again: settles who holds what.
            logger.warning("cluster: the other nodes took this node for gone: rejoining")
            self._rejoin = True
        before = set(self.nodes)
        self.nodes = {_text(name): int(score) for name, score in alive}
        for node in before - set(self.nodes) - {self.name}:  # gone, whoever saw it first
            self.routes.drop(node)
            self._outbox.pop(node, None)
        for raw in gone:
            node = _text(raw)
            if node != self.name:
                await self._reap(node)
        await self._write_sessions(redis)
        for node in set(self.nodes) - before - {self.name}:  # joined while we did not listen
            self.routes.replace(node, _texts(await redis.smembers(_routes_key(node))))
        self._backlog = sum(len(queued) for queued in self._outbox.values())

    async def _reap(self, node: str) -> None:
        """A node stopped heartbeating: one node (the first to take the lock) clears what it left
        and takes its sessions over; its name leaves ``nodes`` last, so that a failure half way
        leaves it for the next heartbeat (of any node) to finish."""
        redis = self._require()
        reaping = f"{PREFIX}reaping:{node}"
        if not await redis.set(reaping, self.name, nx=True, px=int(self.settings.node_timeout * 5000)):
            return  # another node is on it
        timeout = self.settings.node_timeout
        logger.warning("cluster: node %s is gone (no heartbeat for %gs)", node, timeout)
        self.routes.drop(node)
        self._outbox.pop(node, None)
        await self._forget_clients(node)
        await self._adopt_sessions(node)
        await self._forget_sessions(node)
        cleanup = redis.pipeline(transaction=False)
        cleanup.delete(_routes_key(node), _inbox_key(node), _node_key(node))
        cleanup.zrem(NODES, node)
        await cleanup.execute()

    async def _listen(self) -> None:
        while True:
            try:
                redis = self._require()
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(EVENTS)
                    if self._rejoin:
                        await self._recover()
                    else:  # what changed before the subscription (events are not replayed)
                        await self._read_nodes()
                        await self._merge_bans()
                        await self._merge_users()
                    async for event in pubsub.listen():
                        await self._on_event(event)
            except _AWAY as exc:
                self._set_up(False, exc)
                await asyncio.sleep(RETRY_DELAY)
            except RedisError as exc:
                logger.error("cluster: Redis refused a command of the event listener: %s", exc)
                await asyncio.sleep(RETRY_DELAY)
            except Exception:  # a bug: logged, and the listener goes on
                logger.exception("cluster: an event could not be handled")
                await asyncio.sleep(RETRY_DELAY)

    async def _on_event(self, event: dict[str, Any]) -> None:
        """One message of ``realip:events``: ``kind\0sender\0args...`` (no field holds a NUL:
        MQTT strings may not, JSON escapes it)."""
        data = event.get("data")
        if not isinstance(data, bytes):
            return
        fields = data.decode(errors="replace").split("\0")
        if len(fields) < 2 or not fields[1] or fields[1] == self.name:
            return
        kind, node, args = fields[0], fields[1], fields[2:]
        if kind == "add" and args:
            self.routes.add(node, args[0])
            self.nodes.setdefault(node, int(time.time() * 1000))
        elif kind == "del" and args:
            self.routes.remove(node, args[0])
        elif kind == "hello":
            self.nodes[node] = int(time.time() * 1000)
            self.routes.replace(node, _texts(await self._require().smembers(_routes_key(node))))
            logger.info("cluster: node %s joined", node)
        elif kind == "bye":  # it left cleanly
            self.routes.drop(node)
            self.nodes.pop(node, None)
        elif kind == "user" and len(args) == 2 and self._on_user is not None:
            await self._on_shared_user(node, *args)
        elif kind == "ban" and len(args) == 2:
            await self._on_shared_ban(node, *args)
        elif kind == "claim" and len(args) == 4 and args[0] == self.name:
            await self._on_claim(node, args[1], args[2], args[3] == "1")
        elif kind == "handed" and len(args) == 3 and args[0] == self.name:
            waiting = self._claims.get(args[1])
            if waiting is not None and not waiting.done():
                waiting.set_result(args[2] or None)
        elif kind == "unretain" and len(args) == 1 and self._forget_retained is not None:
            self._forget_retained(args[0])
        elif kind == "kick" and len(args) == 2 and args[0] == self.name and self._kick is not None:
            kicked = await self._kick(args[1])
            logger.info("cluster: client %r kicked from node %s: %s", args[1], node, kicked)

    async def _on_shared_user(self, node: str, change: str, username: str) -> None:
        assert self._on_user is not None
        if change == "delete":
            known = None if self._users is None else self._users.get(username)
            if known is not None:
                self._on_user("delete", known, node)
            return
        raw = await self._require().hget(USERS, username)
        user = _user_record(raw)
        if user is not None:
            self._on_user("put", user, node)

    async def _on_shared_ban(self, node: str, change: str, raw: str) -> None:
        try:
            ban = Ban(**json.loads(raw))
        except (TypeError, ValueError):
            logger.warning("cluster: unreadable ban from node %s: %r", node, raw[:200])
            return
        if self._on_ban is not None:
            await self._on_ban(change, ban, node)

    async def _read_inbox(self) -> None:
        key = _inbox_key(self.name)
        last: str | None = None
        while True:
            try:
                redis = self._require()
                if last is None:  # from what is there now on (what came for a former run is old)
                    tail: Any = await redis.xrevrange(key, count=1)
                    last = _text(tail[0][0]) if tail else "0-0"
                answer: Any = await redis.xread({key: last}, block=READ_BLOCK_MS, count=100)
                for _, entries in answer or ():
                    for entry_id, fields in entries:
                        last = _text(entry_id)
                        self._on_batch(fields.get(b"m", b""))
            except _AWAY as exc:
                self._set_up(False, exc)
                await asyncio.sleep(RETRY_DELAY)
            except RedisError as exc:
                logger.error("cluster: Redis refused to read %s: %s", key, exc)
                await asyncio.sleep(RETRY_DELAY)
            except Exception:  # a bug (delivering a batch): logged, the batch skipped, reading goes on
                logger.exception("cluster: a batch from %s could not be delivered", key)

    def _on_batch(self, data: bytes) -> None:
        try:
            entries = wire.decode(data, self._clock())
        except wire.WireError as exc:
            self.dropped[UNDECODABLE] += 1
            logger.error("cluster: a batch in %s could not be read (%s): dropped", _inbox_key(self.name), exc)
            return
        self.received += len(entries)
        self._deliver(entries)

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                redis = self._require()
                if self._rejoin:
                    await self._recover()
                await self._write_pending(redis)
            except _AWAY as exc:
                self._set_up(False, exc)
                await asyncio.sleep(RETRY_DELAY)
                self._wake.set()  # what is held goes when Redis is back
            except RedisError as exc:  # dropped (counted) by _write_pending: retrying would fail again
                logger.error("cluster: Redis refused a write: %s", exc)
            except Exception:  # a bug (a message that cannot be encoded): logged, what was taken dropped
                logger.exception("cluster: a write could not be prepared")

    def _queue_op(self, pipe: Any, kind: str, args: list[str]) -> list[str] | None:
        """Queue one of :attr:`_ops` on ``pipe``; returns the fields of the event it announces
        (None: the registry's own writes, which announce nothing)."""
        if kind == "add":
            pipe.sadd(_routes_key(self.name), args[0])
        elif kind == "del":
            pipe.srem(_routes_key(self.name), args[0])
        elif kind == "client+":
            pipe.hset(CLIENTS, args[0], f"{self.name}\n{args[1]}")
            pipe.sadd(_clients_key(self.name), args[0])
            return None
        elif kind == "client-":
            pipe.eval(_FORGET_CLIENT, 2, CLIENTS, _clients_key(self.name), args[0], self.name)
            return None
        elif kind == "session+":
            pipe.hset(SESSIONS, args[0], self.name)
            pipe.sadd(_sessions_key(self.name), args[0])
            return None
        elif kind == "session-":  # its blob too, at once: a claim elsewhere must not revive it
            pipe.eval(_FORGET_SESSION, 2, SESSIONS, _sessions_key(self.name), args[0], self.name)
            pipe.eval(_FORGET_BLOB, 1, _blob_key(args[0]), self.name)
            return None
        elif kind == "unretain":
            pipe.hdel(RETAINED, args[0])
        elif kind == "user":
            if args[0] == "put":
                pipe.hset(USERS, args[1], args[2])
            else:
                pipe.hdel(USERS, args[1])
            return args[:2]  # the event names the user; the others read the record from the hash
        elif kind == "ban":
            record = json.loads(args[1])
            key = f"{record['kind']}\0{record['value']}"
            if args[0] == "add":
                pipe.hset(BANS, key, args[1])
            else:
                pipe.hdel(BANS, key)
        return args

    async def _write_pending(self, redis: aioredis.Redis) -> None:
        """Route changes, then the held messages, in one pipeline; kept if it fails."""
        ops, outbox, retained = self._ops, self._outbox, self._retained
        if not ops and not outbox and not retained:
            return
        now = self._clock()
        pipe = redis.pipeline(transaction=False)
        for kind, *args in ops:
            event = self._queue_op(pipe, kind, args)
            if event is not None:
                pipe.publish(EVENTS, "\0".join((kind, self.name, *event)))
        sent: Counter[str] = Counter()
        for node, messages in outbox.items():
            for start in range(0, len(messages), BATCH_MESSAGES):
                chunk = messages[start : start + BATCH_MESSAGES]
                pipe.xadd(
                    _inbox_key(node), {"m": wire.encode(chunk, now)}, maxlen=INBOX_LENGTH, approximate=True
                )
            sent[node] += len(messages)
        wall = f"{time.time()}\n".encode()
        for topic, message in retained.items():
            if message.payload:
                pipe.hset(RETAINED, topic, wall + wire.encode([wire.Forwarded(message)], now))
            else:  # an empty retained message clears the topic [MQTT-3.3.1-10]
                pipe.hdel(RETAINED, topic)
        self._ops, self._outbox, self._retained = [], {}, {}
        try:
            await pipe.execute()
        except _AWAY:
            self._ops = ops + self._ops  # kept, before what came meanwhile
            for node, messages in outbox.items():
                self._outbox[node] = messages + self._outbox.get(node, [])
            self._retained = {**retained, **self._retained}
            raise
        except RedisError:
            self.dropped[REFUSED] += sum(sent.values())
            raise
        self._backlog = sum(len(queued) for queued in self._outbox.values())
        self.forwarded.update(sent)

    # ------------------------------------------------------------------ reports

    def status(self) -> dict[str, Any]:
        """What ``ctl cluster status`` shows. Never raises."""
        now_ms = time.time() * 1000
        return {
            "node": self.name,
            "redis": {
                "url": self.settings.redis.url,
                "up": self.redis_up,
                "since": self.redis_since,
            },
            "nodes": [
                {
                    "name": node,
                    "self": node == self.name,
                    "heartbeat_age": round(max(0.0, now_ms - seen) / 1000, 3),
                    "routes": len(self.local) if node == self.name else len(self.routes.filters(node)),
                }
                for node, seen in sorted(self.nodes.items())
            ],
            "forwarded": dict(self.forwarded),
            "received": self.received,
            "sessions_written": self.sessions_written,
            "sessions_taken_over": self.sessions_adopted,
            "backlog": self._backlog,
            "dropped": dict(self.dropped),
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Iterable[bytes | str]) -> list[str]:
    return [_text(value) for value in values]


def _client_record(raw: bytes | str) -> dict[str, Any] | None:
    """A registry entry (``{node}\n{JSON}``) as the client's record with its ``node``; None if it
    is not one (another program wrote it)."""
    node, _, record = _text(raw).partition("\n")
    try:
        data = json.loads(record)
    except ValueError:
        return None
    return {**data, "node": node} if isinstance(data, dict) else None


def _user_record(raw: bytes | str | None) -> User | None:
    """A user from the ``users`` hash, or None (absent, or unreadable: logged)."""
    if raw is None:
        return None
    try:
        return user_from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError, UserError) as exc:  # binascii.Error is a ValueError
        logger.warning("cluster: an unreadable user in %s (%s): skipped", USERS, exc)
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True
