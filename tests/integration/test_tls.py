"""TLS listeners (ssl, wss) against the real broker: PROXY before the handshake, identity, timeouts."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

from listeners.proxy_protocol import build_v1, build_v2, ssl_tlv
from tests.pki import Pki
from tests.support import WAIT, BrokerProcess, Clients, broker_config, client_info, ctl, listener_config

BrokerFactory = Callable[..., BrokerProcess]
LB = "127.0.0.50"


def connect_packet(client_id: str, username: str | None = None) -> bytes:
    cid = client_id.encode()
    flags = 0x02 | (0x80 if username else 0)
    payload = len(cid).to_bytes(2, "big") + cid
    if username:
        payload += len(username).to_bytes(2, "big") + username.encode()
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + payload
    return bytes([0x10, len(body)]) + body


def ssl_options(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"certfile": str(pki.server_cert), "keyfile": str(pki.server_key), **extra}


def client_context(pki: Pki, cert: bool = False, rogue: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(
            str(pki.rogue_cert if rogue else pki.client_cert), str(pki.rogue_key if rogue else pki.client_key)
        )
    return context


def tls_mqtt(
    port: int, context: ssl.SSLContext, client_id: str, prefix: bytes = b"", source: str = "127.0.0.1"
) -> bytes:
    """PROXY header and TLS ClientHello in ONE write, then MQTT CONNECT over TLS; returns the CONNACK."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outgoing.read()
            sock.sendall((prefix if first else b"") + data)
            first = False
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(chunk)
    tls.write(connect_packet(client_id))
    sock.sendall(outgoing.read())
    answer = b""
    while len(answer) < 4:
        try:
            answer += tls.read(4 - len(answer))
        except ssl.SSLWantReadError:
            chunk = sock.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
    return answer, sock


def test_ssl_listener_round_trip_and_tls_in_clients_show(
    start_broker: BrokerFactory, pki: Pki, clients: Clients
) -> None:
    broker = start_broker(broker_config(ssl={"default": listener_config(ssl_options=ssl_options(pki))}))
    port = broker.port("ssl:default")
    tls = {"ca_certs": str(pki.ca)}
    sub = clients.new("tls-sub", tls=tls).connect("localhost", port)
    sub.subscribe("tls/t", 1)
    clients.new("tls-pub", tls=tls).connect("localhost", port).publish("tls/t", b"secret", qos=1)
    assert sub.expect().payload == b"secret"
    info = client_info(broker, "tls-sub")
    assert info["tls"]["version"] in ("TLSv1.3", "TLSv1.2") and info["tls"]["cert_cn"] is None
    assert ", tls=TLSv1." in ctl(broker, "clients", "show", "tls-sub").stdout


@pytest.mark.parametrize(
    "header",
    [
        build_v1("203.0.113.30", "10.0.0.1", 4000, 8883),
        build_v2(src_addr="203.0.113.30", dst_addr="10.0.0.1", src_port=4000, dst_port=8883),
    ],
    ids=["v1", "v2"],
)
def test_proxy_header_before_the_handshake_in_one_write(
    start_broker: BrokerFactory, pki: Pki, header: bytes
) -> None:
    broker = start_broker(
        broker_config(
            ssl={
                "default": listener_config(
                    proxy_protocol=True, trusted_proxies=[f"{LB}/32"], ssl_options=ssl_options(pki)
                )
            }
        )
    )
    answer, sock = tls_mqtt(
        broker.port("ssl:default"), client_context(pki), "behind-lb", prefix=header, source=LB
    )
    with sock:
        assert answer == b"\x20\x02\x00\x00"
        info = client_info(broker, "behind-lb")
    assert (info["ip_address"], info["port"], info["proxy_address"]) == ("203.0.113.30", 4000, LB)
    assert info["tls"]["source"] == "local"


def test_verified_client_certificate_cn_is_the_username(
    start_broker: BrokerFactory, pki: Pki, clients: Clients
) -> None:
    options = ssl_options(pki, cacertfile=str(pki.ca), verify="verify_peer")
    broker = start_broker(
        broker_config(ssl={"default": listener_config(peer_cert_as_username="cn", ssl_options=options)})
    )
    port = broker.port("ssl:default")
    client = clients.new(
        "cert-client",
        tls={"ca_certs": str(pki.ca), "certfile": str(pki.client_cert), "keyfile": str(pki.client_key)},
    )
    client.client.username_pw_set("claimed-name")
    client.connect("localhost", port)
    info = client_info(broker, "cert-client")
    assert (info["username"], info["tls"]["cert_cn"], info["tls"]["cert_verified"]) == (
        Pki.CLIENT_CN,
        Pki.CLIENT_CN,
        True,
    )
    assert f"username={Pki.CLIENT_CN}, " in ctl(broker, "clients", "show", "cert-client").stdout
    assert f"cert_cn={Pki.CLIENT_CN}" in ctl(broker, "clients", "show", "cert-client").stdout
    # Without a certificate the client cannot claim a username.
    anonymous = clients.new("no-cert", tls={"ca_certs": str(pki.ca)})
    anonymous.client.username_pw_set("claimed-name")
    anonymous.connect("localhost", port)
    assert client_info(broker, "no-cert")["username"] is None
    # A self-signed certificate with the same CN fails the handshake.
    assert clients.new(
        "rogue", tls={"ca_certs": str(pki.ca), "certfile": str(pki.rogue_cert), "keyfile": str(pki.rogue_key)}
    ).connect_refused("localhost", port)
    broker.wait_for_log(r"ssl:default refused 127\.0\.0\.1:\d+: TLS handshake failed: .*\[tls_error\]")


