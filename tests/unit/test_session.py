"""broker.core.session: the in-flight window, the bounded queue, packet ids, incoming QoS 2."""

from __future__ import annotations

import pytest

from broker.core.session import (
    EXPIRED,
    NOT_AUTHORIZED,
    QOS0_OFFLINE,
    QUEUE_FULL,
    SESSION_DISCARDED,
    Delivery,
    Message,
    Session,
    SharedGroup,
    SubOptions,
)


def make(**overrides: object) -> Session:
    options: dict[str, object] = {
        "persistent": True,
        "max_inflight": 2,
        "max_mqueue_len": 3,
        "store_qos0": True,
        "max_awaiting_rel": 2,
    }
    options.update(overrides)
    session = Session("c", **options)  # type: ignore[arg-type]
    session.online = session.writable = True
    return session


def msg(topic: str = "t", qos: int = 1) -> Message:
    return Message(topic, b"x", qos, False)


def test_qos0_goes_straight_out_when_writable() -> None:
    session = make()
    delivery = Delivery(msg(qos=0), 0)
    assert session.deliver(delivery) is delivery
    assert delivery.packet_id == 0
    assert not session.queue and not session.inflight


def test_window_bounds_inflight_and_queue_keeps_order() -> None:
    session = make()
    sent = [session.deliver(Delivery(msg(str(i)), 1)) for i in range(4)]
    assert [d is not None for d in sent] == [True, True, False, False]
    assert list(session.inflight) == [1, 2]
    assert [d.message.topic for d in session.queue] == ["2", "3"]
    # A QoS 0 message is not held behind the window when the transport is writable.
    assert session.deliver(Delivery(msg("q0", 0), 0)) is not None
    assert session.acknowledge(1, "puback")
    drained = session.drain()
    assert [(d.message.topic, d.packet_id) for d in drained] == [("2", 3)]


def test_queue_full_drops_oldest_and_counts() -> None:
    session = make(max_inflight=1)
    session.writable = False
    dropped: list[str] = []
    session.on_drop = lambda reason, delivery: dropped.append(delivery.message.topic)
    for i in range(5):
        assert session.deliver(Delivery(msg(str(i)), 1)) is None
    assert [d.message.topic for d in session.queue] == ["2", "3", "4"]
    assert dropped == ["0", "1"]
    assert session.drops == {QUEUE_FULL: 2}


def test_unlimited_queue() -> None:
    session = make(max_mqueue_len=0)
    session.writable = False
    for i in range(100):
        session.deliver(Delivery(msg(str(i)), 1))
    assert len(session.queue) == 100


def test_qos0_offline_is_dropped_unless_stored() -> None:
    session = make(store_qos0=False)
    session.online = session.writable = False
    assert session.deliver(Delivery(msg(qos=0), 0)) is None
    assert session.drops == {QOS0_OFFLINE: 1}
    stored = make(store_qos0=True)
    stored.online = stored.writable = False
    stored.deliver(Delivery(msg(qos=0), 0))
    assert len(stored.queue) == 1


def test_paused_transport_queues_qos0_too() -> None:
    session = make()
    session.writable = False  # online, but its transport is paused
    session.deliver(Delivery(msg(qos=0), 0))
    assert len(session.queue) == 1 and not session.drops


def test_packet_ids_never_run_out_and_skip_those_in_use() -> None:
    """[MQTT-2.3.1-4] ids of in-flight deliveries are never reused; the window bounds them."""
    session = make(max_inflight=65535, max_mqueue_len=0)
    for i in range(65535):
        assert session.deliver(Delivery(msg(str(i)), 1)) is not None
    assert len(session.inflight) == 65535
    assert session.deliver(Delivery(msg("more"), 1)) is None  # window full: queued, not lost
    assert session.acknowledge(7, "puback")
    [again] = session.drain()
    assert again.packet_id == 7
    assert not session.queue


def test_id_wraps_around_after_65535() -> None:
    session = make(max_inflight=10)
    ids = []
    for _ in range(65540):
        delivery = session.deliver(Delivery(msg(), 1))
        assert delivery is not None
        ids.append(delivery.packet_id)
        session.acknowledge(delivery.packet_id, "puback")
    assert ids[65534] == 65535 and ids[65535] == 1
    assert 0 not in ids


def test_qos2_flow_and_wrong_stage_acks() -> None:
    session = make()
    delivery = session.deliver(Delivery(msg(qos=2), 2))
    assert delivery is not None
    pid = delivery.packet_id
    assert not session.acknowledge(pid, "puback")  # QoS 2 is not PUBACK'd
    assert not session.acknowledge(pid, "pubcomp")  # not before PUBREC
    assert session.acknowledge(pid, "pubrec") and delivery.released
    assert session.resend() == [delivery]  # after PUBREC the PUBREL is re-sent
    assert session.acknowledge(pid, "pubcomp")
    assert not session.inflight
    assert not session.acknowledge(pid, "pubcomp")


def test_resend_marks_dup() -> None:
    session = make()
    first = session.deliver(Delivery(msg(), 1))
    assert first is not None and not first.dup
    assert [d.dup for d in session.resend()] == [True]


def test_filter_pending_drops_what_the_new_address_may_not_receive() -> None:
    session = make(max_inflight=1)
    session.deliver(Delivery(msg("secret/a"), 1))
    session.deliver(Delivery(msg("public/b"), 1))
    session.deliver(Delivery(msg("secret/c"), 1))
    assert session.filter_pending(lambda m: not m.topic.startswith("secret/")) == 2
    assert [d.message.topic for d in session.pending()] == ["public/b"]
    assert session.drops == {NOT_AUTHORIZED: 2}


