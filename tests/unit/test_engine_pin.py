"""Fails loudly when amqtt changes under broker/engine.py."""

from __future__ import annotations

import inspect

import amqtt
import pytest
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

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


@pytest.mark.parametrize(
    ("owner", "name", "parameters"),
    [
        (Broker, "_client_connected", ["self", "listener_name", "reader", "writer"]),
        (Broker, "_handle_message_delivery", ["self", "client_session", "handler", "wait_deliver"]),
        (Broker, "_run_broadcast", ["self", "running_tasks"]),
        (Broker, "_publish_session_retained_messages", ["self", "session"]),
        (Broker, "_publish_retained_messages_for_subscription", ["self", "subscription", "session"]),
        (Broker, "_topic_filtering", ["self", "session", "topic", "action"]),
        (Broker, "_handle_disconnect", ["self", "client_session", "handler", "disconnect_waiter"]),
        (Broker, "_client_message_loop", ["self", "client_session", "handler"]),
        (Broker, "_cleanup_session", ["self", "client_id"]),
        (Broker, "_authenticate", ["self", "session", "_"]),
        (Broker, "_retain_broadcast_message", ["self", "broadcast", "qos", "target_session"]),
        (Broker, "_broadcast_message", ["self", "session", "topic", "data", "force_qos"]),
        (Broker, "retain_message", ["self", "source_session", "topic_name", "data", "qos"]),
        (BrokerProtocolHandler, "init_from_connect", ["reader", "writer", "plugins_manager", "loop"]),
        (BrokerProtocolHandler, "_handle_qos1_message_flow", ["self", "app_message"]),
        (BrokerProtocolHandler, "_handle_qos2_message_flow", ["self", "app_message"]),
        (BrokerProtocolHandler, "_retry_deliveries", ["self"]),
        (BrokerProtocolHandler, "handle_connection_closed", ["self"]),
    ],
)
def test_the_internals_engine_py_overrides_are_unchanged(
    owner: type, name: str, parameters: list[str]
) -> None:
    """broker/engine.py replaces or calls these; a change of shape must stop the build, not the broker."""
    assert list(inspect.signature(getattr(owner, name)).parameters) == parameters
