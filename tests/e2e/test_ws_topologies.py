"""Topologies 5-9 of README ("Behind an HTTP load balancer"): MQTT over WebSocket behind real NGINX tiers.

Clients bind their own 127.x addresses and some forge X-Forwarded-For / X-Forwarded-Port /
X-Real-IP; every test asserts the address the broker reports for the client id
(``realip-broker ctl clients show --json``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.peers import Nginx, NginxHttp, free_port, render_example
from tests.support import BrokerProcess, Clients, MqttClient, client_info, example_broker_config, local_port

pytestmark = pytest.mark.e2e

BrokerFactory = Callable[..., BrokerProcess]
Peers = Callable[..., Any]

EDGE = "127.0.0.50"
MIDDLE = "127.0.0.51"
INNER = "127.0.0.53"
FORGED = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Port": "6666", "X-Real-IP": "6.6.6.6"}

#: The port each example listens on, as written in the file.
LISTEN = {
    "nginx/ws-xff.conf": "8080",
    "nginx/ws-append-edge.conf": "8080",
    "nginx/ws-append-tier.conf": "8081",
    "nginx/ws-realip-inner.conf": "8082",
}
#: The upstream each example proxies to, as written in the file.
UPSTREAM = {
    "nginx/ws-xff.conf": "127.0.0.1:8083",
    "nginx/ws-append-edge.conf": "10.0.0.2:8081",
    "nginx/ws-append-tier.conf": "127.0.0.1:8083",
    "nginx/ws-realip-inner.conf": "127.0.0.1:8083",
}


def http_tier(peers: Peers, example: str, source: str, upstream: int, **extra: str) -> int:
    """Start one NGINX tier from an http example, connecting to 127.0.0.1:``upstream`` from ``source``."""
    port = free_port()
    body = render_example(
        example,
        {
            f"listen {LISTEN[example]};": f"listen 127.0.0.1:{port};\n    listen [::1]:{port};",
            f"proxy_pass http://{UPSTREAM[example]};": (
                f"proxy_bind {source};\n        proxy_pass http://127.0.0.1:{upstream};"
            ),
            **extra,
        },
    )
    peers(NginxHttp, f"nginx-{source}", body).wait_listening(("127.0.0.1", port), ("::1", port))
    return port


def start(start_broker: BrokerFactory, example: str, replacements: dict[str, str]) -> BrokerProcess:
    return start_broker(example_broker_config(example, {"127.0.0.1:8083": "127.0.0.1:0", **replacements}))


def ws_client(
    clients: Clients,
    client_id: str,
    port: int,
    source: str | None = None,
    forge: bool = False,
    host: str = "127.0.0.1",
) -> MqttClient:
    headers = dict(FORGED) if forge else {}
    if ":" in host:  # paho writes an unbracketed IPv6 Host header, which NGINX rightly refuses
        headers["Host"] = f"[{host}]:{port}"
    client = clients.new(client_id, transport="websockets", ws_headers=headers or None)
    return client.connect(host, port, bind_address=source or "")


def test_topology_5_one_nginx_setting_xff_and_port(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker = start(start_broker, "nginx/ws-xff.yaml", {"127.0.0.1/32": f"{EDGE}/32"})
    port = http_tier(peers, "nginx/ws-xff.conf", EDGE, broker.port("ws:default"))
    client = ws_client(clients, "ws-41", port, "127.0.0.41", forge=True)
    info = client_info(broker, "ws-41")
    assert (info["ip_address"], info["port"]) == ("127.0.0.41", local_port(client))
    assert (info["proxy_address"], info["address_source"], info["listener"]) == (
        EDGE,
        "x_forwarded_for",
        "ws:default",
    )
    six = ws_client(clients, "ws-v6", port, host="::1")
    info = client_info(broker, "ws-v6")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == ("::1", local_port(six), EDGE)
    # A client reaching the broker directly with a forged header is reported with its own address.
    ws_client(clients, "ws-direct", broker.port("ws:default"), "127.0.0.42", forge=True)
    direct = client_info(broker, "ws-direct")
    assert (direct["ip_address"], direct["address_source"], direct["proxy_address"]) == (
        "127.0.0.42",
        "socket",
        None,
    )


def test_topology_6_outermost_overwrites_and_the_broker_takes_the_leftmost(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker = start(start_broker, "nginx/ws-leftmost.yaml", {})
    inner = http_tier(peers, "nginx/ws-append-tier.conf", MIDDLE, broker.port("ws:default"))
    edge = http_tier(peers, "nginx/ws-xff.conf", EDGE, inner)
    client = ws_client(clients, "ws-43", edge, "127.0.0.43", forge=True)  # the forgery is overwritten
    info = client_info(broker, "ws-43")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == (
        "127.0.0.43",
        local_port(client),
        MIDDLE,
    )
    assert info["proxy_details"]["forwarded"]["chain"] == ["127.0.0.43", EDGE]


def test_topology_7_three_appending_tiers_innermost_real_ip_recursive(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker = start(start_broker, "nginx/ws-x-real-ip.yaml", {"10.0.0.3/32": f"{INNER}/32"})
    inner = http_tier(
        peers,
        "nginx/ws-realip-inner.conf",
        INNER,
        broker.port("ws:default"),
        **{"set_real_ip_from 10.0.0.1/32;": f"set_real_ip_from {EDGE}/32;"},
        **{"set_real_ip_from 10.0.0.2/32;": f"set_real_ip_from {MIDDLE}/32;"},
    )
    middle = http_tier(peers, "nginx/ws-append-tier.conf", MIDDLE, inner)
    edge = http_tier(peers, "nginx/ws-append-edge.conf", EDGE, middle)
    client = ws_client(clients, "ws-44", edge, "127.0.0.44", forge=True)  # forged XFF stays left, unbelieved
    info = client_info(broker, "ws-44")
    assert (info["ip_address"], info["port"], info["proxy_address"], info["address_source"]) == (
        "127.0.0.44",
        local_port(client),  # X-Forwarded-Port from the edge, as the example config reads it
        INNER,
        "x_real_ip",
    )


def test_topology_8_the_broker_walks_an_appended_chain(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker = start(
        start_broker, "nginx/ws-walk.yaml", {"10.0.0.1/32": f"{EDGE}/32", "10.0.0.2/32": f"{MIDDLE}/32"}
    )
    inner = http_tier(peers, "nginx/ws-append-tier.conf", MIDDLE, broker.port("ws:default"))
    edge = http_tier(peers, "nginx/ws-append-edge.conf", EDGE, inner)
    client = ws_client(clients, "ws-45", edge, "127.0.0.45", forge=True)
    info = client_info(broker, "ws-45")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == (
        "127.0.0.45",
        local_port(client),
        MIDDLE,
    )
    assert info["proxy_details"]["forwarded"] == {
        "header": "X-Forwarded-For",
        "chain": ["6.6.6.6", "127.0.0.45", EDGE],
        "hop": 1,
    }


def test_topology_9_l4_nginx_with_proxy_protocol_into_a_ws_listener(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker = start(start_broker, "nginx/ws-proxy-protocol.yaml", {"127.0.0.1/32": f"{EDGE}/32"})
    port = free_port()
    body = render_example(
        "nginx/ws-stream-proxy-protocol.conf",
        {
            "listen 8080;": f"listen 127.0.0.1:{port};\n        listen [::1]:{port};",
            "proxy_pass 127.0.0.1:8083;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{broker.port('ws:default')};",
        },
    )
    peers(Nginx, "l4", body).wait_listening(("127.0.0.1", port), ("::1", port))
    client = ws_client(clients, "ws-46", port, "127.0.0.46", forge=True)
    info = client_info(broker, "ws-46")
    assert (info["ip_address"], info["port"]) == ("127.0.0.46", local_port(client))
    assert (info["proxy_address"], info["address_source"]) == (EDGE, "proxy_protocol_v1")
    six = ws_client(clients, "ws-46-v6", port, host="::1")
    assert (client_info(broker, "ws-46-v6")["ip_address"], local_port(six)) == (
        "::1",
        client_info(broker, "ws-46-v6")["port"],
    )
