"""``realip-broker ctl``: the admin API from the command line (standard library only, no asyncio).

``clients show`` prints one line like ``emqx ctl clients show``::

    Client(dev-1, username=undefined, peername=203.0.113.7:4242, proxy=10.0.0.2:40110, listener=tcp:default,
           address_source=proxy_protocol_v1, proto_ver=4, clean_start=true, keepalive=60,
           connected_at=2026-11-27T03:36:05.011+00:00)

Exit codes: 0 done; 1 the broker answered "not found" or could not be reached (one line on stderr
naming what was tried, never a traceback); 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import socket
import sys
import unicodedata
from typing import Any
from urllib.parse import quote, urlencode

from broker.errors import AdminError, ConfigError
from broker.settings import LOG_LEVELS, AdminAddress, default_settings, load_settings_file, parse_admin_listen

#: Seconds to wait for the broker's answer; the admin API answers from memory.
TIMEOUT = 10.0

#: Page size used to list every client (the API's maximum).
PAGE = 10_000

BAN_KINDS = ("peerhost", "clientid", "username")

TOKEN_ENV = "REALIP_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the admin API's default)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Requests to one broker's admin API."""

    def __init__(self, address: AdminAddress, token: str = "", timeout: float = TIMEOUT) -> None:
        if address.path is None and address.host is None:
            raise AdminError("the admin API is turned off (admin.listen is empty)")
        self.address = address
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, decoded JSON or text)``.

        Raises:
            AdminError: the broker could not be reached, refused the token, or answered garbage.
        """
        if self.address.path is not None:
            connection: http.client.HTTPConnection = UnixHTTPConnection(self.address.path, self.timeout)
        else:
            connection = http.client.HTTPConnection(
                self.address.host or "", self.address.port, timeout=self.timeout
            )
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise AdminError(
                f"cannot reach the broker's admin API at {self.address}: {reason} (is the broker running?)"
            ) from None
        except http.client.HTTPException as exc:
            raise AdminError(f"the admin API at {self.address} answered badly: {exc!r}") from None
        finally:
            connection.close()
        if response.status == 401:
            raise AdminError(
                f"the admin API at {self.address} refused the token (401); pass --token or ${TOKEN_ENV}"
            )
        if not body:
            return response.status, None
        if response.getheader("Content-Type", "").startswith("application/json"):
            try:
                return response.status, json.loads(body)
            except ValueError:
                raise AdminError(f"the admin API at {self.address} sent invalid JSON") from None
        return response.status, body.decode("utf-8", "replace")


def printable(text: str) -> str:
    """``text`` safe for an operator's terminal: control and format characters (newlines, ANSI
    escapes, bidirectional overrides...) written as ``\\n``, ``\\x1b``, ``\\u202e``, and a
    backslash as ``\\\\``, so a client id cannot forge a line or colour the screen. Never raises."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char)[0] == "C":
            escaped = char.encode("unicode_escape").decode("ascii")
            out.append(escaped if escaped != char else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def say(line: str, *, error: bool = False) -> None:
    """Print one line of ``ctl``'s output (not JSON), escaped by :func:`printable`."""
    print(printable(line), file=sys.stderr if error else sys.stdout)


def client_line(client: dict[str, Any]) -> str:
    """The one-line form of a client (``clients show``)."""

    def hostport(ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    parts = [str(client["clientid"])]
    if client.get("node"):  # in a cluster: the node it is connected to
        parts.append(f"node={client['node']}")
    parts.append(f"username={client['username'] if client['username'] is not None else 'undefined'}")
    if client.get("authenticated"):
        parts.append("authenticated=true")
    if client.get("is_superuser"):
        parts.append("is_superuser=true")
    parts += [
        f"peername={hostport(client['ip_address'], client['port'])}",
    ]
    if client.get("proxy_address") is not None:
        parts.append(f"proxy={hostport(client['proxy_address'], client['proxy_port'])}")
    parts += [
        f"listener={client['listener']}",
        f"address_source={client['address_source']}",
    ]
    tls = client.get("tls")
    if tls:
        if tls.get("version"):
            parts.append(f"tls={tls['version']}")
        if tls.get("cert_cn"):
            parts.append(f"cert_cn={tls['cert_cn']}")
    parts += [
        f"proto_ver={client['proto_ver']}",
        f"clean_start={'true' if client['clean_start'] else 'false'}",
        f"keepalive={client['keepalive']}",
        f"connected_at={client['connected_at']}",
    ]
    if "subscriptions" in client:
        dropped = client.get("dropped") or {}
        parts += [
            f"expiry_interval={client['session_expiry_interval']:g}",
            f"receive_maximum={client['receive_maximum']}",
            f"topic_alias_maximum={client['topic_alias_maximum']}",
            f"subscriptions={client['subscriptions']}",
            f"inflight={client['inflight']}",
            f"mqueue_len={client['mqueue_len']}",
            f"dropped={sum(dropped.values())}",
        ]
        parts += [f"dropped.{reason}={count}" for reason, count in sorted(dropped.items())]
    return f"Client({', '.join(parts)})"


def listener_line(listener: dict[str, Any]) -> str:
    """The one-line form of a listener (``ctl listeners``)."""
    refused = ",".join(f"{reason}:{count}" for reason, count in listener["refused"].items()) or "none"
    mode = listener["proxy_protocol"]
    mode = str(mode).lower() if isinstance(mode, bool) else mode  # as written in YAML
    return (
        f"{listener['id']:<16} bind={listener['bind']} proxy_protocol={mode} "
        f"connections={listener['current_connections']} accepted={listener['accepted']} refused={refused} "
        f"health_checks={listener.get('health_checks', 0)}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ctl`` sub-command's arguments."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="find the admin API as this settings file says")
    where.add_argument("--admin", metavar="ADDR", help="unix:PATH or IP:PORT (default: unix:data/admin.sock)")
    parser.add_argument(
        "--token", help=f"bearer token for a TCP admin API (default: ${TOKEN_ENV} or the config's)"
    )
    topics = parser.add_subparsers(dest="topic", metavar="TOPIC", required=True)

    clients = topics.add_parser("clients", help="connected clients")
    actions = clients.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every connected client (or those the filters name)")
    listing.add_argument("--ip", metavar="CIDR", help="whose real address is in this address or network")
    listing.add_argument("--listener", metavar="ID", help="on this listener, e.g. tcp:default")
    listing.add_argument("--username", metavar="NAME")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one client")
    show.add_argument("client_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    kick = actions.add_parser("kick", help="disconnect a client and discard its session")
    kick.add_argument("client_id", metavar="ID")
    kick.add_argument("--json", action="store_true")

    listeners = topics.add_parser("listeners", help="listeners with their counters")
    listeners.add_argument("--json", action="store_true")

    banned = topics.add_parser("banned", help="runtime bans by address, client id or username")
    ban_actions = banned.add_subparsers(dest="action", metavar="ACTION", required=True)
    ban_list = ban_actions.add_parser("list", help="every ban in force")
    ban_list.add_argument("--json", action="store_true")
    ban_add = ban_actions.add_parser("add", help="ban, and kick the clients it matches")
    ban_add.add_argument("kind", choices=BAN_KINDS, metavar="peerhost|clientid|username")
    ban_add.add_argument("value", metavar="VALUE", help="an address or CIDR, a client id, a username")
    ban_add.add_argument("--reason", default="")
    ban_add.add_argument(
        "--until", metavar="TIME|DURATION", help="e.g. 2026-12-01T00:00:00Z or 1h (default: forever)"
    )
    ban_add.add_argument("--json", action="store_true")
    ban_delete = ban_actions.add_parser("delete", help="lift a ban")
    ban_delete.add_argument("kind", choices=BAN_KINDS, metavar="peerhost|clientid|username")
    ban_delete.add_argument("value", metavar="VALUE")
    ban_delete.add_argument("--json", action="store_true")

    status = topics.add_parser("status", help="version, uptime, clients, sessions, subscriptions, retained")
    status.add_argument("--json", action="store_true")

    subscriptions = topics.add_parser("subscriptions", help="subscriptions of every session, or of one")
    subscriptions.add_argument("--client", metavar="ID", help="one client's session only")
    subscriptions.add_argument("--topic", dest="topic_filter", metavar="FILTER", help="only this filter")
    subscriptions.add_argument("--json", action="store_true")

    retained = topics.add_parser("retained", help="retained messages")
    retained_actions = retained.add_subparsers(dest="action", metavar="ACTION", required=True)
    retained_list = retained_actions.add_parser(
        "list", help="those a filter matches (default '#', 100 at most)"
    )
    retained_list.add_argument("filter", nargs="?", default="#", metavar="FILTER")
    retained_list.add_argument("--limit", type=int, default=100)
    retained_list.add_argument("--json", action="store_true")
    for name, text in (("show", "one, with its whole payload"), ("delete", "drop one")):
        command = retained_actions.add_parser(name, help=text)
        command.add_argument("retained_topic", metavar="TOPIC")
        command.add_argument("--json", action="store_true")

    cluster = topics.add_parser("cluster", help="the cluster this node is part of")
    cluster_actions = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)
    cluster_status = cluster_actions.add_parser("status", help="nodes, heartbeats, routes, Redis")
    cluster_status.add_argument("--json", action="store_true")

    reload = topics.add_parser("reload", help="read the config file again and apply what can change live")
    reload.add_argument("--json", action="store_true")

    log = topics.add_parser("log", help="the broker's log level, while it runs")
    log_actions = log.add_subparsers(dest="action", metavar="ACTION", required=True)
    log_actions.add_parser("level", help="the level in force")
    set_level = log_actions.add_parser("set-level", help="change it (until the broker restarts)")
    set_level.add_argument("level", choices=LOG_LEVELS)

    users = topics.add_parser("users", help="users of the built-in database (authentication)")
    user_actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    user_list = user_actions.add_parser("list", help="every user (never a password or hash)")
    user_list.add_argument("--json", action="store_true")
    for name, text in (("add", "add a user"), ("passwd", "change a user's password")):
        command = user_actions.add_parser(
            name, help=f"{text}; the password is asked at a prompt, or read from stdin"
        )
        command.add_argument("username", metavar="USERNAME")
        command.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin (its first line)"
        )
        command.add_argument("--json", action="store_true")
    user_actions.choices["add"].add_argument("--superuser", action="store_true", help="no topic rules apply")
    user_delete = user_actions.add_parser("delete", help="remove a user")
    user_delete.add_argument("username", metavar="USERNAME")
    user_delete.add_argument("--json", action="store_true")


def read_password(from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a prompt (never an argument,
    which other users could read in the process list).

    Raises:
        AdminError: empty, the two entries differ, or stdin is not a terminal without --password-stdin.
    """
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise AdminError("no terminal to ask the password at: pass --password-stdin and pipe it in")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise AdminError("the two passwords differ")
    if not password:
        raise AdminError("the password must not be empty")
    return password


def user_line(user: dict[str, Any]) -> str:
    """The one-line form of a user (``ctl users list``)."""
    superuser = "true" if user["is_superuser"] else "false"
    return f"User({user['user_id']}, is_superuser={superuser}, created_at={user['created_at']})"


def _users(client: AdminClient, args: argparse.Namespace) -> int:
    base = "/api/v1/authentication/users"
    if args.action == "list":
        status, data = client.request("GET", base)
        _check(status, data)
        for user in data["data"] if not args.json else ():
            say(user_line(user))
        if args.json:
            _print_json(data["data"])
        return 0
    path = f"{base}/{quote(args.username, safe='')}"
    if args.action == "delete":
        status, data = client.request("DELETE", path)
    elif args.action == "add":
        body = {"user_id": args.username, "password": read_password(args.password_stdin)}
        status, data = client.request("POST", base, {**body, "is_superuser": args.superuser})
    else:
        status, data = client.request("PUT", path, {"password": read_password(args.password_stdin)})
    _check(status, data)
    if args.json:
        _print_json(data if data is not None else {"user_id": args.username, "deleted": True})
    else:
        say("ok" if data is None else user_line(data))
    return 0


def _cluster(client: AdminClient, args: argparse.Namespace) -> int:
    """``cluster status``: this node, Redis, every live node with its heartbeat and routes."""
    status, data = client.request("GET", "/api/v1/cluster")
    _check(status, data)
    if args.json:
        _print_json(data)
        return 0
    if not data["enabled"]:
        say("not in a cluster (cluster.enable: false)")
        return 0
    redis = data["redis"]
    say(f"node: {data['node']}")
    say(f"redis: {redis['url']} {'up' if redis['up'] else 'DOWN'}")
    for node in data["nodes"]:
        mark = " (this node)" if node["self"] else ""
        say(f"Node({node['name']}{mark}, heartbeat_age={node['heartbeat_age']}s, routes={node['routes']})")
    forwarded = ", ".join(f"{node}={count}" for node, count in sorted(data["forwarded"].items()))
    say(f"forwarded: {forwarded or 'nothing'}; received: {data['received']}; backlog: {data['backlog']}")
    return 0


def _views(client: AdminClient, args: argparse.Namespace) -> int:
    """``status``, ``subscriptions``, ``retained list|show|delete``."""
    if args.topic == "status":
        code, figures = client.request("GET", "/api/v1/status")
        _check(code, figures)
        if args.json:
            _print_json(figures)
        else:
            for key, value in figures.items():
                shown = ", ".join(value) if isinstance(value, list) else value
                say(f"{key}: {shown}")
        return 0
    if args.topic == "subscriptions":
        wanted = {"clientid": args.client, "topic": args.topic_filter, "limit": PAGE}
        path = f"/api/v1/subscriptions?{urlencode({k: v for k, v in wanted.items() if v is not None})}"
        status, data = client.request("GET", path)
        _check(status, data)
        if args.json:
            _print_json(data["data"])
        for entry in data["data"] if not args.json else ():
            state = "" if entry["online"] else " (offline)"
            say(f"{entry['clientid']} -> {entry['topic']} (qos {entry['qos']}){state}")
        return 0
    if args.action == "list":
        query = urlencode({"topic": args.filter, "limit": args.limit})
        status, data = client.request("GET", f"/api/v1/retained?{query}")
        _check(status, data)
        if args.json:
            _print_json(data["data"])
        for entry in data["data"] if not args.json else ():
            say(retained_line(entry))
        return 0
    topic = args.retained_topic
    path = f"/api/v1/retained/{quote(topic, safe='/')}"
    status, data = client.request("DELETE" if args.action == "delete" else "GET", path)
    if status == 404:
        say(f"no retained message on {topic}", error=True)
        return 1
    _check(status, data)
    if args.json:
        _print_json(data if data is not None else {"topic": topic, "deleted": True})
    else:
        say("ok" if data is None else retained_line(data))
    return 0


def retained_line(entry: dict[str, Any]) -> str:
    """The one-line form of a retained message (``ctl retained list|show``)."""
    size = entry["payload_size"]
    payload = entry["payload"] if entry["payload_encoding"] == "plain" else f"base64:{entry['payload']}"
    return (
        f"Retained({entry['topic']}, qos={entry['qos']}, from={entry['from_clientid']}, "
        f"size={size}, payload={payload!r})"
    )


def _check(status: int, data: Any) -> None:
    """Raises AdminError for an error answer, with the API's message."""
    if status >= 400:
        message = data.get("message", data) if isinstance(data, dict) else data
        raise AdminError(str(message))


def _client_for(args: argparse.Namespace) -> AdminClient:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if args.admin:
        try:
            return AdminClient(parse_admin_listen(args.admin), token)
        except ValueError as exc:
            raise AdminError(f"--admin: {exc}") from None
    settings = default_settings() if args.config is None else load_settings_file(args.config)
    listen = settings.admin.listen
    if args.config is not None and listen.path is not None and not os.path.isabs(listen.path):
        listen = AdminAddress(path=resolve_like_the_broker(listen.path, args.config))
    return AdminClient(listen, token or settings.admin.token)


def serving_directories(config: str, proc: str = "/proc") -> list[str]:
    """The working directories of the running ``realip-broker serve --config FILE`` processes whose
    FILE is ``config`` (Linux: read from ``/proc``; another user's broker is readable by root
    only, and skipped otherwise). Never raises."""
    target = os.path.realpath(config)
    found = []
    try:
        entries = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:  # no /proc (not Linux)
        return []
    for pid in entries:
        try:
            with open(os.path.join(proc, pid, "cmdline"), "rb") as file:
                argv = [part.decode(errors="replace") for part in file.read().split(b"\0")]
            if "serve" not in argv or not any("broker" in part for part in argv[:3]):
                continue
            named = _config_argument(argv)
            if named is None:
                continue
            cwd = os.readlink(os.path.join(proc, pid, "cwd"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if os.path.realpath(os.path.join(cwd, named)) == target:
            found.append(cwd)
    return found


def _config_argument(argv: list[str]) -> str | None:
    for index, part in enumerate(argv):
        if part == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if part.startswith("--config="):
            return part.partition("=")[2]
    return None


def resolve_like_the_broker(path: str, config: str) -> str:
    """A relative ``admin.listen`` socket path of the file ``config``, resolved as the broker
    serving that file resolves it: against the broker's working directory (found with
    :func:`serving_directories`; the first one whose socket exists), else against ours. Never
    raises."""
    for directory in serving_directories(config):
        candidate = os.path.join(directory, path)
        if os.path.exists(candidate):
            return candidate
    return path


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def run(args: argparse.Namespace) -> int:
    """Carry out one ``ctl`` command; returns the exit code."""
    try:
        client = _client_for(args)
        if args.topic == "listeners":
            _, data = client.request("GET", "/api/v1/listeners")
            if args.json:
                _print_json(data)
            else:
                for listener in data:
                    say(listener_line(listener))
            return 0
        if args.topic == "banned":
            return _banned(client, args)
        if args.topic == "users":
            return _users(client, args)
        if args.topic in ("status", "subscriptions", "retained"):
            return _views(client, args)
        if args.topic == "cluster":
            return _cluster(client, args)
        if args.topic == "reload":
            status, data = client.request("POST", "/api/v1/reload")
            if args.json:
                _print_json(data)
                return 1 if status >= 400 else 0
            if not isinstance(data, dict) or "errors" not in data:
                _check(status, data)
            if data["errors"]:
                for problem in data["errors"]:
                    say(f"reload failed: {problem}", error=True)
                say("nothing was changed", error=True)
                return 1
            say(f"changed: {', '.join(data['changed']) or 'nothing'}")
            if data["restart_needed"]:
                say(f"needs a restart to apply: {', '.join(data['restart_needed'])}")
            moves = data.get("listeners") or {}
            if any(moves.values()):  # started tcp:new; stopped tcp:old; updated ws:default; moved ...
                done = [f"{what} {', '.join(ids)}" for what, ids in moves.items() if ids]
                say(f"listeners: {'; '.join(done)}")
            return 0
        if args.topic == "log":
            if args.action == "set-level":
                status, data = client.request("PUT", "/api/v1/log/level", {"level": args.level})
            else:
                status, data = client.request("GET", "/api/v1/log/level")
            _check(status, data)
            say(data["level"])
            return 0
        if args.action == "list":
            filters = {name: getattr(args, name) for name in ("ip", "listener", "username")}
            return _list_clients(client, args.json, {k: v for k, v in filters.items() if v is not None})
        path = f"/api/v1/clients/{quote(args.client_id, safe='')}"
        method = "DELETE" if args.action == "kick" else "GET"
        status, data = client.request(method, path)
        if status == 404:
            say(f"client {args.client_id} not found", error=True)
            return 1
        if status >= 400:
            raise AdminError(f"the admin API answered {status}: {data}")
        if args.action == "kick":
            if args.json:
                _print_json({"clientid": args.client_id, "kicked": True})
            else:
                print("ok")
        elif args.json:
            _print_json(data)
        else:
            say(client_line(data))
        return 0
    except (AdminError, ConfigError) as exc:
        say(f"realip-broker ctl: {exc}", error=True)
        return 1


def _list_clients(client: AdminClient, as_json: bool, filters: dict[str, str]) -> int:
    clients: list[dict[str, Any]] = []
    page = 1
    while True:
        query = urlencode({**filters, "page": page, "limit": PAGE})
        status, data = client.request("GET", f"/api/v1/clients?{query}")
        if status == 400 and isinstance(data, dict):
            raise AdminError(str(data.get("message", data)))
        if status >= 400:
            raise AdminError(f"the admin API answered {status}: {data}")
        clients += data["data"]
        if not data["meta"]["hasnext"]:
            break
        page += 1
    if as_json:
        _print_json(clients)
    else:
        for entry in clients:
            say(client_line(entry))
    return 0


def ban_line(ban: dict[str, Any]) -> str:
    """The one-line form of a ban (``ctl banned list``)."""
    until = ban["until"] or "forever"
    reason = f", reason={ban['reason']!r}" if ban["reason"] else ""
    return f"Banned({ban['as']}={ban['who']}, by={ban['by']}, at={ban['at']}, until={until}{reason})"


def _banned(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        status, data = client.request("GET", "/api/v1/banned")
        if status >= 400:
            raise AdminError(f"the admin API answered {status}: {data}")
        if args.json:
            _print_json(data["data"])
        else:
            for ban in data["data"]:
                say(ban_line(ban))
        return 0
    if args.action == "add":
        body: dict[str, Any] = {"as": args.kind, "who": args.value, "reason": args.reason}
        if args.until:
            body["until"] = args.until
        status, data = client.request("POST", "/api/v1/banned", body)
        if status >= 400:
            message = data.get("message", data) if isinstance(data, dict) else data
            say(f"realip-broker ctl: {message}", error=True)
            return 1
        if args.json:
            _print_json(data)
        else:
            say(ban_line(data["ban"]))
            for client_id in data["kicked"]:
                say(f"kicked {client_id}")
        return 0
    path = f"/api/v1/banned/{quote(args.kind, safe='')}/{quote(args.value, safe='')}"
    status, data = client.request("DELETE", path)
    if status == 404:
        say(f"no {args.kind} ban on {args.value}", error=True)
        return 1
    if status >= 400:
        message = data.get("message", data) if isinstance(data, dict) else data
        say(f"realip-broker ctl: {message}", error=True)
        return 1
    print(json.dumps({"as": args.kind, "who": args.value, "deleted": True}) if args.json else "ok")
    return 0
