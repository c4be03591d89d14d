"""Hosting amqtt authentication plugins (broker/auth/amqtt_plugin.py): amqtt's own FileAuthPlugin,
and small plugins defined here that record what they were given."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import amqtt
import pytest
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from broker.auth import amqtt_plugin
from broker.auth.amqtt_plugin import (
    AMQTT_VERSION,
    AmqttPluginAuthenticator,
    amqtt_incompatibilities,
)
from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.settings import AmqttPluginSettings
from listeners.address import AddressSource, ClientAddress

HERE = __name__  # the dotted path of this module, for the plugins below
FILE_AUTH = "amqtt.plugins.authentication.FileAuthPlugin"
SECRET_PASSWORD = "s3cret-Pa55word"

#: A client behind a proxy on loopback: plugins must see the client, never the proxy.
BEHIND_PROXY = ClientAddress(
    ip="203.0.113.9",
    port=41234,
    source=AddressSource.PROXY_PROTOCOL_V2,
    proxy_ip="127.0.0.1",
    proxy_port=55555,
)


def credentials(
    username: str | None = "alice",
    password: bytes | None = SECRET_PASSWORD.encode(),
    *,
    client_id: str = "dev-1",
    address: ClientAddress = BEHIND_PROXY,
) -> Credentials:
    return Credentials(
        client_id=client_id,
        username=username,
        password=password,
        address=address,
        listener_id="tcp:default",
        proto_ver=4,
        cert_common_name="device-42",
    )


async def started(plugin: str, config: dict[str, Any] | None = None) -> AmqttPluginAuthenticator:
    authenticator = AmqttPluginAuthenticator(AmqttPluginSettings(plugin=plugin, config=config or {}))
    await authenticator.start()
    return authenticator


# --- plugins made for the tests --------------------------------------------------------------


class RecordingPlugin(BaseAuthPlugin):
    """Answers what its config says, and records the sessions, the context and the hooks called."""

    sessions: ClassVar[list[Session]] = []
    events: ClassVar[list[str]] = []
    contexts: ClassVar[list[Any]] = []

    @dataclass
    class Config:
        answer: bool | None = True
        label: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        RecordingPlugin.contexts.append(context)

    async def authenticate(self, *, session: Session) -> bool | None:
        RecordingPlugin.sessions.append(session)
        return bool(self.config.answer) if self.config.answer is not None else None

    async def on_broker_pre_start(self) -> None:
        RecordingPlugin.events.append("pre_start")

    async def on_broker_post_start(self) -> None:
        RecordingPlugin.events.append("post_start")

    async def on_broker_pre_shutdown(self) -> None:
        RecordingPlugin.events.append("pre_shutdown")

    async def on_broker_post_shutdown(self) -> None:
        RecordingPlugin.events.append("post_shutdown")

    async def close(self) -> None:
        RecordingPlugin.events.append("close")


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    RecordingPlugin.sessions.clear()
    RecordingPlugin.events.clear()
    RecordingPlugin.contexts.clear()


class RaisingPlugin(BaseAuthPlugin):
    """Fails the way a buggy plugin does, quoting the password in its message."""

    async def authenticate(self, *, session: Session) -> bool | None:
        raise RuntimeError(f"cannot check password {session.password!r}")


class OddAnswerPlugin(BaseAuthPlugin):
    """Answers a truthy string: amqtt itself would let that client in."""

    async def authenticate(self, *, session: Session) -> Any:
        return "deny"


class SlowPlugin(BaseAuthPlugin):
    async def authenticate(self, *, session: Session) -> bool | None:
        await asyncio.sleep(5)
        return True


class BrokerStatePlugin(BaseAuthPlugin):
    """Reaches for amqtt's broker state, which is not there."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return self.context.get_session(session.client_id) is None


class SyncPlugin(BaseAuthPlugin):
    def authenticate(self, *, session: Session) -> bool | None:
        return True


class FailingInitPlugin(BaseAuthPlugin):
    def __init__(self, context: Any) -> None:
        super().__init__(context)
        raise OSError("directory server unreachable")


class FailingStartPlugin(BaseAuthPlugin):
    async def on_broker_pre_start(self) -> None:
        raise ConnectionError("cannot reach the user store")


class TopicOnlyPlugin(BaseTopicPlugin):
    pass


class NotAPlugin:
    async def authenticate(self, *, session: Session) -> bool:
        return True


# --- the amqtt this module was written against --------------------------------------------------


def test_installed_amqtt_is_the_pinned_one() -> None:
    """Fails loudly when amqtt changes under broker/auth/amqtt_plugin.py: read its internals again
    (amqtt/plugins/manager.py _load_str_plugin, amqtt/broker.py) and update AMQTT_VERSION."""
    assert amqtt.__version__.split(".")[:2] == AMQTT_VERSION.split(".")[:2]


