"""WebSocket listeners learning the client from headers and PROXY headers (real broker, raw clients)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from listeners.proxy_protocol import build_v1, build_v2
from tests.support import WAIT, BrokerProcess, broker_config, client_info, listener_config

BrokerFactory = Callable[..., BrokerProcess]
LB = "127.0.0.50"


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def mqtt_over_ws(
    port: int,
    client_id: str,
    headers: list[tuple[str, str]] | None = None,
    source: str = "127.0.0.1",
    proxy_header: bytes = b"",
) -> ClientConnection:
    """Open a WebSocket (after an optional PROXY header), CONNECT, and expect CONNACK 0."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    if proxy_header:
        sock.sendall(proxy_header)
    ws = connect(
        f"ws://127.0.0.1:{port}/mqtt",
        sock=sock,
        subprotocols=["mqtt"],  # type: ignore[list-item]
        additional_headers=headers or [],
        open_timeout=WAIT,
    )
    ws.send(connect_packet(client_id))
    assert ws.recv(timeout=WAIT) == b"\x20\x02\x00\x00"
    return ws


def refused_status(port: int, headers: list[tuple[str, str]], source: str = "127.0.0.1") -> int:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{port}/mqtt", sock=sock, subprotocols=["mqtt"], additional_headers=headers)  # type: ignore[list-item]
    return int(info.value.response.status_code)


def ws_broker(start_broker: BrokerFactory, **options: Any) -> BrokerProcess:
    websocket = options.pop("websocket", {})
    return start_broker(broker_config(ws={"default": listener_config(websocket=websocket, **options)}))


def test_leftmost_rule_without_trusted_proxies(start_broker: BrokerFactory) -> None:
    broker = ws_broker(
        start_broker,
        websocket={"proxy_address_header": "X-Forwarded-For", "proxy_port_header": "X-Forwarded-Port"},
    )
    port = broker.port("ws:default")
    with mqtt_over_ws(
        port, "left", [("X-Forwarded-For", "203.0.113.5, 10.0.0.1"), ("X-Forwarded-Port", "61177")], source=LB
    ):
        info = client_info(broker, "left")
        assert (info["ip_address"], info["port"]) == ("203.0.113.5", 61177)
        assert (info["proxy_address"], info["address_source"]) == (LB, "x_forwarded_for")
        assert info["proxy_details"]["forwarded"] == {
            "header": "X-Forwarded-For",
            "chain": ["203.0.113.5", "10.0.0.1"],
            "hop": 0,
        }
    with mqtt_over_ws(port, "no-header"):
        info = client_info(broker, "no-header")
        assert (info["ip_address"], info["address_source"], info["proxy_address"]) == (
            "127.0.0.1",
            "socket",
            None,
        )


@pytest.fixture
def walking(start_broker: BrokerFactory) -> BrokerProcess:
    return ws_broker(
        start_broker,
        trusted_proxies=[f"{LB}/32"],
        websocket={"proxy_address_header": "X-Forwarded-For", "proxy_port_header": "X-Forwarded-Port"},
    )


def test_walk_from_a_trusted_peer(walking: BrokerProcess) -> None:
    headers = [("X-Forwarded-For", f"6.6.6.6, 198.51.100.7, {LB}"), ("X-Forwarded-Port", "4242")]
    with mqtt_over_ws(walking.port("ws:default"), "walked", headers, source=LB):
        info = client_info(walking, "walked")
        assert (info["ip_address"], info["port"], info["proxy_address"]) == ("198.51.100.7", 4242, LB)


def test_a_direct_client_forging_xff_gets_its_own_address(walking: BrokerProcess) -> None:
    headers = [("X-Forwarded-For", "203.0.113.99"), ("X-Forwarded-Port", "1")]
    with mqtt_over_ws(walking.port("ws:default"), "forger", headers, source="127.0.0.61"):
        info = client_info(walking, "forger")
        assert (info["ip_address"], info["address_source"], info["proxy_address"]) == (
            "127.0.0.61",
            "socket",
            None,
        )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("X-Forwarded-For", "not-an-ip")], "malformed_address"),
        ([("X-Forwarded-For", "1.2.3.4,,5.6.7.8")], "empty_entry"),
        ([("X-Forwarded-For", "unknown")], "unknown_address"),
        ([("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Port", "99999")], "bad_port"),
    ],
)
def test_a_malformed_header_from_a_trusted_peer_is_400(
    walking: BrokerProcess, headers: list[tuple[str, str]], reason: str
) -> None:
    assert refused_status(walking.port("ws:default"), headers, source=LB) == 400
    walking.wait_for_log(rf"ws:default refused {LB}:\d+: .*\[{reason}\]")


