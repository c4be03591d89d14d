"""Fixtures of the end-to-end tests: real load balancers in front of the real broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.peers import HAProxy, Nginx, _Process


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start NGINX/HAProxy processes (``peers(Nginx, name, config)``); all stopped at teardown."""
    started: list[_Process] = []

    def start(kind: type[Nginx] | type[HAProxy], name: str, config: str) -> Any:
        peer = kind(tmp_path / name, config)
        started.append(peer)
        return peer

    yield start
    for peer in reversed(started):
        peer.stop()
