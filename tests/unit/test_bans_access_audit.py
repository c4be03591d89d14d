"""Bans (values, expiry, persistence), access rules and the audit log, as units."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import access, files
from broker import bans as bans_module
from broker.access import Gatekeeper
from broker.audit import AuditLog
from broker.bans import Ban, BanError, BanStore, canonical_value, parse_until
from broker.mqtt import reasons
from broker.settings import AccessSettings, Settings, load_settings
from listeners.address import Networks, parse_network


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
    store.flush()
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
    reloaded.flush()
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


def test_a_failed_write_keeps_the_ban_in_memory_and_flush_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BanStore(tmp_path / "missing" / "dir")
    (tmp_path / "missing").write_text("a file where the directory should be")
    store.add(Ban("clientid", "x"))  # memory first: no error here
    assert len(store) == 1 and store.match(None, "x") is not None
    with pytest.raises(BanError, match="cannot write the ban file: Not a directory"):
        store.flush()
    assert store.write_failures >= 1
    assert any(
        record.levelno == logging.ERROR and str(store.path) in record.getMessage()
        for record in caplog.records
    )
    assert store.match(None, "x") is not None  # the ban still applies


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
    bans.flush()
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


def test_a_ban_that_cannot_be_written_still_applies_and_is_reported(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the data directory should be")
    clock = Clock()
    told: list[tuple[Ban, int]] = []
    settings = limited(failure_ban={"max_count": 1})
    bans = BanStore(tmp_path / "blocked")
    gate = Gatekeeper(settings, bans, on_ban=lambda b, c: told.append((b, c)), clock=clock)
    ban = gate.authentication_failed("203.0.113.7")
    assert ban is not None
    assert (told, gate.failure_bans) == ([(ban, 1)], 1)
    refusal = gate.check_address("tcp:default", "203.0.113.7")
    assert refusal is not None and refusal.reason == "banned"
    with pytest.raises(BanError, match="cannot write the ban file"):
        bans.flush()
    assert bans.write_failures >= 1


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


# --------------------------------------------------------------------------------------------------
# Matching at scale (issue 15): one index instead of a scan, the file written in the background


def store_with(tmp_path: Path, *values: str, expired: tuple[str, ...] = ()) -> BanStore:
    """A store with a ``peerhost`` ban per value (those in ``expired`` already expired)."""
    store = BanStore(tmp_path)
    for value in values:
        store.add(Ban("peerhost", value, value, at=1.0, until=1.0 if value in expired else None))
    return store


@pytest.mark.parametrize(
    ("bans", "ip", "matched"),
    [
        # Exact addresses, both families, and the ways they are written.
        (["10.0.0.1"], "10.0.0.1", "10.0.0.1"),
        (["10.0.0.1"], "10.0.0.2", None),
        (["10.0.0.1"], "::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped client
        (["::ffff:10.0.0.1"], "10.0.0.1", "10.0.0.1"),  # IPv4-mapped ban, stored as IPv4
        (["10.0.0.1/32"], "10.0.0.1", "10.0.0.1/32"),
        (["2001:db8::1"], "2001:db8::1", "2001:db8::1"),
        (["2001:db8::1"], "2001:DB8:0::1", "2001:db8::1"),
        (["2001:db8::1/128"], "2001:db8::1", "2001:db8::1/128"),
        (["2001:db8::1"], "2001:db8::2", None),
        (["fe80::1%eth0"], "fe80::1", "fe80::1%eth0"),  # a zone index is ignored, as Networks does
        (["fe80::1"], "fe80::1%eth1", "fe80::1"),
        # Networks of several lengths.
        (["10.0.0.0/8"], "10.255.1.2", "10.0.0.0/8"),
        (["10.0.0.0/8"], "11.0.0.1", None),
        (["10.1.2.0/23"], "10.1.3.255", "10.1.2.0/23"),
        (["10.1.2.0/23"], "10.1.4.0", None),
        (["10.1.2.4/31"], "10.1.2.5", "10.1.2.4/31"),
        (["0.0.0.0/0"], "198.51.100.1", "0.0.0.0/0"),
        (["0.0.0.0/0"], "::ffff:198.51.100.1", "0.0.0.0/0"),
        (["0.0.0.0/0"], "2001:db8::1", None),  # an IPv4 network never holds an IPv6 client
        (["::/0"], "2001:db8::1", "::/0"),
        (["::/0"], "::ffff:10.0.0.1", None),  # a mapped client is compared as IPv4 (Networks)
        (["::ffff:10.0.0.0/104"], "10.1.2.3", "10.0.0.0/8"),
        (["2001:db8::/32"], "2001:db8:ffff::1", "2001:db8::/32"),
        (["2001:db8::/33"], "2001:db8:8000::1", None),
        (["2001:db8::/127"], "2001:db8::1", "2001:db8::/127"),
        # Overlaps: the most specific ban is the one returned.
        (["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"], "10.1.2.3", "10.1.2.0/24"),
        (["10.1.2.0/24", "10.1.0.0/16", "10.0.0.0/8"], "10.1.9.9", "10.1.0.0/16"),
        (["10.0.0.0/8", "10.1.2.3"], "10.1.2.3", "10.1.2.3"),
        (["10.1.2.3/32", "10.1.2.3"], "10.1.2.3", "10.1.2.3/32"),  # same addresses: the first added
        (["2001:db8::/32", "2001:db8::/64", "::/0"], "2001:db8::5", "2001:db8::/64"),
        # Not an address: nothing matches, nothing raises.
        (["0.0.0.0/0", "::/0"], "not-an-ip", None),
        (["0.0.0.0/0"], "", None),
    ],
)
def test_peerhost_matching_truth_table(tmp_path: Path, bans: list[str], ip: str, matched: str | None) -> None:
    store = store_with(tmp_path, *bans)
    ban = store.match(ip)
    assert (None if ban is None else ban.value) == matched  # the stored (canonical) value
    assert store.match(None) is None
    # Ban.applies_to agrees for each ban (broker/operations.py asks it of live clients).
    for held in store:
        expected = Networks([parse_network(held.value)]).contains(ip)
        assert held.applies_to(ip, None, None) is expected


@pytest.mark.parametrize(
    ("bans", "expired", "ip", "matched"),
    [
        (["10.1.2.3"], ["10.1.2.3"], "10.1.2.3", None),
        (["10.0.0.0/8", "10.1.2.3"], ["10.1.2.3"], "10.1.2.3", "10.0.0.0/8"),  # falls back to the wider
        (["10.0.0.0/8", "10.1.0.0/16"], ["10.1.0.0/16"], "10.1.2.3", "10.0.0.0/8"),
        (["10.1.2.3/32", "10.1.2.3"], ["10.1.2.3/32"], "10.1.2.3", "10.1.2.3"),  # same slot, next one
        (["10.0.0.0/8", "10.1.0.0/16"], ["10.0.0.0/8", "10.1.0.0/16"], "10.1.2.3", None),
        (["2001:db8::/32", "2001:db8::1"], ["2001:db8::1"], "2001:db8::1", "2001:db8::/32"),
    ],
)
def test_expired_bans_are_skipped(
    tmp_path: Path, bans: list[str], expired: list[str], ip: str, matched: str | None
) -> None:
    store = store_with(tmp_path, *bans, expired=tuple(expired))
    ban = store.match(ip)
    assert (None if ban is None else ban.reason) == matched


def test_clientid_and_username_bans(tmp_path: Path) -> None:
    store = BanStore(tmp_path)
    assert store.match("10.0.0.1", "anyone", "anybody") is None  # no bans at all
    store.add(Ban("clientid", "evil", "c"))
    store.add(Ban("username", "mallory", "u"))
    store.add(Ban("username", "gone", "old", until=time.time() - 1))
    store.add(Ban("peerhost", "10.0.0.0/8", "p"))
    cases = [
        (("10.0.0.1", "evil", "mallory"), "c"),  # clientid first, then username, then peerhost
        (("10.0.0.1", "good", "mallory"), "u"),
        (("10.0.0.1", "good", "alice"), "p"),
        ((None, "good", "alice"), None),
        ((None, "Evil", None), None),  # exact, case-sensitive
        ((None, None, "gone"), None),  # expired
        (("192.0.2.1", None, "mallory"), "u"),
        (("192.0.2.1", "mallory", None), None),  # a username ban is not a clientid ban
    ]
    for (ip, client_id, username), reason in cases:
        ban = store.match(ip, client_id, username)
        assert (None if ban is None else ban.reason) == reason, (ip, client_id, username)
    evil = store.match(None, "evil")
    assert evil is not None and evil.applies_to(None, "evil", None)
    assert not evil.applies_to("10.0.0.1", "good", "evil")


def matched_value(store: BanStore, ip: str) -> str | None:
    ban = store.match(ip)
    return None if ban is None else ban.value


def test_delete_and_purge_update_the_index(tmp_path: Path) -> None:
    store = store_with(tmp_path, "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "2001:db8::/32")
    assert store.delete("peerhost", "10.1.2.3") is not None
    assert matched_value(store, "10.1.2.3") == "10.1.0.0/16"
    assert store.delete("peerhost", "10.1.0.0/16") is not None
    assert matched_value(store, "10.1.2.3") == "10.0.0.0/8"
    store.add(Ban("peerhost", "10.1.2.0/24", "replaced", until=100.0))
    store.add(Ban("peerhost", "10.1.2.0/24", "replacement", until=100.0))  # same value: replaced
    assert matched_value(store, "10.1.2.3") == "10.0.0.0/8"  # the /24 has expired
    assert [ban.reason for ban in store.purge(now=200.0)] == ["replacement"]
    assert store.delete("peerhost", "10.0.0.0/8") is not None
    assert matched_value(store, "10.1.2.3") is None
    assert matched_value(store, "2001:db8::1") == "2001:db8::/32"
    assert store.delete("peerhost", "2001:db8::/32") is not None
    assert (matched_value(store, "2001:db8::1"), len(store)) == (None, 0)


def _reference_matches(bans: dict[tuple[str, str], Ban], ip: str | None, now: float) -> list[Ban]:
    """The old BanStore.match's peerhost part, a scan of every ban: every unexpired ban holding ``ip``."""
    if ip is None:
        return []
    return [
        ban
        for ban in bans.values()
        if ban.kind == "peerhost"
        and not ban.expired(now)
        and Networks([parse_network(ban.value)]).contains(ip)
    ]


