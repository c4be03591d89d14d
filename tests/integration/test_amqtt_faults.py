"""amqtt 0.12.1's faults a-d (README, "How it is built"): each test shows the fault on plain amqtt 0.12.1 and its absence here.

Every scenario runs twice with a third-party client (paho-mqtt): against plain amqtt (its own TCP
listener, an auth plugin refusing 127.0.0.66) where the faulty outcome is asserted, proving the test
can tell; and against realip-broker (``access.deny: [127.0.0.66/32]``) where the correct one is.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.plain_amqtt import plain_amqtt
from tests.support import (
    WAIT,
    BrokerProcess,
    Clients,
    broker_config,
    client_info,
    listener_config,
)

DENIED = "127.0.0.66"
ALLOWED = "127.0.0.41"
ELSEWHERE = "127.0.0.42"

BrokerFactory = Callable[..., BrokerProcess]


@dataclass
class Target:
    kind: str  # "amqtt" or "realip"
    port: int
    broker: BrokerProcess | None = None

    @property
    def fixed(self) -> bool:
        return self.kind == "realip"


@pytest.fixture(params=["amqtt", "realip"])
def target(request: pytest.FixtureRequest, start_broker: BrokerFactory) -> Iterator[Target]:
    if request.param == "realip":
        broker = start_broker(
            broker_config(
                tcp={"default": listener_config()},
                access={"deny": [f"{DENIED}/32"]},
                mqtt={"idle_timeout": "1s"},
            )
        )
        yield Target("realip", broker.port("tcp:default"), broker)
        return
    with plain_amqtt(DENIED) as port:
        yield Target("amqtt", port)


def test_fault_a_a_denied_client_cannot_resume_an_allowed_clients_session(
    target: Target, clients: Clients
) -> None:
    victim = clients.new("shared-id", clean_session=False).connect(
        "127.0.0.1", target.port, bind_address=ALLOWED
    )
    victim.subscribe("a/t", 1)
    victim.close()
    intruder = clients.new("shared-id", clean_session=False)
    if not target.fixed:
        # amqtt authenticates the *stored* session, which still carries the allowed peer: bypass.
        intruder.connect("127.0.0.1", target.port, bind_address=DENIED, expect_rc=0)
        return
    intruder.connect("127.0.0.1", target.port, bind_address=DENIED, expect_rc=5)
    assert target.broker is not None
    target.broker.wait_for_log(
        rf"client 'shared-id' refused: {DENIED} is refused by the global access rules \[access\]"
    )
    # The victim comes back to its session intact, reported with its own (new) address.
    again = clients.new("shared-id", clean_session=False).connect(
        "127.0.0.1", target.port, bind_address=ELSEWHERE
    )
    assert again.session_present
    assert client_info(target.broker, "shared-id")["ip_address"] == ELSEWHERE
    clients.new("pub").connect("127.0.0.1", target.port).publish("a/t", b"still-subscribed", qos=1)
    assert again.expect().payload == b"still-subscribed"


def test_fault_b_a_refused_clean_session_cannot_wipe_a_connected_victim(
    target: Target, clients: Clients
) -> None:
    victim = clients.new("victim").connect("127.0.0.1", target.port, bind_address=ALLOWED)
    victim.subscribe("b/t", 1)
    assert clients.new("victim").connect_refused("127.0.0.1", target.port, bind_address=DENIED)
    publisher = clients.new("pub").connect("127.0.0.1", target.port)
    publisher.publish("b/t", b"after-the-attack", qos=1)
    if not target.fixed:
        # amqtt deleted the victim's session (and subscriptions) before refusing the intruder.
        victim.expect_nothing(within=1.0)
        return
    assert victim.expect().payload == b"after-the-attack"
    assert not victim.disconnected.is_set()
    assert target.broker is not None
    assert client_info(target.broker, "victim")["ip_address"] == ALLOWED


def test_fault_c_a_refused_client_leaves_no_ghost_session(target: Target, clients: Clients) -> None:
    assert clients.new("ghost", clean_session=False).connect_refused(
        "127.0.0.1", target.port, bind_address=DENIED
    )
    later = clients.new("ghost", clean_session=False)
    if not target.fixed:
        # amqtt registered the refused client's session; the legitimate client then "resumes" it,
        # is authenticated with the intruder's stored address, and is refused.
        later.connect("127.0.0.1", target.port, bind_address=ALLOWED, expect_rc=5)
        return
    later.connect("127.0.0.1", target.port, bind_address=ALLOWED)
    assert not later.session_present


def test_fault_d_a_socket_that_never_sends_connect_is_closed(target: Target) -> None:
    with socket.create_connection(("127.0.0.1", target.port), timeout=WAIT) as sock:
        if not target.fixed:
            sock.settimeout(2.5)  # amqtt would wait forever; 2.5 s is enough to see it did not close
            with pytest.raises(TimeoutError):
                sock.recv(1)
            return
        assert sock.recv(1) == b""  # closed after mqtt.idle_timeout (1s)
