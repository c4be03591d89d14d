"""The authentication chain: authenticators tried in order, EMQX's rules, our refusal codes.

- A client that sends neither username nor password is *anonymous*: the chain is not asked;
  ``authentication_policy.allow_anonymous`` decides (CONNACK 0x87 / 5 when refused).
- Otherwise each enabled authenticator answers in turn; the first ``allow`` or ``deny`` decides.
  ``deny`` is CONNACK 0x86 / 4 (bad user name or password).
- When every one answers ``ignore``: if one of them failed (its server down, a timeout) the client
  gets 0x88 / 3 (server unavailable) and the failure is *not* held against its address; else no
  authenticator knows the client: 0x86 / 4, like a wrong password (no user enumeration).
- With no authenticator at all every client is admitted, and its username proves nothing: rules
  that name a username never match it (``Decision.authenticated`` is False). With only SCRAM
  configured, a client that does not use it is refused (0x87 / 5).
- An ``allow`` proves the username only when the authenticator could check it
  (``Authenticator.proves_username``): a JWT whose claims do not name it, or an HTTP callout
  that is not sent it, admits the client with an unproven username.

Pure decisions over the :class:`~broker.auth.base.Authenticator` protocol; the engine calls
:meth:`AuthChain.decide_now` first and awaits :meth:`AuthChain.authenticate` only when needed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.auth.base import Authenticator, AuthError, Credentials, Outcome
from broker.mqtt import reasons

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """The chain's answer for one CONNECT.

    ``code`` is the MQTT 5 CONNACK reason code (0 when admitted); ``authenticated`` says whether
    the username was proven (rules naming usernames match only then); ``failure`` whether the
    refusal counts against the client's address (``authentication_policy.failure_ban``);
    ``reason`` a short label for metrics and audit (``bad_credentials``, ``anonymous``,
    ``auth_unavailable``, ``auth_busy``) and ``message`` a sentence for the log (never a secret).
    """

    code: int
    reason: str = ""
    message: str = ""
    authenticated: bool = False
    is_superuser: bool = False
    failure: bool = False
    #: The authenticator that decided ("" when none did).
    by: str = ""

    @property
    def admitted(self) -> bool:
        """Whether the client may connect."""
        return self.code == reasons.SUCCESS


UNPROVEN = Decision(reasons.SUCCESS)


class Exchange(Protocol):
    """One MQTT 5 enhanced authentication exchange (``broker.auth.scram.ScramExchange``)."""

    @property
    def username(self) -> str | None:
        """Who the client says it is, once known."""

    def first(self, data: bytes) -> bytes:
        """The client's first message -> the server's challenge. Raises ScramError."""

    def final(self, data: bytes) -> bytes:
        """The client's proof -> the server's final message. Raises ScramError."""


class AuthChain:
    """The configured authenticators and the anonymous policy."""

    def __init__(
        self,
        authenticators: Sequence[Authenticator] = (),
        *,
        allow_anonymous: bool = True,
        enhanced: Mapping[str, Callable[[], Exchange]] | None = None,
        is_superuser: Callable[[str], bool] = lambda username: False,
    ) -> None:
        """``enhanced``: MQTT 5 Authentication Method -> a new exchange (SCRAM); ``is_superuser``
        tells whether a user authenticated that way is a superuser."""
        self.authenticators = tuple(authenticators)
        self.allow_anonymous = allow_anonymous
        self.enhanced = dict(enhanced or {})
        self.is_superuser = is_superuser
        #: Answers by authenticator name and outcome (``realip_authentication_total``).
        self.results: Counter[tuple[str, str]] = Counter()

    async def start(self) -> None:
        """Start every authenticator; on a failure the ones started are closed again.

        Raises:
            AuthError: one cannot be set up (its message names it).
        """
        started: list[Authenticator] = []
        for authenticator in self.authenticators:
            try:
                await authenticator.start()
            except AuthError as exc:
                for other in started:
                    await other.close()
                raise AuthError(f"authentication ({authenticator.name}): {exc}") from None
            started.append(authenticator)

    async def close(self) -> None:
        """Close every authenticator."""
        for authenticator in self.authenticators:
            await authenticator.close()

    def decide_now(self, credentials: Credentials) -> Decision | None:
        """The decision when no authenticator has to be asked (anonymous clients, an empty
        chain), else None: then await :meth:`authenticate`. Never raises."""
        if credentials.username is None and credentials.password is None:
            if self.allow_anonymous:
                return UNPROVEN
            return Decision(
                reasons.NOT_AUTHORIZED,
                "anonymous",
                "anonymous clients are not allowed (authentication_policy.allow_anonymous)",
            )
        if not self.authenticators:
            if self.enhanced:  # only MQTT 5 enhanced authentication (SCRAM) is configured
                methods = ", ".join(sorted(self.enhanced))
                return Decision(
                    reasons.NOT_AUTHORIZED,
                    "auth_method",
                    f"this broker authenticates with {methods} only (MQTT 5 enhanced authentication)",
                )
            return UNPROVEN
        return None

    async def authenticate(self, credentials: Credentials) -> Decision:
        """Ask the authenticators in order. Never raises."""
        failed = []
        for authenticator in self.authenticators:
            verdict = await authenticator.authenticate(credentials)
            key = "error" if verdict.error else verdict.outcome.value
            self.results[(authenticator.name, key)] += 1
            if verdict.outcome is Outcome.ALLOW:
                return Decision(
                    reasons.SUCCESS,
                    authenticated=authenticator.proves_username and credentials.username is not None,
                    is_superuser=verdict.is_superuser,
                    by=authenticator.name,
                )
            if verdict.outcome is Outcome.DENY:
                why = f" ({verdict.reason})" if verdict.reason else ""
                return Decision(
                    reasons.BAD_USERNAME_OR_PASSWORD,
                    "bad_credentials",
                    f"{authenticator.name} refused the credentials{why}",
                    failure=True,
                    by=authenticator.name,
                )
            if verdict.error:
                failed.append(f"{authenticator.name}: {verdict.reason or 'failed'}")
        if failed:
            return Decision(
                reasons.SERVER_UNAVAILABLE,
                "auth_unavailable",
                "no authenticator could decide (" + "; ".join(failed) + ")",
            )
        return Decision(
            reasons.BAD_USERNAME_OR_PASSWORD,
            "bad_credentials",
            "no authenticator knows these credentials",
            failure=True,
        )
