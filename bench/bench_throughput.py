"""Message throughput, QoS 0 and 1, three brokers side by side, and the QoS 0 ratio over rounds.

Clients are Debian's C clients, one process each, so that they do not bottleneck a Python broker:
``mosquitto_sub -F %l`` (prints only each payload's length) and ``mosquitto_pub -l`` (one message
per stdin line, fed by this process; at QoS 1 it keeps its default 20 messages in flight). Fan-in is
10 publisher processes, fan-out 10 subscriber processes. The one exception is the publisher into
realip-broker's PROXY listener (mosquitto_pub cannot send a PROXY header): a raw asyncio publisher
that writes a PROXY v1 header, CONNECT, then pre-built PUBLISH packets (QoS 1: 20 in flight, like
mosquitto_pub); its subscribers are mosquitto_sub on the plain listener.

Subscribers are confirmed subscribed (a 1-byte probe message reaches each) before publishing
starts. ``msg/s`` is messages delivered (summed over subscribers) divided by the time from spawning
the publishers to the last message received. QoS 0 may lose messages under overload: ``delivered``
is the share of the messages sent that reached the subscribers.

    python bench/run.py --only throughput ratio [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from dataclasses import dataclass

from benchlib import (
    AMQTT,
    MOSQ,
    REALIP,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    children_cpu,
    fmt_rate,
    fmt_ratio,
    median,
    publish_packet,
    spread,
    terminate,
)

from listeners.proxy_protocol import build_v1

#: (name, publishers, subscribers)
TOPOLOGIES = [("1->1", 1, 1), ("10->1 fan-in", 10, 1), ("1->10 fan-out", 1, 10)]
PAYLOADS = {False: [64, 4096], True: [64]}
QOS_LEVELS = [0, 1]

#: Messages delivered per case and broker (fan-out publishes a tenth of it), full and quick.
DELIVERED = {False: 12_000, True: 1_500}
#: mosquitto is ~10x faster: it gets more messages so that its run is long enough to time.
MOSQUITTO_FACTOR = 4
#: Rounds (broker order rotates each round); full and quick.
ROUNDS = {False: 2, True: 1}
#: Seconds without a new message, once every publisher has finished, after which the rest is lost.
IDLE_AFTER_PUBLISH = {False: 1.0, True: 0.5}
#: Hard cap on one case.
CASE_TIMEOUT = 60.0
#: The QoS 0 1->1 64-byte ratio benchmark: rounds and messages.
RATIO_ROUNDS = {False: 12, True: 2}
RATIO_MESSAGES = {False: 6_000, True: 2_000}

PROBE = b"R"  # a 1-byte payload: mosquitto_sub -F %l prints "1"
WINDOW = 20  # QoS 1 messages in flight, as mosquitto_pub's default (-M 20)


@dataclass
class Flow:
    """One measured case."""

    sent: int
    delivered: int
    expected: int
    seconds: float
    broker_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else float("nan")

    @property
    def share(self) -> float:
        return self.delivered / self.expected if self.expected else float("nan")


class _Subscriber:
    """One mosquitto_sub process and the count of what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, target: bytes, expected: int) -> None:
        self.proc = proc
        self.target = target
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        rest = b""
        while True:
            chunk = await self.proc.stdout.read(65536)
            if not chunk:
                return
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            lines = data[:cut].split(b"\n")
            rest = data[cut + 1 :]
            if not self.ready.is_set() and b"1" in lines:
                self.ready.set()
            hits = lines.count(self.target)
            if hits:
                self.count += hits
                self.last = time.perf_counter()
                if self.count >= self.expected:
                    self.done.set()


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(ConnectionError):
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()


async def raw_publisher(
    port: int, header: bytes, topic: str, payload: bytes, count: int, qos: int, client_id: str
) -> None:
    """Publish ``count`` messages on raw packets after ``header`` (QoS 1: WINDOW in flight)."""
    client = await RawClient.connect(port, client_id, header=header)
    writer, reader = client.writer, client.reader
    topic_b = topic.encode()
    try:
        if qos == 0:
            batch_size = 256
            packet = publish_packet(topic_b, payload)
            batch = packet * batch_size
            sent = 0
            while sent < count:
                n = min(batch_size, count - sent)
                writer.write(batch if n == batch_size else packet * n)
                await writer.drain()
                sent += n
            return
        next_index = acked = 0
        pending = b""
        while acked < count:
            inflight = next_index - acked
            if inflight < WINDOW and next_index < count:
                more = min(WINDOW - inflight, count - next_index)
                writer.write(
                    b"".join(
                        publish_packet(topic_b, payload, 1, (next_index + i) % 65535 + 1) for i in range(more)
                    )
                )
                next_index += more
            data = await asyncio.wait_for(reader.read(65536), 10.0)
            if not data:
                raise BenchError("broker closed the raw publisher")
            pending += data
            whole = len(pending) // 4  # every packet from the broker here is a 4-byte PUBACK
            acked += whole
            pending = pending[whole * 4 :]
    finally:
        await client.close()


