"""Topologies 1-4 of README ("Topologies, each an example config"): the real broker behind real NGINX and HAProxy (PROXY protocol).

Each client binds its own 127.x address to play a distinct host; each load balancer tier
connects from its own address (``proxy_bind`` / ``source``). Every test asserts the address the
broker reports for the client id (``realip-broker ctl clients show``).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from listeners.proxy_protocol import TLV, build_v1, build_v2
from tests.e2e.peers import HAProxy, Nginx, free_port, render_example
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    client_info,
    ctl,
    example_broker_config,
    local_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

BrokerFactory = Callable[..., BrokerProcess]
Peers = Callable[..., Any]

EDGE = "127.0.0.50"  # the (first) load balancer tier connects from here
INNER = "127.0.0.51"  # the second tier
HAPROXY_SOURCE = "127.0.0.52"


def single_nginx(
    start_broker: BrokerFactory, peers: Peers, **broker_sections: Any
) -> tuple[BrokerProcess, int]:
    """Topology 1: examples/nginx/tcp-proxy-protocol.{conf,yaml}; returns the broker and NGINX's port."""
    broker = start_broker(
        example_broker_config(
            "nginx/tcp-proxy-protocol.yaml",
            {"127.0.0.1:1883": "127.0.0.1:0", "127.0.0.1/32": f"{EDGE}/32"},
            **broker_sections,
        )
    )
    port = free_port()
    body = render_example(
        "nginx/tcp-proxy-protocol.conf",
        {
            "listen 1884;": f"listen 127.0.0.1:{port};\n        listen [::1]:{port};",
            "proxy_pass 127.0.0.1:1883;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{broker.port('tcp:default')};",
        },
    )
    peers(Nginx, "nginx", body).wait_listening(("127.0.0.1", port), ("::1", port))
    return broker, port


