"""Authentication against the real broker, each backend with right and wrong credentials, reached
directly, through NGINX sending the PROXY protocol, and through NGINX on WebSocket
(X-Forwarded-For). Every client is bound to its own 127.x address: what the broker decides on,
audits, bans and limits is that address, never NGINX's (:data:`tests.routes.EDGE`).

Third-party peers: paho-mqtt (3.1.1 and 5), Debian's ``mosquitto_pub``/``mosquitto_sub`` and
``mosquitto_passwd``, amqtt's own ``FileAuthPlugin``, PyJWT for tokens, scramp as the SCRAM
client, and a real aiohttp server as the HTTP authentication and authorization service.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as paho
import pytest
from aiohttp import web
from pwdlib.hashers.argon2 import Argon2Hasher
from scramp import ScramClient
from websockets.sync.client import connect as ws_connect

from tests.mqtt_raw import packet, read_packet, string, varint
from tests.routes import EDGE, Route, nginx_proxy, nginx_ws
from tests.support import (
    REPO,
    V311_CONNACK_RC,
    WAIT,
    BrokerProcess,
    broker_config,
    ctl,
    listener_config,
    metric_samples,
    require_binary,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]

BUILTIN = {"mechanism": "password_based", "backend": "built_in_database"}


def listeners(**tcp_extra: Any) -> dict[str, Any]:
    """tcp:default (direct), tcp:pp (PROXY from EDGE), ws:xff (X-Forwarded-For from EDGE)."""
    return broker_config(
        tcp={
            "default": listener_config(),
            "pp": listener_config(proxy_protocol=True, trusted_proxies=[f"{EDGE}/32"], **tcp_extra),
        },
        ws={
            "xff": listener_config(
                trusted_proxies=[f"{EDGE}/32"],
                websocket={
                    "proxy_address_header": "X-Forwarded-For",
                    "proxy_port_header": "X-Forwarded-Port",
                },
                **tcp_extra,
            )
        },
    )


def start(
    start_broker: BrokerFactory, authentication: list[dict[str, Any]], **sections: Any
) -> BrokerProcess:
    """A broker with the three listeners, this chain and an audit log."""
    config = {**listeners(), "authentication": authentication, "audit": {"file": "audit.log"}, **sections}
    return start_broker(config, log_level="info")


@pytest.fixture(
    params=[
        "direct",
        pytest.param("nginx-proxy", marks=pytest.mark.e2e),
        pytest.param("nginx-ws", marks=pytest.mark.e2e),
    ]
)
def via(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[BrokerProcess], Route]]:
    """Reach a broker directly or through NGINX (stopped at teardown)."""
    started: list[Any] = []

    def reach(broker: BrokerProcess) -> Route:
        if request.param == "direct":
            return Route(broker, broker.port("tcp:default"))
        require_binary("nginx")
        maker = nginx_proxy if request.param == "nginx-proxy" else nginx_ws
        port, nginx = maker(broker, tmp_path / f"nginx{len(started)}")
        started.append(nginx)
        return Route(broker, port, websocket=request.param == "nginx-ws", proxy=EDGE)

    yield reach
    for nginx in started:
        nginx.stop()


class Client:
    """A paho client of one route (3.1.1 or 5) bound to its own source address."""

    def __init__(
        self,
        route: Route,
        client_id: str,
        *,
        source: str,
        username: str | None = None,
        password: str | None = None,
        v5: bool = False,
    ) -> None:
        self.v5 = v5
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            transport="websockets" if route.websocket else "tcp",
        )
        if route.websocket:
            self.client.ws_set_options(path="/mqtt")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.results: queue.Queue[int | None] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.reason_string: str | None = None

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            if p is not None and hasattr(p, "ReasonString"):
                self.reason_string = p.ReasonString
            self.results.put(rc.value)

        self.client.on_connect = on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: self.results.put(None)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.route, self.source = route, source

    def connack(self) -> int:
        """The CONNACK code (3.1.1 return code, or MQTT 5 reason code); -1: closed without one;
        -2: the WebSocket upgrade was refused (HTTP 403 for a banned address)."""
        try:
            self.client.connect("127.0.0.1", self.route.port, keepalive=30, bind_address=self.source)
        except paho.WebsocketConnectionError:
            return -2
        self.client.loop_start()
        code = self.results.get(timeout=WAIT)
        if code is None:
            return -1
        return code if self.v5 else V311_CONNACK_RC.get(code, code)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def made() -> Iterator[list[Client]]:
    clients: list[Client] = []
    yield clients
    for client in clients:
        client.close()


def attempt(made: list[Client], route: Route, client_id: str, source: str, **kwargs: Any) -> int:
    """Connect once; the CONNACK code (the client stays connected until teardown when admitted)."""
    client = Client(route, client_id, source=source, **kwargs)
    made.append(client)
    return client.connack()


def audit(broker: BrokerProcess, event: str, **match: Any) -> dict[str, Any]:
    """The first audit record of ``event`` whose fields include ``match`` (waiting for it)."""

    def find() -> dict[str, Any] | None:
        path = broker.workdir / "audit.log"
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            record: dict[str, Any] = json.loads(line)
            if record["event"] == event and all(record.get(k) == v for k, v in match.items()):
                return record
        return None

    found: dict[str, Any] = wait_until(find, what=f"audit record {event} {match}")
    return found


def add_user(
    broker: BrokerProcess, name: str, password: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``realip-broker ctl users add NAME --password-stdin`` with the password piped in."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "ctl", "users", "add", name, "--password-stdin", *extra],
        cwd=broker.workdir,
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def assert_refused_by_address(broker: BrokerProcess, route: Route, source: str, client_id: str) -> None:
    """The auth_failed record names the real client, and the proxy when there is one."""
    record = audit(broker, "auth_failed", clientid=client_id)
    assert record["ip"] == source
    assert record.get("proxy_ip") == route.proxy
    assert record["address_source"] == (
        "socket" if route.proxy is None else ("x_forwarded_for" if route.websocket else "proxy_protocol_v1")
    )


# ------------------------------------------------------------------------------------------------
# built-in database, anonymous clients, ctl users


def test_builtin_database_right_wrong_unknown_and_anonymous(
    start_broker: BrokerFactory, via: Callable[[BrokerProcess], Route], made: list[Client]
) -> None:
    broker = start(start_broker, [BUILTIN])
    added = add_user(broker, "alice", "correct horse")
    assert added.returncode == 0, added.stderr
    assert "alice" in added.stdout and "correct horse" not in added.stdout
    route = via(broker)
    assert attempt(made, route, "a1", "127.0.0.21", username="alice", password="correct horse") == 0
    assert attempt(made, route, "a2", "127.0.0.22", username="alice", password="wrong") == 4
    assert attempt(made, route, "a3", "127.0.0.23", username="nobody", password="x") == 4
    assert attempt(made, route, "a4", "127.0.0.24") == 5  # anonymous: allow_anonymous auto = false
    assert attempt(made, route, "a5", "127.0.0.25", username="alice", password="wrong", v5=True) == 0x86
    assert attempt(made, route, "a6", "127.0.0.26", v5=True) == 0x87
    assert attempt(made, route, "a7", "127.0.0.26", username="nobody", password="x", v5=True) == 0x86
    # A wrong password and an unknown user read the same to the client (no user enumeration).
    told = [made[-3].reason_string, made[-1].reason_string]
    assert [text.split(" (client ")[0] for text in told if text] == [
        "bad user name or password [bad_credentials]"
    ] * 2
    assert told[0] and "(client 127.0.0.25:" in told[0] and "(client 127.0.0.26:" in (told[1] or "")
    assert_refused_by_address(broker, route, "127.0.0.22", "a2")
    info = json.loads(ctl(broker, "clients", "show", "a1", "--json").stdout)
    assert (info["ip_address"], info["authenticated"], info["proxy_address"]) == (
        "127.0.0.21",
        True,
        route.proxy,
    )
    samples = metric_samples(broker)
    assert (
        samples[
            (
                "realip_authentication_total",
                (("authenticator", "password_based:built_in_database"), ("result", "deny")),
            )
        ]
        >= 2
    )
    assert samples[("realip_connects_refused_total", (("reason", "anonymous"),))] == 2
    for secret in ("correct horse", "wrong"):
        assert secret not in broker.output()
        assert secret not in (broker.workdir / "audit.log").read_text()


def test_anonymous_clients_allowed_when_configured(start_broker: BrokerFactory, made: list[Client]) -> None:
    broker = start(start_broker, [BUILTIN], authentication_policy={"allow_anonymous": True})
    route = Route(broker, broker.port("tcp:default"))
    assert attempt(made, route, "anon", "127.0.0.27") == 0
    assert attempt(made, route, "named", "127.0.0.28", username="ghost", password="x") == 4


def test_no_authenticator_is_said_loudly(start_broker: BrokerFactory) -> None:
    broker = start_broker(listeners(), log_level="info")
    broker.wait_for_log(r"WARNING .*no authenticator is configured: EVERY client is admitted")


def test_ctl_users_and_the_admin_api(start_broker: BrokerFactory, made: list[Client]) -> None:
    broker = start(start_broker, [BUILTIN, {"mechanism": "scram", "backend": "built_in_database"}])
    assert add_user(broker, "ops", "s3cret pass", "--superuser").returncode == 0
    again = add_user(broker, "ops", "other")
    assert again.returncode == 1 and "exists" in again.stderr
    listed = json.loads(ctl(broker, "users", "list", "--json").stdout)
    assert listed == [{"user_id": "ops", "is_superuser": True, "created_at": listed[0]["created_at"]}]
    stored = (broker.workdir / "data" / "users.json").read_text()
    assert "s3cret pass" not in stored and "argon2id" in stored
    assert (broker.workdir / "data" / "users.json").stat().st_mode & 0o777 == 0o600
    route = Route(broker, broker.port("tcp:default"))
    assert attempt(made, route, "o1", "127.0.0.29", username="ops", password="s3cret pass") == 0
    changed = subprocess.run(
        [sys.executable, "-m", "broker", "ctl", "users", "passwd", "ops", "--password-stdin"],
        cwd=broker.workdir,
        input="new pass\n",
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={"PYTHONPATH": str(REPO)},
    )
    assert changed.returncode == 0, changed.stderr
    assert attempt(made, route, "o2", "127.0.0.30", username="ops", password="s3cret pass") == 4
    assert attempt(made, route, "o3", "127.0.0.31", username="ops", password="new pass") == 0
    no_tty = subprocess.run(
        [sys.executable, "-m", "broker", "ctl", "users", "add", "eve"],
        cwd=broker.workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={"PYTHONPATH": str(REPO)},
    )
    assert no_tty.returncode == 1 and "--password-stdin" in no_tty.stderr
    assert ctl(broker, "users", "delete", "ops").returncode == 0
    assert attempt(made, route, "o4", "127.0.0.32", username="ops", password="new pass") == 4
    assert ctl(broker, "users", "delete", "ops").returncode == 1
    assert audit(broker, "user_added", username="ops")["is_superuser"] is True
    audit(broker, "user_updated", username="ops")
    audit(broker, "user_deleted", username="ops")


# ------------------------------------------------------------------------------------------------
# mosquitto password file, amqtt FileAuthPlugin, JWT


def mosquitto_passwd(path: Path, user: str, password: str, *, create: bool = False) -> None:
    """Debian's own ``mosquitto_passwd -b`` (sha512-pbkdf2, ``$7$``)."""
    binary = require_binary("mosquitto_passwd")
    argv = [binary, "-b", *(["-c"] if create else []), str(path), user, password]
    subprocess.run(argv, check=True, capture_output=True, timeout=WAIT)


