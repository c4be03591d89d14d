"""Resident memory per idle connection: realip-broker through a PROXY listener, amqtt, mosquitto.

Each broker is started fresh. Its RSS (``VmRSS`` of /proc/PID/status) is read with no client, then
after 1,000 and 10,000 concurrent idle connections (quick: 1,000 only), each opened by a raw asyncio
client in this process: PROXY v1 header (realip-broker's ``proxy_protocol: true`` listener only),
CONNECT with keepalive 0 (never pinged, never timed out), CONNACK awaited; 100 connects in flight.
Per connection = (RSS_N - RSS_0) / N. The broker is killed once measured, then the sockets dropped.
realip-broker is measured on asyncio's own loop (the default) and on uvloop (``--loop uvloop``,
skipped when uvloop is not importable).

Where realip-broker's bytes go: the broker is run once more under ``tracemalloc`` (this file as
its launcher, ``--child``), with a snapshot at 0 and at ``TRACED`` idle PROXY connections; the
difference, grouped by the line that allocated, is what one connection costs in Python-allocated
memory (objects, the transports among them: asyncio's are Python objects, and uvloop allocates its
handles through Python's allocator too). The rest of the RSS per connection is outside Python's
allocator (libc, the kernel's view of the pages).

RLIMIT_NOFILE is raised (to 20,000 at most, the hard limit here) before any broker is spawned, so
brokers and client both can hold 10,000 sockets.

    python bench/run.py --only memory [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchlib import (
    AMQTT,
    BENCH,
    MOSQ,
    PYTHON,
    REALIP,
    REALIP_SRC,
    REALIP_UVLOOP,
    UVLOOP_MISSING,
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
    uvloop_available,
)

from listeners.proxy_protocol import build_v1

COUNTS = {False: [1_000, 10_000], True: [1_000]}
CONCURRENCY = 100
#: Seconds after the last CONNACK before RSS is read, full and quick.
SETTLE = {False: 1.0, True: 0.3}
#: Idle connections of the tracemalloc run, full and quick; allocation sites shown.
TRACED = {False: 2_000, True: 500}
TOP_SITES = 12
#: The issue's bound and its aim, KiB of RSS per idle connection at 10,000 through a PROXY listener.
BOUND_KIB, AIM_KIB = 8.0, 4.0

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
    broker: Broker, port: int, header: bytes, counts: list[int], settle: float = SETTLE[False]
) -> list[tuple[int, int, float]]:
    """[(connections, RSS KiB, connects/s)] starting with (0, RSS_0, nan)."""
    await asyncio.sleep(settle)
    points = [(0, broker.rss_kb(), float("nan"))]
    clients: list[RawClient] = []
    try:
        opened = 0
        for count in counts:
            started = time.perf_counter()
            await _open(port, header, opened, count, clients)
            rate = (count - opened) / (time.perf_counter() - started)
            opened = count
            await asyncio.sleep(settle)
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
    settle = SETTLE[options.quick]
    limit = raise_nofile()
    if limit < max(counts) + 500:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: cannot hold {max(counts)} connections")
    header = build_v1("203.0.113.10", "10.0.0.1", 40000, 1883)
    results: dict[str, list[tuple[int, int, float]]] = {}
    realip = await start_realip(PP_ONLY, label=REALIP)
    ours_label = f"{REALIP} (PROXY v1 listener, {realip.loop})"
    results[ours_label] = await measure(realip, realip.ports["tcp:pp"], header, counts, settle)
    if uvloop_available():
        realip = await start_realip(PP_ONLY, label=REALIP_UVLOOP, loop="uvloop")
        results[f"{REALIP_UVLOOP} (PROXY v1 listener)"] = await measure(
            realip, realip.ports["tcp:pp"], header, counts, settle
        )
    amqtt = await start_amqtt()
    results[f"{AMQTT} (own listener)"] = await measure(amqtt, amqtt.port, b"", counts, settle)
    mosq = await start_mosquitto()
    results[MOSQ] = await measure(mosq, mosq.port, b"", counts, settle)

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
    ours = results[ours_label]
    ours_per = (ours[-1][1] - ours[0][1]) / ours[-1][0]
    at = f"{ours[-1][0]:,} idle connections held through the PROXY v1 listener"
    for bound, what in ((BOUND_KIB, "the bound"), (AIM_KIB, "the aim beyond")):
        options.check(
            f"<= {bound:g} KiB RSS per idle connection at 10,000 through a PROXY listener ({what})",
            f"{ours_per:.1f} KiB/conn ({at}, {realip_loop(ours_label)})",
            ours_per <= bound and counts[-1] >= 10_000 and ours[-1][0] == counts[-1],
        )
    amqtt_per = per_conn[f"{AMQTT} (own listener)"]
    for row, label in zip(table.rows, results, strict=True):
        row[-1] = fmt_ratio(per_conn[label] / amqtt_per)
    table.notes += [
        "RSS = VmRSS of the broker process; KiB/conn = (RSS_N - RSS_idle) / N; 'vs amqtt' compares "
        f"KiB/conn at {counts[-1]:,}.",
        "Connections: one asyncio process, 100 connects in flight, CONNECT keepalive 0 (idle for ever), "
        "connects/s = rate of opening each batch (to 1k, then to 10k).",
        f"realip-broker's loop as it logged it (asyncio's, the default); '{REALIP_UVLOOP}' is the same "
        "broker on uvloop (its transports are C; asyncio's are Python objects).",
    ]
    if not uvloop_available():
        table.notes.append(UVLOOP_MISSING + ".")
    return [table, await traced(TRACED[options.quick], header, settle)]


def realip_loop(label: str) -> str:
    return "uvloop" if "uvloop" in label else "asyncio" if "asyncio" in label else "?"


# --------------------------------------------------------------------------------------------------
# Where the bytes go: the broker under tracemalloc


def child(snapshots: str, args: list[str]) -> int:
    """The broker's own command line, traced from the first import; SIGUSR1 writes a snapshot."""
    tracemalloc.start(1)
    taken = [0]

    def snapshot(*_: object) -> None:
        taken[0] += 1
        path = Path(snapshots) / f"{taken[0]}.snap"
        tracemalloc.take_snapshot().dump(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    signal.signal(signal.SIGUSR1, snapshot)
    sys.path.insert(0, str(REALIP_SRC[0]))
    from broker.cli import main

    return main(args)


async def _snapshot(broker: Broker, directory: Path, index: int) -> tracemalloc.Snapshot:
    os.kill(broker.pid, signal.SIGUSR1)
    path = directory / f"{index}.snap"
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline or broker.process.returncode is not None:
            raise BenchError("the traced broker wrote no snapshot")
        await asyncio.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


def _site(frame: tracemalloc.Frame, loop: str) -> tuple[str, str]:
    """(``file:line``, its code) of an allocation site."""
    name = frame.filename
    for marker in ("site-packages/", "/lib/python3.11/", str(REALIP_SRC[0]) + "/"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    code = linecache.getline(frame.filename, frame.lineno).strip()
    if loop == "uvloop" and name.startswith("asyncio/runners.py"):
        code = "uvloop's C code, no Python frame: transport, libuv handle, socket objects"
    return f"{name}:{frame.lineno}", code[:70]


async def traced(count: int, header: bytes, settle: float) -> Table:
    """realip-broker (default loop) under tracemalloc: Python-allocated bytes per idle connection."""
    directory = Path(tempfile.mkdtemp(prefix="bench-traced-"))
    launcher = [PYTHON, str(BENCH / "bench_memory.py"), "--child", str(directory), "--"]
    broker = await start_realip(PP_ONLY, label=REALIP, launcher=launcher)
    clients: list[RawClient] = []
    try:
        await asyncio.sleep(settle)
        before = await _snapshot(broker, directory, 1)
        await _open(broker.ports["tcp:pp"], header, 0, count, clients)
        await asyncio.sleep(settle)
        after = await _snapshot(broker, directory, 2)
    finally:
        await broker.stop(kill=True)
        for client in clients:
            with contextlib.suppress(Exception):
                client.writer.transport.abort()
        for path in directory.glob("*"):
            path.unlink()
        directory.rmdir()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
    total = sum(stat.size_diff for stat in stats)
    table = Table(
        f"Where an idle connection's Python-allocated bytes go ({REALIP}, {broker.loop}, tracemalloc, "
        f"{count:,} PROXY v1 connections)",
        ["allocated at", "code", "bytes/conn", "blocks/conn", "share"],
    )
    for stat in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:TOP_SITES]:
        table.add(
            *_site(stat.traceback[0], broker.loop),
            f"{stat.size_diff / count:,.0f}",
            f"{stat.count_diff / count:.1f}",
            f"{stat.size_diff / total:.0%}" if total else "-",
        )
    table.add(
        "**all sites**",
        "",
        f"{total / count:,.0f}",
        f"{sum(s.count_diff for s in stats) / count:.1f}",
        "100%",
    )
    table.notes += [
        "tracemalloc snapshot at 0 and at N idle connections, difference per connection, by the line "
        "of Python (or, for code without a Python frame, the nearest one) that allocated; uvloop "
        "allocates its handles with Python's allocator too, so they are in the sum.",
        "The sum is Python-allocated memory only, and not the same measure as RSS per connection "
        "(table above): RSS also holds allocator overhead and memory outside Python's allocator, but "
        "grows less where new objects reuse memory freed after start-up.",
    ]
    return table


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    from run import main

    sys.exit(main(["--only", "memory", *sys.argv[1:]]))
