"""The admin API and ``realip-broker ctl`` against the real broker process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    REPO,
    WAIT,
    BrokerProcess,
    Clients,
    admin_get,
    broker_config,
    client_info,
    ctl,
    listener_config,
    metric_samples,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]
TOKEN = "s3cret-token-0123456789"


get = admin_get


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    return start_broker(broker_config(tcp={"default": listener_config()}, ws={"default": listener_config()}))


def test_the_admin_socket_is_private(broker: BrokerProcess) -> None:
    mode = os.stat(broker.workdir / "data" / "admin.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(broker.workdir / "data").st_mode) == 0o700


def test_health_and_metrics(broker: BrokerProcess, clients: Clients) -> None:
    assert get(broker, "/health")[:2] == (200, b'{"status": "ok"}')
    port = broker.port("tcp:default")
    sub = clients.new("m-sub").connect("127.0.0.1", port)
    sub.subscribe("m/t", 1)
    pub = clients.new("m-pub").connect("127.0.0.1", port)
    for _ in range(3):
        pub.publish("m/t", b"x", qos=1)
        sub.expect()
    with socket.create_connection(("127.0.0.1", broker.port("ws:default")), timeout=WAIT) as sock:
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        sock.recv(100)
    status, body, content_type = get(broker, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("realip_connections", (("listener", "tcp:default"),))] == 2
    assert samples[("realip_sessions_connected", ())] == 2
    assert samples[("realip_messages_received_total", ())] == 3
    assert samples[("realip_messages_sent_total", ())] == 3
    assert (
        samples[("realip_connections_refused_total", (("listener", "ws:default"), ("reason", "not_found")))]
        == 1
    )


def test_clients_filters_and_paging(broker: BrokerProcess, clients: Clients) -> None:
    port = broker.port("tcp:default")
    for index, source in enumerate(["127.0.0.71", "127.0.0.72", "127.0.0.73"]):
        clients.new(f"f-{index}").connect("127.0.0.1", port, bind_address=source)
    clients.new("f-ws", transport="websockets").connect("127.0.0.1", broker.port("ws:default"))
    client_info(broker, "f-ws")

    def ids(query: str) -> list[str]:
        status, body, _ = get(broker, f"/api/v1/clients?{query}")
        assert status == 200, body
        return sorted(c["clientid"] for c in json.loads(body)["data"])

    assert ids("") == ["f-0", "f-1", "f-2", "f-ws"]
    assert ids("ip=127.0.0.72") == ["f-1"]
    assert ids("ip=127.0.0.72/31") == ["f-1", "f-2"]
    assert ids("listener=ws:default") == ["f-ws"]
    _, body, _ = get(broker, "/api/v1/clients?limit=2&page=2")
    page = json.loads(body)
    assert (len(page["data"]), page["meta"]) == (2, {"page": 2, "limit": 2, "count": 4, "hasnext": False})
    assert get(broker, "/api/v1/clients?ip=10.0.0.300")[0] == 400
    # The same filters from ctl.
    listed = ctl(broker, "clients", "list", "--ip", "127.0.0.72/31", "--listener", "tcp:default")
    assert [line.split(",")[0] for line in listed.stdout.splitlines()] == ["Client(f-1", "Client(f-2"]
    bad = ctl(broker, "clients", "list", "--ip", "10.0.0.300")
    assert bad.returncode == 1 and "is not" in bad.stderr and "Traceback" not in bad.stderr
    assert get(broker, "/api/v1/clients?limit=0")[0] == 400
    assert get(broker, "/api/v1/clients/nobody")[:2] == (
        404,
        b'{"code": "CLIENTID_NOT_FOUND", "message": "client nobody not found"}',
    )


def test_ctl_listeners(broker: BrokerProcess) -> None:
    result = ctl(broker, "listeners")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tcp:default ") and "proxy_protocol=false connections=0" in lines[0]
    assert lines[1].startswith("ws:default ")


def test_ctl_errors_are_one_line(broker: BrokerProcess, tmp_path: Any) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "ctl", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    missing = run("clients", "list")  # no broker serves tmp_path/data/admin.sock
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "realip-broker ctl: cannot reach the broker's admin API at unix:data/admin.sock: "
        "No such file or directory (is the broker running?)"
    )
    refused = run("--admin", "127.0.0.1:1", "listeners")
    assert refused.returncode == 1 and "Connection refused" in refused.stderr
    bad = run("--admin", "nowhere", "listeners")
    assert bad.returncode == 1 and "--admin: 'nowhere' is not 'unix:PATH' or 'IP:PORT'" in bad.stderr
    usage = run("clients", "frobnicate")
    assert usage.returncode == 2
    for result in (missing, refused, bad, usage):
        assert "Traceback" not in result.stderr


def test_tcp_admin_requires_the_token(start_broker: BrokerFactory, clients: Clients) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    broker = start_broker(
        broker_config(
            tcp={"default": listener_config()}, admin={"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}
        )
    )
    broker.wait_for_log(rf"admin API on 127\.0\.0\.1:{admin_port}")
    clients.new("tok").connect("127.0.0.1", broker.port("tcp:default"))

    def status(headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=WAIT)
        connection.request("GET", "/api/v1/clients", headers=headers)
        return connection.getresponse().status

    assert status({}) == 401
    assert status({"Authorization": "Bearer wrong"}) == 401
    assert status({"Authorization": f"Bearer {TOKEN}"}) == 200
    assert status({"Authorization": f"bearer {TOKEN}"}) == 200  # RFC 7235: the scheme is case-insensitive
    assert status({"Authorization": f"Basic {TOKEN}"}) == 401
    assert status({"Authorization": f"Bearer {TOKEN.upper()}"}) == 401  # the token is not
    admin = f"127.0.0.1:{admin_port}"
    wrong = ctl(broker, "--admin", admin, "--token", "nope", "clients", "list")
    assert wrong.returncode == 1
    assert "refused the token (401)" in wrong.stderr
    good = ctl(broker, "--admin", admin, "--token", TOKEN, "clients", "show", "tok")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("Client(tok, ")
    via_config = ctl(broker, "--config", str(broker.config_path), "clients", "show", "tok", "--json")
    assert json.loads(via_config.stdout)["clientid"] == "tok"


def test_a_stale_socket_is_replaced_and_a_live_one_is_not(start_broker: BrokerFactory, tmp_path: Any) -> None:
    first = start_broker(broker_config(tcp={"default": listener_config()}))
    first.stop(sig=9)  # SIGKILL leaves the socket file behind
    assert (first.workdir / "data" / "admin.sock").exists()
    config = broker_config(tcp={"default": listener_config()})
    again = BrokerProcess(config, first.workdir)
    try:
        again.wait_ready()
        # A second broker on the same data dir is stopped by the store's lock first...
        clash = BrokerProcess(config, first.workdir)
        assert clash.proc.wait(WAIT) == 1
        clash.wait_for_log(r"persistence\.file: data/store\.sqlite3: the store is in use by another process")
        # ...and without a store, by the live admin socket.
        clash = BrokerProcess({**config, "persistence": {"enable": False}}, first.workdir)
        assert clash.proc.wait(WAIT) == 1
        clash.wait_for_log(r"admin\.listen: another broker is serving data/admin\.sock")
    finally:
        again.stop()


def test_ctl_escapes_what_clients_chose(broker: BrokerProcess) -> None:
    """A client id with a newline and ANSI escapes cannot forge a line of ``ctl`` output nor
    reach the operator's terminal; ``--json`` keeps the exact value."""
    from tests.mqtt_raw import connect, read_packet

    forged = "evil\nClient(fake, username=root, peername=1.2.3.4:1)\x1b[2J\u202e"
    sock = socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT)
    try:
        sock.sendall(connect(forged))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        listed = ctl(broker, "clients", "list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("\n") == 1 and "\x1b" not in listed.stdout
        assert (
            "Client(evil\\nClient(fake, username=root, peername=1.2.3.4:1)\\x1b[2J\\u202e," in listed.stdout
        )
        as_json = json.loads(ctl(broker, "clients", "list", "--json").stdout)
        assert [client["clientid"] for client in as_json] == [forged]
        kicked = ctl(broker, "clients", "kick", forged)
        assert kicked.returncode == 0 and kicked.stdout == "ok\n"
    finally:
        sock.close()


def test_ctl_status_subscriptions_and_retained(broker: BrokerProcess, clients: Clients) -> None:
    port = broker.port("tcp:default")
    watcher = clients.new("watcher").connect("127.0.0.1", port)
    assert watcher.subscribe("plant/+/temp", 1) == [1]
    publisher = clients.new("pub").connect("127.0.0.1", port)
    publisher.publish("plant/1/temp", b"21.5", qos=1, retain=True)
    publisher.publish("plant/2/temp", b"\xff\xfe", qos=0, retain=True)
    watcher.expect()
    watcher.expect()
    status = json.loads(ctl(broker, "status", "--json").stdout)
    assert (status["clients_connected"], status["retained"], status["subscriptions"]) == (2, 2, 1)
    assert status["listeners"] == ["tcp:default", "ws:default"]
    listed = ctl(broker, "subscriptions").stdout.splitlines()
    assert listed == ["watcher -> plant/+/temp (qos 1)"]
    assert json.loads(ctl(broker, "subscriptions", "--client", "pub", "--json").stdout) == []
    retained = sorted(ctl(broker, "retained", "list", "plant/#").stdout.splitlines())
    assert retained == [
        "Retained(plant/1/temp, qos=1, from=pub, size=4, payload='21.5')",
        "Retained(plant/2/temp, qos=0, from=pub, size=2, payload='base64://4=')",
    ]
    shown = json.loads(ctl(broker, "retained", "show", "plant/1/temp", "--json").stdout)
    assert (shown["payload"], shown["payload_encoding"]) == ("21.5", "plain")
    assert ctl(broker, "retained", "delete", "plant/1/temp").stdout == "ok\n"
    missing = ctl(broker, "retained", "show", "plant/1/temp")
    assert missing.returncode == 1 and "no retained message on plant/1/temp" in missing.stderr
    bad = ctl(broker, "retained", "list", "a/#/b")
    assert bad.returncode == 1 and "not a valid topic filter" in bad.stderr
    late = clients.new("late").connect("127.0.0.1", port)
    late.subscribe("plant/#")
    assert late.expect().topic == "plant/2/temp"
    late.expect_nothing()
    samples = {name: value for (name, _), value in metric_samples(broker).items()}
    assert samples["realip_bytes_received_total"] > 0 and samples["realip_bytes_sent_total"] > 0


def test_ctl_listeners_counts_refusals_at_connect_too(broker: BrokerProcess) -> None:
    from tests.mqtt_raw import connect, read_packet

    assert ctl(broker, "banned", "add", "clientid", "outcast").returncode == 0
    with socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT) as sock:
        sock.sendall(connect("outcast"))
        assert read_packet(sock) == (0x20, b"\x00\x05")  # refused by the engine, at CONNECT
    listeners = json.loads(ctl(broker, "listeners", "--json").stdout)
    assert listeners[0]["id"] == "tcp:default" and listeners[0]["refused"] == {"banned": 1}
    assert "refused=banned:1" in ctl(broker, "listeners").stdout


