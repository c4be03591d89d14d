"""Configuration reload (SIGHUP and ``ctl reload``) against the real broker: what can change
live changes while clients stay connected; an invalid file changes nothing."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import yaml

from tests.support import BrokerProcess, Clients, broker_config, client_info, ctl, listener_config, wait_until

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
    )
    broker.config_path.write_text(yaml.safe_dump(changed))
    result = ctl(broker, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["changed: mqtt", "needs a restart to apply: listeners"]
    # The per-address limit of the listener applied live (one connection from .95).
    assert clients.new("first").connect("127.0.0.1", port, bind_address="127.0.0.95")
    assert clients.new("second").connect_refused("127.0.0.1", port, bind_address="127.0.0.95")
    broker.config_path.write_text("mqtt: {max_inflight: 0}\n")
    broken = ctl(broker, "reload")
    assert broken.returncode == 1
    assert "reload failed:" in broken.stderr and "mqtt.max_inflight" in broken.stderr
    assert "nothing was changed" in broken.stderr