def test_discard_counts_what_was_waiting() -> None:
    session = make(max_inflight=1)
    for i in range(3):
        session.deliver(Delivery(msg(str(i)), 1))
    session.discard()
    assert session.drops == {SESSION_DISCARDED: 3}
    assert not list(session.pending())


@pytest.mark.parametrize("timeout", [10.0])
def test_incoming_qos2_is_bounded_and_forgotten_after_timeout(timeout: float) -> None:
    session = make(max_awaiting_rel=2)
    assert session.receive_qos2(1, now=0.0, timeout=timeout) is True
    assert session.receive_qos2(1, now=1.0, timeout=timeout) is False  # re-sent: not routed again
    assert session.receive_qos2(2, now=2.0, timeout=timeout) is True
    assert session.receive_qos2(3, now=3.0, timeout=timeout) is None  # full
    session.release(1)
    assert session.receive_qos2(3, now=4.0, timeout=timeout) is True
    # id 2 arrived at 2.0; at 12.5 it is past await_rel_timeout and forgotten.
    assert session.receive_qos2(4, now=12.5, timeout=timeout) is True
    assert list(session.awaiting_rel) == [3, 4]


def _group(*members: str) -> SharedGroup:
    group = SharedGroup("g", "t/#")
    for member in members:
        group.members[member] = SubOptions(1)
    return group


def test_shared_round_robin_prefers_available_members() -> None:
    group = _group("a", "b", "c")
    picks = [group.pick("round_robin", "p", "t/1", lambda m: True, 0.0) for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    only_b = [group.pick("round_robin", "p", "t/1", lambda m: m == "b", 0.0) for _ in range(3)]
    assert only_b == ["b", "b", "b"]
    assert {group.pick("round_robin", "p", "t", lambda m: False, 0.0) for _ in range(3)} == {"a", "b", "c"}


@pytest.mark.parametrize("strategy", ["sticky", "hash_clientid", "hash_topic"])
def test_shared_strategies_that_stay_on_one_member(strategy: str) -> None:
    group = _group("a", "b", "c")
    picks = {group.pick(strategy, "publisher", "t/1", lambda m: True, 0.5) for _ in range(5)}
    assert len(picks) == 1


def test_shared_random_uses_the_callers_chance_and_empty_groups_pick_nobody() -> None:
    group = _group("a", "b")
    assert group.pick("random", "p", "t", lambda m: True, 0.0) == "a"
    assert group.pick("random", "p", "t", lambda m: True, 0.99) == "b"
    assert SharedGroup("g", "t").pick("round_robin", "p", "t", lambda m: True, 0.0) is None


def test_expired_messages_are_dropped_from_the_queue_not_sent() -> None:
    session = make(max_inflight=1)
    session.writable = False
    session.deliver(Delivery(Message("t", b"x", 1, False, expires_at=5.0), 1))
    session.deliver(Delivery(Message("t", b"y", 1, False, expires_at=50.0), 1))
    session.writable = True
    [sent] = session.drain(now=10.0)
    assert sent.message.payload == b"y"
    assert session.drops == {EXPIRED: 1}


def test_abandon_frees_the_packet_id() -> None:
    session = make()
    delivery = session.deliver(Delivery(msg(), 1))
    assert delivery is not None and delivery.packet_id in session.inflight
    session.abandon(delivery, "too_large")
    assert not session.inflight and session.drops == {"too_large": 1}


class Recorded(Session):
    """A session whose hooks record what a store would be told."""

    def __init__(self) -> None:
        super().__init__(
            "c", persistent=True, max_inflight=1, max_mqueue_len=2, store_qos0=True, max_awaiting_rel=2
        )
        self.online = self.writable = True
        self.told: list[tuple[str, str, int]] = []

    def _saved(self, delivery: Delivery) -> None:
        self.told.append(("saved", delivery.message.topic, delivery.packet_id))

    def _removed(self, delivery: Delivery) -> None:
        self.told.append(("removed", delivery.message.topic, delivery.packet_id))

    def _changed(self) -> None:
        self.told.append(("changed", "", len(self.awaiting_rel)))


def test_every_change_a_restart_must_bring_back_reaches_the_hooks() -> None:
    session = Recorded()
    first = session.deliver(Delivery(msg("a", 2), 2))  # in flight at once
    assert first is not None
    session.deliver(Delivery(msg("b"), 1))  # the window is full: queued
    session.deliver(Delivery(msg("z", 0), 0))  # QoS 0, written at once: never kept
    session.writable = False
    session.deliver(Delivery(msg("q0", 0), 0))  # QoS 0 while paused: queued
    session.deliver(Delivery(msg("c"), 1))  # the queue is full: "b" dropped
    assert session.acknowledge(first.packet_id, "pubrec")  # released: its PUBREL goes out now
    assert session.acknowledge(first.packet_id, "pubcomp")
    session.writable = True
    session.drain()
    assert session.receive_qos2(9, 0.0, 60.0)
    session.release(9)
    session.release(9)  # unknown now: nothing changes
    assert session.told == [
        ("saved", "a", 1),
        ("saved", "b", 0),
        ("saved", "q0", 0),
        ("removed", "b", 0),
        ("saved", "c", 0),
        ("saved", "a", 1),
        ("removed", "a", 1),
        ("removed", "q0", 0),
        ("saved", "c", 2),
        ("changed", "", 1),
        ("changed", "", 0),
    ]
