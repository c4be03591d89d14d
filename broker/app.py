"""The broker process: the engine, one listener per configured listener, and an orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import __version__, logs
from broker.access import Gatekeeper
from broker.admin import AdminServer, client_json
from broker.advice import config_warnings
from broker.audit import AuditLog
from broker.auth.base import Authenticator, AuthError
from broker.auth.builtin import BuiltinAuthenticator, UserError, UserStore
from broker.auth.chain import AuthChain, Exchange
from broker.auth.http import HttpAuthenticator, HttpAuthorizationSource
from broker.auth.password_file import PasswordFileAuthenticator
from broker.auth.passwords import PasswordChecks
from broker.auth.scram import METHODS as SCRAM_METHODS
from broker.auth.scram import ScramCredentials, ScramExchange
from broker.authorization import Authorizer
from broker.bans import BanError, BanStore
from broker.channel import Channel
from broker.cluster.mirror import SessionMirror
from broker.cluster.node import ClusterError, ClusterNode
from broker.engine import Engine, EngineHooks
from broker.errors import ConfigError, RealIPError
from broker.listener_changes import ListenerChanges, plan_listeners
from broker.operations import AuditTrail, Operations
from broker.settings import (
    AmqttPluginSettings,
    BuiltinDatabaseSettings,
    HttpAuthSettings,
    JwtSettings,
    ListenerSettings,
    PasswordFileSettings,
    Settings,
    dump_settings,
    load_settings_file,
)
from broker.store.base import FanOut, NullStore, Store, StoreError
from broker.store.sqlite import SqliteStore
from broker.sys_topics import Hooks, SysTopics
from listeners.acceptor import Opening
from listeners.address import format_hostport
from listeners.options import ListenerOptions
from listeners.tcp import SslListener, TcpListener
from listeners.websocket import WebSocketListener

logger = logging.getLogger(__name__)

Listener = TcpListener | WebSocketListener


class StartupError(RealIPError):
    """The broker could not start (a port in use, an address not local...)."""


def make_auth_chain(settings: Settings, users: UserStore, checks: PasswordChecks) -> AuthChain:
    """The authenticators of ``settings.authentication``, in order; SCRAM entries become the
    MQTT 5 enhanced authentication methods offered (against the built-in database)."""
    authenticators: list[Authenticator] = []
    enhanced: dict[str, Callable[[], Exchange]] = {}
    for entry in settings.authenticators():
        if isinstance(entry, BuiltinDatabaseSettings):
            authenticators.append(BuiltinAuthenticator(users, checks))
        elif isinstance(entry, PasswordFileSettings):
            authenticators.append(PasswordFileAuthenticator(entry, checks))
        elif isinstance(entry, HttpAuthSettings):
            authenticators.append(HttpAuthenticator(entry))
        elif isinstance(entry, JwtSettings):
            from broker.auth.jwt import JwtAuthenticator  # cryptography: ~8 MiB, only when used

            authenticators.append(JwtAuthenticator(entry))
        elif isinstance(entry, AmqttPluginSettings):
            from broker.auth.amqtt_plugin import AmqttPluginAuthenticator

            authenticators.append(AmqttPluginAuthenticator(entry))
        else:
            method = next(name for name, algorithm in SCRAM_METHODS.items() if algorithm == entry.algorithm)
            enhanced[method] = functools.partial(
                ScramExchange,
                method,
                functools.partial(_scram_credentials, users, entry.algorithm),
                unknown_iterations=entry.iteration_count,
            )

    def is_superuser(username: str) -> bool:
        user = users.get(username)
        return user is not None and user.is_superuser

    return AuthChain(
        authenticators, allow_anonymous=settings.allow_anonymous, enhanced=enhanced, is_superuser=is_superuser
    )


def make_sources(settings: Settings) -> list[HttpAuthorizationSource]:
    """The enabled ``authorization.sources``, not started."""
    return [HttpAuthorizationSource(source) for source in settings.authorization.sources if source.enable]


def make_authorizer(settings: Settings, sources: list[HttpAuthorizationSource]) -> Authorizer:
    """``authorization``'s rules, asking ``sources`` what they do not decide."""
    authorization = settings.authorization
    return Authorizer(
        authorization.rules,
        authorization.no_match,
        sources=bool(sources),
        cache_size=authorization.cache.max_size,
        cache_ttl=authorization.cache.ttl,
        cache_enabled=authorization.cache.enable,
    )


