"""The engine and its store: every retained change is handed over, what was kept comes back."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from broker.core.session import Message
from broker.engine import Engine
from broker.settings import MqttSettings
from broker.store.base import MemoryStore, StoredMessage


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
