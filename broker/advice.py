"""Warnings about a valid configuration that may not do what its operator thinks.

Printed by ``realip-broker check-config`` and logged at start-up. Pure code over
:class:`~broker.settings.Settings`.
"""

from __future__ import annotations

from broker.settings import ProxyProtocolMode, Settings

#: An admin token with fewer distinct characters than this is guessable however long it is
#: (``aaaaaaaaaaaaaaaa`` passes the length check).
MIN_TOKEN_DISTINCT_CHARACTERS = 8


def config_warnings(settings: Settings) -> list[str]:
    """Every warning for ``settings``, each a sentence naming the settings concerned. Never raises."""
    warnings = _listener_warnings(settings) + _admin_warnings(settings)
    authenticators = settings.authenticators()
    if not authenticators:
        warnings.append(
            "authentication: no authenticator is configured: EVERY client is admitted, and any "
            "client may claim any username (configure authentication, see README 'Authentication')"
        )
    named = _rules_naming(settings, "username")
    if named and not authenticators:
        warnings.append(
            f"{', '.join(named)}: rules name usernames but nothing authenticates them: they never "
            "match (a username only counts once an authenticator has proven it)"
        )
    by_client = _rules_naming(settings, "clientid")
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


def _listener_warnings(settings: Settings) -> list[str]:
    warnings = []
    if not settings.enabled_listeners():
        warnings.append("listeners: no listener is enabled: no client can connect")
    for listener in settings.enabled_listeners():
        path = f"listeners.{listener.type}.{listener.name}"
        if listener.proxy_protocol is ProxyProtocolMode.ON and not listener.trusted_proxies:
            warnings.append(
                f"{path}: proxy_protocol: true with no trusted_proxies: any peer that reaches this port "
                "may name any client address (list the load balancers in trusted_proxies)"
            )
        websocket = listener.websocket
        if websocket is not None and websocket.proxy_address_header and not listener.trusted_proxies:
            warnings.append(
                f"{path}.websocket.proxy_address_header: {websocket.proxy_address_header} is read from "
                "anyone, its leftmost address taken as the client's: safe only if the outermost load "
                "balancer overwrites the header (list the balancers in trusted_proxies to walk it)"
            )
    return warnings


def _admin_warnings(settings: Settings) -> list[str]:
    warnings = []
    admin = settings.admin
    if admin.listen.is_tcp and admin.listen.host in ("0.0.0.0", "::"):
        warnings.append(
            f"admin.listen: {admin.listen}: the admin API (plain HTTP, it can kick clients and ban "
            "networks) listens on every interface; bind it to 127.0.0.1 or a management network"
        )
    if admin.listen.is_tcp and len(set(admin.token)) < MIN_TOKEN_DISTINCT_CHARACTERS:
        warnings.append(
            f"admin.token: fewer than {MIN_TOKEN_DISTINCT_CHARACTERS} distinct characters: a guessable "
            "token (use e.g. `openssl rand -hex 32`)"
        )
    return warnings


def _rules_naming(settings: Settings, field: str) -> list[str]:
    """The paths of the rules that name a ``username`` / ``clientid``, as a condition or a
    placeholder in their topics."""
    placeholder = f"${{{field}}}"
    return [
        f"authorization.rules[{index}]"
        for index, rule in enumerate(settings.authorization.rules)
        if getattr(rule, field) is not None or any(placeholder in topic for topic in rule.topics)
    ]