async def start_authentication(auth: AuthChain, sources: list[HttpAuthorizationSource]) -> None:
    """Start the chain, then each authorization source; on a failure what was started is closed.

    Raises:
        AuthError: one cannot be set up (the message names it: the authenticator, or the source's
            index in ``authorization.sources``).
    """
    await auth.start()
    for index, source in enumerate(sources):
        try:
            await source.start()
        except AuthError as exc:
            await close_authentication(auth, sources[:index])
            raise AuthError(f"authorization.sources[{index}]: {exc}") from None


async def close_authentication(auth: AuthChain, sources: list[HttpAuthorizationSource]) -> None:
    """Close a chain and its sources."""
    await auth.close()
    for source in sources:
        await source.close()


#: Seconds a chain replaced by a reload stays open, for the authentications under way with it
#: (longer than an HTTP authenticator's default request_timeout).
RETIRE_AFTER = 30.0

#: Sections a reload applies at once; a change anywhere else is reported as needing a restart
#: (and ``listeners.*.peer_cert_as_username``, see broker/listener_changes.py; ``log`` but its level).
LIVE_SECTIONS = ("access", "authentication", "authentication_policy", "authorization", "listeners", "mqtt")


def _scram_credentials(users: UserStore, algorithm: str, username: str) -> ScramCredentials | None:
    user = users.get(username)
    return None if user is None else user.scram.get(algorithm)


def make_store(settings: Settings) -> Store:
    """The store ``persistence`` asks for, not open: the SQLite file, or none."""
    if not settings.persistence.enable:
        return NullStore()
    return SqliteStore(settings.store_file, flush_interval=settings.persistence.flush_interval)


def engine_store(own: Store | None, mirror: SessionMirror | None) -> Store | None:
    """What the engine tells every change: the node's own store (None: persistence off), and in
    a cluster the session mirror beside it."""
    if mirror is None:
        return own
    return mirror if own is None else FanOut(own, mirror)


#: Seconds between sweeps for expired bans (expired bans never match in between).
BAN_PURGE_INTERVAL = 60.0


def make_listener(
    settings: ListenerSettings, engine: Engine, audit: AuditTrail, gatekeeper: Gatekeeper
) -> Listener:
    """The listener object for one configured listener (not started)."""
    if settings.type in ("ws", "wss"):
        return WebSocketListener(
            settings,
            engine.open,
            on_refused=audit.listener_refused,
            admit=gatekeeper.check_address,
            max_packet_size=engine.settings.max_packet_size,
            log_refusal=gatekeeper.log_refusal,
        )
    kind = SslListener if settings.type == "ssl" else TcpListener
    return kind(settings, engine.open, on_refused=audit.listener_refused, log_refusal=gatekeeper.log_refusal)


def listener_problem(settings: ListenerOptions, exc: OSError) -> str:
    """What a listener that cannot start says, with its path: ``listeners.tcp.default.bind: cannot
    listen on 0.0.0.0:1883: Address already in use``, or its certificate problem."""
    where = f"listeners.{settings.type}.{settings.name}"
    if not exc.errno:  # a certificate problem, raised by the TLS listeners
        return f"{where}: {exc.strerror}"
    # os.strerror: asyncio words a bind failure as "error while attempting to bind on address ...".
    return f"{where}.bind: cannot listen on {settings.bind}: {os.strerror(exc.errno)}"


def log_listening(listener: Listener) -> None:
    """``listener tcp:default on 0.0.0.0:1883 (proxy_protocol=false)``, per address bound."""
    for host, port in listener.addresses():
        logger.info(
            "listener %s on %s (proxy_protocol=%s)",
            listener.id,
            format_hostport(host, port),
            listener.settings.proxy_protocol.value,
        )


