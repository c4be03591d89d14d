"""The password file authenticator against files written by the real mosquitto_passwd."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import argon2
import pytest

from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.auth.password_file import PasswordFileAuthenticator, read_password_file
from broker.auth.passwords import PasswordChecks, hash_password
from broker.settings import PasswordFileSettings
from listeners.address import ClientAddress
from tests.support import require_binary

USERS = {"alice": "alice pw", "bob": "b0b:secret", "carol": "carol pw"}


def mosquitto_passwd(path: Path, *args: str) -> None:
    """Run the real mosquitto_passwd in batch mode."""
    subprocess.run([require_binary("mosquitto_passwd"), *args], check=True, capture_output=True, timeout=10)


def touch_later(path: Path) -> None:
    """Give the file an mtime clearly different from the one read (no same-timestamp flakiness)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 7_000_000_000))


def credentials(username: str | None, password: bytes | None) -> Credentials:
    return Credentials(
        client_id="dev-1",
        username=username,
        password=password,
        address=ClientAddress.direct("192.0.2.7", 40000),
        listener_id="tcp:default",
        proto_ver=5,
    )


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    """alice and bob ($7$, mosquitto 2.0's default) and carol ($6$, mosquitto 1.x's)."""
    path = tmp_path / "passwd"
    mosquitto_passwd(path, "-c", "-b", str(path), "alice", USERS["alice"])
    mosquitto_passwd(path, "-b", str(path), "bob", USERS["bob"])
    mosquitto_passwd(path, "-H", "sha512", "-b", str(path), "carol", USERS["carol"])
    return path


@pytest.fixture
async def checks() -> AsyncIterator[PasswordChecks]:
    made = PasswordChecks(workers=2, max_pending=16)
    yield made
    made.close()


async def started(path: Path, checks: PasswordChecks) -> PasswordFileAuthenticator:
    authenticator = PasswordFileAuthenticator(PasswordFileSettings(path=str(path)), checks)
    await authenticator.start()
    return authenticator


async def test_users_of_a_mosquitto_passwd_file(passwd: Path, checks: PasswordChecks) -> None:
    lines = passwd.read_text().splitlines()
    assert [line.split(":", 1)[1][:3] for line in lines] == ["$7$", "$7$", "$6$"]
    authenticator = await started(passwd, checks)
    assert authenticator.name == "password_based:password_file"
    assert len(authenticator) == 3
    for username, password in USERS.items():
        assert await authenticator.authenticate(credentials(username, password.encode())) == Verdict(
            Outcome.ALLOW
        )
        wrong = await authenticator.authenticate(credentials(username, password.encode() + b"!"))
        assert wrong == Verdict(Outcome.DENY, reason="bad password")
    assert await authenticator.authenticate(credentials("alice", None)) == Verdict(
        Outcome.DENY, reason="no password"
    )
    unknown = await authenticator.authenticate(credentials("mallory", b"alice pw"))
    assert unknown.outcome is Outcome.IGNORE
    assert not unknown.error
    assert (await authenticator.authenticate(credentials(None, b"alice pw"))).outcome is Outcome.IGNORE
    assert (await authenticator.authenticate(credentials("", b"alice pw"))).outcome is Outcome.IGNORE
    assert checks.pending == 0
    await authenticator.close()


async def test_comments_blank_lines_blanks_and_argon2id(
    passwd: Path, checks: PasswordChecks, tmp_path: Path
) -> None:
    # mosquitto (the broker) skips comments and trims blanks; mosquitto 2.1 writes $argon2id$.
    dave = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("dave pw")
    erin = hash_password("erin pw", "pbkdf2")
    path = tmp_path / "edited"
    path.write_text(
        "# users of the plant\n\n"
        + passwd.read_text().replace("\n", "\r\n", 1)
        + f"  dave : {dave}  \n   \n\t# erin was added by hand\nerin:{erin}"
    )
    authenticator = await started(path, checks)
    assert len(authenticator) == 5
    assert (await authenticator.authenticate(credentials("alice", b"alice pw"))).outcome is Outcome.ALLOW
    assert (await authenticator.authenticate(credentials("dave", b"dave pw"))).outcome is Outcome.ALLOW
    assert (await authenticator.authenticate(credentials("dave", b"dave"))).outcome is Outcome.DENY
    assert (await authenticator.authenticate(credentials("erin", b"erin pw"))).outcome is Outcome.ALLOW


async def test_the_file_is_reloaded_when_it_changes(passwd: Path, checks: PasswordChecks) -> None:
    authenticator = await started(passwd, checks)
    assert (await authenticator.authenticate(credentials("dave", b"dave pw"))).outcome is Outcome.IGNORE
    # mosquitto_passwd edits the file in place (same inode): mtime and size tell.
    mosquitto_passwd(passwd, "-b", str(passwd), "bob", "new bob pw")
    mosquitto_passwd(passwd, "-b", str(passwd), "dave", "dave pw")
    touch_later(passwd)
    assert (await authenticator.authenticate(credentials("dave", b"dave pw"))).outcome is Outcome.ALLOW
    assert (await authenticator.authenticate(credentials("bob", b"b0b:secret"))).outcome is Outcome.DENY
    assert (await authenticator.authenticate(credentials("bob", b"new bob pw"))).outcome is Outcome.ALLOW
    assert len(authenticator) == 4

    # A password changed to one of the same length: same size, same inode; the mtime tells.
    size = passwd.stat().st_size
    mosquitto_passwd(passwd, "-b", str(passwd), "bob", "NEW BOB PW")
    assert passwd.stat().st_size == size
    touch_later(passwd)
    assert (await authenticator.authenticate(credentials("bob", b"NEW BOB PW"))).outcome is Outcome.ALLOW

    # An atomic replacement (a new inode), as configuration management tools write.
    replacement = passwd.with_name("passwd.new")
    mosquitto_passwd(replacement, "-c", "-b", str(replacement), "frank", "frank pw")
    os.replace(replacement, passwd)
    assert (await authenticator.authenticate(credentials("frank", b"frank pw"))).outcome is Outcome.ALLOW
    assert (await authenticator.authenticate(credentials("alice", b"alice pw"))).outcome is Outcome.IGNORE