def test_amqtt_has_what_we_rely_on() -> None:
    assert amqtt_incompatibilities() == []


# --- amqtt's own FileAuthPlugin -----------------------------------------------------------------


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    """``username:hash`` lines, the hash made with pwdlib's Argon2 hasher as FileAuthPlugin verifies."""
    path = tmp_path / "passwd"
    hasher = PasswordHash((Argon2Hasher(),))
    path.write_text(f"# users\nalice:{hasher.hash(SECRET_PASSWORD)}\nbob:{hasher.hash('other')}\n")
    return path


async def test_file_auth_plugin_right_password_allows(password_file: Path) -> None:
    authenticator = await started(FILE_AUTH, {"password_file": str(password_file)})
    assert authenticator.name == "amqtt_plugin:FileAuthPlugin"
    assert await authenticator.authenticate(credentials()) == Verdict(Outcome.ALLOW)
    await authenticator.close()


async def test_file_auth_plugin_wrong_password_denies(password_file: Path) -> None:
    authenticator = await started(FILE_AUTH, {"password_file": str(password_file)})
    verdict = await authenticator.authenticate(credentials(password=b"wrong"))
    assert (verdict.outcome, verdict.error) == (Outcome.DENY, False)
    assert SECRET_PASSWORD not in verdict.reason and "wrong" not in verdict.reason
    # Another user's password is not alice's.
    assert (await authenticator.authenticate(credentials(password=b"other"))).outcome is Outcome.DENY
    assert (await authenticator.authenticate(credentials("bob", b"other"))).outcome is Outcome.ALLOW
    assert (await authenticator.authenticate(credentials("mallory"))).outcome is Outcome.DENY
    await authenticator.close()


async def test_file_auth_plugin_without_username_abstains(password_file: Path) -> None:
    authenticator = await started(FILE_AUTH, {"password_file": str(password_file)})
    assert await authenticator.authenticate(credentials(None, None)) == Verdict(Outcome.IGNORE)


async def test_file_auth_plugin_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-passwd"
    with pytest.raises(AuthError, match=rf"{FILE_AUTH}.*PasswordFileError.*{missing}"):
        await started(FILE_AUTH, {"password_file": str(missing)})


async def test_file_auth_plugin_bad_config_key(password_file: Path) -> None:
    with pytest.raises(AuthError, match=r"unknown config key\(s\) 'password-file'.*takes: password_file"):
        await started(FILE_AUTH, {"password-file": str(password_file)})


async def test_bad_config_type_names_the_key_not_the_value() -> None:
    with pytest.raises(AuthError, match="config key 'password_file' must be a") as raised:
        await started(FILE_AUTH, {"password_file": 123456789})
    assert "123456789" not in str(raised.value)


async def test_non_utf8_password_is_not_given_to_the_plugin(password_file: Path) -> None:
    authenticator = await started(FILE_AUTH, {"password_file": str(password_file)})
    verdict = await authenticator.authenticate(credentials(password=b"\xff\xfe"))
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, False)


# --- what a plugin is given -------------------------------------------------------------------


async def test_session_carries_the_real_client() -> None:
    authenticator = await started(f"{HERE}.RecordingPlugin")
    assert await authenticator.authenticate(credentials()) == Verdict(Outcome.ALLOW)
    (session,) = RecordingPlugin.sessions
    assert isinstance(session, Session)
    assert (session.remote_address, session.remote_port) == ("203.0.113.9", 41234)
    assert (session.client_id, session.username, session.password) == ("dev-1", "alice", SECRET_PASSWORD)
    assert session.ssl_object is None
    assert session.attributes["realip_broker.proxy_address"] == "127.0.0.1"
    assert session.attributes["realip_broker.proxy_port"] == 55555
    assert session.attributes["realip_broker.address_source"] == "proxy_protocol_v2"
    assert session.attributes["realip_broker.cert_common_name"] == "device-42"
    assert session.attributes["realip_broker.listener_id"] == "tcp:default"


async def test_each_connect_gets_a_fresh_session() -> None:
    """amqtt 0.12.1 kept a resumed session's old peer; here every CONNECT is described anew."""
    authenticator = await started(f"{HERE}.RecordingPlugin")
    await authenticator.authenticate(credentials(address=ClientAddress.direct("198.51.100.1", 1000)))
    await authenticator.authenticate(credentials(address=BEHIND_PROXY))
    first, second = RecordingPlugin.sessions
    assert first is not second
    assert (first.remote_address, second.remote_address) == ("198.51.100.1", "203.0.113.9")
    assert first.attributes["realip_broker.proxy_address"] is None


