"""Bans (values, expiry, persistence), access rules and the audit log, as units."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from broker import access
from broker.access import Gatekeeper
from broker.audit import AuditLog
from broker.bans import Ban, BanError, BanStore, canonical_value, parse_until
from broker.mqtt import reasons
from broker.settings import AccessSettings, Settings, load_settings
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


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(tcp: dict[str, object] | None = None, failure_ban: dict[str, object] | None = None) -> Settings:
    """The default listeners, tcp:default with ``tcp`` set, and ``failure_ban``."""
    return load_settings(
        {
            "listeners": {"tcp": {"default": {"bind": "127.0.0.1:0", **(tcp or {})}}},
            "authentication_policy": {"failure_ban": failure_ban or {}},
        }
    )


def refusal_of(gate: Gatekeeper, ip: str = "203.0.113.7", listener: str = "tcp:default") -> str | None:
    refusal = gate.check_client(listener, ip, "c1", None)
    return None if refusal is None else refusal.reason


def test_max_connections_per_ip_counts_connected_clients_per_listener_and_address(tmp_path: Path) -> None:
    gate = Gatekeeper(limited({"max_connections_per_ip": 2}), BanStore(tmp_path))
    ip = "203.0.113.7"
    assert refusal_of(gate, ip) is None
    gate.connected("tcp:default", ip)
    assert refusal_of(gate, ip) is None
    gate.connected("tcp:default", ip)
    refusal = gate.check_client("tcp:default", ip, "c3", None)
    assert refusal is not None
    assert (refusal.reason, refusal.code) == ("connections_per_ip", reasons.QUOTA_EXCEEDED)
    assert refusal.code == 0x97
    assert "listeners.tcp.default.max_connections_per_ip" in refusal.message and ip in refusal.message
    assert refusal_of(gate, "203.0.113.8") is None  # its neighbour behind the same balancer
    gate.connected("ws:default", ip)
    gate.connected("ws:default", ip)
    gate.connected("ws:default", ip)
    assert refusal_of(gate, ip, "ws:default") is None  # ws:default has no limit
    gate.disconnected("tcp:default", ip)
    assert refusal_of(gate, ip) is None
    gate.disconnected("tcp:default", ip)
    gate.disconnected("tcp:default", ip)  # one too many: never below zero
    gate.connected("tcp:default", ip)
    gate.connected("tcp:default", ip)
    assert refusal_of(gate, ip) == "connections_per_ip"


def test_max_conn_rate_per_ip_is_a_token_bucket_per_address(tmp_path: Path) -> None:
    clock = Clock()
    gate = Gatekeeper(limited({"max_conn_rate_per_ip": "3/s"}), BanStore(tmp_path), clock=clock)
    ip = "203.0.113.7"
    assert [refusal_of(gate, ip) for _ in range(4)] == [None, None, None, "conn_rate"]
    refusal = gate.check_client("tcp:default", ip, "c1", None)
    assert refusal is not None
    assert (refusal.reason, refusal.code) == ("conn_rate", reasons.CONNECTION_RATE_EXCEEDED)
    assert refusal.code == 0x9F
    assert "3/s" in refusal.message and "listeners.tcp.default.max_conn_rate_per_ip" in refusal.message
    assert refusal_of(gate, "203.0.113.8") is None  # another address has its own bucket
    assert refusal_of(gate, ip, "ws:default") is None  # and another listener its own limits
    clock.now += 1 / 3  # one token back
    assert [refusal_of(gate, ip) for _ in range(2)] == [None, "conn_rate"]
    clock.now += 10  # refilled to the burst, not beyond
    assert [refusal_of(gate, ip) for _ in range(4)] == [None, None, None, "conn_rate"]


@pytest.mark.parametrize(
    ("rate", "times", "admitted"),
    [
        ("1/s", [0.0, 0.5, 1.0, 1.5, 2.0], [True, False, True, False, True]),
        ("2/m", [0.0, 1.0, 2.0, 30.0, 31.0, 60.0], [True, True, False, True, False, True]),
        ("5/10s", [0.0] * 6, [True] * 5 + [False]),
        ("1/h", [0.0, 3599.0, 3600.0], [True, False, True]),
    ],
)
def test_conn_rate_truth_table(tmp_path: Path, rate: str, times: list[float], admitted: list[bool]) -> None:
    clock = Clock()
    start = clock.now
    gate = Gatekeeper(limited({"max_conn_rate_per_ip": rate}), BanStore(tmp_path), clock=clock)
    results = []
    for moment in times:
        clock.now = start + moment
        results.append(refusal_of(gate) is None)
    assert results == admitted


def test_a_connect_refused_for_connections_per_ip_still_counts_towards_the_rate(tmp_path: Path) -> None:
    clock = Clock()
    settings = limited({"max_conn_rate_per_ip": "2/m", "max_connections_per_ip": 1})
    gate = Gatekeeper(settings, BanStore(tmp_path), clock=clock)
    gate.connected("tcp:default", "203.0.113.7")
    assert [refusal_of(gate) for _ in range(3)] == ["connections_per_ip", "connections_per_ip", "conn_rate"]


def test_the_rate_tables_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "MAX_TRACKED_ADDRESSES", 3)
    clock = Clock()
    gate = Gatekeeper(limited({"max_conn_rate_per_ip": "1/h"}), BanStore(tmp_path), clock=clock)
    addresses = [f"198.51.100.{n}" for n in range(1, 5)]
    assert [refusal_of(gate, ip) for ip in addresses] == [None] * 4
    # The fourth pushed the oldest out: forgotten, it may connect again (more lenient, never less).
    assert refusal_of(gate, addresses[0]) is None
    assert [refusal_of(gate, ip) for ip in addresses[2:]] == ["conn_rate", "conn_rate"]


def failure_gate(
    tmp_path: Path, clock: Clock, **failure_ban: object
) -> tuple[Gatekeeper, BanStore, list[tuple[Ban, int]]]:
    bans = BanStore(tmp_path)
    told: list[tuple[Ban, int]] = []
    settings = limited(failure_ban={"max_count": 3, "window_time": "60s", "ban_time": "5m", **failure_ban})
    gate = Gatekeeper(settings, bans, on_ban=lambda ban, count: told.append((ban, count)), clock=clock)
    return gate, bans, told


def test_failed_authentications_ban_the_address(tmp_path: Path) -> None:
    clock = Clock()
    gate, bans, told = failure_gate(tmp_path, clock)
    ip = "203.0.113.7"
    before = time.time()
    assert gate.authentication_failed(ip) is None
    clock.now += 30
    assert gate.authentication_failed(ip) is None
    assert gate.authentication_failed("203.0.113.8") is None  # another address counts apart
    clock.now += 30  # 60s after the first: still within the window
    ban = gate.authentication_failed(ip)
    after = time.time()
    assert ban is not None
    assert (ban.kind, ban.value, ban.by) == ("peerhost", ip, "failure_ban")
    assert before <= ban.at <= after
    assert ban.until is not None and ban.until - ban.at == 300.0
    assert ban.reason == "3 failed authentications within 60s (authentication_policy.failure_ban)"
    assert told == [(ban, 3)]
    assert gate.failure_bans == 1
    assert bans.match(ip) == ban
    refusal = gate.check_address("tcp:default", ip)
    assert refusal is not None and (refusal.reason, refusal.code) == ("banned", reasons.BANNED)
    assert refusal.code == 0x8A
    assert gate.check_address("tcp:default", "203.0.113.8") is None  # its neighbour is not banned
    reloaded = BanStore(tmp_path)
    reloaded.load()
    assert [(b.kind, b.value, b.by) for b in reloaded] == [("peerhost", ip, "failure_ban")]
    # Banned, its count starts again.
    assert gate.authentication_failed(ip) is None
    assert gate.authentication_failed(ip) is None
    assert gate.authentication_failed(ip) is not None
    assert [count for _, count in told] == [3, 3]
    assert gate.failure_bans == 2


@pytest.mark.parametrize(
    ("offsets", "banned_at"),
    [
        ([0, 10, 20], 2),
        ([0, 30, 60], 2),  # the window includes its end
        ([0, 30, 60.5, 70, 80], 4),  # the third is past the window: the count restarts at it
        ([0, 61, 122, 183], None),  # never three within a window
        # The window starts at the first failure and does not slide (EMQX's flapping detection):
        # 59, 61 and 62 are within 3s of each other, but 61 opened a new window.
        ([0, 59, 61, 62], None),
        ([0, 59, 61, 62, 63], 4),
    ],
)
def test_failures_outside_the_window_restart_the_count(
    tmp_path: Path, offsets: list[float], banned_at: int | None
) -> None:
    clock = Clock()
    gate, _, told = failure_gate(tmp_path, clock)
    start = clock.now
    results = []
    for offset in offsets:
        clock.now = start + offset
        results.append(gate.authentication_failed("203.0.113.7") is not None)
    assert results == [index == banned_at for index in range(len(offsets))]
    assert len(told) == (banned_at is not None)


def test_a_disabled_failure_ban_never_bans(tmp_path: Path) -> None:
    clock = Clock()
    gate, bans, told = failure_gate(tmp_path, clock, enable=False, max_count=1)
    assert [gate.authentication_failed("203.0.113.7") for _ in range(20)] == [None] * 20
    assert (len(bans), told, gate.failure_bans) == (0, [], 0)


def test_the_failure_table_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "MAX_TRACKED_ADDRESSES", 3)
    clock = Clock()
    gate, _, told = failure_gate(tmp_path, clock, max_count=2)
    addresses = [f"198.51.100.{n}" for n in range(1, 5)]
    assert [gate.authentication_failed(ip) for ip in addresses] == [None] * 4
    assert gate.authentication_failed(addresses[0]) is None  # forgotten: its count restarted
    assert gate.authentication_failed(addresses[3]) is not None
    assert [ban.value for ban, _ in told] == [addresses[3]]


def test_a_ban_that_cannot_be_written_is_not_reported(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the data directory should be")
    clock = Clock()
    told: list[tuple[Ban, int]] = []
    settings = limited(failure_ban={"max_count": 1})
    gate = Gatekeeper(
        settings, BanStore(tmp_path / "blocked"), on_ban=lambda b, c: told.append((b, c)), clock=clock
    )
    assert gate.authentication_failed("203.0.113.7") is None
    assert (told, gate.failure_bans, gate.check_address("tcp:default", "203.0.113.7")) == ([], 0, None)


def test_check_connections_asks_only_the_connection_limit(tmp_path: Path) -> None:
    clock = Clock()
    settings = limited({"max_connections_per_ip": 1, "max_conn_rate_per_ip": "1/h"})
    gate = Gatekeeper(settings, BanStore(tmp_path), clock=clock)
    ip = "203.0.113.7"
    assert refusal_of(gate, ip) is None  # takes the only token
    assert [gate.check_connections("tcp:default", ip) for _ in range(3)] == [None] * 3  # no token taken
    gate.connected("tcp:default", ip)
    refusal = gate.check_connections("tcp:default", ip)
    assert refusal is not None and (refusal.reason, refusal.code) == ("connections_per_ip", 0x97)
    assert gate.check_connections("ws:default", ip) is None
    assert gate.check_connections("tcp:unknown", ip) is None
