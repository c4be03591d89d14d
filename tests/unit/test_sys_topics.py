"""``broker.sys_topics``: client events with the real address, the figures, the timer chain."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest

from broker.access import Refusal
from broker.authorization import topic_matches, valid_filter
from broker.core.session import Message
from broker.engine import SessionView
from broker.metrics import MessageCounters
from broker.sys_topics import MAX_TOPIC_BYTES, OVERLONG_PREFIX, Hooks, SysTopics, topic_level
from listeners.address import AddressSource, ClientAddress

NODE = "realip@test-host"
PREFIX = f"$SYS/brokers/{NODE}/"
#: 2026-11-27T03:36:05.011Z, and the event's own time a millisecond later.
CONNECTED_AT = 1795750565.011
NOW = 1795750565.012
PROXIED = ClientAddress(
    ip="203.0.113.7",
    port=50412,
    source=AddressSource.PROXY_PROTOCOL_V1,
    proxy_ip="10.0.0.2",
    proxy_port=41234,
)


class FakeEngine:
    """The figures' source: what the engine would answer."""

    def __init__(self) -> None:
        self.counters = MessageCounters()
        self.sizes: dict[str, Any] = {"sessions": 3, "subscriptions": 5, "retained": 2, "queued": 0}
        self.connected = 2

    def stats(self) -> dict[str, Any]:
        return dict(self.sizes)

    def count(self) -> int:
        return self.connected


