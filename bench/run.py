"""realip-broker's benchmark suite: one entry point, every benchmark side by side in one run.

    python bench/run.py [--quick] [--only NAME ...] [--output FILE] [--realip-src DIR]

Benchmarks (in this order; ``--only`` picks some):

realip-broker runs on its default event loop (asyncio's own); the loop contender beside it is
``serve --loop uvloop``, skipped (with a note) when uvloop is not importable.

- ``throughput``  QoS 0/1 msg/s, 1->1, 10->1, 1->10, 64 B and 4 KiB: realip-broker (plain listener,
  PROXY listener, and for 64 B 1->1 over MQTT 5 and on uvloop), amqtt 0.12.1 with its own
  listener, mosquitto; rounds alternate the brokers.
- ``ratio``       QoS 0 1->1 64 B over alternating rounds: realip-broker (asyncio's loop, uvloop,
  MQTT 5, PROXY listener) against amqtt and mosquitto fed by the same publishers, with spread;
  what uvloop gives.
- ``filters``     a QoS 0 flow while one client holds 20 or 20,000 unrelated filters, three brokers
  (bench_filters.py).
- ``latency``     QoS 1 publish->receive p50/p90/p99 under a fixed background load, three brokers.
- ``connect``     connection rate through a PROXY v1 / v2 listener vs a plain one.
- ``auth``        CONNECT rate with each password backend (built-in database argon2id and
                  PBKDF2, a mosquitto password file) vs no authenticator (bench_auth_connect.py).
- ``bans``        CONNECT rate with 10,000 peerhost bans vs none (bench_bans.py).
- ``persistence`` retained publishes per second with the SQLite store on vs off, and QoS 1 through a
                  persistent session (bench_persistence.py).
- ``cluster``     two clustered nodes and a redis-server: publisher on A -> subscriber on B against both
                  on A, QoS 0 and 1, with the CPU per message of the Redis hop (bench_cluster.py).
- ``ws``          WebSocket connection rate with X-Forwarded-For resolution vs without.
- ``memory``      resident memory per idle connection at 1k and 10k connections through a PROXY
                  listener (asyncio's loop and uvloop), with amqtt's own listener and mosquitto at
                  the same counts; where the Python-allocated bytes of a connection go
                  (tracemalloc).
- ``parse``       PROXY header parse rate (bench_proxy_parse.py).
- ``admin``       ``ctl clients list`` with 10,000 clients (bench_admin_list.py).
- ``profile``     where realip-broker (asyncio's loop and uvloop) and amqtt spend their time on
                  the QoS 0 message path (profile_engine.py: py-spy when installed, else cProfile).

Prints a header (date, machine, load, which realip-broker tree, command), one Markdown table per
benchmark with ratios, the wall time of each benchmark and of the whole run, then the issue's
acceptance criteria as measured. ``--quick`` is a smoke run (< 1 minute), ``--output`` also writes
the report to a file, ``--realip-src`` measures another source tree of realip-broker (for example
``git archive COMMIT | tar -x -C DIR``) against the same references.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_auth_connect  # noqa: E402
import bench_bans  # noqa: E402
import bench_cluster  # noqa: E402
import bench_connect_rate  # noqa: E402
import bench_filters  # noqa: E402
import bench_latency  # noqa: E402
import bench_memory  # noqa: E402
import bench_persistence  # noqa: E402
import bench_throughput  # noqa: E402
import bench_ws_connect_rate  # noqa: E402
from benchlib import (  # noqa: E402
    PYTHON,
    REALIP,
    REALIP_SRC,
    REPO,
    BenchError,
    Options,
    Table,
    load_average,
    machine_summary,
    peer_versions,
    raise_nofile,
    require_peers,
    source_summary,
)


async def _script(options: Options, name: str, *args: str) -> list[Table]:
    """Run one of the older standalone scripts and quote its output."""
    command = [PYTHON, str(BENCH / name), *args, *(["--quick"] if options.quick else [])]
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise BenchError(f"{name} exited {proc.returncode}: {out.decode(errors='replace')[-2000:]}")
    table = Table(f"{name} (its own output)", ["output"])
    table.rows = [[line] for line in out.decode().rstrip().splitlines()]
    return [table]


async def run_parse(options: Options) -> list[Table]:
    return await _script(options, "bench_proxy_parse.py")


async def run_admin(options: Options) -> list[Table]:
    return await _script(options, "bench_admin_list.py")


async def run_profile(options: Options) -> list[Table]:
    tables = await _script(options, "profile_engine.py")
    lines = [row[0] for row in tables[0].rows]
    ours, section = False, ""
    names: list[str] = []
    for line in lines:
        if line.startswith("=="):
            ours = line.startswith(f"== {REALIP} (event loop")
        elif not line.startswith(" "):
            section = line
        elif ours and "by own" in section and "(broker/" in line and len(names) < 3:
            names.append(line.split("%", 1)[1].strip().split(" (")[0])
    options.check(
        "a profile of the new message path, naming our functions (profile_engine.py)",
        "top own samples: " + ", ".join(names) if names else "no broker/ function in the profile",
        bool(names),
    )
    return tables


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


class _ChildWatcherNoise(logging.Filter):
    """asyncio's child watcher warns, rarely, that a client process it waited for was already reaped
    ("Unknown child process pid N, will report returncode 255"); no benchmark reads a client's
    return code, so the line is noise in the report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown child process pid")