def test_a_client_that_never_finishes_the_handshake_is_closed_on_time(
    start_broker: BrokerFactory, pki: Pki
) -> None:
    broker = start_broker(
        broker_config(
            ssl={
                "default": listener_config(
                    proxy_protocol="optional",
                    trusted_proxies=[f"{LB}/32"],
                    proxy_protocol_timeout="700ms",
                    ssl_options=ssl_options(pki, handshake_timeout="700ms"),
                )
            }
        )
    )
    port = broker.port("ssl:default")
    for prefix in (b"", build_v1("203.0.113.31", "10.0.0.1", 1, 2), b"\x16\x03\x01"):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(LB, 0)) as sock:
            sock.sendall(prefix)
            started = time.monotonic()
            assert sock.recv(1) == b""
            assert 0.6 < time.monotonic() - started < 3.0
    broker.wait_for_log(
        r"ssl:default refused 203\.0\.113\.31:1 via 127\.0\.0\.50:\d+ \(proxy_protocol_v1\): no TLS handshake within 0\.7s \[tls_timeout\]"
    )
    # Silent from the start: the PROXY wait ends it; after a header or a partial ClientHello, TLS.
    refused = json.loads(ctl(broker, "listeners", "--json").stdout)[0]["refused"]
    assert refused == {"proxy_timeout": 1, "tls_timeout": 2}


@pytest.mark.parametrize(
    ("verify", "trusted", "username"),
    [(0, True, Pki.CLIENT_CN), (1, True, None)],
    ids=["verified", "not-verified"],
)
def test_proxy_v2_ssl_tlv_sets_the_username_only_when_verified(
    start_broker: BrokerFactory, verify: int, trusted: bool, username: str | None
) -> None:
    broker = start_broker(
        broker_config(
            tcp={
                "default": listener_config(
                    proxy_protocol=True, trusted_proxies=[f"{LB}/32"], peer_cert_as_username="cn"
                )
            }
        )
    )
    header = build_v2(
        src_addr="203.0.113.40", dst_addr="10.0.0.1", src_port=5000, dst_port=8883,
        tlvs=[ssl_tlv(client=0x01 | 0x02 | 0x04, verify=verify, version="TLSv1.3", cn=Pki.CLIENT_CN)],
    )  # fmt: skip
    with socket.create_connection(
        ("127.0.0.1", broker.port("tcp:default")), timeout=WAIT, source_address=(LB, 0)
    ) as sock:
        sock.sendall(header + connect_packet("tlv-client", username="claimed"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        info = client_info(broker, "tlv-client")
    assert info["username"] == username
    assert info["tls"] == {
        "version": "TLSv1.3",
        "cert_cn": Pki.CLIENT_CN,
        "cert_verified": verify == 0,
        "source": "proxy_protocol",
    }


def test_wss_listener_round_trip(start_broker: BrokerFactory, pki: Pki, clients: Clients) -> None:
    broker = start_broker(broker_config(wss={"default": listener_config(ssl_options=ssl_options(pki))}))
    port = broker.port("wss:default")
    sub = clients.new("wss-sub", transport="websockets", tls={"ca_certs": str(pki.ca)}).connect(
        "localhost", port
    )
    sub.subscribe("wss/t", 1)
    clients.new("wss-pub", transport="websockets", tls={"ca_certs": str(pki.ca)}).connect(
        "localhost", port
    ).publish("wss/t", b"x", qos=1)
    assert sub.expect().payload == b"x"
    info = client_info(broker, "wss-sub")
    assert (info["listener"], info["tls"]["source"]) == ("wss:default", "local")


def test_tls_config_errors_name_their_path(tmp_path: Any, pki: Pki) -> None:
    from broker.errors import ConfigError
    from broker.settings import load_settings

    with pytest.raises(ConfigError) as info:
        load_settings(
            {
                "listeners": {
                    "ssl": {
                        "a": {
                            "bind": "127.0.0.1:0",
                            "ssl_options": {"certfile": str(pki.server_cert), "keyfile": str(pki.client_key)},
                        },
                        "b": {
                            "bind": "127.0.0.1:0",
                            "ssl_options": {"certfile": "/nope.pem", "keyfile": "/nope.key"},
                        },
                        "c": {"bind": "127.0.0.1:0"},
                        "d": {
                            "bind": "127.0.0.1:0",
                            "peer_cert_as_username": "cn",
                            "ssl_options": ssl_options(pki),
                        },
                    },
                    "tcp": {"default": {"peer_cert_as_username": "cn"}},
                }
            }
        )
    problems = [str(p) for p in info.value.problems]
    assert any(
        p.startswith("listeners.ssl.a.ssl_options: certfile/keyfile:") and "not a usable pair" in p
        for p in problems
    )
    assert (
        "listeners.ssl.b.ssl_options: certfile: cannot read /nope.pem: No such file or directory" in problems
    )
    assert "listeners.ssl.c.ssl_options: required: certfile and keyfile at least" in problems
    assert any(
        p.startswith("listeners.ssl.d.peer_cert_as_username: needs ssl_options.verify") for p in problems
    )
    assert any(
        p.startswith("listeners.tcp.default.peer_cert_as_username: on a listener without TLS")
        for p in problems
    )