def _prefix_length(ban: Ban) -> int:
    return parse_network(ban.value).prefixlen


_V4 = st.builds(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)), st.integers(0, 511))
_V6 = st.builds(lambda n: str(ipaddress.IPv6Address(0x20010DB8 << 96 | n)), st.integers(0, 511))
_NETWORK = st.one_of(
    st.builds(
        lambda n, p: str(ipaddress.IPv4Network((0x0A000000 + n, p), strict=False)),
        st.integers(0, 511),
        st.integers(0, 32),
    ),
    st.builds(
        lambda n, p: str(ipaddress.IPv6Network((0x20010DB8 << 96 | n, p), strict=False)),
        st.integers(0, 511),
        st.sampled_from([0, 16, 32, 100, 118, 119, 120, 121, 124, 126, 127, 128]),
    ),
    # IPv4-mapped networks (stored as IPv4), and exact addresses written plainly.
    st.builds(
        lambda n, p: str(ipaddress.IPv6Network(((0xFFFF << 32) + 0x0A000000 + n, 96 + p), strict=False)),
        st.integers(0, 511),
        st.integers(0, 32),
    ),
    _V4,
    _V6,
)
_CLIENT = st.one_of(
    _V4,
    _V6,
    _V4.map(lambda ip: f"::ffff:{ip}"),
    _V6.map(lambda ip: f"{ip}%eth0"),
    st.just("garbage"),
)
_BAN = st.tuples(
    st.sampled_from(["peerhost"] * 6 + ["clientid", "username"]),
    _NETWORK,
    st.sampled_from(["a", "b", "c"]),
    st.booleans(),  # expired
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(_BAN, max_size=30),
    st.lists(
        st.tuples(_CLIENT, st.sampled_from([None, "a", "z"]), st.sampled_from([None, "b", "z"])), max_size=12
    ),
)
def test_match_agrees_with_a_scan_of_every_ban(
    tmp_path: Path,
    bans: list[tuple[str, str, str, bool]],
    clients: list[tuple[str, str | None, str | None]],
) -> None:
    now = time.time()
    store = BanStore(tmp_path)
    reference: dict[tuple[str, str], Ban] = {}
    for kind, network, name, expired in bans:
        value = network if kind == "peerhost" else name
        stored = store.add(Ban(kind, value, until=now - 1 if expired else None))
        reference[(stored.kind, stored.value)] = stored
    # Some deleted again, so that removal is exercised too.
    for key in list(reference)[::3]:
        assert store.delete(*key) is not None
        del reference[key]
    assert len(store) == len(reference)
    for ip, client_id, username in clients:
        got = store.match(ip, client_id, username)
        for kind, wanted in (("clientid", client_id), ("username", username)):
            held = reference.get((kind, wanted)) if wanted is not None else None
            if held is not None and not held.expired(now):
                assert got == held  # as before: clientid, then username
                break
        else:
            matches = _reference_matches(reference, ip, now)
            if not matches:
                assert got is None
            else:
                assert got in matches
                assert _prefix_length(got) == max(_prefix_length(ban) for ban in matches)
        for ban in reference.values():
            expected = (
                Networks([parse_network(ban.value)]).contains(ip)
                if ban.kind == "peerhost"
                else (client_id if ban.kind == "clientid" else username) == ban.value
            )
            assert ban.applies_to(ip, client_id, username) is expected
    store.flush()


