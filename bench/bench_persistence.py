"""What persistence costs: QoS 0 retained publishes, and QoS 1 messages through a persistent session,
persistence on vs off.

Two realip-broker processes, rounds alternating between them: one with ``persistence.enable: false``,
one with the default store (SQLite in ``data/store.sqlite3``, ``flush_interval`` 1s). In each round
one raw asyncio publisher (this process) sends ``PUBLISHES`` QoS 0 retained messages of
``PAYLOAD`` bytes, in writes of ``CHUNK`` packets, then a sentinel retained message and a PINGREQ:
the PINGRESP says the broker has handled all of them (it handles a connection's packets in order).
The publishes cycle over the topics of a workload:

- 1,000 topics: many updates of each per flush interval, which the store coalesces (one row per
  topic and interval: a fleet of sensors updating their state);
- 50,000 topics (half the default ``mqtt.max_retained_messages``): most of them touched in every
  interval, so every write is tens of thousands of rows.

The second table is the session path: one raw publisher sends ``SESSION_MESSAGES`` QoS 1 messages
(reading its PUBACKs as they come) to one subscriber whose session is persistent (clean session 0,
``mqtt.session_expiry_interval``), which acknowledges each delivery at once; a round ends when the
subscriber has the sentinel. With persistence on, every QoS 1 delivery in flight is handed to the
store, and forgotten there when its PUBACK comes: only what is still unacknowledged when a batch is
handed over (every ``flush_interval``) is written.

``publishes/s`` is counted up to the PINGRESP (what the publisher sees). ``on disc after`` is the
time from the PINGRESP until the sentinel's row is in the store's file (read-only, as another
process would): at most ``flush_interval`` plus one write, and since each batch is one transaction,
everything published before the sentinel is on disc then. ``broker CPU`` is per publish, counted
up to that point (for the persistent broker its writer thread's work included).

    python bench/bench_persistence.py [--quick]

(``python bench/run.py --only persistence``.)
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from benchlib import (  # noqa: E402
    CONNACK_OK,
    REALIP,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    median,
    puback_packet,
    publish_packet,
    read_packet,
    remaining_length,
    spread,
    start_realip,
)

#: (publishes per round, rounds); full and quick. A full round lasts more than a second, so that the
#: persistent broker writes during it (flush_interval 1s), not only after it.
SIZES = {False: (200_000, 8), True: (20_000, 2)}
#: The workloads: name -> number of topics the publishes cycle over.
WORKLOADS = {"1,000 topics": 1_000, "50,000 topics": 50_000}
PAYLOAD = 64
#: Packets per write (and drain): the publisher never has more than this in its own buffer.
CHUNK = 500
SENTINEL = "bench/sentinel"
PINGREQ = b"\xc0\x00"
#: Seconds a round, or the sentinel's way to the disc, may take before the benchmark gives up.
TIMEOUT = 60.0

CONFIG = """\
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
  ws:
    default: {{enable: false}}
admin: {{listen: "unix:admin.sock"}}
persistence: {{enable: {enable}}}
"""

OFF, ON = "off", "on (SQLite, flush 1s)"


def store_file(broker: Broker) -> Path:
    return broker.workdir / "data" / "store.sqlite3"


def stored(broker: Broker, sql: str, *args: object) -> list[tuple[object, ...]]:
    """A read-only query on the broker's store file, as another process would make it."""
    path = store_file(broker)
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return connection.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        connection.close()


def packets(count: int, topics: int, round_index: int) -> list[bytes]:
    """``count`` QoS 0 retained PUBLISH packets (RETAIN is bit 0 of the first byte)."""
    payload = b"%d-" % round_index + b"x" * PAYLOAD
    payload = payload[:PAYLOAD]
    made = []
    for index in range(count):
        topic = f"bench/{index % topics}".encode()
        packet = bytearray(publish_packet(topic, payload))
        packet[0] |= 0x01
        made.append(bytes(packet))
    return made


