"""broker.cluster's pure parts: the route table, local route counts, the wire format."""

from __future__ import annotations

from typing import Any

import pytest

from broker.cluster import wire
from broker.cluster.routes import LocalFilters, RouteTable, shared_filter
from broker.core.session import Message


def test_routes_match_each_node_once_and_follow_changes() -> None:
    table = RouteTable()
    table.add("b", "orders/#")
    table.add("b", "orders/+")  # two filters of b match: b once
    table.add("c", "+/new")
    assert table.match("orders/new") == ("b", "c")
    assert table.match("other") == ()
    table.remove("b", "orders/#")
    assert table.match("orders/new") == ("b", "c")  # orders/+ still matches (the cache was emptied)
    table.remove("b", "orders/+")
    assert table.match("orders/new") == ("c",)
    table.replace("c", ["x/#"])
    assert (table.match("orders/new"), table.match("x/y")) == ((), ("c",))
    table.drop("c")
    assert (len(table), table.nodes()) == (0, [])
    table.remove("nobody", "x")  # never raises


def test_local_filters_count_subscriptions() -> None:
    local = LocalFilters()
    assert local.add("x/#") is True
    assert local.add("x/#") is False  # the route exists already
    assert local.remove("x/#") is False
    assert local.remove("x/#") is True  # the last one: the route goes
    assert local.remove("x/#") is False
    assert list(local) == []


def test_shared_groups_take_turns_across_the_nodes_with_members() -> None:
    assert (shared_filter("$share/g/x/#"), shared_filter("$share/bad"), shared_filter("$share/+/x")) == (
        "x/#",
        None,
        None,
    )
    table = RouteTable()
    table.add("b", "$share/g/jobs/#")
    table.add("c", "$share/g/jobs/#")
    table.add("c", "$share/h/jobs/+")
    assert table.match("jobs/1") == ()  # shared routes are not plain ones
    assert table.shared("jobs/1") == {"$share/g/jobs/#": ("b", "c"), "$share/h/jobs/+": ("c",)}
    turns = [table.pick("$share/g/jobs/#", ["a", "b", "c"]) for _ in range(6)]
    assert turns == ["a", "b", "c", "a", "b", "c"]
    table.drop("c")
    assert table.shared("jobs/1") == {"$share/g/jobs/#": ("b",)}
    with pytest.raises(ValueError, match="no node has members"):
        table.pick("$share/x/y", [])


def test_a_batch_round_trips_with_properties_and_expiry_left() -> None:
    messages = [
        Message(
            "a/b",
            b"\x00\xff",
            2,
            True,
            "pub",
            {"user_property": [("k", "v")], "correlation_data": b"\x01"},
            110.0,
        ),
        Message("ü/c", b"", 0, False),
    ]
    entries = [
        wire.Forwarded(messages[0], True, ("$share/g/a/#", "$share/h/+/b")),
        wire.Forwarded(messages[1], False),
    ]
    decoded = wire.decode(wire.encode(entries, now=100.0), now=5.0)
    assert [(e.normal, e.groups) for e in decoded] == [(True, ("$share/g/a/#", "$share/h/+/b")), (False, ())]
    back = [e.message for e in decoded]
    assert [(m.topic, m.payload, m.qos, m.retain, m.publisher) for m in back] == [
        ("a/b", b"\x00\xff", 2, True, "pub"),
        ("ü/c", b"", 0, False, ""),
    ]
    assert back[0].properties == {"user_property": [("k", "v")], "correlation_data": b"\x01"}
    assert back[0].expires_at == pytest.approx(15.0)  # 10 s left, on the receiver's clock
    assert (back[1].properties, back[1].expires_at) == (None, None)


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b[:5], lambda b: b[:20] + b"\xff" * 3])
def test_a_damaged_batch_is_refused(damage: object) -> None:
    data = wire.encode(
        [wire.Forwarded(Message("a", b"payload", 1, False, "p", {"content_type": "t"}))], now=0.0
    )
    with pytest.raises(wire.WireError):
        wire.decode(damage(data), now=0.0)  # type: ignore[operator]


def test_the_mirror_marks_what_changed_and_gives_back_what_was_not_written() -> None:
    from broker.cluster.mirror import SessionMirror
    from broker.core.session import Delivery, SubOptions

    mirror = SessionMirror()
    mirror.put_subscription("a", "x", SubOptions(1))
    mirror.put_delivery("b", Delivery(Message("t", b"", 1, False), 1))
    mirror.delete_session("c")
    assert mirror.take() == ({"a", "b"}, {"c"})
    assert mirror.take() == (set(), set())
    mirror.delete_session("a")  # ended after a failed write of its change: ended wins
    mirror.give_back({"a", "b"}, {"c"})
    assert (mirror.changed, mirror.ended) == ({"b"}, {"a", "c"})


def test_a_session_round_trips_through_its_wire_form() -> None:
    from broker.store.base import StoredDelivery, StoredMessage, StoredSession, StoredSubscription, StoredWill

    message = StoredMessage("jobs/1", b"\x00\xff", 1, "p", {"user_property": [["k", "v"]]}, 1e9, False)
    session = StoredSession(
        "c",
        300.0,
        None,
        "ann",
        "ann",
        True,
        False,
        "192.0.2.1",
        (7,),
        StoredWill(StoredMessage("w", b"bye", 1, "c", None, None, True), 5.0, None),
        (StoredSubscription("jobs/#", 1, True, False, 3),),
        (StoredDelivery(4, message, 1, False, (3,), 9, False),),
    )
    assert wire.decode_session(wire.encode_session(session)) == session
    with pytest.raises(wire.WireError):
        wire.decode_session(b'{"client_id": 1}')


def test_nothing_of_the_nodes_own_state_is_queued_while_apart_from_redis() -> None:
    from types import SimpleNamespace

    from broker.cluster.node import ClusterNode
    from broker.settings import ClusterSettings

    node = ClusterNode(ClusterSettings(enable=True), "n", lambda entries: None, lambda: 0.0)
    node._running = True
    view: Any = SimpleNamespace(client_id="c")
    node._apart = True  # Redis went away: the rejoin will write the whole state
    for _ in range(1000):
        node.subscribed("a/#")
        node.connected(view)
        node.session_started("c")
        node.session_ended("c")
        node.disconnected(view, "client_disconnect")
        node.unsubscribed("a/#")
    assert node._ops == []
    node.subscribed("b/#")
    assert list(node.local) == ["b/#"]  # the local routes are kept: the rejoin writes them
    node._apart = False
    node.subscribed("c/#")
    assert node._ops == [("add", "c/#")]
