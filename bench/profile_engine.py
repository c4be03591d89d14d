"""Profile of the message path: QoS 0, 1->1, 64-byte messages through the broker.

The broker runs as in the benchmarks (its own process, started the same way), and
``mosquitto_pub -l`` -> ``mosquitto_sub`` push QoS 0 messages through it while it is profiled.
realip-broker is fed at a steady ``PACE`` msg/s (mosquitto_pub's stdin written in 10 ms batches),
below what the subscriber takes, so that the profile is of the delivery path itself, not of a
subscriber falling behind (queueing and ``queue_full`` drops); amqtt, which cannot carry that
much, is fed as fast as it takes.

- ``--profiler py-spy`` (default when installed: ``pip install py-spy``): the unmodified broker
  sampled by py-spy (``SAMPLE_RATE``/s), by function; C code (socket send, Task creation) is
  charged to the Python function calling it. Under uvloop the event loop itself is C: its work
  (epoll, recv/send, calling the protocols) shows as own samples of ``Runner.run``, the last
  Python frame below it. Low overhead (~5%), no call counts.
- ``--profiler cprofile`` (default without py-spy): the broker process runs its usual command
  line under cProfile, switched on (SIGUSR1) when publishing starts and off (SIGUSR2, stats
  written) when the last message has arrived, so start-up is not in the figures. cProfile slows
  Python code ~2x and counts each resumption of a coroutine as a call: use it for *where*, not for
  absolute speed.

Engines: ``realip`` (realip-broker as served by default: asyncio's own loop and transports, which
py-spy can see into), ``realip-uvloop`` (``serve --loop uvloop``; left out of the default engines when
uvloop is not importable) and plain amqtt 0.12.1 (its own TCP listener), so that the cost of each
layer shows.

    python bench/profile_engine.py [--quick] [--profiler cprofile|py-spy]
        [--engine realip realip-uvloop amqtt] [--seconds S] [--top 15] [--save DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench_latency import _pace
from bench_throughput import PROBE, _Subscriber, measure_flow
from benchlib import (
    ADMIN_SOCKET,
    AMQTT,
    BENCH,
    PYTHON,
    REALIP,
    REALIP_UVLOOP,
    REPO,
    UVLOOP_MISSING,
    BenchError,
    Broker,
    RawClient,
    publish_packet,
    require_peers,
    start_amqtt,
    start_realip,
    terminate,
    uvloop_available,
)

#: realip-broker's steady load (msg/s) and how long it is profiled (s), full and quick.
PACE = 50_000
SECONDS = {False: 4.0, True: 0.5}
#: amqtt's messages (as fast as it takes them), full and quick.
AMQTT_MESSAGES = {False: 30_000, True: 2_000}
SAMPLE_RATE = 500

CONFIG = f"""\
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
  ws:
    default: {{enable: false}}
