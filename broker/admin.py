"""The admin API: JSON over HTTP on a unix socket (mode 0600) or on IP:PORT with a bearer token.

Endpoints (all answers are JSON except ``/metrics``):

``GET /health``                     ``{"status": "ok"}``
``GET /api/v1/clients``             connected clients; filters ``ip`` (address or CIDR), ``listener``,
                                    ``username``; paging ``page`` (from 1) and ``limit`` (1-10000)
``GET /api/v1/clients/{id}``        one client, 404 when not connected
``DELETE /api/v1/clients/{id}``     kick: disconnect and discard the session; 204, or 404
``GET /api/v1/listeners``           each running listener: bind, mode, live connections, refusals by
                                    reason, health checks
``GET /api/v1/banned``              bans: ``{"data": [{"as", "who", "reason", "by", "at", "until"}]}``
``POST /api/v1/banned``             ``{"as": "peerhost"|"clientid"|"username", "who": ..., "reason"?,
                                    "until"?: ISO 8601 or duration}``: 201 ``{"ban", "kicked"}``
``DELETE /api/v1/banned/{as}/{who}``  lift a ban: 204, or 404
``GET /metrics``                    Prometheus text

Errors are ``{"code": "...", "message": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker import __version__, logs
from broker.audit import iso8601
from broker.auth.builtin import UserError
from broker.bans import BanError
from broker.cluster.node import ClusterError, ClusterNode
from broker.core.session import Message
from broker.engine import Engine, SessionView
from broker.errors import RealIPError
from broker.metrics import BrokerCollector, render
from broker.settings import AdminSettings
from listeners.address import IPNetwork, Networks, parse_network

if TYPE_CHECKING:
    from broker.app import Listener
    from broker.operations import Operations

logger = logging.getLogger(__name__)

#: Largest page of ``/api/v1/clients``; bounds one answer's size (about 4 MB of JSON).
MAX_PAGE_LIMIT = 10_000
DEFAULT_PAGE_LIMIT = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminStartupError(RealIPError):
    """The admin API cannot listen where configured."""


def client_json(view: SessionView) -> dict[str, Any]:
    """The JSON object of one connected client (``ctl clients show --json``)."""
    address = view.address
    return {
        "clientid": view.client_id,
        "username": view.username,
        "authenticated": view.authenticated,
        "is_superuser": view.is_superuser,
        "ip_address": address.ip,
        "port": address.port,
        "proxy_address": address.proxy_ip,
        "proxy_port": address.proxy_port,
        "listener": view.listener_id,
        "address_source": address.source.value,
        "proto_ver": view.proto_ver,
        "clean_start": view.clean_session,
        "keepalive": view.keepalive,
        "connected_at": iso8601(view.connected_at),
        "session_expiry_interval": view.expiry_interval,
        "receive_maximum": view.receive_maximum,
        "topic_alias_maximum": view.topic_alias_maximum,
        "subscriptions": view.subscriptions,
        "inflight": view.inflight,
        "mqueue_len": view.queued,
        "dropped": view.drops,
        "tls": None if address.tls is None else address.tls.as_dict(),
        "proxy_details": address.details,
    }


#: Payload bytes a retained message's listing shows (``show`` gives all of it).
PAYLOAD_PREVIEW = 64


def retained_json(message: Message, *, payload: bool = False) -> dict[str, Any]:
    """A retained message as the API shows it: the payload as UTF-8 text, or base64 when it is not
    text (``payload_encoding``); only its first :data:`PAYLOAD_PREVIEW` bytes unless ``payload``."""
    data = message.payload if payload else message.payload[:PAYLOAD_PREVIEW]
    try:
        text, encoding = data.decode("utf-8"), "plain"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {
        "topic": message.topic,
        "qos": message.qos,
        "from_clientid": message.publisher,
        "payload": text,
        "payload_encoding": encoding,
        "payload_size": len(message.payload),
    }


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise web.HTTPBadRequest(
            text=f'{{"code": "BAD_REQUEST", "message": "{name} must be a number from {low} to {high}"}}',
            content_type="application/json",
        )
    return int(raw)


async def _json_object(request: web.Request, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    """The request's JSON object body with exactly these fields.

    Raises:
        web.HTTPBadRequest: not a JSON object, a required field missing, or an unknown field.
    """

    def bad(message: str) -> web.HTTPBadRequest:
        return web.HTTPBadRequest(
            text=json.dumps({"code": "BAD_REQUEST", "message": message}), content_type="application/json"
        )

    try:
        body = await request.json()
    except ValueError:
        raise bad("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    unknown = set(body) - required - optional
    if unknown:
        raise bad(f"unknown fields: {', '.join(sorted(unknown))}")
    missing = required - set(body)
    if missing:
        raise bad(f"missing fields: {', '.join(sorted(missing))}")
    return body


class AdminServer:
    """The admin API of one broker process."""

    def __init__(
        self,
        settings: AdminSettings,
        engine: Engine,
        listeners: Sequence[Listener],
        operations: Operations,
        *,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        """``reload`` re-reads the configuration (``POST /api/v1/reload``); ``cluster`` is this
        node's side of the cluster, None when it is not in one: the client views are then
        cluster-wide (each record with its ``node``), and ``GET /api/v1/cluster`` says how it is."""
        self.settings = settings
        self._reload = reload
        self._cluster = cluster
        self._started = time.monotonic()
        self._engine = engine
        self._listeners = listeners
        self._operations = operations
        gatekeeper = engine.gatekeeper
        self._collector = BrokerCollector(
            lambda: self._listeners,
            engine.counters,
            engine.count,
            engine.stats,
            authentication=lambda: engine.auth.results,
            failure_bans=lambda: gatekeeper.failure_bans if gatekeeper is not None else 0,
            authorization=lambda: engine.source_results,
            ban_write_failures=lambda: operations.bans.write_failures if operations is not None else 0,
            store=engine.store_stats,
            cluster=dict if cluster is None else cluster.status,
        )
        self._runner: web.AppRunner | None = None
        self._socket_path: Path | None = None

    def app(self) -> web.Application:
        """The aiohttp application (routes and the token check)."""
        middlewares = [self._require_token] if self.settings.listen.is_tcp else []
        app = web.Application(middlewares=middlewares)
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/api/v1/clients", self._clients),
                web.get("/api/v1/clients/{client_id}", self._client),
                web.delete("/api/v1/clients/{client_id}", self._kick),
                web.get("/api/v1/listeners", self._listeners_view),
                web.get("/api/v1/banned", self._bans),
                web.post("/api/v1/banned", self._ban),
                web.delete("/api/v1/banned/{kind}/{who:.+}", self._unban),
                web.get("/api/v1/authentication/users", self._users),
                web.post("/api/v1/authentication/users", self._add_user),
                web.get("/api/v1/authentication/users/{user_id}", self._user),
                web.put("/api/v1/authentication/users/{user_id}", self._update_user),
                web.delete("/api/v1/authentication/users/{user_id}", self._delete_user),
                web.post("/api/v1/reload", self._reload_config),
                web.get("/api/v1/status", self._status),
                web.get("/api/v1/cluster", self._cluster_status),
                web.get("/api/v1/subscriptions", self._subscriptions),
                web.get("/api/v1/retained", self._retained),
                web.get("/api/v1/retained/{topic:.+}", self._retained_one),
                web.delete("/api/v1/retained/{topic:.+}", self._retained_delete),
                web.get("/api/v1/log/level", self._log_level),
                web.put("/api/v1/log/level", self._set_log_level),
                web.get("/metrics", self._metrics),
            ]
        )
        return app

    async def start(self) -> str:
        """Listen; returns where (``unix:PATH`` or ``IP:PORT``).

        Raises:
            AdminStartupError: the socket path is in use by a live broker, or cannot be bound.
        """
        listen = self.settings.listen
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            if listen.path is not None:
                path = Path(listen.path)
                self._prepare_socket_path(path)
                # Create the socket already private: no window where another user could connect.
                old_umask = os.umask(0o177)
                try:
                    await web.UnixSite(self._runner, str(path)).start()
                finally:
                    os.umask(old_umask)
                os.chmod(path, 0o600)
                self._socket_path = path
                return str(listen)
            site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
            await site.start()
            server = site._server  # aiohttp exposes no public accessor for the bound port
            sockets = getattr(server, "sockets", None) or []
            host, port = sockets[0].getsockname()[:2] if sockets else (listen.host, listen.port)
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        except OSError as exc:
            await self.stop()
            raise AdminStartupError(f"admin.listen: cannot listen on {listen}: {exc.strerror}") from None

    @staticmethod
    def _prepare_socket_path(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists() and not path.is_symlink():
            return
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AdminStartupError(f"admin.listen: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by a broker that was killed
            return
        finally:
            probe.close()
        raise AdminStartupError(f"admin.listen: another broker is serving {path}")

    async def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._socket_path is not None:
            with contextlib.suppress(OSError):
                self._socket_path.unlink()
            self._socket_path = None

    @web.middleware
    async def _require_token(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # RFC 7235 2.1: the scheme is case-insensitive ("bearer" is "Bearer"); the token is not.
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self.settings.token.encode()):
            logger.warning("admin API: request without a valid token from %s refused", request.remote)
            return _error(401, "UNAUTHORIZED", "missing or wrong bearer token (admin.token)")
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        if self._cluster is None:
            return web.json_response({"status": "ok"})
        redis = self._cluster.status()["redis"]
        # Still serving its own clients without Redis: degraded, not down (200 either way).
        state = "ok" if redis["up"] else "degraded"
        return web.json_response({"status": state, "cluster": {"redis": "up" if redis["up"] else "down"}})

    async def _cluster_status(self, request: web.Request) -> web.Response:
        if self._cluster is None:
            return web.json_response({"enabled": False})
        return web.json_response({"enabled": True, **self._cluster.status()})

    async def _clients(self, request: web.Request) -> web.Response:
        page = _int_param(request, "page", 1, 1, 10**9)
        limit = _int_param(request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
        network: IPNetwork | None = None
        if "ip" in request.query:
            try:
                network = parse_network(request.query["ip"])
            except ValueError as exc:
                return _error(400, "BAD_REQUEST", f"ip: {exc}")
        listener = request.query.get("listener")
        username = request.query.get("username")
        if self._cluster is not None:
            return await self._cluster_clients(page, limit, network, listener, username)
        views = self._engine.sessions()
        if network is not None:
            networks = Networks([network])
            views = [v for v in views if networks.contains(v.address.ip)]
        if listener is not None:
            views = [v for v in views if v.listener_id == listener]
        if username is not None:
            views = [v for v in views if v.username == username]
        start = (page - 1) * limit
        chosen = views[start : start + limit]
        meta = {"page": page, "limit": limit, "count": len(views), "hasnext": start + limit < len(views)}
        return web.json_response({"data": [client_json(v) for v in chosen], "meta": meta})

    async def _cluster_clients(
        self,
        page: int,
        limit: int,
        network: IPNetwork | None,
        listener: str | None,
        username: str | None,
    ) -> web.Response:
        """``GET /api/v1/clients`` in a cluster: every node's clients, from the registry (this
        node's from its own memory: the freshest)."""
        assert self._cluster is not None
        me = self._cluster.name
        try:
            remote = [record for record in await self._cluster.clients() if record["node"] != me]
        except ClusterError as exc:
            return _error(503, "CLUSTER_UNAVAILABLE", str(exc))
        records = [{**client_json(view), "node": me} for view in self._engine.sessions()] + remote
        networks = None if network is None else Networks([network])
        records = [
            record
            for record in records
            if (networks is None or networks.contains(record["ip_address"]))
            and (listener is None or record["listener"] == listener)
            and (username is None or record["username"] == username)
        ]
        start = (page - 1) * limit
        meta = {"page": page, "limit": limit, "count": len(records), "hasnext": start + limit < len(records)}
        return web.json_response({"data": records[start : start + limit], "meta": meta})

    async def _client(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        view = self._engine.session(client_id)
        if view is not None:
            shown = client_json(view)
            if self._cluster is not None:
                shown["node"] = self._cluster.name
            return web.json_response(shown)
        if self._cluster is not None:
            try:
                record = await self._cluster.client(client_id)
            except ClusterError as exc:
                return _error(503, "CLUSTER_UNAVAILABLE", str(exc))
            if record is not None:
                return web.json_response(record)
        return _error(404, "CLIENTID_NOT_FOUND", f"client {client_id} not found")

    async def _kick(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        if await self._operations.kick(client_id):
            return web.Response(status=204)
        if self._cluster is not None:  # on another node: that node kicks it
            try:
                record = await self._cluster.client(client_id)
            except ClusterError as exc:
                return _error(503, "CLUSTER_UNAVAILABLE", str(exc))
            if record is not None and record["node"] != self._cluster.name:
                self._cluster.kick_remote(str(record["node"]), client_id)
                return web.Response(status=202)
        return _error(404, "CLIENTID_NOT_FOUND", f"client {client_id} not found")

    async def _listeners_view(self, request: web.Request) -> web.Response:
        refused_at_connect = self._engine.counters.refused_by_listener
        data = []
        for listener in self._listeners:
            settings = listener.settings
            data.append(
                {
                    "id": listener.id,
                    "type": settings.type,
                    "name": settings.name,
                    "bind": str(settings.bind),
                    "addresses": [f"{host}:{port}" for host, port in listener.addresses()],
                    "proxy_protocol": settings.proxy_protocol.dump(),  # false, true, "optional"
                    "trusted_proxies": [str(network) for network in settings.trusted_proxies],
                    "max_connections": settings.max_connections or "infinity",
                    "current_connections": listener.stats.current,
                    "accepted": listener.stats.accepted,
                    "health_checks": listener.stats.health_checks,
                    # Refused before MQTT (PROXY, headers, limits) and at CONNECT (bans, auth...).
                    "refused": dict(
                        sorted(
                            (
                                listener.stats.refused
                                + Counter(
                                    {
                                        reason: count
                                        for (where, reason), count in refused_at_connect.items()
                                        if where == listener.id
                                    }
                                )
                            ).items()
                        )
                    ),
                }
            )
        return web.json_response(data)

    async def _bans(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [ban.as_json() for ban in self._operations.bans]})

    async def _ban(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "BAD_REQUEST", "the body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "BAD_REQUEST", "the body must be a JSON object")
        unknown = set(body) - {"as", "who", "reason", "until"}
        if unknown:
            return _error(400, "BAD_REQUEST", f"unknown fields: {', '.join(sorted(unknown))}")
        kind, who, reason, until = body.get("as"), body.get("who"), body.get("reason", ""), body.get("until")
        if not isinstance(kind, str) or not isinstance(who, str):
            return _error(400, "BAD_REQUEST", "'as' and 'who' are required strings")
        if not isinstance(reason, str) or (until is not None and not isinstance(until, str)):
            return _error(400, "BAD_REQUEST", "'reason' and 'until' must be strings")
        try:
            ban, kicked = await self._operations.add_ban(kind, who, reason=reason, until=until)
        except BanError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        return web.json_response({"ban": ban.as_json(), "kicked": kicked}, status=201)

    async def _unban(self, request: web.Request) -> web.Response:
        kind, who = request.match_info["kind"], request.match_info["who"]
        try:
            removed = self._operations.delete_ban(kind, who)
        except BanError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        if removed is None:
            return _error(404, "NOT_FOUND", f"no {kind} ban on {who}")
        return web.Response(status=204)

    async def _users(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [user.as_json() for user in self._operations.users.list()]})

    async def _user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        user = self._operations.users.get(user_id)
        if user is None:
            return _error(404, "NOT_FOUND", f"no user {user_id}")
        return web.json_response(user.as_json())

    async def _add_user(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required={"user_id", "password"}, optional={"is_superuser"})
        user_id, password, superuser = body["user_id"], body["password"], body.get("is_superuser", False)
        if not isinstance(user_id, str) or not isinstance(password, str) or not isinstance(superuser, bool):
            return _error(400, "BAD_REQUEST", "user_id and password are strings, is_superuser a boolean")
        try:
            user = await self._operations.add_user(user_id, password, is_superuser=superuser)
        except UserError as exc:
            return _error(409 if self._operations.users.get(user_id) else 400, "BAD_REQUEST", str(exc))
        return web.json_response(user.as_json(), status=201)

    async def _update_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        body = await _json_object(request, required=set(), optional={"password", "is_superuser"})
        password, superuser = body.get("password"), body.get("is_superuser")
        if (password is not None and not isinstance(password, str)) or (
            superuser is not None and not isinstance(superuser, bool)
        ):
            return _error(400, "BAD_REQUEST", "password is a string, is_superuser a boolean")
        if self._operations.users.get(user_id) is None:
            return _error(404, "NOT_FOUND", f"no user {user_id}")
        try:
            user = await self._operations.update_user(user_id, password=password, is_superuser=superuser)
        except UserError as exc:
            return _error(400, "BAD_REQUEST", str(exc))
        return web.json_response(user.as_json())

    async def _delete_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if self._operations.users.get(user_id) is None:
            return _error(404, "NOT_FOUND", f"no user {user_id}")
        try:
            self._operations.delete_user(user_id)
        except UserError as exc:
            return _error(500, "INTERNAL_ERROR", str(exc))
        return web.Response(status=204)

    async def _status(self, request: web.Request) -> web.Response:
        sizes = self._engine.stats()
        return web.json_response(
            {
                "version": __version__,
                "uptime": round(time.monotonic() - self._started, 3),
                "clients_connected": self._engine.count(),
                **sizes,
                "listeners": [listener.id for listener in self._listeners],
                "reloads": dict(self._engine.counters.reloads),
            }
        )

    async def _subscriptions(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
        found = self._engine.subscription_list(request.query.get("clientid"))
        topic = request.query.get("topic")
        if topic is not None:
            found = [entry for entry in found if entry["topic"] == topic]
        return web.json_response({"data": found[:limit], "meta": {"count": len(found), "limit": limit}})

    async def _retained(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
        try:
            messages = self._engine.retained_list(request.query.get("topic", "#"), limit)
        except ValueError as exc:
            return _error(400, "BAD_REQUEST", f"topic: {exc}")
        return web.json_response({"data": [retained_json(message) for message in messages]})

    async def _retained_one(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        message = self._engine.retained_get(topic)
        if message is None:
            return _error(404, "NOT_FOUND", f"no retained message on {topic}")
        return web.json_response(retained_json(message, payload=True))

    async def _retained_delete(self, request: web.Request) -> web.Response:
        topic = request.match_info["topic"]
        if not self._engine.retained_delete(topic):
            return _error(404, "NOT_FOUND", f"no retained message on {topic}")
        return web.Response(status=204)

    async def _reload_config(self, request: web.Request) -> web.Response:
        if self._reload is None:
            return _error(501, "NOT_IMPLEMENTED", "this broker cannot reload its configuration")
        result = await self._reload()
        return web.json_response(result, status=400 if result["errors"] else 200)

    async def _log_level(self, request: web.Request) -> web.Response:
        return web.json_response({"level": logs.current_level()})

    async def _set_log_level(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required={"level"}, optional=set())
        level = body["level"]
        try:
            logs.set_level(level if isinstance(level, str) else repr(level))
        except ValueError as exc:
            return _error(400, "BAD_REQUEST", f"level: {exc}")
        logger.warning("log level set to %s through the admin API", level)
        return web.json_response({"level": logs.current_level()})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self._collector), headers={"Content-Type": CONTENT_TYPE_LATEST})