def test_mosquitto_password_file_and_its_reload(
    start_broker: BrokerFactory, via: Callable[[BrokerProcess], Route], made: list[Client], tmp_path: Path
) -> None:
    passwd = tmp_path / "passwd"
    mosquitto_passwd(passwd, "sensor", "pw-1", create=True)
    assert passwd.read_text().startswith("sensor:$7$")
    broker = start(
        start_broker, [{"mechanism": "password_based", "backend": "password_file", "path": str(passwd)}]
    )
    route = via(broker)
    assert attempt(made, route, "m1", "127.0.0.33", username="sensor", password="pw-1") == 0
    assert attempt(made, route, "m2", "127.0.0.34", username="sensor", password="pw-2") == 4
    assert_refused_by_address(broker, route, "127.0.0.34", "m2")
    # mosquitto users edit the file in place; the broker sees it at the next CONNECT.
    mosquitto_passwd(passwd, "sensor", "pw-2")
    mosquitto_passwd(passwd, "gateway", "gw")
    assert attempt(made, route, "m3", "127.0.0.35", username="sensor", password="pw-2") == 0
    assert attempt(made, route, "m4", "127.0.0.36", username="gateway", password="gw") == 0
    assert attempt(made, route, "m5", "127.0.0.37", username="sensor", password="pw-1") == 4