def test_bans_persist_after_flush_across_a_new_store(tmp_path: Path) -> None:
    store = BanStore(tmp_path)
    until = time.time() + 3600
    added = [
        store.add(Ban("peerhost", "192.0.2.1", "one", "admin", 10.0)),
        store.add(Ban("peerhost", "198.51.100.0/24", "net", "ops", 11.0, until)),
        store.add(Ban("peerhost", "2001:db8::/48", "six", "admin", 12.0)),
        store.add(Ban("clientid", "dev-1", "", "admin", 13.0)),
        store.add(Ban("username", "mallory", "abuse", "failure_ban", 14.0, until)),
    ]
    store.delete("peerhost", "192.0.2.1")
    store.flush()
    store.flush()  # nothing left to write: returns at once
    reloaded = BanStore(tmp_path)
    reloaded.load()
    assert list(reloaded) == added[1:]
    assert reloaded.match("198.51.100.7") == added[1]
    assert reloaded.match("2001:db8:0:1::1") == added[2]
    assert reloaded.match("192.0.2.1") is None
    assert reloaded.match(None, "dev-1") == added[3]
    document = json.loads((tmp_path / "bans.json").read_text())
    assert document["version"] == 1
    assert document["bans"][0] == {
        "kind": "peerhost",
        "value": "198.51.100.0/24",
        "reason": "net",
        "by": "ops",
        "at": 11.0,
        "until": until,
    }
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".bans-")]


