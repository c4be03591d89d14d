"""Password hashes (ours and mosquitto_passwd's) and the worker-thread checks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import subprocess
import threading
from pathlib import Path

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pwdlib.hashers.bcrypt import BcryptHasher

from broker.auth import passwords
from broker.auth.passwords import (
    ALGORITHMS,
    PBKDF2_ITERATIONS,
    PasswordChecks,
    dummy_hash,
    hash_password,
    is_known_format,
    typical_hash,
    verify_dummy,
    verify_password,
)
from broker.settings import HASH_ALGORITHMS
from tests.support import require_binary

#: Cheap argon2 parameters for hashes the tests make themselves (not through hash_password).
CHEAP_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
CHEAP_BCRYPT = BcryptHasher(rounds=4).hash("pw")


def mosquitto_passwd_lines(tmp_path: Path, *users: tuple[str, str, str]) -> dict[str, str]:
    """Run the real mosquitto_passwd for (user, password, -H algorithm) and return user -> hash."""
    binary = require_binary("mosquitto_passwd")
    path = tmp_path / "passwd"
    for index, (user, password, algorithm) in enumerate(users):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            [binary, "-H", algorithm, *create, "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=10,
        )
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if line)


def test_the_settings_name_the_same_algorithms() -> None:
    assert ALGORITHMS == HASH_ALGORITHMS


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_round_trips(algorithm: str) -> None:
    encoded = hash_password("correct horse é", algorithm)
    assert is_known_format(encoded)
    assert verify_password("correct horse é".encode(), encoded)
    assert not verify_password(b"correct horse e", encoded)
    assert not verify_password(b"", encoded)


def test_pbkdf2_format_is_the_documented_one() -> None:
    encoded = hash_password("pw", "pbkdf2")
    match = re.fullmatch(r"\$pbkdf2-sha512\$i=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)", encoded)
    assert match is not None, encoded
    assert int(match[1]) == PBKDF2_ITERATIONS
    salt = base64.b64decode(match[2] + "==")
    digest = base64.b64decode(match[3] + "==")
    assert len(salt) == 16
    assert hashlib.pbkdf2_hmac("sha512", b"pw", salt, PBKDF2_ITERATIONS) == digest
    assert hash_password("pw", "pbkdf2") != encoded  # a fresh salt every time


def test_unknown_algorithm_and_long_bcrypt_password_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown password hash algorithm 'md5'"):
        hash_password("pw", "md5")
    with pytest.raises(ValueError, match="at most 72 bytes"):
        hash_password("x" * 73, "bcrypt")
    encoded = CHEAP_BCRYPT
    assert verify_password(b"pw", encoded)
    assert not verify_password(b"pw" + b"x" * 80, encoded)  # bcrypt 5 would raise: a mismatch here


def test_passwords_are_bytes_not_text() -> None:
    # Not UTF-8: a mismatch for the libraries that take text, fine for the formats we compute.
    assert not verify_password(b"\xff\xfe", CHEAP_ARGON2.hash("pw"))
    assert not verify_password(b"\xff\xfe", CHEAP_BCRYPT)
    salt = b"0123456789ab"
    digest = hashlib.pbkdf2_hmac("sha512", b"\xff\xfe", salt, 101)
    encoded = f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password(b"\xff\xfe", encoded)
    assert not verify_password(b"\xff\xff", encoded)


def test_mosquitto_pbkdf2_from_the_real_mosquitto_passwd(tmp_path: Path) -> None:
    hashes = mosquitto_passwd_lines(tmp_path, ("alice", "s3cret pass", "sha512-pbkdf2"))
    encoded = hashes["alice"]
    assert encoded.startswith("$7$")
    assert verify_password(b"s3cret pass", encoded)
    assert not verify_password(b"s3cret pasS", encoded)
    assert not verify_password(b"", encoded)


def test_mosquitto_sha512_from_the_real_mosquitto_passwd(tmp_path: Path) -> None:
    hashes = mosquitto_passwd_lines(tmp_path, ("bob", "b0b!", "sha512"))
    assert hashes["bob"].startswith("$6$")
    assert verify_password(b"b0b!", hashes["bob"])
    assert not verify_password(b"b0b", hashes["bob"])


def test_mosquitto_sha512_computed_by_the_documented_algorithm() -> None:
    salt = bytes(range(12))
    digest = hashlib.sha512(b"old password" + salt).digest()
    encoded = f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password(b"old password", encoded)
    assert not verify_password(b"old passwor", encoded)
    # Padding is optional.
    assert verify_password(b"old password", encoded.replace("=", ""))


def test_argon2id_from_argon2_cffi_as_mosquitto_2_1_writes() -> None:
    encoded = CHEAP_ARGON2.hash("pa:ss")
    assert encoded.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert verify_password(b"pa:ss", encoded)
    assert not verify_password(b"pa:sS", encoded)


_SALT = base64.b64encode(bytes(12)).decode()
_HASH = base64.b64encode(bytes(64)).decode()


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plaintext",
        "$",
        "$$$$",
        "$7$",
        "$7$101$",
        f"$7$101${_SALT}$",
        f"$7$101${_SALT}",
        f"$7$abc${_SALT}${_HASH}",
        f"$7$0${_SALT}${_HASH}",
        f"$7$-5${_SALT}${_HASH}",
        f"$7$\u0661\u0660\u0661${_SALT}${_HASH}",  # Arabic-Indic digits: int() would take them
        f"$7$99999999999${_SALT}${_HASH}",
        f"$7${passwords.MAX_PBKDF2_ITERATIONS + 1}${_SALT}${_HASH}",
        f"$7$101$!!!!${_HASH}",
        f"$7$101$${_HASH}",
        f"$7$101${_SALT}${_HASH[:-8]}",
        f"$7$101${_SALT}${_HASH}extra",
        f"$7$101${_SALT}${_HASH}$",
        f" $7$101${_SALT}${_HASH}",
        "$6$",
        f"$6${_SALT}",
        f"$6${_SALT}$abcd",
        f"$6$$${_HASH}",
        "$pbkdf2-sha512$",
        f"$pbkdf2-sha512$i=${_SALT}${_HASH}",
        f"$pbkdf2-sha512$101${_SALT}${_HASH}",
        f"$pbkdf2-sha256$i=101${_SALT}${_HASH}",
        "$argon2id$",
        "$argon2id$v=19$m=65536,t=3,p=4$",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$",
        "$argon2id$v=19$m=99999999,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=8,t=99,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=8,t=1,p=99$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2x$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$2b$12$short",
        "$2b$99$" + "a" * 53,
        "$2b$31$" + "a" * 53,
        "$2x$04$" + "a" * 53,
        "$2b$04$" + "!" * 53,
        "$2b$04$" + "a" * 53,  # the right shape, but not a bcrypt salt+hash
        "$7$101$" + "A" * 2000,
        "x" * 100_000,
    ],
)
def test_malformed_hashes_are_mismatches(encoded: str) -> None:
    assert verify_password(b"pw", encoded) is False
    assert verify_password(b"", encoded) is False


def test_wrong_types_are_mismatches() -> None:
    assert verify_password("pw", CHEAP_BCRYPT) is False  # type: ignore[arg-type]
    assert verify_password(None, CHEAP_BCRYPT) is False  # type: ignore[arg-type]
    assert verify_password(b"pw", None) is False  # type: ignore[arg-type]
    assert verify_password(b"pw", b"$7$") is False  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(["", "$7$", "$7$101$", "$6$", "$argon2id$v=19$", "$2b$04$", "$pbkdf2-sha512$i="]),
    rest=st.text(max_size=120),
    password=st.binary(max_size=80),
)
def test_arbitrary_strings_never_raise(prefix: str, rest: str, password: bytes) -> None:
    assert verify_password(password, prefix + rest) in (True, False)
    is_known_format(prefix + rest)


def test_dummy_hashes_cost_what_the_hash_they_imitate_costs(tmp_path: Path) -> None:
    mosquitto = f"$7$101${_SALT}${_HASH}"
    assert dummy_hash(mosquitto).startswith("$7$101$")
    assert dummy_hash(mosquitto) == dummy_hash(mosquitto)  # made once
    assert is_known_format(dummy_hash(mosquitto))
    cheap = CHEAP_ARGON2.hash("pw")
    assert argon2.extract_parameters(dummy_hash(cheap)) == argon2.extract_parameters(cheap)
    assert dummy_hash(CHEAP_BCRYPT).startswith("$2b$04$")
    assert dummy_hash(f"$pbkdf2-sha512$i=5000${_SALT}${_HASH}").startswith("$pbkdf2-sha512$i=5000$")
    assert dummy_hash(f"$6${_SALT}${_HASH}").startswith("$6$")
    # Nothing to imitate: argon2id at the cost hash_password uses.
    default = argon2.extract_parameters(dummy_hash(None))
    assert default == argon2.extract_parameters(dummy_hash("garbage"))
    assert (default.memory_cost, default.time_cost, default.parallelism) == (19456, 2, 1)
    assert verify_dummy(b"pw", mosquitto) is False


def test_typical_hash_picks_the_most_common_cost() -> None:
    seven = [f"$7$101${_SALT}${_HASH}", f"$7$101${_HASH[:16]}${_HASH}"]
    assert typical_hash([CHEAP_BCRYPT, *seven, "junk"]) == seven[0]
    assert typical_hash(["junk"]) is None
    assert typical_hash([]) is None


# ------------------------------------------------------------------------------------------------
# PasswordChecks: worker threads, bounded
# ------------------------------------------------------------------------------------------------


class Gate:
    """A verify_password stand-in that blocks its worker until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls: list[tuple[bytes, str]] = []

    def __call__(self, password: bytes, encoded: str) -> bool:
        self.calls.append((password, encoded))
        self.entered.release()
        assert self.release.wait(10), "the test never released the worker"
        return password == b"right"

    async def wait_entered(self) -> None:
        """Wait (off the loop) until one more call is inside a worker."""
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.acquire, True, 10)