def test_amqtt_file_auth_plugin_hosted(
    start_broker: BrokerFactory, via: Callable[[BrokerProcess], Route], made: list[Client], tmp_path: Path
) -> None:
    passwd = tmp_path / "amqtt-passwd"
    passwd.write_text(f"plugin-user:{Argon2Hasher().hash('plugin-pw')}\n")
    plugin = {
        "mechanism": "amqtt_plugin",
        "plugin": "amqtt.plugins.authentication.FileAuthPlugin",
        "config": {"password_file": str(passwd)},
    }
    broker = start(start_broker, [plugin])
    route = via(broker)
    assert attempt(made, route, "p1", "127.0.0.38", username="plugin-user", password="plugin-pw") == 0
    assert attempt(made, route, "p2", "127.0.0.39", username="plugin-user", password="nope") == 4
    assert audit(broker, "auth_failed", clientid="p2")["by"] == "amqtt_plugin:FileAuthPlugin"
    assert_refused_by_address(broker, route, "127.0.0.39", "p2")


def test_jwt_valid_expired_forged_and_claims(
    start_broker: BrokerFactory, via: Callable[[BrokerProcess], Route], made: list[Client]
) -> None:
    secret = "a-long-hmac-secret-for-the-tests-0123456789"
    entry = {"mechanism": "jwt", "secret": secret, "verify_claims": {"sub": "${clientid}"}}
    broker = start(start_broker, [entry])
    route = via(broker)
    now = int(time.time())

    def token(sub: str, key: str = secret, **claims: Any) -> str:
        return jwt.encode({"sub": sub, "exp": now + 600, **claims}, key, algorithm="HS256")

    assert attempt(made, route, "dev-1", "127.0.0.40", username="dev", password=token("dev-1")) == 0
    expired = token("dev-2", exp=now - 10)
    assert attempt(made, route, "dev-2", "127.0.0.41", username="dev", password=expired) == 4
    forged = token("dev-3", key="another-secret-of-sufficient-length-000")
    assert attempt(made, route, "dev-3", "127.0.0.42", username="dev", password=forged) == 4
    # A valid token for another client id: the claim must equal the client's own.
    assert attempt(made, route, "dev-4", "127.0.0.43", username="dev", password=token("dev-1")) == 4
    assert_refused_by_address(broker, route, "127.0.0.41", "dev-2")
    assert forged not in broker.output()
    # The claims name the client id, not the username: "dev" is admitted but not proven.
    assert json.loads(ctl(broker, "clients", "show", "dev-1", "--json").stdout)["authenticated"] is False