@pytest.mark.parametrize(
    ("header", "value", "expected", "source"),
    [
        ("X-Real-IP", "198.51.100.8", ("198.51.100.8", 0), "x_real_ip"),
        ("Forwarded", 'for="[2001:db8::9]:4711";proto=https', ("2001:db8::9", 4711), "forwarded"),
    ],
)
def test_x_real_ip_and_forwarded(
    start_broker: BrokerFactory, header: str, value: str, expected: tuple[str, int], source: str
) -> None:
    broker = ws_broker(start_broker, trusted_proxies=[f"{LB}/32"], websocket={"proxy_address_header": header})
    with mqtt_over_ws(broker.port("ws:default"), "named", [(header, value)], source=LB):
        info = client_info(broker, "named")
        assert ((info["ip_address"], info["port"]), info["address_source"]) == (expected, source)


def test_proxy_protocol_before_the_upgrade(start_broker: BrokerFactory) -> None:
    broker = ws_broker(
        start_broker, proxy_protocol=True, trusted_proxies=[f"{LB}/32"], proxy_protocol_timeout="700ms"
    )
    port = broker.port("ws:default")
    with mqtt_over_ws(
        port, "pp-ws", source=LB, proxy_header=build_v1("203.0.113.20", "10.0.0.1", 5555, 8083)
    ):
        info = client_info(broker, "pp-ws")
        assert (info["ip_address"], info["port"], info["proxy_address"], info["address_source"]) == (
            "203.0.113.20",
            5555,
            LB,
            "proxy_protocol_v1",
        )
    # No header: refused at the first byte (the 'G' of GET); an untrusted peer before any byte.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(LB, 0)) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""
    broker.wait_for_log(rf"ws:default refused {LB}:\d+: PROXY header expected.*\[not_proxy_protocol\]")
    with socket.create_connection(
        ("127.0.0.1", port), timeout=WAIT, source_address=("127.0.0.62", 0)
    ) as sock:
        assert sock.recv(100) == b""
    broker.wait_for_log(r"ws:default refused 127\.0\.0\.62:\d+: .*\[untrusted_proxy\]")
    # A silent peer is closed after proxy_protocol_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(LB, 0)) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.6 < time.monotonic() - started < 3.0
    broker.wait_for_log(r"no complete PROXY header within 0\.7s \[proxy_timeout\]")


def test_proxy_protocol_then_headers_refine(start_broker: BrokerFactory) -> None:
    # An L4 balancer (PROXY) in front of an L7 one (XFF): the PROXY header names the L7 proxy,
    # which is trusted, and its X-Forwarded-For names the client.
    l7 = "192.0.2.80"
    broker = ws_broker(
        start_broker,
        proxy_protocol=True,
        trusted_proxies=[f"{LB}/32", f"{l7}/32"],
        websocket={"proxy_address_header": "X-Forwarded-For"},
    )
    header = build_v2(src_addr=l7, dst_addr="10.0.0.1", src_port=33333, dst_port=8083)
    with mqtt_over_ws(
        broker.port("ws:default"),
        "layered",
        [("X-Forwarded-For", "198.51.100.30")],
        source=LB,
        proxy_header=header,
    ):
        info = client_info(broker, "layered")
        assert (info["ip_address"], info["proxy_address"], info["address_source"]) == (
            "198.51.100.30",
            LB,
            "x_forwarded_for",
        )
        assert info["proxy_details"]["proxy_protocol"]["src_addr"] == l7


def test_a_refused_real_address_gets_403_before_the_upgrade(start_broker: BrokerFactory) -> None:
    broker = start_broker(
        broker_config(
            ws={
                "default": listener_config(
                    trusted_proxies=[f"{LB}/32"], websocket={"proxy_address_header": "X-Real-IP"}
                )
            },
            access={"deny": ["198.51.100.0/24"]},
            audit={"file": "audit.log"},
        )
    )
    port = broker.port("ws:default")
    assert refused_status(port, [("X-Real-IP", "198.51.100.9")], source=LB) == 403
    broker.wait_for_log(
        rf"ws:default refused 198\.51\.100\.9:0 via {LB}:\d+ \(x_real_ip\): 198\.51\.100\.9 is refused by the "
        r"global access rules \[access\]"
    )
    with mqtt_over_ws(port, "allowed", [("X-Real-IP", "203.0.113.9")], source=LB):
        assert client_info(broker, "allowed")["ip_address"] == "203.0.113.9"
    records = [json.loads(line) for line in (broker.workdir / "audit.log").read_text().splitlines()]
    refused = [r for r in records if r["event"] == "refused"]
    assert refused == [
        {
            "ts": refused[0]["ts"],
            "event": "refused",
            "listener": "ws:default",
            "reason": "access",
            "ip": "198.51.100.9",
            "port": 0,
            "proxy_ip": LB,
            "proxy_port": refused[0]["proxy_port"],
            "address_source": "x_real_ip",
        }
    ]