def test_a_burst_of_bans_makes_few_writes_of_the_latest_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real = files.replace_atomically

    def counting(path: Path, data: bytes) -> None:
        writes.append(len(json.loads(data)["bans"]))
        real(path, data)

    monkeypatch.setattr(bans_module, "replace_atomically", counting)
    store = BanStore(tmp_path)
    for n in range(1000):
        store.add(Ban("peerhost", str(ipaddress.IPv4Address(0xC6336400 + n)), "burst"))  # 198.51.100.0 on
    assert store.match("198.51.103.231") is not None  # in memory at once, file or not
    store.flush()
    assert 1 <= len(writes) < 50, writes  # coalesced: a handful, not 1,000
    assert writes[-1] == 1000  # the last write holds the whole list
    reloaded = BanStore(tmp_path)
    reloaded.load()
    assert len(reloaded) == 1000


def test_a_failing_write_is_logged_counted_and_retried_at_the_next_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.bans")
    real = files.replace_atomically
    failing = [True]

    def flaky(path: Path, data: bytes) -> None:
        if failing[0]:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(bans_module, "replace_atomically", flaky)
    store = BanStore(tmp_path)
    store.add(Ban("clientid", "first"))
    with pytest.raises(BanError, match=r"bans\.json: cannot write the ban file: No space left on device"):
        store.flush()
    assert store.write_failures >= 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors and str(store.path) in errors[0] and "No space left on device" in errors[0]
    assert store.match(None, "first") is not None  # applies from memory meanwhile
    assert not (tmp_path / "bans.json").exists()
    failures = store.write_failures
    failing[0] = False  # the disc has room again
    store.add(Ban("clientid", "second"))  # the next change retries, with the whole list
    store.flush()
    assert store.write_failures == failures
    reloaded = BanStore(tmp_path)
    reloaded.load()
    assert sorted(ban.value for ban in reloaded) == ["first", "second"]
    assert any("written again" in record.getMessage() for record in caplog.records)


def test_flush_retries_a_failed_write_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = files.replace_atomically
    failing = [True]

    def flaky(path: Path, data: bytes) -> None:
        if failing[0]:
            raise OSError("read-only file system")
        real(path, data)

    monkeypatch.setattr(bans_module, "replace_atomically", flaky)
    store = BanStore(tmp_path)
    store.add(Ban("username", "u"))
    with pytest.raises(BanError, match="read-only file system"):
        store.flush()
    failing[0] = False
    store.flush()  # no change since: flush itself tries again (the broker's stop calls it)
    assert json.loads((tmp_path / "bans.json").read_text())["bans"][0]["value"] == "u"


def test_purge_and_delete_are_written_too(tmp_path: Path) -> None:
    store = BanStore(tmp_path)
    store.add(Ban("peerhost", "10.0.0.0/8", until=100.0))
    store.add(Ban("clientid", "kept"))
    store.add(Ban("clientid", "dropped"))
    store.flush()
    assert [ban.value for ban in store.purge(now=200.0)] == ["10.0.0.0/8"]
    store.delete("clientid", "dropped")
    store.flush()
    values = [entry["value"] for entry in json.loads((tmp_path / "bans.json").read_text())["bans"]]
    assert values == ["kept"]


def test_no_writer_thread_is_a_failed_write_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: object) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        store = BanStore(tmp_path)
        store.add(Ban("clientid", "x"))  # the ban applies all the same
        assert (store.match(None, "x") is not None, store.write_failures) == (True, 1)
        with pytest.raises(BanError, match="cannot start the writer thread"):
            store.flush()
    store.flush()  # threads again: flush retries
    assert json.loads((tmp_path / "bans.json").read_text())["bans"][0]["value"] == "x"
