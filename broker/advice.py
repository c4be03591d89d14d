"""Warnings about a valid configuration that may not do what its operator thinks.

Printed by ``realip-broker check-config`` and logged at start-up. Pure code over
:class:`~broker.settings.Settings`.
"""

from __future__ import annotations

from broker.settings import Settings


def config_warnings(settings: Settings) -> list[str]:
    """Every warning for ``settings``, each a sentence naming the settings concerned. Never raises."""
    warnings = []
    authenticators = settings.authenticators()
    if not authenticators:
        warnings.append(
            "authentication: no authenticator is configured: EVERY client is admitted, and any "
            "client may claim any username (configure authentication, see README 'Authentication')"
        )
    named = [
        f"authorization.rules[{index}]"
        for index, rule in enumerate(settings.authorization.rules)
        if rule.username is not None or any("${username}" in topic for topic in rule.topics)
    ]
    if named and not authenticators:
        warnings.append(
            f"{', '.join(named)}: rules name usernames but nothing authenticates them: they never "
            "match (a username only counts once an authenticator has proven it)"
        )
    by_client = [
        f"authorization.rules[{index}]"
        for index, rule in enumerate(settings.authorization.rules)
        if rule.clientid is not None or any("${clientid}" in topic for topic in rule.topics)
    ]
    if by_client and not authenticators:
        warnings.append(
            f"{', '.join(by_client)}: rules name client ids but nothing authenticates clients: "
            "any client may claim any client id"
        )
    if authenticators and settings.authentication_policy.allow_anonymous is True:
        warnings.append(
            "authentication_policy.allow_anonymous: true: clients sending no username and no password "
            "are admitted without asking the authenticators"
        )
    if not settings.authentication_policy.failure_ban.enable and authenticators:
        warnings.append(
            "authentication_policy.failure_ban.enable: false: nothing slows down password guessing"
        )
    return warnings
