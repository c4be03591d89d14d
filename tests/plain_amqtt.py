"""Plain amqtt 0.12.1 with its own TCP listener: the reference our fault regression tests run against.

An auth plugin refuses one address, standing in for IP access control, so that the session-ordering
faults listed in README "How it is built" (a-d) can be shown on amqtt itself.

    python -m tests.plain_amqtt PORT DENIED_IP
    python -m tests.plain_amqtt PORT -        (amqtt's own AnonymousAuthPlugin, its usual set-up)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from tests.support import REPO, WAIT, wait_port


class DenyAddressAuthPlugin(BaseAuthPlugin):
    """Refuses the session whose ``remote_address`` is ``deny`` (what amqtt's plugins see)."""

    @dataclass
    class Config:
        deny: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        return session.remote_address != self.config.deny


async def main(port: int, denied: str) -> None:
    if denied == "-":
        plugins: dict[str, dict[str, object]] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
        }
    else:
        plugins = {f"{__name__}.DenyAddressAuthPlugin": {"deny": denied}}
    broker = Broker(
        {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}, "plugins": plugins}
    )
    await broker.start()
    print("plain amqtt ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))


@contextlib.contextmanager
def plain_amqtt(denied: str) -> Iterator[int]:
    """Run plain amqtt in a subprocess for the duration of the block; yields its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.plain_amqtt", str(port), denied],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "plain amqtt ready"
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
