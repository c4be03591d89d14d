"""Topic authorization as pure code: matching, covering, placeholders, rule order."""

from __future__ import annotations

import pytest

from broker.authorization import Authorizer, Rule, filter_covers, topic_matches, valid_filter
from listeners.address import Networks


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),  # [MQTT-4.7.1-2] '#' includes the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),  # [MQTT-4.7.2-1]
        ("+/x", "$app/x", False),
        ("$app/#", "$app/x", True),
        ("a/+/c", "a//c", True),
        ("+", "", True),
        ("a/b", "a/B", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(
    ("rule", "requested", "covers"),
    [
        ("secret/#", "secret/keys", True),
        ("secret/#", "secret/+", True),
        ("secret/#", "secret/#", True),
        ("secret/#", "#", False),
        ("secret/+", "secret/#", False),
        ("+/b", "a/b", True),
        ("+/b", "+/b", True),
        ("a/b", "a/+", False),
        ("#", "$SYS/#", False),
        ("$SYS/#", "$SYS/broker/x", True),
    ],
)
def test_filter_covers(rule: str, requested: str, covers: bool) -> None:
    assert filter_covers(rule, requested) is covers


@pytest.mark.parametrize("text", ["a/#/b", "a#", "a/b+", "", "a\0b"])
def test_invalid_filters(text: str) -> None:
    assert not valid_filter(text)


RULES = (
    Rule("deny", "subscribe", ("secret/#",)),
    Rule("allow", "all", ("own/${clientid}/#", "users/${username}")),
    Rule("deny", "all", ("own/#", "users/#")),
    Rule("deny", "publish", ("ro/#",), ipaddress=Networks.parse(["10.0.0.0/8"])),
    Rule("allow", "publish", ("admin/#",), username="root"),
    Rule("deny", "publish", ("admin/#",)),
)


@pytest.mark.parametrize(
    ("action", "topic", "is_filter", "client", "username", "ip", "allowed"),
    [
        ("subscribe", "secret/a", True, "c", None, "1.2.3.4", False),
        ("subscribe", "#", True, "c", None, "1.2.3.4", True),  # not covered: allowed, delivery filtered
        ("subscribe", "secret/a", False, "c", None, "1.2.3.4", False),  # delivery check
        ("publish", "secret/a", False, "c", None, "1.2.3.4", True),
        ("publish", "own/c/x", False, "c", None, "1.2.3.4", True),
        ("publish", "own/d/x", False, "c", None, "1.2.3.4", False),
        ("subscribe", "own/+/x", True, "+", None, "1.2.3.4", False),  # a wildcard client id never widens
        ("publish", "users/bob", False, "c", "bob", "1.2.3.4", True),
        ("publish", "users/bob", False, "c", None, "1.2.3.4", False),
        ("publish", "ro/x", False, "c", None, "10.1.2.3", False),
        ("publish", "ro/x", False, "c", None, "::ffff:10.1.2.3", False),
        ("publish", "ro/x", False, "c", None, "192.0.2.1", True),
        ("publish", "admin/x", False, "c", "root", "1.2.3.4", True),
        ("publish", "admin/x", False, "c", "bob", "1.2.3.4", False),
    ],
)
def test_rules_in_order(
    action: str, topic: str, is_filter: bool, client: str, username: str | None, ip: str, allowed: bool
) -> None:
    assert Authorizer(RULES).allows(action, topic, client, username, ip, is_filter=is_filter) is allowed


def test_no_match() -> None:
    assert Authorizer((), "deny").allows("publish", "x", "c", None, "1.2.3.4") is False
    assert Authorizer((), "allow").active is False
    assert Authorizer((), "deny").active is True


@pytest.mark.parametrize("client_id", ["${username}", "a$b", "x/y", "+", "#"])
def test_a_client_id_cannot_smuggle_a_placeholder_or_widen_a_rule(client_id: str) -> None:
    rule = Rule("allow", "all", ("devices/${clientid}/#",))
    assert rule.filters_for(client_id, "bob") == []
    assert (
        Authorizer((rule,), "deny").allows("publish", "devices/bob/x", client_id, "bob", "1.2.3.4") is False
    )


def test_placeholders_are_filled_in_one_pass() -> None:
    rule = Rule("allow", "all", ("u/${username}/c/${clientid}",))
    assert rule.filters_for("dev1", "bob") == ["u/bob/c/dev1"]
