"""Warnings about valid configurations that may not do what their operator thinks."""

from __future__ import annotations

from typing import Any

import pytest

from broker.advice import config_warnings
from broker.settings import load_settings

JWT: dict[str, Any] = {"mechanism": "jwt", "secret": "s"}

NO_AUTHENTICATOR = (
    "authentication: no authenticator is configured: EVERY client is admitted, and any "
    "client may claim any username (configure authentication, see README 'Authentication')"
)

RULES: list[dict[str, Any]] = [
    {"permission": "allow", "topics": ["public/#"]},  # 0: names nobody
    {"permission": "allow", "topics": ["admin/#"], "username": "root"},  # 1: username
    {"permission": "allow", "topics": ["users/${username}/#"]},  # 2: ${username}
    {"permission": "allow", "topics": ["devices/${clientid}/#"]},  # 3: ${clientid}
    {"permission": "deny", "topics": ["#"], "clientid": "legacy"},  # 4: clientid
    {"permission": "allow", "topics": ["u/${username}/c/${clientid}"]},  # 5: both
    {"permission": "deny", "topics": ["net/#"], "ipaddress": "10.0.0.0/8"},  # 6: an address only
]

USERNAME_RULES = (
    "authorization.rules[1], authorization.rules[2], authorization.rules[5]: rules name usernames but "
    "nothing authenticates them: they never match (a username only counts once an authenticator has "
    "proven it)"
)
CLIENTID_RULES = (
    "authorization.rules[3], authorization.rules[4], authorization.rules[5]: rules name client ids "
    "but nothing authenticates clients: any client may claim any client id"
)
ANONYMOUS = (
    "authentication_policy.allow_anonymous: true: clients sending no username and no password are "
    "admitted without asking the authenticators"
)
NO_FAILURE_BAN = "authentication_policy.failure_ban.enable: false: nothing slows down password guessing"


def warnings_for(document: dict[str, Any]) -> list[str]:
    return config_warnings(load_settings(document))


def test_the_defaults_warn_that_every_client_is_admitted() -> None:
    assert warnings_for({}) == [NO_AUTHENTICATOR]


def test_disabled_authenticators_do_not_count() -> None:
    assert warnings_for({"authentication": [{**JWT, "enable": False}]}) == [NO_AUTHENTICATOR]


def test_rules_naming_usernames_or_client_ids_without_an_authenticator() -> None:
    assert warnings_for({"authorization": {"rules": RULES}}) == [
        NO_AUTHENTICATOR,
        USERNAME_RULES,
        CLIENTID_RULES,
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (RULES[0], []),
        (RULES[6], []),
        (RULES[1], ["authorization.rules[0]: rules name usernames"]),
        (RULES[2], ["authorization.rules[0]: rules name usernames"]),
        (RULES[3], ["authorization.rules[0]: rules name client ids"]),
        (RULES[4], ["authorization.rules[0]: rules name client ids"]),
        (
            RULES[5],
            ["authorization.rules[0]: rules name usernames", "authorization.rules[0]: rules name client ids"],
        ),
    ],
)
def test_each_kind_of_rule(rule: dict[str, Any], expected: list[str]) -> None:
    found = warnings_for({"authorization": {"rules": [rule]}})
    assert found[0] == NO_AUTHENTICATOR
    assert len(found) == 1 + len(expected)
    assert all(warning.startswith(start) for warning, start in zip(found[1:], expected, strict=True))


def test_rules_naming_usernames_are_fine_once_an_authenticator_proves_them() -> None:
    assert warnings_for({"authentication": [JWT], "authorization": {"rules": RULES}}) == []


@pytest.mark.parametrize(
    ("policy", "authentication", "expected"),
    [
        ({"allow_anonymous": True}, [JWT], [ANONYMOUS]),
        ({"allow_anonymous": True}, [], [NO_AUTHENTICATOR]),  # nothing to bypass
        ({"allow_anonymous": "auto"}, [JWT], []),
        ({"allow_anonymous": False}, [JWT], []),
        ({"failure_ban": {"enable": False}}, [JWT], [NO_FAILURE_BAN]),
        ({"failure_ban": {"enable": False}}, [], [NO_AUTHENTICATOR]),  # no password to guess
        ({"allow_anonymous": True, "failure_ban": {"enable": False}}, [JWT], [ANONYMOUS, NO_FAILURE_BAN]),
    ],
)
def test_policy_warnings(
    policy: dict[str, Any], authentication: list[dict[str, Any]], expected: list[str]
) -> None:
    assert warnings_for({"authentication": authentication, "authentication_policy": policy}) == expected


def test_a_well_configured_broker_has_no_warning() -> None:
    document = {
        "authentication": [
            {"mechanism": "password_based", "backend": "built_in_database"},
            {"mechanism": "password_based", "backend": "http", "url": "http://127.0.0.1:8080/auth"},
        ],
        "authentication_policy": {"allow_anonymous": False, "failure_ban": {"max_count": 5}},
        "authorization": {"rules": RULES, "no_match": "deny"},
    }
    assert warnings_for(document) == []


LEFTMOST = "listeners.ws.edge.websocket.proxy_address_header: X-Forwarded-For is read from anyone"
ANY_PEER = "listeners.tcp.pp: proxy_protocol: true with no trusted_proxies"
WILDCARD_ADMIN = "admin.listen: 0.0.0.0:18083: the admin API"
WEAK_TOKEN = "admin.token: fewer than 8 distinct characters"
NO_LISTENER = "listeners: no listener is enabled"
JWT_AUTH = [{"mechanism": "jwt", "secret": "s"}]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"listeners": {"tcp": {"pp": {"bind": ":1884", "proxy_protocol": True}}}}, [ANY_PEER]),
        (
            {
                "listeners": {
                    "tcp": {"pp": {"bind": ":1884", "proxy_protocol": True, "trusted_proxies": ["10.0.0.2"]}}
                }
            },
            [],
        ),
        (
            {"listeners": {"tcp": {"pp": {"bind": ":1884", "proxy_protocol": True, "enable": False}}}},
            [NO_LISTENER],
        ),
        (
            {
                "listeners": {
                    "ws": {
                        "edge": {"bind": ":8083", "websocket": {"proxy_address_header": "X-Forwarded-For"}}
                    }
                }
            },
            [LEFTMOST],
        ),
        (
            {
                "listeners": {
                    "ws": {
                        "edge": {
                            "bind": ":8083",
                            "trusted_proxies": ["10.0.0.2"],
                            "websocket": {"proxy_address_header": "X-Forwarded-For"},
                        }
                    }
                }
            },
            [],
        ),
        ({"admin": {"listen": "0.0.0.0:18083", "token": "0123456789abcdef"}}, [WILDCARD_ADMIN]),
        ({"admin": {"listen": "127.0.0.1:18083", "token": "aaaaaaaaaaaaaaaa"}}, [WEAK_TOKEN]),
        ({"admin": {"listen": "127.0.0.1:18083", "token": "0123456789abcdef"}}, []),
        ({"admin": {"listen": "unix:data/admin.sock"}}, []),
    ],
)
def test_listener_and_admin_warnings(document: dict[str, Any], expected: list[str]) -> None:
    found = config_warnings(load_settings({**document, "authentication": JWT_AUTH}))
    assert len(found) == len(expected), found
    for warning, start in zip(found, expected, strict=True):
        assert warning.startswith(start), warning
