"""Bans (values, expiry, persistence), access rules and the audit log, as units."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from broker.access import Gatekeeper
from broker.audit import AuditLog
from broker.bans import Ban, BanError, BanStore, canonical_value, parse_until
from broker.settings import AccessSettings, load_settings
from listeners.address import Networks


@pytest.mark.parametrize(
    ("kind", "value", "canonical"),
    [
        ("peerhost", "10.0.0.1", "10.0.0.1"),
        ("peerhost", "::ffff:10.0.0.1", "10.0.0.1"),
        ("peerhost", "2001:DB8::1", "2001:db8::1"),
        ("peerhost", "10.0.0.0/8", "10.0.0.0/8"),
        ("clientid", "dev 1", "dev 1"),
        ("username", "alice", "alice"),
    ],
)
def test_canonical_values(kind: str, value: str, canonical: str) -> None:
    assert canonical_value(kind, value) == canonical


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("ip", "1.2.3.4", "is not one of peerhost, clientid, username"),
        ("peerhost", "1.2.3.400", "is not an IP address"),
        ("peerhost", "10.0.0.1/8", "has host bits set"),
        ("clientid", "", "1 to 1024 characters"),
        ("username", "x" * 1025, "1 to 1024 characters"),
    ],
)
def test_invalid_values(kind: str, value: str, message: str) -> None:
    with pytest.raises(BanError, match=message):
        canonical_value(kind, value)


def test_until() -> None:
    now = 1_800_000_000.0
    assert parse_until("1h", now) == now + 3600
    assert parse_until("2030-01-01T00:00:00Z", now) == 1893456000.0
    for bad, message in [
        ("yesterday", "neither"),
        ("2020-01-01T00:00:00Z", "not in the future"),
        ("2030-13-01", "ISO"),
    ]:
        with pytest.raises(BanError, match=message):
            parse_until(bad, now)


def test_store_matches_persists_and_expires(tmp_path: Path) -> None:
    store = BanStore(tmp_path)
    store.add(Ban("peerhost", "10.0.0.0/24", "net", at=1.0))
    store.add(Ban("clientid", "evil", at=1.0))
    store.add(Ban("username", "mallory", at=1.0, until=time.time() - 1))  # already expired
    assert store.match("10.0.0.7") is not None
    assert store.match("::ffff:10.0.0.7") is not None
    assert store.match("10.0.1.7") is None
    assert store.match(None, "evil") is not None
    assert store.match(None, "good", "mallory") is None  # expired
    reloaded = BanStore(tmp_path)
    reloaded.load()
    assert sorted((ban.kind, ban.value) for ban in reloaded) == [
        ("clientid", "evil"),
        ("peerhost", "10.0.0.0/24"),
    ]
    assert [ban.value for ban in reloaded.purge()] == ["mallory"]
    assert len(reloaded) == 2
    assert reloaded.delete("peerhost", "10.0.0.0/24") is not None
    assert reloaded.delete("peerhost", "10.0.0.0/24") is None
    assert json.loads((tmp_path / "bans.json").read_text())["bans"][0]["value"] == "evil"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".bans-")]  # no temp files left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a valid ban file"),
        ('{"bans": [{"kind": "x", "value": "y"}]}', "not a valid ban file"),
        ("[]", "no 'bans'"),
    ],
)
def test_a_bad_ban_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bans.json").write_text(content)
    with pytest.raises(BanError, match=message):
        BanStore(tmp_path).load()


def test_a_failed_write_leaves_the_list_unchanged(tmp_path: Path) -> None:
    store = BanStore(tmp_path / "missing" / "dir")
    (tmp_path / "missing").write_text("a file where the directory should be")
    with pytest.raises(BanError, match="cannot write the ban file"):
        store.add(Ban("clientid", "x"))
    assert len(store) == 0


@pytest.mark.parametrize(
    ("allow", "deny", "ip", "refused"),
    [
        ([], [], "1.2.3.4", False),
        ([], ["1.2.3.0/24"], "1.2.3.4", True),
        (["10.0.0.0/8"], [], "1.2.3.4", True),
        (["10.0.0.0/8"], [], "10.1.2.3", False),
        (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3", True),  # deny wins
        ([], ["::1/128"], "::1", True),
    ],
)
def test_access_rules(allow: list[str], deny: list[str], ip: str, refused: bool) -> None:
    assert AccessSettings(Networks.parse(allow), Networks.parse(deny)).refuses(ip) is refused


def test_gatekeeper_listener_rules_replace_the_global_ones(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "access": {"deny": ["10.0.0.0/8"]},
            "listeners": {"tcp": {"open": {"bind": "127.0.0.1:0", "access": {"deny": []}}}},
        }
    )
    bans = BanStore(tmp_path)
    gate = Gatekeeper(settings, bans)
    assert gate.check_address("tcp:default", "10.1.1.1") is not None
    assert gate.check_address("tcp:open", "10.1.1.1") is None
    bans.add(Ban("username", "bob"))
    refusal = gate.check_client("tcp:open", "10.1.1.1", "c1", "bob")
    assert refusal is not None and refusal.reason == "banned"


def test_audit_log_reopens_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    log.open()
    log.write("connected", clientid="a", ip="1.2.3.4", port=1, skipped=None)
    os.rename(path, tmp_path / "audit.log.1")  # logrotate's default: move, then the writer recreates
    log.write("connected", clientid="b")
    log.close()
    old = [json.loads(line) for line in (tmp_path / "audit.log.1").read_text().splitlines()]
    new = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["clientid"] for r in old] == ["a"]
    assert [r["clientid"] for r in new] == ["b"]
    assert "skipped" not in old[0] and old[0]["event"] == "connected" and old[0]["ip"] == "1.2.3.4"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