async def run_round(
    broker: Broker, persistent: bool, topics: int, count: int, round_index: int
) -> tuple[float, float, float]:
    """(publishes/s, broker CPU microseconds per publish, seconds from PINGRESP to on disc; NaN when
    persistence is off)."""
    batch = packets(count, topics, round_index)
    sentinel = f"round-{round_index}-{topics}".encode()
    last = bytearray(publish_packet(SENTINEL.encode(), sentinel))
    last[0] |= 0x01
    client = await RawClient.connect(broker.port, f"bench-pub-{round_index}-{topics}")
    try:
        cpu0 = broker.cpu_seconds()
        started = time.perf_counter()
        for offset in range(0, len(batch), CHUNK):
            client.writer.write(b"".join(batch[offset : offset + CHUNK]))
            await client.writer.drain()
        client.writer.write(bytes(last) + PINGREQ)
        async with asyncio.timeout(TIMEOUT):
            while (await read_packet(client.reader))[0] != 0xD0:
                pass
        acknowledged = time.perf_counter()
        on_disc = float("nan")
        if persistent:
            async with asyncio.timeout(TIMEOUT):
                query = "SELECT payload FROM retained WHERE topic = ?"
                while stored(broker, query, SENTINEL) != [(sentinel,)]:
                    await asyncio.sleep(0.002)
            on_disc = time.perf_counter() - acknowledged
        cpu = broker.cpu_seconds() - cpu0
    finally:
        await client.close()
    return count / (acknowledged - started), cpu / count * 1e6, on_disc


#: QoS 1 messages per session round; full and quick.
SESSION_MESSAGES = {False: 50_000, True: 5_000}
SESSION_TOPIC = "bench/session"


async def persistent_subscriber(port: int) -> RawClient:
    """The subscriber, connected with clean session 0 (its session outlives it, so it is kept)."""
    client_id = b"bench-keeper"
    body = b"\x00\x04MQTT\x04\x00\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x10" + remaining_length(len(body)) + body)
    connack = await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
    if connack[:2] != CONNACK_OK[:2] or connack[3] != 0:  # byte 2: session present, either way
        raise BenchError(f"CONNACK {connack!r} for the persistent subscriber")
    client = RawClient(reader, writer)
    await client.subscribe(SESSION_TOPIC + "/#", 1)
    return client


async def session_round(broker: Broker, count: int, round_index: int) -> tuple[float, float]:
    """(messages/s through the persistent session, broker CPU microseconds per message)."""
    subscriber = await persistent_subscriber(broker.port)
    publisher = await RawClient.connect(broker.port, f"bench-spub-{round_index}")
    sentinel = b"round-%d" % round_index
    payload = b"x" * PAYLOAD
    received = 0
    caught_up = asyncio.Event()

    async def receive() -> None:
        nonlocal received
        while True:
            first, body = await read_packet(subscriber.reader)
            if first >> 4 != 3:
                continue
            length = int.from_bytes(body[:2], "big")
            packet_id = body[2 + length : 4 + length]
            subscriber.writer.write(puback_packet(int.from_bytes(packet_id, "big")))
            received += 1
            if received % CHUNK == 0:
                caught_up.set()
            if body[4 + length :] == sentinel:
                return

    async def discard_pubacks() -> None:
        while True:
            await read_packet(publisher.reader)

    acks = asyncio.create_task(discard_pubacks())
    try:
        cpu0 = broker.cpu_seconds()
        started = time.perf_counter()
        receiving = asyncio.create_task(receive())
        topic = f"{SESSION_TOPIC}/{round_index}".encode()
        async with asyncio.timeout(TIMEOUT):
            for offset in range(0, count, CHUNK):
                caught_up.clear()
                publisher.writer.write(
                    b"".join(
                        publish_packet(topic, payload, 1, index % 65535 + 1)
                        for index in range(offset, min(count, offset + CHUNK))
                    )
                )
                # A chunk at a time, each delivered before the next (the queue never fills: nothing
                # is dropped, and what is measured is the delivery path, both brokers alike).
                await caught_up.wait()
            publisher.writer.write(publish_packet(topic, sentinel, 1, 1))
            await receiving
        elapsed = time.perf_counter() - started
        cpu = broker.cpu_seconds() - cpu0
    finally:
        acks.cancel()
        await publisher.close()
        subscriber.writer.transport.abort()  # no DISCONNECT needed: its session stays either way
    return (count + 1) / elapsed, cpu / (count + 1) * 1e6


