"""Settings: the YAML schema (EMQX-style names), strict validation, defaults, and the effective config.

Every problem in a file is collected with its dotted path and reported at once, in one
:class:`~broker.errors.ConfigError`, e.g.
``listeners.tcp.default.trusted_proxies[1]: '10.0.0.300/24' is not a network``.

The defaults below are the embedded default configuration; ``config/broker.yaml`` documents them
line by line and a test checks that the two agree. A file given with ``--config`` is merged over the
defaults: a section or key that the file does not name keeps its default, except ``listeners``: a
file with a ``listeners`` section gets exactly the listeners it names (no merged second port);
``enable: false`` turns a listener off.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from broker.auth.placeholders import (
    AUTHENTICATION_PLACEHOLDERS,
    AUTHORIZATION_PLACEHOLDERS,
    check_settings,
    check_template,
)
from broker.authorization import ACTIONS, Rule, valid_filter
from broker.core.session import SHARED_STRATEGIES
from broker.errors import ConfigError, ConfigProblem
from listeners.address import Networks, parse_network

# Defined with the listeners (the lower layer), which read them. The redundant aliases re-export
# them (PEP 484), so `from broker.settings import Bind` goes on working, for mypy too.
from listeners.options import UNLIMITED as UNLIMITED  # noqa: PLC0414
from listeners.options import Bind as Bind  # noqa: PLC0414
from listeners.options import ProxyProtocolMode as ProxyProtocolMode  # noqa: PLC0414
from listeners.tls import VERSIONS, context_from

#: Listener types this version serves, in the order they are started and listed.
LISTENER_TYPES = ("tcp", "ssl", "ws", "wss")


# --------------------------------------------------------------------------------------------
# Value parsers: each takes the raw YAML value and returns the typed value or raises ValueError
# with a message that quotes the value. The path is added by the caller.
# --------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``"3s"``, ``"500ms"``, ``"1m"``, ``"2h"``, ``"1d"`` -> seconds.

    A bare number is refused: ``15`` could mean seconds or milliseconds, and EMQX users write
    ``15s``.

    Raises:
        ValueError: not a duration string with a unit.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (write it with a unit, e.g. '15s' or '500ms')")
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (expected a number and a unit: ms, s, m, h, d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for ``seconds`` (inverse of :func:`parse_duration`)."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis == int(millis) else f"{millis}ms"


def parse_bind(value: Any) -> Bind:
    """``"0.0.0.0:1883"``, ``"[::]:1883"``, ``"127.0.0.1:0"``, ``":1883"`` or ``1883`` -> :class:`Bind`.

    The host must be an IP literal (no name lookups at start-up); port 0 asks for any free port.

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a bind address (expected 'IP:PORT', e.g. '0.0.0.0:1883')")
    if isinstance(value, int):
        text = f":{value}"
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ValueError(f"{value!r} is not a bind address (expected 'IP:PORT', e.g. '0.0.0.0:1883')")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not a bind address (expected '[IPv6]:PORT', e.g. '[::]:1883')")
        family = "IPv6"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} has no port (expected 'IP:PORT', e.g. '0.0.0.0:1883')")
        family = "IPv4"
        if ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 bind address in brackets, e.g. '[::]:1883'")
    if host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an {family} address") from None
        if address.version != (6 if family == "IPv6" else 4):
            raise ValueError(f"{value!r}: {host!r} is not an {family} address")
        host = str(address)
    if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number from 0 to 65535")
    return Bind(host, int(port_text))


def parse_bool(value: Any) -> bool:
    """YAML ``true``/``false`` only; ``"yes"`` or ``1`` are refused to avoid surprises.

    Raises:
        ValueError: not a boolean.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def parse_proxy_mode(value: Any) -> ProxyProtocolMode:
    """``false``, ``true`` or ``optional``.

    Raises:
        ValueError: anything else.
    """
    if value is True:
        return ProxyProtocolMode.ON
    if value is False:
        return ProxyProtocolMode.OFF
    if value == "optional":
        return ProxyProtocolMode.OPTIONAL
    raise ValueError(f"{value!r} is not one of false, true, optional")


def parse_max_connections(value: Any) -> int:
    """A positive count, or ``infinity`` (stored as :data:`UNLIMITED`).

    Raises:
        ValueError: not a positive integer nor ``infinity``.
    """
    if value == "infinity":
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer or 'infinity'")
    return value


def _parse_networks_into(value: Any, path: str, problems: list[ConfigProblem]) -> Networks:
    if value is None:
        return Networks()
    if not isinstance(value, list):
        problems.append(ConfigProblem(path, f"{value!r} is not a list of networks (e.g. ['10.0.0.0/8'])"))
        return Networks()
    networks = []
    for index, entry in enumerate(value):
        try:
            networks.append(parse_network(entry))
        except ValueError as exc:
            problems.append(ConfigProblem(f"{path}[{index}]", str(exc)))
    return Networks(networks)


def parse_http_path(value: Any) -> str:
    """An absolute HTTP path such as ``/mqtt``.

    Raises:
        ValueError: not a string starting with ``/``, or containing spaces, ``?`` or ``#``.
    """
    if not isinstance(value, str) or not value.startswith("/") or re.search(r"[\s?#]", value):
        raise ValueError(f"{value!r} is not an absolute HTTP path (e.g. '/mqtt')")
    return value


_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_header_name(value: Any) -> str:
    """An HTTP header name (RFC 9110 token), or ``""`` for none.

    Raises:
        ValueError: not a token.
    """
    if not isinstance(value, str) or (value and not _TOKEN_RE.match(value)):
        raise ValueError(f"{value!r} is not an HTTP header name (e.g. 'X-Forwarded-For')")
    return value


def parse_text(value: Any) -> str:
    """A non-empty string.

    Raises:
        ValueError: not a non-empty string.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


# --------------------------------------------------------------------------------------------
# Schema: frozen dataclasses whose fields carry their parser and their YAML form in metadata.
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


def setting(default: Any, parse: Callable[[Any], Any], dump: Callable[[Any], Any] = lambda v: v) -> Any:
    """A dataclass field with its parser (raw YAML -> value) and dumper (value -> YAML); a
    mapping default is copied for each instance."""
    metadata = {"parse": parse, "dump": dump}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class WebSocketOptions:
    """``listeners.ws.<name>.websocket``."""

    mqtt_path: str = setting("/mqtt", parse_http_path)
    proxy_address_header: str = setting("", parse_header_name)
    proxy_port_header: str = setting("", parse_header_name)


