"""The authentication chain as pure code: anonymous policy, order, outcomes, refusal codes.

The authenticators are small fakes that answer a fixed verdict and record what happened to them;
the chain itself does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from broker.auth.base import ALLOW, IGNORE, AuthError, Credentials, Outcome, Verdict
from broker.auth.chain import UNPROVEN, AuthChain, Decision
from broker.mqtt import reasons
from listeners.address import ClientAddress

DENY = Verdict(Outcome.DENY, reason="wrong password")
FAILED = Verdict(Outcome.IGNORE, reason="server down", error=True)
SUPERUSER = Verdict(Outcome.ALLOW, is_superuser=True)


@dataclass
class Fake:
    """An authenticator that always answers ``verdict``; ``fail_start`` makes start() raise."""

    name: str
    verdict: Verdict = IGNORE
    fail_start: bool = False
    events: list[str] = field(default_factory=list)
    proves_username: bool = True

    async def start(self) -> None:
        if self.fail_start:
            raise AuthError("cannot read the file")
        self.events.append("start")

    async def authenticate(self, credentials: Credentials) -> Verdict:
        self.events.append("authenticate")
        return self.verdict

    async def close(self) -> None:
        self.events.append("close")


def credentials(username: str | None = "bob", password: bytes | None = b"secret") -> Credentials:
    return Credentials(
        client_id="c1",
        username=username,
        password=password,
        address=ClientAddress.direct("203.0.113.7", 50000),
        listener_id="tcp:default",
        proto_ver=5,
    )


ANONYMOUS = credentials(None, None)


@pytest.mark.parametrize(
    ("allow_anonymous", "authenticators", "code", "reason"),
    [
        (True, (), reasons.SUCCESS, ""),
        (True, (Fake("a", DENY),), reasons.SUCCESS, ""),  # the chain is not asked
        (False, (), reasons.NOT_AUTHORIZED, "anonymous"),
        (False, (Fake("a", ALLOW),), reasons.NOT_AUTHORIZED, "anonymous"),
    ],
)
def test_anonymous_clients_are_decided_by_the_policy(
    allow_anonymous: bool, authenticators: tuple[Fake, ...], code: int, reason: str
) -> None:
    chain = AuthChain(authenticators, allow_anonymous=allow_anonymous)
    decision = chain.decide_now(ANONYMOUS)
    assert decision is not None
    assert (decision.code, decision.reason, decision.admitted) == (code, reason, code == reasons.SUCCESS)
    assert decision.authenticated is False
    assert decision.failure is False  # refusing an anonymous client is no failed password
    assert all(fake.events == [] for fake in authenticators)
    if reason:
        assert "allow_anonymous" in decision.message


@pytest.mark.parametrize(
    ("username", "password"),
    [("bob", b"secret"), ("bob", None), (None, b"secret"), ("", b"")],
)
def test_a_client_with_a_username_or_a_password_is_not_anonymous(
    username: str | None, password: bytes | None
) -> None:
    chain = AuthChain((Fake("a", ALLOW),), allow_anonymous=False)
    assert chain.decide_now(credentials(username, password)) is None  # the chain must be asked


@pytest.mark.parametrize("allow_anonymous", [True, False])
def test_an_empty_chain_admits_unproven(allow_anonymous: bool) -> None:
    decision = AuthChain((), allow_anonymous=allow_anonymous).decide_now(credentials())
    assert decision == UNPROVEN
    assert decision is not None and decision.admitted and not decision.authenticated
    assert not decision.is_superuser and decision.by == ""


async def test_a_password_without_username_goes_to_the_chain() -> None:
    fake = Fake("a", ALLOW)
    chain = AuthChain((fake,), allow_anonymous=False)
    creds = credentials(None, b"token")
    assert chain.decide_now(creds) is None
    decision = await chain.authenticate(creds)
    assert decision.admitted and fake.events == ["authenticate"]
    assert not decision.authenticated  # no username: nothing to prove


@pytest.mark.parametrize(
    ("verdicts", "code", "reason", "authenticated", "superuser", "failure", "by"),
    [
        ((ALLOW,), reasons.SUCCESS, "", True, False, False, "a0"),
        ((SUPERUSER,), reasons.SUCCESS, "", True, True, False, "a0"),
        ((IGNORE, SUPERUSER), reasons.SUCCESS, "", True, True, False, "a1"),
        ((IGNORE, ALLOW, DENY), reasons.SUCCESS, "", True, False, False, "a1"),  # first allow wins
        ((DENY,), reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", False, False, True, "a0"),
        ((DENY, ALLOW), reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", False, False, True, "a0"),
        (
            (IGNORE, DENY, ALLOW),
            reasons.BAD_USERNAME_OR_PASSWORD,
            "bad_credentials",
            False,
            False,
            True,
            "a1",
        ),
        ((IGNORE,), reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", False, False, True, ""),
        ((IGNORE, IGNORE), reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", False, False, True, ""),
        ((FAILED,), reasons.SERVER_UNAVAILABLE, "auth_unavailable", False, False, False, ""),
        ((IGNORE, FAILED, IGNORE), reasons.SERVER_UNAVAILABLE, "auth_unavailable", False, False, False, ""),
        ((FAILED, ALLOW), reasons.SUCCESS, "", True, False, False, "a1"),  # another one decides
        ((FAILED, DENY), reasons.BAD_USERNAME_OR_PASSWORD, "bad_credentials", False, False, True, "a1"),
    ],
)
async def test_the_first_allow_or_deny_decides(
    verdicts: tuple[Verdict, ...],
    code: int,
    reason: str,
    authenticated: bool,
    superuser: bool,
    failure: bool,
    by: str,
) -> None:
    fakes = [Fake(f"a{index}", verdict) for index, verdict in enumerate(verdicts)]
    chain = AuthChain(fakes)
    assert chain.decide_now(credentials()) is None
    decision = await chain.authenticate(credentials())
    assert isinstance(decision, Decision)
    assert (decision.code, decision.reason) == (code, reason)
    assert (decision.authenticated, decision.is_superuser, decision.failure, decision.by) == (
        authenticated,
        superuser,
        failure,
        by,
    )
    assert decision.admitted is (code == reasons.SUCCESS)
    # The authenticators after the deciding one are never asked.
    asked = [fake.name for fake in fakes if fake.events == ["authenticate"]]
    last = next((i for i, v in enumerate(verdicts) if v.outcome is not Outcome.IGNORE), len(verdicts) - 1)
    assert asked == [f"a{index}" for index in range(last + 1)]


async def test_refusal_messages_name_the_authenticator_and_never_the_password() -> None:
    denied = await AuthChain((Fake("jwt", DENY),)).authenticate(credentials())
    assert denied.message == "jwt refused the credentials (wrong password)"
    unavailable = await AuthChain((Fake("password_based:http", FAILED), Fake("x", IGNORE))).authenticate(
        credentials()
    )
    assert unavailable.message == "no authenticator could decide (password_based:http: server down)"
    silent = await AuthChain((Fake("h", Verdict(Outcome.IGNORE, error=True)),)).authenticate(credentials())
    assert silent.message == "no authenticator could decide (h: failed)"
    for decision in (denied, unavailable, silent):
        assert "secret" not in decision.message


async def test_results_count_each_answer_by_name_and_outcome() -> None:
    chain = AuthChain((Fake("a", IGNORE), Fake("b", FAILED), Fake("c", DENY), Fake("d", ALLOW)))
    await chain.authenticate(credentials())
    await chain.authenticate(credentials())
    chain.authenticators[2].verdict = ALLOW  # type: ignore[attr-defined]
    await chain.authenticate(credentials())
    assert dict(chain.results) == {
        ("a", "ignore"): 3,
        ("b", "error"): 3,
        ("c", "deny"): 2,
        ("c", "allow"): 1,
    }
    chain.decide_now(ANONYMOUS)  # decided without the chain: not counted
    assert sum(chain.results.values()) == 9


async def test_start_and_close_every_authenticator_in_order() -> None:
    fakes = [Fake("a"), Fake("b")]
    chain = AuthChain(fakes)
    await chain.start()
    await chain.close()
    assert [fake.events for fake in fakes] == [["start", "close"], ["start", "close"]]


async def test_a_failed_start_closes_the_ones_started_and_names_the_one_that_failed() -> None:
    first, second, broken, never = (
        Fake("a"),
        Fake("b"),
        Fake("password_based:password_file", fail_start=True),
        Fake("d"),
    )
    chain = AuthChain((first, second, broken, never))
    with pytest.raises(
        AuthError, match=r"^authentication \(password_based:password_file\): cannot read the file$"
    ):
        await chain.start()
    assert first.events == ["start", "close"]
    assert second.events == ["start", "close"]
    assert broken.events == []
    assert never.events == []  # neither started nor closed


async def test_an_allow_that_cannot_prove_the_username_leaves_it_unproven() -> None:
    """A JWT whose claims do not name the username (or an HTTP callout not sent it) admits the
    client, but its claimed username matches no rule and owns no session."""
    chain = AuthChain([Fake("jwt", ALLOW, proves_username=False)], allow_anonymous=False)
    decision = await chain.authenticate(credentials("admin"))
    assert (decision.admitted, decision.authenticated) == (True, False)
    proven = await AuthChain([Fake("db", ALLOW)], allow_anonymous=False).authenticate(credentials("admin"))
    assert proven.authenticated is True


def test_scram_only_refuses_clients_that_do_not_use_it() -> None:
    chain = AuthChain([], allow_anonymous=False, enhanced={"SCRAM-SHA-256": lambda: None})  # type: ignore[dict-item]
    decision = chain.decide_now(credentials("admin", b"whatever"))
    assert decision is not None and (decision.code, decision.admitted) == (0x87, False)
