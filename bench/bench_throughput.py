"""Message throughput, QoS 0 and 1, three brokers side by side, and the QoS 0 ratio over rounds.

Clients are Debian's C clients, one process each, so that they do not bottleneck a Python broker:
``mosquitto_sub -F %l`` (prints only each payload's length) and ``mosquitto_pub -l`` (one message
per stdin line, fed by this process; at QoS 1 it keeps its default 20 messages in flight), speaking
MQTT 3.1.1 (their default), or MQTT 5 (``-V mqttv5``, both of them) in realip-broker's "MQTT 5"
contender, whose ratios are taken against amqtt's 3.1.1 (amqtt 0.12.1 has no MQTT 5). Fan-in is
10 publisher processes, fan-out 10 subscriber processes. The one exception is the publisher into
realip-broker's PROXY listener (mosquitto_pub cannot send a PROXY header): a raw asyncio publisher
that writes a PROXY v1 header, CONNECT, then pre-built PUBLISH packets (QoS 1: 20 in flight, like
mosquitto_pub); its subscribers are mosquitto_sub on the plain listener.

Subscribers are confirmed subscribed (a 1-byte probe message reaches each) before publishing
starts. ``msg/s`` is messages delivered (summed over subscribers) divided by the time from spawning
the publishers to the last message received. QoS 0 may lose messages under overload: ``delivered``
is the share of the messages sent that reached the subscribers. realip-broker queues QoS 0
deliveries for a subscriber whose transport is paused up to ``mqtt.max_mqueue_len`` (1000), then
drops the oldest; its drop counter (``realip_messages_dropped_total{reason="queue_full"}`` from
/metrics on its admin socket) is read around every flow and reported. amqtt and mosquitto buffer
without bound here (no drop).

Each broker gets a message count that makes its runs last about a second (amqtt: ``DELIVERED``,
the others ``FAST_FACTOR`` times as many), so that spawning the clients does not dominate the time.

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
from typing import Any

from benchlib import (
    AMQTT,
    MOSQ,
    REALIP,
    REALIP_UVLOOP,
    UVLOOP_MISSING,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    children_cpu,
    fmt_rate,
    median,
    publish_packet,
    spread,
    terminate,
    uvloop_available,
)

from listeners.proxy_protocol import build_v1

#: (name, publishers, subscribers)
TOPOLOGIES = [("1->1", 1, 1), ("10->1 fan-in", 10, 1), ("1->10 fan-out", 1, 10)]
PAYLOADS = {False: [64, 4096], True: [64]}
QOS_LEVELS = [0, 1]

#: Messages delivered per case into amqtt (fan-out publishes a tenth of it), full and quick.
DELIVERED = {False: 12_000, True: 1_000}
#: realip-broker and mosquitto are ~10x faster than amqtt: they get this many times more messages,
#: so that their runs too last long enough to time (msg/s is a rate: the counts need not match).
FAST_FACTOR = 4
#: Rounds (broker order rotates each round); full and quick.
ROUNDS = {False: 2, True: 1}
#: Seconds without a new message, once every publisher has finished, after which the rest is lost.
IDLE_AFTER_PUBLISH = {False: 1.0, True: 0.3}
#: Hard cap on one case.
CASE_TIMEOUT = 60.0
#: The QoS 0 1->1 64-byte ratio benchmark: rounds, and messages into amqtt per round (the others
#: get RATIO_FAST_FACTOR times as many).
RATIO_ROUNDS = {False: 10, True: 1}
RATIO_MESSAGES = {False: 6_000, True: 1_500}
RATIO_FAST_FACTOR = 8

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
    #: Publishers spawned -> every publisher done (or the flow cut short).
    publish_seconds: float = float("nan")
    #: Deliveries realip-broker dropped during the flow, by reason (None: not known, another broker).
    dropped: dict[str, int] | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else float("nan")

    @property
    def share(self) -> float:
        return self.delivered / self.expected if self.expected else float("nan")

    @property
    def queue_full(self) -> int | None:
        return None if self.dropped is None else self.dropped.get("queue_full", 0)

    def cpu_us(self, per: str = "delivered") -> float:
        """Broker CPU microseconds per message delivered (or per message ``sent``)."""
        count = self.delivered if per == "delivered" else self.sent
        return self.broker_cpu / count * 1e6 if count else float("nan")


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
    port: int,
    header: bytes,
    topic: str,
    payload: bytes,
    count: int,
    qos: int,
    client_id: str,
    *,
    distinct_topics: bool = False,
) -> None:
    """Publish ``count`` messages on raw packets after ``header`` (QoS 1: WINDOW in flight).

    ``distinct_topics``: QoS 0 message ``i`` goes to ``TOPIC/i`` (every topic new to the broker), not
    to ``TOPIC``; the packets are built before connecting.
    """
    topic_b = topic.encode()
    batch_size = 256
    packets: list[bytes] = []
    if distinct_topics:
        if qos != 0:
            raise BenchError("distinct topics: QoS 0 only")
        packets = [publish_packet(b"%s/%d" % (topic_b, i), payload) for i in range(count)]
    client = await RawClient.connect(port, client_id, header=header)
    writer, reader = client.writer, client.reader
    try:
        if qos == 0:
            packet = publish_packet(topic_b, payload)
            batch = packet * batch_size
            sent = 0
            while sent < count:
                n = min(batch_size, count - sent)
                if packets:
                    writer.write(b"".join(packets[sent : sent + n]))
                else:
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
    distinct_topics: bool = False,
    mqtt5: bool = False,
) -> Flow:
    """Publish to ``subs`` subscribers from ``pubs`` publishers, return what arrived and when.

    Publishers are mosquitto_pub processes, or (``raw_port``) raw asyncio publishers connecting to
    that port after ``raw_header``. ``distinct_topics`` (raw publishers, QoS 0): every message to a
    topic of its own under ``bench/TAG/``, the subscribers on ``bench/TAG/#``. ``mqtt5``:
    mosquitto_sub and mosquitto_pub speak MQTT 5 (``-V mqttv5``) instead of 3.1.1 (the probe
    publisher stays 3.1.1: the broker routes between both).
    """
    port = sub_broker.port
    base = f"bench/{uuid.uuid4().hex[:12]}"
    topic = base
    sub_filter, probe_topic = (f"{base}/#", f"{base}/probe") if distinct_topics else (base, base)
    if distinct_topics and raw_port is None:
        raise BenchError("distinct topics need raw publishers")
    if mqtt5 and raw_port is not None:
        raise BenchError("MQTT 5: mosquitto_pub publishers only")
    per_sub = delivered_target if subs == 1 else delivered_target // subs
    per_pub = per_sub // pubs
    sent = per_pub * pubs
    target = str(size).encode()
    host = ["-h", "127.0.0.1", "-p", str(port), *(["-V", "mqttv5"] if mqtt5 else [])]
    subscribers: list[_Subscriber] = []
    publishers: list[asyncio.subprocess.Process] = []
    raw_tasks: list[asyncio.Task[None]] = []
    try:
        for index in range(subs):
            proc = await asyncio.create_subprocess_exec(
                "mosquitto_sub",
                *host,
                "-t",
                sub_filter,
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
            probe.writer.write(publish_packet(probe_topic.encode(), PROBE))
            await asyncio.sleep(0.03)
        await probe.close()
        await asyncio.sleep(0.05)

        payload = b"x" * size
        lines = (payload + b"\n") * per_pub
        drops0 = await sub_broker.dropped()
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
            waiters: list[asyncio.Task[Any]] = [asyncio.create_task(proc.wait()) for proc in publishers]
        else:
            raw_tasks = [
                asyncio.create_task(
                    raw_publisher(
                        raw_port,
                        raw_header,
                        topic,
                        payload,
                        per_pub,
                        qos,
                        f"{topic}-r{index}",
                        distinct_topics=distinct_topics,
                    )
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
        published_at = published_at or time.perf_counter()
        broker_cpu = sub_broker.cpu_seconds() - broker_cpu0
        for task in feeders:
            task.cancel()
        for task in raw_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise BenchError(f"raw publisher failed: {task.exception()!r}")
        await terminate(publishers + [sub.proc for sub in subscribers])
        client_cpu = children_cpu() - cpu0
        delivered = sum(sub.count for sub in subscribers)
        drops1 = await sub_broker.dropped()
        dropped = None
        if drops0 is not None and drops1 is not None:
            dropped = {reason: n - drops0.get(reason, 0) for reason, n in drops1.items()}
            dropped = {reason: n for reason, n in dropped.items() if n}
        return Flow(
            sent=sent,
            delivered=delivered,
            expected=sent * subs,
            seconds=(last_message - started) if delivered else float("nan"),
            broker_cpu=broker_cpu,
            client_cpu=client_cpu,
            publish_seconds=published_at - started,
            dropped=dropped,
        )
    finally:
        for task in raw_tasks:
            task.cancel()
        await terminate(publishers + [sub.proc for sub in subscribers])
        for sub in subscribers:
            sub.task.cancel()


@dataclass(frozen=True)
class Contender:
    """A contender: a broker (an ``Options.shared`` kind) and how publishers reach it."""

    name: str
    kind: str
    #: "pub": mosquitto_pub processes; "pub5": the same, publisher and subscribers speaking MQTT 5
    #: (``-V mqttv5``); "raw": raw asyncio publishers on the plain listener; "proxy": raw asyncio
    #: publishers on realip-broker's PROXY v1 listener.
    publisher: str = "pub"


OURS = Contender(REALIP, "realip")
PROXY = Contender(f"{REALIP} PROXY v1", "realip", "proxy")
OURS_V5 = Contender(f"{REALIP} MQTT 5", "realip", "pub5")
OURS_UVLOOP = Contender(REALIP_UVLOOP, "realip-uvloop")
REF = Contender(AMQTT, "amqtt")
C_REF = Contender(MOSQ, "mosquitto")
CONTENDERS = [OURS, PROXY, OURS_V5, OURS_UVLOOP, REF, C_REF]
#: The cases the ``--loop uvloop`` and the MQTT 5 contenders run in the throughput table (the time
#: budget): (QoS, payload, flow).
SIDE_CASES = {(0, 64, "1->1"), (1, 64, "1->1")}


def runnable(contenders: list[Contender]) -> list[Contender]:
    """``contenders`` without the ``--loop uvloop`` ones when uvloop is not importable."""
    return [c for c in contenders if c.kind != "realip-uvloop" or uvloop_available()]


PROXY_V1 = build_v1("203.0.113.10", "10.0.0.1", 40000, 1883)


async def _flow_for(
    options: Options,
    contender: Contender,
    pubs: int,
    subs: int,
    size: int,
    qos: int,
    count: int,
    factor: int = FAST_FACTOR,
) -> Flow:
    broker = await options.shared(contender.kind)
    if contender.kind != "amqtt":
        count *= factor
    idle = IDLE_AFTER_PUBLISH[options.quick]
    if contender.publisher == "proxy":
        return await measure_flow(
            broker, pubs, subs, size, qos, count, idle, raw_port=broker.ports["tcp:pp"], raw_header=PROXY_V1
        )
    if contender.publisher == "raw":
        return await measure_flow(broker, pubs, subs, size, qos, count, idle, raw_port=broker.port)
    return await measure_flow(broker, pubs, subs, size, qos, count, idle, mqtt5=contender.publisher == "pub5")


def _round_ratios(mine: list[Flow], ref: list[Flow]) -> list[float]:
    """msg/s ratios taken within each round."""
    return [a.rate / b.rate for a, b in zip(mine, ref, strict=True)]


def _drops(flows: list[Flow]) -> str:
    """realip-broker's queue_full drops summed over the flows ("-": not a realip-broker)."""
    counts = [f.queue_full for f in flows]
    return "-" if not counts or any(c is None for c in counts) else f"{sum(c or 0 for c in counts):,}"


