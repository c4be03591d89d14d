"""What stored filters cost a PUBLISH: N = 20 and 20,000 unrelated filters, three brokers.

One client (raw asyncio, in this process) holds N filters ``dev/<i>/+/status`` that no message of
the benchmark matches; meanwhile a QoS 0 1->1 64-byte flow runs on other topics and is measured as
in the throughput benchmark (``bench_throughput.measure_flow``). Every broker runs twice, one
process holding 20 filters and one holding 20,000, all six started before the first round, so the
rounds alternate between them (order rotated each round) and the ratio N=20,000 / N=20 is taken
within a round.

Two flows per broker and round:

- ``one topic``: mosquitto_pub -l -> mosquitto_sub on one topic (as the throughput benchmark).
  realip-broker caches a topic's subscriber list until the subscriptions change, so after the
  first message this measures the cache, not the subscription trie.
- ``a new topic per message``: a raw asyncio publisher sends message ``i`` to ``bench/TAG/i``, the
  subscriber holds ``bench/TAG/#``: every PUBLISH is a topic the broker has not seen, so each one
  is matched against the stored filters (realip-broker: the trie; amqtt: a scan of every filter;
  mosquitto: its topic tree).

    python bench/run.py --only filters [--quick]
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from bench_throughput import Flow, measure_flow
from benchlib import (
    AMQTT,
    MOSQ,
    REALIP,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    fmt_rate,
    median,
    read_packet,
    remaining_length,
    spread,
    start_amqtt,
    start_mosquitto,
    start_realip,
)

COUNTS = [20, 20_000]
#: Filters per SUBSCRIBE packet while the holder subscribes.
PER_PACKET = 500
ROUNDS = {False: 3, True: 1}
#: Messages per flow: (realip-broker and mosquitto, amqtt with 20 filters, amqtt with 20,000).
MESSAGES = {False: (48_000, 6_000, 100), True: (6_000, 1_500, 20)}
IDLE_AFTER = {False: 1.0, True: 0.3}
#: "About the same cost": the flow with 20,000 filters keeps at least this share of the msg/s of
#: the flow with 20, and spends at most this factor of its broker CPU per PUBLISH.
RATE_BOUND = 0.8
CPU_BOUND = 1.25
KINDS = [("realip", REALIP), ("amqtt", AMQTT), ("mosquitto", MOSQ)]
VARIANTS = [("one topic", False), ("a new topic per message", True)]


def subscribe_many(filters: list[str], packet_id: int) -> bytes:
    """One SUBSCRIBE packet (QoS 0) for every filter of ``filters``."""
    body = packet_id.to_bytes(2, "big")
    for topic_filter in filters:
        raw = topic_filter.encode()
        body += len(raw).to_bytes(2, "big") + raw + b"\x00"
    return b"\x82" + remaining_length(len(body)) + body


@dataclass
class Holder:
    """A broker process and the client holding its N filters."""

    kind: str
    label: str
    filters: int
    broker: Broker
    client: RawClient
    subscribe_seconds: float
    rss_kb: int


async def hold(broker: Broker, kind: str, label: str, count: int) -> Holder:
    client = await RawClient.connect(broker.port, f"filter-holder-{count}")
    filters = [f"dev/{i}/+/status" for i in range(count)]
    started = time.perf_counter()
    packets = 0
    for start in range(0, count, PER_PACKET):
        packets += 1
        client.writer.write(subscribe_many(filters[start : start + PER_PACKET], packets))
    granted = 0
    for _ in range(packets):
        first, body = await asyncio.wait_for(read_packet(client.reader), 60)
        if first != 0x90:
            raise BenchError(f"{label}: expected SUBACK, got packet type {first >> 4}")
        granted += sum(1 for code in body[2:] if code == 0)
    if granted != count:
        raise BenchError(f"{label}: {granted} of {count} filters granted")
    seconds = time.perf_counter() - started
    await asyncio.sleep(0.2)
    return Holder(kind, label, count, broker, client, seconds, broker.rss_kb())


async def _start(kind: str) -> Broker:
    if kind == "realip":
        return await start_realip()
    if kind == "amqtt":
        return await start_amqtt()
    return await start_mosquitto()


def _messages(options: Options, holder: Holder) -> int:
    fast, amqtt_few, amqtt_many = MESSAGES[options.quick]
    if holder.kind != "amqtt":
        return fast
    return amqtt_few if holder.filters < 1000 else amqtt_many


async def run(options: Options) -> list[Table]:
    rounds = ROUNDS[options.quick]
    holders: list[Holder] = []
    try:
        for kind, label in KINDS:
            for count in COUNTS:
                broker = await _start(kind)
                try:
                    holders.append(await hold(broker, kind, label, count))
                except BaseException:
                    await broker.stop()
                    raise
        # Warm-up (imports, first allocations, code paths), one short flow per broker.
        for holder in holders if not options.quick else []:
            await measure_flow(holder.broker, 1, 1, 64, 0, 200 if holder.filters < 1000 else 20, 0.5)
        flows: dict[tuple[str, int, str], list[Flow]] = {}
        for round_index in range(rounds):
            for variant, distinct in VARIANTS:
                shift = round_index % len(holders)
                for holder in holders[shift:] + holders[:shift]:
                    broker = holder.broker
                    flow = await measure_flow(
                        broker,
                        1,
                        1,
                        64,
                        0,
                        _messages(options, holder),
                        IDLE_AFTER[options.quick],
                        raw_port=broker.port if distinct else None,
                        distinct_topics=distinct,
                    )
                    flows.setdefault((holder.kind, holder.filters, variant), []).append(flow)
    finally:
        for holder in holders:
            await holder.client.close()
            await holder.broker.stop()

    few, many = COUNTS
    table = Table(
        f"A PUBLISH with {few} vs {many:,} unrelated filters stored (QoS 0 1->1 64 B, {rounds} "
        "alternating round(s))",
        [
            "broker",
            "flow",
            f"msg/s, {few} filters",
            f"msg/s, {many:,}",
            f"msg/s ratio {many:,}/{few}",
            f"CPU us/PUBLISH, {few}",
            f"CPU us/PUBLISH, {many:,}",
            f"CPU ratio {many:,}/{few}",
            "delivered",
            "queue_full drops",
        ],
    )
    for kind, label in KINDS:
        for variant, _ in VARIANTS:
            a, b = flows[kind, few, variant], flows[kind, many, variant]
            rate_ratios = [y.rate / x.rate for x, y in zip(a, b, strict=True)]
            cpu_ratios = [y.cpu_us("sent") / x.cpu_us("sent") for x, y in zip(a, b, strict=True)]
            drops = [f.queue_full for f in a + b]
            table.add(
                label,
                variant,
                fmt_rate(median([f.rate for f in a])),
                fmt_rate(median([f.rate for f in b])),
                spread(rate_ratios),
                f"{median([f.cpu_us('sent') for f in a]):.1f}",
                f"{median([f.cpu_us('sent') for f in b]):,.1f}",
                spread(cpu_ratios),
                f"{min(f.share for f in a):.0%} / {min(f.share for f in b):.0%}",
                "-" if any(d is None for d in drops) else f"{sum(d or 0 for d in drops):,}",
            )
            if kind == "realip":
                options.check(
                    f"a PUBLISH with {many:,} filters stored costs about what it costs with {few} "
                    f"({variant}: msg/s ratio >= {RATE_BOUND}, CPU per PUBLISH ratio <= {CPU_BOUND})",
                    f"msg/s {spread(rate_ratios)}, CPU/PUBLISH {spread(cpu_ratios)}; amqtt: msg/s "
                    + spread(
                        [
                            y.rate / x.rate
                            for x, y in zip(
                                flows["amqtt", few, variant], flows["amqtt", many, variant], strict=True
                            )
                        ]
                    ),
                    median(rate_ratios) >= RATE_BOUND and median(cpu_ratios) <= CPU_BOUND,
                )
    setup = Table(
        "Holding the filters",
        ["broker", "filters", "SUBSCRIBE time (s)", "RSS with the filters (MiB)", "messages per flow"],
    )
    for holder in holders:
        setup.add(
            holder.label,
            f"{holder.filters:,}",
            f"{holder.subscribe_seconds:.2f}",
            f"{holder.rss_kb / 1024:.1f}",
            f"{_messages(options, holder):,}",
        )
    table.notes += [
        f"One client holds the N filters dev/<i>/+/status ({PER_PACKET} per SUBSCRIBE), none of which "
        "matches a message of the flow; each broker and N is its own process, all running during the "
        "rounds; ratios are taken within a round, then median [min-max].",
        "'one topic': mosquitto_pub -l -> mosquitto_sub on one topic; realip-broker serves it from its "
        "route cache (a topic's subscriber list, emptied when subscriptions change). 'a new topic per "
        "message': raw asyncio publisher, message i to bench/TAG/i, subscriber on bench/TAG/#: every "
        "PUBLISH is matched against the stored filters.",
        "CPU us/PUBLISH = broker CPU time / messages published (delivered or not); msg/s = delivered / "
        "time, as in the throughput table. amqtt gets fewer messages (its runs would take minutes).",
        "queue_full drops: realip-broker's own counter over the rounds of the row (QoS 0 to a "
        "subscriber whose transport stayed paused with 1,000 queued); with drops msg/s is the "
        "subscriber's received rate, the CPU figure still counts every PUBLISH.",
    ]
    return [table, setup]


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--only", "filters", *sys.argv[1:]]))