# ------------------------------------------------------------------------------------------------
# HTTP authentication and authorization: a real aiohttp server records what it is sent


class AuthService:
    """An aiohttp server on 127.0.0.1, in its own thread: ``/auth`` and ``/acl``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/auth", self._auth)
        app.router.add_post("/acl", self._acl)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _auth(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": "/auth", **body})
        ok = body.get("username") == "http-user" and body.get("password") == "http-pw"
        return web.json_response({"result": "allow" if ok else "deny", "is_superuser": False})

    async def _acl(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": "/acl", **body})
        return web.json_response({"result": "deny" if body["topic"].startswith("secret/") else "allow"})

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)


@pytest.fixture
def service() -> Iterator[AuthService]:
    running = AuthService()
    yield running
    running.close()


def test_http_callouts_receive_the_real_peerhost(
    start_broker: BrokerFactory,
    via: Callable[[BrokerProcess], Route],
    made: list[Client],
    service: AuthService,
) -> None:
    fields = {
        "clientid": "${clientid}",
        "username": "${username}",
        "password": "${password}",
        "peerhost": "${peerhost}",
        "proxy_peerhost": "${proxy_peerhost}",
        "proto_ver": "${proto_ver}",
        "listener": "${listener}",
    }
    http = {
        "mechanism": "password_based",
        "backend": "http",
        "url": f"http://127.0.0.1:{service.port}/auth",
        "body": fields,
    }
    acl = {
        "type": "http",
        "url": f"http://127.0.0.1:{service.port}/acl",
        "body": {
            "clientid": "${clientid}",
            "peerhost": "${peerhost}",
            "topic": "${topic}",
            "action": "${action}",
        },
    }
    broker = start(start_broker, [http], authorization={"sources": [acl], "no_match": "deny"})
    route = via(broker)
    assert attempt(made, route, "h1", "127.0.0.44", username="http-user", password="http-pw") == 0
    assert attempt(made, route, "h2", "127.0.0.45", username="http-user", password="bad", v5=True) == 0x86
    auth = [r for r in service.requests if r["path"] == "/auth"]
    assert [(r["clientid"], r["peerhost"], r["proxy_peerhost"]) for r in auth] == [
        ("h1", "127.0.0.44", route.proxy or ""),
        ("h2", "127.0.0.45", route.proxy or ""),
    ]
    assert (auth[0]["password"], auth[0]["proto_ver"], auth[1]["proto_ver"]) == ("http-pw", "4", "5")
    assert auth[0]["listener"] == (
        "tcp:default" if route.proxy is None else ("ws:xff" if route.websocket else "tcp:pp")
    )
    # Authorization: the source refuses secret/#, allows the rest; the answer is cached per client.
    subscriber = made[0]
    subscriber.client.subscribe([("secret/x", 0), ("open/x", 0)])
    assert subscriber.subacks.get(timeout=WAIT) == [0x80, 0]
    subscriber.client.publish("open/x", b"hello", qos=1).wait_for_publish(WAIT)
    subscriber.client.publish("open/x", b"again", qos=1).wait_for_publish(WAIT)
    assert subscriber.messages.get(timeout=WAIT) == ("open/x", b"hello")
    assert subscriber.messages.get(timeout=WAIT) == ("open/x", b"again")
    acl_requests = [(r["action"], r["topic"], r["peerhost"]) for r in service.requests if r["path"] == "/acl"]
    assert acl_requests == [
        ("subscribe", "secret/x", "127.0.0.44"),
        ("subscribe", "open/x", "127.0.0.44"),
        ("publish", "open/x", "127.0.0.44"),
    ]
    assert "http-pw" not in broker.output()


def test_http_service_down_is_server_unavailable_not_a_failure(
    start_broker: BrokerFactory, made: list[Client]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http = {
        "mechanism": "password_based",
        "backend": "http",
        "url": f"http://127.0.0.1:{port}/auth",
        "request_timeout": "2s",
    }
    broker = start(start_broker, [http], authentication_policy={"failure_ban": {"max_count": 1}})
    route = Route(broker, broker.port("tcp:default"))
    assert attempt(made, route, "u1", "127.0.0.46", username="x", password="y") == 3
    assert attempt(made, route, "u2", "127.0.0.46", username="x", password="y", v5=True) == 0x88
    assert json.loads(ctl(broker, "banned", "list", "--json").stdout) == []


# ------------------------------------------------------------------------------------------------
# MQTT 5 enhanced authentication: SCRAM with scramp as the client, over raw MQTT 5 packets


def _v5_properties(*items: bytes) -> bytes:
    body = b"".join(items)
    return varint(len(body)) + body


def _auth_props(method: str, data: bytes) -> bytes:
    return _v5_properties(b"\x15" + string(method), b"\x16" + len(data).to_bytes(2, "big") + data)


def _parse_props(body: bytes) -> dict[int, Any]:
    """Properties of a CONNACK/AUTH body (after its first two bytes): method and data only."""
    length, shift, offset = 0, 0, 0
    while True:
        byte = body[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end, found = offset + length, {}
    while offset < end:
        ident = body[offset]
        offset += 1
        fixed = _FIXED_SIZE.get(ident)
        if fixed is not None:
            found[ident] = body[offset : offset + fixed]
            offset += fixed
            continue
        for _ in range(2 if ident == 0x26 else 1):  # a user property is two strings
            size = int.from_bytes(body[offset : offset + 2], "big")
            found[ident] = body[offset + 2 : offset + 2 + size]
            offset += 2 + size
    return found


#: MQTT 5 2.2.2.2: properties of fixed size (the others are length-prefixed).
_FIXED_SIZE = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x17: 1, 0x19: 1, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1}
_FIXED_SIZE |= {0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}


class Pipe:
    """Raw MQTT bytes over a TCP socket or WebSocket binary frames, from a chosen source address."""

    def __init__(self, route: Route, source: str) -> None:
        sock = socket.create_connection(("127.0.0.1", route.port), timeout=WAIT, source_address=(source, 0))
        self._ws = None
        self._sock = sock
        self._buffer = b""
        if route.websocket:
            self._ws = ws_connect(f"ws://127.0.0.1:{route.port}/mqtt", sock=sock, subprotocols=["mqtt"])  # type: ignore[list-item]

    def send(self, data: bytes) -> None:
        if self._ws is not None:
            self._ws.send(data)
        else:
            self._sock.sendall(data)

    def read(self) -> tuple[int, bytes]:
        if self._ws is None:
            return read_packet(self._sock)
        while True:
            if len(self._buffer) >= 2:
                length, shift, index = 0, 0, 1
                while index < len(self._buffer):
                    byte = self._buffer[index]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if not byte & 0x80:
                        if len(self._buffer) >= index + length:
                            first, body = self._buffer[0], self._buffer[index : index + length]
                            self._buffer = self._buffer[index + length :]
                            return first, body
                        break
            frame = self._ws.recv(timeout=WAIT)
            self._buffer += frame if isinstance(frame, bytes) else frame.encode()

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        self._sock.close()


def scram_connect(
    route: Route, source: str, client_id: str, method: str, user: str, password: str
) -> tuple[int, Pipe]:
    """CONNECT with SCRAM; returns the CONNACK reason code (after checking the server's proof
    when admitted) and the open pipe."""
    client = ScramClient([method], user, password)
    pipe = Pipe(route, source)
    header = b"\x00\x04MQTT\x05\x02" + (30).to_bytes(2, "big")
    first = client.get_client_first().encode()
    pipe.send(packet(0x10, header + _auth_props(method, first) + string(client_id)))
    kind, body = pipe.read()
    if kind >> 4 == 2:  # refused at once
        return body[1], pipe
    assert kind >> 4 == 15 and body[0] == 0x18, (kind, body)
    props = _parse_props(body[1:])
    client.set_server_first(props[0x16].decode())
    final = client.get_client_final().encode()
    pipe.send(packet(0xF0, b"\x18" + _auth_props(method, final)))
    kind, body = pipe.read()
    assert kind >> 4 == 2, kind
    if body[1] == 0:
        props = _parse_props(body[2:])
        assert props[0x15].decode() == method
        client.set_server_final(props[0x16].decode())  # raises if the server's proof is wrong
    return body[1], pipe


@pytest.mark.parametrize("method", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_enhanced_authentication(
    start_broker: BrokerFactory, via: Callable[[BrokerProcess], Route], made: list[Client], method: str
) -> None:
    algorithm = "sha256" if method.endswith("256") else "sha512"
    broker = start(
        start_broker, [{"mechanism": "scram", "backend": "built_in_database", "algorithm": algorithm}]
    )
    assert add_user(broker, "scram-user", "pencil").returncode == 0
    route = via(broker)
    code, pipe = scram_connect(route, "127.0.0.47", "s1", method, "scram-user", "pencil")
    try:
        assert code == 0
        info = json.loads(ctl(broker, "clients", "show", "s1", "--json").stdout)
        assert (info["username"], info["authenticated"], info["ip_address"]) == (
            "scram-user",
            True,
            "127.0.0.47",
        )
    finally:
        pipe.close()
    code, pipe = scram_connect(route, "127.0.0.48", "s2", method, "scram-user", "wrong")
    pipe.close()
    assert code == 0x86
    code, pipe = scram_connect(route, "127.0.0.49", "s3", method, "nobody", "pencil")
    pipe.close()
    assert code == 0x86
    assert_refused_by_address(broker, route, "127.0.0.48", "s2")
    # Only SCRAM is configured: a client with a plain username and password is refused.
    assert (
        attempt([], route, "plain", "127.0.0.49", username="scram-user", password="pencil", v5=True) == 0x87
    )
    # A ban on the username applies though SCRAM learns it only at the end of the exchange.
    assert ctl(broker, "banned", "add", "username", "scram-user").returncode == 0
    code, pipe = scram_connect(route, "127.0.0.49", "s5", method, "scram-user", "pencil")
    pipe.close()
    assert code == 0x8A
    assert ctl(broker, "banned", "delete", "username", "scram-user").returncode == 0
    other = "SCRAM-SHA-512" if method.endswith("256") else "SCRAM-SHA-256"
    code, pipe = scram_connect(route, "127.0.0.49", "s4", other, "scram-user", "pencil")
    pipe.close()
    assert code == 0x8C  # bad authentication method: not configured


# ------------------------------------------------------------------------------------------------
# Usernames and client ids cannot be claimed


def mosquitto_pub(port: int, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's ``mosquitto_pub`` from ``source`` (``-A``)."""
    binary = require_binary("mosquitto_pub")
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-A", source, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT)