def parse_tls_versions(value: Any) -> tuple[str, ...]:
    """A non-empty list of ``tlsv1.2`` / ``tlsv1.3``.

    Raises:
        ValueError: anything else.
    """
    if (
        not isinstance(value, list)
        or not value
        or any(not isinstance(v, str) or v not in VERSIONS for v in value)
    ):
        raise ValueError(f"{value!r} is not a non-empty list of {', '.join(VERSIONS)}")
    return tuple(value)


def parse_verify(value: Any) -> bool:
    """``verify_peer`` (True) or ``verify_none`` (False).

    Raises:
        ValueError: anything else.
    """
    if value not in ("verify_peer", "verify_none"):
        raise ValueError(f"{value!r} is not verify_peer or verify_none")
    return bool(value == "verify_peer")


def parse_cert_username(value: Any) -> str:
    """``cn`` (the client certificate's common name becomes the username) or ``""`` (off).

    Raises:
        ValueError: anything else.
    """
    if value not in ("", "cn"):
        raise ValueError(f"{value!r} is not 'cn' or ''")
    return str(value)


def _path_or_empty(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a file path")
    return value


@dataclass(frozen=True)
class SslOptions:
    """``listeners.<ssl|wss>.<name>.ssl_options`` (EMQX's names)."""

    certfile: str = setting("", _path_or_empty)
    keyfile: str = setting("", _path_or_empty)
    cacertfile: str = setting("", _path_or_empty)
    verify: bool = setting(False, parse_verify, lambda v: "verify_peer" if v else "verify_none")
    fail_if_no_peer_cert: bool = setting(False, parse_bool)
    versions: tuple[str, ...] = setting(("tlsv1.3", "tlsv1.2"), parse_tls_versions, list)
    ciphers: str = setting("", _path_or_empty)
    #: A client that has not completed the TLS handshake in this time is closed.
    handshake_timeout: float = setting(15.0, parse_duration, format_duration)


@dataclass(frozen=True)
class AccessSettings:
    """``access`` (global) or ``listeners.<type>.<name>.access``: networks by real address.

    ``deny`` wins over ``allow``; a non-empty ``allow`` refuses every address outside it.
    """

    allow: Networks = field(default_factory=Networks, metadata={"networks": True})
    deny: Networks = field(default_factory=Networks, metadata={"networks": True})

    def refuses(self, ip: str) -> bool:
        """Whether a client at ``ip`` is refused. Never raises."""
        return self.deny.contains(ip) or (bool(self.allow) and not self.allow.contains(ip))


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds (``"10/s"``, ``"100/m"``, ``"5/10s"``)."""

    count: int
    period: float

    def __str__(self) -> str:
        unit = format_duration(self.period)
        return f"{self.count}/{unit[1:] if unit.startswith('1') and unit[1:].isalpha() else unit}"


def parse_rate(value: Any) -> Rate | None:
    """``"10/s"``, ``"100/m"``, ``"5/10s"`` -> :class:`Rate`; ``infinity`` -> None (no limit).

    Raises:
        ValueError: not of that form, or a count or period of zero.
    """
    if value == "infinity":
        return None
    count, sep, period = str(value).partition("/") if isinstance(value, str) else ("", "", "")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"{value!r} is not a rate (e.g. '10/s', '100/m') or 'infinity'")
    period = period.strip()
    try:
        seconds = parse_duration(period if period[:1].isdigit() else f"1{period}")
    except ValueError:
        raise ValueError(f"{value!r}: {period!r} is not a period (s, m, h or a duration like 10s)") from None
    if seconds <= 0:
        raise ValueError(f"{value!r}: the period must be longer than 0")
    return Rate(int(count), seconds)


@dataclass(frozen=True)
class ListenerSettings:
    """One listener: ``listeners.<type>.<name>``."""

    type: str
    name: str
    bind: Bind = setting(Bind("", 0), parse_bind, str)
    enable: bool = setting(True, parse_bool)
    max_connections: int = setting(UNLIMITED, parse_max_connections, lambda v: v or "infinity")
    proxy_protocol: ProxyProtocolMode = setting(
        ProxyProtocolMode.OFF, parse_proxy_mode, ProxyProtocolMode.dump
    )
    proxy_protocol_timeout: float = setting(3.0, parse_duration, format_duration)
    trusted_proxies: Networks = field(default_factory=Networks, metadata={"networks": True})
    #: ``cn``: the client certificate's CN becomes the username (a verified local certificate on
    #: ssl/wss; a PROXY v2 SSL TLV from a trusted proxy saying it verified one on tcp/ws).
    peer_cert_as_username: str = setting("", parse_cert_username)
    websocket: WebSocketOptions | None = field(default=None, metadata={"section": WebSocketOptions})
    ssl_options: SslOptions | None = field(default=None, metadata={"section": SslOptions})
    #: When set, replaces the global ``access`` for this listener.
    access: AccessSettings | None = field(default=None, metadata={"section": AccessSettings})
    #: Per *real* client address (after PROXY / forwarded headers): connected clients at most, and
    #: CONNECTs per period at most; beyond them CONNACK 0x97 / 0x9F (MQTT 5), closed (3.1.1).
    max_connections_per_ip: int = setting(UNLIMITED, parse_max_connections, lambda v: v or "infinity")
    max_conn_rate_per_ip: Rate | None = setting(None, parse_rate, lambda v: str(v) if v else "infinity")

    @property
    def id(self) -> str:
        """``type:name``, how logs, metrics and ``clients show`` name the listener."""
        return f"{self.type}:{self.name}"


def parse_node_name(value: Any) -> str:
    """``node.name``: one ``$SYS`` topic level (no ``/``, ``+``, ``#``, NUL; at most 1024 bytes), or
    ``""`` for ``realip@<hostname>``.

    Raises:
        ValueError: anything else.
    """
    if value == "":
        return ""
    text = parse_text(value)
    if any(c in text for c in "/+#\0") or len(text.encode()) > 1024:
        raise ValueError(f"{text!r} is not one $SYS topic level (no '/', '+', '#'; at most 1024 bytes)")
    return text


@dataclass(frozen=True)
class NodeSettings:
    """``node``: where the broker keeps its files, and its name."""

    data_dir: str = setting("data", parse_text)
    #: The node's name in ``$SYS/brokers/<name>/`` (EMQX's ``node.name``); "" = realip@<hostname>.
    name: str = setting("", parse_node_name)


#: The store's file in ``node.data_dir`` when ``persistence.file`` is "".
STORE_FILE_NAME = "store.sqlite3"

#: ``persistence.flush_interval`` bounds: shorter than 10ms is a transaction per burst of packets for
#: no durability anyone can tell apart; longer than an hour is hardly persistence (a ``kill -9`` loses
#: up to this much).
MIN_FLUSH_INTERVAL = 0.01
MAX_FLUSH_INTERVAL = 3600.0


def parse_flush_interval(value: Any) -> float:
    """``persistence.flush_interval``: a duration from 10ms to 1h.

    Raises:
        ValueError: not a duration, or out of that range.
    """
    seconds = parse_duration(value)
    if not MIN_FLUSH_INTERVAL <= seconds <= MAX_FLUSH_INTERVAL:
        raise ValueError(f"{value!r} is not between 10ms and 1h")
    return seconds


@dataclass(frozen=True)
class PersistenceSettings:
    """``persistence``: what survives a restart (retained messages; sessions later) and where."""

    #: On by default, in an SQLite file (no server to run); off: nothing survives a restart.
    enable: bool = setting(True, parse_bool)
    #: The store's file ("" = ``<node.data_dir>/store.sqlite3``).
    file: str = setting("", _path_or_empty)
    #: Changes are written together once per interval: a ``kill -9`` loses at most this much (a clean
    #: stop loses nothing).
    flush_interval: float = setting(1.0, parse_flush_interval, format_duration)


def parse_redis_url(value: Any) -> str:
    """A ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL (redis-py's forms).

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, str) or not re.match(r"^(rediss?://[^/?#\s]+|unix:///\S+)", value):
        raise ValueError(
            f"{value!r} is not a redis:// (or rediss://, unix://) URL, e.g. 'redis://127.0.0.1:6379/0'"
        )
    return value


@dataclass(frozen=True)
class RedisSettings:
    """``cluster.redis``: the Redis (or Valkey) server the nodes share."""

    url: str = setting("redis://127.0.0.1:6379/0", parse_redis_url)


def parse_short_duration(value: Any) -> float:
    """A duration from 100ms to 1h (``cluster.heartbeat_interval``, ``cluster.node_timeout``).

    Raises:
        ValueError: not a duration, or out of that range.
    """
    seconds = parse_duration(value)
    if not 0.1 <= seconds <= 3600:
        raise ValueError(f"{value!r} is not between 100ms and 1h")
    return seconds


@dataclass(frozen=True)
class ClusterSettings:
    """``cluster``: this node as one of several sharing a Redis (see README "Cluster")."""

    #: Off by default: a single broker needs no Redis.
    enable: bool = setting(False, parse_bool)
    redis: RedisSettings = field(default_factory=RedisSettings, metadata={"section": RedisSettings})
    #: How often this node says it is alive.
    heartbeat_interval: float = setting(1.0, parse_short_duration, format_duration)
    #: A node not heard of for this long is gone: its routes are dropped.
    node_timeout: float = setting(5.0, parse_short_duration, format_duration)


def parse_interval(value: Any) -> float:
    """A duration of at least one second (``sys_topics.sys_msg_interval``).

    Raises:
        ValueError: not a duration, or shorter than 1s.
    """
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError(f"{value!r} is shorter than 1s")
    return seconds


@dataclass(frozen=True)
class SysTopicsSettings:
    """``sys_topics``: ``$SYS`` figures and client events (EMQX's section name and keys)."""

    #: Off by default: client events carry every client's real address and username.
    enable: bool = setting(False, parse_bool)
    #: How often the figures are published (mosquitto's ``sys_interval`` is 10s too).
    sys_msg_interval: float = setting(10.0, parse_interval, format_duration)
    #: ``$SYS/brokers/<node>/clients/<clientid>/connected|disconnected``.
    client_events: bool = setting(True, parse_bool)


@dataclass(frozen=True, slots=True)
class AdminAddress:
    """Where the admin API listens: a unix socket path, or an IP and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is None:
            return ""
        return str(Bind(self.host, self.port or 0))

    @property
    def is_tcp(self) -> bool:
        """Whether this is a TCP address (which requires a token)."""
        return self.host is not None


def parse_admin_listen(value: Any) -> AdminAddress:
    """``unix:PATH``, ``IP:PORT`` / ``[IPv6]:PORT``, or ``""`` for no admin API.

    Raises:
        ValueError: none of those forms.
    """
    if value == "":
        return AdminAddress()
    if isinstance(value, str) and value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path or "\0" in path:
            raise ValueError(f"{value!r}: 'unix:' needs a socket path, e.g. 'unix:data/admin.sock'")
        return AdminAddress(path=path)
    try:
        bind = parse_bind(value)
    except ValueError:
        raise ValueError(f"{value!r} is not 'unix:PATH' or 'IP:PORT' (e.g. '127.0.0.1:18083')") from None
    if not bind.host:
        raise ValueError(f"{value!r}: give the IP to listen on, e.g. '127.0.0.1:{bind.port}'")
    return AdminAddress(host=bind.host, port=bind.port)


#: Shortest admin token accepted: the admin API can kick clients and ban networks.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class AdminSettings:
    """``admin``: the admin API used by ``realip-broker ctl`` and by monitoring."""

    listen: AdminAddress = setting(AdminAddress(path="data/admin.sock"), parse_admin_listen, str)
    token: str = setting(
        "", lambda v: v if isinstance(v, str) else parse_text(v), lambda v: "********" if v else ""
    )


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1024, "MB": 1024 * 1024}

#: [MQTT-2.2.3] the largest packet the remaining-length encoding allows (256 MB).
MQTT_MAX_PACKET = 268_435_455


def parse_size(value: Any) -> int:
    """A byte size: ``1048576``, ``"256KB"``, ``"1MB"`` (1 KB = 1024 bytes), 1 KB to 256 MB.

    Raises:
        ValueError: not a size, or out of range.
    """
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a size (e.g. '1MB', '256KB', 65536)")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not 1024 <= size <= MQTT_MAX_PACKET:
        raise ValueError(f"{value!r} is outside 1KB..256MB")
    return size


def parse_count(low: int, high: int) -> Callable[[Any], int]:
    """A parser for a whole number from ``low`` to ``high``.

    The parser raises ValueError for anything else.
    """

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{value!r} is not a whole number from {low} to {high}")
        return value

    return parse


def parse_optional_text(value: Any) -> str:
    """A string, possibly empty.

    Raises:
        ValueError: not a string.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def parse_strategy(value: Any) -> str:
    """A shared subscription strategy (``mqtt.shared_subscription_strategy``).

    Raises:
        ValueError: not one of SHARED_STRATEGIES.
    """
    if value not in SHARED_STRATEGIES:
        raise ValueError(f"{value!r} is not one of {', '.join(SHARED_STRATEGIES)}")
    return str(value)


def parse_keepalive(value: Any) -> int:
    """``disabled`` (0) or a number of seconds from 1 to 65535 (``server_keepalive``).

    Raises:
        ValueError: anything else.
    """
    if value == "disabled":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not 'disabled' or a number of seconds from 1 to 65535")
    return value


def parse_multiplier(value: Any) -> float:
    """A number from 1 to 100 (``keepalive_multiplier``).

    Raises:
        ValueError: not a number in that range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 100:
        raise ValueError(f"{value!r} is not a number from 1 to 100")
    return float(value)


def format_size(size: int) -> str:
    """The shortest exact form of a byte size (inverse of :func:`parse_size`)."""
    for unit in ("MB", "KB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


@dataclass(frozen=True)
class MqttSettings:
    """``mqtt``: protocol-level limits."""

    #: Close a connection that sends no CONNECT in time (amqtt 0.12.1 waited forever).
    idle_timeout: float = setting(15.0, parse_duration, format_duration)
    #: Close a connection that announces a larger packet, before buffering it (EMQX's default).
    max_packet_size: int = setting(1024 * 1024, parse_size, format_size)
    #: QoS 1/2 deliveries awaiting their acknowledgement, per session; the rest wait in the queue.
    max_inflight: int = setting(32, parse_count(1, 65535))
    #: Messages queued per session (offline, or beyond the in-flight window); then dropped, counted.
    max_mqueue_len: int = setting(1000, parse_max_connections, lambda v: v or "infinity")
    #: Whether QoS 0 messages are queued for an offline persistent session (EMQX's default: yes).
    mqueue_store_qos0: bool = setting(True, parse_bool)
    #: An offline persistent (clean session 0) session is discarded after this long.
    session_expiry_interval: float = setting(7200.0, parse_duration, format_duration)
    #: Subscriptions per session ("infinity": no limit of ours).
    max_subscriptions: int = setting(UNLIMITED, parse_max_connections, lambda v: v or "infinity")
    #: Levels in a topic name or filter; deeper ones are refused (bounds trie depth per request).
    max_topic_levels: int = setting(128, parse_count(1, 65535))
    #: Incoming QoS 2 messages awaiting PUBREL, per session; more close the connection.
    max_awaiting_rel: int = setting(100, parse_count(1, 65535))
    #: An incoming QoS 2 message whose PUBREL does not come within this time is discarded.
    await_rel_timeout: float = setting(300.0, parse_duration, format_duration)
    #: Longest client identifier accepted (CONNACK 2 / 0x85 beyond it).
    max_clientid_len: int = setting(65535, parse_count(23, 65535))
    #: Deliver at the subscription's QoS even when the message was published at a lower one.
    upgrade_qos: bool = setting(False, parse_bool)
    #: A client silent for this many keepalive periods is disconnected [MQTT-3.1.2-24].
    keepalive_multiplier: float = setting(1.5, parse_multiplier)
    #: Retained messages kept broker-wide; a new retained topic beyond it is not stored (counted).
    max_retained_messages: int = setting(100_000, parse_max_connections, lambda v: v or "infinity")
    #: MQTT 5: topic aliases a client may set up (announced in CONNACK; 0x94 beyond it).
    max_topic_alias: int = setting(65535, parse_count(0, 65535))
    #: MQTT 5: a keepalive the broker imposes on every client ("disabled": the client's own).
    server_keepalive: int = setting(0, parse_keepalive, lambda v: v or "disabled")
    #: MQTT 5: the Response Information returned to clients that ask for it ("" for none).
    response_information: str = setting("", parse_optional_text)
    #: MQTT 5: CONNACK carries user properties ``peername`` and ``address_source``: the address the
    #: broker decided on, so that a client can check a load-balancer chain from its side.
    peer_in_connack: bool = setting(False, parse_bool)
    #: Forwarded PUBLISHes carry the publisher's real address in a user property of this name ("":
    #: off). A client-supplied property of that name is removed first, so it cannot be forged.
    publisher_address_property: str = setting("", parse_optional_text)
    #: MQTT 5: at shutdown, clients are told to use this server instead (DISCONNECT 0x9C, or 0x9D
    #: with ``server_moved``) with it as Server Reference; "" says just "shutting down" (0x8B).
    server_reference: str = setting("", parse_optional_text)
    server_moved: bool = setting(False, parse_bool)
    #: Which member of a ``$share/{name}/{filter}`` group gets a message: round_robin, random,
    #: sticky, hash_clientid (of the publisher), hash_topic.
    shared_subscription_strategy: str = setting("round_robin", parse_strategy)


def _parse_rules_into(value: Any, path: str, problems: list[ConfigProblem]) -> tuple[Rule, ...]:
    """``authorization.rules``: a list of rule mappings, each checked with its index in the path."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(ConfigProblem(path, f"expected a list of rules, got {value!r}"))
        return ()
    rules = []
    known = ["permission", "action", "topics", "clientid", "username", "ipaddress"]
    for index, raw in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(raw, Mapping):
            problems.append(ConfigProblem(where, f"expected a mapping, got {raw!r}"))
            continue
        count = len(problems)
        for key in raw:
            if key not in known:
                problems.append(ConfigProblem(f"{where}.{key}", f"unknown key{_suggest(str(key), known)}"))
        permission, action, topics = raw.get("permission"), raw.get("action", "all"), raw.get("topics")
        if permission not in ("allow", "deny"):
            problems.append(ConfigProblem(f"{where}.permission", f"{permission!r} is not allow or deny"))
        if action not in ACTIONS:
            problems.append(
                ConfigProblem(f"{where}.action", f"{action!r} is not one of {', '.join(ACTIONS)}")
            )
        if not isinstance(topics, list) or not topics:
            problems.append(ConfigProblem(f"{where}.topics", "required: a non-empty list of topic filters"))
            topics = []
        for position, topic in enumerate(topics):
            if not isinstance(topic, str) or not valid_filter(topic):
                problems.append(
                    ConfigProblem(f"{where}.topics[{position}]", f"{topic!r} is not a topic filter")
                )
        for key in ("clientid", "username"):
            if key in raw and (not isinstance(raw[key], str) or not raw[key]):
                problems.append(ConfigProblem(f"{where}.{key}", f"{raw[key]!r} is not a non-empty string"))
        networks = None
        if "ipaddress" in raw:
            entries = raw["ipaddress"] if isinstance(raw["ipaddress"], list) else [raw["ipaddress"]]
            networks = _parse_networks_into(entries, f"{where}.ipaddress", problems)
        if len(problems) == count:
            rules.append(
                Rule(
                    permission=str(permission),
                    action=str(action),
                    topics=tuple(topics),
                    clientid=raw.get("clientid"),
                    username=raw.get("username"),
                    ipaddress=networks,
                )
            )
    return tuple(rules)


def parse_no_match(value: Any) -> str:
    """``allow`` or ``deny``.

    Raises:
        ValueError: anything else.
    """
    if value not in ("allow", "deny"):
        raise ValueError(f"{value!r} is not allow or deny")
    return str(value)


def parse_choice(*choices: str) -> Callable[[Any], str]:
    """A parser accepting one of ``choices``; it raises ValueError for anything else."""

    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return parse


def parse_url(value: Any) -> str:
    """An ``http://`` or ``https://`` URL with a host (placeholders allowed in path and query).

    Raises:
        ValueError: anything else.
    """
    match = re.match(r"^https?://[^/?#\s]+", value) if isinstance(value, str) else None
    if not match or re.search(r"\s", value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL (e.g. 'http://127.0.0.1:8080/auth')")
    return str(value)


def parse_string_map(value: Any) -> dict[str, str]:
    """A mapping of strings to strings (HTTP headers, a request body, JWT claims).

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{value!r} is not a mapping of strings to strings")
    return dict(value)


def parse_mapping(value: Any) -> dict[str, Any]:
    """Any mapping (an amqtt plugin's own ``config``), checked by its consumer.

    Raises:
        ValueError: not a mapping.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping")
    return dict(value)


def parse_dotted_path(value: Any) -> str:
    """A Python ``module.Class`` path.

    Raises:
        ValueError: not of that form.
    """
    if not isinstance(value, str) or not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$", value):
        raise ValueError(f"{value!r} is not a dotted path (e.g. 'package.module.PluginClass')")
    return value


def _mask(value: str) -> str:
    return "********" if value else ""


def _mask_headers(headers: dict[str, str]) -> dict[str, str]:
    secret = ("authorization", "proxy-authorization", "cookie", "x-api-key")
    return {name: _mask(value) if name.lower() in secret else value for name, value in headers.items()}


@dataclass(frozen=True)
class HttpRequestSettings:
    """An HTTP callout (EMQX's ``backend: http``): authentication, or an authorization source.

    ``url``, ``headers`` and ``body`` may hold placeholders (``${clientid}``, ``${peerhost}``...),
    each escaped for where it stands (URL, JSON, form).
    """

    enable: bool = setting(True, parse_bool)
    method: str = setting("post", parse_choice("get", "post"))
    url: str = setting("", parse_url)
    headers: dict[str, str] = setting({"content-type": "application/json"}, parse_string_map, _mask_headers)
    body: dict[str, str] = setting({}, parse_string_map)
    request_timeout: float = setting(5.0, parse_duration, format_duration)
    #: Connections kept open to the server (aiohttp's connector limit).
    pool_size: int = setting(8, parse_count(1, 1024))


#: Algorithms for new passwords in the built-in database (all three are verified).
HASH_ALGORITHMS = ("argon2id", "bcrypt", "pbkdf2")


@dataclass(frozen=True)
class BuiltinDatabaseSettings:
    """``mechanism: password_based, backend: built_in_database``: users in ``node.data_dir``."""

    enable: bool = setting(True, parse_bool)
    password_hash_algorithm: str = setting("argon2id", parse_choice(*HASH_ALGORITHMS))


@dataclass(frozen=True)
class PasswordFileSettings:
    """``mechanism: password_based, backend: password_file``: a ``mosquitto_passwd`` file."""

    enable: bool = setting(True, parse_bool)
    path: str = setting("", parse_text)


@dataclass(frozen=True)
class HttpAuthSettings(HttpRequestSettings):
    """``mechanism: password_based, backend: http``."""


@dataclass(frozen=True)
class JwtSettings:
    """``mechanism: jwt``: a signed token in the password (or username) field."""

    enable: bool = setting(True, parse_bool)
    algorithm: str = setting("hmac-based", parse_choice("hmac-based", "public-key"))
    secret: str = setting("", parse_optional_text, _mask)
    secret_base64_encoded: bool = setting(False, parse_bool)
    #: A PEM public key (RSA or EC), or the path of a file holding one.
    public_key: str = setting("", parse_optional_text)
    token_from: str = setting("password", parse_choice("password", "username"))
    #: Claims that must equal these values (placeholders: ``${clientid}``, ``${username}``).
    verify_claims: dict[str, str] = setting({}, parse_string_map)


@dataclass(frozen=True)
class ScramSettings:
    """``mechanism: scram, backend: built_in_database``: MQTT 5 enhanced authentication."""

    enable: bool = setting(True, parse_bool)
    algorithm: str = setting("sha256", parse_choice("sha256", "sha512"))
    #: PBKDF2 iterations of the SCRAM keys stored for new passwords (RFC 7677's minimum).
    iteration_count: int = setting(4096, parse_count(4096, 10_000_000))


@dataclass(frozen=True)
class AmqttPluginSettings:
    """``mechanism: amqtt_plugin``: an amqtt ``BaseAuthPlugin`` hosted by its dotted path."""

    enable: bool = setting(True, parse_bool)
    plugin: str = setting("", parse_dotted_path)
    config: dict[str, Any] = setting({}, parse_mapping)


AuthenticatorSettings = (
    BuiltinDatabaseSettings
    | PasswordFileSettings
    | HttpAuthSettings
    | JwtSettings
    | ScramSettings
    | AmqttPluginSettings
)

#: (mechanism, backend) -> settings class; backend "" for mechanisms that have none.
AUTHENTICATORS: dict[tuple[str, str], type[Any]] = {
    ("password_based", "built_in_database"): BuiltinDatabaseSettings,
    ("password_based", "password_file"): PasswordFileSettings,
    ("password_based", "http"): HttpAuthSettings,
    ("jwt", ""): JwtSettings,
    ("scram", "built_in_database"): ScramSettings,
    ("amqtt_plugin", ""): AmqttPluginSettings,
}

#: Settings class -> (mechanism, backend), for dumping.
AUTHENTICATOR_KINDS = {cls: kind for kind, cls in AUTHENTICATORS.items()}

#: Keys that each authenticator must set.
_REQUIRED = {
    PasswordFileSettings: ("path",),
    HttpAuthSettings: ("url",),
    AmqttPluginSettings: ("plugin",),
}


def _parse_authentication_into(
    value: Any, path: str, problems: list[ConfigProblem]
) -> tuple[AuthenticatorSettings, ...]:
    """``authentication``: the chain, a list of ``{mechanism, backend, ...}`` entries."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(ConfigProblem(path, f"expected a list of authenticators, got {value!r}"))
        return ()
    chain: list[AuthenticatorSettings] = []
    kinds = ", ".join(f"{m}/{b}" if b else m for m, b in AUTHENTICATORS)
    for index, raw in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(raw, Mapping):
            problems.append(ConfigProblem(where, f"expected a mapping with 'mechanism', got {raw!r}"))
            continue
        entry = dict(raw)
        mechanism, backend = entry.pop("mechanism", None), entry.pop("backend", "")
        known = isinstance(mechanism, str) and isinstance(backend, str)
        cls = AUTHENTICATORS.get((mechanism, backend)) if known else None
        if cls is None:
            problems.append(
                ConfigProblem(where, f"mechanism {mechanism!r} backend {backend!r} is not one of: {kinds}")
            )
            continue
        count = len(problems)
        built = _build(cls, entry, where, problems)
        for key in _REQUIRED.get(cls, ()):
            if key not in entry and key != "url":  # check_settings says it for url
                problems.append(ConfigProblem(f"{where}.{key}", "required"))
        if isinstance(built, HttpAuthSettings):
            for key, text in check_settings(built, AUTHENTICATION_PLACEHOLDERS):
                problems.append(ConfigProblem(f"{where}.{key}", text))
        if isinstance(built, JwtSettings):
            for claim, template in built.verify_claims.items():
                wrong = check_template(template, frozenset({"clientid", "username"}))
                if wrong is not None:
                    problems.append(ConfigProblem(f"{where}.verify_claims.{claim}", wrong))
        if isinstance(built, JwtSettings) and len(problems) == count:
            if built.algorithm == "hmac-based" and not built.secret:
                problems.append(ConfigProblem(f"{where}.secret", "required with algorithm: hmac-based"))
            if built.algorithm == "public-key" and not built.public_key:
                problems.append(ConfigProblem(f"{where}.public_key", "required with algorithm: public-key"))
        if cls is BuiltinDatabaseSettings and any(type(other) is cls for other in chain):
            problems.append(ConfigProblem(where, "the built-in database is already in the chain"))
        chain.append(built)
    return tuple(chain)


def _parse_sources_into(
    value: Any, path: str, problems: list[ConfigProblem]
) -> tuple[HttpRequestSettings, ...]:
    """``authorization.sources``: callouts asked when no rule applies (``type: http``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(ConfigProblem(path, f"expected a list of sources, got {value!r}"))
        return ()
    sources = []
    for index, raw in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(raw, Mapping) or raw.get("type") != "http":
            problems.append(ConfigProblem(f"{where}.type", "a source is {type: http, url: ...}"))
            continue
        entry = {key: item for key, item in raw.items() if key != "type"}
        source = _build(HttpRequestSettings, entry, where, problems)
        for key, message in check_settings(source, AUTHORIZATION_PLACEHOLDERS):
            problems.append(ConfigProblem(f"{where}.{key}", message))
        sources.append(source)
    return tuple(sources)


@dataclass(frozen=True)
class AuthorizationCacheSettings:
    """``authorization.cache``: per-client answers of the sources (EMQX's names and defaults)."""

    enable: bool = setting(True, parse_bool)
    max_size: int = setting(32, parse_count(1, 100_000))
    ttl: float = setting(60.0, parse_duration, format_duration)


@dataclass(frozen=True)
class AuthorizationSettings:
    """``authorization``: topic rules (see :mod:`broker.authorization`), then sources."""

    rules: tuple[Rule, ...] = field(default=(), metadata={"rules": True})
    sources: tuple[HttpRequestSettings, ...] = field(default=(), metadata={"sources": True})
    no_match: str = setting("allow", parse_no_match)
    cache: AuthorizationCacheSettings = field(
        default_factory=AuthorizationCacheSettings, metadata={"section": AuthorizationCacheSettings}
    )


def parse_anonymous(value: Any) -> bool | None:
    """``auto`` (None: allowed only when no authenticator is configured), ``true`` or ``false``.

    Raises:
        ValueError: anything else.
    """
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not auto, true or false")
    return value


@dataclass(frozen=True)
class FailureBanSettings:
    """``authentication_policy.failure_ban``: EMQX's ``flapping_detect``, for failed
    authentication and keyed on the client's *real* address."""

    enable: bool = setting(True, parse_bool)
    #: Failures from one address within ``window_time`` that ban it for ``ban_time``.
    max_count: int = setting(10, parse_count(1, 1_000_000))
    window_time: float = setting(60.0, parse_duration, format_duration)
    ban_time: float = setting(300.0, parse_duration, format_duration)


@dataclass(frozen=True)
class AuthenticationPolicy:
    """``authentication_policy``: what the chain does not decide itself."""

    #: Clients that send neither username nor password.
    allow_anonymous: bool | None = setting(None, parse_anonymous, lambda v: "auto" if v is None else v)
    failure_ban: FailureBanSettings = field(
        default_factory=FailureBanSettings, metadata={"section": FailureBanSettings}
    )


#: Log levels, as ``log.level``, ``serve --log-level`` and ``ctl log set-level`` name them.
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogSettings:
    """``log``: the broker's own log (the audit log is ``audit``)."""

    level: str = setting("info", parse_choice(*LOG_LEVELS))
    #: ``text`` (one line per record) or ``json`` (one object per line: ts, level, logger, msg).
    format: str = setting("text", parse_choice("text", "json"))
    #: A file to log to instead of stderr ("" = stderr); reopened when logrotate moves it.
    file: str = setting("", parse_optional_text)


@dataclass(frozen=True)
class AuditSettings:
    """``audit``: the audit log, one JSON object per line."""

    #: Path of the log ("" = off); reopened when logrotate moves it away.
    file: str = setting("", lambda v: v if v == "" else parse_text(v))


@dataclass(frozen=True)
class Settings:
    """The whole effective configuration."""

    listeners: tuple[ListenerSettings, ...]
    node: NodeSettings = field(default_factory=NodeSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    authorization: AuthorizationSettings = field(default_factory=AuthorizationSettings)
    authentication: tuple[AuthenticatorSettings, ...] = ()
    log: LogSettings = field(default_factory=LogSettings)
    authentication_policy: AuthenticationPolicy = field(default_factory=AuthenticationPolicy)
    sys_topics: SysTopicsSettings = field(default_factory=SysTopicsSettings)
    persistence: PersistenceSettings = field(default_factory=PersistenceSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def store_file(self) -> str:
        """The store's file: ``persistence.file``, or ``store.sqlite3`` in ``node.data_dir``."""
        return self.persistence.file or str(Path(self.node.data_dir) / STORE_FILE_NAME)

    @property
    def allow_anonymous(self) -> bool:
        """Whether clients without username and password are admitted (``auto``: only when no
        authenticator is enabled)."""
        configured = self.authentication_policy.allow_anonymous
        return not self.authenticators() if configured is None else configured

    def authenticators(self) -> tuple[AuthenticatorSettings, ...]:
        """The enabled authenticators, in chain order."""
        return tuple(entry for entry in self.authentication if entry.enable)

    def access_for(self, listener: ListenerSettings) -> AccessSettings:
        """The access rules of a listener: its own when it has them, else the global ones."""
        return listener.access if listener.access is not None else self.access

    def enabled_listeners(self) -> tuple[ListenerSettings, ...]:
        """The listeners to start, in start order."""
        return tuple(listener for listener in self.listeners if listener.enable)


#: Keys that only some listener types accept.
_TYPE_ONLY_KEYS = {"websocket": ("ws", "wss"), "ssl_options": ("ssl", "wss")}

#: The default listeners and their binds; other names must give ``bind``.
DEFAULT_BINDS = {("tcp", "default"): "0.0.0.0:1883", ("ws", "default"): "0.0.0.0:8083"}


def default_settings() -> Settings:
    """The embedded default configuration (what ``config/broker.yaml`` documents)."""
    return load_settings({})


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(choices))})"


def _check_mapping(value: Any, path: str, problems: list[ConfigProblem]) -> Mapping[str, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(ConfigProblem(path, f"expected a mapping of keys, got {value!r}"))
        return None
    return value


def _build(
    cls: type[T],
    raw: Any,
    path: str,
    problems: list[ConfigProblem],
    exclude: tuple[str, ...] = (),
    **fixed: Any,
) -> T:
    """Build dataclass ``cls`` from mapping ``raw``, collecting every problem under ``path``.

    ``fixed`` are values not read from ``raw``; ``exclude`` are fields ``raw`` may not set.
    """
    mapping = _check_mapping(raw, path, problems) or {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}  # type: ignore[arg-type]
    settable = [name for name, f in fields.items() if f.metadata and name not in exclude]
    values: dict[str, Any] = dict(fixed)
    for key, value in mapping.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in settable:
            problems.append(ConfigProblem(key_path, f"unknown key{_suggest(str(key), settable)}"))
            continue
        meta = fields[key].metadata
        if "parse" in meta:
            try:
                values[key] = meta["parse"](value)
            except ValueError as exc:
                problems.append(ConfigProblem(key_path, str(exc)))
        elif "networks" in meta:
            values[key] = _parse_networks_into(value, key_path, problems)
        elif "rules" in meta:
            values[key] = _parse_rules_into(value, key_path, problems)
        elif "sources" in meta:
            values[key] = _parse_sources_into(value, key_path, problems)
        elif "section" in meta:
            values[key] = _build(meta["section"], value, key_path, problems)
    return cls(**values)


def _build_listeners(raw: Any, problems: list[ConfigProblem]) -> tuple[ListenerSettings, ...]:
    """The listeners: the defaults (tcp:default, ws:default) when the file has no ``listeners``
    section; exactly those the section names when it has one (so a file configuring a protected
    listener never also opens an unprotected default one next to it). A listener named
    ``default`` keeps its default bind when the file gives none."""
    named_any = raw is not None
    by_type = _check_mapping(raw, "listeners", problems) or {}
    for type_name in by_type:
        if type_name not in LISTENER_TYPES:
            problems.append(
                ConfigProblem(
                    f"listeners.{type_name}",
                    f"unknown listener type{_suggest(str(type_name), list(LISTENER_TYPES))}",
                )
            )
    listeners = []
    for type_name in LISTENER_TYPES:
        type_path = f"listeners.{type_name}"
        named = dict(_check_mapping(by_type.get(type_name), type_path, problems) or {})
        defaults = {name: bind for (kind, name), bind in DEFAULT_BINDS.items() if kind == type_name}
        started = [n for n in defaults if n in named or not named_any]
        for name in [*started, *(n for n in named if n not in defaults)]:
            path = f"{type_path}.{name}"
            if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]+$", name):
                problems.append(ConfigProblem(path, "a listener name is letters, digits, '_' and '-'"))
                continue
            raw_listener = _check_mapping(named.get(name), path, problems)
            if raw_listener is None:
                continue
            raw_listener = dict(raw_listener)
            exclude = tuple(key for key, types in _TYPE_ONLY_KEYS.items() if type_name not in types)
            for key in exclude:
                if raw_listener.pop(key, None) is not None:
                    only = "/".join(_TYPE_ONLY_KEYS[key])
                    problems.append(ConfigProblem(f"{path}.{key}", f"only {only} listeners have this key"))
            if name in defaults:
                raw_listener.setdefault("bind", defaults[name])
            elif "bind" not in raw_listener:
                problems.append(
                    ConfigProblem(f"{path}.bind", "required for a listener (e.g. '0.0.0.0:1883')")
                )
            fixed: dict[str, Any] = {"type": type_name, "name": name}
            if type_name in ("ws", "wss") and "websocket" not in raw_listener:
                fixed["websocket"] = WebSocketOptions()
            if type_name in ("ssl", "wss") and "ssl_options" not in raw_listener:
                problems.append(
                    ConfigProblem(f"{path}.ssl_options", "required: certfile and keyfile at least")
                )
            listeners.append(_build(ListenerSettings, raw_listener, path, problems, exclude, **fixed))
    _check_listener_rules(listeners, problems)
    return tuple(listeners)


def _check_listener_rules(listeners: list[ListenerSettings], problems: list[ConfigProblem]) -> None:
    """Rules that span several keys or several listeners."""
    seen: list[ListenerSettings] = []
    for listener in listeners:
        path = f"listeners.{listener.type}.{listener.name}"
        if listener.proxy_protocol is ProxyProtocolMode.OPTIONAL and not listener.trusted_proxies:
            problems.append(
                ConfigProblem(
                    f"{path}.trusted_proxies",
                    "required with proxy_protocol: optional (a header is honoured only from these proxies)",
                )
            )
        websocket = listener.websocket
        if websocket is not None and websocket.proxy_port_header and not websocket.proxy_address_header:
            problems.append(
                ConfigProblem(
                    f"{path}.websocket.proxy_port_header",
                    "needs proxy_address_header (the port is taken from the same hop as the address)",
                )
            )
        _check_tls_rules(listener, path, problems)
        if not listener.enable or listener.bind.port == 0:
            continue
        for other in seen:
            same_family = (":" in listener.bind.host) == (":" in other.bind.host)
            overlap = listener.bind.host == other.bind.host or (
                same_family and (listener.bind.is_wildcard or other.bind.is_wildcard)
            )
            if listener.bind.port == other.bind.port and overlap:
                problems.append(
                    ConfigProblem(
                        f"{path}.bind",
                        f"{listener.bind} is already used by listeners.{other.type}.{other.name}",
                    )
                )
        seen.append(listener)


def _check_tls_rules(listener: ListenerSettings, path: str, problems: list[ConfigProblem]) -> None:
    options = listener.ssl_options
    if options is not None:
        where = f"{path}.ssl_options"
        if not options.certfile or not options.keyfile:
            problems.append(ConfigProblem(where, "certfile and keyfile are required"))
        elif options.verify and not options.cacertfile:
            problems.append(ConfigProblem(f"{where}.cacertfile", "required with verify: verify_peer"))
        elif options.fail_if_no_peer_cert and not options.verify:
            problems.append(ConfigProblem(f"{where}.fail_if_no_peer_cert", "needs verify: verify_peer"))
        elif listener.enable:
            try:
                context_from(options)
            except ValueError as exc:
                problems.append(ConfigProblem(where, str(exc)))
    if listener.peer_cert_as_username:
        key = f"{path}.peer_cert_as_username"
        if options is not None and not options.verify:
            problems.append(
                ConfigProblem(key, "needs ssl_options.verify: verify_peer (an unverified CN proves nothing)")
            )
        if options is None and (
            listener.proxy_protocol is ProxyProtocolMode.OFF or not listener.trusted_proxies
        ):
            problems.append(
                ConfigProblem(
                    key,
                    "on a listener without TLS it reads the PROXY v2 SSL TLV: needs proxy_protocol and "
                    "trusted_proxies (only the proxies that terminate TLS may name a certificate)",
                )
            )


_SECTIONS = (
    "listeners",
    "node",
    "mqtt",
    "admin",
    "access",
    "audit",
    "authentication",
    "authentication_policy",
    "authorization",
    "log",
    "sys_topics",
    "persistence",
    "cluster",
)


def load_settings(raw: Any, source: str = "") -> Settings:
    """Validate a parsed YAML document and merge it over the defaults.

    Raises:
        ConfigError: with every problem found, each with its path.
    """
    problems: list[ConfigProblem] = []
    document = _check_mapping(raw, "", problems) or {}
    for key in document:
        if key not in _SECTIONS:
            problems.append(ConfigProblem(str(key), f"unknown section{_suggest(str(key), list(_SECTIONS))}"))
    listeners = _build_listeners(document.get("listeners"), problems)
    node = _build(NodeSettings, document.get("node"), "node", problems)
    mqtt = _build(MqttSettings, document.get("mqtt"), "mqtt", problems)
    admin = _build(AdminSettings, document.get("admin"), "admin", problems)
    access = _build(AccessSettings, document.get("access"), "access", problems)
    audit = _build(AuditSettings, document.get("audit"), "audit", problems)
    authorization = _build(AuthorizationSettings, document.get("authorization"), "authorization", problems)
    authentication = _parse_authentication_into(document.get("authentication"), "authentication", problems)
    log = _build(LogSettings, document.get("log"), "log", problems)
    sys_topics = _build(SysTopicsSettings, document.get("sys_topics"), "sys_topics", problems)
    persistence = _build(PersistenceSettings, document.get("persistence"), "persistence", problems)
    cluster = _build(ClusterSettings, document.get("cluster"), "cluster", problems)
    if cluster.enable and cluster.node_timeout <= 2 * cluster.heartbeat_interval:
        problems.append(
            ConfigProblem(
                "cluster.node_timeout",
                "must be more than twice cluster.heartbeat_interval (a node would seem gone between beats)",
            )
        )
    policy_raw = document.get("authentication_policy")
    policy = _build(AuthenticationPolicy, policy_raw, "authentication_policy", problems)
    if admin.listen.is_tcp and len(admin.token) < MIN_TOKEN_LENGTH:
        problems.append(
            ConfigProblem(
                "admin.token",
                f"required, at least {MIN_TOKEN_LENGTH} characters, when admin.listen is a TCP address",
            )
        )
    if problems:
        raise ConfigError(problems, source)
    return Settings(
        listeners=listeners,
        node=node,
        mqtt=mqtt,
        admin=admin,
        access=access,
        audit=audit,
        authorization=authorization,
        authentication=authentication,
        authentication_policy=policy,
        log=log,
        sys_topics=sys_topics,
        persistence=persistence,
        cluster=cluster,
    )


def load_settings_file(path: str | Path) -> Settings:
    """Read, parse and validate a YAML file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or has invalid settings.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc.strerror}")], source) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem("", "the file is not UTF-8 text")], source) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem("", f"{where}not valid YAML: {problem}")], source) from None
    return load_settings(raw, source)


def _dump_dataclass(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if "dump" in f.metadata:
            out[f.name] = f.metadata["dump"](value)
        elif isinstance(value, Networks):
            out[f.name] = [str(network) for network in value]
        elif f.metadata.get("rules"):
            out[f.name] = [_dump_rule(rule) for rule in value]
        elif f.metadata.get("sources"):
            out[f.name] = [{"type": "http", **_dump_dataclass(source)} for source in value]
        elif dataclasses.is_dataclass(value):
            out[f.name] = _dump_dataclass(value)
        # None-valued optional sections (a tcp listener's websocket, an unset access) are left out.
    return out


def _dump_rule(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"permission": rule.permission, "action": rule.action, "topics": list(rule.topics)}
    for key in ("clientid", "username"):
        if getattr(rule, key) is not None:
            out[key] = getattr(rule, key)
    if rule.ipaddress is not None:
        out["ipaddress"] = [str(network) for network in rule.ipaddress]
    return out


def dump_settings(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain YAML-ready data (what ``check-config`` prints)."""
    listeners: dict[str, dict[str, Any]] = {}
    for listener in settings.listeners:
        entry = _dump_dataclass(listener, skip=("type", "name"))
        listeners.setdefault(listener.type, {})[listener.name] = entry
    return {
        "listeners": listeners,
        "node": _dump_dataclass(settings.node),
        "mqtt": _dump_dataclass(settings.mqtt),
        "admin": _dump_dataclass(settings.admin),
        "access": _dump_dataclass(settings.access),
        "audit": _dump_dataclass(settings.audit),
        "authentication": [_dump_authenticator(entry) for entry in settings.authentication],
        "authentication_policy": _dump_dataclass(settings.authentication_policy),
        "authorization": _dump_dataclass(settings.authorization),
        "log": _dump_dataclass(settings.log),
        "sys_topics": _dump_dataclass(settings.sys_topics),
        "persistence": _dump_dataclass(settings.persistence),
        "cluster": _dump_dataclass(settings.cluster),
    }


def _dump_authenticator(entry: AuthenticatorSettings) -> dict[str, Any]:
    mechanism, backend = AUTHENTICATOR_KINDS[type(entry)]
    head = {"mechanism": mechanism, **({"backend": backend} if backend else {})}
    return {**head, **_dump_dataclass(entry)}