async def measure_flow(
    sub_broker: Broker,
    pubs: int,
    subs: int,
    size: int,
    qos: int,
    delivered_target: int,
    idle_after: float,
    *,
    raw_port: int | None = None,
    raw_header: bytes = b"",
) -> Flow:
    """Publish to ``subs`` subscribers from ``pubs`` publishers, return what arrived and when.

    Publishers are mosquitto_pub processes, or (``raw_port``) raw asyncio publishers connecting to
    that port after ``raw_header``.
    """
    port = sub_broker.port
    topic = f"bench/{uuid.uuid4().hex[:12]}"
    per_sub = delivered_target if subs == 1 else delivered_target // subs
    per_pub = per_sub // pubs
    sent = per_pub * pubs
    target = str(size).encode()
    host = ["-h", "127.0.0.1", "-p", str(port)]
    subscribers: list[_Subscriber] = []
    publishers: list[asyncio.subprocess.Process] = []
    raw_tasks: list[asyncio.Task[None]] = []
    try:
        for index in range(subs):
            proc = await asyncio.create_subprocess_exec(
                "mosquitto_sub",
                *host,
                "-t",
                topic,
                "-q",
                str(qos),
                "-F",
                "%l",
                "-W",
                str(int(CASE_TIMEOUT) + 30),
                "-i",
                f"{topic}-s{index}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            subscribers.append(_Subscriber(proc, target, sent))
        # Probe until every subscriber has its subscription in place.
        probe = await RawClient.connect(port, f"{topic}-probe")
        deadline = time.monotonic() + 10.0
        while not all(sub.ready.is_set() for sub in subscribers):
            if time.monotonic() > deadline:
                raise BenchError(f"{sub_broker.label}: subscribers not ready within 10s")
            probe.writer.write(publish_packet(topic.encode(), PROBE))
            await asyncio.sleep(0.03)
        await probe.close()
        await asyncio.sleep(0.05)

        payload = b"x" * size
        lines = (payload + b"\n") * per_pub
        cpu0, broker_cpu0 = children_cpu(), sub_broker.cpu_seconds()
        started = time.perf_counter()
        if raw_port is None:
            for index in range(pubs):
                proc = await asyncio.create_subprocess_exec(
                    "mosquitto_pub",
                    *host,
                    "-t",
                    topic,
                    "-q",
                    str(qos),
                    "-l",
                    "-i",
                    f"{topic}-p{index}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                publishers.append(proc)
            feeders = [asyncio.create_task(_feed(proc, lines)) for proc in publishers]
            waiters = [asyncio.create_task(proc.wait()) for proc in publishers]
        else:
            raw_tasks = [
                asyncio.create_task(
                    raw_publisher(raw_port, raw_header, topic, payload, per_pub, qos, f"{topic}-r{index}")
                )
                for index in range(pubs)
            ]
            feeders, waiters = [], list(raw_tasks)
        published_at = 0.0
        hard_deadline = started + CASE_TIMEOUT
        while True:
            now = time.perf_counter()
            if all(sub.done.is_set() for sub in subscribers):
                break
            if all(waiter.done() for waiter in waiters):
                published_at = published_at or now
                last = max([published_at, *(sub.last for sub in subscribers)])
                if now - last > idle_after:
                    break
            if now > hard_deadline:
                break
            await asyncio.sleep(0.005)
        last_message = max(sub.last for sub in subscribers)
        broker_cpu = sub_broker.cpu_seconds() - broker_cpu0
        for task in feeders:
            task.cancel()
        for task in raw_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise BenchError(f"raw publisher failed: {task.exception()!r}")
        await terminate(publishers + [sub.proc for sub in subscribers])
        client_cpu = children_cpu() - cpu0
        delivered = sum(sub.count for sub in subscribers)
        return Flow(
            sent=sent,
            delivered=delivered,
            expected=sent * subs,
            seconds=(last_message - started) if delivered else float("nan"),
            broker_cpu=broker_cpu,
            client_cpu=client_cpu,
        )
    finally:
        for task in raw_tasks:
            task.cancel()
        await terminate(publishers + [sub.proc for sub in subscribers])
        for sub in subscribers:
            sub.task.cancel()


@dataclass(frozen=True)
class Contender:
    """A column of the throughput table: a broker and how publishers reach it."""

    name: str
    kind: str
    proxy: bool = False


CONTENDERS = [
    Contender(REALIP, "realip"),
    Contender(f"{REALIP} PROXY v1", "realip", proxy=True),
    Contender(AMQTT, "amqtt"),
    Contender(MOSQ, "mosquitto"),
]

PROXY_V1 = build_v1("203.0.113.10", "10.0.0.1", 40000, 1883)


async def _flow_for(
    options: Options, contender: Contender, pubs: int, subs: int, size: int, qos: int, count: int
) -> Flow:
    broker = await options.shared(contender.kind)
    if contender.kind == "mosquitto":
        count *= MOSQUITTO_FACTOR
    idle = IDLE_AFTER_PUBLISH[options.quick]
    if contender.proxy:
        return await measure_flow(
            broker, pubs, subs, size, qos, count, idle, raw_port=broker.ports["tcp:pp"], raw_header=PROXY_V1
        )
    return await measure_flow(broker, pubs, subs, size, qos, count, idle)


async def run_throughput(options: Options) -> list[Table]:
    count = DELIVERED[options.quick]
    rounds = ROUNDS[options.quick]
    cases = list(itertools.product(QOS_LEVELS, PAYLOADS[options.quick], TOPOLOGIES))
    flows: dict[tuple[object, ...], list[Flow]] = {}
    if not options.quick:  # warm-up: imports, first allocations, code paths
        for contender in CONTENDERS:
            await _flow_for(options, contender, 1, 1, 64, 0, 500)
    for round_index in range(rounds):
        for qos, size, (topology, pubs, subs) in cases:
            # Rotate who goes first in each case and round, so that noise hits all alike.
            shift = (round_index + cases.index((qos, size, (topology, pubs, subs)))) % len(CONTENDERS)
            for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
                flow = await _flow_for(options, contender, pubs, subs, size, qos, count)
                flows.setdefault((qos, size, topology, contender.name), []).append(flow)

    table = Table(
        f"Throughput, msg/s delivered (median of {rounds} round(s); broker CPU % of one core)",
        [
            "QoS",
            "payload",
            "flow",
            REALIP,
            "PROXY v1",
            AMQTT,
            MOSQ,
            "ours/amqtt",
            "PROXY/amqtt",
            "mosq/amqtt",
            "delivered (ours/amqtt/mosq)",
            "clients CPU (ours/amqtt/mosq)",
        ],
    )
    for qos, size, (topology, _pubs, _subs) in cases:
        cells: dict[str, tuple[float, float, float, float]] = {}
        for contender in CONTENDERS:
            runs = flows[(qos, size, topology, contender.name)]
            timed = [f for f in runs if f.seconds == f.seconds]
            cpu = median([f.broker_cpu / f.seconds * 100 for f in timed])
            clients = median([f.client_cpu / f.seconds * 100 for f in timed])
            cells[contender.name] = (median([f.rate for f in runs]), cpu, min(f.share for f in runs), clients)
        ours, pp, ref, mosq = (cells[c.name] for c in CONTENDERS)
        table.add(
            qos,
            f"{size} B",
            topology,
            f"{fmt_rate(ours[0])} ({ours[1]:.0f}%)",
            f"{fmt_rate(pp[0])} ({pp[1]:.0f}%)",
            f"{fmt_rate(ref[0])} ({ref[1]:.0f}%)",
            f"{fmt_rate(mosq[0])} ({mosq[1]:.0f}%)",
            fmt_ratio(ours[0] / ref[0]),
            fmt_ratio(pp[0] / ref[0]),
            fmt_ratio(mosq[0] / ref[0]),
            f"{ours[2]:.0%}/{ref[2]:.0%}/{mosq[2]:.0%}",
            f"{ours[3]:.0f}%/{ref[3]:.0f}%/{mosq[3]:.0f}%",
        )
    table.notes += [
        f"{count:,} messages delivered per case (fan-out: {count // 10:,} published x 10 subscribers); "
        f"mosquitto gets {MOSQUITTO_FACTOR}x as many so that its runs last long enough to time.",
        "msg/s = messages delivered (all subscribers) / (publishers spawned -> last message received).",
        "Clients: mosquitto_pub -l / mosquitto_sub -F %l, one process each (10 for fan-in/fan-out); "
        "QoS 1 publishers keep 20 messages in flight. 'PROXY v1': realip-broker's proxy_protocol "
        "listener fed by raw asyncio publishers (PROXY v1 header + pre-built packets), subscribers on "
        "the plain listener.",
        "PROXY/amqtt compares different publishers (raw asyncio vs mosquitto_pub; the raw one writes "
        "bigger batches and is faster into any broker): the ratio table compares like with like.",
        "Broker CPU near 100% of one core means the (single-threaded) broker is the bottleneck. Below "
        "that, the 2 cores are shared out: clients CPU (all client processes and this one's pipe "
        "reading, % of one core) shows where the rest went. mosquitto never reaches 100%: its "
        "figures are bound by the clients on this 2-core machine (a lower bound of its speed).",
        "delivered = worst share of sent messages that arrived (QoS 0 may drop under overload).",
    ]
    return [table]


async def run_ratio(options: Options) -> list[Table]:
    """QoS 0, 1->1, 64 bytes: realip-broker (plain and PROXY listener) / amqtt over alternating rounds."""
    rounds = RATIO_ROUNDS[options.quick]
    count = RATIO_MESSAGES[options.quick]
    idle = IDLE_AFTER_PUBLISH[options.quick]
    contenders = CONTENDERS[:3]
    rates: dict[str, list[float]] = {c.name: [] for c in contenders}
    shares: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}  # broker CPU us per message
    # Same publisher kind against every broker too: raw publishers into amqtt and our plain listener.
    raw_names = {"raw->amqtt": "amqtt", f"raw->{REALIP}": "realip"}
    for name in raw_names:
        rates[name], shares[name], cpu[name] = [], [], []
    order = [c.name for c in contenders] + list(raw_names)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            if name in raw_names:
                broker = await options.shared(raw_names[name])
                flow = await measure_flow(broker, 1, 1, 64, 0, count, idle, raw_port=broker.port)
            else:
                contender = next(c for c in contenders if c.name == name)
                flow = await _flow_for(options, contender, 1, 1, 64, 0, count)
            rates[name].append(flow.rate)
            shares[name].append(flow.share)
            cpu[name].append(flow.broker_cpu / max(flow.delivered, 1) * 1e6)
    table = Table(
        f"QoS 0 1->1 64 B: realip-broker / amqtt's own listener, {rounds} alternating rounds",
        [
            "contender",
            "msg/s per round",
            "median msg/s",
            "delivered",
            "ratio to amqtt: median [min-max]",
            "broker CPU us/msg",
            "CPU ratio (amqtt/ours)",
        ],
    )
    for name, amqtt_name in [
        (REALIP, AMQTT),
        (f"{REALIP} PROXY v1", "raw->amqtt"),
        (AMQTT, AMQTT),
        (f"raw->{REALIP}", "raw->amqtt"),
        ("raw->amqtt", "raw->amqtt"),
    ]:
        ratios = [ours / ref for ours, ref in zip(rates[name], rates[amqtt_name], strict=True)]
        if name in (REALIP, f"{REALIP} PROXY v1"):
            vs = "amqtt's own listener" + (", same raw publisher" if name != REALIP else "")
            options.check(
                f"QoS 0 1->1 64 B msg/s, {name} / {vs} >= 0.95 (median of rounds)",
                f"{spread(ratios)} over {rounds} rounds",
                median(ratios) >= 0.95,
            )
        cpu_ratios = [ref / ours for ours, ref in zip(cpu[name], cpu[amqtt_name], strict=True)]
        table.add(
            name,
            " ".join(f"{rate:,.0f}" for rate in rates[name]),
            fmt_rate(median(rates[name])),
            f"{min(shares[name]):.0%}",
            spread(ratios) + (f" (vs {amqtt_name})" if name != AMQTT else ""),
            f"{median(cpu[name]):.1f}",
            spread(cpu_ratios),
        )
    table.notes += [
        f"{count:,} messages per round and contender; mosquitto_pub -l -> mosquitto_sub, except 'raw->' "
        "and 'PROXY v1' rows: the raw asyncio publisher (pre-built packets), compared with the same "
        "publisher into amqtt.",
        "A ratio is taken within one round (the two runs back to back), then median [min-max] over rounds.",
        "broker CPU us/msg = the broker process's CPU time (/proc/PID/stat) / messages delivered: less "
        "sensitive to scheduling noise than msg/s; CPU ratio > 1 means we spend less CPU than amqtt.",
    ]
    return [table]


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--only", "throughput", "ratio", *sys.argv[1:]]))