@pytest.mark.e2e
def test_username_rules_cannot_be_claimed(start_broker: BrokerFactory, made: list[Client]) -> None:
    """The README's rule ``{allow, admin/#, username: root}``: with no authenticator a client
    claiming ``root`` gets nothing from it; with one, a wrong password is refused and the right
    one gets the rule."""
    rules = {
        "rules": [{"permission": "allow", "action": "all", "topics": ["admin/#"], "username": "root"}],
        "no_match": "deny",
    }
    open_broker = start_broker({**listeners(), "authorization": rules}, log_level="info")
    port = open_broker.port("tcp:default")
    watcher = Client(Route(open_broker, port), "watcher", source="127.0.0.51", username="root", password="x")
    made.append(watcher)
    assert watcher.connack() == 0
    watcher.client.subscribe("admin/#")
    assert watcher.subacks.get(timeout=WAIT) == [0x80]  # the claimed username proves nothing
    published = mosquitto_pub(
        port, "127.0.0.52", "-u", "root", "-P", "wrong", "-t", "admin/x", "-m", "pwned", "-q", "1"
    )
    assert published.returncode == 0  # admitted (no authenticator), the PUBLISH dropped
    open_broker.wait_for_log(r"may not publish to 'admin/x' \(authorization rules\)")

    broker = start(start_broker, [BUILTIN], authorization=rules)
    assert add_user(broker, "root", "root-pw").returncode == 0
    port = broker.port("tcp:default")
    refused = mosquitto_pub(port, "127.0.0.53", "-u", "root", "-P", "wrong", "-t", "admin/x", "-m", "pwned")
    assert refused.returncode != 0 and "bad user name or password" in refused.stderr.lower()
    admin = Client(Route(broker, port), "admin", source="127.0.0.54", username="root", password="root-pw")
    made.append(admin)
    assert admin.connack() == 0
    admin.client.subscribe("admin/#")
    assert admin.subacks.get(timeout=WAIT) == [0]
    assert (
        mosquitto_pub(
            port, "127.0.0.55", "-u", "root", "-P", "root-pw", "-t", "admin/x", "-m", "ok"
        ).returncode
        == 0
    )
    assert admin.messages.get(timeout=WAIT) == ("admin/x", b"ok")


