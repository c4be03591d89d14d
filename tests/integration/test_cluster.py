"""A cluster of real broker processes on a real redis-server: messages cross nodes at every QoS with
3.1.1 and 5.0 clients, routes follow subscriptions, retained messages reach every node, a dead node
is dropped, Redis going away and coming back, a name already live refused."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.test_mqtt5 import V5Clients
from tests.routes import Route
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    RedisServer,
    broker_config,
    ctl,
    listener_config,
    metric_samples,
    wait_until,
)

BrokerFactory = Callable[..., BrokerProcess]


def node_config(redis: RedisServer, name: str, **cluster: Any) -> dict[str, Any]:
    return broker_config(
        tcp={"default": listener_config()},
        node={"name": name},
        cluster={
            "enable": True,
            "redis": {"url": redis.url},
            "heartbeat_interval": "200ms",
            "node_timeout": "1s",
            **cluster,
        },
    )


def cluster_status(broker: BrokerProcess) -> dict[str, Any]:
    done = ctl(broker, "cluster", "status", "--json")
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def routes_of(broker: BrokerProcess, node: str) -> int | None:
    """How many routes ``broker`` knows of ``node`` (None: it does not know the node)."""
    for entry in cluster_status(broker)["nodes"]:
        if entry["name"] == node:
            return int(entry["routes"])
    return None


def port(broker: BrokerProcess) -> int:
    return broker.port("tcp:default")


@pytest.fixture
def two_nodes(start_broker: BrokerFactory, redis_server: RedisServer) -> tuple[BrokerProcess, BrokerProcess]:
    a = start_broker(node_config(redis_server, "node-a"))
    b = start_broker(node_config(redis_server, "node-b"))
    wait_until(lambda: routes_of(a, "node-b") is not None, what="node-a to know node-b")
    return a, b


def test_messages_cross_nodes_both_ways_at_every_qos(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients
) -> None:
    a, b = two_nodes
    on_a = clients.new("sub-a").connect("127.0.0.1", port(a), bind_address="127.0.0.61")
    assert on_a.subscribe("orders/#", 2) == [2]
    v5, v5_a = V5Clients(Route(b, port(b))), V5Clients(Route(a, port(a)))
    try:
        on_b = v5.connect("sub-b", source="127.0.0.62")
        assert v5.connack(on_b)[0] == 0
        assert on_b.subscribe("alerts/+", 2) == [2]
        wait_until(lambda: routes_of(b, "node-a") == 1 and routes_of(a, "node-b") == 1, what="both routes")
        # B -> A: a 3.1.1 publisher on B, the subscriber on A, QoS 0, 1 and 2, in order.
        publisher_b = clients.new("pub-b").connect("127.0.0.1", port(b), bind_address="127.0.0.63")
        for qos in (0, 1, 2):
            publisher_b.publish("orders/new", f"q{qos}".encode(), qos=qos)
        got = [on_a.expect() for _ in range(3)]
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("orders/new", b"q0", 0),
            ("orders/new", b"q1", 1),
            ("orders/new", b"q2", 2),
        ]
        # A -> B: an MQTT 5 subscriber on B gets what a publisher on A sends, properties kept.
        publisher_a = v5_a.connect("pub-a", source="127.0.0.64")
        assert v5_a.connack(publisher_a)[0] == 0
        for qos in (0, 1, 2):
            publisher_a.publish("alerts/fire", f"q{qos}".encode(), qos=qos, ContentType="text/plain")
        received = [on_b.expect() for _ in range(3)]
        assert [(m.topic, m.payload, m.qos) for m in received] == [
            ("alerts/fire", b"q0", 0),
            ("alerts/fire", b"q1", 1),
            ("alerts/fire", b"q2", 2),
        ]
        assert all(m.properties.get("ContentType") == "text/plain" for m in received)
        on_a.expect_nothing()  # nothing it did not subscribe to
    finally:
        v5.close_all()
        v5_a.close_all()
    samples = metric_samples(b)
    assert samples[("realip_cluster_forwarded_total", (("node", "node-a"),))] == 3
    assert samples[("realip_cluster_received_total", ())] == 3
    assert samples[("realip_cluster_redis_up", ())] == 1, b.output()[-3000:]
    assert samples[("realip_cluster_nodes", ())] == 2


def test_routes_follow_subscriptions_and_a_dead_node_is_dropped(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients
) -> None:
    a, b = two_nodes
    subscriber = clients.new("sub").connect("127.0.0.1", port(a))
    subscriber.subscribe("x/#", 1)
    subscriber.subscribe("$share/g/x/#", 1)  # a route of its own: the group
    wait_until(lambda: routes_of(b, "node-a") == 2, what="node-b to learn node-a's routes")
    subscriber.client.unsubscribe("x/#")
    subscriber.client.unsubscribe("$share/g/x/#")
    wait_until(lambda: routes_of(b, "node-a") == 0, what="the route to go with the last subscription")
    publisher = clients.new("pub").connect("127.0.0.1", port(b))
    publisher.publish("x/y", b"to nobody", qos=1)
    assert ("realip_cluster_forwarded_total", (("node", "node-a"),)) not in metric_samples(b)
    # A node killed is dropped by the others once its heartbeat is older than node_timeout.
    mark = b.log_mark()
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    b.wait_for_log(r"cluster: node node-a is gone \(no heartbeat for 1s\)", start=mark)
    assert [node["name"] for node in cluster_status(b)["nodes"]] == ["node-b"]


def test_retained_messages_reach_every_node(
    two_nodes: tuple[BrokerProcess, BrokerProcess],
    clients: Clients,
    start_broker: BrokerFactory,
    redis_server: RedisServer,
) -> None:
    a, b = two_nodes
    clients.new("pub").connect("127.0.0.1", port(a)).publish("state/lamp", b"on", qos=1, retain=True)
    late = clients.new("late").connect("127.0.0.1", port(b))

    def got_it() -> bool:
        late.subscribe("state/#", 1)
        try:
            message = late.expect(timeout=0.2)
        except Exception:  # queue.Empty: not there yet, subscribe again
            return False
        return (message.topic, message.payload, message.retain) == ("state/lamp", b"on", True)

    wait_until(got_it, what="node-b to hold node-a's retained message")
    # A node that joins later starts with the cluster's retained messages.
    c = start_broker(node_config(redis_server, "node-c"))
    c.wait_for_log(r"cluster: 1 retained message\(s\) of the cluster kept")
    newcomer = clients.new("newcomer").connect("127.0.0.1", port(c))
    newcomer.subscribe("state/#", 1)
    message = newcomer.expect()
    assert (message.topic, message.payload, message.retain) == ("state/lamp", b"on", True)
    # Deleted by an operator on one node: gone from every node, and from Redis.
    assert ctl(b, "retained", "delete", "state/lamp").returncode == 0
    for broker in (a, c):
        wait_until(
            lambda broker=broker: ctl(broker, "retained", "show", "state/lamp").returncode != 0,
            what="the retained message deleted everywhere",
        )
    assert redis_server.command("HLEN", "realip:retained") == b":0\r\n"
    # Cleared by a client on one node: cleared for the next one that joins too.
    clients.new("pub2").connect("127.0.0.1", port(a)).publish("state/door", b"open", qos=1, retain=True)
    wait_until(lambda: redis_server.command("HLEN", "realip:retained") == b":1\r\n", what="the topic kept")
    clients.new("clearer").connect("127.0.0.1", port(b)).publish("state/door", b"", qos=1, retain=True)
    wait_until(lambda: redis_server.command("HLEN", "realip:retained") == b":0\r\n", what="the topic cleared")


def test_redis_going_away_keeps_local_clients_served_and_the_node_rejoins(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients, redis_server: RedisServer
) -> None:
    a, b = two_nodes
    on_a = clients.new("sub-a").connect("127.0.0.1", port(a))
    on_a.subscribe("t/#", 1)
    wait_until(lambda: routes_of(b, "node-a") == 1, what="node-a's route")
    mark = a.log_mark()
    redis_server.stop()
    a.wait_for_log(r"cluster: Redis at redis://127\.0\.0\.1:\d+/0 unreachable", start=mark)
    wait_until(lambda: not cluster_status(a)["redis"]["up"], what="node-a to report Redis down")
    assert metric_samples(a)[("realip_cluster_redis_up", ())] == 0
    # Local clients are served all along.
    clients.new("local").connect("127.0.0.1", port(a)).publish("t/local", b"here", qos=1)
    assert on_a.expect().payload == b"here"
    redis_server.start()  # an empty Redis: the nodes register and write their routes again
    a.wait_for_log(r"cluster: Redis at .* reachable again: rejoining", start=mark)
    wait_until(lambda: routes_of(b, "node-a") == 1, timeout=3 * WAIT, what="node-a's route again")
    clients.new("remote").connect("127.0.0.1", port(b)).publish("t/remote", b"across", qos=1)
    assert on_a.expect().payload == b"across"
    assert a.output().count("unreachable") == 1  # logged once, not per retry


def test_a_name_a_live_node_has_is_refused(
    start_broker: BrokerFactory, redis_server: RedisServer, tmp_path: Any
) -> None:
    start_broker(node_config(redis_server, "twin"))
    (tmp_path / "second").mkdir()
    second = BrokerProcess(node_config(redis_server, "twin"), tmp_path / "second")
    try:
        assert second.proc.wait(WAIT) == 1
    finally:
        if second.proc.poll() is None:
            second.stop(signal.SIGKILL)
    second.wait_for_log(r"node\.name: 'twin' is the name of a live node of the cluster")


def test_ctl_cluster_status_outside_a_cluster(start_broker: BrokerFactory) -> None:
    broker = start_broker(broker_config(tcp={"default": listener_config()}))
    done = ctl(broker, "cluster", "status")
    assert (done.returncode, done.stdout) == (0, "not in a cluster (cluster.enable: false)\n")


def test_ctl_shows_lists_and_kicks_clients_cluster_wide(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients
) -> None:
    a, b = two_nodes
    clients.new("on-a").connect("127.0.0.1", port(a), bind_address="127.0.0.65")
    on_b = clients.new("on-b").connect("127.0.0.1", port(b), bind_address="127.0.0.66")

    def shown(broker: BrokerProcess, client_id: str) -> dict[str, Any] | None:
        done = ctl(broker, "clients", "show", client_id, "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None

    # Asked on node-b, node-a's client: its real address and its node.
    record = wait_until(lambda: shown(b, "on-a"), what="node-b to see node-a's client")
    assert (record["node"], record["ip_address"], record["listener"]) == (
        "node-a",
        "127.0.0.65",
        "tcp:default",
    )
    line = ctl(b, "clients", "show", "on-a").stdout
    assert line.startswith("Client(on-a, node=node-a, username=undefined, peername=127.0.0.65:")
    assert shown(a, "on-b")["node"] == "node-b"  # type: ignore[index]
    listed = json.loads(ctl(a, "clients", "list", "--json").stdout)
    assert sorted((c["clientid"], c["node"]) for c in listed) == [("on-a", "node-a"), ("on-b", "node-b")]
    only_b = json.loads(ctl(a, "clients", "list", "--ip", "127.0.0.66/32", "--json").stdout)
    assert [c["clientid"] for c in only_b] == ["on-b"]
    # Kicked from node-a, the client of node-b goes.
    kicked = ctl(a, "clients", "kick", "on-b")
    assert kicked.returncode == 0, kicked.stderr
    assert on_b.disconnected.wait(WAIT)
    wait_until(lambda: shown(a, "on-b") is None, what="node-b's client to leave the registry")
    b.wait_for_log(r"client 'on-b' kicked \(kicked\)")
    # A node that dies takes its clients out of the registry with it.
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: shown(b, "on-a") is None, what="the dead node's client to be cleared")


def test_a_ban_made_on_one_node_kicks_on_every_node_and_is_lifted_everywhere(
    start_broker: BrokerFactory,
    redis_server: RedisServer,
    two_nodes: tuple[BrokerProcess, BrokerProcess],
    clients: Clients,
) -> None:
    a, b = two_nodes
    victim = clients.new("victim").connect("127.0.0.1", port(b), bind_address="127.0.0.67")
    done = ctl(a, "banned", "add", "peerhost", "127.0.0.67", "--reason", "abuse")
    assert done.returncode == 0, done.stderr
    assert victim.disconnected.wait(WAIT)  # kicked by node-b
    b.wait_for_log(r"ban peerhost 127\.0\.0\.67 kicked 1 client\(s\): victim")
    again = clients.new("victim-again")
    assert again.connect_refused("127.0.0.1", port(b), bind_address="127.0.0.67")
    listed = json.loads(ctl(b, "banned", "list", "--json").stdout)
    assert [(ban["as"], ban["who"], ban["by"]) for ban in listed] == [("peerhost", "127.0.0.67", "admin")]
    # A node that joins later gets the bans in force.
    c = start_broker(node_config(redis_server, "node-c"))
    assert [ban["who"] for ban in json.loads(ctl(c, "banned", "list", "--json").stdout)] == ["127.0.0.67"]
    # Lifted on node-b: lifted on node-a and node-c too.
    assert ctl(b, "banned", "delete", "peerhost", "127.0.0.67").returncode == 0
    for broker in (a, c):
        wait_until(
            lambda broker=broker: json.loads(ctl(broker, "banned", "list", "--json").stdout) == [],
            what="the ban to be lifted everywhere",
        )
    clients.new("victim-back").connect("127.0.0.1", port(a), bind_address="127.0.0.67")


def test_a_client_id_moving_between_nodes_takes_its_session_along(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients
) -> None:
    a, b = two_nodes
    # Offline on node-a with two messages queued...
    mover = clients.new("mover", clean_session=False).connect("127.0.0.1", port(a))
    assert mover.subscribe("jobs/#", 1) == [1]
    mover.close()
    publisher = clients.new("boss").connect("127.0.0.1", port(a))
    publisher.publish("jobs/1", b"first", qos=1)
    publisher.publish("jobs/2", b"second", qos=1)
    # ...it comes back on node-b: the session came along, the queue delivered in order.
    back = clients.new("mover", clean_session=False).connect("127.0.0.1", port(b), bind_address="127.0.0.68")
    assert back.session_present
    assert [(m.topic, m.payload) for m in (back.expect(), back.expect())] == [
        ("jobs/1", b"first"),
        ("jobs/2", b"second"),
    ]
    b.wait_for_log(r"client 'mover': its session came over from another node")
    subscriptions = json.loads(ctl(b, "subscriptions", "--client", "mover", "--json").stdout)
    assert [s["topic"] for s in subscriptions] == ["jobs/#"]
    assert json.loads(ctl(a, "subscriptions", "--client", "mover", "--json").stdout) == []
    # Its subscription routes on node-b now: node-a forwards there.
    wait_until(lambda: routes_of(a, "node-b") == 1, what="the moved subscription's route")
    publisher.publish("jobs/3", b"third", qos=1)
    assert back.expect().payload == b"third"

    # Connected on node-b, the same id connects to node-a: node-b closes its connection first
    # (MQTT 5: DISCONNECT 0x8E), and the session moves again.
    v5_b, v5_a = V5Clients(Route(b, port(b))), V5Clients(Route(a, port(a)))
    try:
        live = v5_b.connect("live", clean_start=False, SessionExpiryInterval=300)
        assert v5_b.connack(live)[0] == 0
        assert live.subscribe("live/#", 1) == [1]
        moved = v5_a.connect("live", clean_start=False, SessionExpiryInterval=300)
        assert v5_a.connack(moved)[:2] == (0, True)
        assert live.disconnects.get(timeout=WAIT) == 0x8E  # Session taken over
        clients.new("live-pub").connect("127.0.0.1", port(b)).publish("live/x", b"to the new node", qos=1)
        assert moved.expect().payload == b"to the new node"
        # A clean start elsewhere ends the session where it was.
        fresh = v5_b.connect("live", clean_start=True)
        assert v5_b.connack(fresh)[:2] == (0, False)
    finally:
        v5_a.close_all()
        v5_b.close_all()


def test_a_node_killed_loses_no_persistent_session_and_its_wills_go_once(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients, redis_server: RedisServer
) -> None:
    a, b = two_nodes
    watcher = clients.new("watcher").connect("127.0.0.1", port(b))
    assert watcher.subscribe("wills/#", 1) == [1]
    # On node-a: an offline persistent session with a message queued, and a connected client
    # with a will (its session persistent too).
    sleeper = clients.new("sleeper", clean_session=False).connect("127.0.0.1", port(a))
    assert sleeper.subscribe("mail/#", 1) == [1]
    sleeper.close()
    wait_until(lambda: routes_of(b, "node-a") == 1, what="node-a's route (mail/#)")
    clients.new("postman").connect("127.0.0.1", port(b)).publish("mail/1", b"while asleep", qos=1)
    dying = clients.new("dying", clean_session=False)
    dying.client.will_set("wills/dying", b"gone", qos=1)
    dying.connect("127.0.0.1", port(a))

    def written() -> bool:
        sleeping = redis_server.command("GET", "realip:session:sleeper")
        return b'"topic": "mail/1"' in sleeping and b"wills/dying" in redis_server.command(
            "GET", "realip:session:dying"
        )

    wait_until(written, what="node-a to write both sessions, queue and will, to Redis")
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    b.wait_for_log(r"cluster: 2 session\(s\) of node node-a taken over", timeout=3 * WAIT)
    will = watcher.expect()
    assert (will.topic, will.payload) == ("wills/dying", b"gone")
    watcher.expect_nothing()  # once
    back = clients.new("sleeper", clean_session=False).connect("127.0.0.1", port(b))
    assert back.session_present
    assert back.expect().payload == b"while asleep"


def test_a_user_added_on_one_node_logs_in_on_every_node(
    start_broker: BrokerFactory, redis_server: RedisServer, clients: Clients
) -> None:
    from tests.integration.test_authentication import BUILTIN, add_user

    a = start_broker({**node_config(redis_server, "node-a"), "authentication": [BUILTIN]})
    b = start_broker({**node_config(redis_server, "node-b"), "authentication": [BUILTIN]})
    wait_until(lambda: routes_of(a, "node-b") is not None, what="node-a to know node-b")
    added = add_user(a, "ann", "s3cret-enough")
    assert added.returncode == 0, added.stderr

    def listed(broker: BrokerProcess) -> list[str]:
        return [user["user_id"] for user in json.loads(ctl(broker, "users", "list", "--json").stdout)]

    wait_until(lambda: listed(b) == ["ann"], what="node-b to have node-a's user")
    client = clients.new("ann-client")
    client.client.username_pw_set("ann", "s3cret-enough")
    client.connect("127.0.0.1", port(b))
    # A node that joins later has it; deleted on that one, it is gone everywhere.
    c = start_broker({**node_config(redis_server, "node-c"), "authentication": [BUILTIN]})
    assert listed(c) == ["ann"]
    assert ctl(c, "users", "delete", "ann").returncode == 0
    for broker in (a, b):
        wait_until(lambda broker=broker: listed(broker) == [], what="the user to be deleted everywhere")
    refused = clients.new("ann-again")
    refused.client.username_pw_set("ann", "s3cret-enough")
    refused.connect("127.0.0.1", port(a), expect_rc=4)


def test_a_shared_subscription_group_gets_each_message_once_in_the_cluster(
    two_nodes: tuple[BrokerProcess, BrokerProcess], clients: Clients
) -> None:
    a, b = two_nodes
    v5_a, v5_b = V5Clients(Route(a, port(a))), V5Clients(Route(b, port(b)))
    try:
        members = []
        for v5, name in ((v5_a, "worker-a"), (v5_b, "worker-b")):
            member = v5.connect(name)
            assert v5.connack(member)[0] == 0
            assert member.subscribe("$share/workers/jobs/#", 1) == [1]
            members.append(member)
        wait_until(
            lambda: routes_of(a, "node-b") == 1 and routes_of(b, "node-a") == 1, what="both groups' routes"
        )
        publisher = clients.new("dispatcher").connect("127.0.0.1", port(a))
        for n in range(10):
            publisher.publish(f"jobs/{n}", str(n).encode(), qos=1)
        got: list[bytes] = []
        counts = []
        for member in members:
            while True:
                try:
                    got.append(member.expect(timeout=1.0).payload)
                except Exception:  # queue.Empty: this member has all it gets
                    break
            counts.append(len(got))
        assert sorted(got, key=int) == [str(n).encode() for n in range(10)]  # each once, none lost
        assert counts[0] == 5 and counts[1] == 10  # in turn: five on each node
    finally:
        v5_a.close_all()
        v5_b.close_all()
