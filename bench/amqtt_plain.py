"""Plain amqtt 0.12.1 with its own TCP listener: the reference the benchmarks compare us with.

Exactly amqtt's own stack (``Broker`` with a ``tcp`` listener, ``StreamReaderAdapter`` /
``StreamWriterAdapter``) and its anonymous auth plugin; no realip-broker code is imported.

    python bench/amqtt_plain.py PORT

Prints ``plain amqtt ready`` on stdout once listening; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from amqtt.broker import Broker


async def main(port: int) -> None:
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    print("plain amqtt ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    # A benchmark reference: a slow or failing stop must not hang the run.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 2.0)


if __name__ == "__main__":
    # The same levels as realip-broker's "info": amqtt's own chatter only from WARNING up.
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(int(sys.argv[1])))
