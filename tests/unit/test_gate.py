"""The PROXY trust rules of a listener (listeners/gate.py): truth tables over modes and peers."""

from __future__ import annotations

import pytest

from broker.errors import ProxyProtocolError
from broker.settings import ProxyProtocolMode, load_settings
from listeners.address import AddressSource, ClientAddress, Networks
from listeners.gate import ProxyGate, client_address, peer_refusal, refusal_at_accept
from listeners.proxy_protocol import NEED_DATA, build_v1, build_v2

MQTT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
V1 = build_v1("203.0.113.1", "10.0.0.1", 1000, 1883)
V2 = build_v2(src_addr="203.0.113.2", dst_addr="10.0.0.1", src_port=2000, dst_port=1883)
LB = Networks.parse(["10.0.0.0/24"])
ON, OPT, OFF = ProxyProtocolMode.ON, ProxyProtocolMode.OPTIONAL, ProxyProtocolMode.OFF


@pytest.mark.parametrize(
    ("mode", "trusted", "peer", "refused"),
    [
        (ON, Networks(), "192.0.2.1", False),  # empty list: every peer trusted (EMQX)
        (ON, LB, "10.0.0.5", False),
        (ON, LB, "192.0.2.1", True),
        (ON, LB, "::ffff:10.0.0.5", False),  # a dual-stack socket's view of an IPv4 peer
        (OPT, LB, "192.0.2.1", False),  # optional: an untrusted peer may still connect without a header
        (OFF, LB, "192.0.2.1", False),
    ],
)
def test_peer_refusal(mode: ProxyProtocolMode, trusted: Networks, peer: str, refused: bool) -> None:
    refusal = peer_refusal(mode, trusted, peer)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.reason == "untrusted_proxy"


@pytest.mark.parametrize(
    ("mode", "trusted", "peer", "data", "outcome"),
    [
        (ON, Networks(), "192.0.2.1", V1 + MQTT, ("header", MQTT)),
        (ON, Networks(), "192.0.2.1", V2, ("header", b"")),
        (ON, Networks(), "192.0.2.1", MQTT, "not_proxy_protocol"),
        (OPT, LB, "10.0.0.5", V1 + MQTT, ("header", MQTT)),
        (OPT, LB, "10.0.0.5", MQTT, ("none", MQTT)),
        (OPT, LB, "192.0.2.1", MQTT, ("none", MQTT)),
        (OPT, LB, "192.0.2.1", V1 + MQTT, "untrusted_header"),
        (OPT, LB, "192.0.2.1", V2 + MQTT, "untrusted_header"),
        (OPT, LB, "10.0.0.5", b"PROXY TCP9 x\r\n", "v1_bad_family"),
        (OFF, LB, "192.0.2.1", V1, ("none", V1)),
    ],
)
def test_gate(mode: ProxyProtocolMode, trusted: Networks, peer: str, data: bytes, outcome: object) -> None:
    gate = ProxyGate(mode, trusted, peer)
    if isinstance(outcome, str):
        with pytest.raises(ProxyProtocolError) as info:
            gate.feed(data)
        assert info.value.reason == outcome
        return
    result = gate.feed(data)
    assert result is not NEED_DATA
    header, rest = result
    assert (("header" if header else "none"), rest) == outcome


@pytest.mark.parametrize("mode", [ON, OPT])
@pytest.mark.parametrize("data", [V1 + MQTT, V2 + MQTT, MQTT])
def test_gate_gives_the_same_answer_byte_by_byte(mode: ProxyProtocolMode, data: bytes) -> None:
    def run(chunks: list[bytes]) -> object:
        gate = ProxyGate(mode, LB, "10.0.0.5")
        try:
            for index, chunk in enumerate(chunks):
                result = gate.feed(chunk)
                if result is not NEED_DATA:
                    header, rest = result
                    return header, rest + b"".join(chunks[index + 1 :])
        except ProxyProtocolError as exc:
            return exc.reason
        return NEED_DATA

    whole = run([data])
    assert run([data[i : i + 1] for i in range(len(data))]) == whole


def test_client_address_from_headers() -> None:
    header, _ = ProxyGate(ON, Networks(), "10.0.0.5").feed(V1)  # type: ignore[misc]
    address = client_address(header, "10.0.0.5", 40000)
    assert address == ClientAddress(
        "203.0.113.1", 1000, AddressSource.PROXY_PROTOCOL_V1, proxy_ip="10.0.0.5", proxy_port=40000
    )
    assert address.details["proxy_protocol"]["version"] == 1
    local, _ = ProxyGate(ON, Networks(), "10.0.0.5").feed(build_v2(command="LOCAL"))  # type: ignore[misc]
    assert client_address(local, "10.0.0.5", 40000) == ClientAddress("10.0.0.5", 40000)
    assert client_address(None, "::ffff:10.0.0.5", 1) == ClientAddress("10.0.0.5", 1)


@pytest.mark.parametrize(
    ("options", "current", "peer", "verdict"),
    [
        ({}, 10, "192.0.2.1", None),
        ({"max_connections": 2}, 2, "192.0.2.1", "max_connections"),
        ({"max_connections": 2}, 1, "192.0.2.1", None),
        ({"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/24"]}, 0, "192.0.2.1", "untrusted_proxy"),
        ({"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/24"]}, 0, "10.0.0.9", None),
    ],
)
def test_refusal_at_accept(options: dict[str, object], current: int, peer: str, verdict: str | None) -> None:
    settings = load_settings({"listeners": {"tcp": {"default": options}}}).listeners[0]
    found = refusal_at_accept(settings, current, peer)
    assert (found[0] if found else None) == verdict
