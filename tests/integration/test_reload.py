"""Configuration reload (SIGHUP and ``ctl reload``) against the real broker: what can change
live changes while clients stay connected; an invalid file changes nothing."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_ws_addresses import mqtt_over_ws
from tests.mqtt_raw import packet, read_packet, string
from tests.pki import Pki, make_pki
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    ctl,
    listener_config,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]


def audit_records(broker: BrokerProcess, event: str) -> list[dict[str, Any]]:
    path = broker.workdir / "audit.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [record for record in map(json.loads, lines) if record["event"] == event]


def config(**sections: Any) -> dict[str, Any]:
    return broker_config(tcp={"default": listener_config()}, audit={"file": "audit.log"}, **sections)


def test_sighup_changes_an_access_list_and_a_rule_while_clients_stay(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    broker = start_broker(config(), log_level="info")
    port = broker.port("tcp:default")
    reader = clients.new("reader").connect("127.0.0.1", port, bind_address="127.0.0.90")
    assert reader.subscribe("news/#") == [0]
    writer = clients.new("writer").connect("127.0.0.1", port, bind_address="127.0.0.93")
    writer.publish("news/1", b"before", qos=1)
    assert reader.expect().payload == b"before"

    new = config(
        access={"deny": ["127.0.0.91/32"]},
        authorization={"rules": [{"permission": "deny", "action": "subscribe", "topics": ["news/#"]}]},
    )
    broker.config_path.write_text(yaml.safe_dump(new))
    mark = broker.log_mark()
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"configuration reloaded: changed access, authorization", start=mark)
    # The rule holds for the subscription the client already had: no delivery.
    writer.publish("news/2", b"after", qos=1)
    reader.expect_nothing()
    assert client_info(broker, "reader")["ip_address"] == "127.0.0.90"  # still connected
    assert clients.new("blocked").connect_refused("127.0.0.1", port, bind_address="127.0.0.91")
    assert clients.new("other").connect("127.0.0.1", port, bind_address="127.0.0.92")
    record = wait_until(lambda: audit_records(broker, "config_reloaded"), what="config_reloaded")[0]
    assert (record["by"], record["changed"], record["restart_needed"]) == (
        "SIGHUP",
        ["access", "authorization"],
        [],
    )

    # A broken file changes nothing, and every problem is logged with its path.
    broker.config_path.write_text(
        "listeners:\n  tcp:\n    default: {bnid: '127.0.0.1:1'}\naccess: {deny: [300.1.1.1]}\n"
    )
    mark = broker.log_mark()
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"reload: .*broker\.yaml: listeners\.tcp\.default\.bnid: unknown key", start=mark)
    broker.wait_for_log(r"reload: .*broker\.yaml: access\.deny\[0\]: '300\.1\.1\.1' is not", start=mark)
    assert clients.new("still-blocked").connect_refused("127.0.0.1", port, bind_address="127.0.0.91")
    writer.publish("news/3", b"still", qos=1)
    reader.expect_nothing()
    failed = wait_until(lambda: audit_records(broker, "config_reload_failed"), what="config_reload_failed")[0]
    assert len(failed["errors"]) == 2


def test_ctl_reload_says_what_needs_a_restart(start_broker: BrokerFactory, clients: Clients) -> None:
    broker = start_broker(config(), log_level="info")
    port = broker.port("tcp:default")
    clients.new("stays").connect("127.0.0.1", port, bind_address="127.0.0.94")
    changed = broker_config(
        tcp={"default": listener_config(trusted_proxies=["10.0.0.0/8"], max_connections_per_ip=1)},
        audit={"file": "audit.log"},
        mqtt={"max_inflight": 8},
        sys_topics={"enable": True},
    )
    broker.config_path.write_text(yaml.safe_dump(changed))
    result = ctl(broker, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "changed: listeners, mqtt",
        "needs a restart to apply: sys_topics",
        "listeners: updated tcp:default",
    ]
    # The per-address limit of the listener applied live (one connection from .95).
    assert clients.new("first").connect("127.0.0.1", port, bind_address="127.0.0.95")
    assert clients.new("second").connect_refused("127.0.0.1", port, bind_address="127.0.0.95")
    broker.config_path.write_text("mqtt: {max_inflight: 0}\n")
    broken = ctl(broker, "reload")
    assert broken.returncode == 1
    assert "reload failed:" in broken.stderr and "mqtt.max_inflight" in broken.stderr
    assert "nothing was changed" in broken.stderr


# ------------------------------------------------------------------------------------------------
# Listeners: new settings for the connections to come, listeners started and stopped, and a
# reload that cannot bind or load a certificate changes nothing.
# ------------------------------------------------------------------------------------------------

LB = "127.0.0.50"


def reload_ok(broker: BrokerProcess) -> list[str]:
    result = ctl(broker, "reload")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def listeners_json(broker: BrokerProcess) -> dict[str, dict[str, Any]]:
    result = ctl(broker, "listeners", "--json")
    assert result.returncode == 0, result.stderr
    return {entry["id"]: entry for entry in json.loads(result.stdout)}


def port_of(broker: BrokerProcess, listener_id: str) -> int:
    return int(listeners_json(broker)[listener_id]["addresses"][0].rpartition(":")[2])


def v5_connect(client_id: str) -> bytes:
    return packet(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + string(client_id))


def test_reload_adds_a_trusted_proxy_to_a_running_ws_listener(start_broker: BrokerFactory) -> None:
    def ws(trusted: list[str]) -> dict[str, Any]:
        return broker_config(
            ws={
                "default": listener_config(
                    trusted_proxies=trusted, websocket={"proxy_address_header": "X-Forwarded-For"}
                )
            },
            audit={"file": "audit.log"},
        )

    broker = start_broker(ws(["127.0.0.60/32"]), log_level="info")
    port = broker.port("ws:default")
    forwarded = [("X-Forwarded-For", "203.0.113.9")]
    before = mqtt_over_ws(port, "before", forwarded, source=LB)
    assert client_info(broker, "before")["ip_address"] == LB  # not trusted (yet): the header is ignored
    broker.config_path.write_text(yaml.safe_dump(ws(["127.0.0.60/32", f"{LB}/32"])))
    assert reload_ok(broker) == ["changed: listeners", "listeners: updated ws:default"]
    with before, mqtt_over_ws(port, "after", forwarded, source=LB):
        info = client_info(broker, "after")
        assert (info["ip_address"], info["proxy_address"], info["address_source"]) == (
            "203.0.113.9",
            LB,
            "x_forwarded_for",
        )
        # The connection made before keeps the address it was admitted with.
        assert client_info(broker, "before")["ip_address"] == LB
    assert listeners_json(broker)["ws:default"]["trusted_proxies"] == ["127.0.0.60/32", f"{LB}/32"]
    record = wait_until(lambda: audit_records(broker, "config_reloaded"), what="config_reloaded")[0]
    assert (record["changed"], record["listeners"]["updated"]) == (["listeners"], ["ws:default"])


def test_reload_starts_a_listener_and_stops_another(start_broker: BrokerFactory, clients: Clients) -> None:
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config(), "old": listener_config()}, audit={"file": "audit.log"}
        )
    )
    old_port = broker.port("tcp:old")
    stays = clients.new("stays").connect("127.0.0.1", broker.port("tcp:default"))
    v3 = clients.new("on-old").connect("127.0.0.1", old_port)
    v5 = socket.create_connection(("127.0.0.1", old_port), timeout=WAIT)
    v5.sendall(v5_connect("on-old-v5"))
    assert read_packet(v5)[0] == 0x20
    client_info(broker, "on-old-v5")

    broker.config_path.write_text(
        yaml.safe_dump(
            broker_config(
                tcp={"default": listener_config(), "new": listener_config()}, audit={"file": "audit.log"}
            )
        )
    )
    mark = broker.log_mark()
    assert reload_ok(broker) == ["changed: listeners", "listeners: started tcp:new; stopped tcp:old"]
    broker.wait_for_log(r"listener tcp:new on 127\.0\.0\.1:\d+ \(proxy_protocol=false\)", start=mark)
    broker.wait_for_log(r"listener tcp:old stopped: 2 connection\(s\) closed", start=mark)
    # The old listener's clients are disconnected: MQTT 5 ones told why (0x8B, server shutting down).
    with v5:
        kind, body = read_packet(v5)
        assert (kind, body[:1]) == (0xE0, b"\x8b")
    assert v3.disconnected.wait(WAIT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
    # ctl listeners, the admin API and the clients list show the new set.
    listed = [line.split()[0] for line in ctl(broker, "listeners").stdout.splitlines()]
    assert listed == ["tcp:default", "tcp:new"]
    clients.new("on-new").connect("127.0.0.1", port_of(broker, "tcp:new"))
    assert client_info(broker, "on-new")["listener"] == "tcp:new"
    assert client_info(broker, "stays")["listener"] == "tcp:default"
    stays.publish("still/here", b"1", qos=1)
    assert json.loads(ctl(broker, "status", "--json").stdout)["listeners"] == ["tcp:default", "tcp:new"]
    reasons = {record["clientid"]: record["reason"] for record in audit_records(broker, "disconnected")}
    assert reasons == {"on-old": "listener_removed", "on-old-v5": "listener_removed"}


def test_a_listener_that_cannot_bind_fails_the_reload_and_changes_nothing(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    broker = start_broker(config())
    port = broker.port("tcp:default")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        broker.config_path.write_text(
            yaml.safe_dump(
                broker_config(
                    tcp={
                        "default": listener_config(max_connections_per_ip=1),
                        "fresh": listener_config(),
                        "busy": listener_config(f"127.0.0.1:{busy}"),
                    },
                    audit={"file": "audit.log"},
                    access={"deny": ["127.0.0.96/32"]},
                )
            )
        )
        failed = ctl(broker, "reload")
    assert failed.returncode == 1
    assert (
        f"reload failed: {broker.config_path}: listeners.tcp.busy.bind: cannot listen on 127.0.0.1:{busy}: "
        "Address already in use"
    ) in failed.stderr
    assert "nothing was changed" in failed.stderr
    # Nothing changed: no new listener, no access rule, no per-address limit.
    assert list(listeners_json(broker)) == ["tcp:default"]
    assert clients.new("not-denied").connect("127.0.0.1", port, bind_address="127.0.0.96")
    assert clients.new("second").connect("127.0.0.1", port, bind_address="127.0.0.96")


def tls_peer_certificate(port: int, ca: str) -> bytes:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c" + string("tls-probe")))
        assert read_packet(tls)[0] == 0x20
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def pem_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_tls_certificates_are_read_again_and_a_bad_one_fails_the_reload(
    start_broker: BrokerFactory, pki: Pki, tmp_path: Path, clients: Clients
) -> None:
    renewed = make_pki(tmp_path / "renewed")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki.server_cert, live / "server.pem")
    shutil.copy(pki.server_key, live / "server.key")
    # One CA file trusting both: the client checks who signed what it gets, we compare the bytes.
    both = live / "both-ca.pem"
    both.write_text(pki.ca.read_text() + renewed.ca.read_text())

    def tls_config(certfile: str, **tcp: Any) -> dict[str, Any]:
        options = {"certfile": certfile, "keyfile": str(live / "server.key")}
        return broker_config(
            tcp=tcp, ssl={"default": listener_config(ssl_options=options)}, audit={"file": "audit.log"}
        )

    broker = start_broker(tls_config(str(live / "server.pem")))
    port = broker.port("ssl:default")
    assert tls_peer_certificate(port, str(both)) == pem_der(pki.server_cert)
    kept = clients.new("kept", tls={"ca_certs": str(both)}).connect("127.0.0.1", port)

    # A renewed certificate at the same path: the file did not change, the certificate did.
    shutil.copy(renewed.server_cert, live / "server.pem")
    shutil.copy(renewed.server_key, live / "server.key")
    assert reload_ok(broker) == ["changed: nothing"]
    assert tls_peer_certificate(port, str(both)) == pem_der(renewed.server_cert)
    kept.publish("still/connected", b"1", qos=1)  # the session made with the old certificate goes on

    # A certificate that cannot be loaded fails the whole reload, naming the listener (the file is
    # checked as check-config checks it: the certificates are loaded, and nothing else changes).
    broker.config_path.write_text(
        yaml.safe_dump(tls_config(str(live / "missing.pem"), extra=listener_config()))
    )
    failed = ctl(broker, "reload")
    assert failed.returncode == 1
    assert (
        f"reload failed: {broker.config_path}: listeners.ssl.default.ssl_options: certfile: cannot read "
        in failed.stderr
    )
    assert tls_peer_certificate(port, str(both)) == pem_der(renewed.server_cert)
    assert list(listeners_json(broker)) == ["ssl:default"]


def test_a_listener_whose_bind_changed_moves_and_its_clients_stay(
    start_broker: BrokerFactory, clients: Clients
) -> None:
    broker = start_broker(config())
    old_port = broker.port("tcp:default")
    stays = clients.new("stays").connect("127.0.0.1", old_port)
    broker.config_path.write_text(
        yaml.safe_dump(
            broker_config(tcp={"default": listener_config("127.0.0.2:0")}, audit={"file": "audit.log"})
        )
    )
    assert reload_ok(broker) == ["changed: listeners", "listeners: moved tcp:default"]
    address = listeners_json(broker)["tcp:default"]["addresses"][0]
    assert address.startswith("127.0.0.2:")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
    clients.new("moved").connect("127.0.0.2", int(address.rpartition(":")[2]))
    assert client_info(broker, "moved")["listener"] == "tcp:default"
    assert client_info(broker, "stays")["listener"] == "tcp:default"
    stays.publish("still/here", b"1", qos=1)
    assert listeners_json(broker)["tcp:default"]["current_connections"] == 2