def test_single_nginx_clients_list_show_json_and_kick(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker, port = single_nginx(start_broker, peers)
    first = clients.new("mqttx-41").connect("127.0.0.1", port, bind_address="127.0.0.41")
    second = clients.new("mqttx-42").connect("127.0.0.1", port, bind_address="127.0.0.42")

    info = client_info(broker, "mqttx-41")
    assert (info["ip_address"], info["port"]) == ("127.0.0.41", local_port(first))
    assert info["proxy_address"] == EDGE
    assert info["address_source"] == "proxy_protocol_v1"
    assert info["listener"] == "tcp:default"
    assert client_info(broker, "mqttx-42")["ip_address"] == "127.0.0.42"

    listing = ctl(broker, "clients", "list")
    assert listing.returncode == 0, listing.stderr
    assert f"peername=127.0.0.41:{local_port(first)}" in listing.stdout
    assert f"peername=127.0.0.42:{local_port(second)}" in listing.stdout

    shown = ctl(broker, "clients", "show", "mqttx-41")
    assert shown.returncode == 0, shown.stderr
    line = shown.stdout.strip()
    assert re.fullmatch(
        rf"Client\(mqttx-41, username=undefined, peername=127\.0\.0\.41:{local_port(first)}, "
        rf"proxy={re.escape(EDGE)}:{info['proxy_port']}, listener=tcp:default, address_source=proxy_protocol_v1, "
        r"proto_ver=4, clean_start=true, keepalive=60, connected_at=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00, "
        r"expiry_interval=0, receive_maximum=65535, topic_alias_maximum=0, "
        r"subscriptions=0, inflight=0, mqueue_len=0, dropped=0\)",
        line,
    ), line

    # Messages flow through the load balancer as usual.
    second.subscribe("lb/t", 1)
    first.publish("lb/t", b"through-nginx", qos=1)
    assert second.expect().payload == b"through-nginx"

    kicked = ctl(broker, "clients", "kick", "mqttx-41")
    assert (kicked.returncode, kicked.stdout.strip()) == (0, "ok")
    assert first.disconnected.wait(WAIT), "the kicked client did not see the disconnect"
    listing = ctl(broker, "clients", "list", "--json")
    assert [c["clientid"] for c in json.loads(listing.stdout)] == ["mqttx-42"]
    missing = ctl(broker, "clients", "show", "mqttx-41")
    assert (missing.returncode, missing.stderr.strip()) == (1, "client mqttx-41 not found")


def test_single_nginx_ipv6_client(start_broker: BrokerFactory, peers: Peers, clients: Clients) -> None:
    broker, port = single_nginx(start_broker, peers)
    client = clients.new("v6-client").connect("::1", port)
    info = client_info(broker, "v6-client")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == ("::1", local_port(client), EDGE)
    shown = ctl(broker, "clients", "show", "v6-client").stdout
    assert f"peername=[::1]:{local_port(client)}, proxy={EDGE}:" in shown


def two_tier(
    start_broker: BrokerFactory, peers: Peers, inner_example: str, edge_trusted: str
) -> tuple[BrokerProcess, int]:
    """Topologies 2/3: edge NGINX (PROXY on) -> inner NGINX -> broker trusting only the inner tier."""
    broker = start_broker(
        example_broker_config(
            "nginx/tcp-two-tier.yaml", {"127.0.0.1:1883": "127.0.0.1:0", "10.0.0.2/32": f"{INNER}/32"}
        )
    )
    edge_port, inner_port = free_port(), free_port()
    inner = render_example(
        inner_example,
        {
            "listen 1885": f"listen 127.0.0.1:{inner_port}",
            "proxy_pass 127.0.0.1:1883;": f"proxy_bind {INNER};\n        proxy_pass 127.0.0.1:{broker.port('tcp:default')};",
            **(
                {"set_real_ip_from 10.0.0.1/32;": f"set_real_ip_from {edge_trusted};"}
                if "resend" in inner_example
                else {}
            ),
        },
    )
    peers(Nginx, "inner", inner).wait_listening(("127.0.0.1", inner_port))
    edge = render_example(
        "nginx/tcp-two-tier-edge.conf",
        {
            "listen 1884;": f"listen 127.0.0.1:{edge_port};",
            "proxy_pass 10.0.0.2:1885;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{inner_port};",
        },
    )
    peers(Nginx, "edge", edge).wait_listening(("127.0.0.1", edge_port))
    return broker, edge_port


def test_two_nginx_tiers_passthrough(start_broker: BrokerFactory, peers: Peers, clients: Clients) -> None:
    broker, port = two_tier(start_broker, peers, "nginx/tcp-two-tier-passthrough.conf", "")
    client = clients.new("pass-43").connect("127.0.0.1", port, bind_address="127.0.0.43")
    info = client_info(broker, "pass-43")
    # The edge's header passed through the inner tier untouched; the inner tier is the socket peer.
    assert (info["ip_address"], info["port"], info["proxy_address"]) == (
        "127.0.0.43",
        local_port(client),
        INNER,
    )


def test_two_nginx_tiers_resending_with_set_real_ip_from(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker, port = two_tier(start_broker, peers, "nginx/tcp-two-tier-resend.conf", f"{EDGE}/32")
    client = clients.new("resend-44").connect("127.0.0.1", port, bind_address="127.0.0.44")
    info = client_info(broker, "resend-44")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == (
        "127.0.0.44",
        local_port(client),
        INNER,
    )


def test_two_nginx_tiers_resending_without_trusting_the_edge(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    # Why set_real_ip_from matters: if the inner tier does not trust the edge, it re-sends the
    # edge's own address, and that is all the broker can know.
    broker, port = two_tier(start_broker, peers, "nginx/tcp-two-tier-resend.conf", "192.0.2.1/32")
    clients.new("resend-edge").connect("127.0.0.1", port, bind_address="127.0.0.44")
    assert client_info(broker, "resend-edge")["ip_address"] == EDGE


def haproxy(start_broker: BrokerFactory, peers: Peers, example: str) -> tuple[BrokerProcess, int]:
    broker = start_broker(
        example_broker_config(
            "haproxy/tcp-send-proxy-v2.yaml",
            {"127.0.0.1:1883": "127.0.0.1:0", "127.0.0.1/32": f"{HAPROXY_SOURCE}/32"},
        )
    )
    port = free_port()
    config = render_example(
        example,
        {
            # This machine's file descriptor limit is below what maxconn 10000 asks for.
            "maxconn 10000": "maxconn 1000",
            "bind :1884": f"bind 127.0.0.1:{port}\n    bind [::1]:{port}",
            "server broker1 127.0.0.1:1883": f"server broker1 127.0.0.1:{broker.port('tcp:default')} source {HAPROXY_SOURCE}",
        },
    )
    peers(HAProxy, "haproxy", config).wait_listening(("127.0.0.1", port), ("::1", port))
    return broker, port


def test_haproxy_send_proxy_v2(start_broker: BrokerFactory, peers: Peers, clients: Clients) -> None:
    broker, port = haproxy(start_broker, peers, "haproxy/tcp-send-proxy-v2.cfg")
    client = clients.new("ha-45").connect("127.0.0.1", port, bind_address="127.0.0.45")
    info = client_info(broker, "ha-45")
    assert (info["ip_address"], info["port"]) == ("127.0.0.45", local_port(client))
    assert (info["proxy_address"], info["address_source"]) == (HAPROXY_SOURCE, "proxy_protocol_v2")
    assert info["proxy_details"]["proxy_protocol"]["family"] == "INET"
    six = clients.new("ha-v6").connect("::1", port)
    assert client_info(broker, "ha-v6")["ip_address"] == "::1"
    assert local_port(six) == client_info(broker, "ha-v6")["port"]


def test_haproxy_send_proxy_v2_with_crc32c_unique_id_authority(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker, port = haproxy(start_broker, peers, "haproxy/tcp-send-proxy-v2-tlvs.cfg")
    clients.new("ha-46").connect("127.0.0.1", port, bind_address="127.0.0.46")
    info = client_info(broker, "ha-46")
    assert (info["ip_address"], info["address_source"]) == ("127.0.0.46", "proxy_protocol_v2")
    details = info["proxy_details"]["proxy_protocol"]
    assert re.fullmatch(r"[0-9a-f]{8}", details["crc32c"]), details  # verified by the broker
    unique_id = bytes.fromhex(details["unique_id"]).decode()
    assert "127.0.0.46:" in unique_id, unique_id  # HAProxy's unique-id-format names the client


# -------------------------------------------------------------------------------------------------
# Hostile input straight at the listener while good clients go through NGINX
# -------------------------------------------------------------------------------------------------

BAD_PROXY = "127.0.0.60"  # a trusted but misbehaving proxy: its bytes reach the parser
STRANGER = "127.0.0.66"  # not trusted: refused before a byte is read


def _send(data: bytes, source: str, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0)) as sock:
        try:
            sock.sendall(data)
            assert sock.recv(16) == b""
        except ConnectionResetError:
            pass


def test_hostile_input_is_refused_while_good_clients_keep_working(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker, nginx_port = single_nginx(start_broker, peers)
    broker.stop()
    broker = start_broker(
        example_broker_config(
            "nginx/tcp-proxy-protocol.yaml",
            {
                "127.0.0.1:1883": f"127.0.0.1:{broker.port('tcp:default')}",
                '["127.0.0.1/32"]': f'["{EDGE}/32", "{BAD_PROXY}/32"]',
                "3s": "1s",
            },
        )
    )
    port = broker.port("tcp:default")
    subscriber = clients.new("good-sub").connect("127.0.0.1", nginx_port, bind_address="127.0.0.47")
    subscriber.subscribe("good/#", 1)

    silent = [socket.create_connection(("127.0.0.1", port), source_address=(BAD_PROXY, 0)) for _ in range(5)]
    header = build_v2(src_addr="192.0.2.1", dst_addr="192.0.2.2", src_port=1, dst_port=2, crc32c=True)
    hostile = {
        "not_proxy_protocol": (b"\x00garbage" * 100, BAD_PROXY),
        "v1_too_long": (b"PROXY UNKNOWN " + b"A" * 500, BAD_PROXY),
        "v2_too_long": (
            build_v2(
                src_addr="192.0.2.1",
                dst_addr="192.0.2.2",
                src_port=1,
                dst_port=2,
                tlvs=[TLV(0xEE, bytes(9000))],
            ),
            BAD_PROXY,
        ),
        "v2_crc_mismatch": (header[:-1] + bytes([header[-1] ^ 0xFF]), BAD_PROXY),
        "untrusted_proxy": (build_v1("203.0.113.1", "10.0.0.1", 1234, 1883), STRANGER),
    }
    workers = [threading.Thread(target=_send, args=(data, source, port)) for data, source in hostile.values()]
    for worker in workers:
        worker.start()

    # Meanwhile, through NGINX: new clients connect and messages flow.
    for index in range(5):
        publisher = clients.new(f"good-pub-{index}").connect(
            "127.0.0.1", nginx_port, bind_address="127.0.0.48"
        )
        publisher.publish(f"good/{index}", b"ok", qos=1)
        assert subscriber.expect().topic == f"good/{index}"
        assert client_info(broker, f"good-pub-{index}")["ip_address"] == "127.0.0.48"
        publisher.close()
    for worker in workers:
        worker.join(WAIT)

    for reason, (_, source) in hostile.items():
        broker.wait_for_log(rf"tcp:default refused {re.escape(source)}:\d+: .*\[{reason}\]")
    started = time.monotonic()
    for sock in silent:
        sock.settimeout(WAIT)
        assert sock.recv(1) == b""
        sock.close()
    assert time.monotonic() - started < 3.0
    broker.wait_for_log(r"refused 127\.0\.0\.60:\d+: no complete PROXY header within 1s \[proxy_timeout\]")

    listeners = json.loads(ctl(broker, "listeners", "--json").stdout)
    refused = listeners[0]["refused"]
    assert refused["proxy_timeout"] == 5
    assert all(refused[reason] >= 1 for reason in hostile)
    # And the good subscriber is still there, still reported with its own address.
    assert client_info(broker, "good-sub")["ip_address"] == "127.0.0.47"
    clients.new("late").connect("127.0.0.1", nginx_port, bind_address="127.0.0.49").publish(
        "good/late", b"x", qos=1
    )
    assert subscriber.expect().topic == "good/late"


def test_a_plain_client_is_refused_by_a_proxy_protocol_listener(
    start_broker: BrokerFactory, peers: Peers, clients: Clients
) -> None:
    broker, nginx_port = single_nginx(start_broker, peers)
    assert clients.new("direct").connect_refused("127.0.0.1", broker.port("tcp:default"), bind_address=EDGE)
    broker.wait_for_log(
        rf"refused {re.escape(EDGE)}:\d+: PROXY header expected, got b'\\x10.*\[not_proxy_protocol\]"
    )
    clients.new("via-lb").connect("127.0.0.1", nginx_port, bind_address="127.0.0.41")
    assert client_info(broker, "via-lb")["ip_address"] == "127.0.0.41"


@pytest.mark.parametrize("check", ["check", "check check-send-proxy"], ids=["tcp-check", "send-proxy-local"])
def test_haproxy_health_checks_are_counted_and_not_logged(
    start_broker: BrokerFactory, peers: Peers, clients: Clients, check: str
) -> None:
    """HAProxy's ``check``: a TCP connect and close, or (``check-send-proxy``) a PROXY v2 LOCAL
    header and close. Counted per listener, at DEBUG only; a client through it is served as ever."""
    broker = start_broker(
        example_broker_config(
            "haproxy/tcp-send-proxy-v2.yaml",
            {"127.0.0.1:1883": "127.0.0.1:0", "127.0.0.1/32": f"{HAPROXY_SOURCE}/32"},
        ),
        log_level="info",
    )
    mark = broker.log_mark()
    port = free_port()
    config = render_example(
        "haproxy/tcp-send-proxy-v2.cfg",
        {
            "maxconn 10000": "maxconn 1000",
            "bind :1884": f"bind 127.0.0.1:{port}",
            "server broker1 127.0.0.1:1883 send-proxy-v2": (
                f"server broker1 127.0.0.1:{broker.port('tcp:default')} source {HAPROXY_SOURCE} "
                f"send-proxy-v2 {check} inter 100ms"
            ),
        },
    )
    peers(HAProxy, "haproxy", config).wait_listening(("127.0.0.1", port))

    def checks() -> int:
        listeners = json.loads(ctl(broker, "listeners", "--json").stdout)
        return int(listeners[0]["health_checks"])

    wait_until(lambda: checks() >= 3, what="three HAProxy health checks")
    clients.new("checked").connect("127.0.0.1", port, bind_address="127.0.0.46")
    assert client_info(broker, "checked")["ip_address"] == "127.0.0.46"
    listener = json.loads(ctl(broker, "listeners", "--json").stdout)[0]
    assert listener["refused"] == {}
    noisy = [line for line in broker.lines[mark:] if "listeners." in line or "refused" in line]
    assert noisy == []