class BrokerApp:
    """Start, run and stop the whole broker."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        """``config_path``: the file ``settings`` came from, read again by :meth:`reload`."""
        self.settings = settings
        self.config_path = config_path
        self.audit_log = AuditLog(settings.audit.file)
        self.audit = AuditTrail(self.audit_log)
        self.bans = BanStore(settings.node.data_dir)
        self.users = UserStore(settings.node.data_dir)
        self.password_checks = PasswordChecks()
        self.gatekeeper = Gatekeeper(settings, self.bans, on_ban=self.audit.failure_ban)
        self.auth = make_auth_chain(settings, self.users, self.password_checks)
        self.sources = make_sources(settings)
        sys_settings = settings.sys_topics
        # With $SYS off the engine calls the audit trail directly (no fan-out on its path).
        hooks: EngineHooks = (
            Hooks(self.audit) if sys_settings.enable or settings.cluster.enable else self.audit
        )
        self.store = make_store(settings)
        #: In a cluster: which persistent sessions changed, for the node to write to Redis.
        self.mirror = SessionMirror() if settings.cluster.enable else None
        self.engine = Engine(
            settings.mqtt,
            listeners=settings.listeners,
            gatekeeper=self.gatekeeper,
            hooks=hooks,
            authorizer=make_authorizer(settings, self.sources),
            auth=self.auth,
            sources=self.sources,
            store=engine_store(self.store if settings.persistence.enable else None, self.mirror),
        )
        node_name = settings.node.name or f"realip@{socket.gethostname()}"
        self.sys_topics: SysTopics | None = None
        if sys_settings.enable:
            self.sys_topics = SysTopics(
                self.engine.publish,
                self.engine,
                node=node_name,
                interval=sys_settings.sys_msg_interval,
                started=time.monotonic(),
                version=__version__,
            )
            if sys_settings.client_events and isinstance(hooks, Hooks):
                hooks.add(self.sys_topics)  # after the audit trail: its record is written first
        self.operations = Operations(self.engine, self.bans, self.audit, self.users, settings)
        self.cluster: ClusterNode | None = None
        if settings.cluster.enable:
            # Attached before the sessions are restored: their subscriptions are routes too.
            self.cluster = ClusterNode(
                settings.cluster,
                node_name,
                self.engine.deliver_remote,
                self.engine.now,
                version=__version__,
                describe=client_json,
                connected=self.engine.sessions,
                kick=functools.partial(self.operations.kick, by="cluster"),
                bans=self.bans,
                on_ban=self.operations.apply_shared_ban,
                sessions=self.engine.session_ids,
                hand_over=self.engine.hand_over,
                mirror=self.mirror,
                snapshot=self.engine.snapshot,
                adopt=functools.partial(self.engine.restore_sessions, foreign=True),
                forget=self.engine.forget_session,
                users=self.users,
                on_user=self.operations.apply_shared_user,
                keep_retained=self.engine.keep_retained,
                forget_retained=self.engine.forget_retained,
            )
            self.engine.cluster = self.cluster
            if isinstance(hooks, Hooks):  # the registry of connected clients, cluster-wide
                hooks.add(self.cluster)
        #: The running listeners, in the file's order. A reload changes this list in place: the
        #: admin API holds the same one.
        self.listeners: list[Listener] = [
            make_listener(listener, self.engine, self.audit, self.gatekeeper)
            for listener in settings.enabled_listeners()
        ]
        #: Listeners a reload stopped whose connections may still be closing (aborted at stop).
        self._stopped_listeners: list[Listener] = []
        #: Listeners whose certificate CN the engine takes as the username (fixed at start).
        self._cert_username = frozenset(
            listener.id for listener in settings.listeners if listener.peer_cert_as_username
        )
        #: Whether start() got as far as "ready" (a failed start does not log "stopped").
        self._ready = False
        self.admin: AdminServer | None = None
        if settings.admin.listen.path is not None or settings.admin.listen.is_tcp:
            self.admin = AdminServer(
                settings.admin,
                self.engine,
                self.listeners,
                self.operations,
                reload=self.reload,
                cluster=self.cluster,
            )
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        #: Chains and sources replaced by a reload, closed after RETIRE_AFTER.
        self._retired: list[tuple[AuthChain, list[HttpAuthorizationSource]]] = []
        self._reloads: set[asyncio.Task[Any]] = set()
        self._purger: asyncio.Task[None] | None = None
        #: Whether self.auth and self.sources are started (and must be closed).
        self._auth_started = False

    async def start(self) -> None:
        """Open the store, start the engine with the retained messages it kept, every listener,
        then the admin API.

        Raises:
            StartupError: the data directory cannot be made, the store cannot be opened or read (not
                this broker's, corrupt), or a listener cannot bind; what was started is stopped
                again.
            AdminStartupError: the admin API cannot listen.
        """
        data_dir = Path(self.settings.node.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupError(f"node.data_dir: cannot create {data_dir}: {exc.strerror}") from None
        try:
            self.bans.load()
            self.users.load()
        except (BanError, UserError) as exc:
            raise StartupError(str(exc)) from None
        try:  # before anything else starts: a store that is not ours stops the broker at once
            await self.store.open()
        except StoreError as exc:
            raise StartupError(f"persistence.file: {exc}") from None
        try:
            self.audit_log.open()
        except OSError as exc:
            raise StartupError(
                f"audit.file: cannot open {self.settings.audit.file}: {exc.strerror}"
            ) from None
        try:
            await start_authentication(self.auth, self.sources)
        except AuthError as exc:
            self.audit_log.close()
            raise StartupError(str(exc)) from None
        self._auth_started = True
        for warning in config_warnings(self.settings):
            logger.warning("%s", warning)
        await self.engine.start()
        try:  # before any listener: the first subscriber sees what was retained before the stop
            restored = self.engine.restore_retained(await self.store.load_retained())
            sessions = self.engine.restore_sessions(await self.store.load_sessions())
            if self.mirror is not None:  # written to Redis at the first heartbeat, changed or not
                self.mirror.changed.update(self.engine.session_ids())
        except StoreError as exc:
            await self.stop()
            raise StartupError(f"persistence.file: {exc}") from None
        if self.settings.persistence.enable:
            logger.info(
                "%d retained message(s) and %d session(s) restored from %s",
                restored,
                sessions,
                self.store.location,
            )
        if self.cluster is not None:  # before any listener: routes known before the first PUBLISH
            try:
                await self.cluster.start()
            except ClusterError as exc:
                await self.stop()
                raise StartupError(str(exc)) from None
        if self.sys_topics is not None:  # the retained figures exist before the first client
            self.sys_topics.start(self.engine.loop)
        self._purger = asyncio.create_task(self._purge_bans())
        for listener in self.listeners:
            try:
                await listener.start()
            except OSError as exc:
                await self.stop()
                raise StartupError(listener_problem(listener.settings, exc)) from None
            log_listening(listener)
        if self.admin is not None:
            try:
                where = await self.admin.start()
            except RealIPError:
                await self.stop()
                raise
            logger.info("admin API on %s", where)
        self._ready = True
        logger.info("realip-broker ready: %s", self.ready_summary())

    def ready_summary(self) -> str:
        """``tcp:default=0.0.0.0:1883 ws:default=0.0.0.0:8083``: what tests and operators wait for."""
        return " ".join(
            f"{listener.id}={format_hostport(host, port)}"
            for listener in self.listeners
            for host, port in listener.addresses()[:1]
        )

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (signal handlers call this)."""
        self._stopping.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop.

        Raises:
            StartupError, AdminStartupError: as :meth:`start`.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        # SIGHUP reloads the configuration (its default action would kill the process).
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            await self.stop()

    def _on_sighup(self) -> None:
        logger.info("SIGHUP received: reloading %s", self.config_path or "(no config file)")
        task = asyncio.get_running_loop().create_task(self.reload(by="SIGHUP"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self, *, by: str = "admin") -> dict[str, Any]:
        """Read the config file again and apply what can change while running: the listeners
        (started, stopped, new settings and certificates for the connections to come: see
        :mod:`broker.listener_changes`), access lists, authorization (recompiled for every
        connected client), authentication, the per-address limits and failure bans, ``mqtt`` limits
        (for what comes next), the log level. What else changed is reported as needing a restart
        and left as it is. An invalid file, a listener that cannot bind or load its certificates, or
        an authenticator that cannot start, changes nothing; every problem is logged with its path.
        Audited as ``config_reloaded`` (or ``config_reload_failed``). Never raises."""
        async with self._reload_lock:
            result = await self._reload()
        self.engine.counters.reloads["failed" if result["errors"] else "done"] += 1
        if result["errors"]:
            for problem in result["errors"]:
                logger.error("reload: %s", problem)
            self.audit.log.write("config_reload_failed", by=by, errors=result["errors"])
        else:
            moves = result["listeners"]
            logger.info(
                "configuration reloaded: changed %s; needs a restart: %s; listeners %s",
                ", ".join(result["changed"]) or "nothing",
                ", ".join(result["restart_needed"]) or "nothing",
                "; ".join(f"{what} {', '.join(ids)}" for what, ids in moves.items() if ids) or "as they were",
            )
            self.audit.log.write(
                "config_reloaded",
                by=by,
                changed=result["changed"],
                restart_needed=result["restart_needed"],
                listeners=moves,
            )
        return result

    async def _reload(self) -> dict[str, Any]:
        result: dict[str, Any] = {"changed": [], "restart_needed": [], "errors": []}
        if self.config_path is None:
            result["errors"] = ["the broker was started without --config: there is no file to read again"]
            return result
        try:
            new = load_settings_file(self.config_path)
        except ConfigError as exc:
            result["errors"] = [f"{exc.source}: {problem}" for problem in exc.problems]
            return result
        old_dump, new_dump = dump_settings(self.settings), dump_settings(new)
        changed = [key for key in new_dump if new_dump[key] != old_dump[key]]
        # self.settings.listeners: those running enabled, the others off (see _running_settings).
        plan = plan_listeners(self.settings.enabled_listeners(), new.listeners, self._cert_username)
        # What can fail comes first, and changes nothing: new addresses bound (not accepting yet),
        # certificates loaded, then the new authenticators started.
        try:
            openings = await self._prepare_listeners(plan, new)
        except StartupError as exc:
            result["errors"] = [f"{self.config_path}: {exc}"]
            return result
        sources = make_sources(new)
        auth = make_auth_chain(new, self.users, self.password_checks)
        try:
            await start_authentication(auth, sources)
        except AuthError as exc:
            for _, opening in openings:
                opening.discard()
            result["errors"] = [f"{self.config_path}: {exc}"]
            return result
        old_auth, old_sources = self.auth, self.sources
        # The gatekeeper knows a new listener's access rules before the listener accepts.
        running = self._running_settings(plan, new)
        self.gatekeeper.update(dataclasses.replace(new, listeners=running))
        self.engine.reconfigure(new.mqtt, make_authorizer(new, sources), auth, sources)
        self.auth, self.sources = auth, sources
        await self._commit_listeners(plan, openings, new)
        if new.log.level != self.settings.log.level:
            logs.set_level(new.log.level)
        # Authentications and source requests already under way finish with the old ones.
        self._retired.append((old_auth, old_sources))
        retire = asyncio.get_running_loop().create_task(self._retire(old_auth, old_sources))
        self._reloads.add(retire)
        retire.add_done_callback(self._reloads.discard)
        kept = {key for key in changed if key not in (*LIVE_SECTIONS, "log")}
        if new.log.format != self.settings.log.format or new.log.file != self.settings.log.file:
            kept.add("log")
        self.settings = dataclasses.replace(
            new,
            listeners=running,
            node=self.settings.node,
            admin=self.settings.admin,
            audit=self.settings.audit,
            sys_topics=self.settings.sys_topics,
            persistence=self.settings.persistence,
            cluster=self.settings.cluster,
        )
        # "listeners" changed unless all that changed there waits for a restart.
        applied = [
            key
            for key in changed
            if (key not in kept or key == "log")
            and (key != "listeners" or plan.any or not plan.restart_needed)
        ]
        result["changed"] = applied
        result["restart_needed"] = sorted(kept) + list(plan.restart_needed)
        result["listeners"] = plan.summary()
        for warning in config_warnings(new):
            logger.warning("%s", warning)
        return result

    async def _prepare_listeners(
        self, plan: ListenerChanges, new: Settings
    ) -> list[tuple[Listener, Opening]]:
        """Bind the new addresses and load the certificates of every listener the reload keeps or
        starts; nothing is applied yet.

        Raises:
            StartupError: one cannot bind or load its certificates (the message names it); what was
                bound is closed again.
        """
        by_id = {listener.id: listener for listener in self.listeners}
        wanted = [(by_id[settings.id], settings) for settings in plan.update]
        wanted += [
            (make_listener(settings, self.engine, self.audit, self.gatekeeper), settings)
            for settings in plan.start
        ]
        openings: list[tuple[Listener, Opening]] = []
        for listener, settings in wanted:
            try:
                opening = await listener.prepare(settings, max_packet_size=new.mqtt.max_packet_size)
            except OSError as exc:
                for _, made in openings:
                    made.discard()
                raise StartupError(listener_problem(settings, exc)) from None
            openings.append((listener, opening))
        return openings

    def _running_settings(self, plan: ListenerChanges, new: Settings) -> tuple[ListenerSettings, ...]:
        """``new.listeners`` as they will run: each as the plan applies it, those not running off."""
        applied = {settings.id: settings for settings in (*plan.update, *plan.start)}
        return tuple(
            applied.get(settings.id, dataclasses.replace(settings, enable=False))
            for settings in new.listeners
        )

    async def _commit_listeners(
        self, plan: ListenerChanges, openings: list[tuple[Listener, Opening]], new: Settings
    ) -> None:
        """Apply what :meth:`_prepare_listeners` made ready, stop the listeners the file no longer
        has (their clients disconnected: MQTT 5 ones with DISCONNECT 0x8B), and put the running
        set, in the file's order, in :attr:`listeners` (the same list the admin API reads)."""
        started = {settings.id for settings in plan.start}
        for listener, opening in openings:
            await listener.commit(opening)
            if listener.id in started or listener.id in plan.moved:
                log_listening(listener)
            elif listener.id in plan.changed:
                logger.info("listener %s: new settings, for the connections to come", listener.id)
        by_id = {listener.id: listener for listener in self.listeners}
        by_id.update((listener.id, listener) for listener, _ in openings)
        for listener_id in plan.stop:
            self._stop_listener(by_id.pop(listener_id))
        order = [settings.id for settings in new.listeners]
        self.listeners[:] = sorted(by_id.values(), key=lambda listener: order.index(listener.id))

    def _stop_listener(self, listener: Listener) -> None:
        """Stop accepting, and disconnect every client of ``listener`` (as EMQX and mosquitto do
        when a listener goes): the engine closes those it has (MQTT 5: DISCONNECT 0x8B, recorded
        as ``listener_removed``), the others (PROXY header, TLS handshake, upgrade) are closed."""
        listener.stop_accepting()
        listener.cancel_pending()
        connections = listener.connections()
        for link in connections:
            sink = link.sink
            if isinstance(sink, Channel):
                sink.close("listener_removed")
            else:
                link.close()
        self._stopped_listeners = [old for old in self._stopped_listeners if old.stats.current]
        self._stopped_listeners.append(listener)
        logger.info("listener %s stopped: %d connection(s) closed", listener.id, len(connections))

    def _on_signal(self, signum: int) -> None:
        logger.info("%s received: stopping", signal.Signals(signum).name)
        self.request_stop()

    async def _purge_bans(self) -> None:
        while True:
            await asyncio.sleep(BAN_PURGE_INTERVAL)
            # Refusals held back from the log and not summed up since (the client went quiet).
            self.gatekeeper.refusals.sweep()
            try:
                for ban in self.bans.purge():
                    logger.info("ban %s %s expired", ban.kind, ban.value)
            except BanError as exc:
                logger.error("%s", exc)

    async def _retire(self, auth: AuthChain, sources: list[HttpAuthorizationSource]) -> None:
        """Close a replaced chain and sources once what was under way with them is over."""
        await asyncio.sleep(RETIRE_AFTER)
        if (auth, sources) in self._retired:
            self._retired.remove((auth, sources))
            await close_authentication(auth, sources)

    async def _close_auth(self) -> None:
        while self._retired:  # replaced by reloads and not closed yet
            await close_authentication(*self._retired.pop())
        if self._auth_started:
            self._auth_started = False
            await close_authentication(self.auth, self.sources)

    async def stop(self) -> None:
        """Stop accepting, disconnect every client (each one's audit record written), drop what is
        left, write what the store holds pending and close it, then close the audit log. Safe to
        call twice."""
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        if self.sys_topics is not None:
            self.sys_topics.stop()
        for listener in self.listeners:
            listener.stop_accepting()
        if self.admin is not None:
            await self.admin.stop()
        await self.engine.shutdown()
        if self.cluster is not None:  # after the sessions: their routes stay until the node leaves
            await self.cluster.stop()
        for listener in (*self.listeners, *self._stopped_listeners):
            listener.abort_connections()
        # Let the connection tasks see their sockets close before the loop ends.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        for task in list(self._reloads):  # a reload under way, chains waiting to be retired
            task.cancel()
        await self._close_auth()
        self.password_checks.close()
        try:  # the ban file is written in the background: everything on disc before we exit
            await asyncio.to_thread(self.bans.flush)
        except BanError as exc:
            logger.error("%s", exc)
        try:  # after the engine's shutdown: every retained message set before the stop is on disc
            await self.store.close()
        except StoreError as exc:
            logger.error("%s", exc)
        self.audit_log.close()
        # After a failed start the error (logged by the caller) is the last line, not "stopped".
        if self._ready:
            self._ready = False
            logger.info("realip-broker stopped")