def test_a_banned_client_hammering_connect_logs_little_but_every_refusal_is_counted(
    start_broker: BrokerFactory,
) -> None:
    from tests.mqtt_raw import connect, read_packet

    broker = start_broker(
        broker_config(
            tcp={
                "default": listener_config(),
                "pp": listener_config(proxy_protocol=True, trusted_proxies=["127.0.0.60/32"]),
            }
        ),
        log_level="info",
    )
    assert ctl(broker, "banned", "add", "peerhost", "127.0.0.97").returncode == 0
    mark = broker.log_mark()
    for n in range(20):
        with socket.create_connection(
            ("127.0.0.1", broker.port("tcp:default")), timeout=WAIT, source_address=("127.0.0.97", 0)
        ) as sock:
            sock.sendall(connect(f"hammer-{n}"))
            assert read_packet(sock) == (0x20, b"\x00\x05")
        # And a peer that is not a trusted balancer, refused by the listener before MQTT.
        with socket.create_connection(
            ("127.0.0.1", broker.port("tcp:pp")), timeout=WAIT, source_address=("127.0.0.98", 0)
        ) as sock:
            assert sock.recv(1) == b""
    key = ("realip_connects_refused_total", (("reason", "banned"),))
    wait_until(lambda: metric_samples(broker).get(key) == 20, what="20 CONNECTs refused in /metrics")
    untrusted = ("realip_connections_refused_total", (("listener", "tcp:pp"), ("reason", "untrusted_proxy")))
    wait_until(lambda: metric_samples(broker).get(untrusted) == 20, what="20 peers refused in /metrics")
    listeners = {entry["id"]: entry for entry in json.loads(ctl(broker, "listeners", "--json").stdout)}
    assert listeners["tcp:default"]["refused"] == {"banned": 20}
    warnings = [line for line in broker.lines[mark:] if " WARNING " in line]
    assert 1 <= len([line for line in warnings if "[banned]" in line]) <= 2, warnings
    assert 1 <= len([line for line in warnings if "[untrusted_proxy]" in line]) <= 2, warnings


