"""Truth tables for listeners.forwarded: who the client is, from the socket peer and the headers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ForwardedHeaderError
from listeners.address import AddressSource, Networks
from listeners.forwarded import MAX_HEADER_BYTES, MAX_HOPS, HeaderRules, Resolution, resolve

SOCKET = AddressSource.SOCKET
XFF = AddressSource.X_FORWARDED_FOR
XRI = AddressSource.X_REAL_IP
FWD = AddressSource.FORWARDED

CLIENT = "198.51.100.7"
FORGED = "6.6.6.6"
OUTSIDER = "203.0.113.9"  # a peer that is not a trusted proxy
LB1 = "10.0.0.1"
LB2 = "10.0.0.2"
PEER_PORT = 40110


def rules(address: str = "X-Forwarded-For", port: str = "", trusted: tuple[str, ...] = ()) -> HeaderRules:
    return HeaderRules.from_values(address, port, trusted)


LEFTMOST = rules()
WALK = rules(trusted=("10.0.0.0/8", "fd00::/8"))
WALK_LBS = rules(trusted=(LB1, LB2))


def xff(*values: str, name: str = "X-Forwarded-For") -> list[tuple[str, str]]:
    return [(name, value) for value in values]


def refused(reason: str) -> ForwardedHeaderError:
    """Expected outcome: refused with this reason."""
    return ForwardedHeaderError(reason, "")


Outcome = tuple[str, int] | ForwardedHeaderError


def check(
    peer: str, headers: list[tuple[str, str]], header_rules: HeaderRules, expected: Outcome
) -> Resolution:
    if isinstance(expected, ForwardedHeaderError):
        with pytest.raises(ForwardedHeaderError) as info:
            resolve(peer, PEER_PORT, headers, header_rules)
        assert info.value.reason == expected.reason, str(info.value)
        assert str(info.value)  # a message for the log
        return Resolution(ip="", port=0)
    result = resolve(peer, PEER_PORT, headers, header_rules)
    assert (result.ip, result.port) == expected
    return result


class Untouchable:
    """A header list that fails the test if it is read."""

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise AssertionError("headers were read")


# ---------------------------------------------------------------------------------------------
# When headers are not used at all
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "header_rules"),
    [
        pytest.param(OUTSIDER, rules(address=""), id="header-off"),
        pytest.param(OUTSIDER, rules(address="", port="X-Forwarded-Port"), id="header-off-port-on"),
        pytest.param(LB1, rules(address="", trusted=(LB1,)), id="header-off-trusted-peer"),
        pytest.param(OUTSIDER, WALK, id="untrusted-peer"),
        pytest.param("::ffff:203.0.113.9", WALK, id="untrusted-peer-ipv4-mapped"),
        pytest.param("2001:db8::9", WALK, id="untrusted-peer-ipv6"),
    ],
)
def test_headers_not_read(peer: str, header_rules: HeaderRules) -> None:
    result = resolve(peer, PEER_PORT, Untouchable(), header_rules)
    assert result == Resolution(ip=peer.removeprefix("::ffff:"), port=PEER_PORT, source=SOCKET)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(FORGED, id="forged"),
        pytest.param(f"{FORGED}, {LB1}", id="forged-chain-ending-with-trusted"),
        pytest.param("garbage", id="garbage"),
        pytest.param("unknown", id="unknown"),
        pytest.param("1.2.3.4\r\nX-Injected: 1", id="crlf"),
        pytest.param("\x00", id="nul"),
        pytest.param("", id="empty"),
        pytest.param("x" * (MAX_HEADER_BYTES * 4), id="too-long"),
        pytest.param(",".join([FORGED] * (MAX_HOPS * 4)), id="too-many-hops"),
    ],
)
@pytest.mark.parametrize("name", ["X-Forwarded-For", "X-Real-IP", "Forwarded", "X-Client-IP"])
def test_untrusted_peer_forged_header_ignored(name: str, value: str) -> None:
    result = resolve(OUTSIDER, PEER_PORT, [(name, value)], rules(name, "X-Forwarded-Port", (LB1,)))
    assert result == Resolution(ip=OUTSIDER, port=PEER_PORT, source=SOCKET)


@pytest.mark.parametrize(
    ("peer", "header_rules", "headers"),
    [
        pytest.param(OUTSIDER, LEFTMOST, [], id="leftmost-no-headers"),
        pytest.param(OUTSIDER, LEFTMOST, [("X-Real-IP", CLIENT)], id="leftmost-other-header-only"),
        pytest.param(LB1, WALK, [("Host", "example.com")], id="trusted-peer-no-header"),
        pytest.param(LB1, WALK, [("X-Forwarded-Port", "1234")], id="trusted-peer-port-header-only"),
        pytest.param(LB1, rules("Forwarded", trusted=(LB1,)), xff(CLIENT), id="forwarded-mode-xff-sent"),
        pytest.param(LB1, rules("X-Real-IP", trusted=(LB1,)), xff(CLIENT), id="x-real-ip-mode-xff-sent"),
    ],
)
def test_header_absent_is_the_peer(
    peer: str, header_rules: HeaderRules, headers: list[tuple[str, str]]
) -> None:
    assert resolve(peer, PEER_PORT, headers, header_rules) == Resolution(peer, PEER_PORT, SOCKET)


# ---------------------------------------------------------------------------------------------
# Leftmost (no trusted_proxies) versus the right-to-left walk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "hop"),
    [
        pytest.param(CLIENT, (CLIENT, 0), 0, id="single"),
        pytest.param(f"{CLIENT}, {LB1}", (CLIENT, 0), 0, id="client-lb1"),
        pytest.param(f"{FORGED}, {CLIENT}, {LB1}", (FORGED, 0), 0, id="forgery-wins-without-trust-list"),
        pytest.param(f"{CLIENT},{LB1},{LB2}", (CLIENT, 0), 0, id="no-spaces"),
        pytest.param(f" \t{CLIENT} \t, {LB1}\t", (CLIENT, 0), 0, id="spaces-and-tabs"),
        pytest.param(f"{CLIENT}:61177, {LB1}", (CLIENT, 61177), 0, id="client-with-port"),
        pytest.param(f"{CLIENT}, unknown", (CLIENT, 0), 0, id="unknown-right-is-well-formed"),
        pytest.param(f"{CLIENT}, _hidden", (CLIENT, 0), 0, id="obfuscated-right-is-well-formed"),
        pytest.param("unknown, 1.2.3.4", refused("unknown_address"), None, id="unknown-leftmost"),
        pytest.param("_hidden, 1.2.3.4", refused("unknown_address"), None, id="obfuscated-leftmost"),
        pytest.param(f"{CLIENT}, garbage", refused("malformed_address"), None, id="garbage-right-refused"),
        pytest.param(f"garbage, {CLIENT}", refused("malformed_address"), None, id="garbage-leftmost"),
        pytest.param(f"{CLIENT}, {LB1}:0", refused("bad_port"), None, id="bad-port-right-refused"),
        pytest.param(f"{CLIENT} {LB1}", refused("malformed_address"), None, id="space-separated"),
        pytest.param(f"{CLIENT};{LB1}", refused("malformed_address"), None, id="semicolon-separated"),
    ],
)
def test_leftmost(value: str, expected: Outcome, hop: int | None) -> None:
    result = check(OUTSIDER, xff(value), LEFTMOST, expected)
    if hop is not None:
        assert result.hop == hop
        assert result.source is XFF
        assert result.chain == tuple(entry.strip(" \t") for entry in value.split(","))


@pytest.mark.parametrize(
    ("peer", "value", "expected", "hop"),
    [
        pytest.param(LB1, CLIENT, (CLIENT, 0), 0, id="single"),
        pytest.param(LB1, f"{FORGED}, {CLIENT}", (CLIENT, 0), 1, id="forged-then-client"),
        pytest.param(LB2, f"{FORGED}, {CLIENT}, {LB1}", (CLIENT, 0), 1, id="skip-one-trusted"),
        pytest.param(LB2, f"{FORGED}, {CLIENT}, {LB1}, {LB2}", (CLIENT, 0), 1, id="skip-two-trusted"),
        pytest.param(LB1, f"{CLIENT}, {LB2}, {OUTSIDER}, {LB1}", (OUTSIDER, 0), 2, id="first-untrusted-wins"),
        pytest.param(LB1, f"{LB2}, {LB1}", (LB2, 0), 0, id="all-trusted-leftmost"),
        pytest.param(LB1, LB2, (LB2, 0), 0, id="single-trusted"),
        pytest.param(LB1, f"::ffff:{LB2}, ::ffff:{LB1}", (LB2, 0), 0, id="all-trusted-ipv4-mapped"),
        pytest.param(LB1, f"{CLIENT}, ::ffff:{LB2}", (CLIENT, 0), 0, id="ipv4-mapped-trusted"),
        pytest.param(LB1, f"{CLIENT}, fd00::5", (CLIENT, 0), 0, id="ipv6-trusted"),
        pytest.param(LB1, f"{CLIENT}, [fd00::5]:443", (CLIENT, 0), 0, id="ipv6-trusted-with-port"),
        pytest.param(LB1, f"{CLIENT}:5000, {LB1}:443", (CLIENT, 5000), 0, id="ports-in-entries"),
        pytest.param("::ffff:10.0.0.1", CLIENT, (CLIENT, 0), 0, id="peer-ipv4-mapped-trusted"),
        pytest.param("fd00::1", CLIENT, (CLIENT, 0), 0, id="peer-ipv6-trusted"),
        # Left of the client: client-written, not interpreted.
        pytest.param(LB1, f"garbage, {CLIENT}", (CLIENT, 0), 1, id="garbage-left-of-client"),
        pytest.param(LB1, f"unknown, {CLIENT}", (CLIENT, 0), 1, id="unknown-left-of-client"),
        pytest.param(LB1, f"1.2.3.4:99999, {CLIENT}", (CLIENT, 0), 1, id="bad-port-left-of-client"),
        pytest.param(LB1, f"<script>, {CLIENT}, {LB2}", (CLIENT, 0), 1, id="markup-left-of-client"),
        # Met by the walk: interpreted strictly, never a silent fallback.
        pytest.param(LB1, f"{CLIENT}, garbage", refused("malformed_address"), None, id="garbage-on-walk"),
        pytest.param(
            LB1, f"{CLIENT}, garbage, {LB2}", refused("malformed_address"), None, id="garbage-behind-lb"
        ),
        pytest.param(LB1, f"{CLIENT}, unknown", refused("unknown_address"), None, id="unknown-on-walk"),
        pytest.param(
            LB1, f"{CLIENT}, _hidden, {LB2}", refused("unknown_address"), None, id="obfuscated-on-walk"
        ),
        pytest.param(LB1, f"unknown, {LB2}", refused("unknown_address"), None, id="all-trusted-then-unknown"),
        pytest.param(LB1, f"{CLIENT}:0", refused("bad_port"), None, id="bad-port-on-client"),
        # Structure is checked everywhere, even left of the client.
        pytest.param(LB1, f",{CLIENT}", refused("empty_entry"), None, id="empty-left-of-client"),
        pytest.param(LB1, f"{CLIENT},", refused("empty_entry"), None, id="trailing-comma"),
        pytest.param(LB1, f"a,,{CLIENT}", refused("empty_entry"), None, id="double-comma"),
        pytest.param(LB1, f"x\ty\r, {CLIENT}", refused("control_character"), None, id="cr-left-of-client"),
        pytest.param(LB1, f"é, {CLIENT}", refused("non_ascii"), None, id="non-ascii-left-of-client"),
    ],
)
def test_walk(peer: str, value: str, expected: Outcome, hop: int | None) -> None:
    result = check(peer, xff(value), WALK, expected)
    if hop is not None:
        assert result.hop == hop
        assert result.source is XFF
        assert result.chain == tuple(entry.strip(" \t") for entry in value.split(","))


# ---------------------------------------------------------------------------------------------
# The multi-tier NGINX setups of README "Behind an HTTP load balancer"
# ---------------------------------------------------------------------------------------------


def test_nginx_single_tier_remote_addr_and_port() -> None:
    # (a) proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Port $remote_port;
    headers = [("Host", "broker"), ("X-Forwarded-For", CLIENT), ("X-Forwarded-Port", "61177")]
    for trusted in [(), (LB1,)]:
        result = resolve(LB1, PEER_PORT, headers, rules(port="X-Forwarded-Port", trusted=trusted))
        assert result == Resolution(CLIENT, 61177, XFF, (CLIENT,), 0)


def test_nginx_two_tiers_outermost_overwrites_forgery_lost() -> None:
    # (b) The client sent "X-Forwarded-For: 6.6.6.6"; LB1 (outermost) overwrote it with $remote_addr and set
    # the port; LB2 appended with $proxy_add_x_forwarded_for and passed the port on. EMQX's leftmost rule.
    headers = [("X-Forwarded-For", f"{CLIENT}, {LB1}"), ("X-Forwarded-Port", "61177")]
    result = resolve(LB2, PEER_PORT, headers, rules(port="X-Forwarded-Port"))
    assert result == Resolution(CLIENT, 61177, XFF, (CLIENT, LB1), 0)


def test_nginx_two_tiers_appending_walked() -> None:
    # (c) Both tiers append: "forged, client, lb1", the broker's peer is LB2.
    headers = [("X-Forwarded-For", f"{FORGED}, {CLIENT}, {LB1}")]
    result = resolve(LB2, PEER_PORT, headers, WALK_LBS)
    assert result == Resolution(CLIENT, 0, XFF, (FORGED, CLIENT, LB1), 1)


def test_client_connecting_directly_cannot_forge() -> None:
    # (d) The client bypasses the LBs and sends its own headers.
    headers = [("X-Forwarded-For", FORGED), ("X-Forwarded-Port", "1"), ("Forwarded", f"for={FORGED}")]
    result = resolve(CLIENT, 61177, headers, rules(port="X-Forwarded-Port", trusted=(LB1, LB2)))
    assert result == Resolution(CLIENT, 61177, SOCKET)


def test_nginx_realip_tier_x_real_ip() -> None:
    # DESIGN topology 7: the innermost NGINX did the walk (real_ip_recursive on) and sends X-Real-IP.
    headers = [("X-Forwarded-For", f"{FORGED}, {CLIENT}, {LB1}"), ("X-Real-IP", CLIENT)]
    result = resolve(LB2, PEER_PORT, headers, rules("X-Real-IP", trusted=(LB2,)))
    assert result == Resolution(CLIENT, 0, XRI, (CLIENT,), 0)


# ---------------------------------------------------------------------------------------------
# One entry: address forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param("192.0.2.1", ("192.0.2.1", 0), id="ipv4"),
        pytest.param("192.0.2.1:4711", ("192.0.2.1", 4711), id="ipv4-port"),
        pytest.param("192.0.2.1:1", ("192.0.2.1", 1), id="ipv4-port-1"),
        pytest.param("192.0.2.1:65535", ("192.0.2.1", 65535), id="ipv4-port-65535"),
        pytest.param("192.0.2.1:00080", ("192.0.2.1", 80), id="ipv4-port-leading-zeros"),
        pytest.param("2001:db8::1", ("2001:db8::1", 0), id="ipv6-bare"),
        pytest.param("2001:DB8:0:0:0:0:0:1", ("2001:db8::1", 0), id="ipv6-bare-long-upper"),
        pytest.param("2001:db8::1:80", ("2001:db8::1:80", 0), id="ipv6-bare-port-is-address"),
        pytest.param("[2001:db8::1]", ("2001:db8::1", 0), id="ipv6-brackets"),
        pytest.param("[2001:db8::1]:4711", ("2001:db8::1", 4711), id="ipv6-brackets-port"),
        pytest.param("::1", ("::1", 0), id="ipv6-loopback"),
        pytest.param("::ffff:192.0.2.1", ("192.0.2.1", 0), id="ipv4-mapped"),
        pytest.param("[::ffff:192.0.2.1]:80", ("192.0.2.1", 80), id="ipv4-mapped-brackets-port"),
        pytest.param("::ffff:c000:201", ("192.0.2.1", 0), id="ipv4-mapped-hex"),
        pytest.param("192.0.2.1:_p1", ("192.0.2.1", 0), id="obfuscated-port"),
        pytest.param("unknown", refused("unknown_address"), id="unknown"),
        pytest.param("UNKNOWN", refused("unknown_address"), id="unknown-upper"),
        pytest.param("Unknown:80", refused("unknown_address"), id="unknown-port"),
        pytest.param("_hidden", refused("unknown_address"), id="obfuscated"),
        pytest.param("_a.b-c_d", refused("unknown_address"), id="obfuscated-all-chars"),
        pytest.param("_", refused("malformed_address"), id="underscore-alone"),
        pytest.param("_a/b", refused("malformed_address"), id="obfuscated-bad-char"),
        pytest.param("unknownx", refused("malformed_address"), id="unknown-prefix"),
        pytest.param("fe80::1%eth0", refused("malformed_address"), id="zone-id"),
        pytest.param("[fe80::1%25eth0]:80", refused("malformed_address"), id="zone-id-brackets"),
        pytest.param("[192.0.2.1]", refused("malformed_address"), id="ipv4-in-brackets"),
        pytest.param("[2001:db8::1", refused("malformed_address"), id="bracket-not-closed"),
        pytest.param("[2001:db8::1]80", refused("malformed_address"), id="bracket-then-junk"),
        pytest.param("[2001:db8::1]:", refused("bad_port"), id="bracket-empty-port"),
        pytest.param("[]", refused("malformed_address"), id="empty-brackets"),
        pytest.param("192.0.2.1:", refused("bad_port"), id="ipv4-empty-port"),
        pytest.param("192.0.2.1:0", refused("bad_port"), id="port-0"),
        pytest.param("192.0.2.1:65536", refused("bad_port"), id="port-65536"),
        pytest.param("192.0.2.1:123456", refused("bad_port"), id="port-6-digits"),
        pytest.param("192.0.2.1:+80", refused("bad_port"), id="port-sign"),
        pytest.param("192.0.2.1:-1", refused("bad_port"), id="port-negative"),
        pytest.param("192.0.2.1:8_0", refused("bad_port"), id="port-underscore"),
        pytest.param("192.0.2.1:0x50", refused("bad_port"), id="port-hex"),
        pytest.param("192.0.2.1: 80", refused("bad_port"), id="port-space"),
        pytest.param("192.0.2.1:80:90", refused("malformed_address"), id="two-ports"),
        pytest.param("010.0.0.1", refused("malformed_address"), id="ipv4-leading-zero"),
        pytest.param("192.0.2.256", refused("malformed_address"), id="ipv4-octet-256"),
        pytest.param("192.0.2", refused("malformed_address"), id="ipv4-three-octets"),
        pytest.param("3221225985", refused("malformed_address"), id="ipv4-integer"),
        pytest.param("0x7f.1", refused("malformed_address"), id="ipv4-hex"),
        pytest.param("2001:db8:::1", refused("malformed_address"), id="ipv6-triple-colon"),
        pytest.param("2001:db8::g", refused("malformed_address"), id="ipv6-bad-hex"),
        pytest.param("localhost", refused("malformed_address"), id="hostname"),
        pytest.param("example.com:80", refused("malformed_address"), id="hostname-port"),
        pytest.param("192.0.2.1/24", refused("malformed_address"), id="cidr"),
        pytest.param('"192.0.2.1"', refused("malformed_address"), id="quoted-in-xff"),
        pytest.param("for=192.0.2.1", refused("malformed_address"), id="forwarded-syntax-in-xff"),
        pytest.param("192.0.2.1 ", ("192.0.2.1", 0), id="trailing-space-trimmed"),
        pytest.param("\t192.0.2.1", ("192.0.2.1", 0), id="leading-tab-trimmed"),
        pytest.param("192.0.2.1 :80", refused("malformed_address"), id="space-inside"),
        pytest.param("192.0.2.1\x0b", refused("control_character"), id="vertical-tab"),
        pytest.param("192.0.2.1\u00a0", refused("non_ascii"), id="nbsp"),
        pytest.param("١٩٢.0.2.1", refused("non_ascii"), id="arabic-digits"),
        pytest.param("192.0.2.1\udcff", refused("non_ascii"), id="surrogate-escaped-byte"),
    ],
)
def test_entry_forms(entry: str, expected: Outcome) -> None:
    result = check(OUTSIDER, xff(entry), LEFTMOST, expected)
    if not isinstance(expected, ForwardedHeaderError):
        assert result.chain == (entry.strip(" \t"),)
        # The same entry at the client's hop of a walk gives the same answer.
        assert check(LB1, xff(f"{entry}, {LB2}"), WALK, expected).hop == 0


# ---------------------------------------------------------------------------------------------
# Header injection, empty and repeated header lines, names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(xff(f"{CLIENT}\r\nX-Forwarded-For: {FORGED}"), refused("control_character"), id="crlf"),
        pytest.param(xff(f"{CLIENT}\n"), refused("control_character"), id="lf"),
        pytest.param(xff(f"{CLIENT}\r"), refused("control_character"), id="cr"),
        pytest.param(xff(f"{CLIENT}\x00{FORGED}"), refused("control_character"), id="nul"),
        pytest.param(xff(f"{CLIENT}\x7f"), refused("control_character"), id="del"),
        pytest.param(xff(f"{CLIENT}\x85"), refused("control_character"), id="c1-nel"),
        pytest.param(xff(f"{CLIENT}\x1b[31m"), refused("control_character"), id="ansi-escape"),
        pytest.param(xff(f"{CLIENT}\u2028"), refused("non_ascii"), id="unicode-line-separator"),
        pytest.param(xff(f"{CLIENT}\t"), (CLIENT, 0), id="tab-is-whitespace"),
        pytest.param(xff(f"{CLIENT}, {LB1}\x00"), refused("control_character"), id="nul-right"),
        pytest.param(xff(""), refused("empty_entry"), id="empty-value"),
        pytest.param(xff("  \t "), refused("empty_entry"), id="blank-value"),
        pytest.param(xff(","), refused("empty_entry"), id="lone-comma"),
        pytest.param(xff(CLIENT, ""), refused("empty_entry"), id="second-line-empty"),
        pytest.param(xff(CLIENT, LB1), (CLIENT, 0), id="two-lines-joined"),
        pytest.param(xff(f"{CLIENT}, {LB1}", LB2), (CLIENT, 0), id="lines-joined-in-order"),
        pytest.param([("x-forwarded-for", CLIENT)], (CLIENT, 0), id="lower-case-name"),
        pytest.param([("X-FORWARDED-FOR", CLIENT)], (CLIENT, 0), id="upper-case-name"),
        pytest.param(
            [("X-Forwarded-For-Extra", FORGED), ("X-Forwarded-For", CLIENT)], (CLIENT, 0), id="prefix-name"
        ),
    ],
)
def test_header_lines_leftmost(headers: list[tuple[str, str]], expected: Outcome) -> None:
    check(OUTSIDER, headers, LEFTMOST, expected)


@pytest.mark.parametrize(
    ("headers", "expected", "chain"),
    [
        pytest.param(xff(FORGED, CLIENT), (CLIENT, 0), (FORGED, CLIENT), id="lines-walked-as-one-list"),
        pytest.param(
            xff(FORGED, f"{CLIENT}, {LB2}"), (CLIENT, 0), (FORGED, CLIENT, LB2), id="lines-and-commas"
        ),
        pytest.param(
            [("X-Forwarded-For", FORGED), ("Host", "b"), ("x-forwarded-for", CLIENT)],
            (CLIENT, 0),
            (FORGED, CLIENT),
            id="interleaved-other-header",
        ),
        pytest.param(xff(CLIENT, LB2), (CLIENT, 0), (CLIENT, LB2), id="trusted-last-line"),
    ],
)
def test_header_lines_walk(headers: list[tuple[str, str]], expected: Outcome, chain: tuple[str, ...]) -> None:
    assert check(LB1, headers, WALK, expected).chain == chain


@pytest.mark.parametrize("name", ["X-Client-IP", "CF-Connecting-IP", "True-Client-IP", "x-forwarded-for"])
def test_custom_header_uses_xff_syntax(name: str) -> None:
    header_rules = rules(name, trusted=(LB1,))
    result = resolve(LB1, PEER_PORT, [(name.upper(), f"{FORGED}, {CLIENT}")], header_rules)
    assert result == Resolution(CLIENT, 0, XFF, (FORGED, CLIENT), 1)
    assert header_rules.source is XFF


# ---------------------------------------------------------------------------------------------
# X-Real-IP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("X-Real-IP", CLIENT)], (CLIENT, 0), id="single"),
        pytest.param([("x-real-ip", f" {CLIENT} ")], (CLIENT, 0), id="trimmed-lower-name"),
        pytest.param([("X-Real-IP", f"{CLIENT}:61177")], (CLIENT, 61177), id="with-port"),
        pytest.param([("X-Real-IP", "[2001:db8::1]:5")], ("2001:db8::1", 5), id="ipv6-port"),
        pytest.param([("X-Real-IP", "2001:db8::1")], ("2001:db8::1", 0), id="ipv6-bare"),
        pytest.param([("X-Real-IP", LB2)], (LB2, 0), id="trusted-address-still-used"),
        pytest.param(
            [("X-Real-IP", CLIENT), ("X-Real-IP", CLIENT)], refused("multiple_values"), id="two-lines"
        ),
        pytest.param([("X-Real-IP", f"{FORGED}, {CLIENT}")], refused("multiple_values"), id="two-values"),
        pytest.param([("X-Real-IP", f"{CLIENT},")], refused("multiple_values"), id="trailing-comma"),
        pytest.param([("X-Real-IP", "")], refused("empty_entry"), id="empty"),
        pytest.param([("X-Real-IP", "unknown")], refused("unknown_address"), id="unknown"),
        pytest.param([("X-Real-IP", "garbage")], refused("malformed_address"), id="garbage"),
        pytest.param([("X-Real-IP", f"{CLIENT}\r\n")], refused("control_character"), id="crlf"),
    ],
)
@pytest.mark.parametrize("trusted", [(), (LB1,)], ids=["leftmost", "walk"])
def test_x_real_ip(headers: list[tuple[str, str]], expected: Outcome, trusted: tuple[str, ...]) -> None:
    header_rules = rules("X-Real-IP", port="X-Forwarded-Port", trusted=trusted)
    result = check(LB1, [*headers, ("X-Forwarded-For", FORGED)], header_rules, expected)
    if not isinstance(expected, ForwardedHeaderError):
        assert result.source is XRI
        assert result.hop == 0


def test_x_real_ip_several_lines_message() -> None:
    with pytest.raises(ForwardedHeaderError, match="2 header lines"):
        resolve(LB1, PEER_PORT, [("X-Real-IP", CLIENT), ("X-Real-IP", CLIENT)], rules("X-Real-IP"))


def test_x_real_ip_with_port_header() -> None:
    headers = [("X-Real-IP", CLIENT), ("X-Forwarded-Port", "61177")]
    result = resolve(LB1, PEER_PORT, headers, rules("X-Real-IP", port="X-Forwarded-Port", trusted=(LB1,)))
    assert result == Resolution(CLIENT, 61177, XRI, (CLIENT,), 0)


# ---------------------------------------------------------------------------------------------
# Forwarded (RFC 7239)
# ---------------------------------------------------------------------------------------------

FORWARDED = rules("Forwarded", port="X-Forwarded-Port")
FORWARDED_WALK = rules("Forwarded", port="X-Forwarded-Port", trusted=("10.0.0.0/8",))


@pytest.mark.parametrize(
    ("value", "expected", "chain"),
    [
        # RFC 7239 §4 and §7 examples
        pytest.param('for="_gazonk"', refused("unknown_address"), None, id="rfc-obfuscated"),
        pytest.param('For="[2001:db8:cafe::17]:4711"', ("2001:db8:cafe::17", 4711), None, id="rfc-ipv6-port"),
        pytest.param("for=192.0.2.60;proto=http;by=203.0.113.43", ("192.0.2.60", 0), None, id="rfc-params"),
        pytest.param(
            "for=192.0.2.43, for=198.51.100.17",
            ("192.0.2.43", 0),
            ("192.0.2.43", "198.51.100.17"),
            id="rfc-two-elements",
        ),
        pytest.param("for=unknown", refused("unknown_address"), None, id="unknown"),
        pytest.param('for="UNKNOWN"', refused("unknown_address"), None, id="unknown-quoted-upper"),
        pytest.param(
            'for="192.0.2.43:47011"', ("192.0.2.43", 47011), ("192.0.2.43:47011",), id="ipv4-port-quoted"
        ),
        pytest.param('for="192.0.2.43"', ("192.0.2.43", 0), None, id="ipv4-quoted"),
        pytest.param('for="[2001:db8::1]"', ("2001:db8::1", 0), None, id="ipv6-quoted"),
        pytest.param('for="192.0.2.43:_p"', ("192.0.2.43", 0), None, id="obfuscated-port"),
        pytest.param('for="\\1\\9\\2.0.2.43"', ("192.0.2.43", 0), ("192.0.2.43",), id="escaped-chars"),
        pytest.param('for="[::ffff:192.0.2.1]:80"', ("192.0.2.1", 80), None, id="ipv4-mapped"),
        pytest.param("FOR=192.0.2.43", ("192.0.2.43", 0), None, id="name-upper"),
        pytest.param(
            "proto=https;for=192.0.2.43;host=example.com", ("192.0.2.43", 0), None, id="for-not-first"
        ),
        pytest.param(
            'for=192.0.2.43;host="ex\\"am,ple;.com"', ("192.0.2.43", 0), None, id="quoted-comma-semicolon"
        ),
        pytest.param(
            "for=192.0.2.43;ext=token!#$%&'*+-.^_`|~", ("192.0.2.43", 0), None, id="unknown-param-token"
        ),
        pytest.param(
            "for=192.0.2.43 ; proto=http , for=10.0.0.1", ("192.0.2.43", 0), None, id="ows-around-separators"
        ),
        pytest.param("for=192.0.2.43;", ("192.0.2.43", 0), None, id="trailing-semicolon"),
        pytest.param(";;for=192.0.2.43;;", ("192.0.2.43", 0), None, id="empty-pairs"),
        pytest.param('for=""', refused("malformed_address"), None, id="empty-quoted"),
        pytest.param('for="2001:db8::1"', refused("malformed_address"), None, id="ipv6-without-brackets"),
        pytest.param("for=192.0.2.43:47011", refused("forwarded_syntax"), None, id="port-unquoted"),
        pytest.param("for=[2001:db8::1]", refused("forwarded_syntax"), None, id="ipv6-unquoted"),
        pytest.param('for="192.0.2.43', refused("forwarded_syntax"), None, id="quote-not-closed"),
        pytest.param('for="192.0.2.43\\"', refused("forwarded_syntax"), None, id="escaped-closing-quote"),
        pytest.param('for="192.0.2.43"x', refused("forwarded_syntax"), None, id="junk-after-quote"),
        pytest.param("for = 192.0.2.43", refused("forwarded_syntax"), None, id="spaces-around-equals"),
        pytest.param("for=", refused("forwarded_syntax"), None, id="empty-value"),
        pytest.param("for", refused("forwarded_syntax"), None, id="no-equals"),
        pytest.param("=192.0.2.43", refused("forwarded_syntax"), None, id="no-name"),
        pytest.param("f@r=192.0.2.43", refused("forwarded_syntax"), None, id="bad-name"),
        pytest.param("for=192.0.2.43 192.0.2.44", refused("forwarded_syntax"), None, id="two-values"),
        pytest.param("192.0.2.43", refused("forwarded_syntax"), None, id="xff-syntax"),
        pytest.param("proto=https", refused("missing_for"), None, id="missing-for"),
        pytest.param(";", refused("missing_for"), None, id="only-semicolon"),
        pytest.param(
            "for=192.0.2.43;FOR=192.0.2.44", refused("duplicate_parameter"), None, id="duplicate-for"
        ),
        pytest.param(
            "for=192.0.2.43;proto=http;Proto=https",
            refused("duplicate_parameter"),
            None,
            id="duplicate-proto",
        ),
        pytest.param("for=192.0.2.43,", refused("empty_entry"), None, id="trailing-comma"),
        pytest.param(",for=192.0.2.43", refused("empty_entry"), None, id="leading-comma"),
        pytest.param("", refused("empty_entry"), None, id="empty-header"),
        pytest.param('for="192.0.2.43\r\n"', refused("control_character"), None, id="crlf-in-quotes"),
        pytest.param('for="\\\x00"', refused("control_character"), None, id="escaped-nul"),
        pytest.param('for="é"', refused("non_ascii"), None, id="obs-text-refused"),
        pytest.param(
            "for=192.0.2.43, for=garbage", refused("malformed_address"), None, id="garbage-right-leftmost"
        ),
    ],
)
def test_forwarded_leftmost(value: str, expected: Outcome, chain: tuple[str, ...] | None) -> None:
    headers = [("Forwarded", value), ("X-Forwarded-Port", "1")]  # the port header is never read
    result = check(OUTSIDER, headers, FORWARDED, expected)
    if not isinstance(expected, ForwardedHeaderError):
        assert result.source is FWD
        assert result.hop == 0
        if chain is not None:
            assert result.chain == chain


@pytest.mark.parametrize(
    ("headers", "expected", "hop"),
    [
        pytest.param([("Forwarded", f"for={FORGED}, for={CLIENT}")], (CLIENT, 0), 1, id="forged-then-client"),
        pytest.param(
            [("Forwarded", f"for={FORGED}"), ("forwarded", f'for="{CLIENT}:5";proto=https, for={LB2}')],
            (CLIENT, 5),
            1,
            id="lines-joined",
        ),
        pytest.param([("Forwarded", f"for={LB2};by={LB1}")], (LB2, 0), 0, id="all-trusted"),
        pytest.param([("Forwarded", f"for=_x, for={CLIENT}")], (CLIENT, 0), 1, id="obfuscated-left-not-read"),
        pytest.param(
            [("Forwarded", f'for="bogus", for={CLIENT}')], (CLIENT, 0), 1, id="garbage-left-not-read"
        ),
        pytest.param(
            [("Forwarded", f'for="2001:db8::1", for={CLIENT}')],
            (CLIENT, 0),
            1,
            id="unbracketed-ipv6-left-not-read",
        ),
        pytest.param(
            [("Forwarded", f"for={CLIENT}, for=unknown")],
            refused("unknown_address"),
            None,
            id="unknown-on-walk",
        ),
        pytest.param(
            [("Forwarded", f"for={CLIENT}, for=_lb")],
            refused("unknown_address"),
            None,
            id="obfuscated-on-walk",
        ),
        # Structure is checked everywhere: it is needed to find the element boundaries.
        pytest.param(
            [("Forwarded", f'for="x, for={CLIENT}')], refused("forwarded_syntax"), None, id="quote-left"
        ),
        pytest.param(
            [("Forwarded", f"proto=http, for={CLIENT}")], refused("missing_for"), None, id="missing-for-left"
        ),
        pytest.param(
            [("Forwarded", f"for=a;for=b, for={CLIENT}")],
            refused("duplicate_parameter"),
            None,
            id="duplicate-left",
        ),
        pytest.param([("X-Forwarded-For", CLIENT)], (LB1, PEER_PORT), None, id="absent-forwarded"),
    ],
)
def test_forwarded_walk(headers: list[tuple[str, str]], expected: Outcome, hop: int | None) -> None:
    result = check(LB1, [*headers, ("X-Forwarded-Port", "1,2,3")], FORWARDED_WALK, expected)
    if hop is not None:
        assert result.hop == hop


# ---------------------------------------------------------------------------------------------
# Port header
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ports", "trusted", "expected"),
    [
        pytest.param(CLIENT, ["61177"], (), 61177, id="single-single"),
        pytest.param(CLIENT, [" 61177\t"], (), 61177, id="single-trimmed"),
        pytest.param(CLIENT, [], (), 0, id="no-port-header"),
        pytest.param(f"{CLIENT}:5", ["61177"], (), 5, id="entry-port-wins"),
        pytest.param(f"{CLIENT}:_p", ["61177"], (), 0, id="obfuscated-entry-port-wins"),
        pytest.param(f"{CLIENT}:5", ["garbage"], (), 5, id="entry-port-wins-header-not-read"),
        pytest.param(f"{CLIENT}, {LB1}", ["61177"], (), 61177, id="single-pairs-with-leftmost"),
        pytest.param(f"{CLIENT}, {LB1}", ["61177"], ("10.0.0.0/8",), 61177, id="single-leftmost-walked"),
        # The outermost trusted proxy set the single port and appended the chosen hop (a forged entry
        # left of it does not shift the pairing).
        pytest.param(
            f"{FORGED}, {CLIENT}", ["61177"], ("10.0.0.0/8",), 61177, id="single-pairs-with-walked-hop"
        ),
        pytest.param(f"{FORGED}, {CLIENT}, {LB2}", ["1", "2", "3"], ("10.0.0.0/8",), 2, id="same-count"),
        pytest.param(f"{FORGED}, {CLIENT}, {LB2}", ["1, 2", "3"], ("10.0.0.0/8",), 2, id="same-count-lines"),
        pytest.param(f"{FORGED}, {CLIENT}, {LB2}", ["2, 3"], ("10.0.0.0/8",), 2, id="fewer-aligned-right"),
        pytest.param(
            f"{FORGED}, {CLIENT}, {LB2}, {LB1}", ["2, 3, 4"], ("10.0.0.0/8",), 2, id="fewer-right-2"
        ),
        pytest.param(f"{CLIENT}, {LB2}, {LB1}", ["2, 3"], ("10.0.0.0/8",), 0, id="fewer-no-port-for-hop"),
        pytest.param(f"{CLIENT}, {LB2}", ["0, 1, 2"], ("10.0.0.0/8",), 1, id="more-aligned-right"),
        pytest.param(f"{FORGED}, {CLIENT}", ["x, 5"], ("10.0.0.0/8",), 5, id="garbage-port-left-not-read"),
        pytest.param(
            f"{FORGED}, {CLIENT}", ["5, x"], ("10.0.0.0/8",), refused("bad_port"), id="bad-port-picked"
        ),
        pytest.param(CLIENT, ["0"], (), refused("bad_port"), id="port-0"),
        pytest.param(CLIENT, ["65536"], (), refused("bad_port"), id="port-65536"),
        pytest.param(CLIENT, ["+80"], (), refused("bad_port"), id="port-sign"),
        pytest.param(CLIENT, ["http"], (), refused("bad_port"), id="port-name"),
        pytest.param(CLIENT, [""], (), refused("empty_entry"), id="port-empty"),
        pytest.param(CLIENT, ["80,"], (), refused("empty_entry"), id="port-trailing-comma"),
        pytest.param(CLIENT, ["80\r\n"], (), refused("control_character"), id="port-crlf"),
        pytest.param(CLIENT, ["\uff18\uff10"], (), refused("non_ascii"), id="port-fullwidth-digits"),
        pytest.param(CLIENT, ["1," * MAX_HOPS + "1"], (), refused("too_many_hops"), id="port-too-many"),
        pytest.param(
            CLIENT, ["1" * (MAX_HEADER_BYTES + 1)], (), refused("header_too_long"), id="port-too-long"
        ),
    ],
)
def test_port_header(
    value: str, ports: list[str], trusted: tuple[str, ...], expected: int | ForwardedHeaderError
) -> None:
    headers = [*xff(value), *[("X-Forwarded-Port", port) for port in ports]]
    header_rules = rules(port="X-Forwarded-Port", trusted=trusted)
    if isinstance(expected, ForwardedHeaderError):
        check(LB1, headers, header_rules, expected)
    else:
        assert resolve(LB1, PEER_PORT, headers, header_rules).port == expected


def test_port_header_case_insensitive() -> None:
    headers = [("x-forwarded-for", CLIENT), ("X-FORWARDED-PORT", "61177")]
    assert resolve(LB1, PEER_PORT, headers, rules(port="X-Forwarded-Port")).port == 61177


def test_port_header_ignored_when_address_header_absent() -> None:
    headers = [("X-Forwarded-Port", "garbage")]
    assert resolve(LB1, PEER_PORT, headers, rules(port="X-Forwarded-Port")) == Resolution(LB1, PEER_PORT)


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def _entries(count: int) -> str:
    return ",".join(f"10.1.{i // 256}.{i % 256}" for i in range(count))


@pytest.mark.parametrize(
    ("name", "headers", "expected"),
    [
        pytest.param("X-Forwarded-For", xff(_entries(MAX_HOPS)), ("10.1.0.0", 0), id="xff-max-hops"),
        pytest.param(
            "X-Forwarded-For", xff(_entries(MAX_HOPS + 1)), refused("too_many_hops"), id="xff-hops+1"
        ),
        pytest.param(
            "X-Forwarded-For", xff(_entries(40), _entries(40)), refused("too_many_hops"), id="xff-hops-lines"
        ),
        pytest.param(
            "X-Forwarded-For",
            xff(" " * (MAX_HEADER_BYTES - 7) + "1.2.3.4"),
            ("1.2.3.4", 0),
            id="xff-max-bytes",
        ),
        pytest.param(
            "X-Forwarded-For",
            xff(" " * (MAX_HEADER_BYTES - 6) + "1.2.3.4"),
            refused("header_too_long"),
            id="xff-bytes+1",
        ),
        pytest.param(
            "X-Forwarded-For",
            xff(" " * 4096, " " * 4095 + "1"),
            refused("header_too_long"),
            id="xff-bytes-lines-with-separator",
        ),
        pytest.param(
            "X-Forwarded-For",
            xff("\x00" * (MAX_HEADER_BYTES + 1)),
            refused("header_too_long"),
            id="length-checked-first",
        ),
        pytest.param(
            "Forwarded",
            [("Forwarded", ",".join(["for=1.2.3.4"] * MAX_HOPS))],
            ("1.2.3.4", 0),
            id="forwarded-max-hops",
        ),
        pytest.param(
            "Forwarded",
            [("Forwarded", ",".join(["for=1.2.3.4"] * (MAX_HOPS + 1)))],
            refused("too_many_hops"),
            id="forwarded-hops+1",
        ),
        pytest.param(
            "Forwarded",
            [("Forwarded", 'for=1.2.3.4;x="' + "," * 500 + '"')],
            ("1.2.3.4", 0),
            id="forwarded-quoted-commas-are-not-hops",
        ),
        pytest.param(
            "X-Real-IP",
            [("X-Real-IP", " " * MAX_HEADER_BYTES + "1")],
            refused("header_too_long"),
            id="x-real-ip-bytes",
        ),
    ],
)
def test_limits(name: str, headers: list[tuple[str, str]], expected: Outcome) -> None:
    check(OUTSIDER, headers, rules(name), expected)


def test_limits_are_sane() -> None:
    # 64 of the longest entries fit: "[ffff:...:ffff]:65535" is 47 characters, plus ", ".
    assert MAX_HOPS * (47 + 2) <= MAX_HEADER_BYTES


# ---------------------------------------------------------------------------------------------
# HeaderRules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source"),
    [
        pytest.param("", SOCKET, id="off"),
        pytest.param("X-Forwarded-For", XFF, id="xff"),
        pytest.param("x-real-ip", XRI, id="x-real-ip-lower"),
        pytest.param("X-REAL-IP", XRI, id="x-real-ip-upper"),
        pytest.param("FORWARDED", FWD, id="forwarded-upper"),
        pytest.param("X-Forwarded", XFF, id="x-forwarded-is-xff-syntax"),
        pytest.param("CF-Connecting-IP", XFF, id="custom"),
    ],
)
def test_rules_source(name: str, source: AddressSource) -> None:
    header_rules = HeaderRules(address_header=name)
    assert header_rules.source is source
    assert header_rules.enabled is bool(name)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"address_header": "X Forwarded For"}, id="space-in-name"),
        pytest.param({"address_header": "X-Forwarded-For:"}, id="colon-in-name"),
        pytest.param({"port_header": "X-Port\r\n"}, id="crlf-in-name"),
        pytest.param({"address_header": "X-Forwarded-Fôr"}, id="non-ascii-name"),
        pytest.param({"trusted_proxies": ["10.0.0.1/8"]}, id="host-bits-set"),
        pytest.param({"trusted_proxies": ["nginx"]}, id="hostname"),
    ],
)
def test_rules_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        HeaderRules.from_values(**kwargs)  # type: ignore[arg-type]


def test_rules_from_values() -> None:
    networks = Networks.parse(["10.0.0.0/8"])
    assert HeaderRules.from_values("X-Real-IP", "", ["10.0.0.0/8"]) == HeaderRules("X-Real-IP", "", networks)
    assert HeaderRules.from_values("X-Real-IP", "", networks).trusted_proxies is networks
    assert HeaderRules() == HeaderRules("", "", Networks())


def test_peer_not_an_address_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        resolve("not-an-ip", 1, [], LEFTMOST)


def test_socket_result_normalizes_peer() -> None:
    assert resolve("::ffff:192.0.2.1", 5, [], LEFTMOST) == Resolution("192.0.2.1", 5, SOCKET, (), None)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

HEADER_NAMES = ["X-Forwarded-For", "x-real-ip", "Forwarded", "X-Client-IP"]
NETWORKS = ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8", "198.51.100.7/32", "0.0.0.0/0", "::/0"]
PEERS = [LB1, LB2, CLIENT, OUTSIDER, "192.0.2.1", "fd00::1", "2001:db8::1", "::ffff:10.0.0.1", "127.0.0.1"]

header_rules_strategy = st.builds(
    HeaderRules.from_values,
    address_header=st.sampled_from(["", *HEADER_NAMES]),
    port_header=st.sampled_from(["", "X-Forwarded-Port"]),
    trusted_proxies=st.lists(st.sampled_from(NETWORKS), max_size=3),
)

# Text that mostly looks like the real thing, with any character mixed in.
fragment = st.one_of(
    st.sampled_from(
        [
            ",",
            ", ",
            ";",
            "=",
            '"',
            "\\",
            "[",
            "]",
            ":",
            " ",
            "\t",
            "\r\n",
            "\x00",
            "for=",
            "proto=http",
            "unknown",
            "_x",
            CLIENT,
            LB1,
            LB2,
            "fd00::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "80",
            "0",
            "65536",
            "é",
        ]
    ),
    st.text(max_size=5),
)
header_value = st.lists(fragment, max_size=12).map("".join)
header_list = st.lists(
    st.tuples(st.sampled_from([*HEADER_NAMES, "X-Forwarded-Port", "x-forwarded-port", "Host"]), header_value),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(peer=st.sampled_from(PEERS), headers=header_list, header_rules=header_rules_strategy)
def test_property_result_or_forwarded_header_error(
    peer: str, headers: list[tuple[str, str]], header_rules: HeaderRules
) -> None:
    try:
        result = resolve(peer, PEER_PORT, headers, header_rules)
    except ForwardedHeaderError as exc:
        assert exc.reason in {
            "header_too_long",
            "too_many_hops",
            "control_character",
            "non_ascii",
            "multiple_values",
            "empty_entry",
            "malformed_address",
            "bad_port",
            "unknown_address",
            "forwarded_syntax",
            "missing_for",
            "duplicate_parameter",
        }
        return
    assert isinstance(result, Resolution)
    assert 0 <= result.port <= 65535
    if result.source is SOCKET:
        assert (result.port, result.chain, result.hop) == (PEER_PORT, (), None)
    else:
        assert result.hop is not None
        assert 0 <= result.hop < len(result.chain) <= MAX_HOPS
        assert result.source is header_rules.source


@settings(max_examples=200, deadline=None)
@given(
    peer=st.sampled_from([OUTSIDER, CLIENT, "2001:db8::1", "::ffff:203.0.113.9"]),
    headers=header_list,
    header_rules=header_rules_strategy,
)
def test_property_untrusted_peer_is_the_client(
    peer: str, headers: list[tuple[str, str]], header_rules: HeaderRules
) -> None:
    trusted = Networks.parse(["10.0.0.0/8", "fd00::/8"])
    header_rules = HeaderRules(header_rules.address_header, header_rules.port_header, trusted)
    result = resolve(peer, PEER_PORT, headers, header_rules)
    assert result == Resolution(peer.removeprefix("::ffff:"), PEER_PORT, SOCKET)


address_strategy = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.tuples(st.ip_addresses(v=4), st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
)


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(address_strategy, min_size=1, max_size=8),
    cuts=st.sets(st.integers(1, 7)),
    trusted=st.sampled_from([(), ("10.0.0.0/8",), ("0.0.0.0/1", "::/1")]),
    forwarded=st.booleans(),
)
def test_property_split_lines_same_as_one_line(
    entries: list[str], cuts: set[int], trusted: tuple[str, ...], forwarded: bool
) -> None:
    # RFC 9110 §5.3: several lines are the same as one line joined with commas.
    if forwarded:
        entries = [f'for="{entry}"' for entry in entries]
    name = "Forwarded" if forwarded else "X-Forwarded-For"
    header_rules = rules(name, trusted=trusted)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(entries)), len(entries)]
    lines = [", ".join(entries[a:b]) for a, b in itertools.pairwise(bounds)]
    one = resolve(LB1, PEER_PORT, [(name, ", ".join(entries))], header_rules)
    split = resolve(LB1, PEER_PORT, [(name, line) for line in lines], header_rules)
    assert one == split
    assert one.source is (FWD if forwarded else XFF)
