"""broker.listener_changes: what a reload does to the listeners, as a truth table."""

from __future__ import annotations

import dataclasses

import pytest

from broker.listener_changes import ListenerChanges, plan_listeners
from broker.settings import ListenerSettings
from listeners.address import Networks
from listeners.options import Bind, ProxyProtocolMode


def tcp(name: str, port: int = 1883, **options: object) -> ListenerSettings:
    return ListenerSettings(type="tcp", name=name, bind=Bind("127.0.0.1", port), **options)  # type: ignore[arg-type]


DEFAULT = tcp("default")
TRUSTING = dataclasses.replace(DEFAULT, trusted_proxies=Networks.parse(["10.0.0.0/8"]))
PROXIED = dataclasses.replace(DEFAULT, proxy_protocol=ProxyProtocolMode.ON)
MOVED = dataclasses.replace(DEFAULT, bind=Bind("127.0.0.1", 1884))
OTHER = tcp("other", 1885)
OFF = dataclasses.replace(OTHER, enable=False)
CERT = ListenerSettings(type="ssl", name="certs", bind=Bind("127.0.0.1", 8883), peer_cert_as_username="cn")
CERT_OFF = dataclasses.replace(CERT, peer_cert_as_username="")


@pytest.mark.parametrize(
    ("running", "wanted", "cert_username", "expected"),
    [
        ((DEFAULT,), (DEFAULT,), (), ListenerChanges(update=(DEFAULT,))),
        ((DEFAULT,), (TRUSTING,), (), ListenerChanges(update=(TRUSTING,), changed=("tcp:default",))),
        # The PROXY mode is read per connection: it applies live, like the trusted proxies.
        ((DEFAULT,), (PROXIED,), (), ListenerChanges(update=(PROXIED,), changed=("tcp:default",))),
        (
            (DEFAULT,),
            (MOVED,),
            (),
            ListenerChanges(update=(MOVED,), changed=("tcp:default",), moved=("tcp:default",)),
        ),
        ((DEFAULT,), (DEFAULT, OTHER), (), ListenerChanges(update=(DEFAULT,), start=(OTHER,))),
        ((DEFAULT, OTHER), (DEFAULT,), (), ListenerChanges(update=(DEFAULT,), stop=("tcp:other",))),
        ((DEFAULT, OTHER), (DEFAULT, OFF), (), ListenerChanges(update=(DEFAULT,), stop=("tcp:other",))),
        ((DEFAULT,), (OTHER,), (), ListenerChanges(start=(OTHER,), stop=("tcp:default",))),
        # The engine fixed at start which listeners take the certificate's CN as the username.
        (
            (DEFAULT,),
            (DEFAULT, CERT),
            (),
            ListenerChanges(update=(DEFAULT,), restart_needed=("listeners.ssl.certs.peer_cert_as_username",)),
        ),
        ((DEFAULT,), (DEFAULT, CERT), ("ssl:certs",), ListenerChanges(update=(DEFAULT,), start=(CERT,))),
        (
            (CERT,),
            (CERT_OFF,),
            ("ssl:certs",),
            ListenerChanges(update=(CERT,), restart_needed=("listeners.ssl.certs.peer_cert_as_username",)),
        ),
    ],
    ids=[
        "same",
        "trusted_proxies",
        "proxy_protocol",
        "bind",
        "added",
        "removed",
        "disabled",
        "renamed",
        "new-cert-username",
        "cert-username-known",
        "cert-username-dropped",
    ],
)
def test_plan(
    running: tuple[ListenerSettings, ...],
    wanted: tuple[ListenerSettings, ...],
    cert_username: tuple[str, ...],
    expected: ListenerChanges,
) -> None:
    assert plan_listeners(running, wanted, cert_username) == expected


def test_summary_and_any() -> None:
    plan = plan_listeners((DEFAULT, OTHER), (MOVED, tcp("new", 1886)), ())
    assert plan.any
    assert plan.summary() == {
        "started": ["tcp:new"],
        "stopped": ["tcp:other"],
        "updated": [],
        "moved": ["tcp:default"],
    }
    assert not plan_listeners((DEFAULT,), (DEFAULT,), ()).any
