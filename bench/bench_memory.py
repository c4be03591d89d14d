"""Resident memory per idle connection: realip-broker through a PROXY listener, amqtt, mosquitto.

Each broker is started fresh. Its RSS (``VmRSS`` of /proc/PID/status) is read with no client, then
after 1,000 and 10,000 concurrent idle connections (quick: 1,000 only), each opened by a raw asyncio
client in this process: PROXY v1 header (realip-broker's ``proxy_protocol: true`` listener only),
CONNECT with keepalive 0 (never pinged, never timed out), CONNACK awaited; 100 connects in flight.
Per connection = (RSS_N - RSS_0) / N. The broker is killed once measured, then the sockets dropped.

RLIMIT_NOFILE is raised (to 20,000 at most, the hard limit here) before any broker is spawned, so
brokers and client both can hold 10,000 sockets.

    python bench/run.py --only memory [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from benchlib import (
    AMQTT,
    MOSQ,
    REALIP,
    BenchError,
    Broker,
    Options,
    RawClient,
    Table,
    fmt_ratio,
    raise_nofile,
    start_amqtt,
    start_mosquitto,
    start_realip,
)

from listeners.proxy_protocol import build_v1

COUNTS = {False: [1_000, 10_000], True: [1_000]}
CONCURRENCY = 100
SETTLE = 1.0  # seconds after the last CONNACK before RSS is read

PP_ONLY = """\
listeners:
  tcp:
    default: {bind: "127.0.0.1:0"}
    pp: {bind: "127.0.0.1:0", proxy_protocol: true}
  ws:
    default: {enable: false}
admin: {listen: ""}
"""


async def _open(port: int, header: bytes, start: int, stop: int, clients: list[RawClient]) -> None:
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> None:
        async with semaphore:
            header_i = header.replace(b"40000", str(10000 + index % 50000).encode()) if header else b""
            clients.append(await RawClient.connect(port, f"idle-{index}", header=header_i, keepalive=0))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(start, stop))), 180)


async def measure(
    broker: Broker, port: int, header: bytes, counts: list[int]
) -> list[tuple[int, int, float]]:
    """[(connections, RSS KiB, connects/s)] starting with (0, RSS_0, nan)."""
    await asyncio.sleep(SETTLE)
    points = [(0, broker.rss_kb(), float("nan"))]
    clients: list[RawClient] = []
    try:
        opened = 0
        for count in counts:
            started = time.perf_counter()
            await _open(port, header, opened, count, clients)
            rate = (count - opened) / (time.perf_counter() - started)
            opened = count
            await asyncio.sleep(SETTLE)
            if broker.process.returncode is not None:
                raise BenchError(f"{broker.label} exited with {count} connections")
            points.append((count, broker.rss_kb(), rate))
    finally:
        await broker.stop(kill=True)
        for client in clients:
            with contextlib.suppress(Exception):
                client.writer.transport.abort()
        await asyncio.sleep(0.1)
    return points


async def run(options: Options) -> list[Table]:
    counts = COUNTS[options.quick]
    limit = raise_nofile()
    if limit < max(counts) + 500:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: cannot hold {max(counts)} connections")
    header = build_v1("203.0.113.10", "10.0.0.1", 40000, 1883)
    results: dict[str, list[tuple[int, int, float]]] = {}
    realip = await start_realip(PP_ONLY, label=REALIP)
    results[f"{REALIP} (PROXY v1 listener)"] = await measure(realip, realip.ports["tcp:pp"], header, counts)
    amqtt = await start_amqtt()
    results[f"{AMQTT} (own listener)"] = await measure(amqtt, amqtt.port, b"", counts)
    mosq = await start_mosquitto()
    results[MOSQ] = await measure(mosq, mosq.port, b"", counts)

    columns = ["broker", "RSS idle"]
    for count in counts:
        columns += [f"RSS @ {count:,}", f"KiB/conn @ {count:,}"]
    columns += ["connects/s", "vs amqtt"]
    table = Table("Resident memory per idle connection", columns)
    per_conn: dict[str, float] = {}
    for label, points in results.items():
        base = points[0][1]
        row: list[str] = [label, f"{base / 1024:.1f} MiB"]
        for count, rss, _rate in points[1:]:
            row += [f"{rss / 1024:.1f} MiB", f"{(rss - base) / count:.1f}"]
        per_conn[label] = (points[-1][1] - base) / points[-1][0]
        row.append(" / ".join(f"{rate:,.0f}" for _, _, rate in points[1:]))
        row.append("")
        table.rows.append(row)
    ours = results[f"{REALIP} (PROXY v1 listener)"]
    if counts[-1] >= 10_000:
        options.check(
            f"{counts[-1]:,} concurrent idle connections through a PROXY listener hold, memory reported",
            f"{ours[-1][0]:,} held, {(ours[-1][1] - ours[0][1]) / ours[-1][0]:.1f} KiB/conn",
            ours[-1][0] == counts[-1],
        )
    amqtt_per = per_conn[f"{AMQTT} (own listener)"]
    for row, label in zip(table.rows, results, strict=True):
        row[-1] = fmt_ratio(per_conn[label] / amqtt_per)
    table.notes += [
        "RSS = VmRSS of the broker process; KiB/conn = (RSS_N - RSS_idle) / N; 'vs amqtt' compares "
        f"KiB/conn at {counts[-1]:,}.",
        "Connections: one asyncio process, 100 connects in flight, CONNECT keepalive 0 (idle for ever), "
        "connects/s = rate of opening each batch (to 1k, then to 10k).",
    ]
    return [table]


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--only", "memory", *sys.argv[1:]]))