def test_superusers_are_not_subject_to_rules(start_broker: BrokerFactory, made: list[Client]) -> None:
    rules = {"rules": [{"permission": "deny", "action": "all", "topics": ["#"]}], "no_match": "deny"}
    broker = start(start_broker, [BUILTIN], authorization=rules)
    assert add_user(broker, "ops", "ops-pw", "--superuser").returncode == 0
    assert add_user(broker, "dev", "dev-pw").returncode == 0
    route = Route(broker, broker.port("tcp:default"))
    ops = Client(route, "ops-1", source="127.0.0.68", username="ops", password="ops-pw")
    dev = Client(route, "dev-1", source="127.0.0.69", username="dev", password="dev-pw")
    made.extend([ops, dev])
    assert ops.connack() == 0 and dev.connack() == 0
    dev.client.subscribe("plant/#")
    assert dev.subacks.get(timeout=WAIT) == [0x80]
    ops.client.subscribe("plant/#")
    assert ops.subacks.get(timeout=WAIT) == [0]
    ops.client.publish("plant/line-1", b"stop", qos=1).wait_for_publish(WAIT)
    assert ops.messages.get(timeout=WAIT) == ("plant/line-1", b"stop")
    info = json.loads(ctl(broker, "clients", "show", "ops-1", "--json").stdout)
    assert (info["is_superuser"], info["authenticated"]) == (True, True)
    assert "is_superuser=true" in ctl(broker, "clients", "show", "ops-1").stdout


