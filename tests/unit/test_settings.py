"""Settings: value parsers, strict validation with paths, defaults == config/broker.yaml."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from broker.errors import ConfigError
from broker.settings import (
    UNLIMITED,
    AmqttPluginSettings,
    Bind,
    BuiltinDatabaseSettings,
    HttpAuthSettings,
    JwtSettings,
    PasswordFileSettings,
    ProxyProtocolMode,
    Rate,
    ScramSettings,
    default_settings,
    dump_settings,
    format_duration,
    load_settings,
    load_settings_file,
    parse_bind,
    parse_duration,
    parse_rate,
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
            {"listeners": {"tcp": {"default": {}, "second": {"bind": "127.0.0.1:1883"}}}},
            "listeners.tcp.second.bind: 127.0.0.1:1883 is already used by listeners.tcp.default",
        ),
        (
            {"listeners": {"tcp": {"default": {}}, "ws": {"default": {"bind": "0.0.0.0:1883"}}}},
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
        "tcp:default", "tcp:second", "tcp:v6", "tcp:any", "tcp:other",
    ]  # fmt: skip


def test_a_file_is_merged_over_the_defaults_but_its_listeners_replace_them() -> None:
    settings = load_settings({"listeners": {"tcp": {"default": {"bind": "127.0.0.1:1999"}}}})
    (tcp,) = settings.listeners  # no ws:default on 0.0.0.0:8083 beside it
    assert (tcp.bind, tcp.proxy_protocol, tcp.enable) == (
        Bind("127.0.0.1", 1999),
        ProxyProtocolMode.OFF,
        True,
    )
    assert [listener.id for listener in load_settings({"mqtt": {}}).listeners] == [
        "tcp:default",
        "ws:default",
    ]
    named = load_settings(
        {"listeners": {"tcp": {"default": {"proxy_protocol": True}}, "ws": {"x": {"bind": ":9"}}}}
    )
    assert [(listener.id, str(listener.bind)) for listener in named.listeners] == [
        ("tcp:default", "0.0.0.0:1883"),  # a listener named default keeps its default bind
        ("ws:x", ":9"),
    ]
    assert load_settings({"listeners": {}}).listeners == ()
    disabled = load_settings({"listeners": {"tcp": {"default": {}}, "ws": {"default": {"enable": False}}}})
    assert [listener.id for listener in disabled.enabled_listeners()] == ["tcp:default"]
    # Everything else still merges: a section keeps the keys the file does not name.
    assert load_settings({"mqtt": {"max_inflight": 8}}).mqtt.max_mqueue_len == 1000


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


# --------------------------------------------------------------------------------------------
# authentication, authentication_policy, authorization.sources/cache, per-address limits
# --------------------------------------------------------------------------------------------

KINDS = (
    "password_based/built_in_database, password_based/password_file, password_based/http, jwt, "
    "scram/built_in_database, amqtt_plugin"
)

#: One of every authenticator, every key set away from its default where it has one.
EVERY_AUTHENTICATOR: list[dict[str, Any]] = [
    {"mechanism": "password_based", "backend": "built_in_database", "password_hash_algorithm": "bcrypt"},
    {"mechanism": "password_based", "backend": "password_file", "path": "/etc/mqtt/passwd"},
    {
        "mechanism": "password_based",
        "backend": "http",
        "method": "get",
        "url": "https://auth.example:8443/mqtt?client=${clientid}",
        "headers": {"X-Peer": "${peerhost}"},
        "body": {"u": "${username}", "p": "${password}", "via": "${proxy_peerhost}"},
        "request_timeout": "2s",
        "pool_size": 4,
    },
    {
        "mechanism": "jwt",
        "algorithm": "public-key",
        "public_key": "/etc/mqtt/jwt.pem",
        "token_from": "username",
        "verify_claims": {"sub": "${username}", "cid": "${clientid}"},
    },
    {"mechanism": "scram", "backend": "built_in_database", "algorithm": "sha512", "iteration_count": 8192},
    {
        "mechanism": "amqtt_plugin",
        "plugin": "my_plugins.auth.FilePlugin",
        "config": {"file": "/x", "nested": {"a": [1, 2]}},
        "enable": False,
    },
]

EVERY_CLASS = (
    BuiltinDatabaseSettings,
    PasswordFileSettings,
    HttpAuthSettings,
    JwtSettings,
    ScramSettings,
    AmqttPluginSettings,
)


def test_every_authenticator_is_read_in_chain_order() -> None:
    settings = load_settings({"authentication": EVERY_AUTHENTICATOR})
    assert tuple(type(entry) for entry in settings.authentication) == EVERY_CLASS
    builtin, password_file, http, jwt, scram, plugin = settings.authentication
    assert isinstance(builtin, BuiltinDatabaseSettings) and builtin.password_hash_algorithm == "bcrypt"
    assert isinstance(password_file, PasswordFileSettings) and password_file.path == "/etc/mqtt/passwd"
    assert isinstance(http, HttpAuthSettings)
    assert (http.method, http.request_timeout, http.pool_size) == ("get", 2.0, 4)
    assert http.headers == {"X-Peer": "${peerhost}"}  # replaces the default headers
    assert isinstance(jwt, JwtSettings)
    assert (jwt.algorithm, jwt.public_key, jwt.token_from) == ("public-key", "/etc/mqtt/jwt.pem", "username")
    assert isinstance(scram, ScramSettings) and (scram.algorithm, scram.iteration_count) == ("sha512", 8192)
    assert isinstance(plugin, AmqttPluginSettings) and plugin.config == {
        "file": "/x",
        "nested": {"a": [1, 2]},
    }
    assert plugin.enable is False
    assert [type(entry) for entry in settings.authenticators()] == list(EVERY_CLASS[:-1])


@pytest.mark.parametrize(
    ("entry", "cls", "values"),
    [
        (
            {"mechanism": "password_based", "backend": "built_in_database"},
            BuiltinDatabaseSettings,
            {"enable": True, "password_hash_algorithm": "argon2id"},
        ),
        (
            {"mechanism": "password_based", "backend": "http", "url": "http://127.0.0.1:8080/auth"},
            HttpAuthSettings,
            {"method": "post", "headers": {"content-type": "application/json"}, "request_timeout": 5.0},
        ),
        (
            {"mechanism": "jwt", "secret": "s"},
            JwtSettings,
            {"algorithm": "hmac-based", "secret_base64_encoded": False, "token_from": "password"},
        ),
        (
            {"mechanism": "jwt", "backend": "", "secret": "s"},
            JwtSettings,
            {"secret": "s"},
        ),
        (
            {"mechanism": "scram", "backend": "built_in_database"},
            ScramSettings,
            {"algorithm": "sha256", "iteration_count": 4096},
        ),
        (
            {"mechanism": "amqtt_plugin", "plugin": "a.B", "config": None},
            AmqttPluginSettings,
            {"config": {}},
        ),
    ],
)
def test_authenticator_defaults(entry: dict[str, Any], cls: type, values: dict[str, Any]) -> None:
    (built,) = load_settings({"authentication": [entry]}).authentication
    assert type(built) is cls
    assert {key: getattr(built, key) for key in values} == values


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({}, ["authentication: expected a list of authenticators, got {}"]),
        (["jwt"], ["authentication[0]: expected a mapping with 'mechanism', got 'jwt'"]),
        (
            [{"mechanism": "ldap"}],
            [f"authentication[0]: mechanism 'ldap' backend '' is not one of: {KINDS}"],
        ),
        (
            [{"mechanism": "password_based"}],
            [f"authentication[0]: mechanism 'password_based' backend '' is not one of: {KINDS}"],
        ),
        (
            [{"backend": "http", "url": "http://h/"}],
            [f"authentication[0]: mechanism None backend 'http' is not one of: {KINDS}"],
        ),
        (
            [{"mechanism": "jwt", "backend": "built_in_database", "secret": "s"}],
            [f"authentication[0]: mechanism 'jwt' backend 'built_in_database' is not one of: {KINDS}"],
        ),
        (
            [{"mechanism": "password_based", "backend": "password_file"}],
            ["authentication[0].path: required"],
        ),
        (
            [{"mechanism": "password_based", "backend": "password_file", "pth": "/p"}],
            ["authentication[0].pth: unknown key (did you mean 'path'?)", "authentication[0].path: required"],
        ),
        (
            [{"mechanism": "password_based", "backend": "password_file", "path": ""}],
            ["authentication[0].path: '' is not a non-empty string"],
        ),
        (
            [{"mechanism": "password_based", "backend": "http"}],
            ["authentication[0].url: is required (e.g. 'http://127.0.0.1:8080/auth')"],
        ),
        (
            [{"mechanism": "password_based", "backend": "http", "url": "ftp://h/"}],
            [
                "authentication[0].url: 'ftp://h/' is not an http:// or https:// URL "
                "(e.g. 'http://127.0.0.1:8080/auth')",
                "authentication[0].url: is required (e.g. 'http://127.0.0.1:8080/auth')",
            ],
        ),
        (
            [{"mechanism": "password_based", "backend": "http", "url": "http://h/", "method": "put"}],
            ["authentication[0].method: 'put' is not one of get, post"],
        ),
        ([{"mechanism": "amqtt_plugin"}], ["authentication[0].plugin: required"]),
        (
            [{"mechanism": "amqtt_plugin", "plugin": "Plugin"}],
            ["authentication[0].plugin: 'Plugin' is not a dotted path (e.g. 'package.module.PluginClass')"],
        ),
        (
            [{"mechanism": "amqtt_plugin", "plugin": "a.B", "config": []}],
            ["authentication[0].config: [] is not a mapping"],
        ),
        ([{"mechanism": "jwt"}], ["authentication[0].secret: required with algorithm: hmac-based"]),
        (
            [{"mechanism": "jwt", "algorithm": "public-key", "secret": "s"}],
            ["authentication[0].public_key: required with algorithm: public-key"],
        ),
        (
            [{"mechanism": "jwt", "algorithm": "rsa", "secret": "s"}],
            ["authentication[0].algorithm: 'rsa' is not one of hmac-based, public-key"],
        ),
        (
            [{"mechanism": "jwt", "secert": "s"}],
            ["authentication[0].secert: unknown key (did you mean 'secret'?)"],
        ),
        (
            [{"mechanism": "jwt", "secret": "s", "verify_claims": {"sub": "${peerhost}"}}],
            [
                "authentication[0].verify_claims.sub: unknown placeholder ${peerhost} "
                "(known: ${clientid}, ${username})"
            ],
        ),
        (
            [{"mechanism": "scram", "backend": "built_in_database", "iteration_count": 1000}],
            ["authentication[0].iteration_count: 1000 is not a whole number from 4096 to 10000000"],
        ),
        (
            [
                {"mechanism": "password_based", "backend": "built_in_database", "enable": False},
                {"mechanism": "jwt", "secret": "s"},
                {"mechanism": "password_based", "backend": "built_in_database"},
            ],
            ["authentication[2]: the built-in database is already in the chain"],
        ),
    ],
)
def test_authentication_problems(entries: Any, expected: list[str]) -> None:
    assert problems({"authentication": entries}) == expected


def test_placeholder_problems_are_reported_with_their_paths() -> None:
    found = problems(
        {
            "authentication": [
                {"mechanism": "jwt", "secret": "s"},
                {
                    "mechanism": "password_based",
                    "backend": "http",
                    "url": "http://${peerhost}/auth",
                    "headers": {"X-Id": "${clientid", "Bad Name": "x"},
                    "body": {"a": "${nope}", "${clientid}": "x"},
                },
            ],
            "authorization": {
                "sources": [
                    {"type": "http", "url": "http://127.0.0.1/acl?p=${password}"},
                    {"type": "http", "url": "http://127.0.0.1/acl/${topic}", "body": {"q": "${qos}"}},
                    {"url": "http://127.0.0.1/acl"},
                    {"type": "http"},
                ]
            },
        }
    )
    auth_known = (
        "${cert_common_name}, ${clientid}, ${listener}, ${password}, ${peerhost}, ${peerport}, "
        "${proto_ver}, ${proxy_peerhost}, ${username}"
    )
    authz_known = (
        "${action}, ${cert_common_name}, ${clientid}, ${listener}, ${peerhost}, ${peerport}, "
        "${proto_ver}, ${proxy_peerhost}, ${qos}, ${topic}, ${username}"
    )
    assert found == [
        "authorization.sources[0].url: unknown placeholder ${password} (known: " + authz_known + ")",
        "authorization.sources[2].type: a source is {type: http, url: ...}",
        "authorization.sources[3].url: is required (e.g. 'http://127.0.0.1:8080/auth')",
        "authentication[1].url: placeholders may stand in the path and query of the URL only, "
        "not in its scheme or host",
        "authentication[1].headers.X-Id: '${' without a closing '}' (placeholders are written ${name})",
        "authentication[1].headers.Bad Name: 'Bad Name' is not an HTTP header name",
        "authentication[1].body.a: unknown placeholder ${nope} (known: " + auth_known + ")",
        "authentication[1].body.${clientid}: placeholders may stand in body values only, not in keys",
    ]


@pytest.mark.parametrize(
    "entry",
    [
        {"mechanism": "password_based", "backend": ["http"]},
        {"mechanism": "jwt", "backend": {"a": 1}, "secret": "s"},
    ],
)
def test_an_unhashable_backend_is_a_config_problem(entry: dict[str, Any]) -> None:
    found = problems({"authentication": [entry]})
    assert len(found) == 1 and found[0].startswith("authentication[0]: mechanism ")


def test_an_unhashable_tls_version_is_a_config_problem() -> None:
    found = problems(
        {
            "listeners": {
                "ssl": {
                    "s": {
                        "bind": ":8883",
                        "ssl_options": {"certfile": "c", "keyfile": "k", "versions": [["x"]]},
                    }
                }
            }
        }
    )
    assert any("ssl_options.versions: [['x']] is not a non-empty list of" in problem for problem in found)


@pytest.mark.parametrize(
    ("allow_anonymous", "authentication", "configured", "effective"),
    [
        ("auto", [], None, True),
        ("auto", [{"mechanism": "jwt", "secret": "s"}], None, False),
        ("auto", [{"mechanism": "jwt", "secret": "s", "enable": False}], None, True),  # none enabled
        (True, [{"mechanism": "jwt", "secret": "s"}], True, True),
        (False, [], False, False),
        (False, [{"mechanism": "jwt", "secret": "s"}], False, False),
        (None, [], None, True),  # not given: auto
    ],
)
def test_allow_anonymous(
    allow_anonymous: Any, authentication: list[dict[str, Any]], configured: bool | None, effective: bool
) -> None:
    policy = {} if allow_anonymous is None else {"allow_anonymous": allow_anonymous}
    settings = load_settings({"authentication": authentication, "authentication_policy": policy})
    assert settings.authentication_policy.allow_anonymous is configured
    assert settings.allow_anonymous is effective
    dumped = dump_settings(settings)["authentication_policy"]["allow_anonymous"]
    assert dumped == ("auto" if configured is None else configured)


def test_failure_ban_values() -> None:
    default = default_settings().authentication_policy.failure_ban
    assert (default.enable, default.max_count, default.window_time, default.ban_time) == (
        True,
        10,
        60.0,
        300.0,
    )
    ban = load_settings(
        {
            "authentication_policy": {
                "failure_ban": {"enable": False, "max_count": 3, "window_time": "10s", "ban_time": "1h"}
            }
        }
    ).authentication_policy.failure_ban
    assert (ban.enable, ban.max_count, ban.window_time, ban.ban_time) == (False, 3, 10.0, 3600.0)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            {"allow_anonymous": "yes"},
            "authentication_policy.allow_anonymous: 'yes' is not auto, true or false",
        ),
        (
            {"failure_ban": {"max_count": 0}},
            "failure_ban.max_count: 0 is not a whole number from 1 to 1000000",
        ),
        ({"failure_ban": {"window_time": 60}}, "failure_ban.window_time: 60 is not a duration"),
        ({"failure_ban": {"ban_time": "forever"}}, "failure_ban.ban_time: 'forever' is not a duration"),
        ({"failure_ban": {"enable": "no"}}, "failure_ban.enable: 'no' is not true or false"),
        (
            {"failure_ban": {"max_counts": 3}},
            "failure_ban.max_counts: unknown key (did you mean 'max_count'?)",
        ),
        ({"allow_anonymus": True}, "allow_anonymus: unknown key (did you mean 'allow_anonymous'?)"),
    ],
)
def test_authentication_policy_problems(policy: dict[str, Any], expected: str) -> None:
    assert any(expected in problem for problem in problems({"authentication_policy": policy})), problems(
        {"authentication_policy": policy}
    )


def test_authorization_sources_and_cache() -> None:
    authorization = load_settings(
        {
            "authorization": {
                "sources": [
                    {"type": "http", "url": "http://127.0.0.1:8080/acl/${action}?t=${topic}&q=${qos}"},
                    {"type": "http", "url": "https://acl.example/x", "method": "get", "enable": False},
                ],
                "cache": {"enable": False, "max_size": 5, "ttl": "5m"},
            }
        }
    ).authorization
    first, second = authorization.sources
    assert (first.url, first.method, first.enable) == (
        "http://127.0.0.1:8080/acl/${action}?t=${topic}&q=${qos}",
        "post",
        True,
    )
    assert (second.method, second.enable) == ("get", False)
    assert (authorization.cache.enable, authorization.cache.max_size, authorization.cache.ttl) == (
        False,
        5,
        300.0,
    )
    default = default_settings().authorization
    assert default.sources == ()
    assert (default.cache.enable, default.cache.max_size, default.cache.ttl) == (True, 32, 60.0)


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ({"sources": {}}, "authorization.sources: expected a list of sources, got {}"),
        (
            {"sources": [{"type": "mysql"}]},
            "authorization.sources[0].type: a source is {type: http, url: ...}",
        ),
        (
            {"sources": [{"type": "http", "url": "http://h/", "timeout": "1s"}]},
            "sources[0].timeout: unknown key",
        ),
        (
            {"cache": {"max_size": 0}},
            "authorization.cache.max_size: 0 is not a whole number from 1 to 100000",
        ),
        ({"cache": {"ttl": 60}}, "authorization.cache.ttl: 60 is not a duration"),
        ({"cache": {"size": 1}}, "authorization.cache.size: unknown key (did you mean 'max_size'?)"),
        (
            {"cache": {"expiry": 1}},
            "authorization.cache.expiry: unknown key (known keys: enable, max_size, ttl)",
        ),
        ({"cache": {"enable": "yes"}}, "authorization.cache.enable: 'yes' is not true or false"),
    ],
)
def test_authorization_problems(authorization: dict[str, Any], expected: str) -> None:
    found = problems({"authorization": authorization})
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("10/s", Rate(10, 1.0)),
        ("100/m", Rate(100, 60.0)),
        ("5/10s", Rate(5, 10.0)),
        ("1/h", Rate(1, 3600.0)),
        ("2/d", Rate(2, 86400.0)),
        ("3/500ms", Rate(3, 0.5)),
        (" 10 / s ", Rate(10, 1.0)),
        ("infinity", None),
    ],
)
def test_rates(value: str, rate: Rate | None) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0/s", "is not a rate"),
        ("10", "is not a rate"),
        ("x/s", "is not a rate"),
        ("-1/s", "is not a rate"),
        ("/s", "is not a rate"),
        ("10/parsec", "'parsec' is not a period"),
        ("10/", "'' is not a period"),
        ("10/-1s", "is not a period"),
        ("10/0s", "the period must be longer than 0"),
        (10, "is not a rate"),
        (None, "is not a rate"),
        (True, "is not a rate"),
        (["10/s"], "is not a rate"),
    ],
)
def test_bad_rates(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(value)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(10, 1.0), "10/s"),
        (Rate(100, 60.0), "100/m"),
        (Rate(5, 10.0), "5/10s"),
        (Rate(1, 3600.0), "1/h"),
        (Rate(1, 86400.0), "1/d"),
        (Rate(3, 0.5), "3/500ms"),
        (Rate(1, 0.001), "1/ms"),
        (Rate(7, 1.5), "7/1500ms"),
        (Rate(2, 7200.0), "2/2h"),
        (Rate(4, 15.0), "4/15s"),
        (Rate(4, 100.0), "4/100s"),
    ],
)
def test_rate_str_round_trips(rate: Rate, text: str) -> None:
    assert str(rate) == text
    assert parse_rate(str(rate)) == rate


def test_per_address_limits_of_a_listener() -> None:
    settings = load_settings(
        {
            "listeners": {
                "tcp": {"default": {"max_connections_per_ip": 3, "max_conn_rate_per_ip": "5/10s"}},
                "ws": {"default": {}},
            }
        }
    )
    tcp, ws = settings.listeners
    assert (tcp.max_connections_per_ip, tcp.max_conn_rate_per_ip) == (3, Rate(5, 10.0))
    assert (ws.max_connections_per_ip, ws.max_conn_rate_per_ip) == (UNLIMITED, None)  # the defaults
    dumped = dump_settings(settings)["listeners"]
    assert (
        dumped["tcp"]["default"]["max_connections_per_ip"],
        dumped["tcp"]["default"]["max_conn_rate_per_ip"],
    ) == (3, "5/10s")
    assert (
        dumped["ws"]["default"]["max_connections_per_ip"],
        dumped["ws"]["default"]["max_conn_rate_per_ip"],
    ) == (
        "infinity",
        "infinity",
    )
    assert problems(
        {"listeners": {"tcp": {"default": {"max_connections_per_ip": 0, "max_conn_rate_per_ip": "10"}}}}
    ) == [
        "listeners.tcp.default.max_connections_per_ip: 0 is not a positive integer or 'infinity'",
        "listeners.tcp.default.max_conn_rate_per_ip: '10' is not a rate (e.g. '10/s', '100/m') or 'infinity'",
    ]


def test_dump_masks_the_jwt_secret_and_authorization_headers() -> None:
    settings = load_settings(
        {
            "authentication": [
                {"mechanism": "jwt", "secret": "hunter2-jwt-secret"},
                {
                    "mechanism": "password_based",
                    "backend": "http",
                    "url": "http://h/auth",
                    "headers": {
                        "Authorization": "Bearer abc",
                        "X-Api-Key": "k",
                        "Cookie": "c",
                        "X-Plain": "v",
                    },
                },
            ],
            "authorization": {
                "sources": [
                    {"type": "http", "url": "http://h/acl", "headers": {"proxy-authorization": "Basic x"}}
                ]
            },
        }
    )
    dumped = dump_settings(settings)
    jwt, http = dumped["authentication"]
    assert (jwt["mechanism"], jwt["secret"]) == ("jwt", "********")
    assert "backend" not in jwt
    assert http["headers"] == {
        "Authorization": "********",
        "X-Api-Key": "********",
        "Cookie": "********",
        "X-Plain": "v",
    }
    assert dumped["authorization"]["sources"][0]["headers"] == {"proxy-authorization": "********"}
    text = yaml.safe_dump(dumped)
    for secret in ("hunter2-jwt-secret", "Bearer abc", "Basic x"):
        assert secret not in text
    no_secret = load_settings(
        {"authentication": [{"mechanism": "jwt", "algorithm": "public-key", "public_key": "/k"}]}
    )
    assert dump_settings(no_secret)["authentication"][0]["secret"] == ""  # nothing to hide: not a mask


def test_dump_round_trips_with_every_authenticator_and_source() -> None:
    settings = load_settings(
        {
            "authentication": EVERY_AUTHENTICATOR,
            "authentication_policy": {
                "allow_anonymous": False,
                "failure_ban": {"max_count": 5, "window_time": "30s", "ban_time": "2h"},
            },
            "authorization": {
                "rules": [
                    {
                        "permission": "allow",
                        "action": "publish",
                        "topics": ["u/${username}/#"],
                        "username": "bob",
                    }
                ],
                "sources": [
                    {"type": "http", "url": "http://127.0.0.1/acl/${topic}", "body": {"a": "${action}"}}
                ],
                "no_match": "deny",
                "cache": {"max_size": 10, "ttl": "5m"},
            },
            "listeners": {"tcp": {"default": {"max_connections_per_ip": 3, "max_conn_rate_per_ip": "5/10s"}}},
        }
    )
    dumped = dump_settings(settings)
    assert [entry["mechanism"] for entry in dumped["authentication"]] == [
        "password_based", "password_based", "password_based", "jwt", "scram", "amqtt_plugin",
    ]  # fmt: skip
    assert load_settings(yaml.safe_load(yaml.safe_dump(dumped))) == settings


def test_a_masked_dump_is_stable() -> None:
    settings = load_settings(
        {
            "authentication": [
                {"mechanism": "jwt", "secret": "hunter2"},
                {
                    "mechanism": "password_based",
                    "backend": "http",
                    "url": "http://h/",
                    "headers": {"authorization": "x"},
                },
            ]
        }
    )
    dumped = dump_settings(settings)
    # Secrets are masked, so loading a dump gives the mask as the secret; dumping again is the same.
    assert dump_settings(load_settings(dumped)) == dumped
