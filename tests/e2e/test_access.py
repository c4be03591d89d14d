"""Access lists, bans and the audit log on the real address, behind real NGINX with PROXY protocol."""

from __future__ import annotations

import json
import random
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.ctl import UnixHTTPConnection
from tests.e2e.peers import Nginx, free_port, render_example
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    ctl,
    example_broker_config,
    wait_until,
)

pytestmark = pytest.mark.e2e

EDGE = "127.0.0.50"


def audit_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def find(records: list[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    for record in records:
        if all(record.get(key) == value for key, value in fields.items()):
            return record
    return None


def behind_nginx(tmp_path: Path, peers: Any, port: int, **sections: Any) -> tuple[BrokerProcess, int, Path]:
    """The broker on a fixed port (so it can restart behind the same NGINX) with topology 1."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    config = example_broker_config(
        "nginx/tcp-proxy-protocol.yaml",
        {"127.0.0.1:1883": f"127.0.0.1:{port}", "127.0.0.1/32": f"{EDGE}/32"},
        audit={"file": "audit.log"},
        **sections,
    )
    broker = BrokerProcess(config, workdir).wait_ready()
    nginx_port = free_port()
    body = render_example(
        "nginx/tcp-proxy-protocol.conf",
        {
            "listen 1884;": f"listen 127.0.0.1:{nginx_port};",
            "proxy_pass 127.0.0.1:1883;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{port};",
        },
    )
    peers(Nginx, "nginx", body).wait_listening(("127.0.0.1", nginx_port))
    return broker, nginx_port, workdir / "audit.log"


def test_deny_ban_restart_unban_with_audit(tmp_path: Path, peers: Any, clients: Clients) -> None:
    port = free_port()
    broker, lb, audit = behind_nginx(tmp_path, peers, port, access={"deny": ["127.0.0.66/32"]})
    try:
        # A denied network is refused with CONNACK 5 while another client is accepted.
        clients.new("denied").connect("127.0.0.1", lb, bind_address="127.0.0.66", expect_rc=5)
        target = clients.new("target").connect("127.0.0.1", lb, bind_address="127.0.0.41")
        assert client_info(broker, "target")["ip_address"] == "127.0.0.41"

        # A new peerhost ban kicks the live client at once.
        added = ctl(broker, "banned", "add", "peerhost", "127.0.0.41", "--reason", "abuse")
        assert added.returncode == 0, added.stderr
        assert "kicked target" in added.stdout
        assert target.disconnected.wait(WAIT)
        clients.new("target-again").connect("127.0.0.1", lb, bind_address="127.0.0.41", expect_rc=5)
        listed = ctl(broker, "banned", "list")
        assert listed.stdout.startswith("Banned(peerhost=127.0.0.41, by=admin, at=")
        assert "until=forever, reason='abuse'" in listed.stdout
    finally:
        assert broker.stop() == 0

    # After a restart the ban still refuses; deleting it lets the client back.
    broker = BrokerProcess(yaml.safe_load(broker.config_path.read_text()), broker.workdir).wait_ready()
    try:
        clients.new("after-restart").connect("127.0.0.1", lb, bind_address="127.0.0.41", expect_rc=5)
        deleted = ctl(broker, "banned", "delete", "peerhost", "127.0.0.41")
        assert (deleted.returncode, deleted.stdout.strip()) == (0, "ok")
        clients.new("welcome-back").connect("127.0.0.1", lb, bind_address="127.0.0.41")
        assert client_info(broker, "welcome-back")["proxy_address"] == EDGE
    finally:
        assert broker.stop() == 0

    records = audit_records(audit)
    via = {"proxy_ip": EDGE, "address_source": "proxy_protocol_v1"}
    assert find(records, event="refused", clientid="denied", ip="127.0.0.66", reason="access", **via)
    assert find(records, event="connected", clientid="target", ip="127.0.0.41", listener="tcp:default", **via)
    assert find(records, event="ban_added", **{"as": "peerhost", "who": "127.0.0.41"}, reason="abuse")
    assert find(records, event="kicked", clientid="target", ip="127.0.0.41", reason="banned", **via)
    assert find(records, event="disconnected", clientid="target", reason="banned", **via)
    assert find(records, event="refused", clientid="after-restart", ip="127.0.0.41", reason="banned", **via)
    assert find(records, event="ban_deleted", **{"as": "peerhost", "who": "127.0.0.41"})
    assert find(records, event="connected", clientid="welcome-back", ip="127.0.0.41", **via)
    record = find(records, event="connected", clientid="welcome-back")
    assert record is not None and isinstance(record["port"], int) and isinstance(record["proxy_port"], int)
    assert record["ts"].endswith("+00:00")


def test_sigkill_during_rapid_ban_changes_never_leaves_an_unreadable_file(tmp_path: Path) -> None:
    workdir = tmp_path / "b"
    workdir.mkdir()
    config = broker_config(tcp={"default": {"bind": "127.0.0.1:0"}})
    broker = BrokerProcess(config, workdir).wait_ready()
    socket_path = str(workdir / "data" / "admin.sock")
    done = 0

    def hammer() -> None:
        nonlocal done
        for index in range(1000):
            connection = UnixHTTPConnection(socket_path, WAIT)
            try:
                if index % 2 == 0:
                    body = json.dumps({"as": "clientid", "who": f"c{index % 50}", "reason": "x" * 200})
                    connection.request(
                        "POST", "/api/v1/banned", body=body, headers={"Content-Type": "application/json"}
                    )
                else:
                    connection.request("DELETE", f"/api/v1/banned/clientid/c{(index - 1) % 50}")
                connection.getresponse().read()
                done += 1
            except OSError:
                return  # the broker was killed
            finally:
                connection.close()

    worker = threading.Thread(target=hammer)
    worker.start()
    kill_after = random.randint(100, 700)
    wait_until(lambda: done >= kill_after or not worker.is_alive(), what=f"{kill_after} ban calls")
    broker.stop(sig=signal.SIGKILL)
    worker.join(WAIT)
    bans_file = workdir / "data" / "bans.json"
    document = json.loads(bans_file.read_text())  # never torn
    assert isinstance(document["bans"], list)
    # And the broker starts again with that file and serves the same list.
    again = BrokerProcess(config, workdir).wait_ready()
    try:
        listed = json.loads(ctl(again, "banned", "list", "--json").stdout)
        assert sorted(ban["who"] for ban in listed) == sorted(ban["value"] for ban in document["bans"])
    finally:
        again.stop()
