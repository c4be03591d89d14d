"""Topic authorization: ``authorization.rules`` matched against client id, username and real address.

Rules are tried in order; the first that applies decides (``allow``/``deny``), else ``no_match``.
A rule applies when its ``action`` covers the request, every condition it names holds
(``clientid``, ``username`` exactly; ``ipaddress`` a CIDR holding the client's *real* address), and
one of its ``topics`` matches:

- PUBLISH of topic T: a rule filter matches T (MQTT wildcard rules);
- SUBSCRIBE to filter F: a rule filter *covers* F (every topic F can match, the rule matches too);
- delivery of topic T to a subscriber: ``subscribe`` rules are applied to T, so a broad
  subscription (``#``) never carries a topic its client may not subscribe to.

``${clientid}`` and ``${username}`` in a rule's topics stand for the client's own, substituted in
one pass; a value holding ``+``, ``#``, ``/`` or ``$`` never matches (it could widen the rule or
smuggle in a placeholder), nor does ``${username}`` for a client without one. Pure code;
``broker.engine`` calls :meth:`Authorizer.allows`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Final

from listeners.address import Networks

ACTIONS: Final = ("publish", "subscribe", "all")
_PLACEHOLDER: Final = re.compile(r"\$\{clientid\}|\$\{username\}")
PLACEHOLDERS: Final = ("${clientid}", "${username}")


def valid_filter(text: str) -> bool:
    """Whether ``text`` is a valid MQTT topic filter [MQTT-4.7.1]. Never raises."""
    if not text or "\0" in text:
        return False
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a topic name matches a filter; wildcards never match a leading ``$`` [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("#", "+"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def filter_covers(rule: str, requested: str) -> bool:
    """Whether every topic that filter ``requested`` can match is matched by filter ``rule``."""
    if requested.startswith("$") and rule[:1] in ("#", "+"):
        return False
    rule_levels = rule.split("/")
    requested_levels = requested.split("/")
    for index, level in enumerate(rule_levels):
        if level == "#":
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#" or level not in ("+", wanted):
            return False
    return len(rule_levels) == len(requested_levels)


@dataclass(frozen=True)
class Rule:
    """One ``authorization.rules`` entry."""

    permission: str
    action: str
    topics: tuple[str, ...]
    clientid: str | None = None
    username: str | None = None
    ipaddress: Networks | None = None

    def concerns(self, action: str, client_id: str, username: str | None, ip: str) -> bool:
        """Whether the rule's action and conditions apply to this client and request."""
        if self.action not in ("all", action):
            return False
        if self.clientid is not None and self.clientid != client_id:
            return False
        if self.username is not None and self.username != username:
            return False
        return self.ipaddress is None or self.ipaddress.contains(ip)

    def filters_for(self, client_id: str, username: str | None) -> list[str]:
        """The rule's topic filters with placeholders filled in (unusable ones left out)."""
        values = {"${clientid}": client_id, "${username}": username}
        filters = []
        for topic in self.topics:
            used = [placeholder for placeholder in values if placeholder in topic]
            # A value that is empty or could widen the filter (or smuggle another placeholder in)
            # makes the filter unusable for this client.
            if any(not values[p] or any(c in (values[p] or "") for c in "+#/$") for p in used):
                continue
            # One pass over the rule text: a substituted value is never substituted again.
            filters.append(_PLACEHOLDER.sub(lambda match: values[match.group(0)] or "", topic))
        return filters


class Authorizer:
    """Decides PUBLISH, SUBSCRIBE and delivery by the rules.

    With ``sources`` (``authorization.sources``: HTTP callouts, asked by the engine) a request no
    rule decides is the sources' to answer; their answers are kept per client for ``cache_ttl``
    seconds, ``cache_size`` of them at most (EMQX's authorization cache).
    """

    def __init__(
        self,
        rules: tuple[Rule, ...] = (),
        no_match: str = "allow",
        *,
        sources: bool = False,
        cache_size: int = 32,
        cache_ttl: float = 60.0,
        cache_enabled: bool = True,
    ) -> None:
        self.rules = rules
        self.no_match_allows = no_match == "allow"
        self.sources = sources
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.cache_enabled = cache_enabled

    @property
    def forgets_answers(self) -> bool:
        """Whether the sources' answers serve only the packet that asked (no cache, or a TTL of 0)."""
        return not self.cache_enabled or self.cache_ttl <= 0

    @property
    def active(self) -> bool:
        """Whether any check can refuse (no rules and ``no_match: allow`` allow everything)."""
        return bool(self.rules) or not self.no_match_allows or self.sources

    def allows(
        self,
        action: str,
        topic: str,
        client_id: str,
        username: str | None,
        ip: str,
        *,
        is_filter: bool = False,
    ) -> bool:
        """Whether ``action`` (``publish`` or ``subscribe``) on ``topic`` is allowed.

        ``is_filter``: ``topic`` is a SUBSCRIBE's filter (else a topic name). Never raises.
        """
        for rule in self.rules:
            if not rule.concerns(action, client_id, username, ip):
                continue
            for rule_filter in rule.filters_for(client_id, username):
                hit = filter_covers(rule_filter, topic) if is_filter else topic_matches(rule_filter, topic)
                if hit:
                    return rule.permission == "allow"
        return self.no_match_allows

    def for_client(self, client_id: str, username: str | None, ip: str) -> ClientRules | None:
        """The rules that concern one client, placeholders filled in once (per connection, so no
        substitution runs per message); ``None`` when nothing can refuse. Never raises."""
        if not self.active:
            return None
        compiled = []
        for rule in self.rules:
            if rule.clientid is not None and rule.clientid != client_id:
                continue
            if rule.username is not None and rule.username != username:
                continue
            if rule.ipaddress is not None and not rule.ipaddress.contains(ip):
                continue
            compiled.append(
                (rule.action, rule.permission == "allow", tuple(rule.filters_for(client_id, username)))
            )
        if not self.sources:
            return ClientRules(tuple(compiled), self.no_match_allows)
        # Without a cache an answer lasts until the packet that asked is handled again.
        ttl = float("inf") if self.forgets_answers else self.cache_ttl
        return ClientRules(tuple(compiled), self.no_match_allows, cache=(self.cache_size, ttl))