class Published:
    """The engine's ``publish``: collects messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.on_publish: Callable[[Message], None] | None = None

    def __call__(self, message: Message) -> int:
        self.messages.append(message)
        if self.on_publish is not None:
            self.on_publish(message)
        return 0

    def topics(self) -> list[str]:
        return [message.topic for message in self.messages]

    def last(self) -> dict[str, str]:
        return {message.topic: message.payload.decode() for message in self.messages}


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    published: Published | None = None,
    engine: FakeEngine | None = None,
    clock: Callable[[], float] | None = None,
    interval: float = 10.0,
) -> tuple[SysTopics, Published, FakeEngine]:
    published = published or Published()
    engine = engine or FakeEngine()
    sys_topics = SysTopics(
        published,
        engine,
        node=NODE,
        interval=interval,
        started=1000.0,
        version="0.1.0",
        clock=clock or Clock(1042.7),
        wall=lambda: NOW,
    )
    return sys_topics, published, engine


def view(client_id: str = "sensor-1", address: ClientAddress = PROXIED) -> SessionView:
    return SessionView(
        client_id=client_id,
        username="alice",
        address=address,
        listener_id="tcp:default",
        clean_session=True,
        keepalive=60,
        connected_at=CONNECTED_AT,
        proto_ver=4,
    )


# ---------------------------------------------------------------------------------------------- events


def test_connected_event_names_the_real_client_and_the_proxy() -> None:
    sys_topics, published, _ = make()
    sys_topics.connected(view())
    [message] = published.messages
    assert message.topic == f"{PREFIX}clients/sensor-1/connected"
    assert (message.qos, message.retain, message.publisher) == (0, False, "")
    assert json.loads(message.payload) == {
        "clientid": "sensor-1",
        "username": "alice",
        "ipaddress": "203.0.113.7",
        "port": 50412,
        "proxy_ipaddress": "10.0.0.2",
        "proxy_port": 41234,
        "address_source": "proxy_protocol_v1",
        "listener": "tcp:default",
        "proto_ver": 4,
        "clean_start": True,
        "keepalive": 60,
        "connected_at": "2026-11-27T03:36:05.011+00:00",
        "ts": "2026-11-27T03:36:05.012+00:00",
    }


def test_disconnected_event_adds_the_reason() -> None:
    sys_topics, published, _ = make()
    sys_topics.disconnected(view(), "keepalive_timeout")
    [message] = published.messages
    assert message.topic == f"{PREFIX}clients/sensor-1/disconnected"
    assert (message.qos, message.retain) == (0, False)
    record = json.loads(message.payload)
    assert record["reason"] == "keepalive_timeout"
    assert (record["ipaddress"], record["proxy_ipaddress"]) == ("203.0.113.7", "10.0.0.2")


def test_a_direct_client_has_no_proxy_address() -> None:
    sys_topics, published, _ = make()
    sys_topics.connected(view(address=ClientAddress.direct("::ffff:192.0.2.9", 1234)))
    record = json.loads(published.messages[0].payload)
    assert (record["ipaddress"], record["port"]) == ("192.0.2.9", 1234)
    assert (record["proxy_ipaddress"], record["proxy_port"]) == (None, None)
    assert record["address_source"] == "socket"


def test_refusals_publish_nothing() -> None:
    sys_topics, published, _ = make()
    sys_topics.refused("tcp:default", PROXIED, "banned", "x", None)
    sys_topics.auth_failed("tcp:default", PROXIED, Refusal("bad_credentials", "no"), "x", "bob", "built_in")
    assert published.messages == []


@pytest.mark.parametrize(
    ("client_id", "level"),
    [
        ("plain-id_1.2", "plain-id_1.2"),
        ("a/b", "a%2Fb"),
        ("+", "%2B"),
        ("#", "%23"),
        ("x/+/#", "x%2F%2B%2F%23"),
        ("100%", "100%25"),
        ("%2F", "%252F"),  # not the same topic as "/"
        ("", ""),  # an empty level: valid, and '+' matches it
        ("$SYS", "$SYS"),  # '$' only matters at the first level
        ("ünï cödé 🙂", "ünï cödé 🙂"),
    ],
)
def test_awkward_client_ids_are_one_valid_level_that_decodes_to_the_id(client_id: str, level: str) -> None:
    sys_topics, published, _ = make()
    sys_topics.connected(view(client_id))
    message = published.messages[0]
    topic = message.topic
    assert topic == f"{PREFIX}clients/{level}/connected"
    assert topic_level(client_id) == level
    assert unquote(level) == client_id
    # A valid topic name [MQTT-4.7.1-1, 4.7.3-2], one level for the id, matched by the filters a
    # monitor would use, and by neither '#' nor '+/...' [MQTT-4.7.2-1].
    assert "+" not in topic and "#" not in topic and "\0" not in topic
    assert topic.count("/") == PREFIX.count("/") + 2
    assert valid_filter(topic)
    assert topic_matches("$SYS/brokers/+/clients/+/connected", topic)
    assert topic_matches("$SYS/#", topic)
    assert not topic_matches("#", topic)
    assert not topic_matches("+/brokers/#", topic)
    assert json.loads(message.payload)["clientid"] == client_id  # the payload keeps the exact id


def test_nul_in_a_client_id_is_encoded() -> None:
    assert topic_level("a\0b") == "a%00b"
    assert unquote("a%00b") == "a\0b"


def test_distinct_ids_never_share_a_topic() -> None:
    sys_topics, _, _ = make()
    ids = ["a/b", "a%2Fb", "a%252Fb", "a+b", "a%2Bb", "a#b", "a%23b", "", "%"]
    assert len({sys_topics.event_topic(client_id, "connected") for client_id in ids}) == len(ids)


def test_a_topic_over_65535_bytes_uses_the_ids_digest() -> None:
    sys_topics, published, _ = make()
    long_id = "/" * 30000  # 90,000 bytes once encoded
    sys_topics.connected(view(long_id))
    sys_topics.disconnected(view(long_id), "client_disconnect")
    connected, disconnected = published.messages
    level = connected.topic.split("/")[4]
    assert level.startswith(OVERLONG_PREFIX) and len(level) == len(OVERLONG_PREFIX) + 64
    assert disconnected.topic == connected.topic.replace("/connected", "/disconnected")
    assert len(connected.topic.encode()) <= MAX_TOPIC_BYTES
    assert json.loads(connected.payload)["clientid"] == long_id
    # Just below the limit, the id is used as it is.
    fits = "x" * (MAX_TOPIC_BYTES - len(f"{PREFIX}clients//disconnected"))
    assert sys_topics.event_topic(fits, "disconnected") == f"{PREFIX}clients/{fits}/disconnected"
    assert sys_topics.event_topic(fits + "x", "disconnected").split("/")[4].startswith(OVERLONG_PREFIX)


def test_a_failing_publish_does_not_escape_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: Message) -> int:
        raise RuntimeError("routing bug")

    sys_topics = SysTopics(broken, FakeEngine(), node=NODE, interval=1.0, started=0.0, version="0.1.0")
    with caplog.at_level(logging.ERROR, logger="broker.sys_topics"):
        sys_topics.connected(view())
    assert "could not be published" in caplog.text


# ---------------------------------------------------------------------------------------------- figures


def test_publish_now_publishes_every_figure_retained() -> None:
    sys_topics, published, engine = make()
    engine.counters.received, engine.counters.sent = 7, 11
    engine.counters.dropped.update({"queue_full": 2, "sys_topic": 1})
    engine.counters.refused.update({"banned": 4})
    assert sys_topics.publish_now() == 12
    assert published.last() == {
        f"{PREFIX}version": "0.1.0",
        f"{PREFIX}uptime": "42 seconds",
        f"{PREFIX}clients/connected": "2",
        f"{PREFIX}clients/total": "3",
        f"{PREFIX}messages/received": "7",
        f"{PREFIX}messages/sent": "11",
        f"{PREFIX}messages/dropped": "3",
        f"{PREFIX}messages/dropped/queue_full": "2",
        f"{PREFIX}messages/dropped/sys_topic": "1",
        f"{PREFIX}subscriptions/count": "5",
        f"{PREFIX}retained messages/count": "2",
        f"{PREFIX}connects/refused/banned": "4",
    }
    assert all(m.retain and m.qos == 0 and m.publisher == "" for m in published.messages)
    assert all(valid_filter(topic) and "+" not in topic and "#" not in topic for topic in published.topics())
    # Everything again, changed or not.
    assert sys_topics.publish_now() == 12


def test_only_changed_figures_are_published_again() -> None:
    clock = Clock(1000.0)
    sys_topics, published, engine = make(clock=clock)
    sys_topics.publish_now()
    published.messages.clear()
    assert sys_topics.publish_changed() == 0
    clock.now += 0.5  # uptime still "0 seconds"
    assert sys_topics.publish_changed() == 0
    clock.now += 1
    engine.counters.received += 1
    engine.counters.dropped["queue_full"] += 1  # a new reason: a new topic, and a new total
    engine.connected = 3
    assert sys_topics.publish_changed() == 5
    assert published.last() == {
        f"{PREFIX}uptime": "1 seconds",
        f"{PREFIX}messages/received": "1",
        f"{PREFIX}messages/dropped": "1",
        f"{PREFIX}messages/dropped/queue_full": "1",
        f"{PREFIX}clients/connected": "3",
    }
    assert all(message.retain for message in published.messages)


def test_reasons_are_escaped_like_client_ids() -> None:
    sys_topics, published, engine = make()
    engine.counters.refused["odd/reason+#"] = 1
    sys_topics.publish_now()
    assert f"{PREFIX}connects/refused/odd%2Freason%2B%23" in published.topics()


@pytest.mark.parametrize("node", ["", "a/b", "node+", "#", "a\0b", "n" * 1025, "\ud800"])
def test_unusable_node_names_are_refused(node: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        SysTopics(Published(), FakeEngine(), node=node, interval=1.0, started=0.0, version="0.1.0")


@pytest.mark.parametrize("interval", [0, -1.0, float("inf"), float("nan")])
def test_unusable_intervals_are_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        SysTopics(Published(), FakeEngine(), node=NODE, interval=interval, started=0.0, version="0.1.0")


def test_an_empty_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        SysTopics(Published(), FakeEngine(), node=NODE, interval=1.0, started=0.0, version="")


# ---------------------------------------------------------------------------------------------- timer


class FakeHandle:
    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Records ``call_later``; the test fires the timers."""

    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(delay, callback)
        self.handles.append(handle)
        return handle

    def pending(self) -> list[FakeHandle]:
        return [handle for handle in self.handles if not handle.cancelled]

    def fire(self) -> None:
        [handle] = self.pending()
        handle.cancelled = True  # it ran: a timer runs once
        handle.callback()