BENCHMARKS: dict[str, Callable[[Options], Awaitable[list[Table]]]] = {
    "throughput": bench_throughput.run_throughput,
    "ratio": bench_throughput.run_ratio,
    "filters": bench_filters.run,
    "latency": bench_latency.run,
    "connect": bench_connect_rate.run,
    "auth": bench_auth_connect.run,
    "bans": bench_bans.run,
    "persistence": bench_persistence.run,
    "cluster": bench_cluster.run,
    "ws": bench_ws_connect_rate.run,
    "memory": bench_memory.run,
    "parse": run_parse,
    "admin": run_admin,
    "profile": run_profile,
}
DEFAULT = list(BENCHMARKS)


def render_output(table: Table) -> str:
    if table.columns == ["output"]:
        return "\n".join([f"### {table.title}", "", "```text", *(r[0] for r in table.rows), "```"])
    return table.render()


async def run_all(options: Options, names: list[str], out: list[str]) -> list[tuple[str, float]]:
    walls: list[tuple[str, float]] = []
    try:
        for name in names:
            started = time.perf_counter()
            print(f"## {name}", flush=True)
            out.append(f"## {name}")
            try:
                tables = await BENCHMARKS[name](options)
            except BenchError as exc:
                tables = []
                message = f"**{name} failed:** {exc}"
                print(message, flush=True)
                out.append(message)
            wall = time.perf_counter() - started
            walls.append((name, wall))
            for table in tables:
                text = render_output(table)
                print(text + "\n", flush=True)
                out.append(text)
            print(f"({name}: {wall:.1f} s)\n", flush=True)
            out.append(f"({name}: {wall:.1f} s)")
    finally:
        await options.close()
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="realip-broker benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run, < 1 minute")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS)
    )
    parser.add_argument("--output", metavar="FILE", help="also write the report (Markdown) to FILE")
    parser.add_argument(
        "--realip-src",
        metavar="DIR",
        type=Path,
        help="run realip-broker from this source tree (e.g. `git archive COMMIT | tar -x -C DIR`)",
    )
    args = parser.parse_args(argv)
    if args.realip_src:
        REALIP_SRC[0] = args.realip_src.resolve()
    names = args.only or DEFAULT
    require_peers()
    nofile = raise_nofile()
    command = "python bench/run.py" + ("".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])))
    started = time.perf_counter()
    header = [
        "# realip-broker benchmarks",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine_summary()}",
        f"- load average at start: {load_average()} (other work on the machine skews absolute figures)",
        f"- realip-broker: {source_summary()}",
        f"- peers: {peer_versions()}; RLIMIT_NOFILE {nofile}",
        f"- command: `{command}`" + (" (quick smoke run: small counts, rough figures)" if args.quick else ""),
        "",
    ]
    print("\n".join(header), flush=True)
    out: list[str] = ["\n".join(header).rstrip()]
    logging.getLogger("asyncio").addFilter(_ChildWatcherNoise())
    # SIGTERM stops like Ctrl-C: asyncio.run cancels the run, whose ``finally`` stops every broker
    # started and removes its directory (an orphaned broker would skew the next run).
    signal.signal(signal.SIGTERM, _interrupt)
    options = Options(quick=args.quick)
    try:
        walls = asyncio.run(run_all(options, names, out))
    except KeyboardInterrupt:
        print("interrupted: brokers stopped", file=sys.stderr)
        return 130
    total = time.perf_counter() - started
    summary = Table("Wall time", ["benchmark", "seconds"])
    for name, wall in walls:
        summary.add(name, f"{wall:.1f}")
    summary.add("**total**", f"{total:.1f}")
    summary.notes.append(f"load average at the end: {load_average()}")
    print(summary.render(), flush=True)
    out.append(summary.render())
    budget = 60 if args.quick else 600
    if set(names) == set(DEFAULT):
        options.check(
            f"{'--quick' if args.quick else 'full run'} in < {budget} s", f"{total:.0f} s", total < budget
        )
    if options.checks:
        criteria = Table("The issue's criteria, as measured in this run", ["criterion", "measured", "met"])
        for criterion, measured, met in options.checks:
            verdict = "yes" if met else "**no**"
            if args.quick and not criterion.startswith("--quick"):
                verdict = "not judged (--quick)"
            criteria.add(criterion, measured, verdict)
        if args.quick:
            criteria.notes.append("--quick: counts too small for the ratios to mean much; judge a full run")
        print("\n" + criteria.render(), flush=True)
        out.append(criteria.render())
    if args.output:
        Path(args.output).write_text("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
