"""The real broker process on loopback with real clients: MQTT over TCP and WebSocket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.mqtt_raw import connect, publish, recv_exactly, subscribe
from tests.support import (
    REPO,
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    ctl,
    listener_config,
    require_binary,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def broker(start_broker: BrokerFactory) -> BrokerProcess:
    """TCP and WS listeners on free loopback ports."""
    return start_broker(broker_config(tcp={"default": listener_config()}, ws={"default": listener_config()}))


def _transport(kind: str) -> dict[str, Any]:
    return {"transport": "websockets"} if kind == "ws" else {}


@pytest.mark.parametrize("kind", ["tcp", "ws"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_round_trip_at_each_qos(broker: BrokerProcess, clients: Clients, kind: str, qos: int) -> None:
    port = broker.port(f"{kind}:default")
    sub = clients.new(f"sub-{kind}-{qos}", **_transport(kind)).connect("127.0.0.1", port)
    assert sub.subscribe("rt/+", qos) == [qos]
    pub = clients.new(f"pub-{kind}-{qos}", **_transport(kind)).connect("127.0.0.1", port)
    pub.publish("rt/a", b"payload-%d" % qos, qos=qos)
    message = sub.expect()
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "rt/a",
        b"payload-%d" % qos,
        qos,
        False,
    )


@pytest.mark.parametrize("kind", ["tcp", "ws"])
def test_retained_message_reaches_a_later_subscriber(
    broker: BrokerProcess, clients: Clients, kind: str
) -> None:
    port = broker.port(f"{kind}:default")
    pub = clients.new(f"retainer-{kind}", **_transport(kind)).connect("127.0.0.1", port)
    pub.publish(f"state/{kind}", b"on", qos=1, retain=True)
    late = clients.new(f"late-{kind}", **_transport(kind)).connect("127.0.0.1", port)
    late.subscribe(f"state/{kind}", 1)
    message = late.expect()
    assert (message.topic, message.payload, message.retain) == (f"state/{kind}", b"on", True)


def test_two_listeners_share_one_broker(broker: BrokerProcess, clients: Clients) -> None:
    ws_sub = clients.new("ws-sub", transport="websockets").connect("127.0.0.1", broker.port("ws:default"))
    ws_sub.subscribe("bridge/#", 1)
    tcp_sub = clients.new("tcp-sub").connect("127.0.0.1", broker.port("tcp:default"))
    tcp_sub.subscribe("bridge/#", 1)
    clients.new("tcp-pub").connect("127.0.0.1", broker.port("tcp:default")).publish(
        "bridge/x", b"from-tcp", qos=1
    )
    assert ws_sub.expect().payload == b"from-tcp"
    assert tcp_sub.expect().payload == b"from-tcp"


def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt\r\n\r\n".encode()
        )
        return sock.recv(4096)


def test_websocket_serves_only_the_mqtt_path(broker: BrokerProcess) -> None:
    port = broker.port("ws:default")
    assert _http_get(port, "/other").startswith(b"HTTP/1.1 404 ")
    assert _http_get(port, "/mqtt?x=1").startswith(b"HTTP/1.1 101 ")
    response = _http_get(port, "/mqtt")
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Protocol: mqtt" in response


def test_websocket_refuses_a_client_without_the_mqtt_subprotocol(broker: BrokerProcess) -> None:
    with socket.create_connection(("127.0.0.1", broker.port("ws:default")), timeout=WAIT) as sock:
        sock.sendall(
            b"GET /mqtt HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("kind", ["tcp", "ws"])
def test_max_connections_refuses_the_next_client(
    start_broker: BrokerFactory, clients: Clients, kind: str
) -> None:
    broker = start_broker(broker_config(**{kind: {"default": listener_config(max_connections=2)}}))
    port = broker.port(f"{kind}:default")
    first = clients.new("first", **_transport(kind)).connect("127.0.0.1", port)
    second = clients.new("second", **_transport(kind)).connect("127.0.0.1", port)
    assert clients.new("third", **_transport(kind)).connect_refused("127.0.0.1", port)
    broker.wait_for_log(rf"{kind}:default refused 127\.0\.0\.1:\d+: max_connections \(2\) reached")
    # The admitted clients still work, and a freed slot admits the next client.
    second.subscribe("still/here", 1)
    first.publish("still/here", b"yes", qos=1)
    assert second.expect().payload == b"yes"
    mark = broker.log_mark()
    first.close()
    broker.wait_for_log(rf"{kind}:default: 127\.0\.0\.1:\d+ closed; 1 live", start=mark)
    clients.new("fourth", **_transport(kind)).connect("127.0.0.1", port)


def test_sigterm_with_connected_clients_exits_0_quickly(broker: BrokerProcess, clients: Clients) -> None:
    tcp = clients.new("stay-tcp").connect("127.0.0.1", broker.port("tcp:default"))
    tcp.subscribe("x", 1)
    clients.new("stay-ws", transport="websockets").connect("127.0.0.1", broker.port("ws:default"))
    started = time.monotonic()
    assert broker.stop() == 0
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"took {elapsed:.2f}s to exit"
    assert tcp.disconnected.wait(WAIT), "the client did not see the broker go away"


def test_sigterm_under_load_writes_every_audit_record(start_broker: BrokerFactory) -> None:
    """The audit log is closed only after every connection's ``disconnected`` record is written
    (amqtt's shutdown lost 215 of 302 of them, with 215 tracebacks)."""
    broker = start_broker(
        broker_config(tcp={"default": listener_config()}, audit={"file": "audit.log"}), log_level="info"
    )
    port = broker.port("tcp:default")
    count = 100
    socks = []
    for index in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sock.sendall(connect(f"load-{index}"))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
        sock.sendall(subscribe(1, ("load/#", 0)))
        socks.append(sock)
    publisher = socks[0]
    publisher.sendall(b"".join(publish("load/x", b"m" * 100) for _ in range(200)))  # traffic meanwhile
    assert broker.stop() == 0
    records = [json.loads(line) for line in (broker.workdir / "audit.log").read_text().splitlines()]
    ended = [r for r in records if r["event"] == "disconnected"]
    assert sorted(r["clientid"] for r in ended) == sorted(f"load-{i}" for i in range(count))
    assert {r["reason"] for r in ended} == {"shutdown"}
    assert "Traceback" not in broker.output()
    for sock in socks:
        sock.close()


def test_sighup_reloads_and_the_broker_serves_on(broker: BrokerProcess, clients: Clients) -> None:
    client = clients.new("hup").connect("127.0.0.1", broker.port("tcp:default"))
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"SIGHUP received: reloading .*broker\.yaml")
    broker.wait_for_log(r"configuration reloaded: changed nothing; needs a restart: nothing")
    client.subscribe("hup/t", 1)
    client.publish("hup/t", b"still serving", qos=1)
    assert client.expect().payload == b"still serving"
    assert broker.proc.poll() is None