def test_the_timer_is_one_call_later_chain_and_stop_cancels_it() -> None:
    clock = Clock(1000.0)
    sys_topics, published, engine = make(clock=clock, interval=10.0)
    loop = FakeLoop()
    sys_topics.start(loop)  # type: ignore[arg-type]
    assert sys_topics.running
    assert len(published.messages) == 9  # everything at once
    assert [handle.delay for handle in loop.pending()] == [10.0]
    published.messages.clear()
    clock.now += 10
    engine.counters.sent = 4
    loop.fire()
    assert sorted(published.topics()) == [f"{PREFIX}messages/sent", f"{PREFIX}uptime"]
    assert [handle.delay for handle in loop.pending()] == [10.0]  # the next one, and only one
    loop.fire()
    assert len(published.messages) == 2  # nothing changed
    timer = loop.pending()[0]
    sys_topics.stop()
    assert timer.cancelled and loop.pending() == []
    assert not sys_topics.running
    sys_topics.stop()  # twice is fine


def test_start_twice_is_refused() -> None:
    sys_topics, _, _ = make()
    loop = FakeLoop()
    sys_topics.start(loop)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="already started"):
        sys_topics.start(loop)  # type: ignore[arg-type]
    assert len(loop.pending()) == 1


def test_a_failing_tick_is_logged_and_the_chain_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    sys_topics, published, engine = make()
    loop = FakeLoop()
    sys_topics.start(loop)  # type: ignore[arg-type]
    del engine.sizes["sessions"]
    with caplog.at_level(logging.ERROR, logger="broker.sys_topics"):
        loop.fire()
    assert "could not be published" in caplog.text
    assert len(loop.pending()) == 1
    engine.sizes["sessions"] = 9
    loop.fire()
    assert published.last()[f"{PREFIX}clients/total"] == "9"


