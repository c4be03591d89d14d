"""Topic authorization as pure code: matching, covering, placeholders, rule order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from broker import authorization
from broker.authorization import Authorizer, ClientRules, Rule, filter_covers, topic_matches, valid_filter
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


class Clock:
    """``time.monotonic`` for broker.authorization, moved by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(authorization, "time", SimpleNamespace(monotonic=fake))
    return fake


def with_sources(
    rules: tuple[Rule, ...] = (),
    no_match: str = "allow",
    *,
    cache_size: int = 32,
    cache_ttl: float = 60.0,
    cache_enabled: bool = True,
) -> ClientRules:
    authorizer = Authorizer(
        rules, no_match, sources=True, cache_size=cache_size, cache_ttl=cache_ttl, cache_enabled=cache_enabled
    )
    assert authorizer.active  # sources can refuse, even with no rule and no_match: allow
    client = authorizer.for_client("c", "bob", "1.2.3.4")
    assert client is not None and client.has_sources
    return client


def test_without_rules_nor_sources_for_client_is_none() -> None:
    assert Authorizer().for_client("c", None, "1.2.3.4") is None
    rules = Authorizer((), "deny").for_client("c", None, "1.2.3.4")
    assert rules is not None and not rules.has_sources


def test_decide_is_none_when_no_rule_applies_and_nothing_is_cached(clock: Clock) -> None:
    client = with_sources((Rule("deny", "publish", ("secret/#",)),))
    assert client.decide("publish", "a/b") is None
    assert client.decide("subscribe", "a/#", is_filter=True) is None
    assert client.decide("publish", "secret/x") is False  # a rule decides before any source


@pytest.mark.parametrize(
    ("no_match", "answer", "decided"),
    [
        ("allow", True, True),
        ("allow", False, False),
        ("deny", True, True),
        ("deny", False, False),
        ("allow", None, True),  # no source decided: no_match
        ("deny", None, False),
    ],
)
def test_remembered_answers_decide(clock: Clock, no_match: str, answer: bool | None, decided: bool) -> None:
    client = with_sources(no_match=no_match)
    client.remember([("publish", "a/b", answer)])
    assert client.decide("publish", "a/b") is decided
    assert client.allows("publish", "a/b") is decided
    assert client.decide("subscribe", "a/b") is None  # another action is another question
    assert client.decide("publish", "a/c") is None


def test_a_rule_wins_over_a_remembered_answer(clock: Clock) -> None:
    client = with_sources((Rule("deny", "all", ("secret/#",)),))
    client.remember([("publish", "secret/x", True)])
    assert client.decide("publish", "secret/x") is False


@pytest.mark.parametrize(
    ("elapsed", "decided"),
    [(0.0, True), (59.9, True), (60.0, True), (60.1, None), (3600.0, None)],
)
def test_remembered_answers_expire_after_the_ttl(clock: Clock, elapsed: float, decided: bool | None) -> None:
    client = with_sources(cache_ttl=60.0)
    client.remember([("subscribe", "a/#", True)])
    clock.now += elapsed
    assert client.decide("subscribe", "a/#", is_filter=True) is decided


def test_an_expired_answer_is_dropped_and_can_be_remembered_again(clock: Clock) -> None:
    client = with_sources(cache_ttl=10.0)
    client.remember([("publish", "t", False)])
    clock.now += 11
    assert client.decide("publish", "t") is None
    clock.now -= 11  # it was dropped, not just hidden
    assert client.decide("publish", "t") is None
    client.remember([("publish", "t", True)])
    assert client.decide("publish", "t") is True


def test_with_the_cache_disabled_answers_last_until_forgotten(clock: Clock) -> None:
    client = with_sources(cache_ttl=1.0, cache_enabled=False)
    client.remember([("publish", "t", False), ("subscribe", "t", True)])
    clock.now += 1e9
    assert (client.decide("publish", "t"), client.decide("subscribe", "t")) == (False, True)
    client.forget_answers()
    assert (client.decide("publish", "t"), client.decide("subscribe", "t")) == (None, None)
    assert client.allows("publish", "t") is True  # nothing decides: the delivery fallback


def topics_kept(client: ClientRules, topics: list[str]) -> list[str]:
    return [topic for topic in topics if client.decide("publish", topic) is not None]


def test_the_cache_size_evicts_the_oldest_answers(clock: Clock) -> None:
    client = with_sources(cache_size=2)
    for topic in ("a", "b", "c"):
        client.remember([("publish", topic, True)])
    assert topics_kept(client, ["a", "b", "c"]) == ["b", "c"]
    client.remember([("publish", "b", False)])  # remembered again: now the newest
    client.remember([("publish", "d", True)])
    assert topics_kept(client, ["a", "b", "c", "d"]) == ["b", "d"]
    assert client.decide("publish", "b") is False


def test_a_batch_larger_than_the_cache_is_kept_whole(clock: Clock) -> None:
    client = with_sources(cache_size=2)
    client.remember([("publish", "old", True)])
    batch = [f"t{n}" for n in range(5)]
    client.remember([("publish", topic, True) for topic in batch])
    # The packet that asked is handled again with every one of its answers.
    assert topics_kept(client, ["old", *batch]) == batch
    client.remember([("publish", "new", True)])  # the next one brings the cache back to its size
    assert topics_kept(client, ["old", *batch, "new"]) == ["t4", "new"]


@pytest.mark.parametrize(
    ("no_match", "sources", "allowed"),
    [
        ("allow", False, True),
        ("deny", False, False),
        ("allow", True, True),
        ("deny", True, True),  # with sources the subscription was authorized when it was made
    ],
)
def test_allows_falls_back_to_delivery_with_sources_and_no_match_without(
    no_match: str, sources: bool, allowed: bool
) -> None:
    rules = (Rule("deny", "subscribe", ("secret/#",)), Rule("allow", "subscribe", ("open/#",)))
    client = Authorizer(rules, no_match, sources=sources).for_client("c", None, "1.2.3.4")
    assert client is not None
    assert client.allows("subscribe", "other/x") is allowed
    assert client.allows("subscribe", "secret/x") is False
    assert client.allows("subscribe", "open/x") is True


def test_for_client_fills_in_placeholders_and_drops_rules_of_others() -> None:
    rules = (
        Rule("allow", "all", ("own/${clientid}/#",)),
        Rule("allow", "publish", ("root/#",), username="root"),
        Rule("deny", "all", ("#",), clientid="other"),
        Rule("deny", "all", ("net/#",), ipaddress=Networks.parse(["10.0.0.0/8"])),
    )
    client = Authorizer(rules, "deny").for_client("c", "bob", "192.0.2.1")
    assert client is not None
    assert client.allows("publish", "own/c/x") is True
    assert client.allows("publish", "own/d/x") is False
    assert client.allows("publish", "root/x") is False  # not root
    assert client.allows("publish", "net/x") is False  # no_match, not the 10/8 rule
    root = Authorizer(rules, "allow").for_client("c", "root", "10.1.2.3")
    assert root is not None
    assert root.allows("publish", "root/x") is True
    assert root.allows("publish", "net/x") is False
    assert root.allows("publish", "x") is True  # the rule for client "other" is not this one's