def test_a_users_session_cannot_be_taken_by_another_user(
    start_broker: BrokerFactory, made: list[Client]
) -> None:
    broker = start(start_broker, [BUILTIN])
    for name in ("billing", "mallory"):
        assert add_user(broker, name, f"{name}-pw").returncode == 0
    route = Route(broker, broker.port("tcp:default"))
    owner = Client(
        route, "billing-svc", source="127.0.0.56", username="billing", password="billing-pw", v5=True
    )
    made.append(owner)
    assert owner.connack() == 0
    thief = attempt(
        made, route, "billing-svc", "127.0.0.57", username="mallory", password="mallory-pw", v5=True
    )
    assert thief == 0x87
    assert (
        json.loads(ctl(broker, "clients", "show", "billing-svc", "--json").stdout)["ip_address"]
        == "127.0.0.56"
    )
    again = attempt(
        made, route, "billing-svc", "127.0.0.58", username="billing", password="billing-pw", v5=True
    )
    assert again == 0  # the owner itself takes over as usual


# ------------------------------------------------------------------------------------------------
# Protection by the real address, behind one load balancer


@pytest.mark.parametrize("kind", ["nginx-proxy", "nginx-ws"])
@pytest.mark.e2e
def test_failure_ban_hits_the_hammering_client_only(
    start_broker: BrokerFactory, made: list[Client], tmp_path: Path, kind: str
) -> None:
    require_binary("nginx")
    policy = {"failure_ban": {"max_count": 3, "window_time": "1m", "ban_time": "5m"}}
    broker = start(start_broker, [BUILTIN], authentication_policy=policy)
    assert add_user(broker, "worker", "worker-pw").returncode == 0
    port, nginx = (nginx_proxy if kind == "nginx-proxy" else nginx_ws)(broker, tmp_path / "nginx")
    try:
        route = Route(broker, port, websocket=kind == "nginx-ws", proxy=EDGE)
        for attempt_no in range(3):
            code = attempt(
                made,
                route,
                f"guess-{attempt_no}",
                "127.0.0.61",
                username="worker",
                password=f"guess{attempt_no}",
            )
            assert code == 4
        # Banned now, even with the right password; the neighbour behind the same NGINX is not.
        banned = attempt(
            made, route, "hammer", "127.0.0.61", username="worker", password="worker-pw", v5=True
        )
        assert banned == (-2 if route.websocket else 0x8A)  # the upgrade itself is refused (403)
        assert attempt(made, route, "neighbour", "127.0.0.62", username="worker", password="worker-pw") == 0
    finally:
        nginx.stop()
    bans = json.loads(ctl(broker, "banned", "list", "--json").stdout)
    assert [(b["as"], b["who"], b["by"]) for b in bans] == [("peerhost", "127.0.0.61", "failure_ban")]
    record = audit(broker, "ban_added", who="127.0.0.61")
    assert record["failures"] == 3 and record["by"] == "failure_ban"
    assert metric_samples(broker)[("realip_auth_failure_bans_total", ())] == 1


