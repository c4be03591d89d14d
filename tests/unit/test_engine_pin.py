"""Fails loudly when amqtt changes under broker/engine.py."""

from __future__ import annotations

import inspect

import amqtt
import pytest
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker

from broker.engine import AMQTT_VERSION, Engine, check_amqtt_version
from broker.errors import EngineError


def test_installed_amqtt_is_the_pinned_one() -> None:
    assert amqtt.__version__ == AMQTT_VERSION
    check_amqtt_version()


def test_another_version_is_refused() -> None:
    with pytest.raises(EngineError, match=r"written against amqtt 0\.12\.1 internals, but amqtt 0\.12\.2"):
        check_amqtt_version("0.12.2")


def test_the_seams_we_use_are_still_there() -> None:
    assert list(inspect.signature(Broker.external_connected).parameters) == [
        "self",
        "reader",
        "writer",
        "listener_name",
    ]
    assert WriterAdapter.__abstractmethods__ == {"write", "drain", "get_peer_info", "get_ssl_info", "close"}
    assert ReaderAdapter.__abstractmethods__ == {"read", "feed_eof"}
    assert isinstance(Broker.sessions, property)


def test_amqtt_config_names_an_external_listener_per_listener() -> None:
    config = Engine.amqtt_config(["tcp:default", "ws:default"])
    assert config["listeners"] == {
        "default": {"type": "external"},
        "tcp:default": {"type": "external"},
        "ws:default": {"type": "external"},
    }
    assert list(config["plugins"]) == ["broker.engine.AcceptAllAuthPlugin"]