async def measure_sessions(brokers: dict[str, Broker], count: int, rounds: int) -> Table:
    names = list(brokers)
    table = Table(
        f"QoS 1 through a persistent session, persistence on vs off ({count:,} messages x {rounds} rounds, "
        f"{PAYLOAD} B payloads)",
        [
            "persistence",
            "messages/s (median)",
            "per round",
            "ratio to off: median [min-max]",
            "broker CPU µs/msg",
        ],
    )
    for broker in brokers.values():  # warm-up: the session exists
        await session_round(broker, count // 10, -1)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(await session_round(brokers[name], count, index))
    base = results[OFF]
    for name, values in results.items():
        ratios = [mine[0] / ref[0] for mine, ref in zip(values, base, strict=True)]
        table.add(
            name,
            f"{median([v[0] for v in values]):,.0f}",
            " ".join(f"{v[0]:,.0f}" for v in values),
            spread(ratios),
            f"{median([v[1] for v in values]):.1f}",
        )
    query = "SELECT count(*) FROM sessions WHERE client_id = 'bench-keeper'"
    try:
        async with asyncio.timeout(TIMEOUT):  # written within flush_interval
            while stored(brokers[ON], query) != [(1,)]:
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise BenchError(f"{brokers[ON].label}: the persistent session is not in its store") from None
    table.notes += [
        "One raw publisher (QoS 1, its PUBACKs read as they come) and one raw subscriber with a "
        "persistent session acknowledging every delivery at once; 500 messages at a time, each chunk "
        "delivered before the next is sent (nothing dropped); a round ends when the subscriber has "
        "the sentinel. Rounds alternate between the two brokers.",
        "Checked after the rounds: the persistent broker's file holds the subscriber's session.",
    ]
    return table


async def _brokers() -> dict[str, Broker]:
    brokers: dict[str, Broker] = {}
    for name, enable in ((OFF, "false"), (ON, "true")):
        try:
            brokers[name] = await start_realip(
                CONFIG.format(enable=enable), label=f"{REALIP} persistence {name}"
            )
        except BaseException:
            for broker in brokers.values():
                await broker.stop()
            raise
    return brokers


async def measure(brokers: dict[str, Broker], count: int, rounds: int) -> Table:
    names = list(brokers)
    table = Table(
        f"QoS 0 retained publishes, persistence on vs off ({count:,} publishes x {rounds} rounds, "
        f"{PAYLOAD} B payloads)",
        [
            "workload",
            "persistence",
            "publishes/s (median)",
            "per round",
            "ratio to off: median [min-max]",
            "broker CPU µs/publish",
            "on disc after (median, max)",
        ],
    )
    for workload, topics in WORKLOADS.items():
        for name, broker in brokers.items():  # warm-up: the topics exist, the store has its rows
            await run_round(broker, name == ON, topics, count, -1)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(await run_round(brokers[name], name == ON, topics, count, index))
        base = results[OFF]
        for name, values in results.items():
            ratios = [mine[0] / ref[0] for mine, ref in zip(values, base, strict=True)]
            disc = [v[2] for v in values]
            table.add(
                workload,
                name,
                f"{median([v[0] for v in values]):,.0f}",
                " ".join(f"{v[0]:,.0f}" for v in values),
                spread(ratios),
                f"{median([v[1] for v in values]):.1f}",
                "-" if name == OFF else f"{median(disc):.2f} s, {max(disc):.2f} s",
            )
    rows = stored(brokers[ON], "SELECT count(*) FROM retained")
    expected = min(count, max(WORKLOADS.values())) + 1  # every topic (the fewer among them), the sentinel
    if rows != [(expected,)]:
        raise BenchError(f"{brokers[ON].label}: {rows} rows in its store, expected {expected}")
    table.notes += [
        "One raw asyncio publisher (this process), writes of 500 packets; the PINGRESP after the last "
        "publish ends a round. Rounds alternate between the two brokers; ratios are taken within a "
        "round, then median [min-max] over rounds.",
        f"Checked after the rounds: the persistent broker's file holds {expected:,} rows (every topic "
        "published, the sentinel), read while it runs.",
        "On disc after: from the PINGRESP until the sentinel's row is readable in the file; each "
        "batch is one transaction, so everything before it is on disc too (bounded by flush_interval "
        "plus one write).",
    ]
    return table


async def run(options: Options) -> list[Table]:
    count, rounds = SIZES[options.quick]
    brokers = await _brokers()
    try:
        return [
            await measure(brokers, count, rounds),
            await measure_sessions(brokers, SESSION_MESSAGES[options.quick], rounds),
        ]
    finally:
        for broker in brokers.values():
            await broker.stop()


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
