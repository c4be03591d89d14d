"""Test support: the real broker as a subprocess, paho-mqtt clients, real peers.

Readiness is always awaited on a signal (a log line, a CONNACK, a port answering), never by
sleeping a guessed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
REQUIRE_E2E = os.environ.get("REQUIRE_E2E") == "1"

#: Seconds to wait for anything that should happen "now" (CONNACK, a delivered message, a log line).
WAIT = 10.0


def require_binary(name: str) -> str:
    """The path of a peer program; skip the test when it is missing (fail under REQUIRE_E2E=1)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        message = f"{name} is not installed (apt-get install nginx libnginx-mod-stream haproxy mosquitto-clients redis-server)"
        if REQUIRE_E2E:
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(predicate: Any, timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def wait_port(host: str, port: int, timeout: float = WAIT) -> None:
    """Wait until something accepts TCP connections on host:port."""

    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepts, timeout, f"{host}:{port} to accept connections")


_READY_RE = re.compile(r"realip-broker ready: (?P<listeners>.*)$")


class BrokerProcess:
    """``realip-broker serve`` in a subprocess, with its log collected line by line."""

    def __init__(self, config: dict[str, Any], workdir: Path, log_level: str = "debug") -> None:
        self.workdir = workdir
        self.config_path = workdir / "broker.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.lines: list[str] = []
        self._lock = threading.Condition()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--config",
                str(self.config_path),
                "--log-level",
                log_level,
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = WAIT, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on matching ``pattern``; fails after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._lock:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return match
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and index >= len(self.lines)):
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no log line matching {pattern!r}; last lines:\n{tail}")
                self._lock.wait(min(remaining, 0.2))

    def log_mark(self) -> int:
        """Index to pass as ``start`` to look only at lines logged from now on."""
        with self._lock:
            return len(self.lines)

    def wait_ready(self, timeout: float = 20.0) -> BrokerProcess:
        """Wait for the ready line and learn each listener's real port."""
        match = self.wait_for_log(_READY_RE.pattern, timeout)
        for item in match.group("listeners").split():
            listener_id, _, hostport = item.partition("=")
            host, _, port = hostport.rpartition(":")
            self.addresses[listener_id] = (host.strip("[]"), int(port))
        return self

    def port(self, listener_id: str) -> int:
        """The port a listener (``tcp:default``) is bound to."""
        return self.addresses[listener_id][1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the broker and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        """Everything logged so far."""
        with self._lock:
            return "\n".join(self.lines)


def listener_config(bind: str = "127.0.0.1:0", **extra: Any) -> dict[str, Any]:
    """One listener's YAML mapping."""
    return {"bind": bind, **extra}


def broker_config(
    tcp: dict[str, dict[str, Any]] | None = None,
    ws: dict[str, dict[str, Any]] | None = None,
    ssl: dict[str, dict[str, Any]] | None = None,
    wss: dict[str, dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A config with exactly the given listeners (the defaults are turned off unless named)."""
    listeners: dict[str, Any] = {"tcp": {"default": {"enable": False}}, "ws": {"default": {"enable": False}}}
    for kind, named in (("tcp", tcp), ("ws", ws), ("ssl", ssl), ("wss", wss)):
        for name, options in (named or {}).items():
            listeners.setdefault(kind, {})[name] = {"enable": True, **options}
    return {"listeners": listeners, **sections}


# ------------------------------------------------------------------------------------------------
# paho-mqtt clients
# ------------------------------------------------------------------------------------------------


#: paho 2 reports an MQTT 3.1.1 CONNACK return code as the MQTT 5 reason code of the same meaning.
V311_CONNACK_RC = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass
class Received:
    """A message as the subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class MqttClient:
    """A paho-mqtt 2.x client with blocking helpers (connect, subscribe, publish, expect)."""

    def __init__(
        self,
        client_id: str,
        *,
        transport: str = "tcp",
        ws_path: str = "/mqtt",
        ws_headers: dict[str, str] | None = None,
        clean_session: bool = True,
        protocol: int = paho.MQTTv311,
        tls: dict[str, str] | None = None,
    ) -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            transport=transport,  # type: ignore[arg-type]
            protocol=protocol,  # type: ignore[arg-type]
            clean_session=clean_session,
        )
        if transport == "websockets":
            self.client.ws_set_options(path=ws_path, headers=ws_headers)
        if tls is not None:  # ca_certs, and certfile/keyfile for a client certificate
            self.client.tls_set(**tls)
        self.client_id = client_id
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.disconnected = threading.Event()
        self.session_present = False
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        code = reason.value if hasattr(reason, "value") else int(reason)
        self.connack.put((V311_CONNACK_RC.get(code, code), bool(flags.session_present)))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.put(Received(message.topic, message.payload, message.qos, message.retain, message.dup))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subacks.put([r.value if hasattr(r, "value") else int(r) for r in reasons])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnected.set()

    def connect(
        self, host: str, port: int, *, bind_address: str = "", keepalive: int = 60, expect_rc: int = 0
    ) -> MqttClient:
        """Connect and wait for CONNACK with return code ``expect_rc``."""
        self.client.connect(host, port, keepalive=keepalive, bind_address=bind_address)
        self.client.loop_start()
        rc, self.session_present = self.connack.get(timeout=WAIT)
        assert rc == expect_rc, f"{self.client_id}: CONNACK return code {rc}, expected {expect_rc}"
        return self

    def connect_refused(self, host: str, port: int, *, bind_address: str = "") -> bool:
        """Try to connect; True when the broker refused (no CONNACK 0: closed, HTTP error, rc != 0)."""
        try:
            self.client.connect(host, port, keepalive=60, bind_address=bind_address)
        except Exception:  # paho raises several types for a refused upgrade
            return True
        self.client.loop_start()
        try:
            while True:
                try:
                    rc, _ = self.connack.get(timeout=0.05)
                    return rc != 0
                except queue.Empty:
                    if self.disconnected.is_set():
                        return True
        finally:
            self.client.loop_stop()

    def subscribe(self, topic: str, qos: int = 0) -> list[int]:
        """Subscribe and wait for SUBACK; returns its return codes."""
        self.client.subscribe(topic, qos)
        return self._subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Publish and wait until the QoS flow is complete."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"{self.client_id}: publish to {topic} did not complete"

    def expect(self, timeout: float = WAIT) -> Received:
        """The next message received."""
        return self.messages.get(timeout=timeout)

    def expect_nothing(self, within: float = 0.3) -> None:
        """Assert that no message arrives within ``within`` seconds (a bounded negative check)."""
        try:
            message = self.messages.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {message}")

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def local_port(client: MqttClient) -> int:
    """The client's own TCP port (what the broker should report as the client's port)."""
    sock = client.client.socket()
    assert sock is not None
    raw = getattr(sock, "_socket", sock)  # paho wraps WebSocket transports
    return int(raw.getsockname()[1])


class Clients:
    """Closes every client a test made."""

    def __init__(self) -> None:
        self._clients: list[MqttClient] = []

    def new(self, client_id: str, **kwargs: Any) -> MqttClient:
        client = MqttClient(client_id, **kwargs)
        self._clients.append(client)
        return client

    def close_all(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):  # best effort at teardown
                client.close()

    def __iter__(self) -> Iterator[MqttClient]:
        return iter(self._clients)


# ------------------------------------------------------------------------------------------------
# realip-broker ctl: how every test reads the address the broker reports
# ------------------------------------------------------------------------------------------------


def ctl(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``realip-broker ctl ARGS`` next to the broker (its admin socket is data/admin.sock)."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "ctl", *args],
        cwd=broker.workdir,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def client_info(broker: BrokerProcess, client_id: str) -> dict[str, Any]:
    """``ctl clients show ID --json``, waiting until the client is listed."""

    def show() -> dict[str, Any] | None:
        result = ctl(broker, "clients", "show", client_id, "--json")
        if result.returncode == 1 and "not found" in result.stderr:
            return None
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    found: dict[str, Any] = wait_until(show, what=f"client {client_id} in `ctl clients show`")
    return found


def example_broker_config(relative: str, replacements: dict[str, str], **sections: Any) -> dict[str, Any]:
    """An examples/ broker YAML with its addresses replaced; listeners it does not name are off."""
    text = (REPO / "examples" / relative).read_text()
    for old, new in replacements.items():
        assert old in text, f"examples/{relative} no longer contains {old!r}; update the test with it"
        text = text.replace(old, new)
    document = yaml.safe_load(text)
    config = broker_config()
    for kind, named in document.pop("listeners").items():
        for name, options in named.items():
            config["listeners"].setdefault(kind, {})[name] = {"enable": True, **options}
    return {**config, **document, **sections}


def admin_get(broker: BrokerProcess, path: str) -> tuple[int, bytes, str]:
    """GET ``path`` from the broker's admin socket: (status, body, content type)."""
    from broker.ctl import UnixHTTPConnection

    connection = UnixHTTPConnection(str(broker.workdir / "data" / "admin.sock"), WAIT)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read(), response.getheader("Content-Type", "")


def metric_samples(broker: BrokerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body, _ = admin_get(broker, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1 (never the system's service): no disc
    persistence; :meth:`stop` and :meth:`start` again on the same port (Redis going away and
    coming back)."""

    def __init__(self, workdir: Path) -> None:
        from tests.e2e.peers import free_port

        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING."""
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._pong, what=f"redis-server on port {self.port} to answer PING")
        return self

    def _pong(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command's raw reply (RESP), for assertions on what the nodes wrote."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(arg.encode())}\r\n{arg}\r\n" for arg in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(request.encode())
            return sock.recv(1 << 16)

    def stop(self) -> None:
        """Kill it (what the nodes see as Redis going away)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
