"""The engine and its store: every retained and session change is handed over, what was kept comes
back."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from broker.core.session import Message
from broker.engine import Engine
from broker.settings import MqttSettings
from broker.store.base import (
    MemoryStore,
    StoredDelivery,
    StoredMessage,
    StoredSession,
    StoredSubscription,
    StoredWill,
)


async def started(store: MemoryStore, **mqtt: int) -> Engine:
    engine = Engine(MqttSettings(**mqtt), store=store)
    await engine.start()
    return engine


async def test_retained_changes_reach_the_store() -> None:
    store = MemoryStore()
    engine = await started(store)
    loop = asyncio.get_running_loop()
    properties = {"user_property": [("k", "v")], "correlation_data": b"\x01"}
    engine.retain(Message("a", b"on", 1, True, "pub", properties, expires_at=loop.time() + 60), None)
    engine.retain(Message("b", b"x", 0, True), None)
    stored = store.retained["a"]
    assert (stored.payload, stored.qos, stored.publisher) == (b"on", 1, "pub")
    assert stored.properties == {"user_property": [["k", "v"]], "correlation_data": {"__bytes__": "AQ=="}}
    assert stored.expires_at == pytest.approx(time.time() + 60, abs=1)
    engine.retain(Message("a", b"", 0, True), None)  # an empty retained message clears [MQTT-3.3.1-10]
    assert sorted(store.retained) == ["b"]
    assert engine.retained_delete("b")  # ctl retained delete
    assert store.retained == {}


async def test_sys_figures_and_refused_messages_are_not_stored() -> None:
    store = MemoryStore()
    engine = await started(store, max_retained_messages=1)
    engine.retain(Message("$SYS/brokers/n/uptime", b"1 seconds", 0, True), None)
    assert store.retained == {}
    engine.retain(Message("$SYS/brokers/n/uptime", b"", 0, True), None)
    engine.retain(Message("first", b"1", 0, True), None)
    engine.retain(Message("second", b"2", 0, True), None)  # beyond mqtt.max_retained_messages
    assert sorted(store.retained) == ["first"]


async def test_restored_messages_are_retained_on_the_engine_clock(caplog: pytest.LogCaptureFixture) -> None:
    wall = time.time()
    kept = {
        "live": StoredMessage("live", b"1", 1, "p", {"content_type": "text/plain"}, expires_at=wall + 30),
        "forever": StoredMessage("forever", b"2", 2),
        "gone": StoredMessage("gone", b"3", 0, expires_at=wall - 1),
        "$SYS/x": StoredMessage("$SYS/x", b"4", 0),
        "bad": StoredMessage("bad", b"5", 0, properties={"correlation_data": {"__bytes__": "!"}}),
        "over": StoredMessage("over", b"6", 0),
    }
    store = MemoryStore(kept)
    engine = await started(store, max_retained_messages=2)
    with caplog.at_level(logging.WARNING, logger="broker.engine"):
        restored = engine.restore_retained(
            kept[topic] for topic in ("live", "forever", "gone", "$SYS/x", "bad", "over")
        )
    assert restored == 2
    live = engine.retained_get("live")
    assert live is not None
    assert (live.payload, live.qos, live.retain, live.properties) == (
        b"1",
        1,
        True,
        {"content_type": "text/plain"},
    )
    assert live.expires_at == pytest.approx(engine.loop.time() + 30, abs=1)
    assert engine.retained_get("forever") is not None
    # What was dropped is deleted from the store too: it holds what the engine holds.
    assert sorted(store.retained) == ["forever", "live"]
    assert (
        "4 stored retained message(s) dropped: 1 $SYS, 1 beyond mqtt.max_retained_messages, 1 expired, 1 unusable"
        in caplog.text
    )


async def test_restored_sessions_route_again_and_tell_the_store(caplog: pytest.LogCaptureFixture) -> None:
    wall = time.time()
    old = StoredMessage("jobs/1", b"old", 1, "p", retain=False)
    gone = StoredMessage("jobs/0", b"expired", 1, "p", expires_at=wall - 1, retain=False)
    kept = {
        "worker": StoredSession(
            "worker",
            3600.0,
            disconnected_at=wall - 10,
            username="ann",
            authenticated=True,
            ip="192.0.2.1",
            subscriptions=(StoredSubscription("jobs/#", 1),),
            deliveries=(
                StoredDelivery(1, gone, 1),
                StoredDelivery(2, old, 1, packet_id=9),
                StoredDelivery(3, old, 1),
                StoredDelivery(4, old, 1),
            ),
        ),
        "ended": StoredSession(
            "ended",
            5.0,
            disconnected_at=wall - 6,
            will=StoredWill(StoredMessage("jobs/will", b"bye", 1, "ended", retain=False)),
        ),
    }
    store = MemoryStore(sessions=kept)
    engine = await started(store, max_mqueue_len=1)
    with caplog.at_level(logging.INFO, logger="broker.engine"):
        assert engine.restore_sessions(await store.load_sessions()) == 1
    assert "stored session of client 'ended' expired while the broker was down" in caplog.text
    assert sorted(store.sessions) == ["worker"]
    worker = store.session("worker")
    # The expired delivery dropped, the queue trimmed to mqtt.max_mqueue_len (oldest first), the
    # in-flight one kept; then the due will of "ended" was routed to it (and so queued, trimming
    # the queue again).
    assert [(d.seq, d.message.topic, d.packet_id) for d in worker.deliveries] == [
        (2, "jobs/1", 9),
        (5, "jobs/will", 0),
    ]
    assert engine.counters.dropped == {"expired": 1, "queue_full": 2}
    engine.publish(Message("jobs/2", b"new", 1, False, "p"))
    assert [d.message.topic for d in store.session("worker").deliveries] == ["jobs/1", "jobs/2"]
    assert engine.subscription_list("worker")[0]["topic"] == "jobs/#"