def _cell(flows: list[Flow]) -> str:
    """Median msg/s (median broker CPU share)."""
    if not flows:
        return "-"
    timed = [f for f in flows if f.seconds == f.seconds]
    cpu = median([f.broker_cpu / f.seconds * 100 for f in timed])
    return f"{fmt_rate(median([f.rate for f in flows]))} ({cpu:.0f}%)"


def _clients(flows: list[Flow]) -> str:
    timed = [f for f in flows if f.seconds == f.seconds]
    return f"{median([f.client_cpu / f.seconds * 100 for f in timed]):.0f}%"


def _clean_rate(flows: list[Flow]) -> str:
    """Median msg/s of the rounds without a queue_full drop, and how many ("-": none known)."""
    clean = [f for f in flows if f.queue_full == 0 or (f.queue_full is None and f.share >= 1)]
    if not clean:
        return "- (0)"
    return f"{fmt_rate(median([f.rate for f in clean]))} ({len(clean)})"


def _share(flows: list[Flow]) -> str:
    return f"{min(f.share for f in flows):.0%}" if flows else "-"


async def run_throughput(options: Options) -> list[Table]:
    count = DELIVERED[options.quick]
    rounds = ROUNDS[options.quick]
    cases = list(itertools.product(QOS_LEVELS, PAYLOADS[options.quick], TOPOLOGIES))
    flows: dict[tuple[object, ...], list[Flow]] = {}

    contenders = runnable(CONTENDERS)

    def runs_in(contender: Contender, case: tuple[int, int, tuple[str, int, int]]) -> bool:
        qos, size, (topology, _, _) = case
        return contender not in (OURS_UVLOOP, OURS_V5) or (qos, size, topology) in SIDE_CASES

    if not options.quick:  # warm-up: imports, first allocations, code paths
        for contender in contenders:
            await _flow_for(options, contender, 1, 1, 64, 0, 500)
    for round_index in range(rounds):
        for case_index, case in enumerate(cases):
            qos, size, (topology, pubs, subs) = case
            # Rotate who goes first in each case and round, so that noise hits all alike.
            here = [c for c in contenders if runs_in(c, case)]
            shift = (round_index + case_index) % len(here)
            for contender in here[shift:] + here[:shift]:
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
            "MQTT 5",
            "--loop uvloop",
            AMQTT,
            MOSQ,
            "ours/amqtt",
            "ours/mosq",
            "MQTT 5/amqtt",
            "delivered (ours/PROXY/v5/uvloop/amqtt/mosq)",
            "queue_full drops (ours/PROXY/v5/uvloop)",
            "clients CPU (ours/amqtt/mosq)",
        ],
    )
    for qos, size, (topology, _pubs, _subs) in cases:
        runs = {c.name: flows.get((qos, size, topology, c.name), []) for c in CONTENDERS}

        vs_amqtt = _round_ratios(runs[OURS.name], runs[REF.name])
        vs_mosq = _round_ratios(runs[OURS.name], runs[C_REF.name])
        v5_amqtt = _round_ratios(runs[OURS_V5.name], runs[REF.name]) if runs[OURS_V5.name] else []
        table.add(
            qos,
            f"{size} B",
            topology,
            *(_cell(runs[c.name]) for c in CONTENDERS),
            spread(vs_amqtt),
            spread(vs_mosq),
            spread(v5_amqtt),
            "/".join(_share(runs[c.name]) for c in CONTENDERS),
            "/".join(_drops(runs[c.name]) for c in (OURS, PROXY, OURS_V5, OURS_UVLOOP)),
            "/".join(_clients(runs[c.name]) for c in (OURS, REF, C_REF)),
        )
        if size == 64 and qos == 1 and topology == "1->1":
            options.check(
                "MQTT 5 QoS 1 1->1 64 B msg/s, realip-broker (mosquitto_pub/sub -V mqttv5) / amqtt "
                "(3.1.1) >= 3 (median of per-round ratios)",
                f"{spread(v5_amqtt)} over {rounds} round(s) (throughput table, 'MQTT 5/amqtt'); "
                f"delivered {_share(runs[OURS_V5.name])} / {_share(runs[REF.name])}; 3.1.1 in the same "
                f"rounds {spread(vs_amqtt)}",
                bool(v5_amqtt) and median(v5_amqtt) >= 3,
            )
        criterion = None
        if size == 64 and qos == 1 and topology == "1->1":
            criterion = "QoS 1 1->1 64 B msg/s, realip-broker / amqtt >= 3"
        elif size == 64 and topology == "1->10 fan-out":
            criterion = f"QoS {qos} fan-out 1->10 64 B deliveries/s, realip-broker / amqtt >= 3"
        if criterion:
            options.check(
                criterion + " (median of per-round ratios)",
                f"{spread(vs_amqtt)} over {rounds} round(s) (throughput table); delivered "
                f"{_share(runs[OURS.name])} / {_share(runs[REF.name])}",
                median(vs_amqtt) >= 3,
            )
    table.notes += [
        f"{count:,} messages delivered per case into amqtt (fan-out: {count // 10:,} published x 10 "
        f"subscribers); realip-broker (every column) and mosquitto get {FAST_FACTOR}x as many, so "
        "that their runs too last long enough to time (msg/s is a rate).",
        "msg/s = messages delivered (all subscribers) / (publishers spawned -> last message received).",
        "Clients: mosquitto_pub -l / mosquitto_sub -F %l, one process each (10 for fan-in/fan-out); "
        "QoS 1 publishers keep 20 messages in flight. 'PROXY v1': realip-broker's proxy_protocol "
        "listener fed by raw asyncio publishers (PROXY v1 header + pre-built packets), subscribers on "
        "the plain listener: a different (faster) publisher, so compare it with the ratio table's "
        "raw rows, not with the other columns.",
        f"'{REALIP}' runs on asyncio's own event loop (`serve` without --loop: the default); "
        f"'--loop uvloop' is `{REALIP_UVLOOP}`, only in the 64 B 1->1 rows.",
        f"'MQTT 5': the same '{REALIP}' broker process, mosquitto_pub and mosquitto_sub with "
        "`-V mqttv5` (MQTT 5 CONNECT, SUBSCRIBE and PUBLISH with their properties, per-delivery "
        "MQTT 5 properties), only in the 64 B 1->1 rows; 'MQTT 5/amqtt' compares it with amqtt fed "
        "the same way over 3.1.1 (amqtt 0.12.1 speaks no MQTT 5).",
        "ours/amqtt, ours/mosq, MQTT 5/amqtt: msg/s ratios taken within each round, median [min-max] "
        "over rounds.",
        "Broker CPU near 100% of one core means the (single-threaded) broker is the bottleneck. Below "
        "that, the 2 cores are shared out: clients CPU (all client processes and this one's pipe "
        "reading, % of one core) shows where the rest went. Here realip-broker, like mosquitto, mostly "
        "stays below 100%: its figures too are bound by the clients on this 2-core machine, so "
        "ours/mosq says 'as fast as these clients go', not the brokers' capacity ratio.",
        "delivered = worst share of sent messages that arrived over the rounds. realip-broker queues "
        "deliveries for a subscriber whose transport is paused (and QoS 1 beyond its 32 in flight) up "
        "to 1,000 (mqtt.max_mqueue_len), then drops the oldest, QoS 1 too; a publisher is never "
        "slowed. amqtt and mosquitto (max_queued_messages 0 here) buffer without bound instead. "
        "'queue_full drops' is realip-broker's own counter over all rounds of the row. A row with "
        "drops measures the rate the subscriber received (delivered / time), not what the broker "
        "could carry, and its ours/amqtt compares a bounded broker that dropped with one that "
        "buffered everything: fan-in (10 publishers, one mosquitto_sub) is such a row.",
    ]
    if not uvloop_available():
        table.notes.append(UVLOOP_MISSING + "; its column is empty.")
    return [table]


