"""Plain amqtt 0.12.1 with its own TCP listener: the reference our fault regression tests run against.

An auth plugin refuses one address, standing in for IP access control, so that the session-ordering
faults of ../shared/AMQTT.md (a-d) can be shown on amqtt itself.

    python -m tests.plain_amqtt PORT DENIED_IP
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class DenyAddressAuthPlugin(BaseAuthPlugin):
    """Refuses the session whose ``remote_address`` is ``deny`` (what amqtt's plugins see)."""

    @dataclass
    class Config:
        deny: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        return session.remote_address != self.config.deny


async def main(port: int, denied: str) -> None:
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {f"{__name__}.DenyAddressAuthPlugin": {"deny": denied}},
        }
    )
    await broker.start()
    print("plain amqtt ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