def test_health_checks_are_counted_per_listener_and_logged_at_debug_only(start_broker: BrokerFactory) -> None:
    from listeners.proxy_protocol import build_v2

    broker = start_broker(
        broker_config(
            tcp={
                "default": listener_config(),
                "pp": listener_config(proxy_protocol=True, trusted_proxies=["127.0.0.1/32"]),
            }
        ),
        log_level="info",
    )
    mark = broker.log_mark()
    for _ in range(3):
        socket.create_connection(("127.0.0.1", broker.port("tcp:default")), timeout=WAIT).close()
        with socket.create_connection(("127.0.0.1", broker.port("tcp:pp")), timeout=WAIT) as sock:
            sock.sendall(build_v2(command="LOCAL"))  # HAProxy's check with check-send-proxy
    for listener in ("tcp:default", "tcp:pp"):
        key = ("realip_health_checks_total", (("listener", listener),))
        wait_until(
            lambda key=key: metric_samples(broker).get(key) == 3, what=f"3 health checks on {listener}"
        )
    listeners = {entry["id"]: entry for entry in json.loads(ctl(broker, "listeners", "--json").stdout)}
    assert [listeners[name]["health_checks"] for name in ("tcp:default", "tcp:pp")] == [3, 3]
    assert listeners["tcp:pp"]["refused"] == {}
    assert "health_checks=3" in ctl(broker, "listeners").stdout
    assert broker.lines[mark:] == []  # nothing at INFO or above


def test_ctl_config_finds_a_relative_socket_where_the_broker_made_it(
    broker: BrokerProcess, tmp_path: Any
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def ctl_from(cwd: Any, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "ctl", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    # admin.listen is "unix:data/admin.sock": relative to the broker's working directory.
    found = ctl_from(elsewhere, "--config", str(broker.config_path), "status", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["listeners"] == ["tcp:default", "ws:default"]
    # --admin stays relative to ctl's own directory, as written.
    alone = ctl_from(elsewhere, "--admin", "unix:data/admin.sock", "status")
    assert alone.returncode == 1 and "unix:data/admin.sock" in alone.stderr
