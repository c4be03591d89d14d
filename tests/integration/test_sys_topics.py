"""``$SYS`` against the real broker behind a real NGINX: client events carry the client's real
address (and NGINX's as the proxy), figures are retained, and only a client that a rule allows may
read ``$SYS`` at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.routes import EDGE, nginx_proxy
from tests.support import WAIT, BrokerProcess, Clients, broker_config, listener_config, require_binary

BrokerFactory = Callable[..., BrokerProcess]

RULES = {
    "rules": [
        {"permission": "allow", "action": "subscribe", "topics": ["$SYS/#"], "ipaddress": ["127.0.0.80"]}
    ],
    "no_match": "allow",
}


@pytest.mark.e2e
def test_client_events_carry_the_real_address(
    start_broker: BrokerFactory, clients: Clients, tmp_path: Path
) -> None:
    require_binary("nginx")
    broker = start_broker(
        broker_config(
            tcp={
                "default": listener_config(),
                "pp": listener_config(proxy_protocol=True, trusted_proxies=[f"{EDGE}/32"]),
            },
            node={"name": "edge-1"},
            sys_topics={"enable": True, "sys_msg_interval": "1s"},
            authorization=RULES,
        ),
        log_level="info",
    )
    direct = broker.port("tcp:default")
    monitor = clients.new("monitor").connect("127.0.0.1", direct, bind_address="127.0.0.80")
    assert monitor.subscribe("$SYS/brokers/edge-1/#") == [0]
    first = monitor.expect()  # the retained figures come first
    assert first.topic.startswith("$SYS/brokers/edge-1/") and first.retain
    nosy = clients.new("nosy").connect("127.0.0.1", direct, bind_address="127.0.0.81")
    assert nosy.subscribe("$SYS/#") == [0x80]  # no_match: allow does not open $SYS
    port, nginx = nginx_proxy(broker, tmp_path / "nginx")
    try:
        device = clients.new("dev/7").connect("127.0.0.1", port, bind_address="127.0.0.82")
        event = None
        while event is None:
            got = monitor.expect(WAIT)
            if got.topic == "$SYS/brokers/edge-1/clients/dev%2F7/connected":
                event = json.loads(got.payload)
        assert (event["clientid"], event["ipaddress"], event["proxy_ipaddress"], event["address_source"]) == (
            "dev/7",
            "127.0.0.82",
            EDGE,
            "proxy_protocol_v1",
        )
        assert event["listener"] == "tcp:pp" and event["proto_ver"] == 4
        device.close()
        gone = None
        while gone is None:
            got = monitor.expect(WAIT)
            if got.topic == "$SYS/brokers/edge-1/clients/dev%2F7/disconnected":
                gone = json.loads(got.payload)
        assert (gone["ipaddress"], gone["reason"]) == ("127.0.0.82", "client_disconnect")
    finally:
        nginx.stop()
    nosy.expect_nothing()


def test_sys_needs_a_rule_or_a_source_that_says_allow(start_broker: BrokerFactory, clients: Clients) -> None:
    """A source that fails (or ignores) leaves no_match to decide ordinary topics, never $SYS."""
    import socket

    with socket.socket() as probe:  # nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = {"type": "http", "url": f"http://127.0.0.1:{port}/acl", "request_timeout": "2s"}
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()},
            sys_topics={"enable": True},
            authorization={"sources": [source], "no_match": "allow"},
        ),
        log_level="info",
    )
    client = clients.new("curious").connect("127.0.0.1", broker.port("tcp:default"))
    assert client.subscribe("$SYS/#") == [0x80]
    assert client.subscribe("plain/#") == [0]  # no_match: allow, the source being down
