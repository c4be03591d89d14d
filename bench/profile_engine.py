"""Profile of the engine's message path: QoS 0, 1->1, 64-byte messages through the broker.

The broker runs as in the benchmarks (its own process, started the same way), and
``mosquitto_pub -l`` -> ``mosquitto_sub`` push QoS 0 messages through it while it is profiled:

- ``--profiler cprofile`` (default without py-spy): the broker process runs its usual command
  line under cProfile, switched on (SIGUSR1) when publishing starts and off (SIGUSR2, stats
  written) when the last message has arrived, so start-up is not in the figures. cProfile slows
  Python code ~2x and counts each resumption of a coroutine as a call: use it for *where*, not for
  absolute speed.
- ``--profiler py-spy`` (default when installed: ``pip install py-spy``): the unmodified broker
  sampled by py-spy, 250 samples/s, by function; C code (socket send, Task creation) is charged to
  the Python function calling it. Low overhead (~5%), no call counts.

Both realip-broker (``serve``, its TCP listener) and plain amqtt 0.12.1 (its own TCP listener) are
profiled by default, so that the cost of our layers shows as the difference.

    python bench/profile_engine.py [--quick] [--profiler cprofile|py-spy] [--engine realip amqtt]
        [--messages N] [--top 15] [--save DIR]
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
from collections import Counter
from pathlib import Path

from bench_throughput import measure_flow
from benchlib import (
    AMQTT,
    BENCH,
    PYTHON,
    REALIP,
    REPO,
    BenchError,
    Broker,
    require_peers,
    start_amqtt,
    start_realip,
)

MESSAGES = {False: 30_000, True: 4_000}

CONFIG = """\
listeners:
  tcp:
    default: {bind: "127.0.0.1:0"}
  ws:
    default: {enable: false}
admin: {listen: ""}
"""


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


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
    if kind == "realip":
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


def pyspy_report(raw_file: Path, messages: int, top: int) -> list[str]:
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
        own[frames[-1]] += count
        for name in set(frames):
            cum[name] += count
    # Frames on every sample (runpy, the CLI, asyncio.run, the loop) say nothing: left out.
    for name in [name for name, count in cum.items() if count >= samples * 0.97]:
        del cum[name]
    cum.pop("Handle._run (asyncio/events.py)", None)
    out = []
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
    return await start_amqtt(launcher=launcher)


async def profile_one(kind: str, profiler: str, messages: int, top: int, save: Path | None) -> list[str]:
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
                "250",
                "--format",
                "raw",
                "--function",
                "-o",
                str(stats),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(0.5)  # py-spy attaches
        started = time.perf_counter()
        flow = await measure_flow(broker, 1, 1, 64, 0, messages, 1.0)
        elapsed = time.perf_counter() - started
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
        label = REALIP if kind == "realip" else AMQTT
        head = [
            f"== {label}: {flow.delivered:,}/{flow.sent:,} QoS 0 64-byte messages delivered, "
            f"{flow.rate:,.0f} msg/s under {profiler} ({elapsed:.1f} s incl. set-up)",
            "",
        ]
        report = (cprofile_report if profiler == "cprofile" else pyspy_report)(stats, flow.delivered, top)
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
    messages = args.messages or MESSAGES[args.quick]
    for kind in args.engine:
        for line in await profile_one(kind, args.profiler, messages, args.top, args.save):
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
    parser.add_argument("--engine", nargs="+", choices=["realip", "amqtt"], default=["realip", "amqtt"])
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--save", type=Path, help="keep the raw profiles in this directory")
    args = parser.parse_args(argv)
    require_peers()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