def test_mosquitto_clients_round_trip(broker: BrokerProcess) -> None:
    sub_bin = require_binary("mosquitto_sub")
    pub_bin = require_binary("mosquitto_pub")
    port = str(broker.port("tcp:default"))
    # A retained message makes the exchange deterministic: the subscriber gets it whenever it subscribes.
    subprocess.run(
        [pub_bin, "-h", "127.0.0.1", "-p", port, "-i", "mpub", "-t", "mq/x", "-m", "hello", "-q", "1", "-r"],
        check=True,
        timeout=WAIT,
    )
    sub = subprocess.run(
        [
            sub_bin,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-i",
            "msub",
            "-t",
            "mq/#",
            "-q",
            "1",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT + 5,
    )
    assert sub.stdout.strip() == "mq/x hello"
    live = subprocess.Popen(
        [
            sub_bin,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-i",
            "msub2",
            "-t",
            "live/#",
            "-q",
            "2",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # Publish until the live subscriber, which may still be subscribing, prints a message.
    deadline = time.monotonic() + WAIT
    while live.poll() is None and time.monotonic() < deadline:
        subprocess.run(
            [pub_bin, "-h", "127.0.0.1", "-p", port, "-i", "mpub2", "-t", "live/y", "-m", "now", "-q", "2"],
            check=True,
            timeout=WAIT,
        )
        try:
            live.wait(0.2)
        except subprocess.TimeoutExpired:
            continue
    out, _ = live.communicate(timeout=WAIT)
    assert out.strip() == "live/y now"


def test_check_config_reports_every_error_with_its_path(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listeners:\n  tcp:\n    default:\n      bnid: '0.0.0.0:1883'\n"
        "      trusted_proxies: ['10.0.0.0/8', '10.0.0.300/24']\n"
    )
    result = subprocess.run(
        ["python", "-m", "broker", "check-config", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "listeners.tcp.default.bnid: unknown key (did you mean 'bind'?)" in result.stderr
    assert "listeners.tcp.default.trusted_proxies[1]: '10.0.0.300/24' is not a network" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_prints_the_effective_config(tmp_path: Any) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("listeners:\n  tcp:\n    default:\n      bind: '127.0.0.1:1999'\n")
    result = subprocess.run(
        ["python", "-m", "broker", "check-config", str(good)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "bind: 127.0.0.1:1999" in result.stdout
    assert "8083" not in result.stdout  # a listeners section replaces the default listeners
    assert "warning: authentication: no authenticator is configured" in result.stderr


def test_a_port_in_use_is_a_clear_error(start_broker: BrokerFactory, tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workdir = tmp_path / "busy"
        workdir.mkdir()
        broker = BrokerProcess(broker_config(tcp={"default": listener_config(f"127.0.0.1:{port}")}), workdir)
        assert broker.proc.wait(WAIT) == 1
        broker.wait_for_log(rf"listeners\.tcp\.default\.bind: cannot listen on 127\.0\.0\.1:{port}: ")
        assert "Traceback" not in broker.output()
        # Worded as README says, and the last line: nothing claims "stopped" after it.
        assert broker.lines[-1].endswith(
            f" ERROR broker: listeners.tcp.default.bind: cannot listen on 127.0.0.1:{port}: "
            "Address already in use"
        ), broker.output()
        assert "realip-broker stopped" not in broker.output()
        readme = (REPO / "README.md").read_text()
        assert "`listeners.tcp.default.bind: cannot listen on 0.0.0.0:1883: Address already in use`" in readme


def test_json_log_to_a_file_and_the_level_changed_while_running(tmp_path: Any) -> None:
    """``log: {format: json, file}``: one JSON object per line in the file (nothing on stderr);
    ``ctl log set-level debug`` turns on debug lines without a restart."""
    config = broker_config(tcp={"default": listener_config()}, log={"format": "json", "file": "broker.log"})
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", "broker.yaml"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = tmp_path / "broker.log"

    def records() -> list[dict[str, Any]]:
        text = log.read_text() if log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    try:
        ready = wait_until(
            lambda: next((r for r in records() if r["msg"].startswith("realip-broker ready: ")), None),
            what="the ready line in broker.log",
        )
        assert set(ready) == {"ts", "level", "logger", "msg"} and ready["level"] == "info"
        port = int(ready["msg"].rpartition(":")[2])
        fake = BrokerProcess.__new__(BrokerProcess)  # ctl only needs the working directory
        fake.workdir = tmp_path
        assert ctl(fake, "log", "level").stdout == "info\n"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            pass
        assert not any(r["level"] == "debug" for r in records())
        assert ctl(fake, "log", "set-level", "debug").stdout == "debug\n"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            pass
        wait_until(lambda: any(r["level"] == "debug" for r in records()), what="a debug line after set-level")
        bad = ctl(fake, "log", "set-level", "verbose")
        assert bad.returncode == 2 and "invalid choice" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0
    assert stderr == ""  # everything went to the file
    assert records()[-1]["msg"] == "realip-broker stopped"