RAW_OURS = Contender(f"raw->{REALIP}", "realip", "raw")
RAW_UVLOOP = Contender(f"raw->{REALIP_UVLOOP}", "realip-uvloop", "raw")
RATIO_CONTENDERS = [
    OURS,
    OURS_UVLOOP,
    OURS_V5,
    REF,
    C_REF,
    RAW_OURS,
    RAW_UVLOOP,
    PROXY,
    Contender("raw->amqtt", "amqtt", "raw"),
    Contender("raw->mosquitto", "mosquitto", "raw"),
]


async def run_ratio(options: Options) -> list[Table]:
    """QoS 0, 1->1, 64 bytes over alternating rounds: realip-broker (default loop, uvloop, MQTT 5,
    PROXY listener) against amqtt and mosquitto, each with the same publisher."""
    rounds = RATIO_ROUNDS[options.quick]
    count = RATIO_MESSAGES[options.quick]
    contenders = runnable(RATIO_CONTENDERS)
    flows: dict[str, list[Flow]] = {c.name: [] for c in contenders}
    for round_index in range(rounds):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            flow = await _flow_for(options, contender, 1, 1, 64, 0, count, RATIO_FAST_FACTOR)
            flows[contender.name].append(flow)

    def same_publisher(contender: Contender, kind: str) -> str:
        """The reference fed by the same publisher binary (the MQTT 5 row: its 3.1.1 self)."""
        pub = "pub" if contender.publisher in ("pub", "pub5") else "raw"
        return next(c.name for c in contenders if c.kind == kind and c.publisher == pub)

    table = Table(
        f"QoS 0 1->1 64 B: realip-broker against amqtt and mosquitto, {rounds} alternating rounds",
        [
            "contender",
            "publisher",
            "msg/s per round",
            "median msg/s",
            "delivered",
            "queue_full drops",
            "median msg/s, rounds without drops",
            "vs amqtt, same publisher",
            "vs mosquitto, same publisher",
            "broker CPU us/msg",
            "broker CPU",
        ],
    )
    publisher_names = {
        "pub": "mosquitto_pub",
        "pub5": "mosquitto_pub -V mqttv5",
        "raw": "raw asyncio",
        "proxy": "raw asyncio + PROXY v1",
    }
    ratios: dict[tuple[str, str], list[float]] = {}
    for contender in contenders:
        got = flows[contender.name]
        for kind in ("amqtt", "mosquitto"):
            ratios[contender.name, kind] = _round_ratios(got, flows[same_publisher(contender, kind)])
        timed = [f for f in got if f.seconds == f.seconds]
        table.add(
            contender.name,
            publisher_names[contender.publisher],
            " ".join(fmt_rate(f.rate) for f in got),
            fmt_rate(median([f.rate for f in got])),
            f"{min(f.share for f in got):.0%}",
            _drops(got),
            _clean_rate(got),
            spread(ratios[contender.name, "amqtt"]),
            spread(ratios[contender.name, "mosquitto"]),
            f"{median([f.cpu_us() for f in got]):.1f}",
            f"{median([f.broker_cpu / f.seconds for f in timed]):.0%}",
        )
    ours = flows[OURS.name]
    cpu_note = (
        f"broker CPU {median([f.cpu_us() for f in ours]):.1f} vs {{other:.1f}} us/msg; worst round "
        f"delivered {min(f.share for f in ours):.0%}, {_drops(ours)} queue_full drops in all; "
        f"rounds without drops: {_clean_rate(ours)} vs {{other_rate}} msg/s"
    )
    options.check(
        "QoS 0 1->1 64 B msg/s, realip-broker / amqtt >= 5 (mosquitto_pub -> mosquitto_sub, "
        "median of per-round ratios)",
        f"{spread(ratios[OURS.name, 'amqtt'])} over {rounds} rounds; "
        + cpu_note.format(
            other=median([f.cpu_us() for f in flows[REF.name]]),
            other_rate=fmt_rate(median([f.rate for f in flows[REF.name]])),
        ),
        median(ratios[OURS.name, "amqtt"]) >= 5,
    )
    options.check(
        "QoS 0 1->1 64 B msg/s, realip-broker / mosquitto >= 0.5 (same clients, median of per-round ratios)",
        f"{spread(ratios[OURS.name, 'mosquitto'])} over {rounds} rounds; "
        + cpu_note.format(
            other=median([f.cpu_us() for f in flows[C_REF.name]]),
            other_rate=fmt_rate(median([f.rate for f in flows[C_REF.name]])),
        ),
        median(ratios[OURS.name, "mosquitto"]) >= 0.5,
    )
    v5 = flows[OURS_V5.name]
    options.check(
        "MQTT 5 QoS 0 1->1 64 B msg/s, realip-broker (mosquitto_pub/sub -V mqttv5) / amqtt (3.1.1, "
        "mosquitto_pub -> mosquitto_sub) >= 5 (median of per-round ratios)",
        f"{spread(ratios[OURS_V5.name, 'amqtt'])} over {rounds} rounds; broker CPU "
        f"{median([f.cpu_us() for f in v5]):.1f} vs {median([f.cpu_us() for f in flows[REF.name]]):.1f} "
        f"us/msg; worst round delivered {min(f.share for f in v5):.0%}, {_drops(v5)} queue_full drops "
        f"in all; 3.1.1 in the same rounds {spread(ratios[OURS.name, 'amqtt'])}",
        median(ratios[OURS_V5.name, "amqtt"]) >= 5,
    )
    table.notes += [
        f"{count:,} messages per round into amqtt, {count * RATIO_FAST_FACTOR:,} into realip-broker and "
        "mosquitto (runs of about half a second or more). Publishers: mosquitto_pub -l, or the raw "
        "asyncio publisher (pre-built packets in batches of 256; faster than mosquitto_pub); the "
        "subscriber is mosquitto_sub in every row.",
        "Ratios are taken within one round (the runs of a round are back to back; the order rotates "
        "each round), then median [min-max] over rounds; each row is compared with the reference fed "
        "by the same kind of publisher.",
        f"'{OURS_V5.name}': the '{REALIP}' broker process, publisher and subscriber speaking MQTT 5 "
        "(mosquitto_pub / mosquitto_sub -V mqttv5); amqtt 0.12.1 and mosquitto are its references "
        "over 3.1.1 with the same binaries (mosquitto_pub -> mosquitto_sub).",
        f"'{REALIP}' runs on asyncio's own loop (the default); '{REALIP_UVLOOP}' on uvloop.",
        "broker CPU us/msg = the broker process's CPU time (/proc/PID/stat) / messages delivered, "
        "median over rounds: what a message costs the broker, whether or not the clients keep it "
        "busy. broker CPU = its share of one core while the flow ran: below 100% the clients, not "
        "the broker, set the rate.",
        "queue_full drops: realip-broker's own counter (/metrics) over all rounds: QoS 0 deliveries "
        "dropped because the subscriber's transport stayed paused with 1,000 queued. A round with "
        "drops measures delivered / time, the subscriber's share, not the broker's capacity; "
        "'rounds without drops' is the median over the other rounds (how many in brackets; for "
        "amqtt and mosquitto, which do not drop here, the rounds that delivered everything). The "
        "ratios and the criteria use every round.",
    ]

    if not uvloop_available():
        table.notes.append(UVLOOP_MISSING + ".")
        options.check(
            "uvloop: realip-broker --loop uvloop vs the default (asyncio's loop), side by side "
            "(measured, no bound)",
            "not measured: uvloop is not importable",
            False,
        )
        return [table]
    uv = Table(
        "What uvloop gives: realip-broker on uvloop (--loop uvloop) / on asyncio's loop (default), "
        "same rounds",
        [
            "publisher",
            "asyncio msg/s",
            "uvloop msg/s",
            "msg/s ratio uvloop/asyncio",
            "asyncio CPU us/msg",
            "uvloop CPU us/msg",
            "CPU ratio asyncio/uvloop",
            "queue_full drops asyncio/uvloop",
        ],
    )
    for default, uvl in ((OURS, OURS_UVLOOP), (RAW_OURS, RAW_UVLOOP)):
        a, b = flows[default.name], flows[uvl.name]
        cpu_ratios = [x.cpu_us() / y.cpu_us() for x, y in zip(a, b, strict=True)]
        uv.add(
            "mosquitto_pub" if default is OURS else "raw asyncio",
            fmt_rate(median([f.rate for f in a])),
            fmt_rate(median([f.rate for f in b])),
            spread(_round_ratios(b, a)),
            f"{median([f.cpu_us() for f in a]):.1f}",
            f"{median([f.cpu_us() for f in b]):.1f}",
            spread(cpu_ratios),
            f"{_drops(a)}/{_drops(b)}",
        )
    uv.notes.append(
        "The rows of the table above, paired within each round; msg/s ratio > 1: uvloop carried more; "
        "CPU ratio > 1: asyncio's loop spends more CPU per message than uvloop."
    )
    a, b = flows[OURS.name], flows[OURS_UVLOOP.name]
    cpu_ratio = median([x.cpu_us() / y.cpu_us() for x, y in zip(a, b, strict=True)])
    options.check(
        "uvloop: realip-broker --loop uvloop vs the default (asyncio's loop), side by side "
        "(measured, no bound)",
        f"msg/s uvloop/asyncio {spread(_round_ratios(b, a))}; CPU per message asyncio/uvloop "
        f"{cpu_ratio:.2f}; queue_full drops asyncio/uvloop {_drops(a)}/{_drops(b)}",
        all(f.delivered for f in a + b),
    )
    return [table, uv]


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--only", "throughput", "ratio", *sys.argv[1:]]))