async def test_on_a_real_loop_each_interval_publishes_until_stopped() -> None:
    ticks = 5
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    clock = Clock(1000.0)
    published = Published()

    def on_publish(message: Message) -> None:
        if message.topic.endswith("/uptime"):
            clock.now += 1  # so that every tick has a changed uptime to publish
            if published.topics().count(message.topic) == ticks and not done.done():
                done.set_result(None)

    published.on_publish = on_publish
    sys_topics, _, _ = make(published, clock=clock, interval=0.001)
    sys_topics.start(loop)
    await asyncio.wait_for(done, timeout=5)
    # The tick that published the last uptime has scheduled the next one: stop cancels it, so
    # nothing more can come (no waiting needed to see it).
    pending = sys_topics._timer
    assert isinstance(pending, asyncio.TimerHandle) and not pending.cancelled()
    sys_topics.stop()
    assert pending.cancelled() and sys_topics._timer is None and not sys_topics.running
    uptimes = [m.payload for m in published.messages if m.topic.endswith("/uptime")]
    assert uptimes == [f"{n} seconds".encode() for n in range(ticks)]


# ---------------------------------------------------------------------------------------------- fan-out


class Recorder:
    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.calls = calls

    def connected(self, view: SessionView) -> None:
        self.calls.append((self.name, "connected"))

    def disconnected(self, view: SessionView, reason: str) -> None:
        self.calls.append((self.name, f"disconnected:{reason}"))

    def refused(
        self,
        listener_id: str,
        address: ClientAddress,
        reason: str,
        client_id: str | None,
        username: str | None,
    ) -> None:
        self.calls.append((self.name, f"refused:{reason}"))

    def auth_failed(
        self,
        listener_id: str,
        address: ClientAddress,
        refusal: Refusal,
        client_id: str,
        username: str | None,
        by: str,
    ) -> None:
        self.calls.append((self.name, f"auth_failed:{by}"))


def test_hooks_call_each_hook_in_order_including_one_added_later() -> None:
    calls: list[tuple[str, str]] = []
    hooks = Hooks(Recorder("audit", calls))
    hooks.add(Recorder("sys", calls))
    hooks.connected(view())
    hooks.disconnected(view(), "takeover")
    hooks.refused("tcp:default", PROXIED, "banned", "x", None)
    hooks.auth_failed("tcp:default", PROXIED, Refusal("bad_credentials", "no"), "x", None, "jwt")
    assert calls == [
        ("audit", "connected"),
        ("sys", "connected"),
        ("audit", "disconnected:takeover"),
        ("sys", "disconnected:takeover"),
        ("audit", "refused:banned"),
        ("sys", "refused:banned"),
        ("audit", "auth_failed:jwt"),
        ("sys", "auth_failed:jwt"),
    ]


def test_sys_topics_is_a_hook_of_the_fan_out() -> None:
    sys_topics, published, _ = make()
    hooks = Hooks()
    hooks.add(sys_topics)
    hooks.connected(view())
    hooks.refused("tcp:default", PROXIED, "banned", "x", None)
    assert published.topics() == [f"{PREFIX}clients/sensor-1/connected"]
