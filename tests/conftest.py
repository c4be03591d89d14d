"""Fixtures shared by the integration and end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pki import Pki, make_pki
from tests.support import BrokerProcess, Clients, RedisServer


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start the real broker with a config mapping; every one started is stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(config: dict[str, Any], **kwargs: Any) -> BrokerProcess:
        workdir = tmp_path / f"broker{len(started)}"
        workdir.mkdir()
        broker = BrokerProcess(config, workdir, **kwargs)
        started.append(broker)
        return broker.wait_ready()

    yield start
    for broker in started:
        if broker.proc.poll() is None:
            broker.stop()


@pytest.fixture
def clients() -> Iterator[Clients]:
    """Make paho-mqtt clients that are all disconnected at teardown."""
    made = Clients()
    yield made
    made.close_all()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate (localhost, 127.0.0.1, ::1) and client certificates, made once."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (the cluster's shared state)."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir).start()
    yield server
    server.stop()