class ClientRules:
    """:meth:`Authorizer.allows` for one client, its conditions already decided, and (with
    sources) the sources' answers for it."""

    __slots__ = ("_answers", "_cache", "_no_match_allows", "_rules")

    def __init__(
        self,
        rules: tuple[tuple[str, bool, tuple[str, ...]], ...],
        no_match_allows: bool,
        *,
        cache: tuple[int, float] | None = None,
    ) -> None:
        """``cache``: (answers kept at most, seconds each is kept) when sources are configured."""
        self._rules = rules
        self._no_match_allows = no_match_allows
        self._cache = cache
        #: (action, topic) -> (allowed, monotonic time it expires, whether a source said so rather
        #: than no_match standing in for sources that did not decide)
        self._answers: dict[tuple[str, str], tuple[bool, float, bool]] = {}

    @property
    def has_sources(self) -> bool:
        """Whether what no rule decides is asked of the authorization sources."""
        return self._cache is not None

    def _by_rules(self, action: str, topic: str, is_filter: bool) -> bool | None:
        for rule_action, allow, filters in self._rules:
            if rule_action not in ("all", action):
                continue
            for rule_filter in filters:
                if filter_covers(rule_filter, topic) if is_filter else topic_matches(rule_filter, topic):
                    return allow
        return None

    def _answer(self, action: str, topic: str) -> tuple[bool, float, bool] | None:
        """A source's answer still cached (an expired one is dropped)."""
        answer = self._answers.get((action, topic)) if self._answers else None
        if answer is not None and answer[1] < time.monotonic():
            del self._answers[(action, topic)]
            return None
        return answer

    def decide(self, action: str, topic: str, *, is_filter: bool = False) -> bool | None:
        """The rules' decision, else a source's answer still cached, else None. Never raises."""
        decided = self._by_rules(action, topic, is_filter)
        if decided is not None:
            return decided
        answer = self._answer(action, topic)
        return None if answer is None else answer[0]

    def explicitly_allows(self, action: str, topic: str, *, is_filter: bool = False) -> bool:
        """Whether a rule, or a source's own answer (not ``no_match`` standing in for sources
        that did not decide), allows this (``$SYS`` needs that). Never raises."""
        decided = self._by_rules(action, topic, is_filter)
        if decided is not None:
            return decided
        answer = self._answer(action, topic)
        return answer is not None and answer[2] and answer[0]

    def allows(self, action: str, topic: str, *, is_filter: bool = False) -> bool:
        """As :meth:`Authorizer.allows` for this client. With sources, what neither the rules nor
        a cached answer decide is allowed: this is the delivery check, and the subscription it
        delivers for was authorized when it was made. Never raises."""
        decided = self.decide(action, topic, is_filter=is_filter)
        if decided is not None:
            return decided
        return True if self._cache is not None else self._no_match_allows

    def remember(self, answers: list[tuple[str, str, bool | None]]) -> None:
        """Keep the sources' answers to one packet's requests, ``(action, topic, allowed)``
        (``allowed`` None: no source decided, so ``no_match``). The oldest answers go beyond the
        cache size, never one of these: the packet that asked is handled again with them."""
        size, ttl = self._cache or (len(answers), 0.0)
        expires = time.monotonic() + ttl
        for action, topic, allowed in answers:
            decision = self._no_match_allows if allowed is None else allowed
            self._answers.pop((action, topic), None)
            self._answers[(action, topic)] = (decision, expires, allowed is not None)
        while len(self._answers) > max(size, len(answers)):
            del self._answers[next(iter(self._answers))]

    def forget_answers(self) -> None:
        """Drop every cached answer (``authorization.cache.enable: false``: an answer serves only
        the packet that asked for it)."""
        self._answers.clear()
