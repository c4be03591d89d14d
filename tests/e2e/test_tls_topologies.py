"""TLS behind real load balancers: HAProxy passthrough and termination, NGINX stream into wss.

Certificates are made at test time (tests/pki.py). Each test asserts what ``ctl clients show``
reports for a client bound to its own 127.x address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.peers import HAProxy, Nginx, free_port, render_example
from tests.pki import Pki
from tests.support import BrokerProcess, Clients, client_info, example_broker_config, local_port

pytestmark = pytest.mark.e2e

BrokerFactory = Callable[..., BrokerProcess]
Peers = Callable[..., Any]
LB = "127.0.0.52"


def cert_paths(pki: Pki) -> dict[str, str]:
    return {
        "/etc/realip-broker/server.pem": str(pki.server_cert),
        "/etc/realip-broker/server.key": str(pki.server_key),
    }


def test_haproxy_tls_passthrough_with_send_proxy_v2_into_an_ssl_listener(
    start_broker: BrokerFactory, peers: Peers, clients: Clients, pki: Pki
) -> None:
    broker = start_broker(
        example_broker_config(
            "haproxy/tls-passthrough.yaml",
            {"127.0.0.1:8884": "127.0.0.1:0", "127.0.0.1/32": f"{LB}/32", **cert_paths(pki)},
        )
    )
    port = free_port()
    config = render_example(
        "haproxy/tls-passthrough.cfg",
        {
            "maxconn 10000": "maxconn 1000",
            "bind :8883": f"bind 127.0.0.1:{port}",
            "server broker1 127.0.0.1:8884": f"server broker1 127.0.0.1:{broker.port('ssl:default')} source {LB}",
        },
    )
    peers(HAProxy, "haproxy", config).wait_listening(("127.0.0.1", port))
    client = clients.new("tls-43", tls={"ca_certs": str(pki.ca)}).connect(
        "localhost", port, bind_address="127.0.0.43"
    )
    info = client_info(broker, "tls-43")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == ("127.0.0.43", local_port(client), LB)
    assert (info["address_source"], info["tls"]["source"]) == ("proxy_protocol_v2", "local")
    assert info["tls"]["version"].startswith("TLSv1.")


def test_haproxy_terminating_tls_sends_the_client_cn(
    start_broker: BrokerFactory, peers: Peers, clients: Clients, pki: Pki
) -> None:
    broker = start_broker(
        example_broker_config(
            "haproxy/tls-termination.yaml", {"127.0.0.1:1883": "127.0.0.1:0", "127.0.0.1/32": f"{LB}/32"}
        )
    )
    port = free_port()
    config = render_example(
        "haproxy/tls-termination.cfg",
        {
            "maxconn 10000": "maxconn 1000",
            "bind :8883": f"bind 127.0.0.1:{port}",
            "/etc/haproxy/server.pem": str(pki.server_pem),
            "/etc/haproxy/ca.pem": str(pki.ca),
            "server broker1 127.0.0.1:1883": f"server broker1 127.0.0.1:{broker.port('tcp:default')} source {LB}",
        },
    )
    peers(HAProxy, "haproxy", config).wait_listening(("127.0.0.1", port))
    tls = {"ca_certs": str(pki.ca), "certfile": str(pki.client_cert), "keyfile": str(pki.client_key)}
    client = clients.new("cert-44", tls=tls)
    client.client.username_pw_set("someone-else")
    client.connect("localhost", port, bind_address="127.0.0.44")
    info = client_info(broker, "cert-44")
    assert (info["ip_address"], info["proxy_address"], info["username"]) == ("127.0.0.44", LB, Pki.CLIENT_CN)
    assert info["tls"] == {
        "version": info["tls"]["version"],
        "cert_cn": Pki.CLIENT_CN,
        "cert_verified": True,
        "source": "proxy_protocol",
    }
    # HAProxy refuses a certificate its CA did not sign; nothing reaches the broker.
    rogue = {"ca_certs": str(pki.ca), "certfile": str(pki.rogue_cert), "keyfile": str(pki.rogue_key)}
    assert clients.new("rogue-44", tls=rogue).connect_refused("localhost", port, bind_address="127.0.0.44")


def test_wss_listener_behind_nginx_stream_with_proxy_protocol(
    start_broker: BrokerFactory, peers: Peers, clients: Clients, pki: Pki
) -> None:
    broker = start_broker(
        example_broker_config(
            "nginx/wss-proxy-protocol.yaml",
            {"127.0.0.1:8085": "127.0.0.1:0", "127.0.0.1/32": f"{LB}/32", **cert_paths(pki)},
        )
    )
    port = free_port()
    body = render_example(
        "nginx/wss-stream-proxy-protocol.conf",
        {
            "listen 8084;": f"listen 127.0.0.1:{port};",
            "proxy_pass 127.0.0.1:8085;": f"proxy_bind {LB};\n        proxy_pass 127.0.0.1:{broker.port('wss:default')};",
        },
    )
    peers(Nginx, "nginx", body).wait_listening(("127.0.0.1", port))
    client = clients.new("wss-45", transport="websockets", tls={"ca_certs": str(pki.ca)})
    client.connect("localhost", port, bind_address="127.0.0.45")
    info = client_info(broker, "wss-45")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == ("127.0.0.45", local_port(client), LB)
    assert (info["listener"], info["address_source"], info["tls"]["source"]) == (
        "wss:default",
        "proxy_protocol_v1",
        "local",
    )
