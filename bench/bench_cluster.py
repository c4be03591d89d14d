"""What the cluster's Redis hop costs: QoS 0 and QoS 1 messages from a publisher on node A to a
subscriber on node B, against both on node A, in the same run.

Two realip-broker nodes clustered through one redis-server of the benchmark's own (127.0.0.1, no
persistence). In each round one raw publisher sends ``MESSAGES`` messages of ``PAYLOAD`` bytes to one
raw subscriber, ``CHUNK`` at a time, each chunk delivered before the next is sent (so that nothing
is dropped and both paths deliver everything): once with the subscriber on A (local), once with it
on B (across). Rounds alternate the order. ``CPU µs/msg`` is the CPU of both nodes and of
redis-server per message, so the Redis hop's cost is the difference between the two rows.

    python bench/bench_cluster.py [--quick]        (python bench/run.py --only cluster)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from benchlib import (  # noqa: E402
    CLOCK_TICKS,
    REALIP,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    free_port,
    median,
    puback_packet,
    publish_packet,
    read_packet,
    spread,
    start_realip,
)

#: (messages per round, rounds); full and quick.
SIZES = {False: (100_000, 6), True: (10_000, 2)}
PAYLOAD = 64
CHUNK = 1_000
TIMEOUT = 60.0
#: What wait_route publishes (never the flow's payload).
PROBE = b"?"

CONFIG = """\
node: {{name: {name}}}
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
admin: {{listen: "unix:admin.sock"}}
persistence: {{enable: false}}
mqtt: {{max_mqueue_len: 10000}}
cluster:
  enable: true
  redis: {{url: "redis://127.0.0.1:{port}/0"}}
"""


class Redis:
    """redis-server on a free port of 127.0.0.1, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server; make peers)")
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                answer = await reader.read(7)
                writer.close()
                if answer.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.02)
        raise BenchError("redis-server did not answer PING")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def flow(publish_on: Broker, subscribe_on: Broker, qos: int, count: int, tag: str) -> float:
    """Messages per second from a publisher on one node to a subscriber on the other (or the same)."""
    subscriber = await RawClient.connect(subscribe_on.port, f"bench-sub-{tag}")
    topic = f"bench/{tag}"
    await subscriber.subscribe(topic, qos)
    if publish_on is not subscribe_on:  # the new subscription's route must reach the publisher's node
        await wait_route(publish_on, subscribe_on, topic)
    publisher = await RawClient.connect(publish_on.port, f"bench-pub-{tag}")
    received = 0
    caught_up = asyncio.Event()

    async def receive() -> None:
        nonlocal received
        while received < count:
            first, body = await read_packet(subscriber.reader)
            if first >> 4 != 3:
                continue
            length = int.from_bytes(body[:2], "big")
            if first & 0x06:  # QoS 1: acknowledged at once
                subscriber.writer.write(puback_packet(int.from_bytes(body[2 + length : 4 + length], "big")))
            elif body[2 + length :] == PROBE:
                continue  # wait_route's, not the flow's
            received += 1
            if received % CHUNK == 0 or received == count:
                caught_up.set()

    async def discard() -> None:
        while True:
            await read_packet(publisher.reader)

    acks = asyncio.create_task(discard())
    receiving = asyncio.create_task(receive())
    payload = b"x" * PAYLOAD
    try:
        async with asyncio.timeout(TIMEOUT):
            started = time.perf_counter()
            for offset in range(0, count, CHUNK):
                caught_up.clear()
                size = min(CHUNK, count - offset)
                ids = [(offset + i) % 65535 + 1 for i in range(size)]
                publisher.writer.write(b"".join(publish_packet(topic.encode(), payload, qos, i) for i in ids))
                await caught_up.wait()
            await receiving
            elapsed = time.perf_counter() - started
    finally:
        acks.cancel()
        receiving.cancel()
        await publisher.close()
        await subscriber.close()
    return count / elapsed


async def wait_route(a: Broker, b: Broker, topic: str) -> None:
    """Until B's route for ``topic`` reached A: a probe subscriber on B gets what A publishes."""
    probe = await RawClient.connect(b.port, "bench-probe-sub")
    await probe.subscribe(topic, 0)
    publisher = await RawClient.connect(a.port, "bench-probe-pub")
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                publisher.writer.write(publish_packet(topic.encode(), PROBE))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        if (await read_packet(probe.reader))[0] >> 4 == 3:
                            return
    finally:
        await publisher.close()
        await probe.close()


async def run(options: Options) -> list[Table]:
    count, rounds = SIZES[options.quick]
    redis = Redis()
    nodes: list[Broker] = []
    try:
        await redis.ready()
        for name in ("bench-a", "bench-b"):
            nodes.append(
                await start_realip(CONFIG.format(name=name, port=redis.port), label=f"{REALIP} {name}")
            )
        a, b = nodes
        table = Table(
            f"Cluster: publisher on node A, subscriber on node A (local) or node B (across Redis) "
            f"({count:,} messages x {rounds} rounds, {PAYLOAD} B)",
            [
                "QoS",
                "path",
                "msg/s (median)",
                "per round",
                "ratio across/local",
                "CPU µs/msg, all",
            ],
        )
        for qos in (0, 1):
            rates: dict[str, list[float]] = {"local": [], "across": []}
            cpu: dict[str, list[float]] = {"local": [], "across": []}
            for index in range(rounds):
                order = ["local", "across"] if index % 2 == 0 else ["across", "local"]
                for path in order:
                    target = a if path == "local" else b
                    before = a.cpu_seconds() + b.cpu_seconds() + redis.cpu_seconds()
                    rates[path].append(await flow(a, target, qos, count, f"{qos}-{path}-{index}"))
                    after = a.cpu_seconds() + b.cpu_seconds() + redis.cpu_seconds()
                    cpu[path].append((after - before) / count * 1e6)
            ratios = [x / y for x, y in zip(rates["across"], rates["local"], strict=True)]
            for path in ("local", "across"):
                table.add(
                    str(qos),
                    "A -> A" if path == "local" else "A -> Redis -> B",
                    f"{median(rates[path]):,.0f}",
                    " ".join(f"{rate:,.0f}" for rate in rates[path]),
                    "1.00" if path == "local" else spread(ratios),
                    f"{median(cpu[path]):.1f}",
                )
        table.notes += [
            f"{CHUNK} messages at a time, each chunk delivered before the next is sent (a closed loop: the "
            "Redis hop's latency counts once per chunk). Both nodes, redis-server and this process share "
            "the machine's cores.",
            "The cost per message of the Redis hop is the difference of the CPU column: the publisher's "
            "node encodes and XADDs batches, the subscriber's node XREADs and decodes them, Redis stores "
            "and serves the stream entries.",
        ]
        return [table]
    finally:
        for node in nodes:
            await node.stop()
        redis.stop()


async def _standalone(quick: bool) -> None:
    options = Options(quick=quick)
    try:
        for table in await run(options):
            print(table.render())
    finally:
        await options.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(_standalone(parser.parse_args().quick))