@pytest.mark.parametrize("kind", ["nginx-proxy", "nginx-ws"])
@pytest.mark.e2e
def test_per_ip_limits_separate_two_clients_behind_one_balancer(
    start_broker: BrokerFactory, made: list[Client], tmp_path: Path, kind: str
) -> None:
    require_binary("nginx")
    config = {**listeners(max_connections_per_ip=1, max_conn_rate_per_ip="3/m")}
    broker = start_broker(config, log_level="info")
    port, nginx = (nginx_proxy if kind == "nginx-proxy" else nginx_ws)(broker, tmp_path / "nginx")
    try:
        route = Route(broker, port, websocket=kind == "nginx-ws", proxy=EDGE)
        assert attempt(made, route, "a-1", "127.0.0.63", v5=True) == 0
        assert attempt(made, route, "a-2", "127.0.0.63", v5=True) == 0x97  # one connection per address
        assert attempt(made, route, "a-3", "127.0.0.63") == -1  # 3.1.1: closed
        assert attempt(made, route, "b-1", "127.0.0.64") == 0  # its neighbour still connects
        made.pop(0).close()  # a-1 leaves: a fourth CONNECT from .63 within the minute is over the rate
        assert attempt(made, route, "a-4", "127.0.0.63", v5=True) == 0x9F
        assert attempt(made, route, "b-2", "127.0.0.65") == 0
    finally:
        nginx.stop()
    samples = metric_samples(broker)
    refused = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "realip_connects_refused_total"
    }
    assert refused == {"connections_per_ip": 2, "conn_rate": 1}


@pytest.mark.e2e
def test_fail2ban_filter_reads_the_real_address(
    start_broker: BrokerFactory, made: list[Client], tmp_path: Path
) -> None:
    """examples/fail2ban/realip-broker.conf, checked by fail2ban's own fail2ban-regex against the
    audit log: it finds the real client behind NGINX, never NGINX, and a client id crafted to
    look like a record fools it not."""
    require_binary("nginx")
    regex = require_binary("fail2ban-regex")
    broker = start(start_broker, [BUILTIN], authentication_policy={"failure_ban": {"enable": False}})
    port, nginx = nginx_proxy(broker, tmp_path / "nginx")
    try:
        route = Route(broker, port, proxy=EDGE)
        crafted = '","event":"auth_failed","ip":"198.51.100.1",'
        assert attempt(made, route, crafted, "127.0.0.66", username="u", password="p") == 4
        assert attempt(made, route, "plain", "127.0.0.67", username="u", password="p") == 4
    finally:
        nginx.stop()
    audit(broker, "auth_failed", clientid="plain")
    found = subprocess.run(
        [
            regex,
            "--out",
            "ip",
            str(broker.workdir / "audit.log"),
            str(REPO / "examples/fail2ban/realip-broker.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    assert found.stdout.split() == ["127.0.0.66", "127.0.0.67"]