async def test_an_invalid_rewrite_keeps_the_old_users_and_is_logged_once(
    passwd: Path, checks: PasswordChecks, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator = await started(passwd, checks)
    good = passwd.read_text()
    passwd.write_text(good + "dave\n")
    touch_later(passwd)
    caplog.set_level(logging.INFO, logger="broker.auth.password_file")
    for _ in range(3):
        verdict = await authenticator.authenticate(credentials("alice", b"alice pw"))
        assert verdict.outcome is Outcome.ALLOW
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert f"{passwd}:4: expected 'username:hash'" in errors[0].getMessage()
    assert "3 user(s) read before" in errors[0].getMessage()

    # A plaintext line (not yet `mosquitto_passwd -U`): refused, and never quoted in the log.
    caplog.clear()
    passwd.write_text(good + "dave:Pl41nT3xt\n")
    touch_later(passwd)
    assert (await authenticator.authenticate(credentials("dave", b"Pl41nT3xt"))).outcome is Outcome.IGNORE
    assert f"{passwd}:4: user 'dave'" in caplog.text
    assert "Pl41nT3xt" not in caplog.text

    # Removed: the users read before stay, the failure is logged once.
    caplog.clear()
    passwd.unlink()
    for _ in range(2):
        assert (await authenticator.authenticate(credentials("bob", b"b0b:secret"))).outcome is Outcome.ALLOW
    assert caplog.text.count("cannot read the password file") == 1

    # Fixed: taken at once.
    caplog.clear()
    passwd.write_text(good)
    assert (await authenticator.authenticate(credentials("carol", b"carol pw"))).outcome is Outcome.ALLOW
    assert "password file reloaded, 3 user(s)" in caplog.text
    assert not [record for record in caplog.records if record.levelno == logging.ERROR]


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (b"zed\n", 2, "expected 'username:hash', found no ':'"),
        (b":$6$abc$def\n", 2, "the user name is empty"),
        (b"zed:\n", 2, "user 'zed' has no password hash"),
        (b"zed:  \t\n", 2, "user 'zed' has no password hash"),
        (b"zed:hunter2\n", 2, "user 'zed': the password hash is in no known format"),
        (b"zed:$7$101$abc$def\n", 2, "user 'zed': the password hash is in no known format"),
        (b"\n# fine\nzed:\xff\n", 4, "the line is not UTF-8"),
    ],
)
async def test_start_refuses_a_malformed_file_naming_path_and_line(
    passwd: Path, checks: PasswordChecks, content: bytes, line: int, message: str
) -> None:
    first = passwd.read_bytes().splitlines(keepends=True)[0]
    passwd.write_bytes(first + content)
    with pytest.raises(AuthError) as caught:
        await started(passwd, checks)
    assert f"{passwd}:{line}: {message}" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_a_user_named_twice_is_refused(passwd: Path, checks: PasswordChecks) -> None:
    lines = passwd.read_text().splitlines()
    passwd.write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(AuthError, match=r"passwd:4: user 'alice' is already defined on line 1"):
        await started(passwd, checks)


async def test_start_refuses_a_missing_or_unreadable_file(tmp_path: Path, checks: PasswordChecks) -> None:
    missing = tmp_path / "nowhere" / "passwd"
    with pytest.raises(AuthError, match=f"{missing}: cannot read the password file: No such file"):
        await started(missing, checks)
    with pytest.raises(AuthError, match=f"{tmp_path}: cannot read the password file"):
        await started(tmp_path, checks)  # a directory


def test_read_password_file_gives_the_signature_of_what_it_read(passwd: Path) -> None:
    signature, users = read_password_file(passwd)
    stat = passwd.stat()
    assert signature == (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    assert sorted(users) == ["alice", "bob", "carol"]


async def test_busy_checks_are_an_error_not_a_refusal(passwd: Path) -> None:
    checks = PasswordChecks(workers=1, max_pending=1)
    try:
        authenticator = await started(passwd, checks)
        slow = hash_password("x", "pbkdf2")
        occupying = asyncio.create_task(checks.verify(b"x", slow))
        await asyncio.sleep(0)  # one loop step: the check is now pending
        assert checks.pending == 1
        busy = Verdict(Outcome.IGNORE, error=True, reason="password checks busy")
        assert await authenticator.authenticate(credentials("alice", b"alice pw")) == busy
        assert await authenticator.authenticate(credentials("mallory", b"x")) == busy
        assert await occupying is True
        assert (await authenticator.authenticate(credentials("alice", b"alice pw"))).outcome is Outcome.ALLOW
    finally:
        checks.close()


async def test_passwords_never_reach_the_log_or_the_reason(
    passwd: Path, checks: PasswordChecks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    authenticator = await started(passwd, checks)
    verdicts = [
        await authenticator.authenticate(credentials("alice", b"Wr0ngPassw0rd")),
        await authenticator.authenticate(credentials("nobody", b"Wr0ngPassw0rd")),
        await authenticator.authenticate(credentials("alice", b"alice pw")),
    ]
    assert all(
        "Wr0ngPassw0rd" not in verdict.reason and "alice pw" not in verdict.reason for verdict in verdicts
    )
    assert "Wr0ngPassw0rd" not in caplog.text
    assert "alice pw" not in caplog.text
