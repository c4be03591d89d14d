"""The built-in user database: its file, its users' hashes and SCRAM keys, its authenticator."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import json
import os
import stat
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramClient, ScramException, ScramMechanism  # type: ignore[import-untyped]

from broker.auth.base import Credentials, Outcome, Verdict
from broker.auth.builtin import MAX_USERNAME_LENGTH, BuiltinAuthenticator, User, UserError, UserStore
from broker.auth.passwords import PasswordChecks, verify_password
from listeners.address import ClientAddress

PASSWORDS = {"alice": "alice's Pa55word", "bob": "bob pw", "carol": "carol pw"}


@pytest.fixture(scope="module")
def users() -> dict[str, User]:
    """Made once (hashing is the slow part): one user per hash algorithm, alice a superuser."""
    return {
        "alice": UserStore.make_user("alice", PASSWORDS["alice"], is_superuser=True, algorithm="argon2id"),
        "bob": UserStore.make_user("bob", PASSWORDS["bob"], is_superuser=False, algorithm="bcrypt"),
        "carol": UserStore.make_user("carol", PASSWORDS["carol"], is_superuser=False, algorithm="pbkdf2"),
    }


def fresh(data_dir: Path) -> UserStore:
    store = UserStore(data_dir)
    store.load()
    return store


def credentials(username: str | None, password: bytes | None) -> Credentials:
    return Credentials(
        client_id="dev-1",
        username=username,
        password=password,
        address=ClientAddress.direct("198.51.100.4", 50000),
        listener_id="tcp:default",
        proto_ver=4,
    )


def test_make_user_hashes_and_derives_scram_keys(users: dict[str, User]) -> None:
    alice = users["alice"]
    assert alice.password_hash.startswith("$argon2id$")
    assert users["bob"].password_hash.startswith("$2b$")
    assert users["carol"].password_hash.startswith("$pbkdf2-sha512$")
    for name, user in users.items():
        assert verify_password(PASSWORDS[name].encode(), user.password_hash)
        assert sorted(user.scram) == ["sha256", "sha512"]
        assert len(user.scram["sha256"].stored_key) == 32
        assert len(user.scram["sha512"].server_key) == 64
        assert user.scram["sha256"].iterations == 4096
    assert alice.is_superuser
    assert not users["bob"].is_superuser


def test_a_user_never_shows_its_secrets(users: dict[str, User]) -> None:
    alice = users["alice"]
    secrets = [alice.password_hash, *alice.password_hash.split("$")[-2:]]
    for credentials_ in alice.scram.values():
        for value in (credentials_.stored_key, credentials_.server_key):
            secrets += [repr(value), base64.b64encode(value).decode(), value.hex()]
    for text in (repr(alice), str(alice), repr(alice.scram), str(alice.as_json())):
        assert "alice" in text or "sha256" in text
        for secret in secrets:
            assert secret not in text
    document = alice.as_json()
    assert document == {
        "user_id": "alice",
        "is_superuser": True,
        "created_at": datetime.fromisoformat(document["created_at"]).isoformat(timespec="seconds"),
    }
    assert abs(datetime.fromisoformat(document["created_at"]).timestamp() - alice.created_at) < 1


def test_add_get_list_replace_delete_survive_a_reload(tmp_path: Path, users: dict[str, User]) -> None:
    store = fresh(tmp_path)
    assert len(store) == 0
    assert store.list() == []
    for name in ("carol", "alice", "bob"):
        store.add(users[name])
    assert [user.username for user in store.list()] == ["alice", "bob", "carol"]

    reloaded = fresh(tmp_path)
    assert len(reloaded) == 3
    assert reloaded.list() == [users["alice"], users["bob"], users["carol"]]
    assert reloaded.get("bob") == users["bob"]
    assert reloaded.get("nobody") is None

    newer = dataclasses.replace(users["carol"], password_hash=users["alice"].password_hash, is_superuser=True)
    newer = dataclasses.replace(newer, created_at=newer.created_at + 1000)
    stored = reloaded.replace(newer)
    assert stored.created_at == users["carol"].created_at  # created once, whatever the password
    assert stored.is_superuser
    again = fresh(tmp_path)
    assert again.get("carol") == stored
    assert verify_password(PASSWORDS["alice"].encode(), again.get("carol").password_hash)  # type: ignore[union-attr]

    assert again.delete("bob") == users["bob"]
    assert [user.username for user in fresh(tmp_path).list()] == ["alice", "carol"]
    # Both users left have argon2id hashes: an unknown user's check costs what theirs do.
    assert again.typical_hash() == users["alice"].password_hash


def test_duplicates_and_unknown_users_are_refused(tmp_path: Path, users: dict[str, User]) -> None:
    store = fresh(tmp_path)
    store.add(users["alice"])
    with pytest.raises(UserError, match="user 'alice' already exists"):
        store.add(users["alice"])
    with pytest.raises(UserError, match="user 'bob' does not exist"):
        store.delete("bob")
    with pytest.raises(UserError, match="user 'bob' does not exist"):
        store.replace(users["bob"])
    assert [user.username for user in fresh(tmp_path).list()] == ["alice"]


@pytest.mark.parametrize(
    ("username", "password", "options", "message"),
    [
        ("", "pw", {}, "the user name must not be empty"),
        ("x" * (MAX_USERNAME_LENGTH + 1), "pw", {}, f"longer than {MAX_USERNAME_LENGTH} characters"),
        ("a\x00b", "pw", {}, "control character"),
        ("a\nb", "pw", {}, "control character"),
        ("a\ud800", "pw", {}, "not valid UTF-8"),
        ("dave", "", {}, "the password must not be empty"),
        ("dave", "x" * 65536, {}, "longer than 65535 bytes"),
        ("dave", "pw", {"algorithm": "md5"}, "unknown password hash algorithm 'md5'"),
        ("dave", "x" * 73, {"algorithm": "bcrypt"}, "bcrypt takes at most 72 bytes"),
        ("dave", "pw", {"iteration_count": 100}, "iteration count must be between 4096"),
        ("dave", "bell\x07", {}, "cannot be used for SCRAM"),
    ],
)
def test_invalid_users_are_refused(
    username: str, password: str, options: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"is_superuser": False, "algorithm": "pbkdf2", **options}
    with pytest.raises(UserError, match=message) as caught:
        UserStore.make_user(username, password, **arguments)
    if password:
        assert password not in str(caught.value)


def test_the_longest_user_name_is_taken() -> None:
    user = UserStore.make_user("ü" * MAX_USERNAME_LENGTH, "pw", is_superuser=False, algorithm="pbkdf2")
    assert len(user.username) == MAX_USERNAME_LENGTH


def test_the_file_is_private_and_holds_no_plaintext(tmp_path: Path, users: dict[str, User]) -> None:
    data_dir = tmp_path / "data"
    store = fresh(data_dir)
    for user in users.values():
        store.add(user)
    path = data_dir / "users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    for password in PASSWORDS.values():
        assert password.encode() not in raw
        assert base64.b64encode(password.encode()) not in raw
    document = json.loads(raw)
    assert document["version"] == 1
    assert [entry["username"] for entry in document["users"]] == ["alice", "bob", "carol"]
    assert (
        base64.b64decode(document["users"][0]["scram"]["sha256"]["salt"])
        == users["alice"].scram["sha256"].salt
    )
    assert sorted(os.listdir(data_dir)) == ["users.json"]  # no temporary file left behind


def _valid_document(users: dict[str, User], tmp_path: Path) -> dict[str, Any]:
    store = fresh(tmp_path / "model")
    store.add(users["alice"])
    document: dict[str, Any] = json.loads((tmp_path / "model" / "users.json").read_text())
    return document


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "not json {", "Expecting value"),
        (lambda d: [], "not a version 1 user file"),
        (lambda d: {**d, "version": 2}, "not a version 1 user file"),
        (lambda d: {"version": 1}, "no 'users' list"),
        (lambda d: {**d, "users": ["alice"]}, "a user is not an object"),
        (lambda d: {**d, "users": [{**d["users"][0], "username": ""}]}, "the user name must not be empty"),
        (
            lambda d: {**d, "users": [{k: v for k, v in d["users"][0].items() if k != "password_hash"}]},
            "missing",
        ),
        (lambda d: {**d, "users": [{**d["users"][0], "password_hash": "hunter2"}]}, "no known format"),
        (lambda d: {**d, "users": [{**d["users"][0], "is_superuser": "yes"}]}, "is_superuser"),
        (lambda d: {**d, "users": [{**d["users"][0], "created_at": "today"}]}, "created_at"),
        (lambda d: {**d, "users": [{**d["users"][0], "scram": {"md5": {}}}]}, "unknown SCRAM algorithm"),
        (
            lambda d: {
                **d,
                "users": [
                    {**d["users"][0], "scram": {"sha256": {**d["users"][0]["scram"]["sha256"], "salt": "!!"}}}
                ],
            },
            "base64|Non-base64|Incorrect",
        ),
        (
            lambda d: {
                **d,
                "users": [{**d["users"][0], "scram": {"sha256": d["users"][0]["scram"]["sha512"]}}],
            },
            "wrong length",
        ),
        (lambda d: {**d, "users": [d["users"][0], d["users"][0]]}, "appears twice"),
    ],
)
def test_a_corrupt_file_is_refused_naming_its_path(
    tmp_path: Path, users: dict[str, User], mutate: Any, message: str
) -> None:
    document = mutate(_valid_document(users, tmp_path))
    path = tmp_path / "users.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(UserError, match=message) as caught:
        fresh(tmp_path)
    assert str(caught.value).startswith(f"{path}: not a valid user file (")
    assert "hunter2" not in str(caught.value)


def test_an_unreadable_file_is_refused_naming_its_path(tmp_path: Path) -> None:
    (tmp_path / "users.json").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'users.json'}: cannot read the user file"):
        fresh(tmp_path)


def test_a_failed_write_changes_nothing(
    tmp_path: Path, users: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fresh(tmp_path)
    store.add(users["alice"])
    store.add(users["bob"])
    before = (tmp_path / "users.json").read_bytes()

    def full_disk(source: Any, destination: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(
        UserError, match=f"{tmp_path / 'users.json'}: cannot write the user file: No space left"
    ):
        store.add(users["carol"])
    with pytest.raises(UserError, match="cannot write"):
        store.delete("bob")
    with pytest.raises(UserError, match="cannot write"):
        store.replace(dataclasses.replace(users["alice"], is_superuser=False))
    monkeypatch.undo()

    assert [user.username for user in store.list()] == ["alice", "bob"]
    assert store.get("carol") is None
    assert store.get("alice") == users["alice"]
    assert (tmp_path / "users.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["users.json"]
    # And it works again once the disk does.
    store.add(users["carol"])
    assert len(fresh(tmp_path)) == 3


def test_a_read_only_data_dir_changes_nothing(tmp_path: Path, users: dict[str, User]) -> None:
    if os.geteuid() == 0:
        pytest.skip(
            "root writes into read-only directories (test_a_failed_write_changes_nothing covers this)"
        )
    store = fresh(tmp_path)
    store.add(users["alice"])
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write the user file"):
            store.add(users["bob"])
    finally:
        tmp_path.chmod(0o700)
    assert [user.username for user in store.list()] == ["alice"]


@pytest.mark.parametrize(
    ("algorithm", "mechanism"), [("sha256", "SCRAM-SHA-256"), ("sha512", "SCRAM-SHA-512")]
)
def test_scram_credentials_pass_scramps_own_exchange(
    users: dict[str, User], algorithm: str, mechanism: str
) -> None:
    stored = {name: user.scram[algorithm] for name, user in users.items()}

    def auth_fn(username: str) -> tuple[bytes, bytes, bytes, int] | None:
        found = stored.get(username)
        if found is None:
            return None
        return found.salt, found.stored_key, found.server_key, found.iterations

    def exchange(username: str, password: str) -> None:
        client = ScramClient([mechanism], username, password)
        server = ScramMechanism(mechanism).make_server(auth_fn)
        server.set_client_first(client.get_client_first())
        client.set_server_first(server.get_server_first())
        server.set_client_final(client.get_client_final())
        client.set_server_final(server.get_server_final())  # the client checks the server too

    exchange("alice", PASSWORDS["alice"])
    exchange("carol", PASSWORDS["carol"])
    with pytest.raises(ScramException):
        exchange("alice", PASSWORDS["carol"])
    assert stored["alice"].salt != stored["carol"].salt


@pytest.fixture
async def checks() -> AsyncIterator[PasswordChecks]:
    made = PasswordChecks(workers=2, max_pending=16)
    yield made
    made.close()


async def test_builtin_authenticator(tmp_path: Path, users: dict[str, User], checks: PasswordChecks) -> None:
    store = fresh(tmp_path)
    for user in users.values():
        store.add(user)
    authenticator = BuiltinAuthenticator(store, checks)
    assert authenticator.name == "password_based:built_in_database"
    await authenticator.start()
    allow = await authenticator.authenticate(credentials("alice", PASSWORDS["alice"].encode()))
    assert allow == Verdict(Outcome.ALLOW, is_superuser=True)
    allow = await authenticator.authenticate(credentials("carol", PASSWORDS["carol"].encode()))
    assert allow == Verdict(Outcome.ALLOW, is_superuser=False)
    deny = await authenticator.authenticate(credentials("alice", PASSWORDS["carol"].encode()))
    assert deny == Verdict(Outcome.DENY, reason="bad password")
    assert await authenticator.authenticate(credentials("alice", None)) == Verdict(
        Outcome.DENY, reason="no password"
    )
    unknown = await authenticator.authenticate(credentials("mallory", PASSWORDS["alice"].encode()))
    assert unknown.outcome is Outcome.IGNORE
    assert not unknown.error
    assert (await authenticator.authenticate(credentials(None, b"x"))).outcome is Outcome.IGNORE
    # The store is read live: a user deleted is unknown at once.
    store.delete("carol")
    gone = await authenticator.authenticate(credentials("carol", PASSWORDS["carol"].encode()))
    assert gone.outcome is Outcome.IGNORE
    await authenticator.close()


async def test_builtin_authenticator_when_checks_are_busy(tmp_path: Path, users: dict[str, User]) -> None:
    store = fresh(tmp_path)
    store.add(users["carol"])
    checks = PasswordChecks(workers=1, max_pending=1)
    try:
        authenticator = BuiltinAuthenticator(store, checks)
        task = asyncio.create_task(checks.verify(b"x", users["carol"].password_hash))
        await asyncio.sleep(0)  # one loop step: the check is now pending
        assert checks.pending == 1
        busy = Verdict(Outcome.IGNORE, error=True, reason="password checks busy")
        assert await authenticator.authenticate(credentials("carol", PASSWORDS["carol"].encode())) == busy
        assert await authenticator.authenticate(credentials("mallory", b"x")) == busy
        assert await task is False
    finally:
        checks.close()