admin: {{listen: "unix:{ADMIN_SOCKET}"}}
"""

LABELS = {"realip": REALIP, "realip-uvloop": REALIP_UVLOOP, "amqtt": AMQTT}

#: What a file is on the message path, for the summary by component.
COMPONENTS = [
    ("broker/mqtt/codec.py", "MQTT decode/encode (broker/mqtt/codec.py)"),
    ("broker/mqtt/", "MQTT protocol state (broker/mqtt/protocol.py, packets)"),
    ("broker/channel.py", "per-connection channel (broker/channel.py)"),
    ("broker/engine.py", "routing, flush (broker/engine.py)"),
    ("broker/core/", "sessions, deliveries, topic trie (broker/core/)"),
    ("broker/", "rest of broker/"),
    ("listeners/", "listener protocol; under uvloop also the socket writes (listeners/)"),
    ("asyncio/runners.py", "event loop in C (uvloop: epoll, recv/send, callbacks)"),
    ("asyncio/", "asyncio's Python loop and transports (select, recv/send)"),
    ("selectors.py", "asyncio's Python loop and transports (select, recv/send)"),
    ("amqtt/", "amqtt"),
]


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _component(where: str) -> str:
    match = re.search(r"\(([^()]*)\)$", where)
    path = match.group(1) if match else where
    for prefix, name in COMPONENTS:
        if path.startswith(prefix):
            return name
    return "other (stdlib, C)"


# --------------------------------------------------------------------------------------------------
# The profiled child: the broker's own command line under cProfile, toggled by signals


def child(kind: str, stats_path: str, args: list[str]) -> int:
    import cProfile

    profiler = cProfile.Profile()

    def start(*_: object) -> None:
        profiler.enable()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(stats_path + ".tmp")
        os.replace(stats_path + ".tmp", stats_path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    if kind.startswith("realip"):
        sys.path.insert(0, str(REPO))
        from broker.cli import main

        return main(args)
    import logging

    import amqtt_plain

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(amqtt_plain.main(int(args[0])))
    return 0


# --------------------------------------------------------------------------------------------------
# Reports


def cprofile_report(stats_file: Path, messages: int, top: int) -> list[str]:
    stats = pstats.Stats(str(stats_file))
    entries = []
    for (file, line, func), (_cc, calls, own, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{func} ({_short(file)}:{line})" if file != "~" else func
        entries.append((where, calls, own, cum))
    total = sum(own for _, _, own, _ in entries)
    out = []
    for title, key in (("own time", 2), ("cumulative time", 3)):
        out.append(f"top {top} by {title} (cProfile; total own time {total:.2f} s for {messages:,} messages)")
        out.append(
            f"  {'calls':>9} {'own s':>7} {'cum s':>7} {'own us/msg':>10} {'cum us/msg':>10}  function"
        )
        for where, calls, own, cum in sorted(entries, key=lambda e: e[key], reverse=True)[:top]:
            out.append(
                f"  {calls:>9} {own:>7.3f} {cum:>7.3f} {own / messages * 1e6:>10.1f} "
                f"{cum / messages * 1e6:>10.1f}  {where}"
            )
        out.append("")
    return out


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def pyspy_report(raw_file: Path, messages: int, top: int, loop: str, cpu_us: float) -> list[str]:
    """py-spy's samples by component and function; ``cpu_us``: the broker's CPU per message
    (/proc), shared out over the components by their share of the samples."""
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    samples = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append(f"{match['func']} ({_short(match['file'])})" if match else frame)
        leaf = frames[-1]
        if loop == "uvloop" and leaf == "Runner.run (asyncio/runners.py)":
            leaf = "[uvloop's C event loop: epoll, recv/send, callbacks] (asyncio/runners.py)"
        own[leaf] += count
        for name in set(frames):
            cum[name] += count
    # Frames on every sample (runpy, the CLI, asyncio.run, the loop) say nothing: left out.
    for name in [name for name, count in cum.items() if count >= samples * 0.97]:
        del cum[name]
    cum.pop("Handle._run (asyncio/events.py)", None)
    out = [
        f"{samples:,} samples while busy at {SAMPLE_RATE}/s ({samples / SAMPLE_RATE:.2f} s; py-spy also "
        "counts time runnable but not running); us/msg below = the broker's CPU per message from /proc "
        f"({cpu_us:.1f} us) x the share of samples",
        "",
    ]
    components: Counter[str] = Counter()
    for name, count in own.items():
        components[_component(name)] += count
    out.append("own samples by component")
    out.append(f"  {'samples':>8} {'share':>6} {'us/msg':>7}  component")
    for name, count in components.most_common():
        out.append(
            f"  {count:>8} {count / max(samples, 1):>6.1%} {cpu_us * count / max(samples, 1):>7.2f}  {name}"
        )
    out.append("")
    for title, counter in (("own samples", own), ("inclusive samples", cum)):
        out.append(f"top {top} by {title} (py-spy; {samples:,} samples while busy, {messages:,} messages)")
        out.append(f"  {'samples':>8} {'share':>6}  function")
        for name, count in counter.most_common(top):
            out.append(f"  {count:>8} {count / max(samples, 1):>6.1%}  {name}")
        out.append("")
    return out


# --------------------------------------------------------------------------------------------------
# The parent: start, load, profile, report


def _py_spy() -> str | None:
    beside = Path(PYTHON).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def _start(kind: str, profiler: str, stats: Path) -> Broker:
    launcher = None
    if profiler == "cprofile":
        launcher = [PYTHON, str(BENCH / "profile_engine.py"), "--child", kind, "--stats", str(stats), "--"]
    if kind == "realip":
        return await start_realip(CONFIG, launcher=launcher)
    if kind == "realip-uvloop":
        return await start_realip(CONFIG, label=REALIP_UVLOOP, launcher=launcher, loop="uvloop")
    return await start_amqtt(launcher=launcher)


@dataclass
class PacedFlow:
    sent: int
    delivered: int
    seconds: float
    broker_cpu: float


async def paced_flow(broker: Broker, rate: int, seconds: float) -> PacedFlow:
    """mosquitto_pub -l fed ``rate`` 64-byte lines/s for ``seconds`` -> one mosquitto_sub."""
    topic = f"bench/{uuid.uuid4().hex[:12]}"
    host = ["-h", "127.0.0.1", "-p", str(broker.port)]
    sub_proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *host,
        "-t",
        topic,
        "-F",
        "%l",
        "-W",
        str(int(seconds) + 60),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    sub = _Subscriber(sub_proc, b"64", 1 << 40)
    pub: asyncio.subprocess.Process | None = None
    try:
        probe = await RawClient.connect(broker.port, f"{topic}-probe")
        deadline = time.monotonic() + 10.0
        while not sub.ready.is_set():
            if time.monotonic() > deadline:
                raise BenchError(f"{broker.label}: subscriber not ready within 10s")
            probe.writer.write(publish_packet(topic.encode(), PROBE))
            await asyncio.sleep(0.03)
        await probe.close()
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            *host,
            "-t",
            topic,
            "-l",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        cpu0 = broker.cpu_seconds()
        started = time.perf_counter()
        stop = asyncio.Event()
        pacer = asyncio.create_task(_pace(pub, rate, stop))
        await asyncio.sleep(seconds)
        stop.set()
        sent = await asyncio.wait_for(pacer, 10.0)
        deadline = time.monotonic() + 10.0
        while sub.count < sent and time.monotonic() < deadline:
            if sub.count and time.perf_counter() - sub.last > 1.0:
                break
            await asyncio.sleep(0.01)
        return PacedFlow(sent, sub.count, sub.last - started, broker.cpu_seconds() - cpu0)
    finally:
        await terminate([p for p in (pub, sub_proc) if p is not None])
        sub.task.cancel()


async def profile_one(
    kind: str, profiler: str, seconds: float, amqtt_messages: int, top: int, save: Path | None
) -> list[str]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    stats = workdir / f"{kind}.prof"
    broker = await _start(kind, profiler, stats)
    spy: asyncio.subprocess.Process | None = None
    try:
        # Warm-up: imports, first allocations, code paths.
        await measure_flow(broker, 1, 1, 64, 0, 1000, 0.5)
        if profiler == "cprofile":
            os.kill(broker.pid, signal.SIGUSR1)
        else:
            spy = await asyncio.create_subprocess_exec(
                _py_spy() or "py-spy",
                "record",
                "--pid",
                str(broker.pid),
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--function",
                "-o",
                str(stats),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(0.5)  # py-spy attaches
        drops0 = await broker.dropped()
        started = time.perf_counter()
        if kind == "amqtt":
            flow = await measure_flow(broker, 1, 1, 64, 0, amqtt_messages, 1.0)
            sent, delivered, cpu, rate = flow.sent, flow.delivered, flow.broker_cpu, flow.rate
            load = "as fast as it takes them"
        else:
            paced = await paced_flow(broker, PACE, seconds)
            sent, delivered, cpu = paced.sent, paced.delivered, paced.broker_cpu
            rate = delivered / paced.seconds if paced.seconds > 0 else float("nan")
            load = f"fed at {PACE:,} msg/s for {seconds:g} s"
        elapsed = time.perf_counter() - started
        drops1 = await broker.dropped()
        dropped = ""
        if drops0 is not None and drops1 is not None:
            lost = drops1.get("queue_full", 0) - drops0.get("queue_full", 0)
            dropped = f", {lost:,} dropped by the broker (queue_full)"
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), 30)
        else:
            os.kill(broker.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not stats.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"no profile written by {kind}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        loop = broker.loop or "asyncio"
        head = [
            f"== {LABELS[kind]} ({'event loop ' + loop if kind != 'amqtt' else 'asyncio'}): "
            f"{delivered:,}/{sent:,} QoS 0 64-byte messages delivered ({load}){dropped}, {rate:,.0f} msg/s, "
            f"broker CPU {cpu / max(delivered, 1) * 1e6:.1f} us/msg (/proc), under {profiler} "
            f"({elapsed:.1f} s incl. set-up)",
            "",
        ]
        if profiler == "cprofile":
            report = cprofile_report(stats, delivered, top)
        else:
            report = pyspy_report(stats, delivered, top, loop, cpu / max(delivered, 1) * 1e6)
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            shutil.copy(stats, save / stats.name)
        return head + report
    finally:
        if spy is not None and spy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                spy.kill()
        await broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def main_async(args: argparse.Namespace) -> None:
    seconds = args.seconds or SECONDS[args.quick]
    engines = args.engine or (["realip", "amqtt"] if args.quick else list(LABELS))
    if not args.engine and "realip-uvloop" in engines and not uvloop_available():
        engines.remove("realip-uvloop")
        print(f"{UVLOOP_MISSING}.\n", flush=True)
    for kind in engines:
        for line in await profile_one(
            kind, args.profiler, seconds, AMQTT_MESSAGES[args.quick], args.top, args.save
        ):
            print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        kind, stats = argv[1], argv[3]
        return child(kind, stats, argv[5:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--profiler",
        choices=["cprofile", "py-spy"],
        default="py-spy" if _py_spy() else "cprofile",
        help="default: py-spy when installed (pip install py-spy), else cprofile",
    )
    parser.add_argument(
        "--engine",
        nargs="+",
        choices=list(LABELS),
        help="default: all three (--quick: realip amqtt; realip-uvloop only when uvloop is importable)",
    )
    parser.add_argument("--seconds", type=float, default=0.0, help="realip-broker's profiled seconds")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--save", type=Path, help="keep the raw profiles in this directory")
    args = parser.parse_args(argv)
    require_peers()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
