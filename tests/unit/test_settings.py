"""Settings: value parsers, strict validation with paths, defaults == config/broker.yaml."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from broker.errors import ConfigError
from broker.settings import (
    Bind,
    ProxyProtocolMode,
    default_settings,
    dump_settings,
    format_duration,
    load_settings,
    load_settings_file,
    parse_bind,
    parse_duration,
)
from tests.support import REPO


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3s", 3.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        (" 15s ", 15.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", [15, "15", "s", "-1s", "1 sec", "", None, True, "1e3s"])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("value", "bind"),
    [
        ("0.0.0.0:1883", Bind("0.0.0.0", 1883)),
        ("127.0.0.1:0", Bind("127.0.0.1", 0)),
        ("[::]:8083", Bind("::", 8083)),
        ("[::1]:1", Bind("::1", 1)),
        (":1883", Bind("", 1883)),
        (1883, Bind("", 1883)),
    ],
)
def test_binds(value: Any, bind: Bind) -> None:
    assert parse_bind(value) == bind


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.2.3.4", "has no port"),
        ("1.2.3.4:65536", "not a number from 0 to 65535"),
        ("1.2.3.4:-1", "not a number from 0 to 65535"),
        ("localhost:1883", "is not an IPv4 address"),
        ("::1:1883", "write an IPv6 bind address in brackets"),
        ("[1.2.3.4]:1883", "is not an IPv6 address"),
        ("[::1]1883", "expected '[IPv6]:PORT'"),
        ("1.2.3.256:1", "is not an IPv4 address"),
        (True, "is not a bind address"),
        ([1], "is not a bind address"),
    ],
)
def test_bad_binds(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_bind(value)


def problems(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(document)
    return [str(problem) for problem in info.value.problems]


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    found = problems(
        {
            "listners": {},
            "listeners": {
                "tcp": {
                    "default": {
                        "bind": "1.2.3.4",
                        "proxy_protocol_timeout": 3,
                        "trusted_proxies": ["10.0.0.0/8", "10.0.0.300/24", "10.0.0.1/8"],
                        "max_connections": 0,
                        "enable": "yes",
                    },
                    "extra": {},
                },
                "wsx": {},
            },
            "node": {"data_dir": ""},
        }
    )
    assert found == [
        "listners: unknown section (did you mean 'listeners'?)",
        "listeners.wsx: unknown listener type (did you mean 'ws'?)",
        "listeners.tcp.default.bind: '1.2.3.4' has no port (expected 'IP:PORT', e.g. '0.0.0.0:1883')",
        "listeners.tcp.default.proxy_protocol_timeout: 3 is not a duration (write it with a unit, e.g. '15s' or '500ms')",
        "listeners.tcp.default.trusted_proxies[1]: '10.0.0.300/24' is not a network",
        "listeners.tcp.default.trusted_proxies[2]: '10.0.0.1/8' has host bits set",
        "listeners.tcp.default.max_connections: 0 is not a positive integer or 'infinity'",
        "listeners.tcp.default.enable: 'yes' is not true or false",
        "listeners.tcp.extra.bind: required for a listener (e.g. '0.0.0.0:1883')",
        "node.data_dir: '' is not a non-empty string",
    ]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"listeners": {"tcp": {"default": {"websocket": {}}}}},
            "listeners.tcp.default.websocket: only ws/wss listeners",
        ),
        (
            {"listeners": {"ws": {"default": {"websocket": {"mqtt_path": "mqtt"}}}}},
            "mqtt_path: 'mqtt' is not an",
        ),
        ({"listeners": {"ws": {"default": {"websocket": {"path": "/"}}}}}, "websocket.path: unknown key"),
        ({"listeners": {"tcp": {"default": {"trusted_proxies": "10.0.0.0/8"}}}}, "is not a list of networks"),
        ({"listeners": {"tcp": {"bad name": {"bind": ":1"}}}}, "a listener name is letters"),
        ({"listeners": {"tcp": {"default": {"max_connections": True}}}}, "max_connections: True is not"),
        ({"listeners": []}, "listeners: expected a mapping"),
        ([], "expected a mapping of keys, got []"),
        (
            {"listeners": {"tcp": {"second": {"bind": "127.0.0.1:1883"}}}},
            "listeners.tcp.second.bind: 127.0.0.1:1883 is already used by listeners.tcp.default",
        ),
        (
            {"listeners": {"ws": {"default": {"bind": "0.0.0.0:1883"}}}},
            "listeners.ws.default.bind: 0.0.0.0:1883 is already used by listeners.tcp.default",
        ),
        (
            {"listeners": {"tcp": {"default": {"proxy_protocol": "maybe"}}}},
            "proxy_protocol: 'maybe' is not one of false, true, optional",
        ),
    ],
)
def test_single_problems(document: Any, expected: str) -> None:
    assert any(expected in problem for problem in problems(document)), problems(document)


def test_binds_may_share_a_port_on_distinct_addresses_or_families() -> None:
    settings = load_settings(
        {
            "listeners": {
                "tcp": {
                    "default": {"bind": "127.0.0.1:1883"},
                    "second": {"bind": "127.0.0.2:1883"},
                    "v6": {"bind": "[::1]:1883"},
                    "any": {"bind": "127.0.0.1:0"},
                    "other": {"bind": "127.0.0.1:0"},
                }
            }
        }
    )
    assert [listener.id for listener in settings.listeners] == [
        "tcp:default", "tcp:second", "tcp:v6", "tcp:any", "tcp:other", "ws:default",
    ]  # fmt: skip


def test_a_file_is_merged_over_the_defaults() -> None:
    settings = load_settings({"listeners": {"tcp": {"default": {"bind": "127.0.0.1:1999"}}}})
    tcp, ws = settings.listeners
    assert (tcp.bind, tcp.proxy_protocol, tcp.enable) == (
        Bind("127.0.0.1", 1999),
        ProxyProtocolMode.OFF,
        True,
    )
    assert ws.bind == Bind("0.0.0.0", 8083)
    disabled = load_settings({"listeners": {"ws": {"default": {"enable": False}}}})
    assert [listener.id for listener in disabled.enabled_listeners()] == ["tcp:default"]


def test_embedded_default_equals_config_broker_yaml() -> None:
    shipped = load_settings_file(REPO / "config" / "broker.yaml")
    assert shipped == default_settings()
    # And the file names every option, so that it documents them all.
    assert yaml.safe_load((REPO / "config" / "broker.yaml").read_text()) == dump_settings(default_settings())


def test_dump_round_trips() -> None:
    settings = load_settings(
        {"listeners": {"tcp": {"default": {"trusted_proxies": ["10.0.0.0/8", "::1"], "max_connections": 5}}}}
    )
    assert load_settings(dump_settings(settings)) == settings


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"listeners: [", "line 1, column 13: not valid YAML"),
        (b"\xff", "the file is not UTF-8 text"),
        (b"- a\n- b\n", "expected a mapping of keys"),
    ],
)
def test_unreadable_files(tmp_path: Any, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_settings_file(path)


def test_missing_file(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_settings_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("entry", "ip", "contains"),
    [
        ("::ffff:203.0.113.0/120", "203.0.113.7", True),
        ("::ffff:203.0.113.0/120", "::ffff:203.0.113.7", True),
        ("::ffff:203.0.113.0/120", "203.0.114.7", False),
        ("203.0.113.0/24", "::ffff:203.0.113.7", True),
        ("2001:db8::/32", "2001:db8::1", True),
    ],
)
def test_ipv4_mapped_networks_match_ipv4_clients(entry: str, ip: str, contains: bool) -> None:
    from listeners.address import Networks

    assert Networks.parse([entry]).contains(ip) is contains


@pytest.mark.parametrize(
    ("value", "size"), [("1MB", 1048576), ("256KB", 262144), (65536, 65536), ("2048", 2048)]
)
def test_sizes(value: Any, size: int) -> None:
    from broker.settings import format_size, parse_size

    assert parse_size(value) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("value", ["1GB", "1 mb", 100, "300MB", True, "x"])
def test_bad_sizes(value: Any) -> None:
    from broker.settings import parse_size

    with pytest.raises(ValueError):
        parse_size(value)


def test_the_admin_token_is_not_printed() -> None:
    settings = load_settings({"admin": {"listen": "127.0.0.1:18083", "token": "a-very-secret-token-123"}})
    assert dump_settings(settings)["admin"] == {"listen": "127.0.0.1:18083", "token": "********"}
