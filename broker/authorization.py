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
    """Decides PUBLISH, SUBSCRIBE and delivery by the rules."""

    def __init__(self, rules: tuple[Rule, ...] = (), no_match: str = "allow") -> None:
        self.rules = rules
        self.no_match_allows = no_match == "allow"

    @property
    def active(self) -> bool:
        """Whether any check can refuse (no rules and ``no_match: allow`` allow everything)."""
        return bool(self.rules) or not self.no_match_allows

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
        return ClientRules(tuple(compiled), self.no_match_allows)


class ClientRules:
    """:meth:`Authorizer.allows` for one client, its conditions already decided."""

    __slots__ = ("_no_match_allows", "_rules")

    def __init__(self, rules: tuple[tuple[str, bool, tuple[str, ...]], ...], no_match_allows: bool) -> None:
        self._rules = rules
        self._no_match_allows = no_match_allows

    def allows(self, action: str, topic: str, *, is_filter: bool = False) -> bool:
        """As :meth:`Authorizer.allows` for this client. Never raises."""
        for rule_action, allow, filters in self._rules:
            if rule_action not in ("all", action):
                continue
            for rule_filter in filters:
                if filter_covers(rule_filter, topic) if is_filter else topic_matches(rule_filter, topic):
                    return allow
        return self._no_match_allows