async def test_checks_run_in_workers_without_blocking_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(passwords, "verify_password", gate)
    checks = PasswordChecks(workers=1, max_pending=4)
    try:
        task = asyncio.create_task(checks.verify(b"right", "h"))
        await gate.wait_entered()
        # The check is in progress in its worker, and the loop runs on: we are here.
        assert checks.pending == 1
        assert not task.done()
        gate.release.set()
        assert await task is True
        assert await checks.verify(b"wrong", "h") is False
        assert checks.pending == 0
        assert checks.busy_refusals == 0
    finally:
        gate.release.set()
        checks.close()


async def test_checks_beyond_max_pending_are_refused_without_work(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(passwords, "verify_password", gate)
    checks = PasswordChecks(workers=1, max_pending=2)
    try:
        running = asyncio.create_task(checks.verify(b"right", "a"))
        await gate.wait_entered()
        waiting = asyncio.create_task(checks.verify(b"right", "b"))
        await asyncio.sleep(0)  # let it queue (one step of the loop, not a wait for time)
        assert checks.pending == 2
        assert await checks.verify(b"right", "c") is None
        assert await checks.verify_unknown(b"right", None) is None
        assert checks.busy_refusals == 2
        gate.release.set()
        assert await running is True
        assert await waiting is True
        assert [encoded for _, encoded in gate.calls] == ["a", "b"]  # "c" was never computed
        assert checks.pending == 0
        assert await checks.verify(b"right", "d") is True
    finally:
        gate.release.set()
        checks.close()


async def test_a_cancelled_caller_keeps_counting_until_its_worker_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    monkeypatch.setattr(passwords, "verify_password", gate)
    checks = PasswordChecks(workers=1, max_pending=1)
    try:
        task = asyncio.create_task(checks.verify(b"right", "a"))
        await gate.wait_entered()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The worker still computes: the bound still holds.
        assert checks.pending == 1
        assert await checks.verify(b"right", "b") is None
        gate.release.set()
        # Wait for the worker's completion to reach the loop: a check queued behind it.
        checks.max_pending = 2
        assert await checks.verify(b"right", "c") is True
        assert checks.pending == 0
    finally:
        gate.release.set()
        checks.close()


async def test_close_drops_queued_checks_and_lets_running_ones_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    monkeypatch.setattr(passwords, "verify_password", gate)
    checks = PasswordChecks(workers=1, max_pending=4)
    try:
        running = asyncio.create_task(checks.verify(b"right", "a"))
        await gate.wait_entered()
        queued = asyncio.create_task(checks.verify(b"right", "b"))
        await asyncio.sleep(0)  # one loop step: it is queued behind "a"
        checks.close()
        assert await queued is None  # dropped: refused as busy, not raised
        gate.release.set()
        assert await running is True
        assert [encoded for _, encoded in gate.calls] == ["a"]
        assert checks.pending == 0
    finally:
        gate.release.set()
        checks.close()


async def test_real_checks_hash_and_close() -> None:
    checks = PasswordChecks(workers=2, max_pending=8)
    try:
        encoded = await checks.hash("pw", "pbkdf2")
        results = await asyncio.gather(
            checks.verify(b"pw", encoded),
            checks.verify(b"px", encoded),
            checks.verify_unknown(b"pw", encoded),
        )
        assert list(results) == [True, False, False]
        with pytest.raises(ValueError, match="unknown password hash algorithm"):
            await checks.hash("pw", "md5")
    finally:
        checks.close()
    assert await checks.verify(b"pw", encoded) is None  # closed: refused, not raised


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        PasswordChecks(workers=0)
    with pytest.raises(ValueError, match="at least one worker"):
        PasswordChecks(max_pending=0)
