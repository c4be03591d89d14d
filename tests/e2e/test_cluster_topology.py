"""Topology 12: three real broker nodes behind one real NGINX (stream, PROXY protocol, round robin)
and one real redis-server (examples/cluster/). Clients on their own 127.x addresses land on
different nodes; messages cross nodes at QoS 0/1/2 with 3.1.1 and 5.0 clients; every node reports
its clients' real addresses, and the load balancer as their proxy; ``ctl clients show`` on any node
reports every client's real address and node; a ban made on one node kicks on another; a
persistent client reconnecting through NGINX lands on another node and resumes its session, and
resumes again after the node holding it is killed."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.peers import Nginx, free_port, render_example
from tests.integration.test_mqtt5 import V5Clients
from tests.routes import Route
from tests.support import (
    BrokerProcess,
    Clients,
    RedisServer,
    client_info,
    ctl,
    example_broker_config,
    wait_until,
)

pytestmark = pytest.mark.e2e

BrokerFactory = Callable[..., BrokerProcess]
Peers = Callable[..., Any]

EDGE = "127.0.0.50"
NAMES = ("node-a", "node-b", "node-c")


def cluster_nodes(broker: BrokerProcess) -> dict[str, int]:
    """The live nodes ``broker`` knows, with their route counts."""
    done = ctl(broker, "cluster", "status", "--json")
    assert done.returncode == 0, done.stderr
    return {node["name"]: node["routes"] for node in json.loads(done.stdout)["nodes"]}


def where(nodes: dict[str, BrokerProcess], client_id: str) -> tuple[str, dict[str, Any]]:
    """The node a client is connected to (the one that reports it as its own), and what that node
    reports of it."""
    for name, broker in nodes.items():
        shown = ctl(broker, "clients", "show", client_id, "--json")
        if shown.returncode == 0 and json.loads(shown.stdout)["node"] == name:
            return name, json.loads(shown.stdout)
    raise AssertionError(f"{client_id} is on no node")


def test_three_nodes_behind_one_nginx(
    start_broker: BrokerFactory, peers: Peers, redis_server: RedisServer, clients: Clients, tmp_path: Any
) -> None:
    nodes = {
        name: start_broker(
            example_broker_config(
                "cluster/node.yaml",
                {
                    "node-a": name,
                    "10.0.0.11:1883": "127.0.0.1:0",
                    "10.0.0.5/32": f"{EDGE}/32",
                    "redis://10.0.0.9:6379/0": redis_server.url,
                },
                # Quicker than the example's 1s / 5s, so that a dead node is seen within the test.
                cluster={
                    "enable": True,
                    "redis": {"url": redis_server.url},
                    "heartbeat_interval": "200ms",
                    "node_timeout": "1s",
                },
            )
        )
        for name in NAMES
    }
    port = free_port()
    ports = [broker.port("tcp:default") for broker in nodes.values()]
    body = render_example(
        "cluster/nginx-cluster.conf",
        {
            "server 10.0.0.11:1883;": f"server 127.0.0.1:{ports[0]};",
            "server 10.0.0.12:1883;": f"server 127.0.0.1:{ports[1]};",
            "server 10.0.0.13:1883;": f"server 127.0.0.1:{ports[2]};",
            "listen 1883;": f"listen 127.0.0.1:{port};",
            "proxy_pass realip_cluster;": f"proxy_bind {EDGE};\n        proxy_pass realip_cluster;",
        },
    )
    nginx = peers(Nginx, "nginx", body)
    nginx.wait_listening(("127.0.0.1", port))
    for broker in nodes.values():
        wait_until(lambda broker=broker: set(cluster_nodes(broker)) == set(NAMES), what="three nodes")

    # Round robin: six connections through NGINX, two per node.
    subscribers = [
        clients.new(f"sub-{n}").connect("127.0.0.1", port, bind_address=f"127.0.0.{71 + n}") for n in range(2)
    ]
    v5 = V5Clients(Route(nodes["node-a"], port))
    try:
        sub_v5 = v5.connect("sub-v5", source="127.0.0.73")
        assert v5.connack(sub_v5)[0] == 0
        publishers = [
            clients.new(f"pub-{n}").connect("127.0.0.1", port, bind_address=f"127.0.0.{81 + n}")
            for n in range(2)
        ]
        pub_v5 = v5.connect("pub-v5", source="127.0.0.83")
        assert v5.connack(pub_v5)[0] == 0
        placed = {
            client_id: where(nodes, client_id)
            for client_id in ("sub-0", "sub-1", "sub-v5", "pub-0", "pub-1", "pub-v5")
        }
        assert {node for node, _ in placed.values()} == set(NAMES)  # spread over every node
        expected = {"sub-0": "127.0.0.71", "sub-1": "127.0.0.72", "sub-v5": "127.0.0.73"}
        expected |= {"pub-0": "127.0.0.81", "pub-1": "127.0.0.82", "pub-v5": "127.0.0.83"}
        for client_id, (node, info) in placed.items():
            assert (info["ip_address"], info["proxy_address"]) == (expected[client_id], EDGE), (
                client_id,
                node,
            )
            assert info["address_source"] == "proxy_protocol_v1"
            assert client_info(nodes[node], client_id)["ip_address"] == expected[client_id]
            # Asked on any node, the same: its real address, the load balancer, its node.
            for broker in nodes.values():
                shown = json.loads(ctl(broker, "clients", "show", client_id, "--json").stdout)
                assert (shown["ip_address"], shown["proxy_address"], shown["node"]) == (
                    expected[client_id],
                    EDGE,
                    node,
                )

        for subscriber in subscribers:
            assert subscriber.subscribe("fleet/#", 2) == [2]
        assert sub_v5.subscribe("fleet/#", 2) == [2]
        with_subscribers = {placed[client_id][0] for client_id in ("sub-0", "sub-1", "sub-v5")}

        def routes_everywhere() -> bool:
            for name, broker in nodes.items():
                known = cluster_nodes(broker)
                if any(known[other] < 1 for other in with_subscribers if other != name):
                    return False
            return True

        wait_until(routes_everywhere, what="every node to know every subscriber's route")
        sent = []
        for n, publisher in enumerate(publishers):
            for qos in (0, 1, 2):
                publisher.publish(f"fleet/{n}", f"{n}:{qos}".encode(), qos=qos)
                sent.append((f"fleet/{n}", f"{n}:{qos}".encode()))
        for qos in (0, 1, 2):
            assert pub_v5.publish("fleet/v5", f"v5:{qos}".encode(), qos=qos) == 0
            sent.append(("fleet/v5", f"v5:{qos}".encode()))
        for subscriber in subscribers:
            got = sorted((m.topic, m.payload) for m in (subscriber.expect() for _ in sent))
            assert got == sorted(sent), subscriber.client_id
            subscriber.expect_nothing()
        got_v5 = sorted((m.topic, m.payload) for m in (sub_v5.expect() for _ in sent))
        assert got_v5 == sorted(sent)

        # A ban made on one node kicks the client on whichever node it is, and is lifted everywhere.
        banned_node = placed["pub-0"][0]
        other = next(name for name in NAMES if name != banned_node)
        assert ctl(nodes[other], "banned", "add", "peerhost", "127.0.0.81").returncode == 0
        assert publishers[0].disconnected.wait(10)
        nodes[banned_node].wait_for_log(r"ban peerhost 127\.0\.0\.81 kicked 1 client\(s\): pub-0")
        assert ctl(nodes[banned_node], "banned", "delete", "peerhost", "127.0.0.81").returncode == 0
    finally:
        v5.close_all()
    roaming(nodes, port, clients, redis_server)


def roaming(nodes: dict[str, BrokerProcess], port: int, clients: Clients, redis: RedisServer) -> None:
    """A persistent client reconnecting through NGINX lands on another node (round robin) and
    resumes its session there; the node holding it killed, it resumes on another again."""
    roamer = clients.new("roamer", clean_session=False).connect("127.0.0.1", port, bind_address="127.0.0.91")
    first, _ = where(nodes, "roamer")
    others = [broker for name, broker in nodes.items() if name != first]
    before = [cluster_nodes(broker)[first] for broker in others]
    assert roamer.subscribe("roam/#", 1) == [1]
    wait_until(  # every other node knows the new route before anything is published
        lambda: [cluster_nodes(broker)[first] for broker in others] == [count + 1 for count in before],
        what="the other nodes to learn the roamer's route",
    )
    roamer.close()
    sender = clients.new("sender").connect("127.0.0.1", port, bind_address="127.0.0.92")
    sender.publish("roam/1", b"while away", qos=1)
    back = clients.new("roamer", clean_session=False).connect("127.0.0.1", port, bind_address="127.0.0.91")
    assert back.session_present
    assert back.expect().payload == b"while away"
    second, info = where(nodes, "roamer")
    assert second != first  # round robin: the next connection went to another node
    assert info["ip_address"] == "127.0.0.91"
    back.close()
    sender.publish("roam/2", b"before the crash", qos=1)
    holder = nodes[second]
    wait_until(  # written to Redis at the holder's next heartbeat
        lambda: b'"topic": "roam/2"' in redis.command("GET", "realip:session:roamer"),
        what="the queued message in the session the holder wrote to Redis",
    )
    assert holder.stop(signal.SIGKILL) == -signal.SIGKILL
    # NGINX skips the dead node; the session, taken over from what the dead node last wrote,
    # carries the message queued there.
    again = clients.new("roamer", clean_session=False).connect("127.0.0.1", port, bind_address="127.0.0.91")
    assert again.session_present
    assert again.expect().payload == b"before the crash"