async def test_context_as_amqtt_builds_it() -> None:
    authenticator = await started(f"{HERE}.RecordingPlugin", {"answer": None, "label": "x"})
    (context,) = RecordingPlugin.contexts
    assert isinstance(context.config, RecordingPlugin.Config)
    assert (context.config.answer, context.config.label) == (None, "x")
    assert context.logger.name == "amqtt.broker.plugins.RecordingPlugin"
    assert context.loop is asyncio.get_running_loop()
    assert not hasattr(context, "retained_messages")  # amqtt's broker state is not reachable
    assert await authenticator.authenticate(credentials()) == Verdict(Outcome.IGNORE)


@pytest.mark.parametrize(
    ("answer", "outcome"), [(True, Outcome.ALLOW), (False, Outcome.DENY), (None, Outcome.IGNORE)]
)
async def test_answers(answer: bool | None, outcome: Outcome) -> None:
    authenticator = await started(f"{HERE}.RecordingPlugin", {"answer": answer})
    verdict = await authenticator.authenticate(credentials())
    assert (verdict.outcome, verdict.error, verdict.is_superuser) == (outcome, False, False)


async def test_hooks_run_as_amqtt_fires_them() -> None:
    authenticator = await started(f"{HERE}.RecordingPlugin")
    assert RecordingPlugin.events == ["pre_start", "post_start"]
    await authenticator.close()
    assert RecordingPlugin.events == ["pre_start", "post_start", "pre_shutdown", "post_shutdown", "close"]
    await authenticator.close()  # a second close does nothing
    assert len(RecordingPlugin.events) == 5
    verdict = await authenticator.authenticate(credentials())
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)


# --- failing plugins --------------------------------------------------------------------------


async def test_raising_plugin_is_an_error_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    authenticator = await started(f"{HERE}.RaisingPlugin")
    with caplog.at_level(logging.WARNING, logger="broker.auth.amqtt_plugin"):
        for _ in range(3):
            verdict = await authenticator.authenticate(credentials())
            assert verdict == Verdict(
                Outcome.IGNORE, reason="amqtt_plugin:RaisingPlugin raised RuntimeError", error=True
            )
    records = [r for r in caplog.records if r.name == "broker.auth.amqtt_plugin"]
    assert len(records) == 1  # throttled
    message = records[0].getMessage()
    assert "RuntimeError" in message and "203.0.113.9" in message and "127.0.0.1" in message
    assert SECRET_PASSWORD not in message


async def test_odd_answer_is_an_error() -> None:
    authenticator = await started(f"{HERE}.OddAnswerPlugin")
    verdict = await authenticator.authenticate(credentials())
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)


async def test_slow_plugin_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqtt_plugin, "PLUGIN_TIMEOUT", 0.05)
    authenticator = await started(f"{HERE}.SlowPlugin")
    verdict = await authenticator.authenticate(credentials())
    assert verdict == Verdict(Outcome.IGNORE, reason="amqtt_plugin:SlowPlugin timed out", error=True)


async def test_broker_state_is_not_available() -> None:
    authenticator = await started(f"{HERE}.BrokerStatePlugin")
    verdict = await authenticator.authenticate(credentials())
    assert verdict == Verdict(
        Outcome.IGNORE, reason="amqtt_plugin:BrokerStatePlugin raised AttributeError", error=True
    )


# --- start() refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "tests.unit.no_such_module.Plugin",
            r"cannot import tests\.unit\.no_such_module: ModuleNotFoundError",
        ),
        (f"{HERE}.Missing", r"has no 'Missing'"),
        (f"{HERE}.NotAPlugin", "not an amqtt authentication plugin"),
        (f"{HERE}.TopicOnlyPlugin", "not an amqtt authentication plugin"),
        (f"{HERE}.HERE", "not an amqtt authentication plugin"),
        (f"{HERE}.SyncPlugin", r"authenticate\(\) is not a coroutine"),
        (f"{HERE}.FailingInitPlugin", "could not be set up: OSError: directory server unreachable"),
        (f"{HERE}.FailingStartPlugin", r"on_broker_pre_start\(\) failed: ConnectionError"),
        ("amqtt.contrib.nothing_here.Plugin", r"amqtt\[contrib\]"),
    ],
)
async def test_start_refusals(path: str, message: str) -> None:
    with pytest.raises(AuthError, match=message) as raised:
        await started(path)
    assert path in str(raised.value)


async def test_unknown_config_key_of_a_test_plugin() -> None:
    with pytest.raises(AuthError, match=r"unknown config key\(s\) 'anwser' \(it takes: answer, label\)"):
        await started(f"{HERE}.RecordingPlugin", {"anwser": True})
