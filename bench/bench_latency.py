"""QoS 1 latency under load: publish -> receive p50 / p90 / p99, three brokers side by side.

Background load: one ``mosquitto_pub -l`` publishing 64-byte QoS 0 messages at a fixed rate
(paced by this process, in 10 ms batches) to one ``mosquitto_sub``. Probes: a raw asyncio client
publishes a QoS 1 message every 5 ms carrying its send time (``perf_counter_ns``) to a raw asyncio
subscriber (QoS 1 subscription) in the same process; the latency is receive time minus send time, and
the publisher also records PUBLISH -> PUBACK. Brokers alternate in rounds.

    python bench/run.py --only latency [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
import time
import uuid

from benchlib import (
    AMQTT,
    MOSQ,
    REALIP,
    Broker,
    Options,
    RawClient,
    Table,
    fmt_ratio,
    percentile,
    puback_packet,
    publish_packet,
    read_packet,
    terminate,
)

#: Background messages per second (QoS 0, 64 B): about a third of what amqtt can carry here.
LOAD_RATE = 2500
#: Probe messages per second.
PROBE_RATE = 200
#: Seconds of probing per round, and rounds; full and quick.
SECONDS = {False: 5.0, True: 1.0}
ROUNDS = {False: 2, True: 1}
KINDS = [("realip", REALIP), ("amqtt", AMQTT), ("mosquitto", MOSQ)]


async def _pace(proc: asyncio.subprocess.Process, rate: int, stop: asyncio.Event) -> int:
    """Feed ``rate`` lines/s to a mosquitto_pub -l in 10 ms batches until ``stop``."""
    assert proc.stdin is not None
    line = b"L" * 64 + b"\n"
    sent = 0
    started = time.perf_counter()
    with contextlib.suppress(ConnectionError):
        while not stop.is_set():
            due = int((time.perf_counter() - started) * rate) - sent
            if due > 0:
                proc.stdin.write(line * due)
                sent += due
                await proc.stdin.drain()
            await asyncio.sleep(0.01)
        proc.stdin.close()
    return sent


async def _receive(sub: RawClient, samples: list[float]) -> None:
    while True:
        first, body = await read_packet(sub.reader)
        if first >> 4 != 3:
            continue
        topic_len = int.from_bytes(body[:2], "big")
        offset = 2 + topic_len
        qos = (first >> 1) & 3
        if qos:
            sub.writer.write(puback_packet(int.from_bytes(body[offset : offset + 2], "big")))
            offset += 2
        (sent_ns,) = struct.unpack_from("!q", body, offset)
        samples.append((time.perf_counter_ns() - sent_ns) / 1e6)


async def _acks(pub: RawClient, sent_at: dict[int, int], samples: list[float]) -> None:
    while True:
        first, body = await read_packet(pub.reader)
        if first >> 4 == 4:
            started = sent_at.pop(int.from_bytes(body[:2], "big"), None)
            if started is not None:
                samples.append((time.perf_counter_ns() - started) / 1e6)


async def measure(broker: Broker, seconds: float) -> tuple[list[float], list[float], float]:
    """(publish->receive ms, publish->PUBACK ms, load messages/s actually sent)."""
    port = broker.port
    tag = uuid.uuid4().hex[:10]
    load_topic, probe_topic = f"bench/load/{tag}", f"bench/probe/{tag}"
    host = ["-h", "127.0.0.1", "-p", str(port)]
    load_sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *host,
        "-t",
        load_topic,
        "-W",
        str(int(seconds) + 30),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    load_pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *host,
        "-t",
        load_topic,
        "-l",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    sub = await RawClient.connect(port, f"lat-sub-{tag}")
    await sub.subscribe(probe_topic, 1)
    pub = await RawClient.connect(port, f"lat-pub-{tag}")
    latencies: list[float] = []
    acks: list[float] = []
    sent_at: dict[int, int] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_receive(sub, latencies)), asyncio.create_task(_acks(pub, sent_at, acks))]
    pacer = asyncio.create_task(_pace(load_pub, LOAD_RATE, stop))
    try:
        await asyncio.sleep(0.5)  # let the load reach its pace
        latencies.clear()
        probes = int(seconds * PROBE_RATE)
        started = time.perf_counter()
        topic_b = probe_topic.encode()
        for index in range(probes):
            packet_id = index % 65535 + 1
            now = time.perf_counter_ns()
            sent_at[packet_id] = now
            pub.writer.write(publish_packet(topic_b, struct.pack("!q", now) + b"p" * 56, 1, packet_id))
            delay = started + (index + 1) / PROBE_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.sleep(0.5)  # stragglers
        stop.set()
        load_sent = await asyncio.wait_for(pacer, 5.0)
        load_rate = load_sent / (time.perf_counter() - started + 0.5)
    finally:
        stop.set()
        for task in [*tasks, pacer]:
            task.cancel()
        await sub.close()
        await pub.close()
        await terminate([load_pub, load_sub])
    return latencies, acks, load_rate


async def run(options: Options) -> list[Table]:
    seconds, rounds = SECONDS[options.quick], ROUNDS[options.quick]
    results: dict[str, tuple[list[float], list[float], list[float]]] = {
        label: ([], [], []) for _, label in KINDS
    }
    for round_index in range(rounds):
        order = KINDS[round_index % 3 :] + KINDS[: round_index % 3]
        for kind, label in order:
            broker = await options.shared(kind)
            latencies, acks, load = await measure(broker, seconds)
            results[label][0].extend(latencies)
            results[label][1].extend(acks)
            results[label][2].append(load)
    table = Table(
        f"QoS 1 latency under a {LOAD_RATE:,} msg/s QoS 0 background load (ms)",
        ["broker", "probes", "p50", "p90", "p99", "max", "PUBACK p50", "PUBACK p99", "p99 vs amqtt"],
    )
    amqtt_p99 = percentile(results[AMQTT][0], 99)
    for _, label in KINDS:
        lat, acks, _loads = results[label]
        expected = int(seconds * PROBE_RATE) * rounds
        table.add(
            label,
            f"{len(lat)}/{expected}",
            f"{percentile(lat, 50):.2f}",
            f"{percentile(lat, 90):.2f}",
            f"{percentile(lat, 99):.2f}",
            f"{max(lat, default=float('nan')):.2f}",
            f"{percentile(acks, 50):.2f}",
            f"{percentile(acks, 99):.2f}",
            fmt_ratio(percentile(lat, 99) / amqtt_p99),
        )
    table.notes += [
        f"{PROBE_RATE} probes/s for {seconds:g} s x {rounds} round(s) per broker; publish -> receive "
        "through the broker, both clients raw asyncio in the benchmark process (adds ~0.1 ms).",
        f"Load: mosquitto_pub -l paced at {LOAD_RATE:,} msg/s (64 B, QoS 0) -> mosquitto_sub.",
    ]
    return [table]


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--only", "latency", *sys.argv[1:]]))
